//! Operator authentication for `HubService`, as one tower layer: every
//! call's credential is resolved once, before the method runs, and the
//! operator (actor and role) rides in the request's extensions. A caller
//! that is not an operator never reaches a method. An operator's call runs
//! in a task of its own on the hub's control lane (where the listener also
//! homes operators' connections, [`crate::grpc::listener`]). Methods that
//! change something ask for the admin role with [`Operator::admin`].

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::metadata::MetadataMap;
use tonic::server::NamedService;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::auth::{Principal, authenticate_peer};
use crate::control::Hub;
use crate::error::{HubError, Result};
use crate::model::{Actor, Role};

/// The operator calling a `HubService` method.
#[derive(Clone, Debug)]
pub struct Operator {
    pub actor: Actor,
    pub role: Role,
}

impl Operator {
    /// The operator of a request the layer let through.
    pub fn of<T>(req: &tonic::Request<T>) -> Result<Operator> {
        req.extensions()
            .get::<Operator>()
            .cloned()
            .ok_or(HubError::Unauthenticated)
    }

    /// The actor, if the operator may change things (the admin role).
    pub fn admin(self) -> Result<Actor> {
        match self.role {
            Role::Admin => Ok(self.actor),
            Role::ReadOnly => Err(HubError::PermissionDenied),
        }
    }
}

/// Wraps a service so that only operators reach it.
#[derive(Clone)]
pub struct OperatorLayer {
    hub: Arc<Hub>,
}

impl OperatorLayer {
    pub fn new(hub: Arc<Hub>) -> OperatorLayer {
        OperatorLayer { hub }
    }
}

impl<S> tower::Layer<S> for OperatorLayer {
    type Service = OperatorAuth<S>;

    fn layer(&self, inner: S) -> OperatorAuth<S> {
        OperatorAuth {
            inner,
            hub: self.hub.clone(),
        }
    }
}

/// A service behind [`OperatorLayer`].
#[derive(Clone)]
pub struct OperatorAuth<S> {
    inner: S,
    hub: Arc<Hub>,
}

impl<S: NamedService> NamedService for OperatorAuth<S> {
    const NAME: &'static str = S::NAME;
}

/// The credential of a request: its metadata and the client
/// certificates of its TLS session.
struct Credential {
    md: MetadataMap,
    certs: Option<Arc<Vec<rustls::pki_types::CertificateDer<'static>>>>,
}

impl Credential {
    fn of(req: &http::Request<Body>) -> Credential {
        Credential {
            md: MetadataMap::from_headers(req.headers().clone()),
            certs: req
                .extensions()
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(TlsConnectInfo::peer_certs),
        }
    }
}

async fn operator(hub: &Hub, c: Credential) -> Result<Operator> {
    let certs = c.certs.as_deref().map(Vec::as_slice);
    match authenticate_peer(hub.store.as_ref(), &c.md, certs).await? {
        Principal::Operator { name, role } => Ok(Operator {
            actor: Actor::Operator(name),
            role,
        }),
        Principal::Agent(_) => Err(HubError::PermissionDenied),
    }
}

impl<S> tower::Service<http::Request<Body>> for OperatorAuth<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future =
        Pin<Box<dyn Future<Output = std::result::Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        // The clone that was made ready is the one that serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let hub = self.hub.clone();
        let credential = Credential::of(&req);
        Box::pin(async move {
            let op = match operator(&hub, credential).await {
                Ok(op) => op,
                Err(e) => return Ok(tonic::Status::from(e).into_http()),
            };
            req.extensions_mut().insert(op);
            // An operator's call runs in a task of its own on the control
            // lane: to its end even when the caller goes away (a revocation
            // still ends the revoked agent's session), a panic becoming an
            // internal error. Only once authenticated: a stranger's call
            // ends with its stream.
            hub.control
                .spawn(inner.call(req))
                .await
                .unwrap_or_else(|e| {
                    tracing::error!(error = %e, "an operator call failed");
                    Ok(tonic::Status::internal("internal error").into_http())
                })
        })
    }
}
