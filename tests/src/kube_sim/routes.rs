//! Routing of the API server's requests (axum): resources by verb under
//! `/api/v1` and `/apis/GROUP/VERSION` (one handler per verb, a
//! [`Resource`] extractor for what a request addresses), discovery for the
//! rest, fault injection and the bearer-token check in front.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::{Method, Response, header};
use hyper::body::Bytes;
use serde_json::{Value, json};

use super::discovery::{aggregated_discovery, discovery};
use super::errors::ApiError;
use super::rbac::{Attributes, authorize};
use super::registry::ResourceType;
use super::selector::LabelSelector;
use super::server::{Body, Inner, error, json_response, not_found_page, write_key};
use super::store::{State, WriteOpts};
use super::watch::{list, watch};

pub(super) fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = (b[i] == b'%' && i + 2 < b.len())
            .then(|| {
                std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
            })
            .flatten();
        match (b[i], hex) {
            (_, Some(x)) => {
                out.push(x);
                i += 3;
            }
            (b'+', None) => {
                out.push(b' ');
                i += 1;
            }
            (c, None) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(super) fn query(q: Option<&str>) -> BTreeMap<String, String> {
    q.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// What a request addresses.
pub(super) struct Target {
    pub(super) ty: ResourceType,
    pub(super) namespace: String,
    pub(super) name: Option<String>,
    pub(super) sub: Option<String>,
}

/// The API server's routes: resources by verb under `/api/v1` and
/// `/apis/GROUP/VERSION`, discovery for everything else; every request
/// passes the fault injection and the bearer-token check first.
pub(super) fn api_router(inner: Arc<Inner>) -> axum::Router {
    use axum::routing::get;
    let verbs = || {
        get(read)
            .post(create)
            .put(replace)
            .patch(patch)
            .delete(remove)
            .fallback(|| async {
                error(&ApiError::new(
                    405,
                    "MethodNotAllowed",
                    "the server does not allow this method on the requested resource",
                ))
            })
    };
    axum::Router::new()
        .route("/api/v1/{*rest}", verbs())
        .route("/apis/{group}/{version}/{*rest}", verbs())
        .fallback(discover)
        .layer(axum::middleware::from_fn_with_state(inner.clone(), guard))
        .with_state(inner)
}

/// Latency, injected failures, then the bearer token.
pub(super) async fn guard(
    axum::extract::State(inner): axum::extract::State<Arc<Inner>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let f = &inner.faults;
    let latency = f.latency_ms.load(Ordering::Relaxed);
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    let unavailable = || {
        error(&ApiError::new(
            503,
            "ServiceUnavailable",
            "the server is currently unable to handle the request",
        ))
        .into_response()
    };
    if f.is_down() {
        return unavailable();
    }
    let rate = f.error_per_mille.load(Ordering::Relaxed);
    let path_and_query = req.uri().path_and_query().map_or("", |p| p.as_str());
    if (rate > 0 && u64::from(rand::random::<u16>() % 1000) < rate)
        || f.fails(req.method(), path_and_query)
    {
        return unavailable();
    }
    if let Some(token) = &inner.options.token {
        let ok = bearer(req.headers())
            .is_some_and(|t| t == token || inner.accounts.lock().unwrap().contains_key(t));
        if !ok {
            return error(&ApiError::new(401, "Unauthorized", "Unauthorized")).into_response();
        }
    }
    next.run(req).await
}

/// The request's bearer token.
fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// Discovery documents (GET only); anything else is not found.
pub(super) async fn discover(
    axum::extract::State(inner): axum::extract::State<Arc<Inner>>,
    method: Method,
    uri: http::Uri,
    headers: http::HeaderMap,
) -> Response<Body> {
    if method != Method::GET {
        return not_found_page();
    }
    let segs: Vec<String> = uri
        .path()
        .split('/')
        .filter(|s| !s.is_empty())
        .map(decode)
        .collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let aggregated = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| {
            accept.split(',').any(|t| {
                let params: Vec<&str> = t.split(';').map(str::trim).collect();
                params.contains(&"g=apidiscovery.k8s.io")
                    && params.contains(&"as=APIGroupDiscoveryList")
                    && (params.contains(&"v=v2") || params.contains(&"v=v2beta1"))
            })
        });
    let doc = if aggregated {
        aggregated_discovery(&inner, &segs)
    } else {
        None
    };
    doc.or_else(|| discovery(&inner, &segs))
        .unwrap_or_else(not_found_page)
}

/// A request to a resource: what it addresses and its parameters.
pub(super) struct Resource {
    target: Target,
    q: BTreeMap<String, String>,
    content_type: String,
    /// `fieldManager`, as given (apply needs one).
    manager: String,
    /// The manager recorded for other writes: `fieldManager`, else the
    /// client's user agent (as the API server does).
    update_manager: String,
    dry_run: bool,
    force: bool,
}

impl Resource {
    fn opts(&self, manager: &str) -> WriteOpts {
        WriteOpts {
            manager: manager.to_owned(),
            dry_run: self.dry_run,
            force: self.force,
            subresource: self.target.sub.clone(),
        }
    }

    fn api_version(&self) -> String {
        let ty = &self.target.ty;
        if ty.group.is_empty() {
            ty.version.clone()
        } else {
            format!("{}/{}", ty.group, ty.version)
        }
    }
}

impl axum::extract::FromRequestParts<Arc<Inner>> for Resource {
    type Rejection = Response<Body>;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        inner: &Arc<Inner>,
    ) -> Result<Resource, Response<Body>> {
        let segs: Vec<String> = parts
            .uri
            .path()
            .split('/')
            .filter(|s| !s.is_empty())
            .map(decode)
            .collect();
        let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
        let (group, version, rest) = match segs.as_slice() {
            ["api", "v1", rest @ ..] => ("", "v1", rest),
            ["apis", g, v, rest @ ..] => (*g, *v, rest),
            _ => return Err(not_found_page()),
        };
        let q = query(parts.uri.query());
        let account =
            bearer(&parts.headers).and_then(|t| inner.accounts.lock().unwrap().get(t).cloned());
        let target = {
            let state = inner.state.lock().unwrap();
            // Authorization comes first: a type the caller may not use is
            // forbidden before it is unknown.
            let attributes = Attributes::of(&parts.method, group, rest, &q);
            if let Some(who) = &account {
                authorize(&state, who, &attributes).map_err(|e| error(&e))?;
            }
            let target = resolve(&state, group, version, rest).ok_or_else(not_found_page)?;
            // A server-side apply that creates the object is a create too.
            let applying = parts
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|c| c.starts_with("application/apply-patch"));
            if let (Some(who), Some(name)) = (&account, &target.name)
                && applying
                && target.sub.is_none()
                && state.get(&target.ty, &target.namespace, name).is_err()
            {
                authorize(&state, who, &attributes.as_verb("create")).map_err(|e| error(&e))?;
            }
            target
        };
        let header = |name: header::HeaderName| {
            parts
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let content_type = header(header::CONTENT_TYPE)
            .map(|v| v.split(';').next().unwrap_or("").trim().to_owned())
            .unwrap_or_default();
        if content_type.contains("protobuf") {
            return Err(error(&ApiError::new(
                415,
                "UnsupportedMediaType",
                "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml",
            )));
        }
        let dry_run = match q.get("dryRun").map(String::as_str) {
            None | Some("") => false,
            Some("All") => true,
            Some(other) => {
                return Err(error(&ApiError::invalid(
                    "PatchOptions.meta.k8s.io",
                    "",
                    "dryRun",
                    "FieldValueNotSupported",
                    &format!("Unsupported value: \"{other}\": supported values: \"All\""),
                )));
            }
        };
        let manager = q.get("fieldManager").cloned().unwrap_or_default();
        let update_manager = if manager.is_empty() {
            let agent = header(header::USER_AGENT).unwrap_or_else(|| "unknown".into());
            agent.split('/').next().unwrap_or("unknown").to_owned()
        } else {
            manager.clone()
        };
        Ok(Resource {
            target,
            force: q.get("force").is_some_and(|v| v == "true"),
            q,
            content_type,
            manager,
            update_manager,
            dry_run,
        })
    }
}

/// A request body: JSON, or YAML.
pub(super) fn parse_body(b: &Bytes) -> Result<Value, ApiError> {
    if b.is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_slice(b).or_else(|_| {
        let s =
            std::str::from_utf8(b).map_err(|_| ApiError::bad_request("the body is not UTF-8"))?;
        serde_saphyr::from_str::<Value>(s)
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))
    })
}

impl Inner {
    /// After a successful write: wake the controllers and count it.
    fn wrote(&self, r: &Resource, name: Option<String>) {
        if !r.dry_run {
            self.changed.notify_one();
        }
        if let Some(name) = name {
            let key = write_key(
                &r.api_version(),
                &r.target.ty.plural,
                &r.target.namespace,
                &name,
            );
            let counts = if r.dry_run {
                &self.dry_runs
            } else {
                &self.writes
            };
            *counts.lock().unwrap().entry(key).or_default() += 1;
        }
    }

    /// The response to a write, counted when it succeeded.
    fn answer(
        &self,
        r: &Resource,
        name: Option<String>,
        result: Result<(u16, Value), ApiError>,
    ) -> Response<Body> {
        match result {
            Ok((status, o)) => {
                self.wrote(r, name);
                json_response(status, &o)
            }
            Err(e) => error(&e),
        }
    }
}

pub(super) type SimState = axum::extract::State<Arc<Inner>>;

/// GET: one object, a list, or a watch.
pub(super) async fn read(axum::extract::State(inner): SimState, r: Resource) -> Response<Body> {
    let Some(name) = r.target.name.as_deref() else {
        return if r.q.get("watch").is_some_and(|w| w == "true" || w == "1") {
            watch(inner.clone(), r.target, &r.q).await
        } else {
            list(&inner, &r.target, &r.q)
        };
    };
    let s = inner.state.lock().unwrap();
    match s.get(&r.target.ty, &r.target.namespace, name) {
        Ok(o) => json_response(200, &o),
        Err(e) => error(&e),
    }
}

/// The API server's limit on a request body (`MaxRequestBodyBytes`).
pub(super) const MAX_BODY: usize = 3 * 1024 * 1024;

/// A request body, refused past [`MAX_BODY`] as the API server refuses it
/// (413 with a `Status`).
pub(super) struct Payload(Bytes);

impl<S: Send + Sync> axum::extract::FromRequest<S> for Payload {
    type Rejection = Response<Body>;

    async fn from_request(req: axum::extract::Request, _: &S) -> Result<Payload, Self::Rejection> {
        let limited = http_body_util::Limited::new(req.into_body(), MAX_BODY);
        match http_body_util::BodyExt::collect(limited).await {
            Ok(body) => Ok(Payload(body.to_bytes())),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(error(&ApiError::new(
                413,
                "RequestEntityTooLarge",
                format!("Request entity too large: limit is {MAX_BODY}"),
            ))),
            Err(e) => Err(error(&ApiError::bad_request(format!(
                "cannot read the request body: {e}"
            )))),
        }
    }
}

/// POST: create.
pub(super) async fn create(
    axum::extract::State(inner): SimState,
    r: Resource,
    Payload(body): Payload,
) -> Response<Body> {
    if r.target.name.is_some() {
        return method_not_allowed();
    }
    let result = parse_body(&body).and_then(|b| {
        let mut s = inner.state.lock().unwrap();
        s.create(
            &r.target.ty,
            &r.target.namespace,
            b,
            &r.opts(&r.update_manager),
        )
    });
    inner.answer(&r, body_name(&body), result.map(|o| (201, o)))
}

/// PUT: replace (the object, its status, or a Namespace's finalizers).
pub(super) async fn replace(
    axum::extract::State(inner): SimState,
    r: Resource,
    Payload(body): Payload,
) -> Response<Body> {
    let Some(name) = r.target.name.clone() else {
        return method_not_allowed();
    };
    let (ty, ns) = (&r.target.ty, r.target.namespace.as_str());
    let result = parse_body(&body).and_then(|body| {
        let mut s = inner.state.lock().unwrap();
        if r.target.sub.as_deref() == Some("finalize") {
            // Namespace finalize: replace spec.finalizers.
            let mut live = s.get(ty, ns, &name)?;
            live["spec"]["finalizers"] = body["spec"]["finalizers"].clone();
            let o = WriteOpts {
                subresource: None,
                force: false,
                ..r.opts(&r.update_manager)
            };
            s.replace(ty, ns, &name, live, &o)
        } else {
            s.replace(ty, ns, &name, body, &r.opts(&r.update_manager))
        }
    });
    inner.answer(&r, Some(name), result.map(|o| (200, o)))
}

/// PATCH: server-side apply, or a merge, strategic or JSON patch.
pub(super) async fn patch(
    axum::extract::State(inner): SimState,
    r: Resource,
    Payload(body): Payload,
) -> Response<Body> {
    let Some(name) = r.target.name.clone() else {
        return method_not_allowed();
    };
    let (ty, ns) = (&r.target.ty, r.target.namespace.as_str());
    let result = parse_body(&body).and_then(|parsed| {
        let mut s = inner.state.lock().unwrap();
        if r.content_type == "application/apply-patch+yaml" {
            s.apply(ty, ns, &name, parsed, &r.opts(&r.manager))
                .map(|(o, created)| (if created { 201 } else { 200 }, o))
        } else {
            s.patch(
                ty,
                ns,
                &name,
                &r.content_type,
                &parsed,
                &r.opts(&r.update_manager),
            )
            .map(|o| (200, o))
        }
    });
    inner.answer(&r, Some(name), result)
}

/// DELETE: one object, or a collection by label selector.
pub(super) async fn remove(
    axum::extract::State(inner): SimState,
    r: Resource,
    Payload(body): Payload,
) -> Response<Body> {
    let (ty, ns) = (&r.target.ty, r.target.namespace.as_str());
    let Some(name) = r.target.name.clone() else {
        let sel = match LabelSelector::parse(r.q.get("labelSelector").map_or("", String::as_str)) {
            Ok(s) => s,
            Err(e) => return error(&e),
        };
        let mut s = inner.state.lock().unwrap();
        let names: Vec<String> = s
            .list(ty, ty.namespaced.then_some(ns))
            .into_iter()
            .filter(|o| sel.matches(o["metadata"]["labels"].as_object()))
            .filter_map(|o| o["metadata"]["name"].as_str().map(str::to_owned))
            .collect();
        for n in &names {
            let _ = s.delete(ty, ns, n, &json!({}), r.dry_run);
        }
        drop(s);
        inner.wrote(&r, None);
        return json_response(
            200,
            &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
        );
    };
    let mut options = parse_body(&body).unwrap_or_else(|_| json!({}));
    if let Some(p) = r.q.get("propagationPolicy") {
        options["propagationPolicy"] = json!(p);
    }
    let result = inner
        .state
        .lock()
        .unwrap()
        .delete(ty, ns, &name, &options, r.dry_run);
    inner.answer(&r, Some(name), result.map(|o| (200, o)))
}

pub(super) fn method_not_allowed() -> Response<Body> {
    error(&ApiError::new(
        405,
        "MethodNotAllowed",
        "the server does not allow this method on the requested resource",
    ))
}

/// `metadata.name` of a request body (JSON or YAML), if any.
pub(super) fn body_name(body: &Bytes) -> Option<String> {
    let v: Value = serde_json::from_slice(body)
        .ok()
        .or_else(|| serde_saphyr::from_str(std::str::from_utf8(body).ok()?).ok())?;
    v["metadata"]["name"].as_str().map(str::to_owned)
}

pub(super) fn resolve(state: &State, group: &str, version: &str, rest: &[&str]) -> Option<Target> {
    let t = |plural: &str| state.find_type(group, version, plural);
    match rest {
        ["namespaces", ns, plural, tail @ ..]
            if t(plural).is_some_and(|x| x.namespaced) && tail.len() <= 2 =>
        {
            let ty = t(plural)?;
            let sub = tail.get(1).map(|s| (*s).to_owned());
            if sub
                .as_deref()
                .is_some_and(|s| s != "status" || !ty.status_subresource)
            {
                return None;
            }
            Some(Target {
                ty,
                namespace: (*ns).to_owned(),
                name: tail.first().map(|s| (*s).to_owned()),
                sub,
            })
        }
        [plural, tail @ ..] if tail.len() <= 2 => {
            let ty = t(plural)?;
            let sub = tail.get(1).map(|s| (*s).to_owned());
            let allowed = match sub.as_deref() {
                None => true,
                Some("status") => ty.status_subresource,
                Some("finalize") => ty.kind == "Namespace",
                _ => false,
            };
            if !allowed || (ty.namespaced && !tail.is_empty()) {
                return None;
            }
            Some(Target {
                ty,
                namespace: String::new(),
                name: tail.first().map(|s| (*s).to_owned()),
                sub,
            })
        }
        _ => None,
    }
}
