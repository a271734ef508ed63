//! `WatchStatus` and what follows it: the matrix first, then each status
//! as the hub records it, each commit and each agent coming or going;
//! `--wait` and `status --watch` on top of it.

use tokio::io::{AsyncBufReadExt, BufReader};
use unitsync_proto::v1 as pb;
use unitsync_tests::{SimAgent, TestHub, configmap, within};

async fn next(stream: &mut tonic::Streaming<pb::StatusEvent>) -> pb::StatusEvent {
    within("a status event", stream.message())
        .await
        .expect("stream ok")
        .expect("stream open")
}

/// Reads events until `pred` holds for one.
async fn until_event(
    stream: &mut tonic::Streaming<pb::StatusEvent>,
    what: &str,
    mut pred: impl FnMut(&pb::StatusEvent) -> bool,
) -> pb::StatusEvent {
    let found = tokio::time::timeout(unitsync_tests::wait::DEADLINE, async {
        loop {
            let ev = stream
                .message()
                .await
                .expect("stream ok")
                .expect("stream open");
            if pred(&ev) {
                return ev;
            }
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("no event: {what}"))
}

#[tokio::test]
async fn the_hub_pushes_the_matrix_then_each_change() {
    let hub = TestHub::start().await;
    hub.create_env("dev").await;
    let token = hub.create_cluster("dev-1", "dev").await;
    hub.put("dev/web", &configmap("web", "1")).await.unwrap();
    let mut stream = within(
        "watch",
        hub.admin().await.watch_status(pb::WatchStatusRequest {
            environment: String::new(),
            unit: "dev/web".into(),
        }),
    )
    .await
    .unwrap()
    .into_inner();
    // The snapshot: the unit and the cluster, not connected, no status.
    let first = next(&mut stream).await;
    assert!(first.snapshot && first.snapshot_complete);
    assert_eq!(first.units.len(), 1);
    assert_eq!(first.units[0].head_revision, 1);
    assert_eq!(first.clusters.len(), 1);
    assert!(!first.clusters[0].connected);
    // The agent connects: the cluster changes.
    let mut agent = SimAgent::new(&hub.endpoint(), hub.ca(), &token);
    agent.start();
    let ev = until_event(&mut stream, "dev-1 connected", |e| {
        e.clusters.iter().any(|c| c.name == "dev-1" && c.connected)
    })
    .await;
    assert!(!ev.snapshot);
    // Its status arrives as it is recorded.
    agent.report(unitsync_agent::hub_client::StatusUpdate {
        unit: "web".into(),
        revision: 1,
        phase: unitsync_agent::status::Phase::Ready,
        message: "all good".into(),
        resources: vec![],
    });
    let ev = until_event(&mut stream, "the Ready status", |e| {
        e.cells
            .iter()
            .any(|c| c.revision == 1 && c.phase == pb::Phase::Ready as i32)
    })
    .await;
    assert_eq!(ev.cells[0].message, "all good");
    // A commit of the unit.
    hub.put("dev/web", &configmap("web", "2")).await.unwrap();
    until_event(&mut stream, "the new head", |e| {
        e.units.iter().any(|u| u.head_revision == 2)
    })
    .await;
    // Another unit's changes are not this watcher's.
    hub.put("dev/other", &configmap("other", "1"))
        .await
        .unwrap();
    agent.report(unitsync_agent::hub_client::StatusUpdate {
        unit: "web".into(),
        revision: 2,
        phase: unitsync_agent::status::Phase::Progressing,
        message: String::new(),
        resources: vec![],
    });
    // Every event up to that status, not only the last, is about dev/web.
    let mut seen = Vec::new();
    until_event(&mut stream, "revision 2 progressing", |e| {
        seen.push(e.clone());
        e.cells
            .iter()
            .any(|c| c.revision == 2 && c.phase == pb::Phase::Progressing as i32)
    })
    .await;
    for ev in &seen {
        assert!(ev.cells.iter().all(|c| c.unit == "dev/web"), "{ev:?}");
        assert!(ev.units.iter().all(|u| u.unit == "dev/web"), "{ev:?}");
    }
    // The agent leaves.
    agent.stop().await;
    until_event(&mut stream, "dev-1 gone", |e| {
        e.clusters.iter().any(|c| c.name == "dev-1" && !c.connected)
    })
    .await;
}

#[tokio::test]
async fn status_watch_redraws_the_matrix_as_statuses_arrive() {
    let hub = TestHub::start().await;
    hub.create_env("dev").await;
    let token = hub.create_cluster("dev-1", "dev").await;
    let mut agent = SimAgent::new(&hub.endpoint(), hub.ca(), &token).auto_ready();
    agent.start();
    hub.put("dev/web", &configmap("web", "1")).await.unwrap();
    let data = hub.dir.path().join("data");
    let mut child = tokio::process::Command::new(unitsync_tests::processes::bin("unitsync"))
        .args(["status", "--watch", "--hub", &hub.endpoint()])
        .env("UNITSYNC_DATA_DIR", &data)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = String::new();
    let mut wait_for = async |needle: &str| {
        tokio::time::timeout(unitsync_tests::wait::DEADLINE, async {
            while let Some(l) = lines.next_line().await.unwrap() {
                seen.push_str(&l);
                seen.push('\n');
                if l.contains("dev/web") && l.contains(needle) {
                    return;
                }
            }
            panic!("status --watch ended");
        })
        .await
        .unwrap_or_else(|_| panic!("never showed {needle}:\n{seen}"));
    };
    wait_for("1 Ready").await;
    hub.put("dev/web", &configmap("web", "2")).await.unwrap();
    wait_for("2 Ready").await;
    let _ = child.kill().await;
    let _ = within("exit", child.wait()).await;
}

/// A watch of environment `env`.
async fn watch_env(hub: &TestHub, env: &str) -> tonic::Streaming<pb::StatusEvent> {
    let request = pb::WatchStatusRequest {
        environment: env.into(),
        unit: String::new(),
    };
    within("watch", hub.admin().await.watch_status(request))
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn a_watch_ends_unavailable_when_the_hub_shuts_down_and_does_not_hold_it() {
    let mut hub = TestHub::start().await;
    hub.create_env("dev").await;
    let mut stream = watch_env(&hub, "dev").await;
    until_event(&mut stream, "the snapshot", |e| e.snapshot_complete).await;
    // The hub stops within the test's deadline (it waited for the stream
    // to end, which it never did).
    hub.stop().await;
    let ended = within("the watch's end", stream.message()).await;
    let status = ended.expect_err("the watch ends with a status");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
    assert!(status.message().contains("shutting down"), "{status}");
}

#[tokio::test]
async fn a_cluster_created_or_deleted_brings_a_fresh_snapshot() {
    let hub = TestHub::start().await;
    hub.create_env("dev").await;
    hub.create_cluster("dev-1", "dev").await;
    let mut stream = watch_env(&hub, "dev").await;
    let names = |e: &pb::StatusEvent| -> Vec<String> {
        e.clusters.iter().map(|c| c.name.clone()).collect()
    };
    let first = until_event(&mut stream, "the snapshot", |e| e.snapshot_complete).await;
    assert_eq!(names(&first), ["dev-1"]);
    // A watcher waiting on the environment's clusters learns of a new one.
    hub.create_cluster("dev-2", "dev").await;
    let fresh = until_event(&mut stream, "a fresh snapshot", |e| e.snapshot).await;
    assert!(fresh.snapshot_complete);
    assert_eq!(names(&fresh), ["dev-1", "dev-2"]);
    within(
        "delete dev-1",
        hub.admin().await.delete_cluster(pb::DeleteClusterRequest {
            name: "dev-1".into(),
        }),
    )
    .await
    .unwrap();
    let fresh = until_event(&mut stream, "a fresh snapshot", |e| e.snapshot).await;
    assert_eq!(names(&fresh), ["dev-2"]);
}

#[tokio::test]
#[ignore = "needs PostgreSQL (UNITSYNC_TEST_POSTGRES_URL)"]
async fn a_watch_hears_of_agents_and_clusters_on_other_replicas() {
    let url = unitsync_tests::hub::postgres_database().await;
    let a = TestHub::start_on_postgres(&url, None).await;
    let mut b = TestHub::start_on_postgres(&url, Some(&a)).await;
    a.create_env("dev").await;
    let token = a.create_cluster("dev-1", "dev").await;
    a.put("dev/web", &configmap("web", "1")).await.unwrap();
    let mut stream = watch_env(&a, "dev").await;
    until_event(&mut stream, "the snapshot", |e| e.snapshot_complete).await;
    // The agent talks to replica B, and reports Ready there: the watch
    // through A hears of it as it is recorded.
    let mut agent = SimAgent::new(&b.endpoint(), b.ca(), &token).auto_ready();
    agent.start();
    // Through A, dev-1's agent is connected (to B), and A's views say so.
    let dev1_connected = |connected: bool| {
        move |e: &pb::StatusEvent| {
            e.clusters
                .iter()
                .any(|c| c.name == "dev-1" && c.connected == connected)
        }
    };
    let (mut ready, mut connected) = (false, false);
    until_event(
        &mut stream,
        "dev-1 connected and Ready at 1, through A",
        |e| {
            ready |= e.cells.iter().any(|c| {
                c.cluster == "dev-1" && c.revision == 1 && c.phase == i32::from(pb::Phase::Ready)
            });
            connected |= dev1_connected(true)(e);
            ready && connected
        },
    )
    .await;
    let listed = a
        .admin()
        .await
        .list_clusters(pb::ListClustersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .clusters;
    assert!(
        listed.iter().any(|c| c.name == "dev-1" && c.connected),
        "{listed:?}"
    );
    // A cluster created through B: the watch through A starts over with it.
    b.create_cluster("dev-2", "dev").await;
    until_event(&mut stream, "a fresh snapshot with dev-2", |e| {
        e.snapshot && e.clusters.iter().any(|c| c.name == "dev-2")
    })
    .await;
    // The agent goes, comes back, and its replica stops: A hears each.
    agent.stop().await;
    until_event(&mut stream, "dev-1 gone, through A", dev1_connected(false)).await;
    agent.start();
    until_event(&mut stream, "dev-1 back, through A", dev1_connected(true)).await;
    b.stop().await;
    until_event(
        &mut stream,
        "dev-1's replica stopped",
        dev1_connected(false),
    )
    .await;
    agent.stop().await;
}
