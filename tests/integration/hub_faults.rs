//! The hub under races, outages, hostile peers and careless inputs (issue
//! "Hub correctness and security"): each test failed before its fix.

use std::time::Duration;

use crate::protocol::has_session;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use unitsync_agent::hub_client::SessionError;
use unitsync_hub::control::Tuning;
use unitsync_hub::model::Role;
use unitsync_proto::v1 as pb;
use unitsync_proto::v1::agent_message::Msg as AgentMsg;
use unitsync_proto::v1::hub_message::Msg as HubMsg;
use unitsync_tests::fault_proxy::{FaultProxy, Mode};
use unitsync_tests::hub::postgres_database;
use unitsync_tests::{SimAgent, TestHub, configmap, until, within};

/// A hand-driven agent session: what a hostile or broken peer can send.
struct RawSession {
    tx: mpsc::Sender<pb::AgentMessage>,
    inbound: tonic::Streaming<pb::HubMessage>,
}

impl RawSession {
    async fn open(hub: &TestHub, token: &str) -> RawSession {
        let channel = hub.channel().await;
        let mut client = pb::agent_service_client::AgentServiceClient::new(channel)
            .max_encoding_message_size(64 * 1024 * 1024);
        let (tx, rx) = mpsc::channel(16);
        tx.send(pb::AgentMessage {
            msg: Some(AgentMsg::Hello(pb::Hello {
                protocol_version: unitsync_proto::PROTOCOL_VERSION,
                agent_version: "raw".into(),
                units: vec![],
            })),
        })
        .await
        .unwrap();
        let mut req = tonic::Request::new(ReceiverStream::new(rx));
        req.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        let inbound = within("session", client.session(req))
            .await
            .expect("session opens")
            .into_inner();
        RawSession { tx, inbound }
    }

    async fn send(&self, msg: AgentMsg) {
        let _ = self.tx.send(pb::AgentMessage { msg: Some(msg) }).await;
    }

    /// Reads until the stream ends; returns its final status.
    async fn end(&mut self) -> tonic::Status {
        crate::protocol::final_status(&mut self.inbound).await
    }

    /// Waits for an update of `unit`.
    async fn update(&mut self, unit: &str) -> pb::UnitUpdate {
        loop {
            match within("an update", self.inbound.message()).await {
                Ok(Some(pb::HubMessage {
                    msg: Some(HubMsg::Update(u)),
                })) if u.unit == unit => return u,
                Ok(Some(_)) => continue,
                other => panic!("the session ended: {other:?}"),
            }
        }
    }
}

async fn connected(hub: &TestHub, cluster: &str) -> bool {
    hub.admin()
        .await
        .get_cluster(pb::GetClusterRequest {
            name: cluster.into(),
        })
        .await
        .is_ok_and(|c| c.into_inner().connected)
}

// --- 2: promotion races ---

#[tokio::test]
async fn rolling_back_a_promotion_never_drops_a_later_change() {
    let hub = TestHub::start().await;
    hub.create_env("dev").await;
    hub.create_env("staging").await;
    hub.put("dev/web", &configmap("web", "1")).await.unwrap();
    let mut admin = hub.admin().await;
    let promote = |admin: &mut unitsync_tests::hub::Admin| {
        let mut admin = admin.clone();
        async move {
            admin
                .promote(pb::PromoteRequest {
                    from: "dev".into(),
                    to: "staging".into(),
                    units: vec!["web".into()],
                    force: true,
                    reason: "test".into(),
                    ..Default::default()
                })
                .await
                .map(tonic::Response::into_inner)
        }
    };
    let p = promote(&mut admin).await.unwrap();
    // Someone changes the promoted unit afterwards.
    hub.put("staging/web", &configmap("web", "hotfix"))
        .await
        .unwrap();
    let e = admin
        .rollback_promotion(pb::RollbackPromotionRequest {
            promotion_id: p.promotion_id,
        })
        .await
        .expect_err("the rollback would drop the hotfix");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("changed concurrently"),
        "{}",
        e.message()
    );
    let head = hub.unit("staging/web").await.unwrap().head.unwrap();
    assert!(head.manifests.contains("hotfix"), "nothing was committed");
}

/// Promotions racing updates of their target: every committed promotion
/// replaced the very head it was planned against (or it conflicted), so no
/// concurrent change was superseded without anyone noticing.
async fn promotions_race_updates(hub: &TestHub) {
    hub.create_env("dev").await;
    hub.create_env("staging").await;
    hub.put("dev/web", &configmap("web", "0")).await.unwrap();
    let admin = hub.admin().await;
    let mut conflicts = 0;
    for round in 0..25 {
        hub.put("dev/web", &configmap("web", &format!("dev-{round}")))
            .await
            .unwrap();
        let mut a = admin.clone();
        let promote = async move {
            a.promote(pb::PromoteRequest {
                from: "dev".into(),
                to: "staging".into(),
                units: vec!["web".into()],
                force: true,
                reason: "race".into(),
                ..Default::default()
            })
            .await
        };
        let update = async {
            if round > 0 {
                let _ = hub
                    .put("staging/web", &configmap("web", &format!("direct-{round}")))
                    .await;
            }
        };
        let (p, ()) = tokio::join!(promote, update);
        if let Err(e) = p {
            assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
            assert!(
                e.message().contains("changed concurrently"),
                "{}",
                e.message()
            );
            conflicts += 1;
        }
    }
    let promotions = hub.running().hub.store.list_promotions(100).await.unwrap();
    assert!(!promotions.is_empty());
    for p in &promotions {
        for i in &p.items {
            assert_eq!(
                i.target_revision,
                i.previous_revision + 1,
                "promotion {} replaced revision {} but was planned against {} ({conflicts} conflicts)",
                p.id,
                i.target_revision - 1,
                i.previous_revision
            );
        }
    }
}

#[tokio::test]
async fn concurrent_promotions_and_updates_conflict_instead_of_superseding() {
    let hub = TestHub::start().await;
    promotions_race_updates(&hub).await;
}

#[tokio::test]
#[ignore = "needs PostgreSQL (UNITSYNC_TEST_POSTGRES_URL)"]
async fn concurrent_promotions_and_updates_conflict_on_postgres_too() {
    let url = postgres_database().await;
    let hub = TestHub::start_on_postgres(&url, None).await;
    promotions_race_updates(&hub).await;
}

// --- 3: clocks and hostile numbers ---

#[tokio::test]
async fn soak_time_is_the_hubs_and_a_hostile_timestamp_changes_nothing() {
    let hub = TestHub::start().await;
    hub.create_env("dev").await;
    hub.create_env("staging").await;
    let token = hub.create_cluster("dev-1", "dev").await;
    let mut admin = hub.admin().await;
    admin
        .set_environment_policy(pb::SetEnvironmentPolicyRequest {
            name: "staging".into(),
            policy: Some(pb::EnvironmentPolicy {
                soak_seconds: 3600,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    hub.put("dev/web", &configmap("web", "1")).await.unwrap();
    let mut agent = RawSession::open(&hub, &token).await;
    agent.update("web").await;
    // An agent whose clock is two hours behind reports Ready "long ago".
    let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(7200);
    agent
        .send(AgentMsg::Status(pb::StatusReport {
            unit: "web".into(),
            revision: 1,
            phase: pb::Phase::Ready.into(),
            observed_at: Some(two_hours_ago.into()),
            ..Default::default()
        }))
        .await;
    until("Ready recorded", || async {
        hub.unit("dev/web")
            .await
            .unwrap()
            .clusters
            .first()
            .is_some_and(|c| c.phase == i32::from(pb::Phase::Ready))
    })
    .await;
    let plan = admin
        .promote(pb::PromoteRequest {
            from: "dev".into(),
            to: "staging".into(),
            units: vec!["web".into()],
            dry_run: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let soak = plan.items[0]
        .gates
        .iter()
        .find(|g| g.gate == "soak")
        .expect("a soak gate");
    assert!(!soak.passed, "soak measured on the hub's clock: {soak:?}");
    // A timestamp no clock can hold: the session is unharmed.
    agent
        .send(AgentMsg::Status(pb::StatusReport {
            unit: "web".into(),
            revision: 1,
            phase: pb::Phase::Ready.into(),
            observed_at: Some(prost_types::Timestamp {
                seconds: i64::MAX,
                nanos: 999_999_999,
            }),
            ..Default::default()
        }))
        .await;
    agent
        .send(AgentMsg::Heartbeat(pb::Heartbeat { sent_at: None }))
        .await;
    assert!(connected(&hub, "dev-1").await);
    drop(agent);
    until(
        "the session is unregistered when the agent leaves",
        || async { !connected(&hub, "dev-1").await },
    )
    .await;
}

// --- 4: certificates ---

#[tokio::test]
async fn only_a_client_certificate_renews_a_certificate_and_never_from_a_new_ca() {
    let hub = TestHub::start().await;
    hub.create_env("prod").await;
    let token = hub.create_cluster("prod", "prod").await;
    // A bearer token cannot mint certificates.
    let by_token = SimAgent::new(&hub.endpoint(), hub.ca(), &token);
    let client = by_token.hub_client();
    let e = within("renew with a token", client.renew_certificate())
        .await
        .expect_err("refused");
    assert!(
        matches!(&e, SessionError::Refused(s) if s.code() == Code::PermissionDenied),
        "{e:?}"
    );
    // With the CA files gone from the data directory, renewal still signs
    // with the CA the hub started with, and creates no new one.
    let cert = hub
        .admin()
        .await
        .issue_cluster_certificate(pb::IssueClusterCertificateRequest {
            name: "prod".into(),
            validity_seconds: 3600,
        })
        .await
        .unwrap()
        .into_inner();
    let data = hub.dir.path().join("data");
    std::fs::remove_file(data.join("ca.key")).unwrap();
    std::fs::remove_file(data.join("ca.crt")).unwrap();
    let agent = SimAgent::new(&hub.endpoint(), hub.ca(), "")
        .with_identity(&cert.certificate_pem, &cert.private_key_pem);
    let renewer = agent.hub_client();
    within("renew", renewer.renew_certificate())
        .await
        .expect("renewed by the hub's CA");
    assert!(!data.join("ca.key").exists(), "no new CA was created");
    // The CA is served as loaded, not re-read.
    let again = hub
        .admin()
        .await
        .issue_cluster_certificate(pb::IssueClusterCertificateRequest {
            name: "prod".into(),
            validity_seconds: 3600,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.ca_pem, hub.ca().unwrap());
}

// --- 5: operators ---

#[tokio::test]
async fn an_existing_operator_is_never_replaced_and_rotation_is_its_own_audited_command() {
    let hub = TestHub::start().await;
    let mut admin = hub.admin().await;
    let alice = hub.create_operator("alice", "read-only").await;
    for name in ["alice", "admin"] {
        let e = admin
            .create_operator(pb::CreateOperatorRequest {
                name: name.into(),
                role: "admin".into(),
            })
            .await
            .expect_err("an existing name");
        assert_eq!(e.code(), Code::AlreadyExists, "{name}: {e:?}");
    }
    // Alice still reads with her token, and the admin token still works.
    hub.client(&alice)
        .await
        .list_environments(pb::ListEnvironmentsRequest {})
        .await
        .expect("alice's token still works");
    let rotated = admin
        .rotate_operator_token(pb::RotateOperatorTokenRequest {
            name: "alice".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rotated.role, "read-only");
    let old = hub
        .client(&alice)
        .await
        .list_environments(pb::ListEnvironmentsRequest {})
        .await
        .expect_err("the old token stopped working");
    assert_eq!(old.code(), Code::Unauthenticated);
    hub.client(&rotated.token)
        .await
        .list_environments(pb::ListEnvironmentsRequest {})
        .await
        .expect("the new token works");
    let audit = admin
        .list_audit(pb::ListAuditRequest {
            limit: 10,
            target_prefix: "operator/alice".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let actions: Vec<&str> = audit.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(actions, ["operator.rotate", "operator.create"]);
}

// --- 6: secrets ---

#[tokio::test]
async fn read_only_operators_never_see_secret_values() {
    let hub = TestHub::start().await;
    hub.create_env("dev").await;
    let secret = "apiVersion: v1\nkind: Secret\nmetadata:\n  name: creds\n  namespace: apps\ndata:\n  password: c2VjcmV0LXZhbHVl\nstringData:\n  token: plain-secret-value\n";
    let text = format!("{}---\n{secret}", configmap("web", "visible"));
    hub.put("dev/web", &text).await.unwrap();
    let reader = hub
        .admin()
        .await
        .create_operator(pb::CreateOperatorRequest {
            name: "auditor".into(),
            role: Role::ReadOnly.as_str().into(),
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let mut ro = hub.client(&reader).await;
    let unit = ro
        .get_unit(pb::GetUnitRequest {
            unit: "dev/web".into(),
            include_manifests: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let rev = ro
        .get_revision(pb::GetRevisionRequest {
            unit: "dev/web".into(),
            number: 1,
        })
        .await
        .unwrap()
        .into_inner();
    for shown in [unit.head.unwrap().manifests, rev.manifests] {
        assert!(
            !shown.contains("c2VjcmV0LXZhbHVl") && !shown.contains("plain-secret-value"),
            "{shown}"
        );
        assert!(
            shown.contains("password") && shown.contains("***"),
            "{shown}"
        );
        assert!(
            shown.contains("value: \"visible\""),
            "other documents verbatim: {shown}"
        );
    }
    let admin_view = hub.unit("dev/web").await.unwrap().head.unwrap().manifests;
    assert!(
        admin_view.contains("c2VjcmV0LXZhbHVl"),
        "admins see the values"
    );
}

// --- 7: automatic promotion ---

#[tokio::test]
async fn one_units_automatic_promotion_error_does_not_stop_the_others() {
    let hub = TestHub::start().await;
    hub.create_env("dev").await;
    hub.create_env("staging").await;
    let token = hub.create_cluster("dev-1", "dev").await;
    let mut agent = SimAgent::new(&hub.endpoint(), hub.ca(), &token).auto_ready();
    agent.start();
    for u in ["a", "b"] {
        hub.put(&format!("dev/{u}"), &configmap(u, "1"))
            .await
            .unwrap();
    }
    let mut admin = hub.admin().await;
    for u in ["a", "b"] {
        until("Ready in dev", || async {
            hub.unit(&format!("dev/{u}"))
                .await
                .unwrap()
                .clusters
                .first()
                .is_some_and(|c| c.phase == i32::from(pb::Phase::Ready))
        })
        .await;
        admin
            .link_unit(pb::LinkUnitRequest {
                unit: format!("staging/{u}"),
                upstream: format!("dev/{u}"),
                message: String::new(),
            })
            .await
            .unwrap();
    }
    // staging/a overrides an object its upstream does not have: promoting
    // it fails.
    admin
        .set_overrides(pb::SetOverridesRequest {
            unit: "staging/a".into(),
            overrides: vec![pb::Override {
                kind: "ConfigMap".into(),
                name: "no-such-object".into(),
                path: "data.x".into(),
                value_json: "\"y\"".into(),
                ..Default::default()
            }],
        })
        .await
        .unwrap();
    for u in ["a", "b"] {
        hub.put(&format!("dev/{u}"), &configmap(u, "2"))
            .await
            .unwrap();
    }
    for u in ["a", "b"] {
        until("revision 2 Ready in dev", || async {
            hub.unit(&format!("dev/{u}"))
                .await
                .unwrap()
                .clusters
                .first()
                .is_some_and(|c| c.revision == 2 && c.phase == i32::from(pb::Phase::Ready))
        })
        .await;
    }
    hub.auto_promote("staging").await;
    let promoted = within("automatic promotion", hub.running().hub.auto_promote_once())
        .await
        .expect("one unit's error is not the run's");
    assert_eq!(promoted, 1);
    let b = hub.unit("staging/b").await.unwrap().unit.unwrap();
    assert_eq!(
        b.promoted_from_revision, 2,
        "b was promoted although a failed"
    );
}

// --- 10: status codes ---

#[tokio::test]
async fn the_session_ending_status_names_the_cause() {
    let hub = TestHub::start_with(Tuning {
        max_sessions: 1,
        ..Tuning::default()
    })
    .await;
    hub.create_env("dev").await;
    let token = hub.create_cluster("dev-1", "dev").await;
    // An oversized message: the agent hears the decode error.
    let mut raw = RawSession::open(&hub, &token).await;
    raw.send(AgentMsg::Status(pb::StatusReport {
        unit: "web".into(),
        message: "x".repeat(unitsync_proto::MAX_MESSAGE_BYTES + 1),
        ..Default::default()
    }))
    .await;
    let s = raw.end().await;
    assert_ne!(s.code(), Code::Unavailable, "{s:?}");
    assert!(s.message().contains("too large"), "{s:?}");
    until("unregistered", || async { !connected(&hub, "dev-1").await }).await;
    // At the session limit, the cluster's own reconnect replaces its
    // session instead of being refused.
    let mut first = RawSession::open(&hub, &token).await;
    let _second = RawSession::open(&hub, &token).await;
    let s = first.end().await;
    assert_eq!(s.code(), Code::Aborted, "{s:?}");
    // Revocation ends a live session as an authentication failure.
    let mut third = RawSession::open(&hub, &token).await;
    hub.admin()
        .await
        .revoke_cluster(pb::RevokeClusterRequest {
            name: "dev-1".into(),
        })
        .await
        .unwrap();
    let s = third.end().await;
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
}

// --- 11: opaque rejections ---

#[tokio::test]
async fn a_huge_invalid_value_is_refused_with_a_short_clear_message() {
    let hub = TestHub::start().await;
    hub.create_env("dev").await;
    let name = "Invalid_".repeat(12_500);
    let text =
        format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: apps\n");
    let e = hub.put("dev/web", &text).await.expect_err("refused");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().len() < 1024, "{} bytes", e.message().len());
    assert!(
        e.message().contains("field metadata.name") && e.message().contains("Invalid_Invalid_"),
        "{}",
        e.message()
    );
}

#[tokio::test]
async fn text_a_database_cannot_store_is_refused_clearly() {
    let hub = TestHub::start().await;
    hub.create_env("dev").await;
    let e = within(
        "put",
        hub.admin().await.put_unit(pb::PutUnitRequest {
            unit: "dev/web".into(),
            manifests: configmap("web", "1"),
            message: "fix\0me".into(),
            mode: 0,
            labels: Default::default(),
        }),
    )
    .await
    .expect_err("refused");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(
        e.message(),
        "invalid argument: the message for unit dev/web contains a NUL character"
    );
    assert_eq!(
        hub.unit("dev/web").await.unwrap_err().code(),
        Code::NotFound
    );
}

// --- 1 and 9: PostgreSQL outages ---

/// A replica whose database connection goes through a fault proxy.
async fn replica_behind_proxy(
    db: &str,
    replica_of: Option<&TestHub>,
    tuning: Tuning,
) -> (TestHub, FaultProxy) {
    let (head, tail) = db.rsplit_once('@').expect("user@host in the URL");
    let (hostport, name) = tail.split_once('/').expect("a database name");
    let upstream: std::net::SocketAddr = hostport.parse().expect("an IP:port database address");
    let proxy = FaultProxy::start(upstream).await;
    let url = format!("{head}@{}/{name}", proxy.addr());
    (
        TestHub::start_on_postgres_with(&url, replica_of, tuning).await,
        proxy,
    )
}

async fn readyz(hub: &TestHub) -> u16 {
    unitsync_tests::processes::http_get(hub.http_addr(), "/readyz")
        .await
        .map_or(0, |(s, _)| s)
}

#[tokio::test]
#[ignore = "needs PostgreSQL (UNITSYNC_TEST_POSTGRES_URL)"]
async fn replicas_recover_from_a_lost_database_and_catch_up_on_missed_commits() {
    let db = postgres_database().await;
    let (a, _proxy_a) = replica_behind_proxy(&db, None, Tuning::default()).await;
    let (b, proxy_b) = replica_behind_proxy(&db, Some(&a), Tuning::default()).await;
    a.create_env("dev").await;
    let token = a.create_cluster("dev-b", "dev").await;
    let mut agent = SimAgent::new(&b.endpoint(), b.ca(), &token);
    agent.start();
    a.put("dev/web", &configmap("web", "1")).await.unwrap();
    until("the agent on replica b has revision 1", || async {
        agent.held().get("web").is_some_and(|(r, _)| *r == 1)
    })
    .await;
    // Replica b loses its database.
    proxy_b.set(Mode::Refuse);
    until("b is not ready without its database", || async {
        readyz(&b).await == 503
    })
    .await;
    assert_eq!(readyz(&a).await, 200);
    // A commit through a: b's listener misses its announcement.
    a.put("dev/web", &configmap("web", "2")).await.unwrap();
    proxy_b.set(Mode::Pass);
    until("b is ready again", || async { readyz(&b).await == 200 }).await;
    until("b's agent catches up without reconnecting", || async {
        agent.held().get("web").is_some_and(|(r, _)| *r == 2)
    })
    .await;
    // And b commits again.
    let r = b.put("dev/web", &configmap("web", "3")).await.unwrap();
    assert_eq!(r.number, 3);
}

#[tokio::test]
#[ignore = "needs PostgreSQL (UNITSYNC_TEST_POSTGRES_URL)"]
async fn a_credential_that_cannot_be_rechecked_ends_its_session() {
    let db = postgres_database().await;
    let (hub, proxy) = replica_behind_proxy(
        &db,
        None,
        Tuning {
            credential_recheck: Duration::from_millis(300),
            ..Tuning::default()
        },
    )
    .await;
    hub.create_env("dev").await;
    let token = hub.create_cluster("dev-1", "dev").await;
    let mut raw = RawSession::open(&hub, &token).await;
    until("registered", || async {
        hub.running().hub.fanout.count() == 1
    })
    .await;
    proxy.set(Mode::Refuse);
    let s = raw.end().await;
    assert_eq!(s.code(), Code::Unavailable, "{s:?}");
    assert_eq!(hub.running().hub.fanout.count(), 0);
}

// --- 12: big fleets ---

#[tokio::test]
async fn status_and_unit_views_page_through_five_thousand_clusters() {
    use sqlx::Connection;
    let hub = TestHub::start().await;
    hub.create_env("dev").await;
    hub.put("dev/web", &configmap("web", "1")).await.unwrap();
    // 5,000 clusters with a status each (about 1 KiB of resources per
    // cell: over 4 MiB in all), written straight into the store.
    let url = format!("sqlite://{}", hub.db_path().display());
    let mut db = sqlx::SqliteConnection::connect(&url).await.unwrap();
    let resources = serde_json::to_string(
        &(0..8)
            .map(|i| {
                serde_json::json!({"api_version": "v1", "kind": "ConfigMap", "namespace": "apps",
                    "name": format!("object-{i:03}"), "sync": "Synced", "health": "Ready",
                    "message": "x".repeat(60)})
            })
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let mut tx = db.begin().await.unwrap();
    for i in 0..5000 {
        let name = format!("c{i:04}");
        sqlx::query("INSERT INTO clusters (name, environment, labels, token_hash, created_at) VALUES (?, 'dev', '{}', ?, 0)")
            .bind(&name)
            .bind(format!("hash-{i}"))
            .execute(&mut *tx)
            .await
            .unwrap();
        sqlx::query("INSERT INTO unit_status (cluster, unit_id, acked, revision, phase, message, resources, updated_at, ready_since) SELECT ?, id, 1, 1, 'Ready', '', ?, 1, 1 FROM units WHERE name = 'web'")
            .bind(&name)
            .bind(&resources)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    let data = hub.dir.path().join("data");
    let status = within(
        "status",
        unitsync_tests::processes::cli(&data, &hub.endpoint(), &["status", "-o", "json"]),
    )
    .await
    .expect("status of 5,000 clusters");
    let cells: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(cells.as_array().unwrap().len(), 5000);
    let unit = within(
        "unit get",
        unitsync_tests::processes::cli(
            &data,
            &hub.endpoint(),
            &["unit", "get", "dev/web", "-o", "json"],
        ),
    )
    .await
    .expect("a unit in 5,000 clusters");
    let unit: serde_json::Value = serde_json::from_str(&unit).unwrap();
    assert_eq!(unit["clusters"].as_array().unwrap().len(), 5000);
}

/// Ends the transaction holding a [`lock_table`] lock.
async fn unlock(mut lock: sqlx::PgConnection) {
    within(
        "unlock the table",
        sqlx::raw_sql("COMMIT").execute(&mut lock),
    )
    .await
    .unwrap();
}

/// Waits until a statement containing `text` waits for a lock.
async fn until_a_query_waits(url: &str, what: &str, text: &str) {
    let watch = within("watch connection", sqlx::PgPool::connect(url))
        .await
        .unwrap();
    until(what, || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'
               AND strpos(query, $1) > 0",
        )
        .bind(text)
        .fetch_one(&watch)
        .await
        .unwrap();
        waiting > 0
    })
    .await;
}

/// A PostgreSQL connection holding `table` locked (every read and write
/// of it waits) until it runs `COMMIT`.
async fn lock_table(url: &str, table: &str) -> sqlx::PgConnection {
    use sqlx::Connection;
    let mut lock = within("lock connection", sqlx::PgConnection::connect(url))
        .await
        .unwrap();
    within(
        "lock the table",
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"
        )))
        .execute(&mut lock),
    )
    .await
    .unwrap();
    lock
}

#[tokio::test]
#[ignore = "needs PostgreSQL (UNITSYNC_TEST_POSTGRES_URL)"]
async fn an_agent_gone_during_its_handshake_leaves_no_session_behind() {
    let url = postgres_database().await;
    let hub = TestHub::start_on_postgres(&url, None).await;
    hub.create_env("dev").await;
    let token = hub.create_cluster("dev-1", "dev").await;
    hub.put("dev/web", &configmap("web", "1")).await.unwrap();
    // Hold the hub inside the handshake: the resync reads the units.
    let lock = lock_table(&url, "units").await;
    let channel = hub.channel().await;
    let opening = tokio::spawn(async move {
        let mut client = pb::agent_service_client::AgentServiceClient::new(channel);
        let hello = pb::AgentMessage {
            msg: Some(AgentMsg::Hello(pb::Hello {
                protocol_version: unitsync_proto::PROTOCOL_VERSION,
                agent_version: "raw".into(),
                units: vec![],
            })),
        };
        let mut req = tonic::Request::new(futures::StreamExt::chain(
            futures::stream::iter([hello]),
            futures::stream::pending(),
        ));
        req.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        client.session(req).await
    });
    until("the handshake under way", || async {
        has_session(&hub, "dev-1")
    })
    .await;
    // The agent goes away mid-handshake: its registration goes with it,
    // while the hub is still held inside the resync.
    opening.abort();
    let _ = opening.await;
    until("no session left behind", || async {
        !has_session(&hub, "dev-1")
    })
    .await;
    unlock(lock).await;
    assert!(!connected(&hub, "dev-1").await);
}

#[tokio::test]
#[ignore = "needs PostgreSQL (UNITSYNC_TEST_POSTGRES_URL)"]
async fn a_revocation_whose_caller_goes_away_still_ends_the_session() {
    let url = postgres_database().await;
    // The session's own periodic re-check must not be what ends it.
    let hub = TestHub::start_on_postgres_with(
        &url,
        None,
        Tuning {
            credential_recheck: Duration::from_secs(3600),
            ..Default::default()
        },
    )
    .await;
    hub.create_env("dev").await;
    let token = hub.create_cluster("dev-1", "dev").await;
    let mut agent = SimAgent::new(&hub.endpoint(), hub.ca(), &token);
    agent.start();
    until("the agent's session", || async {
        has_session(&hub, "dev-1")
    })
    .await;
    // Hold the revocation in the store; its caller goes away meanwhile
    // (a Ctrl-C, a client deadline).
    let lock = lock_table(&url, "clusters").await;
    let mut admin = hub.admin().await;
    let revoking = tokio::spawn(async move {
        admin
            .revoke_cluster(pb::RevokeClusterRequest {
                name: "dev-1".into(),
            })
            .await
    });
    until_a_query_waits(&url, "the revocation waits for the table", "revoked = 1").await;
    revoking.abort();
    let _ = within("the revoking caller gone", revoking).await;
    unlock(lock).await;
    // The revocation still ran to its end: the revoked agent's live
    // session is over.
    until("the revoked agent's session ended", || async {
        !has_session(&hub, "dev-1")
    })
    .await;
}

/// One gRPC call made by hand over HTTP/2 (TLS, trusting the hub's CA)
/// with `grpc-timeout` set and not kept by the client (tonic's client
/// keeps it itself): the `grpc-status` the hub answers with.
async fn grpc_status_of_call_with_deadline(
    hub: &TestHub,
    path: &str,
    message: impl prost::Message,
    timeout: &str,
) -> String {
    use http_body_util::Full;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(
            rustls::pki_types::CertificateDer::from_pem_slice(hub.ca().unwrap().as_bytes())
                .unwrap(),
        )
        .unwrap();
    let mut tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let addr = hub.endpoint().trim_start_matches("https://").to_owned();
    let tcp = within("connect", tokio::net::TcpStream::connect(&addr))
        .await
        .unwrap();
    let stream = within(
        "TLS handshake",
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
            .connect("localhost".try_into().unwrap(), tcp),
    )
    .await
    .unwrap();
    let (mut sender, connection) = within(
        "HTTP/2 handshake",
        hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        ),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    // A gRPC message: uncompressed flag, big-endian length, the bytes.
    let encoded = message.encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(encoded.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(&encoded);
    let request = http::Request::post(format!("https://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", timeout)
        .header(
            "authorization",
            format!("Bearer {}", hub.running().admin_token),
        )
        .body(Full::new(bytes::Bytes::from(frame)))
        .unwrap();
    let reply = within("the hub's reply", sender.send_request(request))
        .await
        .unwrap();
    // A call that fails before any message answers with headers only.
    reply
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

#[tokio::test]
#[ignore = "needs PostgreSQL (UNITSYNC_TEST_POSTGRES_URL)"]
async fn a_call_past_its_deadline_hears_deadline_exceeded() {
    let url = postgres_database().await;
    let hub = TestHub::start_on_postgres(&url, None).await;
    hub.create_env("dev").await;
    // Hold every read of units in the store.
    let lock = lock_table(&url, "units").await;
    let status = grpc_status_of_call_with_deadline(
        &hub,
        "/unitsync.v1.HubService/ListUnits",
        pb::ListUnitsRequest {
            environment: "dev".into(),
        },
        "300m",
    )
    .await;
    assert_eq!(status, (Code::DeadlineExceeded as i32).to_string());
    unlock(lock).await;
    // The hub goes on answering.
    let units = within(
        "a call after the lock",
        hub.admin().await.list_units(pb::ListUnitsRequest {
            environment: "dev".into(),
        }),
    )
    .await
    .unwrap();
    assert!(units.into_inner().units.is_empty());
}

#[tokio::test]
#[ignore = "needs PostgreSQL (UNITSYNC_TEST_POSTGRES_URL)"]
async fn a_credential_recheck_stuck_in_the_store_does_not_stop_heartbeats() {
    use crate::protocol::{hello, keep_beating, next, next_heartbeat, raw_session};
    let url = postgres_database().await;
    let hub = TestHub::start_on_postgres_with(
        &url,
        None,
        Tuning {
            heartbeat: Duration::from_millis(300),
            credential_recheck: Duration::from_millis(100),
            ..Default::default()
        },
    )
    .await;
    hub.create_env("dev").await;
    let token = hub.create_cluster("dev-1", "dev").await;
    let (tx, mut inbound) = raw_session(&hub, &token, hello(1)).await.unwrap();
    assert!(matches!(next(&mut inbound).await, HubMsg::Welcome(_)));
    // The agent keeps talking: silence is not what is tested.
    let beats = keep_beating(tx);
    // Hold the hub's credential re-check (a batch with this session's) in
    // the store.
    let lock = lock_table(&url, "clusters").await;
    until_a_query_waits(&url, "a re-check waits for the table", "token_hash").await;
    // The idle hub still beats to the agent meanwhile: three heartbeats
    // sent after the re-check was seen waiting (not ones already on
    // their way).
    let waiting = std::time::SystemTime::now();
    let mut beats_since = 0;
    while beats_since < 3 {
        if next_heartbeat(&mut inbound).await > waiting {
            beats_since += 1;
        }
    }
    unlock(lock).await;
    beats.abort();
}
