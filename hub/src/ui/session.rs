//! Who is looking: a login with an operator token makes a session (a
//! random id in an `HttpOnly`, `SameSite=Strict` cookie, `Secure` over
//! TLS); every request re-checks that the token still names the operator
//! (rotation or removal ends the session at once); every form carries the
//! session's CSRF token, and the login form a one-time token of its own
//! (double-submit cookie), so no other site can log a browser in or act
//! for it. Sessions live in this hub's memory: a restart logs everyone out.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Form;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use base64::Engine as _;
use maud::html;
use rand::RngCore as _;
use serde::Deserialize;

use super::{Ui, UiError, Viewer, layout};
use crate::auth::{OPERATOR_TOKEN_PREFIX, hash_token};
use crate::model::{Actor, Role};
use crate::store::Store;
use crate::store::TokenHash;

/// The session cookie's name.
pub(super) const COOKIE: &str = "unitsync_ui";
/// The login form's one-time cookie.
const LOGIN_COOKIE: &str = "unitsync_login";
/// A session ends after this long without a request.
const IDLE: Duration = Duration::from_secs(3600);
/// ... and after this long in any case.
const MAX_AGE: Duration = Duration::from_secs(12 * 3600);

/// A logged-in operator.
#[derive(Clone, Debug)]
pub(super) struct Session {
    pub operator: String,
    pub role: Role,
    /// The token's hash, re-checked on every request.
    token: TokenHash,
    /// Every form carries it; a POST without it is refused.
    pub csrf: String,
    started: Instant,
    last: Instant,
    /// A message for the next page.
    flash: Option<String>,
}

impl Session {
    pub(super) fn actor(&self) -> Actor {
        Actor::Operator(self.operator.clone())
    }

    pub(super) fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    fn expired(&self) -> bool {
        self.last.elapsed() >= IDLE || self.started.elapsed() >= MAX_AGE
    }
}

fn random() -> String {
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// The sessions of this hub.
#[derive(Default)]
pub(super) struct Sessions(Mutex<HashMap<String, Session>>);

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Logs in with an operator token; the new session's id.
    pub(super) async fn login(&self, store: &dyn Store, token: &str) -> Option<String> {
        let token = token.trim();
        if !token.starts_with(OPERATOR_TOKEN_PREFIX) {
            return None;
        }
        let hash = hash_token(token);
        let op = store.operator_by_token(&hash).await.ok()??;
        let id = random();
        let now = Instant::now();
        let mut all = self.lock();
        all.retain(|_, s| !s.expired());
        all.insert(
            id.clone(),
            Session {
                operator: op.name,
                role: op.role,
                token: hash,
                csrf: random(),
                started: now,
                last: now,
                flash: None,
            },
        );
        Some(id)
    }

    pub(super) fn logout(&self, id: &str) {
        self.lock().remove(id);
    }

    /// Leaves a message for the session's next page.
    pub(super) fn flash(&self, id: &str, message: String) {
        if let Some(s) = self.lock().get_mut(id) {
            s.flash = Some(message);
        }
    }

    pub(super) fn take_flash(&self, id: &str) -> Option<String> {
        self.lock().get_mut(id)?.flash.take()
    }

    /// The session a request's cookie names, if it is still good (the
    /// token still names its operator; the role is read again).
    pub(super) async fn current(
        &self,
        store: &dyn Store,
        headers: &HeaderMap,
    ) -> Option<(String, Session)> {
        let id = cookie(headers, COOKIE)?;
        let session = {
            let mut all = self.lock();
            let s = all.get_mut(&id)?;
            if s.expired() {
                all.remove(&id);
                return None;
            }
            s.last = Instant::now();
            s.clone()
        };
        match store.operator_by_token(&session.token).await {
            Ok(Some(op)) if op.name == session.operator => {
                let mut s = session;
                s.role = op.role;
                Some((id, s))
            }
            _ => {
                self.logout(&id);
                None
            }
        }
    }

    /// Whether the session `id` is still open (live streams end with it).
    pub(super) fn is_open(&self, id: &str) -> bool {
        self.lock().get(id).is_some_and(|s| !s.expired())
    }
}

/// A cookie's value from the request.
pub(super) fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// A `Set-Cookie` value scoped to the dashboard (empty `value`: the
/// cookie goes).
fn set_cookie(name: &str, value: &str, max_age: Duration, secure: bool) -> HeaderValue {
    let max_age = if value.is_empty() {
        0
    } else {
        max_age.as_secs()
    };
    let s = format!(
        "{name}={value}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={max_age}{}",
        if secure { "; Secure" } else { "" }
    );
    // Names and values are ours (base64url): always a valid header.
    HeaderValue::from_str(&s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Constant-time comparison of two tokens.
pub(super) fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Where to go after logging in: a dashboard path, never another site.
fn local_next(next: Option<&str>) -> String {
    match next {
        Some(n)
            if n.starts_with("/ui/")
                && !n.contains("//")
                && !n.contains('\\')
                && !n.chars().any(char::is_control) =>
        {
            n.to_owned()
        }
        _ => "/ui/".to_owned(),
    }
}

/// A POST must come from a dashboard page: its CSRF token matches the
/// session's, and its `Origin` (when the browser sends one) is this host.
pub(super) fn check_post(
    viewer: &Viewer,
    headers: &HeaderMap,
    token: Option<&str>,
) -> Result<(), UiError> {
    if !same_origin(headers) {
        return Err(UiError::forbidden(
            "refused: the request came from another site",
        ));
    }
    match token {
        Some(t) if same(t, &viewer.session.csrf) => Ok(()),
        _ => Err(UiError::forbidden(
            "refused: the form is missing its CSRF token or it is stale; reload the page and try again",
        )),
    }
}

fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let origin_host = origin.split_once("://").map(|(_, h)| h);
    origin_host.is_some() && origin_host == host
}

#[derive(Deserialize)]
pub(super) struct LoginQuery {
    next: Option<String>,
}

/// The login page (and its one-time form token).
pub(super) async fn login_form(State(ui): State<Arc<Ui>>, Query(q): Query<LoginQuery>) -> Response {
    login_page(&ui, q.next.as_deref(), None, StatusCode::OK)
}

fn login_page(ui: &Ui, next: Option<&str>, error: Option<&str>, status: StatusCode) -> Response {
    let nonce = random();
    let body = html! {
        form.login method="post" action="/ui/login" {
            h1 { "unitsync" }
            p.muted { "Log in with an operator token (" code { "unitsync operator create" } " or the hub's "
                code { "admin.token" } "). Read-only tokens see everything and change nothing." }
            @if let Some(e) = error { p.error role="alert" { (e) } }
            label for="token" { "Operator token" }
            input #token type="password" name="token" autocomplete="off" required autofocus;
            input type="hidden" name="next" value=(local_next(next));
            input type="hidden" name="csrf" value=(nonce);
            button.primary type="submit" { "Log in" }
        }
    };
    let mut res = (status, layout::bare("Log in", body)).into_response();
    res.headers_mut().insert(
        header::SET_COOKIE,
        set_cookie(LOGIN_COOKIE, &nonce, Duration::from_secs(3600), ui.secure),
    );
    res
}

#[derive(Deserialize)]
pub(super) struct LoginForm {
    token: String,
    next: Option<String>,
    csrf: Option<String>,
}

pub(super) async fn login(
    State(ui): State<Arc<Ui>>,
    headers: HeaderMap,
    Form(f): Form<LoginForm>,
) -> Response {
    let nonce = cookie(&headers, LOGIN_COOKIE);
    let fresh = matches!((&nonce, &f.csrf), (Some(a), Some(b)) if same(a, b));
    if !fresh || !same_origin(&headers) {
        return login_page(
            &ui,
            f.next.as_deref(),
            Some("The login form expired; try again."),
            StatusCode::FORBIDDEN,
        );
    }
    let Some(id) = ui.sessions.login(ui.hub.store.as_ref(), &f.token).await else {
        return login_page(
            &ui,
            f.next.as_deref(),
            Some("That token is not a valid operator token."),
            StatusCode::UNAUTHORIZED,
        );
    };
    // A new login replaces the browser's previous session, if any.
    if let Some(old) = cookie(&headers, COOKIE) {
        ui.sessions.logout(&old);
    }
    let mut res = Redirect::to(&local_next(f.next.as_deref())).into_response();
    let h = res.headers_mut();
    h.append(
        header::SET_COOKIE,
        set_cookie(COOKIE, &id, MAX_AGE, ui.secure),
    );
    h.append(
        header::SET_COOKIE,
        set_cookie(LOGIN_COOKIE, "", Duration::ZERO, ui.secure),
    );
    res
}

#[derive(Deserialize)]
pub(super) struct LogoutForm {
    csrf: Option<String>,
}

pub(super) async fn logout(
    State(ui): State<Arc<Ui>>,
    viewer: Viewer,
    headers: HeaderMap,
    Form(f): Form<LogoutForm>,
) -> Result<Response, UiError> {
    check_post(&viewer, &headers, f.csrf.as_deref())?;
    ui.sessions.logout(&viewer.id);
    let mut res = Redirect::to("/ui/login").into_response();
    res.headers_mut().insert(
        header::SET_COOKIE,
        set_cookie(COOKIE, "", Duration::ZERO, ui.secure),
    );
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_read_and_set_strictly() {
        let mut h = HeaderMap::new();
        h.insert("cookie", "a=1; unitsync_ui=abc; b=2".parse().unwrap());
        assert_eq!(cookie(&h, COOKIE).as_deref(), Some("abc"));
        assert_eq!(cookie(&h, "c"), None);
        let c = set_cookie(COOKIE, "abc", MAX_AGE, true);
        let c = c.to_str().unwrap();
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && c.contains("Secure"));
        assert!(c.contains("Path=/ui;"));
        let plain = set_cookie(COOKIE, "abc", MAX_AGE, false);
        assert!(!plain.to_str().unwrap().contains("Secure"));
        let gone = set_cookie(COOKIE, "", MAX_AGE, false);
        assert!(gone.to_str().unwrap().contains("Max-Age=0"));
        assert!(same("abc", "abc") && !same("abc", "abd") && !same("abc", "ab"));
    }

    #[test]
    fn after_login_only_dashboard_paths() {
        assert_eq!(
            local_next(Some("/ui/units/dev/web?from=1")),
            "/ui/units/dev/web?from=1"
        );
        for bad in [
            "https://evil.example/",
            "//evil.example/ui/",
            "/ui//evil.example",
            "/ui/\\evil",
            "/metrics",
            "/ui/\r\nSet-Cookie: x",
        ] {
            assert_eq!(local_next(Some(bad)), "/ui/", "{bad}");
        }
        assert_eq!(local_next(None), "/ui/");
    }

    #[test]
    fn posts_from_other_sites_are_refused() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "hub.example:7080".parse().unwrap());
        assert!(same_origin(&h), "no Origin header: a same-site form");
        h.insert(header::ORIGIN, "http://hub.example:7080".parse().unwrap());
        assert!(same_origin(&h));
        h.insert(header::ORIGIN, "https://evil.example".parse().unwrap());
        assert!(!same_origin(&h));
        h.insert(header::ORIGIN, "null".parse().unwrap());
        assert!(!same_origin(&h));
    }
}
