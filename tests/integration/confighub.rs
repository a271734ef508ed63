//! The hub as a ConfigHub worker, against confighub-sim over real sockets:
//! the seed's flow (`set-target`, `apply --wait`) on both transports with
//! three clusters, and each fault the worker must ride out (re-auth, 5xx,
//! a stolen lease and a second replica, a dropped stream, a hub killed
//! mid-operation) and each operation's ending (supersede, cancel,
//! destroy, refresh with drift, invalid units, a failing cluster,
//! unknown actions).

use std::time::Duration;

use serde_json::{Value, json};
use unitsync_hub::auth::Secret;
use unitsync_hub::source::confighub::{ConfigHubConfig, StuckResult, Transport};
use unitsync_proto::v1 as pb;
use unitsync_tests::cluster::TestCluster;
use unitsync_tests::confighub_sim::cub::{Cub, Outcome};
use unitsync_tests::confighub_sim::model::UnitEvent;
use unitsync_tests::confighub_sim::{ConfigHubSim, Faults, SimOptions};
use unitsync_tests::{TestHub, configmap, until, within};

const SPACE: &str = "messagewall-dev";
const TARGET: &str = "unitsync-dev";
const WEB: &str = include_str!("../../deploy/examples/messagewall/web.yaml");
const WAIT: Duration = Duration::from_secs(30);

struct Setup {
    sim: ConfigHubSim,
    cub: Cub,
    hub: TestHub,
    clusters: Vec<TestCluster>,
    worker_id: String,
}

async fn sim() -> ConfigHubSim {
    within(
        "confighub-sim",
        ConfigHubSim::start(
            "127.0.0.1:0".parse().unwrap(),
            SimOptions {
                lease_ttl: Duration::from_secs(2),
                heartbeat: Duration::from_secs(1),
                ..SimOptions::default()
            },
        ),
    )
    .await
    .expect("sim starts")
}

/// The space and the worker (`cub worker create`); the worker's config.
async fn worker(sim: &ConfigHubSim, transport: Transport) -> (Cub, ConfigHubConfig) {
    let cub = Cub::new(&sim.url(), sim.operator_token());
    within("space", cub.space_create(SPACE)).await.unwrap();
    let w = within("worker", cub.worker_create(SPACE, "actuator-sync"))
        .await
        .unwrap();
    let config = ConfigHubConfig {
        url: sim.url(),
        worker_id: w["BridgeWorkerID"].as_str().unwrap().to_owned(),
        secret: Secret::from_string(w["Secret"].as_str().unwrap().to_owned()),
        transport,
        ca_pem: None,
        environments: Some(vec!["dev".parse().unwrap()]),
        wait_timeout: Duration::from_secs(20),
        stuck_result: StuckResult::WaitFailed,
    };
    (cub, config)
}

/// A hub working for ConfigHub with `n` dev clusters (agents running),
/// once ConfigHub shows the dev target.
async fn setup(transport: Transport, n: usize) -> Setup {
    setup_with(transport, n, Faults::default()).await
}

/// The same, with ConfigHub's faults set before the hub first calls.
async fn setup_with(transport: Transport, n: usize, faults: Faults) -> Setup {
    let sim = sim().await;
    sim.set_faults(faults);
    let (cub, config) = worker(&sim, transport).await;
    let worker_id = config.worker_id.clone();
    let hub = TestHub::start_confighub(config, None, None).await;
    hub.create_env("dev").await;
    let mut clusters = Vec::new();
    for i in 1..=n {
        let token = hub.create_cluster(&format!("dev-{i}"), "dev").await;
        let mut c = cluster(&hub.endpoint(), hub.ca(), &token).await;
        c.start_agent();
        clusters.push(c);
    }
    wait_target(&cub).await;
    Setup {
        sim,
        cub,
        hub,
        clusters,
        worker_id,
    }
}

/// A cluster with the `apps` namespace the test units use.
async fn cluster(endpoint: &str, ca: Option<&str>, token: &str) -> TestCluster {
    let c = TestCluster::new(endpoint, ca, token).await;
    c.apply_json(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "apps"}}))
        .await;
    c
}

async fn wait_target(cub: &Cub) {
    until("ConfigHub shows the unitsync-dev target", || async {
        cub.target_list(SPACE).await.is_ok_and(|ts| {
            ts.iter()
                .any(|t| t["Slug"] == TARGET && t["BridgeHandle"] == "dev")
        })
    })
    .await;
}

impl Setup {
    /// `cub unit create` + `set-target`.
    async fn unit(&self, slug: &str, data: &str) {
        within(
            "unit create",
            self.cub.unit_create(SPACE, slug, data, None, &[]),
        )
        .await
        .unwrap();
        within("set-target", self.cub.set_target(SPACE, slug, TARGET))
            .await
            .unwrap();
    }

    /// `cub unit apply --wait` (or destroy, refresh).
    async fn run(&self, slug: &str, action: &str) -> Outcome {
        within(action, self.cub.run(SPACE, slug, action, false, WAIT))
            .await
            .unwrap_or_else(|e| panic!("{action} {slug}: {e:#}"))
    }

    async fn queue(&self, slug: &str, action: &str) -> Value {
        within(action, self.cub.queue(SPACE, slug, action, false))
            .await
            .unwrap()
    }

    /// An Apply of unit `a` committed and waiting for the first cluster,
    /// whose agent is stopped.
    async fn apply_waiting_for_its_cluster(&mut self) -> Value {
        self.unit("a", &configmap("a", "1")).await;
        self.clusters[0].stop_agent().await;
        let op = self.queue("a", "apply").await;
        self.wait_event(&op_id(&op), "the apply committed", |e| {
            e.result == "ApplySynced"
        })
        .await;
        op
    }

    /// Every event ConfigHub recorded for an operation.
    fn events(&self, op: &str) -> Vec<UnitEvent> {
        self.sim.with_state(|s| s.events_of(op))
    }

    fn terminal(&self, op: &str) -> Vec<UnitEvent> {
        terminal(&self.sim, op)
    }

    async fn wait_event(&self, op: &str, what: &str, pred: impl Fn(&UnitEvent) -> bool) {
        until(what, || async { self.events(op).iter().any(&pred) }).await;
    }

    async fn hub_unit(&self, unit: &str) -> pb::UnitDetail {
        self.hub.unit(unit).await.expect("the hub has the unit")
    }
}

fn terminal(sim: &ConfigHubSim, op: &str) -> Vec<UnitEvent> {
    sim.with_state(|s| s.events_of(op))
        .into_iter()
        .filter(|e| ["Completed", "Failed", "Canceled", "Aborted"].contains(&e.status.as_str()))
        .collect()
}

fn op_id(op: &Value) -> String {
    op["QueuedOperationID"].as_str().unwrap().to_owned()
}

/// The seed's flow: units created in ConfigHub, pointed at the hub's
/// target, applied with `--wait`: Completed once all three clusters run
/// them, with per-resource statuses; the hub shows where they came from.
async fn seed_flow(transport: Transport) {
    let s = setup(transport, 3).await;
    s.unit("web", WEB).await;
    s.unit("settings", &configmap("settings", "v1")).await;
    let web = s.run("web", "apply").await;
    let settings = s.run("settings", "apply").await;
    for o in [&web, &settings] {
        assert_eq!(
            (o.status(), o.result()),
            ("Completed", "ApplyCompleted"),
            "{o:?}"
        );
        assert!(
            o.message().contains("all 3 cluster(s) of dev"),
            "{}",
            o.message()
        );
    }
    // Per-resource status, keyed as the SDK keys it, rolled up over clusters.
    let statuses = web.event["ResourceStatuses"]
        .as_object()
        .expect("ResourceStatuses");
    for key in [
        "v1/Namespace#/messagewall",
        "v1/ConfigMap#messagewall/web-config",
        "apps/v1/Deployment#messagewall/web",
        "v1/Service#messagewall/web",
    ] {
        let r = &statuses[key];
        assert_eq!(
            (r["SyncStatus"].as_str(), r["Readiness"].as_str()),
            (Some("Synced"), Some("Ready")),
            "{key}: {r}"
        );
    }
    // Progress before the end: the commit, then the wait.
    let events = s.events(&web.operation);
    assert!(
        events
            .iter()
            .any(|e| e.status == "Progressing" && e.result == "ApplySynced"),
        "{events:?}"
    );
    assert_eq!(
        s.terminal(&web.operation).len(),
        1,
        "exactly one terminal report"
    );
    // In every cluster.
    for c in &s.clusters {
        let deploy = c.object("apps/v1", "deployments", "messagewall", "web");
        assert!(deploy.is_some(), "the Deployment is in every cluster");
    }
    // ConfigHub knows the revision is live and the worker is Ready.
    let unit = within("unit get", s.cub.unit_get(SPACE, "web"))
        .await
        .unwrap();
    assert_eq!(unit["Unit"]["LiveRevisionNum"], 1);
    let w = within("worker get", s.cub.worker_get(SPACE, "actuator-sync"))
        .await
        .unwrap();
    assert_eq!(w["Condition"], "Ready", "{w}");
    // The hub: owned by the worker, origin recorded, audited as the worker.
    let d = s.hub_unit("dev/web").await;
    // Owned by the ConfigHub space; written by the worker.
    let owner = format!("confighub:{SPACE}");
    let actor = format!("confighub:{}", s.worker_id);
    assert_eq!(d.unit.as_ref().unwrap().source, owner);
    let head = d.head.unwrap();
    assert!(
        head.origin
            == format!(
                "confighub {SPACE}/web@1 unit {} op {}",
                unit["Unit"]["UnitID"].as_str().unwrap(),
                web.operation
            ),
        "{}",
        head.origin
    );
    // ConfigHub keeps what the hub made of it (BridgeState).
    let bridge = s.sim.with_state(|st| {
        st.units
            .iter()
            .find(|u| u.slug == "web")
            .and_then(|u| u.bridge_state.clone())
    });
    let bridge: Value = serde_json::from_slice(
        &base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            bridge.expect("BridgeState"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(bridge, json!({"Unit": "dev/web", "HubRevision": 1}));
    assert_eq!(head.author, actor);
    let refused = s
        .hub
        .put("dev/web", &configmap("web", "by hand"))
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("belongs to"),
        "{}",
        refused.message()
    );
    let audit = within(
        "audit",
        s.hub.admin().await.list_audit(pb::ListAuditRequest {
            limit: 5,
            target_prefix: "dev/web".into(),
        }),
    )
    .await
    .unwrap()
    .into_inner()
    .entries;
    assert!(audit.iter().any(|e| e.actor == actor), "{audit:?}");
    // What an operator reads.
    let data = s.hub.dir.path().join("data");
    let endpoint = s.hub.endpoint();
    let cli =
        |args: &'static [&'static str]| unitsync_tests::processes::cli(&data, &endpoint, args);
    let shown = within("unit get", cli(&["unit", "get", "dev/web"]))
        .await
        .unwrap();
    assert!(shown.contains(&format!("owned by {owner}")), "{shown}");
    assert!(shown.contains(&format!("({})", head.origin)), "{shown}");
    let matrix = within("status", cli(&["status"])).await.unwrap();
    assert!(matrix.contains(&owner), "{matrix}");
    let metrics = s.hub.metrics().await;
    assert!(
        metrics.contains("unitsync_confighub_connected 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"unitsync_confighub_operations_total{action="Apply",result="ApplyCompleted"}"#
        ),
        "{metrics}"
    );
    // A new ConfigHub revision is a new hub revision.
    within(
        "update",
        s.cub
            .unit_update(SPACE, "settings", &configmap("settings", "v2")),
    )
    .await
    .unwrap();
    let again = s.run("settings", "apply").await;
    assert_eq!(again.result(), "ApplyCompleted", "{again:?}");
    assert_eq!(s.hub_unit("dev/settings").await.head.unwrap().number, 2);
}

#[tokio::test]
async fn the_seed_flow_over_long_poll_reaches_every_cluster() {
    seed_flow(Transport::LongPoll).await;
}

#[tokio::test]
async fn the_seed_flow_over_the_http2_stream_reaches_every_cluster() {
    seed_flow(Transport::Http2Stream).await;
}

#[tokio::test]
async fn an_expired_token_is_renewed_and_work_goes_on() {
    // Every token the worker gets lives a second; polls end after one.
    let s = setup_with(
        Transport::LongPoll,
        1,
        Faults {
            jwt_ttl_seconds: 1,
            poll_timeout_seconds: 1,
            ..Faults::default()
        },
    )
    .await;
    s.unit("a", &configmap("a", "1")).await;
    let first = s.run("a", "apply").await;
    assert_eq!(first.result(), "ApplyCompleted");
    let auths = s.sim.with_state(|st| st.auths);
    until("the worker authenticated again", || async {
        s.sim.with_state(|st| st.auths) > auths
    })
    .await;
    within(
        "update",
        s.cub.unit_update(SPACE, "a", &configmap("a", "2")),
    )
    .await
    .unwrap();
    let second = s.run("a", "apply").await;
    assert_eq!(second.result(), "ApplyCompleted", "{second:?}");
}

#[tokio::test]
async fn server_errors_are_retried_until_the_reports_arrive() {
    let s = setup(Transport::LongPoll, 1).await;
    s.unit("a", &configmap("a", "1")).await;
    // The next calls fail (the poll that brings the operation and the
    // reports after it among them), then 30 % at random.
    s.sim.set_faults(Faults {
        fail_next: 4,
        error_rate: 0.3,
        ..Faults::default()
    });
    let outcome = s.run("a", "apply").await;
    assert_eq!(outcome.result(), "ApplyCompleted", "{outcome:?}");
    assert_eq!(s.terminal(&outcome.operation).len(), 1);
    assert!(
        s.sim.with_state(|st| st.injected_errors) >= 4,
        "faults were injected"
    );
    // Polls that time out at a proxy (504): polled again, nothing lost.
    s.sim.set_faults(Faults {
        fail_polls: true,
        ..Faults::default()
    });
    let failed_before = s.sim.with_state(|st| st.injected_errors);
    let op = s.queue("a", "refresh").await;
    until("polls failed", || async {
        s.sim.with_state(|st| st.injected_errors) > failed_before
    })
    .await;
    s.sim.set_faults(Faults::default());
    let refreshed = within("refresh", s.cub.wait(SPACE, "a", &op, WAIT))
        .await
        .unwrap();
    assert_eq!(refreshed.result(), "RefreshAndNoDrift", "{refreshed:?}");
}

#[tokio::test]
async fn a_stolen_lease_is_claimed_again_and_nothing_is_lost() {
    let s = setup(Transport::LongPoll, 1).await;
    s.unit("a", &configmap("a", "1")).await;
    s.sim.steal_lease(&s.worker_id, Duration::from_secs(2));
    let holder = || {
        s.sim.with_state(|st| {
            st.worker(&s.worker_id)
                .and_then(|w| w.lease.as_ref().map(|l| l.claim_token.clone()))
        })
    };
    let thief = holder();
    let op = s.queue("a", "apply").await;
    let outcome = within("apply", s.cub.wait(SPACE, "a", &op, WAIT))
        .await
        .unwrap();
    assert_eq!(outcome.result(), "ApplyCompleted", "{outcome:?}");
    assert_eq!(s.terminal(&op_id(&op)).len(), 1);
    // The worker claimed the lease again after the thief's expired.
    assert!(thief.is_some());
    let now = holder();
    assert!(now.is_some() && now != thief, "{now:?} vs {thief:?}");
}

#[tokio::test]
async fn a_dropped_stream_mid_operation_still_ends_the_operation_once() {
    let mut s = setup(Transport::Http2Stream, 1).await;
    s.unit("a", &configmap("a", "1")).await;
    s.clusters[0].stop_agent().await;
    let op = s.queue("a", "apply").await;
    let id = op_id(&op);
    s.wait_event(&id, "the revision committed", |e| e.result == "ApplySynced")
        .await;
    let streams = |s: &Setup| {
        s.sim.with_state(|st| {
            st.worker_mut("actuator-sync")
                .map_or(0, |w| w.stream_generation)
        })
    };
    let before = streams(&s);
    s.sim.drop_streams();
    s.clusters[0].start_agent();
    let outcome = within("apply", s.cub.wait(SPACE, "a", &op, WAIT))
        .await
        .unwrap();
    assert_eq!(outcome.result(), "ApplyCompleted", "{outcome:?}");
    assert_eq!(s.terminal(&id).len(), 1);
    // The worker streams again (a new stream), and answers heartbeats.
    until("the worker streams again", || async {
        streams(&s) > before
    })
    .await;
    until("the worker is Ready again", || async {
        s.cub
            .worker_get(SPACE, "actuator-sync")
            .await
            .is_ok_and(|w| w["Condition"] == "Ready" && w["LastMessage"].is_string())
    })
    .await;
}

#[tokio::test]
async fn a_newer_apply_supersedes_a_running_one() {
    let mut s = setup(Transport::LongPoll, 1).await;
    let first = s.apply_waiting_for_its_cluster().await;
    within(
        "update",
        s.cub.unit_update(SPACE, "a", &configmap("a", "2")),
    )
    .await
    .unwrap();
    let second = s.queue("a", "apply").await;
    let aborted = within("first", s.cub.wait(SPACE, "a", &first, WAIT))
        .await
        .unwrap();
    assert_eq!(aborted.status(), "Aborted", "{aborted:?}");
    assert_eq!(
        aborted.message(),
        format!("Operation overridden by newer operation {}", op_id(&second))
    );
    s.clusters[0].start_agent();
    let done = within("second", s.cub.wait(SPACE, "a", &second, WAIT))
        .await
        .unwrap();
    assert_eq!(done.result(), "ApplyCompleted", "{done:?}");
    assert_eq!(s.terminal(&op_id(&first)).len(), 1);
    assert_eq!(s.terminal(&op_id(&second)).len(), 1);
    assert_eq!(
        s.sim.with_state(|st| st.late_reports),
        0,
        "nothing after an ending"
    );
    let cm = s.clusters[0]
        .object("v1", "configmaps", "apps", "a")
        .unwrap();
    assert_eq!(cm["data"]["value"], "2");
}

/// An Apply of a unit of another space with the same slug and target is
/// not a newer Apply of this one: the running one goes on (it was aborted,
/// and then the other was refused anyway: the hub's unit is this space's).
#[tokio::test]
async fn an_apply_from_another_space_does_not_supersede_a_running_one() {
    let mut s = setup(Transport::LongPoll, 1).await;
    let first = s.apply_waiting_for_its_cluster().await;
    let other = "messagewall-other";
    within("space", s.cub.space_create(other)).await.unwrap();
    within(
        "unit create",
        s.cub
            .unit_create(other, "a", &configmap("a", "9"), None, &[]),
    )
    .await
    .unwrap();
    within("set-target", s.cub.set_target_of(other, "a", SPACE, TARGET))
        .await
        .unwrap();
    let second = within("apply", s.cub.queue(other, "a", "apply", false))
        .await
        .unwrap();
    let refused = within("second", s.cub.wait(other, "a", &second, WAIT))
        .await
        .unwrap();
    assert_ne!(refused.result(), "ApplyCompleted", "{refused:?}");
    assert!(
        s.terminal(&op_id(&first)).is_empty(),
        "the first apply ended: {:?}",
        s.terminal(&op_id(&first))
    );
    s.clusters[0].start_agent();
    let done = within("first", s.cub.wait(SPACE, "a", &first, WAIT))
        .await
        .unwrap();
    assert_eq!(done.result(), "ApplyCompleted", "{done:?}");
    let cm = s.clusters[0]
        .object("v1", "configmaps", "apps", "a")
        .unwrap();
    assert_eq!(cm["data"]["value"], "1");
}

/// Two Applies delivered together: the older ends `Aborted` whether or not
/// it committed, nothing is reported for it afterwards, and the newer
/// content is what the clusters run.
#[tokio::test]
async fn an_apply_superseded_before_it_commits_never_wins() {
    let s = setup(Transport::LongPoll, 1).await;
    s.unit("a", &configmap("a", "1")).await;
    let (first, second) = s.sim.with_state(|st| {
        let space = st.space(SPACE).unwrap().id.clone();
        let first = st.enqueue(&space, "a", "Apply", false, None).unwrap();
        let unit = st.unit_mut(&space, "a").unwrap();
        let num = unit.head().num + 1;
        unit.revisions
            .push(unitsync_tests::confighub_sim::model::Revision {
                num,
                data: configmap("a", "2").into_bytes(),
                created_at: unitsync_tests::confighub_sim::model::now(),
            });
        let second = st.enqueue(&space, "a", "Apply", false, None).unwrap();
        (first, second)
    });
    let second_op =
        json!({"QueuedOperationID": second.id, "UnitID": second.unit_id, "Action": "Apply"});
    let done = within("second", s.cub.wait(SPACE, "a", &second_op, WAIT))
        .await
        .unwrap();
    assert_eq!(done.result(), "ApplyCompleted", "{done:?}");
    until("the first ended", || async {
        !s.terminal(&first.id).is_empty()
    })
    .await;
    let ended = s.terminal(&first.id);
    assert_eq!(ended.len(), 1);
    assert_eq!(ended[0].status, "Aborted", "{ended:?}");
    let last = s
        .events(&first.id)
        .into_iter()
        .max_by_key(|e| e.seq)
        .unwrap();
    assert_eq!(last.status, "Aborted", "the ending is the last word");
    assert_eq!(s.sim.with_state(|st| st.late_reports), 0);
    let head = s.hub_unit("dev/a").await.head.unwrap();
    assert!(
        head.origin.ends_with(&format!("op {}", second.id)),
        "{}",
        head.origin
    );
    let cm = s.clusters[0]
        .object("v1", "configmaps", "apps", "a")
        .unwrap();
    assert_eq!(cm["data"]["value"], "2");
}

#[tokio::test]
async fn cancel_ends_a_running_operation() {
    let mut s = setup(Transport::LongPoll, 1).await;
    s.unit("a", &configmap("a", "1")).await;
    s.clusters[0].stop_agent().await;
    let op = s.queue("a", "apply").await;
    s.wait_event(&op_id(&op), "the apply committed", |e| {
        e.result == "ApplySynced"
    })
    .await;
    within("cancel", s.cub.cancel(SPACE, "a")).await.unwrap();
    let o = within("wait", s.cub.wait(SPACE, "a", &op, WAIT))
        .await
        .unwrap();
    assert_eq!(
        (o.status(), o.message()),
        ("Canceled", "Operation cancelled by user request")
    );
    assert_eq!(s.terminal(&op_id(&op)).len(), 1);
}

/// A progress report held back by a failure is not sent once the
/// operation has ended: the ending is ConfigHub's last word on it.
#[tokio::test]
async fn a_progress_report_being_retried_never_lands_after_the_ending() {
    let mut s = setup(Transport::LongPoll, 1).await;
    s.unit("a", &configmap("a", "1")).await;
    s.clusters[0].stop_agent().await;
    s.sim.with_state(|st| st.faults.fail_reports = 1);
    let op = s.queue("a", "apply").await;
    until("the first progress report failed", || async {
        s.sim.with_state(|st| st.injected_errors) >= 1
    })
    .await;
    within("cancel", s.cub.cancel(SPACE, "a")).await.unwrap();
    let o = within("wait", s.cub.wait(SPACE, "a", &op, WAIT))
        .await
        .unwrap();
    assert_eq!(o.status(), "Canceled", "{o:?}");
    // The SDK's policy retries a failed report within 1.5 s: proving that
    // nothing more arrives needs a wait longer than that.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (late, last) = s.sim.with_state(|st| {
        (
            st.late_reports,
            st.events_of(&op_id(&op)).last().map(|e| e.status.clone()),
        )
    });
    assert_eq!(late, 0, "a report arrived after the ending");
    assert_eq!(last.as_deref(), Some("Canceled"));
}

#[tokio::test]
async fn destroy_removes_the_unit_from_every_cluster() {
    let s = setup(Transport::LongPoll, 2).await;
    s.unit("a", &configmap("a", "1")).await;
    assert_eq!(s.run("a", "apply").await.result(), "ApplyCompleted");
    let o = s.run("a", "destroy").await;
    assert_eq!(
        (o.status(), o.result()),
        ("Completed", "DestroyCompleted"),
        "{o:?}"
    );
    for c in &s.clusters {
        assert!(
            c.object("v1", "configmaps", "apps", "a").is_none(),
            "destroyed in every cluster"
        );
    }
    assert!(s.hub_unit("dev/a").await.unit.unwrap().destroyed);
}

#[tokio::test]
async fn a_dry_run_destroy_destroys_nothing() {
    let s = setup(Transport::LongPoll, 1).await;
    s.unit("a", &configmap("a", "1")).await;
    assert_eq!(s.run("a", "apply").await.result(), "ApplyCompleted");
    let o = within("dry run", s.cub.run(SPACE, "a", "destroy", true, WAIT))
        .await
        .unwrap();
    assert_eq!(o.result(), "DestroyCompleted", "{o:?}");
    assert!(
        o.message().starts_with("dry run: would destroy dev/a"),
        "{}",
        o.message()
    );
    assert!(!s.hub_unit("dev/a").await.unit.unwrap().destroyed);
    assert!(
        s.clusters[0]
            .object("v1", "configmaps", "apps", "a")
            .is_some()
    );
}

/// An older ConfigHub sends no BridgeHandle: a hub offering several
/// environments refuses to guess.
#[tokio::test]
async fn an_operation_without_a_target_environment_is_refused_when_ambiguous() {
    let sim = sim().await;
    let (cub, mut config) = worker(&sim, Transport::LongPoll).await;
    config.environments = None;
    let hub = TestHub::start_confighub(config, None, None).await;
    hub.create_env("dev").await;
    hub.create_env("staging").await;
    wait_target(&cub).await;
    within(
        "unit",
        cub.unit_create(SPACE, "a", &configmap("a", "1"), Some(TARGET), &[]),
    )
    .await
    .unwrap();
    sim.with_state(|st| {
        for t in &mut st.targets {
            t.bridge_handle.clear();
        }
    });
    let o = within("apply", cub.run(SPACE, "a", "apply", false, WAIT))
        .await
        .unwrap();
    assert_eq!((o.status(), o.result()), ("Failed", "ApplyFailed"), "{o:?}");
    assert!(
        o.message().contains("names no target environment"),
        "{}",
        o.message()
    );
    assert!(hub.unit("dev/a").await.is_err() && hub.unit("staging/a").await.is_err());
}

#[tokio::test]
async fn refresh_reports_drift_the_agents_found() {
    let s = setup(Transport::LongPoll, 1).await;
    let watched = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n  namespace: apps\n  annotations:\n    unitsync.dev/drift: report\ndata:\n  value: \"1\"\n";
    s.unit("a", watched).await;
    assert_eq!(s.run("a", "apply").await.result(), "ApplyCompleted");
    let clean = s.run("a", "refresh").await;
    assert_eq!(clean.result(), "RefreshAndNoDrift", "{clean:?}");
    // Someone edits the object in the cluster.
    s.clusters[0]
        .apply_as(
            "kubectl-edit",
            json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "a", "namespace": "apps"}, "data": {"value": "edited"}}),
        )
        .await;
    until("the agent reports the drift", || async {
        s.hub.unit("dev/a").await.is_ok_and(|d| {
            d.clusters
                .iter()
                .any(|c| c.phase == pb::Phase::Drifted as i32)
        })
    })
    .await;
    let drifted = s.run("a", "refresh").await;
    assert_eq!(drifted.result(), "RefreshAndDrifted", "{drifted:?}");
    assert!(
        drifted
            .message()
            .contains("dev-1: ConfigMap apps/a drifted at"),
        "{}",
        drifted.message()
    );
    assert!(
        drifted.message().contains("data.value"),
        "{}",
        drifted.message()
    );
    // `cub unit apply` of the same content is a fresh attempt (a new
    // revision), not the verdict on the drifted one: the edit's manager
    // owns the field now, which the apply names.
    let reapplied = s.run("a", "apply").await;
    assert_eq!(reapplied.result(), "ApplyFailed", "{reapplied:?}");
    assert!(
        reapplied
            .message()
            .contains("conflict with \"kubectl-edit\""),
        "{}",
        reapplied.message()
    );
    assert_eq!(s.hub_unit("dev/a").await.unit.unwrap().head_revision, 2);
    // Told to take the field, the apply puts the cluster back.
    let forced = watched.replace(
        "    unitsync.dev/drift: report\n",
        "    unitsync.dev/drift: report\n    unitsync.dev/force: enabled\n",
    );
    within("unit update", s.cub.unit_update(SPACE, "a", &forced))
        .await
        .unwrap();
    let healed = s.run("a", "apply").await;
    assert_eq!(healed.result(), "ApplyCompleted", "{healed:?}");
    assert_eq!(
        s.clusters[0]
            .object("v1", "configmaps", "apps", "a")
            .unwrap()["data"]["value"],
        "1"
    );
    assert_eq!(s.run("a", "refresh").await.result(), "RefreshAndNoDrift");
    // Applied again while every cluster is Ready on it: nothing to commit.
    assert_eq!(s.run("a", "apply").await.result(), "ApplyCompleted");
    assert_eq!(s.hub_unit("dev/a").await.unit.unwrap().head_revision, 3);
}

#[tokio::test]
async fn an_invalid_unit_fails_the_apply_naming_the_document_and_field() {
    let s = setup(Transport::LongPoll, 1).await;
    let bad = format!(
        "{}---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: b\n  namespace: apps\n  labels:\n    tier: [front]\n",
        configmap("a", "1")
    );
    s.unit("a", &bad).await;
    let op = s.queue("a", "apply").await;
    let o = within("wait", s.cub.wait(SPACE, "a", &op, WAIT))
        .await
        .unwrap();
    assert_eq!((o.status(), o.result()), ("Failed", "ApplyFailed"), "{o:?}");
    assert!(o.message().contains("document 2"), "{}", o.message());
    assert!(o.message().contains("metadata.labels"), "{}", o.message());
    assert!(s.hub.unit("dev/a").await.is_err(), "nothing was committed");
    // Over the caps: more documents than a unit may hold.
    let many: String = (0..1001)
        .map(|i| configmap(&format!("c{i}"), "x") + "---\n")
        .collect();
    within("update", s.cub.unit_update(SPACE, "a", &many))
        .await
        .unwrap();
    let op = s.queue("a", "apply").await;
    let o = within("wait", s.cub.wait(SPACE, "a", &op, WAIT))
        .await
        .unwrap();
    assert_eq!(o.result(), "ApplyFailed", "{o:?}");
    assert!(o.message().contains("1000"), "{}", o.message());
    // A dry run validates and commits nothing.
    within(
        "update",
        s.cub.unit_update(SPACE, "a", &configmap("a", "1")),
    )
    .await
    .unwrap();
    let dry = within("dry run", s.cub.run(SPACE, "a", "apply", true, WAIT))
        .await
        .unwrap();
    assert_eq!(dry.result(), "ApplyCompleted", "{dry:?}");
    assert!(dry.message().contains("dry run"), "{}", dry.message());
    assert!(
        s.hub.unit("dev/a").await.is_err(),
        "a dry run commits nothing"
    );
}

#[tokio::test]
async fn a_failing_cluster_fails_the_apply_naming_it() {
    let s = setup(Transport::LongPoll, 3).await;
    s.clusters[1]
        .sim
        .faults()
        .fail("PATCH", "/api/v1/namespaces/apps/configmaps/a");
    s.unit("a", &configmap("a", "1")).await;
    let op = s.queue("a", "apply").await;
    let o = within("wait", s.cub.wait(SPACE, "a", &op, WAIT))
        .await
        .unwrap();
    assert_eq!((o.status(), o.result()), ("Failed", "ApplyFailed"), "{o:?}");
    assert!(o.message().contains("dev-2"), "{}", o.message());
    assert!(
        !o.message().contains("dev-1") && !o.message().contains("dev-3"),
        "{}",
        o.message()
    );
    assert_eq!(s.terminal(&op_id(&op)).len(), 1);
    // The cluster is fixed; applied again (the same content), every
    // cluster tries afresh rather than ConfigHub hearing the old failure.
    s.clusters[1].sim.faults().clear_failures();
    let again = s.run("a", "apply").await;
    assert_eq!(
        (again.status(), again.result()),
        ("Completed", "ApplyCompleted"),
        "{again:?}"
    );
}

#[tokio::test]
async fn unknown_actions_get_the_sdk_answer_and_unknown_events_are_ignored() {
    let s = setup(Transport::LongPoll, 1).await;
    s.unit("a", &configmap("a", "1")).await;
    let op = s.sim.with_state(|st| {
        let space = st.space(SPACE).unwrap().id.clone();
        st.injected.insert(
            s.worker_id.clone(),
            vec![json!({"Event": "SomethingNew", "Data": {"Whatever": 1}})],
        );
        st.enqueue(&space, "a", "Frobnicate", false, None).unwrap()
    });
    until("the worker answered", || async {
        !s.events(&op.id).is_empty()
    })
    .await;
    let e = &s.events(&op.id)[0];
    assert_eq!((e.status.as_str(), e.result.as_str()), ("None", "None"));
    assert_eq!(e.message, "unknown operation name: Frobnicate");
    // And it keeps working.
    assert_eq!(s.run("a", "apply").await.result(), "ApplyCompleted");
}

/// Two replicas on one PostgreSQL database: one holds the lease; when it
/// stops, the other takes over, finishes the running operation and
/// reports it once.
#[tokio::test]
async fn a_second_replica_takes_the_lease_over_and_finishes_the_work() {
    let url = unitsync_tests::hub::postgres_database().await;
    let sim = sim().await;
    let (cub, config) = worker(&sim, Transport::LongPoll).await;
    let mut first = TestHub::start_confighub(config.clone(), Some(url.clone()), None).await;
    let second = TestHub::start_confighub(config, Some(url), Some(&first)).await;
    first.create_env("dev").await;
    let token = first.create_cluster("dev-1", "dev").await;
    let mut cluster = cluster(&second.endpoint(), second.ca(), &token).await;
    wait_target(&cub).await;
    within(
        "unit",
        cub.unit_create(SPACE, "a", &configmap("a", "1"), Some(TARGET), &[]),
    )
    .await
    .unwrap();
    // Exactly one replica works the queue.
    let metric = |hub: &TestHub| {
        let addr = hub.http_addr();
        async move {
            let (_, body) = unitsync_tests::processes::http_get(addr, "/metrics")
                .await
                .unwrap();
            body.lines().any(|l| l == "unitsync_confighub_connected 1")
        }
    };
    until("one replica holds the lease", || async {
        metric(&first).await || metric(&second).await
    })
    .await;
    assert!(
        !(metric(&first).await && metric(&second).await),
        "never both"
    );
    let holder_is_first = metric(&first).await;
    // An operation in flight (no agent yet), then the holder stops.
    let op = within("apply", cub.queue(SPACE, "a", "apply", false))
        .await
        .unwrap();
    until("the holder committed", || async {
        sim.with_state(|s| s.events_of(&op_id(&op)))
            .iter()
            .any(|e| e.result == "ApplySynced")
    })
    .await;
    let mut second = second;
    if holder_is_first {
        first.stop().await;
    } else {
        second.stop().await;
    }
    cluster.start_agent();
    let o = within("wait", cub.wait(SPACE, "a", &op, WAIT))
        .await
        .unwrap();
    assert_eq!(o.result(), "ApplyCompleted", "{o:?}");
    assert_eq!(terminal(&sim, &op_id(&op)).len(), 1);
    let survivor = if holder_is_first { &second } else { &first };
    assert!(metric(survivor).await, "the survivor holds the lease");
    assert_eq!(
        survivor.unit("dev/a").await.unwrap().head.unwrap().number,
        1,
        "committed once"
    );
}

/// The real binary, killed with SIGKILL while an operation waits: after
/// the restart it finishes the operation and reports it exactly once,
/// without committing it twice.
#[tokio::test]
async fn a_hub_killed_mid_operation_reports_once_after_restart() {
    use unitsync_tests::processes::cli;
    let Killed {
        sim,
        cub,
        _dir,
        data,
        hub,
        mut cluster,
        op,
    } = killed_mid_apply(&[]).await;
    within("restart", hub.restart()).await.unwrap();
    cluster.start_agent();
    let o = within("wait", cub.wait(SPACE, "a", &op, WAIT))
        .await
        .unwrap();
    assert_eq!(o.result(), "ApplyCompleted", "{o:?}");
    // Once the hub records the report delivered it never sends it again.
    let db = format!("sqlite://{}?mode=ro", data.join("hub.db").display());
    until("the report is recorded as delivered", || async {
        delivered(&db, &op_id(&op)).await
    })
    .await;
    assert_eq!(terminal(&sim, &op_id(&op)).len(), 1, "one terminal report");
    let history = cli(
        &data,
        &hub.endpoint(),
        &["unit", "history", "dev/a", "-o", "json"],
    )
    .await
    .unwrap();
    let revisions: Value = serde_json::from_str(&history).unwrap();
    assert_eq!(
        revisions.as_array().map(Vec::len),
        Some(1),
        "committed once: {history}"
    );
}

/// A hub process (SQLite in `data`) working for ConfigHub, with the dev
/// environment and one dev cluster whose agent is not started.
async fn hub_process(
    config: &ConfigHubConfig,
    data: &std::path::Path,
    extra: &[&str],
) -> (unitsync_tests::processes::HubProcess, TestCluster) {
    std::fs::create_dir_all(data).unwrap();
    let secret = data.with_extension("secret");
    std::fs::write(&secret, config.secret.expose()).unwrap();
    let mut args = vec![
        "--confighub-url",
        &config.url,
        "--confighub-worker-id",
        &config.worker_id,
        "--confighub-worker-secret-file",
        secret.to_str().unwrap(),
        "--confighub-environments",
        "dev",
    ];
    args.extend_from_slice(extra);
    let hub = within(
        "hub",
        unitsync_tests::processes::HubProcess::start_with(data, 10, &args),
    )
    .await
    .unwrap();
    hub.cli(&["env", "create", "dev"]).await.unwrap();
    let created = hub
        .cli(&["cluster", "create", "dev-1", "--env", "dev", "-o", "json"])
        .await
        .unwrap();
    let token: Value = serde_json::from_str(&created).unwrap();
    let ca = std::fs::read_to_string(hub.ca_file()).unwrap();
    let cluster = cluster(&hub.endpoint(), Some(&ca), token["token"].as_str().unwrap()).await;
    (hub, cluster)
}

/// A hub process whose Apply of unit `a` committed and waited for its
/// cluster (the agent not started), SIGKILLed then.
struct Killed {
    sim: ConfigHubSim,
    cub: Cub,
    _dir: tempfile::TempDir,
    data: std::path::PathBuf,
    hub: unitsync_tests::processes::HubProcess,
    cluster: TestCluster,
    op: Value,
}

async fn killed_mid_apply(extra: &[&str]) -> Killed {
    let sim = sim().await;
    let (cub, config) = worker(&sim, Transport::LongPoll).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("hub");
    let (hub, cluster) = hub_process(&config, &data, extra).await;
    wait_target(&cub).await;
    within(
        "unit",
        cub.unit_create(SPACE, "a", &configmap("a", "1"), Some(TARGET), &[]),
    )
    .await
    .unwrap();
    let op = within("apply", cub.queue(SPACE, "a", "apply", false))
        .await
        .unwrap();
    until("committed", || async {
        sim.with_state(|s| s.events_of(&op_id(&op)))
            .iter()
            .any(|e| e.result == "ApplySynced")
    })
    .await;
    hub.kill().await;
    Killed {
        sim,
        cub,
        _dir: dir,
        data,
        hub,
        cluster,
        op,
    }
}

/// Two open Applies of one unit found at start-up (the newer recorded
/// while the older was not running, as when both arrive as the hub
/// stops): the newer wins and the older ends `Aborted`, as if both had
/// arrived while it ran.
#[tokio::test]
async fn after_a_restart_the_newer_of_two_open_applies_wins() {
    let Killed {
        sim: _sim,
        cub,
        _dir,
        data,
        hub,
        mut cluster,
        op: older,
    } = killed_mid_apply(&["--confighub-wait-timeout", "20s"]).await;
    within("update", cub.unit_update(SPACE, "a", &configmap("a", "2")))
        .await
        .unwrap();
    let newer = within("apply", cub.queue(SPACE, "a", "apply", false))
        .await
        .unwrap();
    // The hub had recorded the newer one, not yet running the older.
    let db = format!("sqlite://{}", data.join("hub.db").display());
    within("record the newer apply", async {
        let pool = sqlx::SqlitePool::connect(&db).await.unwrap();
        let detail: String =
            sqlx::query_scalar("SELECT detail FROM source_operations WHERE id = $1")
                .bind(op_id(&older))
                .fetch_one(&pool)
                .await
                .unwrap();
        let mut detail: Value = serde_json::from_str(&detail).unwrap();
        detail["data"] = json!(configmap("a", "2"));
        detail["revision_num"] = json!(2);
        detail["started_ms"] = json!(detail["started_ms"].as_i64().unwrap() + 1);
        sqlx::query(
            "INSERT INTO source_operations (id, source, unit, action, state, hub_revision, report, delivered, detail, created_at, updated_at) \
             SELECT $1, source, unit, action, state, 0, '', 0, $2, created_at + 1, updated_at + 1 FROM source_operations WHERE id = $3",
        )
        .bind(op_id(&newer))
        .bind(detail.to_string())
        .bind(op_id(&older))
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
    })
    .await;
    within("restart", hub.restart()).await.unwrap();
    cluster.start_agent();
    let o = within("wait", cub.wait(SPACE, "a", &older, WAIT))
        .await
        .unwrap();
    assert_eq!(
        (o.status(), o.message()),
        (
            "Aborted",
            format!("Operation overridden by newer operation {}", op_id(&newer)).as_str()
        ),
        "{o:?}"
    );
    let n = within("wait", cub.wait(SPACE, "a", &newer, WAIT))
        .await
        .unwrap();
    assert_eq!(n.result(), "ApplyCompleted", "{n:?}");
    assert_eq!(
        cluster.object("v1", "configmaps", "apps", "a").unwrap()["data"]["value"],
        "2"
    );
}

/// Whether the hub's store records the operation's report as delivered.
async fn delivered(db: &str, op: &str) -> bool {
    use sqlx::Connection;
    let Ok(mut conn) = sqlx::SqliteConnection::connect(db).await else {
        return false;
    };
    sqlx::query_scalar::<_, i64>("SELECT delivered FROM source_operations WHERE id = $1")
        .bind(op)
        .fetch_optional(&mut conn)
        .await
        .ok()
        .flatten()
        == Some(1)
}

/// Promotion stays unitsync's: a hub-native staging unit linked to a
/// ConfigHub-fed dev unit receives its revision with the ConfigHub origin;
/// promoting into an environment ConfigHub feeds is refused, pointing to
/// ConfigHub.
#[tokio::test]
async fn promotions_carry_confighub_revisions_and_stop_at_confighub_environments() {
    let sim = sim().await;
    let (cub, mut config) = worker(&sim, Transport::LongPoll).await;
    config.environments = Some(vec!["dev".parse().unwrap(), "prod".parse().unwrap()]);
    let hub = TestHub::start_confighub(config, None, None).await;
    for env in ["dev", "staging", "prod"] {
        hub.create_env(env).await;
    }
    let token = hub.create_cluster("dev-1", "dev").await;
    let mut c = cluster(&hub.endpoint(), hub.ca(), &token).await;
    c.start_agent();
    wait_target(&cub).await;
    let labels = [("app".to_owned(), "messagewall".to_owned())];
    within(
        "unit",
        cub.unit_create(SPACE, "web", &configmap("web", "1"), Some(TARGET), &labels),
    )
    .await
    .unwrap();
    let applied = within("apply", cub.run(SPACE, "web", "apply", false, WAIT))
        .await
        .unwrap();
    assert_eq!(applied.result(), "ApplyCompleted", "{applied:?}");
    // ConfigHub's labels select units for promotion.
    let dev = hub.unit("dev/web").await.unwrap().unit.unwrap();
    assert_eq!(
        dev.labels.get("app").map(String::as_str),
        Some("messagewall")
    );
    let mut admin = hub.admin().await;
    hub.link("staging/web", "dev/web").await;
    let promote = |from: &str, to: &str| pb::PromoteRequest {
        from: from.into(),
        to: to.into(),
        selector: "app=messagewall".into(),
        ..Default::default()
    };
    within("promote", admin.promote(promote("dev", "staging")))
        .await
        .expect("promoted to staging");
    let head = hub.unit("staging/web").await.unwrap().head.unwrap();
    assert!(
        head.origin
            .starts_with("promotion from dev/web@1 (confighub messagewall-dev/web@1 unit ")
            && head.origin.ends_with(&format!("op {})", applied.operation)),
        "{}",
        head.origin
    );
    let refused = within("promote", admin.promote(promote("staging", "prod")))
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(
        refused
            .message()
            .contains("environment prod is fed by ConfigHub"),
        "{}",
        refused.message()
    );
    assert!(
        refused.message().contains("cub unit apply"),
        "{}",
        refused.message()
    );
    // And ConfigHub was offered both of its environments as targets.
    until("both targets", || async {
        cub.target_list(SPACE).await.is_ok_and(|ts| {
            ["unitsync-dev", "unitsync-prod"]
                .iter()
                .all(|slug| ts.iter().any(|t| t["Slug"] == *slug))
        })
    })
    .await;
    assert!(
        !cub.target_list(SPACE)
            .await
            .unwrap()
            .iter()
            .any(|t| t["Slug"] == "unitsync-staging"),
        "staging is not ConfigHub's"
    );
}
