//! Live updates: a Server-Sent Events stream per open page that says
//! "something changed" (statuses recorded, revisions committed, agents
//! connecting or leaving), at most a few times a second however busy the
//! fleet is; the page's script then fetches its live region again. Each
//! (re)connection starts with one event, so nothing that happened while
//! the stream was down is missed. Streams end with the session or the
//! hub.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::IntoResponse;
use axum::response::sse::{Event, KeepAlive, Sse};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};

use super::{Ui, Viewer};

/// Changes within this window become one event.
const COALESCE: Duration = Duration::from_millis(250);
/// How often an idle stream checks that its session is still open.
const SESSION_CHECK: Duration = Duration::from_secs(30);

struct Stream {
    rx: tokio::sync::broadcast::Receiver<crate::events::HubEvent>,
    ui: Arc<Ui>,
    session: String,
    first: bool,
}

pub(super) async fn events(State(ui): State<Arc<Ui>>, viewer: Viewer) -> impl IntoResponse {
    let state = Stream {
        rx: ui.hub.subscribe(),
        ui: ui.clone(),
        session: viewer.id,
        first: true,
    };
    let stream = futures::stream::unfold(state, |mut s| async move {
        if !std::mem::take(&mut s.first) {
            next_change(&mut s).await?;
        }
        // A session that ended (logged out, expired) hears nothing more.
        if !s.ui.sessions.is_open(&s.session) {
            return None;
        }
        Some((
            Ok::<_, Infallible>(Event::default().event("change").data("fleet")),
            s,
        ))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

/// Waits for the next change (and lets its burst settle); `None` ends the
/// stream.
async fn next_change(s: &mut Stream) -> Option<()> {
    loop {
        tokio::select! {
            () = s.ui.stop.cancelled() => return None,
            r = tokio::time::timeout(SESSION_CHECK, s.rx.recv()) => match r {
                Err(_) if !s.ui.sessions.is_open(&s.session) => return None,
                Err(_) => {}
                Ok(Err(RecvError::Closed)) => return None,
                Ok(Ok(_) | Err(RecvError::Lagged(_))) => break,
            },
        }
    }
    tokio::select! {
        () = s.ui.stop.cancelled() => return None,
        () = tokio::time::sleep(COALESCE) => {}
    }
    loop {
        match s.rx.try_recv() {
            Ok(_) | Err(TryRecvError::Lagged(_)) => {}
            Err(TryRecvError::Empty) => return Some(()),
            Err(TryRecvError::Closed) => return None,
        }
    }
}
