//! The agent stream at the wire level: handshake rules, and what an agent
//! may and may not acknowledge or report.

use tokio_stream::StreamExt;
use tonic::Code;
use unitsync_proto::v1 as pb;
use unitsync_proto::v1::agent_message::Msg as AgentMsg;
use unitsync_proto::v1::hub_message::Msg as HubMsg;
use unitsync_tests::{TestHub, configmap, within};

type Outbound = tokio::sync::mpsc::Sender<pb::AgentMessage>;

/// Opens a raw session; the first message is sent as given.
pub(crate) async fn raw_session(
    hub: &TestHub,
    token: &str,
    first: pb::AgentMessage,
) -> Result<(Outbound, tonic::Streaming<pb::HubMessage>), tonic::Status> {
    let mut client = pb::agent_service_client::AgentServiceClient::new(hub.channel().await);
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(first).await.unwrap();
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let inbound = within("open session", client.session(req))
        .await?
        .into_inner();
    Ok((tx, inbound))
}

pub(crate) fn hello(version: u32) -> pb::AgentMessage {
    pb::AgentMessage {
        msg: Some(AgentMsg::Hello(pb::Hello {
            protocol_version: version,
            agent_version: "raw".into(),
            units: vec![],
        })),
    }
}

/// Next message that is not a heartbeat.
pub(crate) async fn next(inbound: &mut tonic::Streaming<pb::HubMessage>) -> HubMsg {
    loop {
        let m = within("next hub message", inbound.next())
            .await
            .expect("stream open")
            .expect("no error")
            .msg
            .expect("message");
        if !matches!(m, HubMsg::Heartbeat(_)) {
            return m;
        }
    }
}

/// Reads a session until it ends; its final status (OK when the stream
/// ended without one).
pub(crate) async fn final_status(inbound: &mut tonic::Streaming<pb::HubMessage>) -> tonic::Status {
    loop {
        match within("the session ends", inbound.message()).await {
            Ok(Some(_)) => continue,
            Ok(None) => return tonic::Status::ok(""),
            Err(status) => return status,
        }
    }
}

/// The next message of an idle session, which must be a heartbeat: when
/// the hub sent it (by its own clock).
pub(crate) async fn next_heartbeat(
    inbound: &mut tonic::Streaming<pb::HubMessage>,
) -> std::time::SystemTime {
    let m = within("a hub heartbeat", inbound.message())
        .await
        .expect("no error")
        .expect("the session stays open");
    let Some(HubMsg::Heartbeat(beat)) = m.msg else {
        panic!("only heartbeats while idle: {m:?}");
    };
    std::time::SystemTime::try_from(beat.sent_at.expect("sent_at")).unwrap()
}

/// Whether the hub holds a live session of `cluster` (read from its
/// registry: no store involved).
pub(crate) fn has_session(hub: &TestHub, cluster: &str) -> bool {
    hub.running()
        .hub
        .fanout
        .session(&cluster.parse().unwrap())
        .is_some()
}

/// Sends the agent's heartbeat every 100 ms until aborted or the stream
/// is gone.
pub(crate) fn keep_beating(tx: Outbound) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let beat = pb::AgentMessage {
                msg: Some(AgentMsg::Heartbeat(pb::Heartbeat::default())),
            };
            if tx.send(beat).await.is_err() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
}

#[tokio::test]
async fn unsupported_protocol_versions_are_refused_with_a_clear_message() {
    let hub = TestHub::start().await;
    hub.create_env("dev").await;
    let token = hub.create_cluster("dev-1", "dev").await;
    for v in [0, 2, 99] {
        let e = raw_session(&hub, &token, hello(v)).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{v}");
        assert!(
            e.message()
                .contains(&format!("unsupported protocol version {v}"))
                && e.message().contains("speaks versions 1 to 1"),
            "{}",
            e.message()
        );
    }
    // A session must start with Hello.
    let ack = pb::AgentMessage {
        msg: Some(AgentMsg::Ack(pb::Ack {
            unit: "x".into(),
            revision: 1,
        })),
    };
    let e = raw_session(&hub, &token, ack).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message()
            .contains("first message of a session must be Hello")
    );
}

#[tokio::test]
async fn welcome_then_resync_updates() {
    let hub = TestHub::start().await;
    hub.create_env("dev").await;
    let token = hub.create_cluster("dev-1", "dev").await;
    hub.put("dev/web", &configmap("web", "1")).await.unwrap();
    let (_tx, mut inbound) = raw_session(&hub, &token, hello(1)).await.unwrap();
    let HubMsg::Welcome(w) = next(&mut inbound).await else {
        panic!("expected Welcome")
    };
    assert_eq!(
        (w.cluster.as_str(), w.environment.as_str(), w.resync_updates),
        ("dev-1", "dev", 1)
    );
    let HubMsg::Update(u) = next(&mut inbound).await else {
        panic!("expected Update")
    };
    assert_eq!(
        (u.unit.as_str(), u.revision, u.tombstone),
        ("web", 1, false)
    );
    assert_eq!(u.digest.len(), 64);
    assert!(u.committed_at.is_some());
}

#[tokio::test]
async fn acks_and_statuses_for_units_that_are_not_yours_read_like_missing_ones() {
    let hub = TestHub::start().await;
    hub.create_env("dev").await;
    hub.create_env("prod").await;
    let token = hub.create_cluster("dev-1", "dev").await;
    hub.put("prod/secret-app", &configmap("secret-app", "1"))
        .await
        .unwrap();
    let (tx, mut inbound) = raw_session(&hub, &token, hello(1)).await.unwrap();
    let HubMsg::Welcome(w) = next(&mut inbound).await else {
        panic!("expected Welcome")
    };
    assert_eq!(
        w.resync_updates, 0,
        "another environment's unit is never offered"
    );

    let mut notices = Vec::new();
    for unit in ["secret-app", "no-such-app"] {
        tx.send(pb::AgentMessage {
            msg: Some(AgentMsg::Ack(pb::Ack {
                unit: unit.into(),
                revision: 1,
            })),
        })
        .await
        .unwrap();
        let HubMsg::Notice(n) = next(&mut inbound).await else {
            panic!("expected Notice")
        };
        notices.push(n.message.replace(unit, "UNIT"));
        tx.send(pb::AgentMessage {
            msg: Some(AgentMsg::Status(pb::StatusReport {
                unit: unit.into(),
                revision: 1,
                phase: pb::Phase::Ready.into(),
                ..Default::default()
            })),
        })
        .await
        .unwrap();
        let HubMsg::Notice(n) = next(&mut inbound).await else {
            panic!("expected Notice")
        };
        notices.push(n.message.replace(unit, "UNIT"));
    }
    assert_eq!(notices[0], notices[2], "ack: not yours == does not exist");
    assert_eq!(
        notices[1], notices[3],
        "status: not yours == does not exist"
    );
    // Nothing was recorded for the other environment's unit.
    let detail = hub.unit("prod/secret-app").await.unwrap();
    assert!(detail.clusters.is_empty());
}

#[tokio::test]
async fn sessions_beyond_the_limit_are_shed_with_resource_exhausted() {
    let hub = TestHub::start_with(unitsync_hub::control::Tuning {
        max_sessions: 1,
        ..Default::default()
    })
    .await;
    hub.create_env("dev").await;
    let a = hub.create_cluster("dev-1", "dev").await;
    let b = hub.create_cluster("dev-2", "dev").await;
    let (_tx, mut first) = raw_session(&hub, &a, hello(1)).await.unwrap();
    assert!(matches!(next(&mut first).await, HubMsg::Welcome(_)));
    let e = raw_session(&hub, &b, hello(1)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(e.message().contains("session limit"), "{}", e.message());
}

#[tokio::test]
async fn the_hub_beats_while_idle_keeps_a_talking_agent_and_ends_a_silent_one() {
    let hub = TestHub::start_with(unitsync_hub::control::Tuning {
        heartbeat: std::time::Duration::from_millis(300),
        ..Default::default()
    })
    .await;
    hub.create_env("dev").await;
    let token = hub.create_cluster("dev-1", "dev").await;

    // An agent that beats every 100 ms: heard, so kept past three
    // heartbeat windows (by the hub's own clock); the idle hub beats to it
    // meanwhile.
    let (tx, mut inbound) = raw_session(&hub, &token, hello(1)).await.unwrap();
    assert!(matches!(next(&mut inbound).await, HubMsg::Welcome(_)));
    // Kept open (an agent that stops talking, not one that hangs up).
    let _open = tx.clone();
    let beats = keep_beating(tx);
    let silence = std::time::Duration::from_millis(3 * 300);
    let mut first = None;
    loop {
        let at = next_heartbeat(&mut inbound).await;
        let first = *first.get_or_insert(at);
        if at.duration_since(first).unwrap_or_default() > silence {
            break;
        }
    }
    assert!(has_session(&hub, "dev-1"));
    beats.abort();

    // Silent from now on: ended after three heartbeat windows, and told.
    let ended = final_status(&mut inbound).await;
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    unitsync_tests::until("the silent session is gone", || async {
        !has_session(&hub, "dev-1")
    })
    .await;
}
