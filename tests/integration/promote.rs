//! Promotion: dev -> staging -> prod with gates, overrides, release sets,
//! automatic promotion, rollback and audit.

use std::time::Duration;

use tonic::Code;
use unitsync_agent::hub_client::StatusUpdate;
use unitsync_hub::control::Tuning;
use unitsync_proto::v1 as pb;
use unitsync_tests::cluster::TestCluster;
use unitsync_tests::hub::Admin;
use unitsync_tests::{SimAgent, TestHub, until, within};

const WEB: &str = include_str!("../../deploy/examples/messagewall/web.yaml");
const TABLE: &str = include_str!("../../deploy/examples/messagewall/dynamodb.yaml");
const CRDS: &str = include_str!("../../deploy/examples/messagewall/crds.yaml");

fn promote_req(from: &str, to: &str, units: &[&str]) -> pb::PromoteRequest {
    pb::PromoteRequest {
        from: from.into(),
        to: to.into(),
        units: units.iter().map(|u| (*u).to_owned()).collect(),
        ..Default::default()
    }
}

/// The same request as a dry run.
fn dry_run(req: pb::PromoteRequest) -> pb::PromoteRequest {
    pb::PromoteRequest {
        dry_run: true,
        ..req
    }
}

/// The verdict of gate `name` on the first item.
fn gate<'a>(r: &'a pb::PromoteResponse, name: &str) -> &'a pb::GateResult {
    r.items[0]
        .gates
        .iter()
        .find(|g| g.gate == name)
        .unwrap_or_else(|| panic!("gate {name} in {:?}", r.items[0].gates))
}

async fn promote(admin: &mut Admin, req: pb::PromoteRequest) -> pb::PromoteResponse {
    within("promote", admin.promote(req))
        .await
        .expect("promote call")
        .into_inner()
}

async fn pipeline(tuning: Tuning) -> TestHub {
    let hub = TestHub::start_with(tuning).await;
    for env in ["dev", "staging", "prod"] {
        hub.create_env(env).await;
    }
    hub
}

async fn ready_in(hub: &TestHub, unit: &str, revision: u64) {
    until(&format!("{unit}@{revision} Ready"), || async {
        hub.unit(unit).await.is_ok_and(|d| {
            !d.clusters.is_empty()
                && d.clusters
                    .iter()
                    .all(|c| c.revision == revision && c.phase == i32::from(pb::Phase::Ready))
        })
    })
    .await;
}

#[tokio::test]
async fn full_flow_with_real_agents_dev_staging_prod() {
    let hub = pipeline(Tuning::default()).await;
    let mut clusters = Vec::new();
    for env in ["dev", "staging", "prod"] {
        let token = hub.create_cluster(&format!("{env}-1"), env).await;
        let mut c = TestCluster::new(&hub.endpoint(), hub.ca(), &token).await;
        c.start_agent();
        clusters.push(c);
    }
    let unit = format!("{CRDS}---\n{TABLE}---\n{WEB}");
    hub.put("dev/messagewall", &unit).await.unwrap();
    ready_in(&hub, "dev/messagewall", 1).await;
    let mut admin = hub.admin().await;
    let r = promote(&mut admin, promote_req("dev", "staging", &["messagewall"])).await;
    assert!(!r.blocked, "{}", r.message);
    assert_eq!(r.items[0].target_revision, 1);
    ready_in(&hub, "staging/messagewall", 1).await;
    let r = promote(
        &mut admin,
        pb::PromoteRequest {
            all: true,
            ..promote_req("staging", "prod", &[])
        },
    )
    .await;
    assert!(!r.blocked, "{}", r.message);
    ready_in(&hub, "prod/messagewall", 1).await;
    assert!(
        clusters[2]
            .object(
                "dynamodb.aws.upbound.io/v1beta1",
                "tables",
                "",
                "messagewall-messages"
            )
            .is_some()
    );
    assert_eq!(
        clusters[2]
            .object("apps/v1", "deployments", "messagewall", "web")
            .unwrap()["metadata"]["annotations"]["unitsync.dev/unit"],
        "prod/messagewall"
    );
    let prod = hub.unit("prod/messagewall").await.unwrap();
    let u = prod.unit.unwrap();
    assert_eq!(
        (u.upstream.as_str(), u.promoted_from_revision),
        ("staging/messagewall", 1)
    );
    assert_eq!(
        prod.head.unwrap().origin,
        "promotion from staging/messagewall@1"
    );
    // Promoting again changes nothing.
    let r = promote(&mut admin, promote_req("dev", "staging", &["messagewall"])).await;
    assert_eq!(r.items[0].skipped, "up to date");
    // Audit: who promoted what.
    let audit = admin
        .list_audit(pb::ListAuditRequest {
            limit: 100,
            target_prefix: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert!(audit.iter().any(|e| {
        e.action == "promotion"
            && e.target == "dev->staging"
            && e.actor == "operator:admin"
            && e.detail
                .contains("dev/messagewall@1 -> staging/messagewall@1")
    }));
    assert!(
        audit
            .iter()
            .any(|e| e.action == "promotion" && e.target == "staging->prod")
    );
    // Promotions only go forward.
    let e = admin
        .promote(promote_req("prod", "dev", &["messagewall"]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
}

/// A dev cluster whose agent reports Ready for everything it receives.
async fn healthy_dev(hub: &TestHub) -> SimAgent {
    let token = hub.create_cluster("dev-1", "dev").await;
    let mut agent = SimAgent::new(&hub.endpoint(), hub.ca(), &token).auto_ready();
    agent.start();
    agent
}

fn web(image: &str, replicas: u32) -> String {
    WEB.replace("web:1.0.0", image)
        .replace("replicas: 2", &format!("replicas: {replicas}"))
}

#[tokio::test]
async fn overrides_survive_promotions_and_conflicts_are_reported() {
    let hub = pipeline(Tuning::default()).await;
    let _dev = healthy_dev(&hub).await;
    let mut admin = hub.admin().await;
    hub.put("dev/web", &web("web:1", 2)).await.unwrap();
    ready_in(&hub, "dev/web", 1).await;
    hub.link("staging/web", "dev/web").await;
    let replicas = pb::Override {
        kind: "Deployment".into(),
        name: "web".into(),
        namespace: "messagewall".into(),
        path: "spec.replicas".into(),
        value_json: "5".into(),
    };
    within(
        "overrides",
        admin.set_overrides(pb::SetOverridesRequest {
            unit: "staging/web".into(),
            overrides: vec![replicas.clone()],
        }),
    )
    .await
    .unwrap();
    for (rev, image) in [(2, "web:2"), (3, "web:3")] {
        hub.put("dev/web", &web(image, 2)).await.unwrap();
        ready_in(&hub, "dev/web", rev).await;
        let r = promote(&mut admin, promote_req("dev", "staging", &["web"])).await;
        assert!(!r.blocked, "{}", r.message);
        let head = hub.unit("staging/web").await.unwrap().head.unwrap();
        assert!(
            head.manifests
                .contains(&format!("registry.example.com/messagewall/{image}")),
            "{}",
            head.manifests
        );
        assert!(
            head.manifests.contains("replicas: 5"),
            "override kept: {}",
            head.manifests
        );
    }
    // Upstream now changes the overridden field: reported, nothing committed.
    hub.put("dev/web", &web("web:3", 4)).await.unwrap();
    ready_in(&hub, "dev/web", 4).await;
    let before = hub
        .unit("staging/web")
        .await
        .unwrap()
        .unit
        .unwrap()
        .head_revision;
    let r = promote(&mut admin, promote_req("dev", "staging", &["web"])).await;
    assert!(r.blocked);
    assert!(r.items[0].skipped.contains("override conflict: Deployment web spec.replicas: upstream changed it from 2 to 4, overridden here as 5"), "{}", r.items[0].skipped);
    assert!(
        r.items[0]
            .skipped
            .contains("set the overrides of staging/web again"),
        "{}",
        r.items[0].skipped
    );
    assert_eq!(
        hub.unit("staging/web")
            .await
            .unwrap()
            .unit
            .unwrap()
            .head_revision,
        before
    );
    // Setting the override again keeps it: the change it saw upstream is no
    // conflict any more, and the promotion goes through with the override.
    within(
        "overrides again",
        admin.set_overrides(pb::SetOverridesRequest {
            unit: "staging/web".into(),
            overrides: vec![replicas],
        }),
    )
    .await
    .unwrap();
    let r = promote(&mut admin, promote_req("dev", "staging", &["web"])).await;
    assert!(!r.blocked, "{}", r.message);
    let head = hub.unit("staging/web").await.unwrap().head.unwrap();
    assert!(head.manifests.contains("replicas: 5"), "{}", head.manifests);
    // A later change of the field upstream is a conflict again.
    hub.put("dev/web", &web("web:3", 6)).await.unwrap();
    ready_in(&hub, "dev/web", 5).await;
    let r = promote(&mut admin, promote_req("dev", "staging", &["web"])).await;
    assert!(r.blocked);
    assert!(
        r.items[0].skipped.contains("from 4 to 6"),
        "{}",
        r.items[0].skipped
    );
}

#[tokio::test]
async fn each_gate_blocks_then_passes() {
    let hub = pipeline(Tuning::default()).await;
    let mut admin = hub.admin().await;
    admin
        .set_environment_policy(pb::SetEnvironmentPolicyRequest {
            name: "staging".into(),
            policy: Some(pb::EnvironmentPolicy {
                required_approvals: 2,
                soak_seconds: 1,
                auto_promote: false,
            }),
        })
        .await
        .unwrap();
    let token = hub.create_cluster("dev-1", "dev").await;
    let mut dev = SimAgent::new(&hub.endpoint(), hub.ca(), &token);
    dev.start();
    hub.put("dev/web", &web("web:1", 2)).await.unwrap();
    until("dev received web", || async {
        dev.held().contains_key("web")
    })
    .await;
    let report = |phase: unitsync_agent::status::Phase| StatusUpdate {
        unit: "web".into(),
        revision: 1,
        phase,
        message: "rolling out".into(),
        resources: vec![],
    };

    // Unhealthy source.
    dev.report(report(unitsync_agent::status::Phase::Progressing));
    until("progressing recorded", || async {
        hub.unit("dev/web")
            .await
            .unwrap()
            .clusters
            .first()
            .is_some_and(|c| c.phase == i32::from(pb::Phase::Progressing))
    })
    .await;
    let r = promote(&mut admin, promote_req("dev", "staging", &["web"])).await;
    assert!(r.blocked);
    let health = gate(&r, "health");
    assert!(
        !health.passed && health.detail.contains("dev-1: Progressing rolling out"),
        "{health:?}"
    );

    // Healthy, but the soak time has not passed.
    dev.report(report(unitsync_agent::status::Phase::Ready));
    ready_in(&hub, "dev/web", 1).await;
    let r = promote(&mut admin, dry_run(promote_req("dev", "staging", &["web"]))).await;
    assert!(!gate(&r, "soak").passed, "{:?}", r.items[0].gates);
    assert!(
        r.items[0].diff.contains("+kind: Deployment"),
        "dry run shows the diff"
    );

    // Soaked; approvals missing.
    until("soaked", || async {
        let r = promote(
            &mut hub.admin().await,
            dry_run(promote_req("dev", "staging", &["web"])),
        )
        .await;
        gate(&r, "soak").passed
    })
    .await;
    let r = promote(&mut admin, promote_req("dev", "staging", &["web"])).await;
    let approvals = gate(&r, "approvals");
    assert_eq!(
        (approvals.passed, approvals.detail.as_str()),
        (false, "0 of 2 approvals")
    );

    // The same operator twice counts once.
    let approve = pb::ApproveRequest {
        unit: "dev/web".into(),
        revision: 1,
        target_environment: "staging".into(),
    };
    assert_eq!(
        admin
            .approve(approve.clone())
            .await
            .unwrap()
            .into_inner()
            .approvals,
        1
    );
    let e = admin.approve(approve.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    assert!(
        promote(&mut admin, promote_req("dev", "staging", &["web"]))
            .await
            .blocked
    );
    // A second operator.
    let bob = hub.create_operator("bob", "admin").await;
    let mut bob = hub.client(&bob).await;
    assert_eq!(
        bob.approve(approve).await.unwrap().into_inner().approvals,
        2
    );
    // A cluster whose agent is not connected cannot vouch for its last
    // report: health does not pass on it.
    let dev_1: unitsync_hub::model::ClusterName = "dev-1".parse().unwrap();
    dev.stop().await;
    until("dev-1 disconnected", || async {
        !hub.running().hub.is_connected(&dev_1)
    })
    .await;
    let r = promote(&mut bob, dry_run(promote_req("dev", "staging", &["web"]))).await;
    let health = gate(&r, "health");
    assert!(
        !health.passed && health.detail.contains("dev-1: agent not connected"),
        "{health:?}"
    );
    dev.start();
    until("dev-1 connected", || async {
        hub.running().hub.is_connected(&dev_1)
    })
    .await;
    let r = promote(&mut bob, promote_req("dev", "staging", &["web"])).await;
    assert!(!r.blocked, "{}", r.message);
    assert!(r.promotion_id > 0);
    let staging = hub.unit("staging/web").await.unwrap().head.unwrap();
    assert_eq!(staging.author, "operator:bob");

    // Emergency override: audited with its reason.
    hub.put("dev/web", &web("web:hotfix", 2)).await.unwrap();
    let e = admin
        .promote(pb::PromoteRequest {
            force: true,
            ..promote_req("dev", "staging", &["web"])
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("needs a reason"));
    let r = promote(
        &mut admin,
        pb::PromoteRequest {
            force: true,
            reason: "CVE fix".into(),
            ..promote_req("dev", "staging", &["web"])
        },
    )
    .await;
    assert!(
        !r.blocked && r.items[0].target_revision == 2,
        "{}",
        r.message
    );
    let audit = admin
        .list_audit(pb::ListAuditRequest {
            limit: 10,
            target_prefix: "dev->staging".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert!(
        audit
            .iter()
            .any(|e| e.action == "promotion.forced" && e.detail.contains("CVE fix")),
        "{audit:?}"
    );
    assert!(
        admin
            .list_audit(pb::ListAuditRequest {
                limit: 50,
                target_prefix: "dev/web".into()
            })
            .await
            .unwrap()
            .into_inner()
            .entries
            .iter()
            .any(|e| e.action == "promotion.approve" && e.actor == "operator:bob")
    );
}

#[tokio::test]
async fn a_release_set_is_atomic() {
    let hub = pipeline(Tuning::default()).await;
    let _dev = healthy_dev(&hub).await;
    let mut admin = hub.admin().await;
    let cm = |name: &str, v: &str| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: apps\ndata:\n  v: \"{v}\"\n"
        )
    };
    hub.put("dev/a", &cm("a", "1")).await.unwrap();
    hub.put("dev/b", &cm("b", "1")).await.unwrap();
    ready_in(&hub, "dev/a", 1).await;
    ready_in(&hub, "dev/b", 1).await;
    let r = promote(
        &mut admin,
        pb::PromoteRequest {
            all: true,
            ..promote_req("dev", "staging", &[])
        },
    )
    .await;
    assert_eq!(r.items.iter().filter(|i| i.target_revision == 1).count(), 2);
    // b's override cannot apply to the new content: nothing is committed.
    let bad = pb::Override {
        kind: "ConfigMap".into(),
        name: "renamed".into(),
        namespace: String::new(),
        path: "data.v".into(),
        value_json: "\"x\"".into(),
    };
    admin
        .set_overrides(pb::SetOverridesRequest {
            unit: "staging/b".into(),
            overrides: vec![bad],
        })
        .await
        .unwrap();
    hub.put("dev/a", &cm("a", "2")).await.unwrap();
    hub.put("dev/b", &cm("b", "2")).await.unwrap();
    ready_in(&hub, "dev/a", 2).await;
    ready_in(&hub, "dev/b", 2).await;
    let e = admin
        .promote(pb::PromoteRequest {
            all: true,
            ..promote_req("dev", "staging", &[])
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("unit staging/b") && e.message().contains("ConfigMap renamed"),
        "{}",
        e.message()
    );
    assert_eq!(
        hub.unit("staging/a")
            .await
            .unwrap()
            .unit
            .unwrap()
            .head_revision,
        1,
        "a was not promoted alone"
    );
}

#[tokio::test]
async fn automatic_promotion_follows_the_gates() {
    let hub = pipeline(Tuning {
        auto_promote_interval: Duration::from_millis(100),
        ..Tuning::default()
    })
    .await;
    let _dev = healthy_dev(&hub).await;
    let mut admin = hub.admin().await;
    hub.put("dev/web", &web("web:1", 2)).await.unwrap();
    ready_in(&hub, "dev/web", 1).await;
    hub.link("staging/web", "dev/web").await;
    hub.auto_promote("staging").await;
    hub.put("dev/web", &web("web:2", 2)).await.unwrap();
    until("auto-promoted", || async {
        hub.unit("staging/web")
            .await
            .unwrap()
            .head
            .is_some_and(|h| h.manifests.contains("web:2") && h.author == "hub")
    })
    .await;
    let p = admin
        .list_promotions(pb::ListPromotionsRequest { limit: 5 })
        .await
        .unwrap()
        .into_inner()
        .promotions;
    assert!(p[0].automatic && p[0].actor == "hub", "{:?}", p[0]);
}

/// A revoked cluster never reports again: the health gate does not wait
/// for it (and says so), as it did until the cluster was deleted.
#[tokio::test]
async fn a_revoked_cluster_does_not_hold_promotions_up() {
    let hub = pipeline(Tuning::default()).await;
    let _dev = healthy_dev(&hub).await;
    hub.create_cluster("dev-2", "dev").await;
    let mut admin = hub.admin().await;
    within(
        "revoke dev-2",
        admin.revoke_cluster(pb::RevokeClusterRequest {
            name: "dev-2".into(),
        }),
    )
    .await
    .unwrap();
    hub.put("dev/web", &web("web:1", 2)).await.unwrap();
    until("dev/web@1 Ready in dev-1", || async {
        hub.unit("dev/web").await.is_ok_and(|d| {
            d.clusters.iter().any(|c| {
                c.cluster == "dev-1" && c.revision == 1 && c.phase == i32::from(pb::Phase::Ready)
            })
        })
    })
    .await;
    let r = promote(&mut admin, promote_req("dev", "staging", &["web"])).await;
    assert!(!r.blocked, "{}", r.message);
    let health = &r.items[0].gates[0];
    assert!(
        health.passed && health.detail.contains("revoked, not counted: dev-2"),
        "{health:?}"
    );
}

/// A rollback in an environment with automatic promotion stands until
/// the upstream unit moves on: the hub does not promote again what the
/// rollback took back.
#[tokio::test]
async fn automatic_promotion_leaves_a_rollback_be_until_upstream_moves() {
    let hub = pipeline(Tuning {
        auto_promote_interval: Duration::from_secs(3600),
        ..Tuning::default()
    })
    .await;
    let _dev = healthy_dev(&hub).await;
    let mut admin = hub.admin().await;
    let auto = || async {
        within("automatic promotion", hub.running().hub.auto_promote_once())
            .await
            .unwrap()
    };
    let staging_head = || async {
        hub.unit("staging/web")
            .await
            .unwrap()
            .head
            .unwrap()
            .manifests
    };
    hub.put("dev/web", &web("web:1", 2)).await.unwrap();
    ready_in(&hub, "dev/web", 1).await;
    hub.link("staging/web", "dev/web").await;
    hub.auto_promote("staging").await;
    auto().await;
    assert!(staging_head().await.contains("web:1"));
    hub.put("dev/web", &web("web:2", 2)).await.unwrap();
    ready_in(&hub, "dev/web", 2).await;
    assert_eq!(auto().await, 1);
    assert!(staging_head().await.contains("web:2"));
    // Rolled back: web:1 stays although dev's web:2 still passes the gates.
    let first = hub.unit("staging/web").await.unwrap().head.unwrap().number - 1;
    admin
        .rollback_unit(pb::RollbackUnitRequest {
            unit: "staging/web".into(),
            to_revision: first,
            message: "web:2 breaks staging".into(),
        })
        .await
        .unwrap();
    assert_eq!(auto().await, 0, "the rollback was promoted over");
    assert!(staging_head().await.contains("web:1"));
    // Upstream moves on: that is promoted.
    hub.put("dev/web", &web("web:3", 2)).await.unwrap();
    ready_in(&hub, "dev/web", 3).await;
    assert_eq!(auto().await, 1);
    assert!(staging_head().await.contains("web:3"));
}

#[tokio::test]
async fn rollback_of_a_unit_and_of_a_release_set() {
    let hub = pipeline(Tuning::default()).await;
    let _dev = healthy_dev(&hub).await;
    let mut admin = hub.admin().await;
    hub.put("dev/web", &web("web:1", 2)).await.unwrap();
    hub.put("dev/web", &web("web:2", 2)).await.unwrap();
    let r = admin
        .rollback_unit(pb::RollbackUnitRequest {
            unit: "dev/web".into(),
            to_revision: 1,
            message: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.number, r.origin.as_str()), (3, "rollback to 1"));
    let history = admin
        .unit_history(pb::UnitHistoryRequest {
            unit: "dev/web".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .revisions;
    assert_eq!(history.len(), 3, "history is append-only");
    assert_eq!(history[2].digest, history[0].digest);
    ready_in(&hub, "dev/web", 3).await;
    // A release set: promote, then roll the whole promotion back.
    hub.put(
        "dev/api",
        &web("api:1", 1).replace("name: web\n  namespace", "name: api\n  namespace"),
    )
    .await
    .unwrap();
    ready_in(&hub, "dev/api", 1).await;
    let first = promote(
        &mut admin,
        pb::PromoteRequest {
            all: true,
            ..promote_req("dev", "staging", &[])
        },
    )
    .await;
    assert!(!first.blocked, "{}", first.message);
    hub.put("dev/web", &web("web:3", 2)).await.unwrap();
    ready_in(&hub, "dev/web", 4).await;
    let second = promote(
        &mut admin,
        pb::PromoteRequest {
            all: true,
            ..promote_req("dev", "staging", &[])
        },
    )
    .await;
    assert_eq!(
        second
            .items
            .iter()
            .filter(|i| i.target_revision > 0)
            .count(),
        1
    );
    let rb = admin
        .rollback_promotion(pb::RollbackPromotionRequest {
            promotion_id: second.promotion_id,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rb.items.len(), 1);
    let head = hub.unit("staging/web").await.unwrap().head.unwrap();
    assert!(
        head.manifests.contains("web:1")
            && head.origin == format!("rollback of promotion {}", second.promotion_id),
        "{}",
        head.origin
    );
}

/// A unit a promotion creates takes its source's labels, so the selector
/// that promoted it promotes it again from its environment; a unit created
/// linked keeps the operator's message.
#[tokio::test]
async fn units_a_promotion_creates_take_their_source_s_labels() {
    let hub = pipeline(Tuning::default()).await;
    let _dev = healthy_dev(&hub).await;
    let token = hub.create_cluster("staging-1", "staging").await;
    let mut staging = SimAgent::new(&hub.endpoint(), hub.ca(), &token).auto_ready();
    staging.start();
    let mut admin = hub.admin().await;
    let cm = |name: &str| {
        format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: apps\n")
    };
    for name in ["web", "db"] {
        within(
            "put",
            admin.put_unit(pb::PutUnitRequest {
                unit: format!("dev/{name}"),
                manifests: cm(name),
                labels: [("app".to_owned(), name.to_owned())].into(),
                ..Default::default()
            }),
        )
        .await
        .unwrap();
        ready_in(&hub, &format!("dev/{name}"), 1).await;
    }
    let by_label = |from: &str, to: &str| pb::PromoteRequest {
        selector: "app=web".into(),
        ..promote_req(from, to, &[])
    };
    let r = promote(&mut admin, by_label("dev", "staging")).await;
    assert_eq!(r.items.len(), 1, "{}", r.message);
    let labels = |d: pb::UnitDetail| d.unit.unwrap().labels;
    assert_eq!(
        labels(hub.unit("staging/web").await.unwrap()),
        [("app".to_owned(), "web".to_owned())].into()
    );
    ready_in(&hub, "staging/web", 1).await;
    let r = promote(&mut admin, by_label("staging", "prod")).await;
    assert_eq!(r.items[0].target_revision, 1, "{}", r.message);

    let linked = within(
        "link",
        admin.link_unit(pb::LinkUnitRequest {
            unit: "staging/db".into(),
            upstream: "dev/db".into(),
            message: "the first db in staging".into(),
        }),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(linked.message, "the first db in staging");
    assert_eq!(
        labels(hub.unit("staging/db").await.unwrap()),
        [("app".to_owned(), "db".to_owned())].into()
    );
}

/// An environment inserted between two others: a unit linked across it
/// is re-linked to the inserted environment's unit by promoting from
/// there (it was refused as "not linked", and `unit create --from` could
/// not fix it: the unit exists).
#[tokio::test]
async fn promoting_from_an_inserted_environment_relinks_the_unit() {
    let hub = TestHub::start_with(Tuning {
        auto_promote_interval: std::time::Duration::from_millis(100),
        ..Tuning::default()
    })
    .await;
    hub.create_env("dev").await;
    hub.create_env("prod").await;
    let _dev = healthy_dev(&hub).await;
    hub.put("dev/web", &web("web:1", 2)).await.unwrap();
    ready_in(&hub, "dev/web", 1).await;
    let mut admin = hub.admin().await;
    let link = |unit: &str, upstream: &str| pb::LinkUnitRequest {
        unit: unit.into(),
        upstream: upstream.into(),
        message: String::new(),
    };
    hub.put("dev/api", &web("api:1", 1)).await.unwrap();
    ready_in(&hub, "dev/api", 1).await;
    for unit in ["web", "api"] {
        within(
            "link prod",
            admin.link_unit(link(&format!("prod/{unit}"), &format!("dev/{unit}"))),
        )
        .await
        .unwrap();
    }
    within(
        "insert staging",
        admin.create_environment(pb::CreateEnvironmentRequest {
            name: "staging".into(),
            after: "dev".into(),
            policy: None,
        }),
    )
    .await
    .unwrap();
    let token = hub.create_cluster("staging-1", "staging").await;
    let mut staging = SimAgent::new(&hub.endpoint(), hub.ca(), &token).auto_ready();
    staging.start();
    within(
        "link staging",
        admin.link_unit(link("staging/web", "dev/web")),
    )
    .await
    .unwrap();
    hub.put("dev/web", &web("web:2", 2)).await.unwrap();
    ready_in(&hub, "dev/web", 2).await;
    let r = promote(&mut admin, promote_req("dev", "staging", &["web"])).await;
    assert!(!r.blocked, "{}", r.message);
    ready_in(&hub, "staging/web", 2).await;
    let r = promote(&mut admin, promote_req("staging", "prod", &["web"])).await;
    assert!(!r.blocked, "{}", r.message);
    assert_eq!(r.items[0].target_revision, 2, "{}", r.message);
    let prod = hub.unit("prod/web").await.unwrap().unit.unwrap();
    assert_eq!(prod.upstream, "staging/web");
    // From now on prod follows staging.
    let r = promote(&mut admin, promote_req("dev", "prod", &["web"])).await;
    assert_eq!(r.items.len(), 1, "{}", r.message);
    assert!(r.blocked, "{}", r.message);
    assert!(
        r.items[0].skipped.contains("its upstream is staging/web"),
        "{}",
        r.items[0].skipped
    );
    // Automatic promotion re-links too.
    within(
        "link staging",
        admin.link_unit(link("staging/api", "dev/api")),
    )
    .await
    .unwrap();
    ready_in(&hub, "staging/api", 1).await;
    within(
        "auto-promote into prod",
        admin.set_environment_policy(pb::SetEnvironmentPolicyRequest {
            name: "prod".into(),
            policy: Some(pb::EnvironmentPolicy {
                auto_promote: true,
                ..Default::default()
            }),
        }),
    )
    .await
    .unwrap();
    until("prod/api follows staging/api", || async {
        hub.unit("prod/api")
            .await
            .is_ok_and(|d| d.unit.unwrap().upstream == "staging/api")
    })
    .await;
    // A link made past staging on purpose (staging existed) stays as made.
    hub.put("dev/db", &web("db:1", 1)).await.unwrap();
    ready_in(&hub, "dev/db", 1).await;
    for unit in ["staging/db", "prod/db"] {
        within("link", admin.link_unit(link(unit, "dev/db")))
            .await
            .unwrap();
    }
    ready_in(&hub, "staging/db", 1).await;
    let r = promote(&mut admin, promote_req("staging", "prod", &["db"])).await;
    assert!(r.blocked, "{}", r.message);
    assert_eq!(
        hub.unit("prod/db").await.unwrap().unit.unwrap().upstream,
        "dev/db"
    );
}

/// A destroyed source unit is named in an `--all` promotion (its linked
/// unit runs on; destroys are not promoted), not dropped silently.
#[tokio::test]
async fn a_destroyed_source_is_named_not_dropped() {
    let hub = pipeline(Tuning::default()).await;
    let _dev = healthy_dev(&hub).await;
    for unit in ["dev/web", "dev/api"] {
        hub.put(unit, &web("web:1", 1)).await.unwrap();
        ready_in(&hub, unit, 1).await;
    }
    let mut admin = hub.admin().await;
    let all = || pb::PromoteRequest {
        from: "dev".into(),
        to: "staging".into(),
        all: true,
        ..Default::default()
    };
    let r = promote(&mut admin, all()).await;
    assert_eq!(r.items.len(), 2, "{}", r.message);
    hub.destroy("dev/web").await.unwrap();
    hub.put("dev/api", &web("web:2", 1)).await.unwrap();
    ready_in(&hub, "dev/api", 2).await;
    let r = promote(&mut admin, all()).await;
    assert!(!r.blocked, "{}", r.message);
    let web = r
        .items
        .iter()
        .find(|i| i.source_unit == "dev/web")
        .unwrap_or_else(|| panic!("dev/web named: {}", r.message));
    assert!(
        web.skipped.contains("dev/web was destroyed")
            && web.skipped.contains("unitsync unit destroy staging/web"),
        "{}",
        web.skipped
    );
    assert_eq!(
        hub.unit("staging/api")
            .await
            .unwrap()
            .unit
            .unwrap()
            .head_revision,
        2
    );
    assert!(
        !hub.unit("staging/web")
            .await
            .unwrap()
            .unit
            .unwrap()
            .destroyed
    );
}

/// `unit rollback` undoes a destroy: the unit comes back with the old
/// revision's content.
#[tokio::test]
async fn a_destroyed_unit_is_rolled_back_to_its_content() {
    let hub = pipeline(Tuning::default()).await;
    let cm = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: web\n  namespace: apps\n";
    let first = hub.put("dev/web", cm).await.unwrap();
    hub.destroy("dev/web").await.unwrap();
    let mut admin = hub.admin().await;
    let back = within(
        "rollback",
        admin.rollback_unit(pb::RollbackUnitRequest {
            unit: "dev/web".into(),
            to_revision: 1,
            message: "undo the destroy".into(),
        }),
    )
    .await
    .expect("a destroyed unit rolls back")
    .into_inner();
    assert_eq!((back.number, back.tombstone), (3, false));
    assert_eq!(back.digest, first.digest, "revision 1's content");
    let unit = hub.unit("dev/web").await.unwrap().unit.unwrap();
    assert_eq!((unit.head_revision, unit.destroyed), (3, false));
}
