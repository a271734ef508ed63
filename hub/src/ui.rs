//! The dashboard at `/ui/`: server-rendered pages (maud) of the fleet, units,
//! promotions, clusters and the audit log, read through the same [`Hub`]
//! operations the gRPC API uses, with admin actions behind a confirmation
//! step and the same audit as the CLI.
//!
//! - [`session`]: login with an operator token, the session cookie, CSRF;
//! - [`layout`]: the page shell and the small pieces every page uses
//!   (phase badges in colour *and* text, times, source badges);
//! - [`fleet`], [`unit`], [`promotions`], [`clusters`], [`audit`]: pages;
//! - [`actions`]: confirmation pages and the POSTs that change something;
//! - [`live`]: Server-Sent Events that tell an open page to re-render its
//!   live region (pages read fine without JavaScript);
//! - [`assets`]: the embedded stylesheet and script (no CDN, no build).
//!
//! Security: every page needs a session; read-only operators see the
//! same pages without the buttons, and their POSTs are refused; every form
//! carries the session's CSRF token and every POST is checked against it
//! and the request's `Origin`; responses carry a strict
//! Content-Security-Policy (no inline script or style); Secret values in
//! manifests are masked for everyone; maud escapes everything it renders.

mod actions;
mod assets;
mod audit;
mod clusters;
mod fleet;
mod layout;
mod live;
mod promotions;
mod session;
mod unit;

use std::sync::Arc;

use axum::Router;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};

use tokio_util::sync::CancellationToken;

use crate::control::Hub;
use crate::error::{ErrorChain, HubError};
use session::{Session, Sessions};

/// The dashboard's shared state.
struct Ui {
    hub: Arc<Hub>,
    sessions: Sessions,
    /// Served over TLS: cookies are `Secure`.
    secure: bool,
    /// Ends live streams when the hub stops.
    stop: CancellationToken,
}

/// The dashboard's routes (under `/ui`).
pub fn router(hub: Arc<Hub>, secure: bool, stop: CancellationToken) -> Router {
    let ui = Arc::new(Ui {
        hub,
        sessions: Sessions::default(),
        secure,
        stop,
    });
    Router::new()
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/", get(fleet::page))
        .route("/ui/login", get(session::login_form).post(session::login))
        .route("/ui/logout", post(session::logout))
        .route("/ui/units/{env}/{name}", get(unit::page))
        .route("/ui/promotions", get(promotions::page))
        .route("/ui/clusters", get(clusters::page))
        .route("/ui/clusters/{name}", get(clusters::detail))
        .route("/ui/audit", get(audit::page))
        .route("/ui/confirm/{action}", get(actions::confirm))
        .route("/ui/actions/{action}", post(actions::act))
        .route("/ui/events", get(live::events))
        .route("/ui/assets/{file}", get(assets::serve))
        .fallback(|| async { not_found() })
        .layer(axum::middleware::map_response_with_state(
            secure,
            security_headers,
        ))
        .layer(axum::middleware::map_request(host_from_authority))
        .with_state(ui)
}

/// HTTP/2 carries the host in `:authority`, not `Host`; the Origin check
/// compares with `Host`.
async fn host_from_authority(mut req: axum::extract::Request) -> axum::extract::Request {
    if !req.headers().contains_key(header::HOST)
        && let Some(host) = req
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        req.headers_mut().insert(header::HOST, host);
    }
    req
}

/// The Content-Security-Policy of every dashboard response: scripts and
/// styles only from the hub's own files, nothing inline, no framing.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                       connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

async fn security_headers(
    axum::extract::State(secure): axum::extract::State<bool>,
    mut res: Response,
) -> Response {
    let h = res.headers_mut();
    if secure {
        h.insert(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=31536000"),
        );
    }
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // Not `no-referrer`: browsers then send `Origin: null` with the
    // dashboard's own forms, which the Origin check must refuse.
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    res
}

/// The logged-in operator looking at a page.
struct Viewer {
    /// The session id (the cookie's value).
    id: String,
    session: Session,
    /// The page's live region only (a live update), not the whole page.
    partial: bool,
    /// A message from the last action, shown once.
    flash: Option<String>,
}

impl Viewer {
    fn is_admin(&self) -> bool {
        self.session.is_admin()
    }
}

impl FromRequestParts<Arc<Ui>> for Viewer {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, ui: &Arc<Ui>) -> Result<Self, Response> {
        let partial = parts.headers.contains_key("x-partial");
        let Some((id, session)) = ui
            .sessions
            .current(ui.hub.store.as_ref(), &parts.headers)
            .await
        else {
            // A page asks the browser to log in; a live update or a POST
            // just fails (the script reloads into the login page).
            if parts.method == Method::GET && !partial && !parts.uri.path().ends_with("/events") {
                let next = parts
                    .uri
                    .path_and_query()
                    .map_or("/ui/", |p| p.as_str())
                    .to_owned();
                let to = format!("/ui/login?next={}", encode_query(&next));
                return Err(Redirect::to(&to).into_response());
            }
            return Err((StatusCode::UNAUTHORIZED, "log in again\n").into_response());
        };
        // A live update (or the event stream) must not eat the message
        // meant for the page.
        let flash = if partial || parts.uri.path().ends_with("/events") {
            None
        } else {
            ui.sessions.take_flash(&id)
        };
        Ok(Viewer {
            id,
            session,
            partial,
            flash,
        })
    }
}

/// Percent-encodes a query value.
fn encode_query(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// What a page handler returns.
type Page = Result<Response, UiError>;

/// A failed page: the status and what the operator reads (never a secret:
/// hub errors are written for operators; internal ones are logged only).
#[derive(Debug)]
struct UiError {
    status: StatusCode,
    message: String,
}

impl UiError {
    fn new(status: StatusCode, message: impl Into<String>) -> UiError {
        UiError {
            status,
            message: message.into(),
        }
    }

    fn forbidden(message: impl Into<String>) -> UiError {
        UiError::new(StatusCode::FORBIDDEN, message)
    }
}

impl From<HubError> for UiError {
    fn from(e: HubError) -> UiError {
        let status = match &e {
            HubError::InvalidArgument(_) | HubError::Name(_) | HubError::Manifest(_) => {
                StatusCode::BAD_REQUEST
            }
            HubError::NotFound(_) => StatusCode::NOT_FOUND,
            HubError::AlreadyExists(_) | HubError::FailedPrecondition(_) => StatusCode::CONFLICT,
            HubError::Unauthenticated => StatusCode::UNAUTHORIZED,
            HubError::PermissionDenied => StatusCode::FORBIDDEN,
            HubError::ResourceExhausted(_) => StatusCode::SERVICE_UNAVAILABLE,
            HubError::Store(_) | HubError::Internal(_) => {
                tracing::error!(error = %ErrorChain(&e), "dashboard request failed");
                return UiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal error; see the hub log",
                );
            }
        };
        UiError::new(status, e.to_string())
    }
}

impl IntoResponse for UiError {
    fn into_response(self) -> Response {
        (self.status, layout::error_page(self.status, &self.message)).into_response()
    }
}

fn not_found() -> Response {
    UiError::new(StatusCode::NOT_FOUND, "no such page").into_response()
}
