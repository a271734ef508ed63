//! The dashboard in a real browser (headless Chromium through WebDriver):
//! a hub, a kube-sim cluster with the real agent, and an operator clicking.
//! Screenshots land in `target/ui-screenshots/`.

use unitsync_proto::v1 as pb;
use unitsync_tests::browser::Browser;
use unitsync_tests::cluster::TestCluster;
use unitsync_tests::{TestHub, configmap, until, within};

async fn browser() -> Browser {
    Browser::start().await.expect("a headless browser")
}

/// Logs in through the form, as an operator would.
async fn log_in(b: &Browser, base: &str, token: &str) {
    b.goto(&format!("{base}/ui/")).await;
    b.fill("#token", token).await;
    b.click("form.login button[type=submit]").await;

    until("logged in", || async {
        b.count("header.bar nav").await == 1
    })
    .await;
}

/// Waits until the page holds its live stream.
async fn until_live(b: &Browser) {
    until("live updates on", || async {
        b.js("return document.body.dataset.live || ''").await == "on"
    })
    .await;
}

async fn chip_text(b: &Browser, unit: &str, cluster: &str) -> String {
    let v = b
        .js(&format!(
            "const c = document.querySelector('tr[data-unit=\"{unit}\"] li.chip[data-cluster=\"{cluster}\"]'); return c ? c.textContent : ''"
        ))
        .await;
    v.as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn an_operator_watches_the_fleet_and_promotes_from_the_browser() {
    let hub = TestHub::start().await;
    hub.create_env("dev").await;
    hub.create_env("prod").await;
    let token = hub.create_cluster("dev-1", "dev").await;
    let mut cluster = TestCluster::new(&hub.endpoint(), hub.ca(), &token).await;
    cluster
        .apply_json(serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "apps"}}))
        .await;
    cluster.start_agent();
    hub.put("dev/web", &configmap("web", "1")).await.unwrap();
    let base = format!("http://{}", hub.http_addr());

    let b = browser().await;
    log_in(&b, &base, &hub.admin_token).await;
    until_live(&b).await;
    until("dev-1 shows web Ready", || async {
        chip_text(&b, "web", "dev-1").await.contains("Ready")
    })
    .await;
    // A commit shows up without a reload: the marker set on this page
    // survives, the head moves to r2 and the cluster's chip follows.
    b.js("window.unitsyncMarker = 1; return 1").await;
    hub.put("dev/web", &configmap("web", "2")).await.unwrap();
    until("the fleet shows r2 Ready live", || async {
        let head = b
            .js("return document.querySelector('tr[data-unit=\"web\"] .cell[data-env=\"dev\"] .head a').textContent")
            .await;
        head == "r2" && {
            let chip = chip_text(&b, "web", "dev-1").await;
            chip.contains("Ready") && !chip.contains("r1")
        }
    })
    .await;
    assert_eq!(
        b.js("return window.unitsyncMarker || 0").await,
        1,
        "updated in place, not reloaded"
    );
    b.screenshot("fleet").await;

    // The unit page: per-cluster status, history, the diff of r1 → r2.
    b.click("tr[data-unit=\"web\"] .cell[data-env=\"dev\"] .head a")
        .await;
    b.text("h1").await;
    b.click("table.history a[href*='from=1&to=2']").await;
    until("the diff shows", || async {
        b.count("table.diff tr.add").await > 0
    })
    .await;
    let added = b.text("table.diff tr.add td.code").await;
    assert!(added.contains("value: \"2\""), "{added}");
    b.screenshot("unit").await;

    // prod wants an approval: the promotions page says what blocks, and
    // the approval is given through the page.
    within(
        "prod needs an approval",
        hub.admin()
            .await
            .set_environment_policy(pb::SetEnvironmentPolicyRequest {
                name: "prod".into(),
                policy: Some(pb::EnvironmentPolicy {
                    required_approvals: 1,
                    ..Default::default()
                }),
            }),
    )
    .await
    .unwrap();
    b.goto(&format!("{base}/ui/promotions")).await;
    let plan = b.text("table.plan").await;
    assert!(
        plan.contains("approvals"),
        "the blocking gate is named: {plan}"
    );
    assert_eq!(
        b.count("p.actions a[href^='/ui/confirm/promote?from=dev&to=prod']")
            .await,
        0,
        "no step-wide promotion while the gate blocks"
    );
    b.screenshot("promotions").await;
    b.click("a[href^='/ui/confirm/approve?unit=dev/web']").await;
    b.click("form.confirm button[type=submit]").await;
    let approved = b.text("p.flash").await;
    assert!(approved.contains("1 of 1 approvals"), "{approved}");

    // Then promote dev → prod, past the confirmation.
    b.click("p.actions a[href^='/ui/confirm/promote?from=dev&to=prod']")
        .await;
    until("the confirmation page", || async {
        b.count("form.confirm").await == 1
    })
    .await;
    b.screenshot("promote-confirm").await;
    b.click("form.confirm button[type=submit]").await;
    until("the promotion's outcome", || async {
        b.count("p.flash, p.error").await > 0
    })
    .await;
    let said = b.text("p.flash, p.error").await;
    assert!(
        said.contains("prod") && b.count("p.error").await == 0,
        "{said}"
    );
    until("promoted", || async { hub.unit("prod/web").await.is_ok() }).await;
    let prod = hub.unit("prod/web").await.unwrap().unit.unwrap();
    assert_eq!(prod.head_revision, 1);

    // The audit page shows who did it.
    b.goto(&format!("{base}/ui/audit")).await;
    let audit = b.text("table.audit").await;
    assert!(audit.contains("operator:admin"), "{audit}");
    assert!(audit.contains("prod/web"), "{audit}");
    assert!(audit.contains("promotion.approve"), "{audit}");
    b.screenshot("audit").await;

    // The cluster's page: its agent and what it runs.
    b.goto(&format!("{base}/ui/clusters/dev-1")).await;
    let facts = b.text("dl.facts").await;
    assert!(facts.contains("connected"), "{facts}");
    assert!(b.text("tr[data-unit=\"web\"]").await.contains("Ready"));
    b.goto(&format!("{base}/ui/clusters")).await;
    b.text("main h1").await;
    // dev-1 runs one unit at its head, Ready (prod/web is prod's).
    let row = b.text("tr[data-cluster=\"dev-1\"]").await;
    assert!(row.contains("Ready 1"), "{row}");
    b.screenshot("clusters").await;
    b.close().await;
    cluster.stop_agent().await;
}

#[tokio::test]
async fn read_only_operators_get_no_buttons_and_hostile_content_stays_text() {
    let hub = TestHub::start().await;
    hub.create_env("dev").await;
    hub.create_env("prod").await;
    hub.create_cluster("dev-1", "dev").await;
    let hostile = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: web\n  namespace: apps\ndata:\n  a: \"<img src=x onerror=\\\"document.title='pwned'\\\">\"\n  b: \"<script>document.title='pwned'</script>\"\n";
    within(
        "hostile unit",
        hub.admin().await.put_unit(pb::PutUnitRequest {
            unit: "dev/web".into(),
            manifests: hostile.into(),
            message: "<img src=x onerror=\"document.title='pwned'\">".into(),
            mode: pb::PutMode::Unspecified.into(),
            labels: Default::default(),
        }),
    )
    .await
    .unwrap();
    hub.put("dev/web", &configmap("web", "2")).await.unwrap();
    let viewer = hub.create_operator("viewer", "read-only").await;
    let base = format!("http://{}", hub.http_addr());

    let b = browser().await;
    log_in(&b, &base, &viewer).await;

    for path in [
        "/ui/units/dev/web?from=1&to=2",
        "/ui/audit",
        "/ui/promotions",
        "/ui/clusters/dev-1",
    ] {
        b.goto(&format!("{base}{path}")).await;
        b.text("main h1").await;
        let title = b.js("return document.title").await;
        assert!(
            !title.as_str().unwrap_or_default().contains("pwned"),
            "{path}: no script ran ({title})"
        );
        assert_eq!(
            b.count("main a.button, form.confirm, a[href^='/ui/confirm/']")
                .await,
            0,
            "{path}: no actions for a read-only operator"
        );
    }
    // The payload is on the page, as text.
    // (Each page visited closed its live stream: the browser's six
    // connections per host are not used up by pages left behind.)
    b.goto(&format!("{base}/ui/units/dev/web?from=1&to=2"))
        .await;
    let diff = b.text("table.diff").await;
    assert!(
        diff.contains("<script>document.title='pwned'</script>"),
        "{diff}"
    );
    assert_eq!(b.count("table.diff img, table.diff script").await, 0);
    // Typing the address of an action does not help.
    b.goto(&format!("{base}/ui/confirm/revoke?cluster=dev-1"))
        .await;
    let refused = b.text("main").await;
    assert!(refused.contains("read-only"), "{refused}");
    b.screenshot("read-only").await;
    b.close().await;
}
