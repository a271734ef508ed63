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
    // (The exact messages above also mean no credential is ever echoed.)

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
    until_holding(session.as_mut(), &agent, "web").await;
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
    let mut hub = TestHub::start().await;
    hub.create_env("dev").await;
    let token = hub.create_cluster("dev-1", "dev").await;
    hub.put("dev/web", &configmap("web", "1")).await.unwrap();
    let stop = CancellationToken::new();
    // The hub's own CA: accepted.
    let mut ok = SimAgent::new(&hub.endpoint(), hub.ca(), &token);
    ok.start();
    unitsync_tests::until("the trusting agent holds its unit", || async {
        ok.held().contains_key("web")
    })
    .await;
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
    // The CA is stored with the data and reused after a restart, so agents
    // keep trusting the hub.
    let before = hub.ca().unwrap().to_owned();
    hub.restart().await;
    assert_eq!(hub.ca(), Some(before.as_str()));
    let mut again = SimAgent::new(&hub.endpoint(), Some(&before), &token);
    again.start();
    unitsync_tests::until("the same CA verifies the restarted hub", || async {
        again.held().contains_key("web")
    })
    .await;
    again.stop().await;
}

/// Refused at the TLS layer (the connection fails), not by the hub's
/// credential check (which answers Unauthenticated over a working stream).
fn rejected_by_tls(r: &Result<(), SessionError>) -> bool {
    match r {
        Err(SessionError::Connect(_) | SessionError::Stream(_)) => true,
        // With TLS 1.3 the client may send its request before the server
        // has judged its certificate: it then sees the alert, or the
        // connection closed under the request (Cancelled), by timing.
        Err(SessionError::Refused(s)) => matches!(
            s.code(),
            Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled
        ),
        _ => false,
    }
}

async fn issue_cert(hub: &TestHub, cluster: &str) -> pb::ClusterCertificate {
    within(
        "issue certificate",
        hub.admin()
            .await
            .issue_cluster_certificate(pb::IssueClusterCertificateRequest {
                name: cluster.into(),
                validity_seconds: 3600,
            }),
    )
    .await
    .unwrap()
    .into_inner()
}

#[tokio::test]
async fn mutual_tls_identity_comes_from_the_certificate_alone() {
    let hub = TestHub::start().await;
    hub.create_env("prod").await;
    hub.create_env("eu").await;
    let _ = hub.create_cluster("prod", "prod").await;
    let eu_token = hub.create_cluster("prod-eu", "eu").await;
    hub.put("prod/web", &configmap("web", "prod"))
        .await
        .unwrap();
    hub.put("eu/secret-app", &configmap("secret-app", "eu"))
        .await
        .unwrap();
    let cert = issue_cert(&hub, "prod").await;
    assert_eq!(cert.ca_pem.as_str(), hub.ca().unwrap());
    // Client certificates are short-lived: a year is refused, not shortened.
    let e = within(
        "year-long certificate",
        hub.admin()
            .await
            .issue_cluster_certificate(pb::IssueClusterCertificateRequest {
                name: "prod".into(),
                validity_seconds: 365 * 24 * 3600,
            }),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("at most 90 days"), "{}", e.message());
    // The certificate alone authenticates; even with another cluster's token
    // beside it, the certificate decides.
    let mut agent = SimAgent::new(&hub.endpoint(), hub.ca(), &eu_token)
        .with_identity(&cert.certificate_pem, &cert.private_key_pem);
    agent.start();
    unitsync_tests::until("prod's unit", || async { agent.held().contains_key("web") }).await;
    assert!(
        !agent.held().contains_key("secret-app"),
        "never another cluster's units"
    );
    agent.stop().await;
    // Without a token, the certificate is enough.
    let mut only_cert = SimAgent::new(&hub.endpoint(), hub.ca(), "")
        .with_identity(&cert.certificate_pem, &cert.private_key_pem);
    only_cert.start();
    unitsync_tests::until("connected by certificate", || async {
        only_cert.held().contains_key("web")
    })
    .await;
    only_cert.stop().await;

    // The operator API: a cluster's certificate is the cluster, whatever
    // operator token rides beside it.
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(hub.ca().unwrap()))
        .identity(tonic::transport::Identity::from_pem(
            &cert.certificate_pem,
            &cert.private_key_pem,
        ));
    let channel = within(
        "connect with a client certificate",
        tonic::transport::Channel::from_shared(hub.endpoint())
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect(),
    )
    .await
    .unwrap();
    let auth = unitsync_tests::hub::BearerAuth::new(&hub.admin_token).unwrap();
    let mut operator_api =
        pb::hub_service_client::HubServiceClient::with_interceptor(channel, auth);
    let e = within(
        "list units with a cluster certificate",
        operator_api.list_units(pb::ListUnitsRequest::default()),
    )
    .await
    .unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (Code::PermissionDenied, "permission denied")
    );
}

#[tokio::test]
async fn handshakes_without_a_valid_client_certificate_are_refused() {
    let hub = TestHub::start().await;
    hub.create_env("prod").await;
    let _ = hub.create_cluster("prod", "prod").await;
    let stop = CancellationToken::new();
    // No certificate and no token.
    let s = refusal(
        within(
            "nothing",
            SimAgent::new(&hub.endpoint(), hub.ca(), "").session_once(&stop),
        )
        .await,
    );
    assert_eq!(s.code(), Code::Unauthenticated);
    // A certificate from another hub's CA: the TLS handshake fails.
    let other = TestHub::start().await;
    other.create_env("prod").await;
    let _ = other.create_cluster("prod", "prod").await;
    let foreign = issue_cert(&other, "prod").await;
    let r = within(
        "foreign CA",
        SimAgent::new(&hub.endpoint(), hub.ca(), "")
            .with_identity(&foreign.certificate_pem, &foreign.private_key_pem)
            .session_once(&stop),
    )
    .await;
    assert!(rejected_by_tls(&r), "{r:?}");
    // An expired certificate from the right CA: refused in the handshake.
    let data = hub.dir.path().join("data");
    let ca = unitsync_hub::tls::HubCa::load(&data).unwrap().unwrap();
    let expired = ca
        .issue_client_cert(
            "prod",
            std::time::SystemTime::now() - Duration::from_secs(7200),
            Duration::from_secs(3600),
        )
        .unwrap();
    let r = within(
        "expired",
        SimAgent::new(&hub.endpoint(), hub.ca(), "")
            .with_identity(&expired.cert_pem, &expired.key_pem)
            .session_once(&stop),
    )
    .await;
    assert!(rejected_by_tls(&r), "{r:?}");
    // A valid certificate from the right CA that the hub never issued to a cluster.
    let stray = ca
        .issue_client_cert(
            "prod",
            std::time::SystemTime::now(),
            Duration::from_secs(3600),
        )
        .unwrap();
    let s = refusal(
        within(
            "unregistered",
            SimAgent::new(&hub.endpoint(), hub.ca(), "")
                .with_identity(&stray.cert_pem, &stray.key_pem)
                .session_once(&stop),
        )
        .await,
    );
    assert_eq!(
        (s.code(), s.message()),
        (Code::Unauthenticated, "authentication failed")
    );
}

#[tokio::test]
async fn a_revoked_cluster_is_cut_off_within_seconds_and_stays_refused_after_a_restart() {
    let mut hub = TestHub::start().await;
    hub.create_env("prod").await;
    let token = hub.create_cluster("prod", "prod").await;
    hub.put("prod/web", &configmap("web", "1")).await.unwrap();
    let cert = issue_cert(&hub, "prod").await;
    let agent = SimAgent::new(&hub.endpoint(), hub.ca(), "")
        .with_identity(&cert.certificate_pem, &cert.private_key_pem);
    let stop = CancellationToken::new();
    let session = agent.session_once(&stop);
    tokio::pin!(session);
    until_holding(session.as_mut(), &agent, "web").await;
    hub.admin()
        .await
        .revoke_cluster(pb::RevokeClusterRequest {
            name: "prod".into(),
        })
        .await
        .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), &mut session).await;
    assert!(
        ended.is_ok(),
        "the live session ends within 5 s of the revocation"
    );
    hub.restart().await;
    let by_cert = SimAgent::new(&hub.endpoint(), hub.ca(), "")
        .with_identity(&cert.certificate_pem, &cert.private_key_pem);
    assert_eq!(
        refusal(within("cert after restart", by_cert.session_once(&stop)).await).code(),
        Code::Unauthenticated
    );
    let by_token = SimAgent::new(&hub.endpoint(), hub.ca(), &token);
    assert_eq!(
        refusal(within("token after restart", by_token.session_once(&stop)).await).code(),
        Code::Unauthenticated
    );
    let audit = hub
        .admin()
        .await
        .list_audit(pb::ListAuditRequest {
            limit: 10,
            target_prefix: "cluster/prod".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert!(audit.iter().any(|e| e.action == "cluster.revoke"));
}

/// A credential revoked while its session's handshake waits for Hello
/// (authenticated, not yet registered where a revocation finds it) gets
/// no session and no unit.
#[tokio::test]
async fn a_credential_revoked_during_the_handshake_gets_no_session() {
    let hub = TestHub::start().await;
    hub.create_env("prod").await;
    let token = hub.create_cluster("prod", "prod").await;
    hub.put("prod/web", &configmap("web", "1")).await.unwrap();
    let mut client = pb::agent_service_client::AgentServiceClient::new(hub.channel().await);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let opening = tokio::spawn(async move { client.session(req).await });
    // The handshake authenticates at once, then waits for Hello; a request
    // in flight gives no signal for that, so give it a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    hub.admin()
        .await
        .revoke_cluster(pb::RevokeClusterRequest {
            name: "prod".into(),
        })
        .await
        .unwrap();
    tx.send(super::protocol::hello(1)).await.unwrap();
    match within("the handshake ends", opening).await.unwrap() {
        Err(status) => assert_eq!(status.code(), Code::Unauthenticated, "{status:?}"),
        Ok(response) => {
            let mut inbound = response.into_inner();
            let mut got = Vec::new();
            while let Ok(Ok(Some(m))) =
                tokio::time::timeout(Duration::from_secs(1), inbound.message()).await
            {
                got.push(m);
            }
            panic!("a session for a revoked credential: {got:?}");
        }
    }
}

#[tokio::test]
async fn read_only_operators_can_look_but_not_change() {
    let hub = TestHub::start().await;
    hub.create_env("dev").await;
    hub.put("dev/web", &configmap("web", "1")).await.unwrap();
    let token = hub.create_operator("viewer", "read-only").await;
    let mut viewer = hub.client(&token).await;
    assert_eq!(
        viewer
            .list_units(pb::ListUnitsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .units
            .len(),
        1
    );
    assert!(
        viewer
            .get_status(pb::GetStatusRequest::default())
            .await
            .is_ok()
    );
    let e = viewer
        .put_unit(pb::PutUnitRequest {
            unit: "dev/web".into(),
            manifests: configmap("web", "2"),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (Code::PermissionDenied, "permission denied")
    );
    let e = viewer
        .create_operator(pb::CreateOperatorRequest {
            name: "x".into(),
            role: "admin".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = viewer
        .promote(pb::PromoteRequest {
            from: "dev".into(),
            to: "dev".into(),
            all: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn certificates_rotate_before_expiry_without_losing_an_update() {
    let mut hub = TestHub::start().await;
    hub.create_env("prod").await;
    let _ = hub.create_cluster("prod", "prod").await;
    // A certificate that expires in 3 s; renewals of 3 s each.
    let cert = within(
        "short certificate",
        hub.admin()
            .await
            .issue_cluster_certificate(pb::IssueClusterCertificateRequest {
                name: "prod".into(),
                validity_seconds: 3,
            }),
    )
    .await
    .unwrap()
    .into_inner();
    let mut agent = SimAgent::new(&hub.endpoint(), hub.ca(), "")
        .with_identity(&cert.certificate_pem, &cert.private_key_pem)
        .with_renewal(Duration::from_secs(5));
    agent.start();
    // Updates keep flowing across several renewals: each one arrives before
    // the next, and the 500 ms pauses make the run outlast several 3 s
    // certificates.
    for i in 1..=12u64 {
        hub.put("prod/web", &configmap("web", &i.to_string()))
            .await
            .unwrap();
        unitsync_tests::until(&format!("update {i} delivered"), || async {
            agent.held().get("web") == Some(&(i, false))
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The installed certificate has expired: a new connection only works
    // with a renewed one.
    hub.restart().await;
    hub.put("prod/web", &configmap("web", "13")).await.unwrap();
    unitsync_tests::until(
        "delivered after reconnecting with a renewed certificate",
        || async { agent.held().get("web") == Some(&(13, false)) },
    )
    .await;
    agent.stop().await;
    let audit = hub
        .admin()
        .await
        .list_audit(pb::ListAuditRequest {
            limit: 100,
            target_prefix: "cluster/prod".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let renewals = audit
        .iter()
        .filter(|e| e.action == "cluster.certificate.renew" && e.actor == "agent:prod")
        .count();
    assert!(renewals >= 2, "{renewals} renewals");
}

#[tokio::test]
async fn live_sessions_recheck_their_credential() {
    let hub = TestHub::start_with(recheck_often()).await;
    a_revocation_in_the_store_ends_only_that_session(&hub).await;
}

#[tokio::test]
#[ignore = "needs PostgreSQL (UNITSYNC_TEST_POSTGRES_URL)"]
async fn live_sessions_recheck_their_credential_on_postgres() {
    let url = unitsync_tests::hub::postgres_database().await;
    let hub = TestHub::start_on_postgres_with(&url, None, recheck_often()).await;
    a_revocation_in_the_store_ends_only_that_session(&hub).await;
}

fn recheck_often() -> unitsync_hub::control::Tuning {
    unitsync_hub::control::Tuning {
        credential_recheck: Duration::from_millis(200),
        ..Default::default()
    }
}

/// A revocation recorded by another hub replica (here: straight in the
/// store, without this hub's disconnect) ends the session at the next
/// re-check of the fleet's credentials; the other session, checked in the
/// same batch, stays.
async fn a_revocation_in_the_store_ends_only_that_session(hub: &TestHub) {
    hub.create_env("prod").await;
    let token = hub.create_cluster("prod", "prod").await;
    let kept = hub.create_cluster("prod-2", "prod").await;
    hub.put("prod/web", &configmap("web", "1")).await.unwrap();
    let agent = SimAgent::new(&hub.endpoint(), hub.ca(), &token);
    let other = SimAgent::new(&hub.endpoint(), hub.ca(), &kept);
    let stop = CancellationToken::new();
    let session = agent.session_once(&stop);
    tokio::pin!(session);
    let other_session = other.session_once(&stop);
    tokio::pin!(other_session);
    until_holding(session.as_mut(), &agent, "web").await;
    until_holding(other_session.as_mut(), &other, "web").await;
    let audit = unitsync_hub::model::NewAudit {
        actor: unitsync_hub::model::Actor::Hub,
        action: "cluster.revoke",
        target: "cluster/prod".into(),
        detail: "by another replica".into(),
    };
    hub.running()
        .hub
        .store
        .revoke_cluster(&"prod".parse().unwrap(), audit)
        .await
        .unwrap();
    let ended = tokio::select! {
        ended = tokio::time::timeout(Duration::from_secs(5), &mut session) => ended,
        r = &mut other_session => panic!("the other session ended: {r:?}"),
    };
    let status = match ended.expect("the session noticed the revocation") {
        Err(SessionError::Refused(s) | SessionError::Stream(s)) => s,
        other => panic!("expected the hub to end the session, got {other:?}"),
    };
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(
        hub.running()
            .hub
            .fanout
            .session(&"prod-2".parse().unwrap())
            .is_some(),
        "the session whose credential stands is still registered"
    );
    stop.cancel();
}

/// A revocation through one replica ends the agent's session on another at
/// once (announced), not at that replica's next periodic re-check (30 s).
#[tokio::test]
#[ignore = "needs PostgreSQL (UNITSYNC_TEST_POSTGRES_URL)"]
async fn a_revocation_through_another_replica_ends_the_session_at_once() {
    let url = unitsync_tests::hub::postgres_database().await;
    let a = TestHub::start_on_postgres(&url, None).await;
    let b = TestHub::start_on_postgres(&url, Some(&a)).await;
    a.create_env("prod").await;
    let token = a.create_cluster("prod", "prod").await;
    a.put("prod/web", &configmap("web", "1")).await.unwrap();
    let agent = SimAgent::new(&b.endpoint(), b.ca(), &token);
    let stop = CancellationToken::new();
    let session = agent.session_once(&stop);
    tokio::pin!(session);
    until_holding(session.as_mut(), &agent, "web").await;
    within(
        "revoke through a",
        a.admin().await.revoke_cluster(pb::RevokeClusterRequest {
            name: "prod".into(),
        }),
    )
    .await
    .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), &mut session)
        .await
        .expect("the session on b ends at once, not at b's next re-check");
    match ended {
        Err(SessionError::Refused(s) | SessionError::Stream(s)) => {
            assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
        }
        other => panic!("expected the hub to end the session, got {other:?}"),
    }
    stop.cancel();
}

/// Drives a live session until the agent holds `unit`; fails if the session
/// ends first.
async fn until_holding<F>(mut session: std::pin::Pin<&mut F>, agent: &SimAgent, unit: &str)
where
    F: Future<Output = Result<(), SessionError>>,
{
    within("the agent receives its unit", async {
        loop {
            tokio::select! {
                r = session.as_mut() => panic!("session ended early: {r:?}"),
                () = tokio::time::sleep(Duration::from_millis(20)) => {
                    if agent.held().contains_key(unit) {
                        return;
                    }
                }
            }
        }
    })
    .await;
}
