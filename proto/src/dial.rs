//! Dialing the hub: the TCP connection, TLS (rustls) for an `https://`
//! address, and the caller's role named in the TLS handshake.
//!
//! A client offers ALPN `h2` (what is negotiated) and after it a token
//! naming its role ([`Role`]). The hub reads the token in the ClientHello
//! before it does any of the handshake's work and handshakes an operator's
//! connection on its control lane: during a reconnect storm of thousands of
//! agents an operator's handshake does not queue behind theirs (agents'
//! handshakes stay on the hub's accept lane). The token is a scheduling
//! hint, not a credential: every call still authenticates, and a
//! connection's first call decides where it is served. A hub (or TLS
//! terminator) that does not know the token negotiates `h2` alone; a client
//! that sends none is handshaken as an agent is.
//!
//! The TCP connection is hyper-util's `HttpConnector`'s: every address the
//! hub's name resolves to is tried in turn, each within its share of
//! [`CONNECT_TIMEOUT`], and the other address family starts 300 ms after
//! the first (Happy Eyeballs, RFC 8305), so one dead address (a blackholed
//! IPv6 route, a node gone) does not stall the dial until the kernel gives up.
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use unitsync_proto::dial::{self, Role};
//! let (endpoint, dialer) = dial::prepare("https://hub:7443", Role::Operator, None, None)?;
//! let channel = endpoint.connect_with_connector(dialer).await?;
//! # drop(channel); Ok(()) }
//! ```

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::{GaiResolver, Name};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tonic::transport::Endpoint;
use tower::Service as _;

/// How long the TCP connection may take, shared by the addresses tried.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The protocol negotiated: HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";

/// Who is dialing, as named in the ClientHello.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// An agent's session.
    Agent,
    /// An operator's calls (the CLI).
    Operator,
}

impl Role {
    /// The ALPN token naming the role (offered after `h2`).
    pub const fn alpn(self) -> &'static [u8] {
        match self {
            Role::Agent => b"unitsync-agent",
            Role::Operator => b"unitsync-operator",
        }
    }

    /// The role a ClientHello's ALPN list names (the first token that
    /// names one), if any.
    pub fn from_alpn<'a>(protocols: impl IntoIterator<Item = &'a [u8]>) -> Option<Role> {
        protocols.into_iter().find_map(|p| {
            [Role::Agent, Role::Operator]
                .into_iter()
                .find(|r| r.alpn() == p)
        })
    }
}

/// Why the hub's address or TLS settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("invalid hub address {0:?} (expected http://HOST:PORT or https://HOST:PORT)")]
    Address(String),
    /// The address is not repeated: it carries a password.
    #[error(
        "the hub address carries credentials (USER:PASSWORD@); the hub does not take them there: use a token or a client certificate"
    )]
    Credentials,
    #[error("invalid CA certificate: {0}")]
    Ca(String),
    #[error("invalid client certificate or key: {0}")]
    Identity(String),
    #[error("cannot set up TLS: {0}")]
    Tls(String),
}

/// The endpoint to configure (timeouts, keepalive) and the dialer to
/// connect it with ([`Endpoint::connect_with_connector`]). `ca_pem` is the
/// CA to trust (the Mozilla roots when `None`); `identity` a client
/// certificate chain and key, both PEM. The dialer sets `TCP_NODELAY`.
pub fn prepare(
    address: &str,
    role: Role,
    ca_pem: Option<&str>,
    identity: Option<(&str, &str)>,
) -> Result<(Endpoint, Dialer), DialError> {
    // Before anything echoes the address back.
    if address.contains('@') {
        return Err(DialError::Credentials);
    }
    let bad = || DialError::Address(address.to_owned());
    let uri: http::Uri = address.parse().map_err(|_| bad())?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(bad()),
    };
    let authority = uri.authority().ok_or_else(bad)?.clone();
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tls = if https {
        let name = ServerName::try_from(host.to_owned()).map_err(|_| bad())?;
        Some((client_config(role, ca_pem, identity)?, name))
    } else {
        None
    };
    // tonic applies TLS of its own to an `https://` endpoint; the dialer
    // does it here, so the endpoint dials `http://` and keeps the caller's
    // scheme and authority as the requests' origin.
    let endpoint = Endpoint::from_shared(format!("http://{authority}"))
        .map_err(|_| bad())?
        .origin(uri);
    let target = format!("http://{}:{port}", authority.host())
        .parse()
        .map_err(|_| bad())?;
    Ok((
        endpoint,
        Dialer::new(target, tls, Resolver::System(GaiResolver::new())),
    ))
}

fn client_config(
    role: Role,
    ca_pem: Option<&str>,
    identity: Option<(&str, &str)>,
) -> Result<Arc<rustls::ClientConfig>, DialError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_pem {
        Some(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                let cert = cert.map_err(|e| DialError::Ca(e.to_string()))?;
                roots.add(cert).map_err(|e| DialError::Ca(e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(DialError::Ca("no certificate in the PEM".to_owned()));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| DialError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| DialError::Identity(e.to_string()))?;
            // The key's own error text never carries the key.
            let key = PrivateKeyDer::from_pem_slice(key.as_bytes())
                .map_err(|e| DialError::Identity(e.to_string()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| DialError::Identity(e.to_string()))?
        }
    };
    config.alpn_protocols = vec![ALPN_H2.to_vec(), role.alpn().to_vec()];
    Ok(Arc::new(config))
}

/// Opens connections to the hub: TCP, then TLS when the address is
/// `https://` (a tower service of the endpoint's URI, which it ignores).
#[derive(Clone)]
pub struct Dialer {
    tcp: HttpConnector<Resolver>,
    /// `http://HOST:PORT`, what `tcp` connects to.
    target: http::Uri,
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dialer")
            .field("target", &self.target)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// Resolves the hub's name: the system's resolver (`getaddrinfo`, on a
/// blocking thread), or in tests given addresses.
#[derive(Clone)]
enum Resolver {
    System(GaiResolver),
    #[cfg(test)]
    Fixed(Arc<[SocketAddr]>),
}

impl tower::Service<Name> for Resolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        match self {
            Resolver::System(gai) => {
                let resolved = gai.call(name);
                Box::pin(async move { Ok(resolved.await?.collect::<Vec<_>>().into_iter()) })
            }
            #[cfg(test)]
            Resolver::Fixed(addrs) => {
                let addrs = addrs.to_vec();
                Box::pin(async move { Ok(addrs.into_iter()) })
            }
        }
    }
}

/// A connection to the hub, plaintext or TLS.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

impl Dialer {
    fn new(
        target: http::Uri,
        tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
        resolver: Resolver,
    ) -> Dialer {
        let mut tcp = HttpConnector::new_with_resolver(resolver);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(CONNECT_TIMEOUT));
        Dialer { tcp, target, tls }
    }

    /// One connection.
    pub async fn dial(&self) -> io::Result<Box<dyn Stream>> {
        let mut connector = self.tcp.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(io::Error::other)?;
        let tcp = connector
            .call(self.target.clone())
            .await
            .map_err(|e| {
                // Its kind is its cause's (refused, timed out...).
                let kind = std::error::Error::source(&e)
                    .and_then(|c| c.downcast_ref::<io::Error>())
                    .map_or(io::ErrorKind::Other, io::Error::kind);
                io::Error::new(kind, e)
            })?
            .into_inner();
        let Some((config, name)) = &self.tls else {
            return Ok(Box::new(tcp));
        };
        let tls = tokio_rustls::TlsConnector::from(config.clone())
            .connect(name.clone(), tcp)
            .await?;
        match tls.get_ref().1.alpn_protocol() {
            // A terminator that negotiates nothing: HTTP/2 with prior
            // knowledge, as the hub speaks it.
            None | Some(ALPN_H2) => Ok(Box::new(tls)),
            Some(other) => Err(io::Error::other(format!(
                "the hub negotiated {:?}, not HTTP/2",
                String::from_utf8_lossy(other)
            ))),
        }
    }
}

impl tower::Service<http::Uri> for Dialer {
    type Response = TokioIo<Box<dyn Stream>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let dialer = self.clone();
        Box::pin(async move { dialer.dial().await.map(TokioIo::new) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_role_is_read_back_from_the_protocols_offered() {
        for role in [Role::Agent, Role::Operator] {
            assert_eq!(Role::from_alpn([ALPN_H2, role.alpn()]), Some(role));
        }
        assert_eq!(Role::from_alpn([ALPN_H2]), None);
        assert_eq!(
            Role::from_alpn([ALPN_H2, b"unitsync-other".as_slice()]),
            None
        );
    }

    #[test]
    fn addresses_and_certificates_are_checked_before_dialing() {
        assert!(matches!(
            prepare("hub:7443", Role::Agent, None, None),
            Err(DialError::Address(_))
        ));
        assert!(matches!(
            prepare("ftp://hub:7443", Role::Agent, None, None),
            Err(DialError::Address(_))
        ));
        assert!(matches!(
            prepare(
                "https://hub:7443",
                Role::Agent,
                Some("not a certificate"),
                None
            ),
            Err(DialError::Ca(_))
        ));
        let (_, dialer) = prepare("https://[::1]", Role::Operator, None, None).unwrap();
        assert_eq!(dialer.target, "http://[::1]:443/");
        let (_, dialer) = prepare("http://127.0.0.1:7000", Role::Operator, None, None).unwrap();
        assert!(dialer.tls.is_none());
    }

    #[test]
    fn an_address_with_credentials_is_refused_without_repeating_them() {
        let e = prepare("https://ops:hunter2@hub:7443", Role::Operator, None, None).unwrap_err();
        assert!(matches!(e, DialError::Credentials), "{e}");
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    /// An address that never answers: a listener whose accept queue is
    /// full (the kernel drops further SYNs).
    async fn unanswering() -> (tokio::net::TcpListener, Vec<tokio::net::TcpStream>) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(0).unwrap();
        let address = listener.local_addr().unwrap();
        let mut queued = Vec::new();
        for _ in 0..16 {
            let connect = tokio::net::TcpStream::connect(address);
            match tokio::time::timeout(Duration::from_millis(300), connect).await {
                Ok(tcp) => queued.push(tcp.unwrap()),
                Err(_) => return (listener, queued),
            }
        }
        panic!("the accept queue never filled");
    }

    #[tokio::test]
    async fn an_address_that_never_answers_does_not_stall_the_dial() {
        let (dead, _queued) = unanswering().await;
        let port = dead.local_addr().unwrap().port();
        // The hub's name resolves to the dead address first, then to one
        // that answers.
        let live = tokio::net::TcpListener::bind(("127.0.0.2", port))
            .await
            .unwrap();
        let addrs: Arc<[SocketAddr]> =
            Arc::new([dead.local_addr().unwrap(), live.local_addr().unwrap()]);
        let target = format!("http://hub.test:{port}").parse().unwrap();
        let dialer = Dialer::new(target, None, Resolver::Fixed(addrs));
        // Within the dead address's share of the connect timeout, not the
        // kernel's (minutes).
        let dialed = tokio::time::timeout(CONNECT_TIMEOUT, dialer.dial()).await;
        dialed.expect("dialed in time").expect("connected");
        tokio::time::timeout(Duration::from_secs(5), live.accept())
            .await
            .expect("the live address was dialed")
            .unwrap();
    }
}
