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
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use unitsync_proto::dial::{self, Role};
//! let (endpoint, dialer) = dial::prepare("https://hub:7443", Role::Operator, None, None)?;
//! let channel = endpoint.connect_with_connector(dialer).await?;
//! # drop(channel); Ok(()) }
//! ```

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tonic::transport::Endpoint;

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
    let dialer = Dialer {
        host: Arc::from(host),
        port,
        tls,
    };
    Ok((endpoint, dialer))
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
    host: Arc<str>,
    port: u16,
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dialer")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// A connection to the hub, plaintext or TLS.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

impl Dialer {
    /// One connection.
    pub async fn dial(&self) -> io::Result<Box<dyn Stream>> {
        let tcp = TcpStream::connect((&*self.host, self.port)).await?;
        tcp.set_nodelay(true)?;
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
        assert_eq!((&*dialer.host, dialer.port), ("::1", 443));
        let (_, dialer) = prepare("http://127.0.0.1:7000", Role::Operator, None, None).unwrap();
        assert!(dialer.tls.is_none());
    }
}
