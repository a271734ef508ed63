//! Manifest validation at the hub: every cap and malformed input gets a
//! clear error naming unit, document and field, and the store is unchanged.

use tonic::Code;
use unitsync_proto::v1 as pb;
use unitsync_tests::{TestHub, configmap};

async fn audit_len(hub: &TestHub) -> usize {
    hub.admin()
        .await
        .list_audit(pb::ListAuditRequest {
            limit: 10_000,
            target_prefix: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .entries
        .len()
}

fn deep(levels: usize) -> String {
    let mut s =
        String::from("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: deep\ndata:\n  x: ");
    s.push_str(&"[".repeat(levels));
    s.push_str(&"]".repeat(levels));
    s.push('\n');
    s
}

fn alias_bomb() -> String {
    let mut s = String::from(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: bomb\na0: &a0 [x, x, x, x, x, x, x, x, x, x]\n",
    );
    for i in 1..12 {
        let p = i - 1;
        s.push_str(&format!(
            "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
        ));
    }
    s
}

#[tokio::test]
async fn rejected_manifests_name_the_problem_and_change_nothing() {
    let hub = TestHub::start().await;
    hub.create_env("dev").await;
    hub.put("dev/web", &configmap("web", "good")).await.unwrap();
    let before_audit = audit_len(&hub).await;
    let before = hub.unit("dev/web").await.unwrap();

    let oversize = format!(
        "{}data2:\n  big: \"{}\"\n",
        configmap("web", "x"),
        "y".repeat(4 * 1024 * 1024)
    );
    let duplicate = format!("{}---\n{}", configmap("web", "a"), configmap("web", "b"));
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "not YAML",
            "apiVersion: v1\nkind: [unclosed\n".into(),
            "document 1 (line 1): not valid YAML",
        ),
        (
            "missing kind",
            "apiVersion: v1\nmetadata:\n  name: x\n".into(),
            "document 1 (line 1), field kind: required value is missing",
        ),
        (
            "bad name in 2nd doc",
            format!(
                "{}---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: Not_OK\n",
                configmap("web", "a")
            ),
            "document 2 (line 8), field metadata.name: invalid value \"Not_OK\"",
        ),
        (
            "duplicate object",
            duplicate,
            "document 2 (line 8), field metadata.name: ConfigMap web in namespace apps is already defined by document 1",
        ),
        ("too deep", deep(80), "document 1 (line 1)"),
        ("alias bomb", alias_bomb(), "document 1 (line 1)"),
        ("oversize", oversize, "over the limit of 4194304 bytes"),
        (
            "a list, not an object",
            "- a\n- b\n".into(),
            "expected a Kubernetes object (a mapping), found a sequence",
        ),
        ("empty", "# nothing here\n".into(), "no documents"),
    ];
    for (what, text, expect) in cases {
        let e = hub.put("dev/web", &text).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {}", e.message());
        assert!(
            e.message().starts_with("unit dev/web"),
            "{what}: {}",
            e.message()
        );
        assert!(e.message().contains(expect), "{what}: {}", e.message());
        // A new unit is not created by a rejected put either.
        let e = hub.put("dev/fresh", &text).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{what}");
    }
    let after = hub.unit("dev/web").await.unwrap();
    assert_eq!(before.unit, after.unit, "head unchanged");
    assert_eq!(before.head, after.head);
    assert_eq!(
        hub.unit("dev/fresh").await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(
        audit_len(&hub).await,
        before_audit,
        "no audit entry for a rejected write"
    );
}

#[tokio::test]
async fn put_modes_and_names_are_enforced() {
    let hub = TestHub::start().await;
    hub.create_env("dev").await;
    let mut admin = hub.admin().await;
    let put = |unit: &str, mode: pb::PutMode| pb::PutUnitRequest {
        unit: unit.into(),
        manifests: configmap("web", "1"),
        message: String::new(),
        mode: mode.into(),
        labels: Default::default(),
    };
    let e = admin
        .put_unit(put("dev/web", pb::PutMode::Update))
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (Code::NotFound, "unit dev/web not found")
    );
    // A label no selector could name is refused, naming the unit.
    let e = admin
        .put_unit(pb::PutUnitRequest {
            labels: [("app".to_owned(), "web,api".to_owned())].into(),
            ..put("dev/web", pb::PutMode::Create)
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message()
            .contains("unit dev/web: invalid label app=web,api: its value must be"),
        "{}",
        e.message()
    );
    admin
        .put_unit(put("dev/web", pb::PutMode::Create))
        .await
        .unwrap();
    let e = admin
        .put_unit(put("dev/web", pb::PutMode::Create))
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (Code::AlreadyExists, "unit dev/web already exists")
    );
    let e = admin
        .put_unit(put("nope/web", pb::PutMode::Unspecified))
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (Code::NotFound, "environment nope not found")
    );
    let e = admin
        .put_unit(put("dev/Web", pb::PutMode::Unspecified))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("invalid unit name \"Web\""),
        "{}",
        e.message()
    );
    // Destroy twice: the second is refused; re-create after destroy works.
    hub.destroy("dev/web").await.unwrap();
    let e = hub.destroy("dev/web").await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let r = admin
        .put_unit(put("dev/web", pb::PutMode::Create))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.number, 3);
    let history = admin
        .unit_history(pb::UnitHistoryRequest {
            unit: "dev/web".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .revisions;
    let shape: Vec<(u64, bool)> = history.iter().map(|r| (r.number, r.tombstone)).collect();
    assert_eq!(shape, [(1, false), (2, true), (3, false)]);
}

/// Arbitrary manifests through the real gRPC API: each is committed or
/// refused with a clean, bounded message naming the unit, and a refusal
/// changes nothing in the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arbitrary_manifests_are_committed_or_cleanly_refused_and_refusals_change_nothing() {
    use proptest::prelude::*;
    let hub = unitsync_tests::TestHub::start().await;
    hub.create_env("dev").await;
    let store = hub.running().hub.store.clone();
    let rt = tokio::runtime::Handle::current();
    let docs = prop::collection::vec(
        prop_oneof![
            Just("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n  namespace: x\n".to_owned()),
            Just("metadata:\n  name: a\n  labels: 7\n".to_owned()),
            Just("apiVersion: v1\nkind: Secret\nmetadata: {name: s, namespace: x}\ndata: {k: dg==}\n".to_owned()),
            Just("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: Bad_Name}\n".to_owned()),
            "[ -~\n]{0,80}",
        ],
        0..5,
    )
    .prop_map(|d| d.join("---\n"));
    let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        cases: 64,
        ..Default::default()
    });
    tokio::task::block_in_place(|| {
        runner
            .run(&docs, |text| {
                rt.block_on(async {
                    let before = (
                        store.list_units(None).await.unwrap(),
                        store.list_audit(10_000, "").await.unwrap().len(),
                    );
                    match hub.put("dev/web", &text).await {
                        Ok(r) => prop_assert!(r.number > 0),
                        Err(e) => {
                            prop_assert_eq!(e.code(), tonic::Code::InvalidArgument, "{:?}", e);
                            prop_assert!(e.message().contains("unit dev/web"), "{}", e.message());
                            prop_assert!(e.message().len() < 2048);
                            let after = (
                                store.list_units(None).await.unwrap(),
                                store.list_audit(10_000, "").await.unwrap().len(),
                            );
                            prop_assert_eq!(before, after, "a refusal changed the store");
                        }
                    }
                    Ok(())
                })
            })
            .unwrap();
    });
}
