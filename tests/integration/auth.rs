//! Credentials: operator and agent tokens, uniform refusals, revocation.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::Code;
use unitsync_agent::hub_client::SessionError;
use unitsync_proto::v1 as pb;
use unitsync_tests::{SimAgent, TestHub, configmap, within};

fn refusal(r: Result<(), SessionError>) -> tonic::Status {
    match r {
        Err(SessionError::Refused(s)) => s,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn bad_unknown_and_deleted_credentials_are_refused_identically() {
    let hub = TestHub::start().await;
    hub.create_env("dev").await;
    let token = hub.create_cluster("dev-1", "dev").await;
    let deleted = hub.create_cluster("dev-2", "dev").await;
    hub.admin()
        .await
        .delete_cluster(pb::DeleteClusterRequest {
            name: "dev-2".into(),
        })
        .await
        .unwrap();

    let stop = CancellationToken::new();
    let mut messages = Vec::new();
    for t in [
        "",
        "garbage",
        "usk_agent_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        &deleted,
        &hub.admin_token,
    ] {
        let agent = SimAgent::new(&hub.endpoint(), hub.ca(), t);
        let s = refusal(within("session", agent.session_once(&stop)).await);
        messages.push((s.code(), s.message().to_owned()));
    }
    for m in &messages[..4] {
        assert_eq!(
            m,
            &(Code::Unauthenticated, "authentication failed".to_owned())
        );
    }
    // An operator credential is not an agent credential.
    assert_eq!(
        messages[4],
        (Code::PermissionDenied, "permission denied".to_owned())
    );
    // The token itself never appears in an error.
    assert!(
        messages
            .iter()
            .all(|(_, m)| !m.contains(&token) && !m.contains(&deleted))
    );

    // The operator API refuses agent tokens and unknown tokens alike.
    let e = hub
        .client(&token)
        .await
        .list_units(pb::ListUnitsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (Code::PermissionDenied, "permission denied")
    );
    let e = hub
        .client("usk_op_nope")
        .await
        .list_units(pb::ListUnitsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (Code::Unauthenticated, "authentication failed")
    );
}

#[tokio::test]
async fn deleting_a_cluster_ends_its_live_session_and_refuses_it_afterwards() {
    let hub = TestHub::start().await;
    hub.create_env("dev").await;
    let token = hub.create_cluster("dev-1", "dev").await;
    hub.put("dev/web", &configmap("web", "1")).await.unwrap();
    let agent = SimAgent::new(&hub.endpoint(), hub.ca(), &token);
    let stop = CancellationToken::new();
    let session = agent.session_once(&stop);
    tokio::pin!(session);
    // Connected and holding the unit.
    let connected = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            tokio::select! {
                r = &mut session => panic!("session ended early: {r:?}"),
                () = tokio::time::sleep(Duration::from_millis(20)) => {
                    if agent.held().contains_key("web") { return; }
                }
            }
        }
    })
    .await;
    assert!(connected.is_ok(), "agent received its unit");
    hub.admin()
        .await
        .delete_cluster(pb::DeleteClusterRequest {
            name: "dev-1".into(),
        })
        .await
        .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), &mut session).await;
    assert!(
        ended.is_ok(),
        "the live session ends within 5 s of the deletion"
    );
    assert!(ended.unwrap().is_err());
    let s = refusal(within("reconnect", agent.session_once(&stop)).await);
    assert_eq!(s.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn operator_writes_are_audited_with_the_actor() {
    let hub = TestHub::start().await;
    hub.create_env("dev").await;
    let _ = hub.create_cluster("dev-1", "dev").await;
    hub.put("dev/web", &configmap("web", "1")).await.unwrap();
    hub.put("dev/web", &configmap("web", "2")).await.unwrap();
    hub.destroy("dev/web").await.unwrap();
    let entries = hub
        .admin()
        .await
        .list_audit(pb::ListAuditRequest {
            limit: 100,
            target_prefix: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let actions: Vec<(&str, &str, &str)> = entries
        .iter()
        .rev()
        .map(|e| (e.actor.as_str(), e.action.as_str(), e.target.as_str()))
        .collect();
    assert_eq!(
        actions,
        [
            ("operator:admin", "environment.create", "env/dev"),
            ("operator:admin", "cluster.create", "cluster/dev-1"),
            ("operator:admin", "unit.create", "dev/web"),
            ("operator:admin", "unit.update", "dev/web"),
            ("operator:admin", "unit.destroy", "dev/web"),
        ]
    );
    // Tokens are never in the audit log.
    assert!(entries.iter().all(|e| !e.detail.contains("usk_")));
}

#[tokio::test]
async fn the_admin_token_file_is_private_and_tokens_are_stored_hashed() {
    use std::os::unix::fs::PermissionsExt;
    let hub = TestHub::start().await;
    hub.create_env("dev").await;
    let token = hub.create_cluster("dev-1", "dev").await;
    let path = hub.dir.path().join("data").join("admin.token");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // Neither token is in the database file in clear.
    let db = std::fs::read(hub.db_path()).unwrap();
    let wal = std::fs::read(hub.db_path().with_extension("db-wal")).unwrap_or_default();
    for t in [&token, &hub.admin_token] {
        let needle = t.as_bytes();
        assert!(!db.windows(needle.len()).any(|w| w == needle));
        assert!(!wal.windows(needle.len()).any(|w| w == needle));
    }
}

#[tokio::test]
async fn the_hub_speaks_tls_by_default_and_clients_verify_it() {
    let hub = TestHub::start().await;
    hub.create_env("dev").await;
    let token = hub.create_cluster("dev-1", "dev").await;
    let stop = CancellationToken::new();
    // The hub's own CA: accepted.
    let mut ok = SimAgent::new(&hub.endpoint(), hub.ca(), &token);
    ok.start();
    // Without the CA (public roots only) the certificate is not trusted.
    let untrusting = SimAgent::new(&hub.endpoint(), None, &token);
    let r = within("untrusted", untrusting.session_once(&stop)).await;
    assert!(matches!(r, Err(SessionError::Connect(_))), "{r:?}");
    // Plaintext to the TLS port gets nowhere either.
    let plain = SimAgent::new(&hub.endpoint().replace("https://", "http://"), None, &token);
    assert!(
        within("plaintext", plain.session_once(&stop))
            .await
            .is_err()
    );
    // Another CA: refused.
    let other = TestHub::start().await;
    let wrong = SimAgent::new(&hub.endpoint(), other.ca(), &token);
    assert!(matches!(
        within("other CA", wrong.session_once(&stop)).await,
        Err(SessionError::Connect(_))
    ));
    ok.stop().await;
    // The CA is stored with the data and reused after a restart.
    let ca = std::fs::read_to_string(hub.dir.path().join("data").join("ca.crt")).unwrap();
    assert_eq!(Some(ca.as_str()), hub.ca());
}
