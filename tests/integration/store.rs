//! The `Store` contract, written once against the trait so every
//! implementation (SQLite, and PostgreSQL when `UNITSYNC_TEST_POSTGRES_URL` is
//! set) runs the same checks.

use std::sync::Arc;

use unitsync_hub::model::{
    Actor, Digest, EnvName, EnvPolicy, NewAudit, NewRevision, Phase, PromotedUnit, PutMode,
    RevisionNum, StatusReport, UnitRef, UnixMillis,
};
use unitsync_hub::store::{Ack, NewPromotion, Page, SqlStore, Store, StoreError, TokenHash};

fn audit(action: &'static str, target: &str) -> NewAudit {
    NewAudit {
        actor: Actor::Operator("tester".into()),
        action,
        target: target.into(),
        detail: String::new(),
    }
}

fn rev(unit: &str, text: &str, mode: PutMode) -> NewRevision {
    NewRevision {
        mode,
        ..NewRevision::content(
            unit.parse().unwrap(),
            Arc::from(text),
            1,
            Digest::of(text.as_bytes()),
            Actor::Operator("tester".into()),
            "test",
            "",
        )
    }
}

fn env(s: &str) -> EnvName {
    s.parse().unwrap()
}

/// Runs the whole contract against a fresh store.
async fn contract(store: Arc<dyn Store>) {
    // Environments keep their order, inserts included.
    store
        .create_environment(
            &env("dev"),
            None,
            EnvPolicy::default(),
            audit("environment.create", "env/dev"),
        )
        .await
        .unwrap();
    store
        .create_environment(
            &env("prod"),
            None,
            EnvPolicy::default(),
            audit("environment.create", "env/prod"),
        )
        .await
        .unwrap();
    store
        .create_environment(
            &env("staging"),
            Some(&env("dev")),
            EnvPolicy::default(),
            audit("environment.create", "env/staging"),
        )
        .await
        .unwrap();
    let order: Vec<String> = store
        .list_environments()
        .await
        .unwrap()
        .iter()
        .map(|e| e.name.to_string())
        .collect();
    assert_eq!(order, ["dev", "staging", "prod"]);
    assert!(matches!(
        store
            .create_environment(
                &env("dev"),
                None,
                EnvPolicy::default(),
                audit("environment.create", "env/dev")
            )
            .await,
        Err(StoreError::AlreadyExists(_))
    ));
    let policy = EnvPolicy {
        required_approvals: 2,
        soak_seconds: 60,
        auto_promote: true,
    };
    assert_eq!(
        store
            .set_environment_policy(
                &env("prod"),
                policy,
                audit("environment.policy", "env/prod")
            )
            .await
            .unwrap()
            .policy,
        policy
    );

    // Revisions are numbered per unit; modes are enforced.
    let r1 = store
        .commit_revision(rev("dev/web", "a", PutMode::Create))
        .await
        .unwrap();
    let r2 = store
        .commit_revision(rev("dev/web", "b", PutMode::Update))
        .await
        .unwrap();
    assert_eq!((r1.number, r2.number), (RevisionNum(1), RevisionNum(2)));
    assert!(matches!(
        store
            .commit_revision(rev("dev/web", "c", PutMode::Create))
            .await,
        Err(StoreError::AlreadyExists(_))
    ));
    assert!(matches!(
        store
            .commit_revision(rev("dev/nope", "c", PutMode::Update))
            .await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(
        &*store
            .get_revision(&"dev/web".parse().unwrap(), RevisionNum(1))
            .await
            .unwrap()
            .unwrap()
            .manifests,
        "a"
    );

    // Commits that arrive together (committed as a group) are answered one
    // by one: each valid one gets its own number, a failing one its own
    // error, and a failing release set commits nothing of itself only.
    let puts = (0..16).map(|i| {
        store.commit_revision(rev(
            "dev/together",
            &format!("v{i}"),
            PutMode::CreateOrUpdate,
        ))
    });
    let missing = store.commit_revision(rev("dev/absent", "x", PutMode::Update));
    let stale = store.commit_revision(NewRevision {
        expected_head: Some(RevisionNum(1)),
        ..rev("dev/web", "stale", PutMode::Update)
    });
    let half = store.commit_release(
        vec![
            rev("dev/half-a", "x", PutMode::Create),
            rev("dev/web", "dup", PutMode::Create),
        ],
        None,
    );
    let (puts, missing, stale, half) =
        tokio::join!(futures::future::join_all(puts), missing, stale, half);
    let mut numbers: Vec<u64> = puts.into_iter().map(|r| r.unwrap().number.0).collect();
    numbers.sort_unstable();
    assert_eq!(numbers, (1..=16).collect::<Vec<u64>>());
    let history = store
        .history(&"dev/together".parse().unwrap())
        .await
        .unwrap();
    assert_eq!(history.len(), 16);
    assert!(
        matches!(missing, Err(StoreError::NotFound(_))),
        "{missing:?}"
    );
    assert!(
        matches!(&stale, Err(StoreError::Conflict(m)) if m.contains("changed concurrently")),
        "{stale:?}"
    );
    assert!(
        matches!(half, Err(StoreError::AlreadyExists(_))),
        "{half:?}"
    );
    assert!(
        store
            .get_unit(&"dev/half-a".parse().unwrap())
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        store
            .get_unit(&"dev/absent".parse().unwrap())
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        store
            .get_unit(&"dev/web".parse().unwrap())
            .await
            .unwrap()
            .unwrap()
            .head,
        RevisionNum(2),
        "the stale and the duplicate commit changed nothing"
    );
    let together = store.list_audit(100, "dev/together").await.unwrap();
    assert_eq!(together.len(), 16, "one audit entry per committed revision");

    // A release set is atomic: a failing member commits nothing.
    let before = store.list_units(None).await.unwrap().len();
    let set = vec![
        rev("staging/a", "x", PutMode::Create),
        rev("staging/b", "y", PutMode::Update),
    ];
    assert!(store.commit_release(set, None).await.is_err());
    assert_eq!(
        store.list_units(None).await.unwrap().len(),
        before,
        "nothing of the failed set was committed"
    );
    let promotion = NewPromotion {
        actor: Actor::Operator("tester".into()),
        from: env("dev"),
        to: env("staging"),
        automatic: false,
        forced: false,
        reason: String::new(),
        items: vec![PromotedUnit {
            source_unit: "dev/web".into(),
            source_revision: 2,
            target_unit: "staging/web".into(),
            target_revision: 0,
            previous_revision: 0,
        }],
    };
    let mut promoted = rev("staging/web", "b", PutMode::CreateOrUpdate);
    promoted.source_revision = RevisionNum(2);
    promoted.upstream = Some("dev/web".parse().unwrap());
    let (revs, id) = store
        .commit_release(vec![promoted], Some(promotion))
        .await
        .unwrap();
    let p = store.get_promotion(id.unwrap()).await.unwrap().unwrap();
    assert_eq!(
        (p.items[0].target_revision, revs[0].source_revision),
        (1, RevisionNum(2))
    );
    let staging: UnitRef = "staging/web".parse().unwrap();
    let unit = store.get_unit(&staging).await.unwrap().unwrap();
    assert_eq!(
        (unit.upstream.map(|u| u.to_string()), unit.head_source),
        (Some("dev/web".to_owned()), RevisionNum(2))
    );

    // Clusters and credentials.
    let c = "dev-1".parse().unwrap();
    store
        .create_cluster(
            &c,
            &env("dev"),
            &Default::default(),
            &TokenHash("h1".into()),
            audit("cluster.create", "cluster/dev-1"),
        )
        .await
        .unwrap();
    assert!(
        store
            .cluster_by_token(&TokenHash("h1".into()))
            .await
            .unwrap()
            .is_some()
    );
    store
        .set_cluster_token(
            &c,
            &TokenHash("h2".into()),
            audit("cluster.token", "cluster/dev-1"),
        )
        .await
        .unwrap();
    assert!(
        store
            .cluster_by_token(&TokenHash("h1".into()))
            .await
            .unwrap()
            .is_none()
    );
    store
        .add_cluster_cert(
            &c,
            "fp",
            UnixMillis(i64::MAX),
            audit("cluster.certificate", "cluster/dev-1"),
        )
        .await
        .unwrap();
    assert!(store.cluster_by_cert("fp").await.unwrap().is_some());

    // Acks never go backwards; Ready keeps its start time while it lasts.
    let web: UnitRef = "dev/web".parse().unwrap();
    store
        .record_acks(&[Ack {
            cluster: c.clone(),
            unit: web.clone(),
            revision: RevisionNum(2),
        }])
        .await
        .unwrap();
    store
        .record_acks(&[Ack {
            cluster: c.clone(),
            unit: web.clone(),
            revision: RevisionNum(1),
        }])
        .await
        .unwrap();
    let report = |phase, at| StatusReport {
        cluster: c.clone(),
        unit: web.clone(),
        revision: RevisionNum(2),
        phase,
        message: String::new(),
        resources: vec![],
        observed_at: UnixMillis(at),
    };
    let record = |phase, at| {
        let (store, r) = (&store, report(phase, at));
        async move { store.record_statuses(&[r]).await.unwrap() }
    };
    let read_cell = || async {
        store
            .statuses(Some(&env("dev")), Some(&web), &Page::ALL)
            .await
            .unwrap()
            .pop()
            .unwrap()
    };
    record(Phase::Ready, 1_000).await;
    record(Phase::Ready, 2_000).await;
    let cell = read_cell().await;
    assert_eq!(
        (cell.status.acked, cell.status.ready_since),
        (RevisionNum(2), UnixMillis(1_000))
    );
    record(Phase::Progressing, 3_000).await;
    record(Phase::Ready, 4_000).await;
    let cell = read_cell().await;
    assert_eq!(
        cell.status.ready_since,
        UnixMillis(4_000),
        "Ready again starts the soak over"
    );
    // A report older than the one recorded (a late flush of the replica
    // the agent left) changes nothing: of one revision the later wins, and
    // a lower revision never replaces a higher one.
    record(Phase::Degraded, 3_500).await;
    let cell = read_cell().await;
    assert_eq!(
        (cell.status.phase, cell.status.updated_at),
        (Phase::Ready, UnixMillis(4_000))
    );
    store
        .record_statuses(&[StatusReport {
            revision: RevisionNum(1),
            ..report(Phase::Failed, 9_000)
        }])
        .await
        .unwrap();
    let cell = read_cell().await;
    assert_eq!(
        (cell.status.revision, cell.status.phase),
        (RevisionNum(2), Phase::Ready)
    );

    // Per cluster: its cells, and its units counted by phase (a report of
    // an older revision than the head counts as not there yet).
    store
        .record_statuses(&[StatusReport {
            unit: "dev/together".parse().unwrap(),
            revision: RevisionNum(3),
            ..report(Phase::Ready, 5_000)
        }])
        .await
        .unwrap();
    let units: Vec<String> = store
        .cluster_statuses(&c)
        .await
        .unwrap()
        .iter()
        .map(|cell| format!("{}@{}", cell.unit, cell.status.revision))
        .collect();
    assert_eq!(units, ["dev/together@3", "dev/web@2"]);
    let counts = store.phase_counts(None).await.unwrap();
    assert_eq!(
        counts,
        [(c.clone(), Phase::Ready, 1), (c.clone(), Phase::Unknown, 1)]
    );
    assert!(
        store
            .phase_counts(Some(&env("prod")))
            .await
            .unwrap()
            .is_empty()
    );
    let by_unit = store.unit_phase_counts(Some(&env("dev"))).await.unwrap();
    assert_eq!(
        by_unit,
        [
            ("dev/together".parse().unwrap(), None, 1),
            (web.clone(), Some(Phase::Ready), 1)
        ]
    );

    // Approvals: one per operator.
    let n = store
        .approve(
            &env("prod"),
            &web,
            RevisionNum(2),
            "alice",
            audit("promotion.approve", "dev/web"),
        )
        .await
        .unwrap();
    assert_eq!(n, ["alice"]);
    assert!(matches!(
        store
            .approve(
                &env("prod"),
                &web,
                RevisionNum(2),
                "alice",
                audit("promotion.approve", "dev/web")
            )
            .await,
        Err(StoreError::AlreadyExists(_))
    ));

    // Revocation and deletion.
    store
        .revoke_cluster(&c, audit("cluster.revoke", "cluster/dev-1"))
        .await
        .unwrap();
    assert!(store.cluster_by_cert("fp").await.unwrap().is_none());
    assert!(
        store
            .cluster_by_token(&TokenHash("h2".into()))
            .await
            .unwrap()
            .is_none()
    );
    store
        .delete_cluster(&c, audit("cluster.delete", "cluster/dev-1"))
        .await
        .unwrap();
    assert!(matches!(
        store
            .delete_cluster(&c, audit("cluster.delete", "cluster/dev-1"))
            .await,
        Err(StoreError::NotFound(_))
    ));

    // Every mutation above is in the audit log, newest first.
    let actions: Vec<String> = store
        .list_audit(100, "")
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.action)
        .collect();
    for a in [
        "cluster.delete",
        "cluster.revoke",
        "promotion.approve",
        "promotion",
        "unit.create",
        "environment.policy",
    ] {
        assert!(actions.contains(&a.to_owned()), "{a} audited");
    }
    assert_eq!(actions[0], "cluster.delete");
}

/// Sources: operations decided once and never backwards; OCI sources with
/// credentials that come back only to the runner; deleting a source hands
/// its units to the hub.
async fn sources_contract(store: Arc<dyn Store>) {
    use unitsync_hub::auth::Secret;
    use unitsync_hub::model::{
        OciAuth, OciRef, OciSource, OciSpec, SourceMode, SourceOperation, SourceStatus,
    };
    let op = SourceOperation {
        id: "op-1".into(),
        source: "confighub:w".into(),
        unit: "dev/a".into(),
        action: "Apply".into(),
        state: "running".into(),
        hub_revision: RevisionNum(0),
        report: String::new(),
        delivered: false,
        detail: "{}".into(),
        created_at: UnixMillis::now(),
    };
    store.put_operation(&op).await.unwrap();
    let decided = SourceOperation {
        state: "reported".into(),
        report: "first".into(),
        ..op.clone()
    };
    assert!(
        store.decide_operation(&decided).await.unwrap(),
        "the first ending decides"
    );
    let late = SourceOperation {
        report: "second".into(),
        ..decided.clone()
    };
    assert!(
        !store.decide_operation(&late).await.unwrap(),
        "a second ending does not"
    );
    // A stale writer cannot move it back to running.
    store
        .put_operation(&SourceOperation {
            hub_revision: RevisionNum(3),
            ..op.clone()
        })
        .await
        .unwrap();
    let now = store.get_operation("op-1").await.unwrap().unwrap();
    assert_eq!(
        (now.state.as_str(), now.report.as_str(), now.hub_revision),
        ("reported", "first", RevisionNum(3))
    );
    store
        .put_operation(&SourceOperation {
            delivered: true,
            ..now.clone()
        })
        .await
        .unwrap();
    store.put_operation(&now).await.unwrap();
    assert!(
        store
            .get_operation("op-1")
            .await
            .unwrap()
            .unwrap()
            .delivered,
        "delivered stays"
    );
    assert!(
        store
            .open_operations("confighub:w")
            .await
            .unwrap()
            .is_empty()
    );

    // OCI sources.
    store
        .create_environment(
            &env("dev"),
            None,
            EnvPolicy::default(),
            audit("environment.create", "env/dev"),
        )
        .await
        .unwrap();
    let name = "web".parse().unwrap();
    let src = OciSource {
        name: "web".parse().unwrap(),
        env: env("dev"),
        spec: OciSpec {
            url: "oci://127.0.0.1:5000/web".into(),
            reference: OciRef::Tag("latest".into()),
            interval_seconds: 60,
            mode: SourceMode::Artifact,
            layer_media_type: String::new(),
            insecure_hosts: vec![],
            ca_pem: String::new(),
        },
        suspended: false,
        status: SourceStatus::default(),
        sync_requested: None,
        allow_prune: false,
        created_at: UnixMillis::now(),
    };
    let auth = OciAuth::Basic {
        username: "robot".into(),
        password: Secret::from_string("pa55word".into()),
    };
    store
        .create_source(&src, &auth, audit("source.create", "source/web"))
        .await
        .unwrap();
    assert!(matches!(
        store
            .create_source(&src, &auth, audit("source.create", "source/web"))
            .await,
        Err(StoreError::AlreadyExists(_))
    ));
    let got = store.get_source(&name).await.unwrap().unwrap();
    assert_eq!(got.spec, src.spec);
    match store.source_auth(&name).await.unwrap() {
        OciAuth::Basic { username, password } => {
            assert_eq!(
                (username.as_str(), password.expose()),
                ("robot", "pa55word")
            );
        }
        other => panic!("{other:?}"),
    }
    store
        .request_source_sync(
            &name,
            UnixMillis(1_000),
            true,
            audit("source.sync", "source/web"),
        )
        .await
        .unwrap();
    let got = store.get_source(&name).await.unwrap().unwrap();
    assert_eq!(
        (got.sync_requested, got.allow_prune),
        (Some(UnixMillis(1_000)), true)
    );
    let status = SourceStatus {
        last_digest: "sha256:00".into(),
        units: vec!["web".into()],
        ..SourceStatus::default()
    };
    store.set_source_status(&name, &status, true).await.unwrap();
    let got = store.get_source(&name).await.unwrap().unwrap();
    assert_eq!(got.status, status);
    assert!(!got.allow_prune, "the permission is used up");
    // Status never goes backwards (a former leader's late write).
    let older = SourceStatus {
        last_attempt: Some(UnixMillis(1)),
        last_error: "stale".into(),
        ..SourceStatus::default()
    };
    let newer = SourceStatus {
        last_attempt: Some(UnixMillis(2_000)),
        ..status.clone()
    };
    store.set_source_status(&name, &newer, false).await.unwrap();
    store.set_source_status(&name, &older, false).await.unwrap();
    assert_eq!(
        store.get_source(&name).await.unwrap().unwrap().status,
        newer
    );
    store
        .set_source_suspended(&name, true, audit("source.suspend", "source/web"))
        .await
        .unwrap();
    assert!(store.list_sources().await.unwrap()[0].suspended);
    // A suspended source commits nothing, nor does a deleted one.
    let suspended = store
        .commit_revision(NewRevision {
            source: "oci:web".into(),
            ..rev(
                "dev/other",
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: o\n",
                PutMode::CreateOrUpdate,
            )
        })
        .await;
    assert!(
        matches!(&suspended, Err(StoreError::Conflict(m)) if m.contains("suspended")),
        "{suspended:?}"
    );
    let deleted = store
        .commit_revision(NewRevision {
            source: "oci:gone".into(),
            ..rev(
                "dev/other",
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: o\n",
                PutMode::CreateOrUpdate,
            )
        })
        .await;
    assert!(
        matches!(&deleted, Err(StoreError::Conflict(m)) if m.contains("was deleted")),
        "{deleted:?}"
    );
    store
        .set_source_suspended(&name, false, audit("source.resume", "source/web"))
        .await
        .unwrap();
    // Its units are its own until it goes.
    store
        .commit_revision(NewRevision {
            source: "oci:web".into(),
            ..rev(
                "dev/web",
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: w\n",
                PutMode::CreateOrUpdate,
            )
        })
        .await
        .unwrap();
    let by_hand = store
        .commit_revision(rev(
            "dev/web",
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n",
            PutMode::Update,
        ))
        .await;
    assert!(
        matches!(by_hand, Err(StoreError::Conflict(_))),
        "{by_hand:?}"
    );
    store
        .delete_source(&name, audit("source.delete", "source/web"))
        .await
        .unwrap();
    assert!(store.get_source(&name).await.unwrap().is_none());
    let unit: UnitRef = "dev/web".parse().unwrap();
    assert_eq!(store.get_unit(&unit).await.unwrap().unwrap().source, "");
    // Small durable facts.
    assert_eq!(store.get_state("cursor").await.unwrap(), None);
    store.put_state("cursor", "7").await.unwrap();
    store.put_state("cursor", "9").await.unwrap();
    assert_eq!(
        store.get_state("cursor").await.unwrap().as_deref(),
        Some("9")
    );
}

#[tokio::test]
async fn sqlite_store_meets_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let store = unitsync_tests::within("open", SqlStore::sqlite(&dir.path().join("hub.db")))
        .await
        .unwrap();
    unitsync_tests::within("store contract", contract(Arc::new(store))).await;
    let dir = tempfile::tempdir().unwrap();
    let store = unitsync_tests::within("open", SqlStore::sqlite(&dir.path().join("hub.db")))
        .await
        .unwrap();
    unitsync_tests::within("sources contract", sources_contract(Arc::new(store))).await;
}

#[tokio::test]
async fn sqlite_refuses_a_database_from_a_newer_hub() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.db");
    drop(SqlStore::sqlite(&path).await.unwrap());
    // Pretend a newer hub migrated this file.
    let conn = std::process::Command::new("python3")
        .args(["-c", &format!("import sqlite3; c=sqlite3.connect({:?}); c.execute('PRAGMA user_version = 999'); c.commit()", path.display().to_string())])
        .status()
        .unwrap();
    assert!(conn.success());
    let e = SqlStore::sqlite(&path).await.expect_err("refused");
    assert!(e.to_string().contains("newer than this hub"), "{e}");
}

#[tokio::test]
#[ignore = "needs PostgreSQL: set UNITSYNC_TEST_POSTGRES_URL (deploy/test.sh does)"]
async fn postgres_store_meets_the_contract() {
    let url = unitsync_tests::hub::postgres_database().await;
    let store = SqlStore::postgres(&url).await.unwrap();
    unitsync_tests::within("store contract", contract(Arc::new(store))).await;
    // A second connection sees the schema as current and migrates nothing.
    let again = unitsync_tests::within("reopen", SqlStore::postgres(&url))
        .await
        .unwrap();
    let envs = unitsync_tests::within("list", again.list_environments()).await;
    assert_eq!(envs.unwrap().len(), 3);
    let url = unitsync_tests::hub::postgres_database().await;
    let store = unitsync_tests::within("open", SqlStore::postgres(&url))
        .await
        .unwrap();
    unitsync_tests::within("sources contract", sources_contract(Arc::new(store))).await;
}

#[tokio::test]
#[ignore = "needs PostgreSQL: set UNITSYNC_TEST_POSTGRES_URL (deploy/test.sh does)"]
async fn hub_replicas_on_postgres_deliver_each_others_commits() {
    use unitsync_proto::v1 as pb;
    use unitsync_tests::{SimAgent, TestHub, configmap, until};
    let url = unitsync_tests::hub::postgres_database().await;
    let a = TestHub::start_on_postgres(&url, None).await;
    let b = TestHub::start_on_postgres(&url, Some(&a)).await;
    a.create_env("dev").await;
    let token = a.create_cluster("dev-1", "dev").await;
    // The agent talks to replica B; the operator commits through replica A.
    let mut agent = SimAgent::new(&b.endpoint(), b.ca(), &token).auto_ready();
    agent.start();
    until("agent connected to B", || async {
        b.admin()
            .await
            .get_cluster(pb::GetClusterRequest {
                name: "dev-1".into(),
            })
            .await
            .is_ok_and(|c| c.into_inner().connected)
    })
    .await;
    a.put("dev/web", &configmap("web", "1")).await.unwrap();
    until("the commit on A reached the agent on B", || async {
        agent.held().get("web") == Some(&(1, false))
    })
    .await;
    // Status reported through B is visible through A.
    until("status through A", || async {
        a.unit("dev/web")
            .await
            .unwrap()
            .clusters
            .first()
            .is_some_and(|c| c.revision == 1 && c.phase == i32::from(pb::Phase::Ready))
    })
    .await;
    agent.stop().await;
}

#[tokio::test]
#[ignore = "needs PostgreSQL: set UNITSYNC_TEST_POSTGRES_URL (deploy/test.sh does)"]
async fn every_revision_of_a_release_is_announced_to_other_replicas() {
    use futures::StreamExt;
    use unitsync_hub::store::Announcement;
    use unitsync_tests::within;
    let (a, _b, mut announced) = replicas_with_dev().await;
    let names: Vec<String> = (0..40).map(|i| format!("dev/u{i:02}")).collect();
    let release = names
        .iter()
        .map(|n| rev(n, "v1", PutMode::CreateOrUpdate))
        .collect();
    within("the release", a.commit_release(release, None))
        .await
        .unwrap();
    let mut heard = std::collections::BTreeSet::new();
    while heard.len() < names.len() {
        match within("announcements", announced.next()).await {
            Some(Announcement::Revision(unit, number)) => {
                assert_eq!(number, RevisionNum(1), "{unit}");
                heard.insert(unit.to_string());
            }
            Some(Announcement::Resync) => {}
            Some(other) => panic!("a release announces its revisions only: {other:?}"),
            None => panic!("the announcement stream ended"),
        }
    }
    assert_eq!(heard.into_iter().collect::<Vec<_>>(), names);
}

#[tokio::test]
#[ignore = "needs PostgreSQL: set UNITSYNC_TEST_POSTGRES_URL (deploy/test.sh does)"]
async fn one_replica_leads_on_a_shared_store() {
    let url = unitsync_tests::hub::postgres_database().await;
    let a = SqlStore::postgres(&url).await.unwrap();
    let b = SqlStore::postgres(&url).await.unwrap();
    assert!(a.is_leader().await.unwrap());
    assert!(a.is_leader().await.unwrap(), "the leader stays leader");
    assert!(!b.is_leader().await.unwrap());
    drop(a);
    unitsync_tests::until("b takes over when a goes", || async {
        b.is_leader().await.unwrap()
    })
    .await;
}

#[tokio::test]
#[ignore = "needs PostgreSQL: set UNITSYNC_TEST_POSTGRES_URL (deploy/test.sh does)"]
async fn replicas_racing_on_one_unit_both_commit() {
    let url = unitsync_tests::hub::postgres_database().await;
    let a: Arc<dyn Store> = Arc::new(SqlStore::postgres(&url).await.unwrap());
    let b: Arc<dyn Store> = Arc::new(SqlStore::postgres(&url).await.unwrap());
    a.create_environment(
        &env("dev"),
        None,
        EnvPolicy::default(),
        audit("environment.create", "env/dev"),
    )
    .await
    .unwrap();
    // Both replicas create and then update the same unit at the same time.
    let writer = |store: Arc<dyn Store>, who: &'static str| async move {
        for i in 0..15 {
            let text = format!("{who}-{i}");
            store
                .commit_revision(rev("dev/web", &text, PutMode::CreateOrUpdate))
                .await
                .unwrap_or_else(|e| panic!("{who} commit {i}: {e}"));
        }
    };
    unitsync_tests::within("racing commits", async {
        tokio::join!(writer(a.clone(), "a"), writer(b.clone(), "b"))
    })
    .await;
    let unit: UnitRef = "dev/web".parse().unwrap();
    let history = a.history(&unit).await.unwrap();
    let mut numbers: Vec<u64> = history.iter().map(|r| r.number.0).collect();
    numbers.sort_unstable();
    assert_eq!(
        numbers,
        (1..=30).collect::<Vec<u64>>(),
        "no revision lost or reused"
    );
    assert_eq!(
        a.get_unit(&unit).await.unwrap().unwrap().head,
        RevisionNum(30)
    );

    // Release sets over the same two units, listed in opposite orders.
    let sets = |store: Arc<dyn Store>, first: &'static str, second: &'static str| async move {
        for i in 0..10 {
            let set = vec![
                rev(first, &format!("{first}-{i}"), PutMode::CreateOrUpdate),
                rev(second, &format!("{second}-{i}"), PutMode::CreateOrUpdate),
            ];
            store
                .commit_release(set, None)
                .await
                .unwrap_or_else(|e| panic!("set {first},{second} #{i}: {e:?}"));
        }
    };
    unitsync_tests::within("racing release sets", async {
        tokio::join!(
            sets(a.clone(), "dev/web", "dev/api"),
            sets(b.clone(), "dev/api", "dev/web")
        )
    })
    .await;
    let api: UnitRef = "dev/api".parse().unwrap();
    assert_eq!(
        a.get_unit(&unit).await.unwrap().unwrap().head,
        RevisionNum(50)
    );
    assert_eq!(
        a.get_unit(&api).await.unwrap().unwrap().head,
        RevisionNum(20)
    );
}

/// The schema each backend's migrations produce: (table, column, type),
/// with the database's types mapped to one vocabulary.
type Schema = std::collections::BTreeSet<(String, String, &'static str)>;

fn type_of(declared: &str) -> &'static str {
    match declared.to_ascii_lowercase().as_str() {
        "integer" | "bigint" | "bigserial" => "integer",
        "text" => "text",
        _ => "other",
    }
}

#[tokio::test]
#[ignore = "needs PostgreSQL: set UNITSYNC_TEST_POSTGRES_URL (deploy/test.sh does)"]
async fn the_two_migration_sets_make_the_same_schema() {
    use sqlx::Connection;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.db");
    drop(SqlStore::sqlite(&path).await.unwrap());
    let mut lite = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    let sqlite: Schema = sqlx::query_as::<_, (String, String, String)>(
        "SELECT m.name, p.name, p.type FROM sqlite_master m JOIN pragma_table_info(m.name) p
         WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite_%'",
    )
    .fetch_all(&mut lite)
    .await
    .unwrap()
    .into_iter()
    .map(|(t, c, ty)| (t, c, type_of(&ty)))
    .collect();
    let url = unitsync_tests::hub::postgres_database().await;
    drop(SqlStore::postgres(&url).await.unwrap());
    let mut pg = sqlx::PgConnection::connect(&url).await.unwrap();
    let postgres: Schema = sqlx::query_as::<_, (String, String, String)>(
        "SELECT table_name::TEXT, column_name::TEXT, data_type::TEXT FROM information_schema.columns
         WHERE table_schema = 'public' AND table_name <> 'schema_version'",
    )
    .fetch_all(&mut pg)
    .await
    .unwrap()
    .into_iter()
    .map(|(t, c, ty)| (t, c, type_of(&ty)))
    .collect();
    let only_sqlite: Vec<_> = sqlite.difference(&postgres).collect();
    let only_postgres: Vec<_> = postgres.difference(&sqlite).collect();
    assert!(
        only_sqlite.is_empty() && only_postgres.is_empty(),
        "only in SQLite: {only_sqlite:?}; only in PostgreSQL: {only_postgres:?}"
    );
    assert!(sqlite.len() > 40, "{} columns", sqlite.len());
}

#[tokio::test]
#[ignore = "needs PostgreSQL: set UNITSYNC_TEST_POSTGRES_URL (deploy/test.sh does)"]
async fn replicas_see_each_others_agent_sessions_while_the_lease_runs() {
    use futures::StreamExt;
    use unitsync_hub::model::UnixMillis;
    use unitsync_hub::store::{Announcement, Seen};
    use unitsync_tests::within;
    let (a, b, mut announced) = replicas_with_dev().await;
    for (name, token) in [("dev-1", "h1"), ("dev-2", "h2"), ("dev-3", "h3")] {
        a.create_cluster(
            &name.parse().unwrap(),
            &env("dev"),
            &Default::default(),
            &TokenHash(token.into()),
            audit("cluster.create", name),
        )
        .await
        .unwrap();
    }
    let session = |cluster: &str, at: i64| Seen {
        cluster: cluster.parse().unwrap(),
        agent_version: "1.2.3".into(),
        at: UnixMillis(at),
    };
    let lease = std::time::Duration::from_secs(60);
    // A opens sessions; B hears of them and reads them (A does not count
    // its own as elsewhere).
    within(
        "a's sessions",
        a.record_sessions(
            &[session("dev-1", 1), session("dev-2", 2)],
            &[],
            false,
            lease,
        ),
    )
    .await
    .unwrap();
    loop {
        match within("an announcement", announced.next()).await {
            Some(Announcement::Sessions) => break,
            Some(_) => {}
            None => panic!("the announcement stream ended"),
        }
    }
    assert_eq!(sessions(&b).await, ["dev:dev-1@1", "dev:dev-2@2"]);
    assert!(sessions(&a).await.is_empty());
    // B holds one too; a session replaced on A moves, one closed goes.
    b.record_sessions(&[session("dev-3", 3)], &[], false, lease)
        .await
        .unwrap();
    a.record_sessions(
        &[session("dev-1", 10)],
        &["dev-2".parse().unwrap()],
        false,
        lease,
    )
    .await
    .unwrap();
    assert_eq!(sessions(&b).await, ["dev:dev-1@10"]);
    assert_eq!(sessions(&a).await, ["dev:dev-3@3"]);
    // A deleted cluster's session is no one's.
    a.delete_cluster(&"dev-3".parse().unwrap(), audit("cluster.delete", "dev-3"))
        .await
        .unwrap();
    assert!(sessions(&a).await.is_empty());
    // Writing all again replaces what was recorded.
    a.record_sessions(&[session("dev-2", 20)], &[], true, lease)
        .await
        .unwrap();
    assert_eq!(sessions(&b).await, ["dev:dev-2@20"]);
    // A lease that ran out (A crashed two seconds into its last one) ends
    // them; a lease ended (A stopped) ends them at once.
    a.record_sessions(&[], &[], false, std::time::Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(sessions(&b).await, ["dev:dev-2@20"]);
    unitsync_tests::until("a's lease runs out", || async {
        sessions(&b).await.is_empty()
    })
    .await;
    a.record_sessions(&[session("dev-2", 30)], &[], true, lease)
        .await
        .unwrap();
    assert_eq!(sessions(&b).await, ["dev:dev-2@30"]);
    a.record_sessions(&[], &[], false, std::time::Duration::ZERO)
        .await
        .unwrap();
    assert!(sessions(&b).await.is_empty());
}

/// The sessions other replicas hold as `ENV:CLUSTER@CONNECTED_AT`.
async fn sessions(store: &SqlStore) -> Vec<String> {
    let read = unitsync_tests::within("sessions elsewhere", store.sessions_elsewhere())
        .await
        .unwrap();
    read.into_iter()
        .map(|(env, s)| format!("{env}:{}@{}", s.cluster, s.at.0))
        .collect()
}

/// Two replicas' stores on a fresh PostgreSQL database with environment
/// `dev`, and what the second hears announced.
async fn replicas_with_dev() -> (SqlStore, SqlStore, unitsync_hub::store::AnnouncementStream) {
    use unitsync_tests::within;
    let url = unitsync_tests::hub::postgres_database().await;
    let a = within("replica a", SqlStore::postgres(&url)).await.unwrap();
    let b = within("replica b", SqlStore::postgres(&url)).await.unwrap();
    let announced = within("subscribe", b.subscribe())
        .await
        .unwrap()
        .expect("PostgreSQL announces");
    within(
        "create dev",
        a.create_environment(
            &env("dev"),
            None,
            EnvPolicy::default(),
            audit("environment.create", "env/dev"),
        ),
    )
    .await
    .unwrap();
    (a, b, announced)
}
