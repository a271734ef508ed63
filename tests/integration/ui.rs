//! The dashboard over HTTP, as a browser would speak to it (cookies, forms,
//! Origin headers) but without one: sessions, security headers, CSRF, the
//! read-only role, escaping and masking, live events, HTTPS.

use std::collections::BTreeMap;
use std::sync::Mutex;

use reqwest::StatusCode;
use reqwest::header::{HeaderMap, LOCATION, SET_COOKIE};
use unitsync_proto::v1 as pb;
use unitsync_tests::{SimAgent, TestHub, configmap, until, within};

/// A cookie-keeping HTTP client for one dashboard user.
struct Browserless {
    base: String,
    http: reqwest::Client,
    cookies: Mutex<BTreeMap<String, String>>,
}

/// A response's status, headers and body.
struct Page {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Page {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    /// The value of the first hidden `csrf` field.
    fn csrf(&self) -> String {
        field_value(&self.body, "csrf").unwrap_or_else(|| panic!("no csrf field in {}", self.body))
    }
}

/// The value of the first `<input name="NAME" value="…">`.
fn field_value(html: &str, name: &str) -> Option<String> {
    let at = html.find(&format!("name=\"{name}\" value=\""))?;
    let rest = &html[at + name.len() + 15..];
    Some(rest[..rest.find('"')?].to_owned())
}

/// `application/x-www-form-urlencoded`, as a browser sends a form.
fn urlencoded(form: &[(&str, &str)]) -> String {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                    (b as char).to_string()
                }
                b' ' => "+".into(),
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    form.iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

impl Browserless {
    fn new(base: &str, ca_pem: Option<&str>) -> Browserless {
        unitsync_tests::cluster::init_crypto();
        let mut b = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none());
        if let Some(ca) = ca_pem {
            b = b.tls_certs_only([reqwest::Certificate::from_pem(ca.as_bytes()).unwrap()]);
        }
        Browserless {
            base: base.to_owned(),
            http: b.build().unwrap(),
            cookies: Mutex::default(),
        }
    }

    fn for_hub(hub: &TestHub) -> Browserless {
        Browserless::new(&format!("http://{}", hub.http_addr()), None)
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Page {
        let req = req.header(reqwest::header::COOKIE, self.cookie_header());
        let res = within("dashboard request", req.send()).await.unwrap();
        let status = res.status();
        let headers = res.headers().clone();
        for c in headers.get_all(SET_COOKIE) {
            let c = c.to_str().unwrap();
            let (pair, attrs) = c.split_once(';').unwrap_or((c, ""));
            let (k, v) = pair.split_once('=').unwrap();
            let mut jar = self.cookies.lock().unwrap();
            if v.is_empty() || attrs.contains("Max-Age=0") {
                jar.remove(k);
            } else {
                jar.insert(k.to_owned(), v.to_owned());
            }
        }
        let body = within("dashboard body", res.text()).await.unwrap();
        Page {
            status,
            headers,
            body,
        }
    }

    async fn get(&self, path: &str) -> Page {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    /// A form POST from the dashboard's own pages (same Origin).
    async fn post(&self, path: &str, form: &[(&str, &str)]) -> Page {
        self.post_from(&self.base, path, form).await
    }

    /// Posts the dev → prod promotion confirmed as `plan`, forced with
    /// `reason`.
    async fn promote_confirmed(&self, plan: &str, reason: &str, csrf: &str) -> Page {
        let form = [
            ("from", "dev"),
            ("to", "prod"),
            ("plan", plan),
            ("reason", reason),
            ("csrf", csrf),
        ];
        self.post("/ui/actions/promote", &form).await
    }

    async fn post_from(&self, origin: &str, path: &str, form: &[(&str, &str)]) -> Page {
        let req = self
            .http
            .post(format!("{}{path}", self.base))
            .header(reqwest::header::ORIGIN, origin)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(urlencoded(form));
        self.send(req).await
    }

    /// Logs in with `token` through the login form.
    async fn login(&self, token: &str) -> Page {
        let form = self.get("/ui/login").await;
        assert_eq!(form.status, StatusCode::OK);
        self.post(
            "/ui/login",
            &[("token", token), ("csrf", &form.csrf()), ("next", "/ui/")],
        )
        .await
    }
}

async fn hub_with_unit() -> TestHub {
    let hub = TestHub::start().await;
    hub.create_env("dev").await;
    hub.create_env("prod").await;
    hub.create_cluster("dev-1", "dev").await;
    hub.put("dev/web", &configmap("web", "1")).await.unwrap();
    hub
}

async fn audit(hub: &TestHub) -> Vec<pb::AuditEntry> {
    within(
        "audit",
        hub.admin().await.list_audit(pb::ListAuditRequest {
            limit: 100,
            target_prefix: String::new(),
        }),
    )
    .await
    .unwrap()
    .into_inner()
    .entries
}

#[tokio::test]
async fn pages_need_a_session_and_carry_security_headers() {
    let hub = hub_with_unit().await;
    let b = Browserless::for_hub(&hub);
    let page = b.get("/ui/units/dev/web").await;
    assert_eq!(page.status, StatusCode::SEE_OTHER);
    assert!(
        page.header(LOCATION.as_str())
            .starts_with("/ui/login?next="),
        "{}",
        page.header(LOCATION.as_str())
    );
    assert_eq!(
        page.header("content-security-policy"),
        unitsync_hub::ui::CSP
    );
    assert_eq!(page.header("x-frame-options"), "DENY");
    assert_eq!(page.header("x-content-type-options"), "nosniff");
    assert_eq!(page.header("referrer-policy"), "same-origin");
    // An action without a session is refused, not redirected.
    let refused = b.post("/ui/actions/revoke", &[("cluster", "dev-1")]).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    // A wrong token opens no session.
    let bad = b.login("uso_not-a-real-token").await;
    assert_eq!(bad.status, StatusCode::UNAUTHORIZED);
    assert!(
        bad.body.contains("not a valid operator token"),
        "{}",
        bad.body
    );
    assert_eq!(b.get("/ui/").await.status, StatusCode::SEE_OTHER);
    // The probes still answer without credentials.
    assert_eq!(b.get("/healthz").await.status, StatusCode::OK);

    let ok = b.login(&hub.admin_token).await;
    assert_eq!(ok.status, StatusCode::SEE_OTHER, "{}", ok.body);
    let session_cookie = ok
        .headers
        .get_all(SET_COOKIE)
        .iter()
        .map(|c| c.to_str().unwrap().to_owned())
        .find(|c| c.starts_with("unitsync_ui="))
        .expect("a session cookie");
    assert!(session_cookie.contains("HttpOnly"), "{session_cookie}");
    assert!(
        session_cookie.contains("SameSite=Strict"),
        "{session_cookie}"
    );
    assert!(
        !session_cookie.contains("Secure"),
        "plain HTTP: {session_cookie}"
    );
    let fleet = b.get("/ui/").await;
    assert_eq!(fleet.status, StatusCode::OK);
    assert!(fleet.body.contains("data-unit=\"web\""), "{}", fleet.body);
    // Pages say how often they may refresh live: a promotion plan costs
    // more than the fleet matrix.
    assert!(fleet.body.contains("data-refresh-ms=\"250\""));
    assert!(
        b.get("/ui/promotions")
            .await
            .body
            .contains("data-refresh-ms=\"2000\"")
    );
    assert_eq!(fleet.header("cache-control"), "no-store");

    // Logging out ends the session on the hub, not only in the browser.
    let csrf = fleet.csrf();
    let stolen = b.cookie_header();
    assert_eq!(
        b.post("/ui/logout", &[("csrf", &csrf)]).await.status,
        StatusCode::SEE_OTHER
    );
    let replay = b
        .send(
            b.http
                .get(format!("{}/ui/", b.base))
                .header(reqwest::header::COOKIE, stolen),
        )
        .await;
    assert_eq!(replay.status, StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn login_and_actions_refuse_forged_forms() {
    let hub = hub_with_unit().await;
    let b = Browserless::for_hub(&hub);
    // A login posted without the form's own token (login CSRF).
    let forged = b
        .post("/ui/login", &[("token", &hub.admin_token), ("csrf", "x")])
        .await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    assert!(!b.cookie_header().contains("unitsync_ui="));

    assert_eq!(
        b.login(&hub.admin_token).await.status,
        StatusCode::SEE_OTHER
    );
    let confirm = b.get("/ui/confirm/promote?from=dev&to=prod&unit=web").await;
    let csrf = confirm.csrf();
    let plan = field_value(&confirm.body, "plan").expect("the plan rides with the form");
    // A forced promotion would go through (gates or not) if the form were
    // taken.
    let promote = [
        ("from", "dev"),
        ("to", "prod"),
        ("unit", "web"),
        ("reason", "forged"),
        ("plan", plan.as_str()),
    ];
    // No CSRF token: refused, nothing promoted.
    let no_token = b.post("/ui/actions/promote", &promote).await;
    assert_eq!(no_token.status, StatusCode::FORBIDDEN);
    // Another site's page posting with the right token (stolen or not):
    // refused by Origin.
    let mut with_token = promote.to_vec();
    with_token.push(("csrf", &csrf));
    let cross = b
        .post_from("https://evil.example", "/ui/actions/promote", &with_token)
        .await;
    assert_eq!(cross.status, StatusCode::FORBIDDEN);
    assert!(
        hub.unit("prod/web").await.is_err(),
        "a refused form changed nothing"
    );
    assert!(
        !audit(&hub)
            .await
            .iter()
            .any(|e| e.action.contains("promot")),
        "nothing audited"
    );
    // The same form from the dashboard's own page goes through: the
    // refusals above were the checks, not the gates.
    let ok = b.post("/ui/actions/promote", &with_token).await;
    assert_eq!(ok.status, StatusCode::SEE_OTHER, "{}", ok.body);
    assert!(hub.unit("prod/web").await.is_ok());
}

#[tokio::test]
async fn admin_approves_promotes_and_rolls_back_from_the_dashboard() {
    let hub = hub_with_unit().await;
    let b = Browserless::for_hub(&hub);
    b.login(&hub.admin_token).await;
    // The plan says what will happen before anything does.
    let confirm = b.get("/ui/confirm/promote?from=dev&to=prod&unit=web").await;
    assert_eq!(confirm.status, StatusCode::OK, "{}", confirm.body);
    assert!(confirm.body.contains("dev/web"), "{}", confirm.body);
    assert!(
        hub.unit("prod/web").await.is_err(),
        "a confirmation page changes nothing"
    );
    let csrf = confirm.csrf();
    let plan = field_value(&confirm.body, "plan").expect("the plan rides with the form");

    let approved = b
        .post(
            "/ui/actions/approve",
            &[
                ("unit", "dev/web"),
                ("revision", "1"),
                ("to", "prod"),
                ("csrf", &csrf),
            ],
        )
        .await;
    assert_eq!(approved.status, StatusCode::SEE_OTHER, "{}", approved.body);
    // dev-1 has no agent: the health gate blocks, and says so.
    let blocked = b
        .post(
            "/ui/actions/promote",
            &[
                ("from", "dev"),
                ("to", "prod"),
                ("unit", "web"),
                ("plan", &plan),
                ("csrf", &csrf),
            ],
        )
        .await;
    assert_eq!(blocked.status, StatusCode::CONFLICT);
    assert!(
        blocked.body.contains("gate health failed"),
        "{}",
        blocked.body
    );
    assert!(hub.unit("prod/web").await.is_err());
    // Forced past the gates with a reason, which the audit keeps.
    let promoted = b
        .post(
            "/ui/actions/promote",
            &[
                ("from", "dev"),
                ("to", "prod"),
                ("unit", "web"),
                ("reason", "hotfix INC-42"),
                ("plan", &plan),
                ("csrf", &csrf),
            ],
        )
        .await;
    assert_eq!(promoted.status, StatusCode::SEE_OTHER, "{}", promoted.body);
    let prod = hub.unit("prod/web").await.expect("promoted to prod");
    assert_eq!(prod.unit.unwrap().head_revision, 1);
    // The next page says what happened, once.
    let after = b.get(promoted.header("location")).await;
    assert!(after.body.contains("class=\"flash"), "{}", after.body);
    assert!(!b.get("/ui/promotions").await.body.contains("class=\"flash"));

    // Roll dev back to r1 after an update: a new revision, history kept;
    // unless the unit moved on since the rollback's diff was confirmed.
    hub.put("dev/web", &configmap("web", "2")).await.unwrap();
    let confirm = b
        .get("/ui/confirm/rollback-unit?unit=dev/web&revision=1")
        .await;
    let head = field_value(&confirm.body, "plan").expect("the head rides with the form");
    assert_eq!(head, "2");
    hub.put("dev/web", &configmap("web", "3")).await.unwrap();
    let rollback = [
        ("unit", "dev/web"),
        ("revision", "1"),
        ("plan", head.as_str()),
        ("csrf", &csrf),
    ];
    let stale = b.post("/ui/actions/rollback-unit", &rollback).await;
    assert_eq!(stale.status, StatusCode::CONFLICT, "{}", stale.body);
    assert!(
        stale.body.contains("changed since you confirmed"),
        "{}",
        stale.body
    );
    let confirm = b
        .get("/ui/confirm/rollback-unit?unit=dev/web&revision=1")
        .await;
    let head = field_value(&confirm.body, "plan").unwrap();
    let rollback = [
        ("unit", "dev/web"),
        ("revision", "1"),
        ("plan", head.as_str()),
        ("csrf", &csrf),
    ];
    let rolled = b.post("/ui/actions/rollback-unit", &rollback).await;
    assert_eq!(rolled.status, StatusCode::SEE_OTHER, "{}", rolled.body);
    let dev = hub.unit("dev/web").await.unwrap();
    assert_eq!(dev.unit.unwrap().head_revision, 4);

    // Every change is audited under the operator's name, like the CLI's.
    let entries = audit(&hub).await;
    assert!(
        entries.iter().any(|e| e.detail.contains("hotfix INC-42")),
        "the forced promotion's reason is audited: {entries:?}"
    );
    for (action, detail) in [
        ("promotion.approve", "revision 1 for prod"),
        ("promotion.forced", "dev/web@1 -> prod/web@1"),
        ("unit.update", "rollback to 1"),
    ] {
        assert!(
            entries.iter().any(|e| e.action == action
                && e.detail.contains(detail)
                && e.actor == "operator:admin"),
            "{action} audited as operator:admin: {entries:?}"
        );
    }
}

#[tokio::test]
async fn read_only_operators_see_everything_and_change_nothing() {
    let hub = hub_with_unit().await;
    let token = hub.create_operator("viewer", "read-only").await;
    let b = Browserless::for_hub(&hub);
    assert_eq!(b.login(&token).await.status, StatusCode::SEE_OTHER);
    for path in [
        "/ui/",
        "/ui/units/dev/web",
        "/ui/promotions",
        "/ui/clusters",
        "/ui/clusters/dev-1",
        "/ui/audit",
    ] {
        let page = b.get(path).await;
        assert_eq!(page.status, StatusCode::OK, "{path}: {}", page.body);
        assert!(
            !page.body.contains("/ui/confirm/") && !page.body.contains("/ui/actions/"),
            "{path} offers no change to a read-only operator"
        );
    }
    let confirm = b.get("/ui/confirm/revoke?cluster=dev-1").await;
    assert_eq!(confirm.status, StatusCode::FORBIDDEN);
    let csrf = b.get("/ui/").await.csrf();
    let revoke = b
        .post(
            "/ui/actions/revoke",
            &[("cluster", "dev-1"), ("csrf", &csrf)],
        )
        .await;
    assert_eq!(revoke.status, StatusCode::FORBIDDEN);
    let cluster = within(
        "get cluster",
        hub.admin().await.get_cluster(pb::GetClusterRequest {
            name: "dev-1".into(),
        }),
    )
    .await
    .unwrap()
    .into_inner();
    assert!(!cluster.revoked, "the cluster was not revoked");
}

#[tokio::test]
async fn what_units_carry_is_shown_escaped_and_secrets_masked() {
    let hub = hub_with_unit().await;
    let hostile = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: web\n  namespace: apps\ndata:\n  value: \"<script>alert(1)</script>\"\n---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: creds\n  namespace: apps\nstringData:\n  password: hunter2-very-secret\n";
    within(
        "hostile update",
        hub.admin().await.put_unit(pb::PutUnitRequest {
            unit: "dev/web".into(),
            manifests: hostile.into(),
            message: "<img src=x onerror=alert(2)>".into(),
            mode: pb::PutMode::Unspecified.into(),
            labels: Default::default(),
        }),
    )
    .await
    .unwrap();
    let b = Browserless::for_hub(&hub);
    b.login(&hub.admin_token).await;
    for path in [
        "/ui/units/dev/web",
        "/ui/units/dev/web?from=1&to=2",
        "/ui/audit",
        "/ui/promotions",
    ] {
        let page = b.get(path).await;
        assert_eq!(page.status, StatusCode::OK, "{path}");
        assert!(
            !page.body.contains("<script>alert"),
            "{path}: {}",
            page.body
        );
        assert!(!page.body.contains("<img src=x"), "{path}: {}", page.body);
        assert!(
            !page.body.contains("hunter2"),
            "{path} shows no secret value"
        );
    }
    let unit = b.get("/ui/units/dev/web").await;
    assert!(
        unit.body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{}",
        unit.body
    );
}

#[tokio::test]
async fn live_events_announce_changes() {
    use futures::StreamExt;
    let hub = hub_with_unit().await;
    let b = Browserless::for_hub(&hub);
    b.login(&hub.admin_token).await;
    let res = within(
        "open events",
        b.http
            .get(format!("{}/ui/events", b.base))
            .header(reqwest::header::COOKIE, b.cookie_header())
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        res.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let mut body = res.bytes_stream();
    let mut seen = String::new();
    let mut next_event = async || loop {
        let chunk = within("an event", body.next()).await.unwrap().unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
        if let Some(at) = seen.find("\n\n") {
            let event = seen[..at].to_owned();
            seen.drain(..at + 2);
            if event.contains("data:") {
                return event;
            }
        }
    };
    let first = next_event().await;
    assert!(first.contains("event: change"), "{first}");
    hub.put("dev/web", &configmap("web", "2")).await.unwrap();
    let change = next_event().await;
    assert!(change.contains("event: change"), "{change}");
    // Logged out, the stream ends at the next change at the latest.
    let csrf = b.get("/ui/").await.csrf();
    b.post("/ui/logout", &[("csrf", &csrf)]).await;
    hub.put("dev/web", &configmap("web", "3")).await.unwrap();
    let ended = within("the stream ends", async {
        loop {
            match body.next().await {
                None | Some(Err(_)) => return true,
                Some(Ok(chunk)) if String::from_utf8_lossy(&chunk).contains("data:") => {
                    return false;
                }
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(ended, "no event after logout");
}

#[tokio::test]
async fn over_https_the_session_cookie_is_secure() {
    unitsync_tests::cluster::init_crypto();
    let dir = tempfile::tempdir().unwrap();
    let config = unitsync_hub::config::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: Some("127.0.0.1:0".parse().unwrap()),
        http_tls: true,
        data_dir: dir.path().join("data"),
        database_url: None,
        tls: unitsync_hub::tls::TlsMode::Generated {
            names: vec!["localhost".into(), "127.0.0.1".into()],
        },
        tuning: Default::default(),
        confighub: None,
    };
    let hub = within("hub start", unitsync_hub::start(config))
        .await
        .unwrap();
    let http = hub.http_addr.unwrap();
    let b = Browserless::new(&format!("https://{http}"), hub.ca_pem.as_deref());
    assert_eq!(b.get("/healthz").await.status, StatusCode::OK);
    let ok = b.login(&hub.admin_token).await;
    assert_eq!(ok.status, StatusCode::SEE_OTHER, "{}", ok.body);
    let cookie = ok.header(SET_COOKIE.as_str()).to_owned();
    assert!(cookie.contains("; Secure"), "{cookie}");
    assert_eq!(ok.header("strict-transport-security"), "max-age=31536000");
    assert_eq!(b.get("/ui/").await.status, StatusCode::OK);
    // Plain HTTP on the same port gets nothing.
    let plain = unitsync_tests::processes::http_get(http, "/healthz").await;
    assert!(plain.is_err() || plain.unwrap().0 != 200);
    within("hub stops", hub.shutdown()).await;
}

#[tokio::test]
async fn a_promotion_confirmed_on_a_stale_plan_is_refused() {
    let hub = TestHub::start().await;
    hub.create_env("dev").await;
    hub.create_env("prod").await;
    hub.put("dev/web", &configmap("web", "1")).await.unwrap();
    let b = Browserless::for_hub(&hub);
    b.login(&hub.admin_token).await;
    let confirm = b.get("/ui/confirm/promote?from=dev&to=prod").await;
    assert_eq!(confirm.status, StatusCode::OK, "{}", confirm.body);
    let plan = field_value(&confirm.body, "plan").expect("the plan rides with the form");
    assert!(plan.starts_with("dev/web@1=prod/web@0:"), "{plan}");
    // dev moves on while the operator reads the page.
    hub.put("dev/web", &configmap("web", "2")).await.unwrap();
    let csrf = confirm.csrf();
    let form = [
        ("from", "dev"),
        ("to", "prod"),
        ("plan", plan.as_str()),
        ("csrf", &csrf),
    ];
    let stale = b.post("/ui/actions/promote", &form).await;
    assert_eq!(stale.status, StatusCode::CONFLICT);
    assert!(stale.body.contains("plan changed"), "{}", stale.body);
    assert!(hub.unit("prod/web").await.is_err(), "nothing was promoted");
    // Confirmed again (forced: dev has no cluster to prove health), it
    // goes through with what was shown.
    let again = b.get("/ui/confirm/promote?from=dev&to=prod").await;
    assert!(
        again.body.contains("name=\"reason\""),
        "blocked: a reason is asked for"
    );
    let plan = field_value(&again.body, "plan").unwrap();
    assert!(plan.starts_with("dev/web@2=prod/web@0:"), "{plan}");
    let done = b
        .promote_confirmed(&plan, "no dev cluster yet", &csrf)
        .await;
    assert_eq!(done.status, StatusCode::SEE_OTHER, "{}", done.body);
    let prod = hub.unit("prod/web").await.unwrap();
    assert_eq!(prod.unit.unwrap().head_revision, 1);
}

/// A plan shown before the target changed (rolled back during an incident)
/// is not promoted: "web is up to date" no longer holds, and confirming the
/// page would have promoted web again unseen.
#[tokio::test]
async fn a_promotion_confirmed_before_the_target_was_rolled_back_is_refused() {
    let hub = TestHub::start().await;
    hub.create_env("dev").await;
    hub.create_env("prod").await;
    let mut admin = hub.admin().await;
    for v in ["1", "2"] {
        hub.put("dev/web", &configmap("web", v)).await.unwrap();
        let r = within(
            "promote web",
            admin.promote(pb::PromoteRequest {
                from: "dev".into(),
                to: "prod".into(),
                units: vec!["web".into()],
                force: true,
                reason: "no dev cluster".into(),
                ..Default::default()
            }),
        )
        .await
        .unwrap()
        .into_inner();
        assert!(!r.blocked, "{}", r.message);
    }
    hub.put("dev/api", &configmap("api", "1")).await.unwrap();
    let b = Browserless::for_hub(&hub);
    b.login(&hub.admin_token).await;
    let confirm = b.get("/ui/confirm/promote?from=dev&to=prod").await;
    let plan = field_value(&confirm.body, "plan").expect("the plan rides with the form");
    assert!(plan.contains("prod/web@2:skip-"), "{plan}");
    within(
        "roll prod/web back",
        admin.rollback_unit(pb::RollbackUnitRequest {
            unit: "prod/web".into(),
            to_revision: 1,
            message: "incident".into(),
        }),
    )
    .await
    .unwrap();
    let csrf = confirm.csrf();
    let stale = b.promote_confirmed(&plan, "no dev cluster", &csrf).await;
    assert_eq!(stale.status, StatusCode::CONFLICT, "{}", stale.body);
    assert!(stale.body.contains("plan changed"), "{}", stale.body);
    let web = hub.unit("prod/web").await.unwrap();
    assert_eq!(web.unit.unwrap().head_revision, 3, "the rollback stands");
    assert!(hub.unit("prod/api").await.is_err(), "nothing was promoted");
    // A form that never went through the confirmation page is refused too.
    let unconfirmed = b
        .post(
            "/ui/actions/promote",
            &[
                ("from", "dev"),
                ("to", "prod"),
                ("reason", "no dev cluster"),
                ("csrf", &csrf),
            ],
        )
        .await;
    assert_eq!(
        unconfirmed.status,
        StatusCode::CONFLICT,
        "{}",
        unconfirmed.body
    );
    assert!(hub.unit("prod/api").await.is_err(), "nothing was promoted");
    // Overrides change what a promotion commits without a revision: an
    // override set after the page was shown changes the plan too.
    let confirm = b.get("/ui/confirm/promote?from=dev&to=prod").await;
    let plan = field_value(&confirm.body, "plan").unwrap();
    within(
        "override",
        admin.set_overrides(pb::SetOverridesRequest {
            unit: "prod/web".into(),
            overrides: vec![pb::Override {
                kind: "ConfigMap".into(),
                name: "web".into(),
                namespace: "apps".into(),
                path: "data.value".into(),
                value_json: "\"0\"".into(),
            }],
        }),
    )
    .await
    .unwrap();
    let stale = b.promote_confirmed(&plan, "no dev cluster", &csrf).await;
    assert_eq!(stale.status, StatusCode::CONFLICT, "{}", stale.body);
    assert!(hub.unit("prod/api").await.is_err(), "nothing was promoted");
}

#[tokio::test]
async fn secret_override_values_stay_hidden() {
    let hub = TestHub::start().await;
    hub.create_env("dev").await;
    hub.create_env("prod").await;
    let secret = "apiVersion: v1\nkind: Secret\nmetadata:\n  name: creds\n  namespace: apps\nstringData:\n  password: dev-password\n";
    hub.put("prod/web", secret).await.unwrap();
    let admin = || async { hub.admin().await };
    within(
        "override",
        admin().await.set_overrides(pb::SetOverridesRequest {
            unit: "prod/web".into(),
            overrides: vec![pb::Override {
                kind: "Secret".into(),
                name: "creds".into(),
                namespace: "apps".into(),
                path: "stringData.password".into(),
                value_json: "\"prod-override-value\"".into(),
            }],
        }),
    )
    .await
    .unwrap();
    let token = hub.create_operator("viewer", "read-only").await;
    let get = |token: String| {
        let hub = &hub;
        async move {
            within(
                "get unit",
                hub.client(&token).await.get_unit(pb::GetUnitRequest {
                    unit: "prod/web".into(),
                    ..Default::default()
                }),
            )
            .await
            .unwrap()
            .into_inner()
            .unit
            .unwrap()
            .overrides
        }
    };
    // Admins read them back as set; read-only operators see `***`.
    assert_eq!(
        get(hub.admin_token.clone()).await[0].value_json,
        "\"prod-override-value\""
    );
    assert_eq!(get(token.clone()).await[0].value_json, "\"***\"");
    // Listings show them to no one (`unit get` is where admins read them):
    // units, the status matrix, a watch's snapshot and its commit events.
    for who in [hub.admin_token.clone(), token.clone()] {
        let mut client = hub.client(&who).await;
        let mut watch = within(
            "watch",
            client.watch_status(pb::WatchStatusRequest::default()),
        )
        .await
        .unwrap()
        .into_inner();
        let snapshot = within("the snapshot", watch.message()).await.unwrap();
        hub.put("prod/web", &secret.replace("dev-password", "rotated"))
            .await
            .unwrap();
        let committed = within("the commit event", async {
            loop {
                let ev = watch.message().await.unwrap().unwrap();
                if !ev.units.is_empty() {
                    return ev;
                }
            }
        })
        .await;
        let listed = within(
            "list units",
            client.list_units(pb::ListUnitsRequest::default()),
        )
        .await
        .unwrap();
        let status = within("status", client.get_status(pb::GetStatusRequest::default()))
            .await
            .unwrap();
        for shown in [
            format!("{listed:?}"),
            format!("{status:?}"),
            format!("{snapshot:?}"),
            format!("{committed:?}"),
        ] {
            assert!(shown.contains("***"), "{shown}");
            assert!(!shown.contains("prod-override-value"), "{shown}");
        }
    }
    // No page shows them, and the audit never recorded them.
    for who in [hub.admin_token.clone(), token] {
        let b = Browserless::for_hub(&hub);
        b.login(&who).await;
        for path in ["/ui/units/prod/web", "/ui/audit"] {
            let page = b.get(path).await;
            assert_eq!(page.status, StatusCode::OK);
            assert!(!page.body.contains("prod-override-value"), "{path}");
        }
    }
    assert!(
        !audit(&hub)
            .await
            .iter()
            .any(|e| e.detail.contains("prod-override-value"))
    );
}

/// The text of an HTML page, tags dropped.
fn text_of(html: &str) -> String {
    let mut out = String::new();
    let mut in_tag = false;
    for ch in html.chars() {
        match ch {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    out
}

#[tokio::test]
async fn a_large_environment_is_summarised_from_counts() {
    let hub = TestHub::start().await;
    hub.create_env("big").await;
    // Seven clusters (more than a cell shows one by one): five agents
    // report Ready, two clusters have no agent.
    let mut agents = Vec::new();
    for i in 0..7 {
        let token = hub.create_cluster(&format!("big-{i}"), "big").await;
        if i < 5 {
            let mut agent = SimAgent::new(&hub.endpoint(), hub.ca(), &token).auto_ready();
            agent.start();
            agents.push(agent);
        }
    }
    hub.put("big/web", &configmap("web", "1")).await.unwrap();
    let b = Browserless::for_hub(&hub);
    assert_eq!(
        b.login(&hub.admin_token).await.status,
        StatusCode::SEE_OTHER
    );
    until("five Ready, two silent and offline", || async {
        let text = text_of(&b.get("/ui/").await.body);
        text.contains("Ready 5") && text.contains("Unknown 2") && text.contains("2 offline")
    })
    .await;
    // A newer revision: until the agents report it, they are behind.
    for a in &mut agents {
        a.stop().await;
    }
    hub.put("big/web", &configmap("web", "2")).await.unwrap();
    let text = text_of(&b.get("/ui/").await.body);
    assert!(
        text.contains("5 behind") && text.contains("Unknown 2"),
        "{text}"
    );
}
