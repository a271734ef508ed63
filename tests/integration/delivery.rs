//! Delivery: resync by version vector, live updates, coalescing, restarts.

use std::collections::BTreeMap;

use unitsync_agent::desired::{DesiredStore, DesiredUnit};
use unitsync_agent::hub_client::StatusUpdate;
use unitsync_proto::v1 as pb;
use unitsync_tests::{SimAgent, TestHub, configmap, until, within};

async fn hub_with_cluster() -> (TestHub, String) {
    let hub = TestHub::start().await;
    hub.create_env("dev").await;
    let token = hub.create_cluster("dev-1", "dev").await;
    (hub, token)
}

fn latest(agent: &SimAgent) -> BTreeMap<String, (u64, bool)> {
    agent.held()
}

/// A hub with `dev/web` at revision 1 and an agent of `dev-1` holding it.
async fn agent_holding_web() -> (TestHub, SimAgent) {
    let (hub, token) = hub_with_cluster().await;
    hub.put("dev/web", &configmap("web", "1")).await.unwrap();
    let mut agent = SimAgent::new(&hub.endpoint(), hub.ca(), &token);
    agent.start();
    until("web@1 held", || async {
        latest(&agent).get("web") == Some(&(1, false))
    })
    .await;
    (hub, agent)
}

#[tokio::test]
async fn agent_gets_current_state_then_live_updates_and_status_flows_back() {
    let (hub, agent) = agent_holding_web().await;

    let rev = hub.put("dev/web", &configmap("web", "2")).await.unwrap();
    assert_eq!(rev.number, 2);
    until("web@2 held", || async {
        latest(&agent).get("web") == Some(&(2, false))
    })
    .await;
    let got = agent.received();
    assert_eq!(&*got.last().unwrap().manifests, configmap("web", "2"));

    // The ack is recorded by the hub.
    until("ack recorded", || async {
        hub.unit("dev/web")
            .await
            .unwrap()
            .clusters
            .first()
            .is_some_and(|c| c.acked_revision == 2)
    })
    .await;

    agent.report(StatusUpdate {
        unit: "web".into(),
        revision: 2,
        phase: unitsync_agent::status::Phase::Ready,
        message: "all resources ready".into(),
        resources: vec![],
    });
    until("status recorded", || async {
        hub.unit("dev/web")
            .await
            .unwrap()
            .clusters
            .first()
            .is_some_and(|c| {
                c.revision == 2
                    && c.phase == i32::from(pb::Phase::Ready)
                    && c.message == "all resources ready"
                    && c.connected
            })
    })
    .await;
}

#[tokio::test]
async fn reconnect_without_loss_delivers_exactly_the_latest_revision_of_each_unit() {
    let (hub, token) = hub_with_cluster().await;
    let units = ["u1", "u2", "u3", "u4", "u5"];
    for u in units {
        hub.put(&format!("dev/{u}"), &configmap(u, "0"))
            .await
            .unwrap();
    }
    let mut agent = SimAgent::new(&hub.endpoint(), hub.ca(), &token);
    agent.start();
    until("all five held at 1", || async {
        latest(&agent)
            .values()
            .filter(|v| **v == (1, false))
            .count()
            == 5
    })
    .await;
    agent.stop().await;
    agent.clear_received();

    // 50 revisions across 5 units while the agent is away.
    for i in 1..=10 {
        for u in units {
            hub.put(&format!("dev/{u}"), &configmap(u, &i.to_string()))
                .await
                .unwrap();
        }
    }
    agent.start();
    until("all five held at 11", || async {
        latest(&agent)
            .values()
            .filter(|v| **v == (11, false))
            .count()
            == 5
    })
    .await;

    let mut got: Vec<(String, u64)> = agent
        .received()
        .into_iter()
        .map(|u| (u.unit, u.revision))
        .collect();
    got.sort();
    let want: Vec<(String, u64)> = units.iter().map(|u| ((*u).to_owned(), 11)).collect();
    assert_eq!(
        got, want,
        "exactly the latest revision of each unit, nothing older, nothing missing"
    );
    for u in agent.received() {
        assert_eq!(&*u.manifests, configmap(&u.unit, "10"));
    }
}

/// A revision older than the one an agent holds is never sent to it: a
/// late commit notice (a replica working through its backlog) after the
/// agent reconnected already holding a newer one.
#[tokio::test]
async fn an_agent_is_never_sent_a_revision_older_than_it_holds() {
    let (hub, mut agent) = agent_holding_web().await;
    hub.put("dev/web", &configmap("web", "2")).await.unwrap();
    until("web@2 held", || async {
        latest(&agent).get("web") == Some(&(2, false))
    })
    .await;
    agent.stop().await;
    agent.clear_received();
    agent.start();
    until("reconnected", || async { agent.connections() >= 2 }).await;
    let running = &hub.running().hub;
    let unit: unitsync_hub::model::UnitRef = "dev/web".parse().unwrap();
    let first = within(
        "revision 1",
        running.get_revision(
            &unit,
            unitsync_hub::model::RevisionNum(1),
            unitsync_hub::model::Role::Admin,
        ),
    )
    .await
    .unwrap();
    running.offer(&first);
    // A newer commit: delivered after that late offer had its turn.
    hub.put("dev/web", &configmap("web", "3")).await.unwrap();
    until("web@3 held", || async {
        latest(&agent).get("web") == Some(&(3, false))
    })
    .await;
    let revisions: Vec<u64> = agent.received().iter().map(|u| u.revision).collect();
    assert_eq!(revisions, [3], "only newer revisions after the reconnect");
}

#[tokio::test]
async fn hub_restart_resyncs_keeps_acknowledged_state_and_delivers_tombstones() {
    let (mut hub, token) = hub_with_cluster().await;
    for u in ["a", "b", "c"] {
        hub.put(&format!("dev/{u}"), &configmap(u, "0"))
            .await
            .unwrap();
    }
    let mut agent = SimAgent::new(&hub.endpoint(), hub.ca(), &token);
    agent.start();
    until("a, b, c held", || async { latest(&agent).len() == 3 }).await;
    until("acks recorded", || async {
        hub.unit("dev/c")
            .await
            .unwrap()
            .clusters
            .first()
            .is_some_and(|c| c.acked_revision == 1)
    })
    .await;
    agent.stop().await;
    agent.clear_received();

    // Committed (and acknowledged to the operator) just before the restart.
    hub.put("dev/a", &configmap("a", "1")).await.unwrap();
    hub.destroy("dev/b").await.unwrap();
    hub.restart().await;

    // Acknowledged state survived.
    let a = hub.unit("dev/a").await.unwrap();
    assert_eq!(a.unit.as_ref().unwrap().head_revision, 2);
    assert_eq!(a.clusters[0].acked_revision, 1);

    agent.start();
    until("a@2 and b's tombstone held", || async {
        let h = latest(&agent);
        h.get("a") == Some(&(2, false)) && h.get("b") == Some(&(2, true))
    })
    .await;
    let resent: Vec<String> = agent.received().into_iter().map(|u| u.unit).collect();
    assert!(
        !resent.contains(&"c".to_owned()),
        "an unchanged unit is not re-sent: {resent:?}"
    );
}

#[tokio::test]
async fn connected_agents_resync_after_the_hub_restarts() {
    let (mut hub, token) = hub_with_cluster().await;
    hub.put("dev/a", &configmap("a", "0")).await.unwrap();
    let mut agent = SimAgent::new(&hub.endpoint(), hub.ca(), &token);
    agent.start();
    until("a@1", || async {
        latest(&agent).get("a") == Some(&(1, false))
    })
    .await;
    hub.restart().await;
    // The agent reconnects by itself (backoff from 1 s) and gets new commits.
    until("agent reconnected", || async {
        hub.admin()
            .await
            .get_cluster(pb::GetClusterRequest {
                name: "dev-1".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .connected
    })
    .await;
    hub.put("dev/a", &configmap("a", "1")).await.unwrap();
    until("a@2 after restart", || async {
        latest(&agent).get("a") == Some(&(2, false))
    })
    .await;
}

#[tokio::test]
async fn units_not_assigned_any_more_are_tombstoned_on_connect() {
    let (hub, token) = hub_with_cluster().await;
    let agent = SimAgent::new(&hub.endpoint(), hub.ca(), &token);
    agent
        .desired
        .record(DesiredUnit {
            unit: "ghost".into(),
            environment: "dev".into(),
            revision: 4,
            digest: "00".into(),
            tombstone: false,
            manifests: configmap("ghost", "x").into(),
        })
        .await
        .unwrap();
    let mut agent = agent;
    agent.start();
    until("ghost tombstoned", || async {
        latest(&agent).get("ghost").is_some_and(|(_, t)| *t)
    })
    .await;
}

#[tokio::test]
async fn agents_only_receive_their_environment() {
    let (hub, dev_token) = hub_with_cluster().await;
    hub.create_env("prod").await;
    let prod_token = hub.create_cluster("prod-1", "prod").await;
    hub.put("dev/web", &configmap("web", "dev")).await.unwrap();
    hub.put("prod/web", &configmap("web", "prod"))
        .await
        .unwrap();
    hub.put("prod/db", &configmap("db", "prod")).await.unwrap();
    let mut dev = SimAgent::new(&hub.endpoint(), hub.ca(), &dev_token);
    let mut prod = SimAgent::new(&hub.endpoint(), hub.ca(), &prod_token);
    dev.start();
    prod.start();
    until("prod holds two", || async { latest(&prod).len() == 2 }).await;
    until("dev holds one", || async { latest(&dev).len() == 1 }).await;
    hub.put("prod/web", &configmap("web", "prod2"))
        .await
        .unwrap();
    until("prod web@2", || async {
        latest(&prod).get("web") == Some(&(2, false))
    })
    .await;
    // Everything dev ever received is dev's.
    assert!(
        dev.received()
            .iter()
            .all(|u| u.environment == "dev" && u.manifests.contains("\"dev\""))
    );
    assert_eq!(latest(&dev).get("web"), Some(&(1, false)));
}

#[tokio::test]
async fn metrics_count_sessions_commits_and_deliveries() {
    let (hub, token) = hub_with_cluster().await;
    let mut agent = SimAgent::new(&hub.endpoint(), hub.ca(), &token);
    agent.start();
    hub.put("dev/web", &configmap("web", "1")).await.unwrap();
    until("web@1", || async {
        latest(&agent).get("web") == Some(&(1, false))
    })
    .await;
    let addr = hub.http_addr();
    until("metrics show one delivery", || async {
        let body = http_get(addr, "/metrics").await;
        body.contains("unitsync_connected_agents 1")
            && body.contains("unitsync_revisions_committed_total 1")
            && body.contains("unitsync_deliveries_total 1")
            && body.contains("unitsync_delivery_latency_seconds_count 1")
    })
    .await;
    assert!(http_get(addr, "/healthz").await.ends_with("ok\n"));
    assert!(http_get(addr, "/readyz").await.ends_with("ready\n"));
}

/// A plain-text endpoint's body.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    within(
        &format!("GET {path}"),
        unitsync_tests::processes::http_get(addr, path),
    )
    .await
    .unwrap()
    .1
}

async fn cluster(hub: &TestHub, name: &str) -> pb::Cluster {
    within(
        "get cluster",
        hub.admin()
            .await
            .get_cluster(pb::GetClusterRequest { name: name.into() }),
    )
    .await
    .unwrap()
    .into_inner()
}

#[tokio::test]
async fn clusters_remember_their_last_agent_session_and_credentials() {
    let (mut hub, token) = hub_with_cluster().await;
    let fresh = cluster(&hub, "dev-1").await;
    assert!(fresh.last_seen.is_none() && fresh.agent_version.is_empty());
    assert!(!fresh.revoked && fresh.certificate_expires.is_none());

    let mut agent = SimAgent::new(&hub.endpoint(), hub.ca(), &token);
    agent.start();
    // Connected as both sides see it (the agent has its Welcome).
    until("connected", || async {
        agent.connections() > 0 && cluster(&hub, "dev-1").await.connected
    })
    .await;
    agent.stop().await;
    until("disconnected and seen", || async {
        let c = cluster(&hub, "dev-1").await;
        !c.connected && c.last_seen.is_some()
    })
    .await;
    let seen = cluster(&hub, "dev-1").await.last_seen;
    // Durable: a restarted hub still knows when and which agent.
    hub.restart().await;
    let after = cluster(&hub, "dev-1").await;
    assert_eq!(after.last_seen, seen);
    assert_eq!(after.agent_version, "sim");

    let issued = within(
        "issue certificate",
        hub.admin()
            .await
            .issue_cluster_certificate(pb::IssueClusterCertificateRequest {
                name: "dev-1".into(),
                ..Default::default()
            }),
    )
    .await
    .unwrap()
    .into_inner();
    // The newest certificate's expiry, as issued (30 days by default).
    let expires = cluster(&hub, "dev-1")
        .await
        .certificate_expires
        .expect("expiry");
    let not_after = issued.not_after.expect("not_after");
    let millis = |t: &prost_types::Timestamp| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000;
    assert_eq!(
        millis(&expires),
        millis(&not_after),
        "stored to the millisecond"
    );
    within(
        "revoke",
        hub.admin().await.revoke_cluster(pb::RevokeClusterRequest {
            name: "dev-1".into(),
        }),
    )
    .await
    .unwrap();
    assert!(cluster(&hub, "dev-1").await.revoked);
}

#[tokio::test]
async fn a_commit_whose_caller_goes_away_still_reaches_the_agents() {
    use futures::FutureExt;
    use unitsync_hub::model::{Actor, PutMode};

    let (hub, agent) = agent_holding_web().await;

    // The caller (an RPC cancelled by its client, say) is dropped after
    // the commit started: it is committed and offered, not left behind.
    let put = hub.running().hub.put_unit(
        Actor::Operator("tester".into()),
        "dev/web".parse().unwrap(),
        configmap("web", "2"),
        String::new(),
        PutMode::CreateOrUpdate,
        None,
    );
    assert!(put.now_or_never().is_none(), "the commit is still running");
    until("web@2 held", || async {
        latest(&agent).get("web") == Some(&(2, false))
    })
    .await;
}

/// Operators never wait for the runtime serving the agents: a new
/// connection is accepted, TLS-terminated and read off it and sent to the
/// control lane by its first call, where the HTTP endpoints (probes,
/// metrics, dashboard) and the writer of agents' reports run too. All go
/// on while every thread of that runtime is busy (as in a large fan-out,
/// where they queued behind thousands of session wake-ups at each step,
/// and a commit waited for the store's writer connection while the report
/// writer held it, queued there).
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn operators_probes_and_reports_go_on_while_the_agents_runtime_is_busy() {
    use std::sync::mpsc;
    use unitsync_hub::model::{Phase, RevisionNum, StatusReport, UnixMillis};
    use unitsync_tests::hub::{operator_client, tls_channel};

    // The hub's main runtime is this test's one worker thread.
    let (hub, _token) = hub_with_cluster().await;
    hub.put("dev/web", &configmap("web", "1")).await.unwrap();
    let (endpoint, ca, token, http, inner) = (
        hub.endpoint(),
        hub.ca().unwrap().to_owned(),
        hub.admin_token.clone(),
        hub.http_addr(),
        hub.running().hub.clone(),
    );

    // Hold the main runtime's only worker until the operator is done.
    let (held, holding) = mpsc::channel();
    let (release, released) = mpsc::channel::<()>();
    tokio::spawn(async move {
        held.send(()).unwrap();
        let _ = released.recv();
    });
    holding.recv().unwrap();

    // The operator is a process of its own (a runtime of its own here).
    let operator = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let busy = "while the agents' runtime is busy";
            let channel = within(
                &format!("a new operator connection {busy}"),
                tls_channel(&endpoint, &ca),
            )
            .await;
            let admin = operator_client(channel, &token);
            let envs = within(
                &format!("an operator's call {busy}"),
                admin
                    .clone()
                    .list_environments(pb::ListEnvironmentsRequest::default()),
            )
            .await
            .unwrap();
            assert_eq!(envs.into_inner().environments.len(), 1);
            let probe = within(
                &format!("the readiness probe {busy}"),
                unitsync_tests::processes::http_get(http, "/readyz"),
            )
            .await
            .unwrap();
            assert_eq!(probe, (200, "ready\n".to_owned()));
            // A report as the session would hand it over, then read back.
            inner.feedback.status(StatusReport {
                cluster: "dev-1".parse().unwrap(),
                unit: "dev/web".parse().unwrap(),
                revision: RevisionNum(1),
                phase: Phase::Ready,
                message: String::new(),
                resources: vec![],
                observed_at: UnixMillis::now(),
            });
            until(&format!("the status report recorded {busy}"), || {
                let mut admin = admin.clone();
                async move {
                    admin
                        .get_unit(pb::GetUnitRequest {
                            unit: "dev/web".into(),
                            ..Default::default()
                        })
                        .await
                        .unwrap()
                        .into_inner()
                        .clusters
                        .iter()
                        .any(|c| c.cluster == "dev-1" && c.phase == pb::Phase::Ready as i32)
                }
            })
            .await;
        })
    });
    let operated = operator.join();
    // Free the held worker before a failure unwinds the test.
    let _ = release.send(());
    if let Err(failure) = operated {
        std::panic::resume_unwind(failure);
    }
}
