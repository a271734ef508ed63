//! Lists (pagination with continue tokens, selectors, resourceVersion
//! semantics) and watch streams (history replay, bookmarks, 410 Gone after
//! compaction).

use std::collections::{BTreeMap, HashSet};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use http::{Response, StatusCode, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Bytes, Frame};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::errors::ApiError;
use super::registry::ResourceType;
use super::routes::Target;
use super::selector::{FieldSelector, LabelSelector};
use super::server::{Body, Inner, error, json_response};
use super::store::Event;

pub(super) fn selectors(
    target: &Target,
    q: &BTreeMap<String, String>,
) -> Result<(LabelSelector, FieldSelector), ApiError> {
    Ok((
        LabelSelector::parse(q.get("labelSelector").map_or("", String::as_str))?,
        FieldSelector::parse(
            q.get("fieldSelector").map_or("", String::as_str),
            target.ty.namespaced,
        )?,
    ))
}

pub(super) fn list_kind(ty: &ResourceType) -> String {
    format!("{}List", ty.kind)
}

pub(super) fn list(inner: &Inner, target: &Target, q: &BTreeMap<String, String>) -> Response<Body> {
    let (labels, fields) = match selectors(target, q) {
        Ok(s) => s,
        Err(e) => return error(&e),
    };
    let state = inner.state.lock().unwrap();
    let ty = &target.ty;
    let ns = (ty.namespaced && !target.namespace.is_empty()).then_some(target.namespace.as_str());
    let mut items: Vec<Value> = state
        .list(ty, ns)
        .into_iter()
        .filter(|o| labels.matches(o["metadata"]["labels"].as_object()) && fields.matches(o))
        .collect();
    let mut rv = state.rv;
    // Continue tokens: base64 JSON {rv, start}.
    if let Some(token) = q.get("continue").filter(|t| !t.is_empty()) {
        let parsed = base64::engine::general_purpose::STANDARD
            .decode(token)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok());
        let Some(parsed) = parsed else {
            return error(&ApiError::bad_request(format!(
                "invalid continue token: {token}"
            )));
        };
        let token_rv = parsed["rv"].as_u64().unwrap_or(0);
        if token_rv <= state.compacted {
            return error(&ApiError::gone(
                "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
            ));
        }
        rv = token_rv;
        let start = parsed["start"].as_str().unwrap_or_default().to_owned();
        items.retain(|o| {
            let k = format!(
                "{}/{}",
                o["metadata"]["namespace"].as_str().unwrap_or(""),
                o["metadata"]["name"].as_str().unwrap_or("")
            );
            k > start
        });
    }
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if let Some(limit) = q
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0)
        && items.len() > limit
    {
        items.truncate(limit);
        let last = items.last().expect("non-empty");
        let start = format!(
            "{}/{}",
            last["metadata"]["namespace"].as_str().unwrap_or(""),
            last["metadata"]["name"].as_str().unwrap_or("")
        );
        let token = base64::engine::general_purpose::STANDARD
            .encode(json!({"rv": rv, "start": start}).to_string());
        meta["continue"] = json!(token);
    }
    if ty.crd.is_none() {
        for i in &mut items {
            if let Some(o) = i.as_object_mut() {
                o.remove("kind");
                o.remove("apiVersion");
            }
        }
    }
    json_response(
        200,
        &json!({"kind": list_kind(ty), "apiVersion": ty.api_version(), "metadata": meta, "items": items}),
    )
}

pub(super) fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut s = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    s.push(b'\n');
    Bytes::from(s)
}

pub(super) async fn watch(
    inner: Arc<Inner>,
    target: Target,
    q: &BTreeMap<String, String>,
) -> Response<Body> {
    let (labels, fields) = match selectors(&target, q) {
        Ok(s) => s,
        Err(e) => return error(&e),
    };
    let ty = target.ty.clone();
    let ns = (ty.namespaced && !target.namespace.is_empty()).then(|| target.namespace.clone());
    let matches_key = {
        let (group, plural, ns) = (ty.group.clone(), ty.plural.clone(), ns.clone());
        move |ev: &Event| {
            ev.key.group == group
                && ev.key.plural == plural
                && ns.as_ref().is_none_or(|n| ev.key.namespace == *n)
        }
    };
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let send_initial = q.get("sendInitialEvents").is_some_and(|v| v == "true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs);
    let requested = q.get("resourceVersion").cloned().unwrap_or_default();

    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let (mut live, initial, mut last_rv, seen) = {
        let state = inner.state.lock().unwrap();
        let live = state.events.subscribe();
        let mut seen: HashSet<(String, String)> = HashSet::new();
        let mut initial = Vec::new();
        let from_state = requested.is_empty() || requested == "0";
        if from_state {
            for o in state.list(&ty, ns.as_deref()) {
                if labels.matches(o["metadata"]["labels"].as_object()) && fields.matches(&o) {
                    seen.insert((
                        o["metadata"]["namespace"].as_str().unwrap_or("").into(),
                        o["metadata"]["name"].as_str().unwrap_or("").into(),
                    ));
                    initial.push(event_line("ADDED", &o));
                }
            }
            if send_initial {
                initial.push(event_line(
                    "BOOKMARK",
                    &json!({"kind": ty.kind, "apiVersion": ty.api_version(), "metadata": {"resourceVersion": state.rv.to_string(), "annotations": {"k8s.io/initial-events-end": "true"}}}),
                ));
            }
            (live, initial, state.rv, seen)
        } else {
            let Ok(n) = requested.parse::<u64>() else {
                return error(&ApiError::bad_request(format!(
                    "invalid resource version: {requested}"
                )));
            };
            if n > state.rv {
                return error(&ApiError::new(
                    504,
                    "Timeout",
                    format!(
                        "Timeout: Too large resource version: {n}, current: {}",
                        state.rv
                    ),
                ));
            }
            if n < state.compacted {
                let st = ApiError::gone(format!(
                    "too old resource version: {n} ({})",
                    state.compacted + 1
                ))
                .status();
                let line = event_line("ERROR", &st);
                let (etx, erx) = mpsc::channel::<Bytes>(1);
                let _ = etx.try_send(line);
                drop(etx);
                return stream_response(erx);
            }
            // Objects that exist now count as seen for selector transitions.
            for o in state.list(&ty, ns.as_deref()) {
                if labels.matches(o["metadata"]["labels"].as_object()) && fields.matches(&o) {
                    seen.insert((
                        o["metadata"]["namespace"].as_str().unwrap_or("").into(),
                        o["metadata"]["name"].as_str().unwrap_or("").into(),
                    ));
                }
            }
            for ev in state.history.iter().filter(|e| e.rv > n && matches_key(e)) {
                let o = state.at_version(&ev.object, &ty);
                if labels.matches(o["metadata"]["labels"].as_object()) && fields.matches(&o) {
                    initial.push(event_line(ev.kind, &o));
                }
            }
            (live, initial, state.rv.max(n), seen)
        }
    };
    let mut drop_rx = inner.drop_watches.subscribe();
    let interval = inner.options.bookmark_interval;
    let api_version = ty.api_version();
    let kind = ty.kind.clone();
    let state = inner.state.clone();
    tokio::spawn(async move {
        let mut seen = seen;
        for line in initial {
            if tx.send(line).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::Instant::now() + timeout.unwrap_or(Duration::from_secs(3600));
        let mut ticker = tokio::time::interval(interval);
        ticker.tick().await;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => break,
                _ = drop_rx.recv() => break,
                _ = ticker.tick(), if bookmarks => {
                    let rv = state.lock().unwrap().rv;
                    let b = json!({"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": rv.to_string()}});
                    if tx.send(event_line("BOOKMARK", &b)).await.is_err() { break; }
                }
                ev = live.recv() => {
                    // Fell behind: end the stream; the client resumes.
                    let Ok(ev) = ev else { break };
                    if ev.rv <= last_rv || !matches_key(&ev) {
                        continue;
                    }
                    last_rv = ev.rv;
                    let mut o = ev.object.clone();
                    o["apiVersion"] = json!(api_version);
                    let id = (o["metadata"]["namespace"].as_str().unwrap_or("").to_owned(), o["metadata"]["name"].as_str().unwrap_or("").to_owned());
                    let matches = labels.matches(o["metadata"]["labels"].as_object()) && fields.matches(&o);
                    let kind = match (ev.kind, matches, seen.contains(&id)) {
                        ("DELETED", _, true) => { seen.remove(&id); "DELETED" }
                        ("DELETED", _, false) => continue,
                        (_, true, true) => "MODIFIED",
                        (_, true, false) => { seen.insert(id); "ADDED" }
                        (_, false, true) => { seen.remove(&id); "DELETED" }
                        (_, false, false) => continue,
                    };
                    if tx.send(event_line(kind, &o)).await.is_err() { break; }
                }
            }
        }
    });
    stream_response(rx)
}

pub(super) fn stream_response(rx: mpsc::Receiver<Bytes>) -> Response<Body> {
    let stream =
        tokio_stream::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), |b| {
            Ok::<_, Infallible>(Frame::data(b))
        });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .expect("valid response")
}
