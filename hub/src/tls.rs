//! TLS for the hub, on by default: on first start the hub creates its own
//! CA (`ca.crt`, `ca.key`) in the data directory and, at every start, a
//! server certificate signed by it for the configured names; or it uses a
//! certificate and key it is given. Clients trust `ca.crt`. The CA also
//! issues agents' client certificates and signs their renewal CSRs.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// How the hub serves gRPC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsMode {
    /// A CA kept in the data directory signs a server certificate for these
    /// DNS names and IP addresses.
    Generated { names: Vec<String> },
    /// A certificate chain and key in PEM files.
    Files { cert: PathBuf, key: PathBuf },
    /// No TLS: development only, logged loudly.
    Plaintext,
}

/// PEM material for the server.
pub struct ServerTls {
    pub cert_pem: String,
    pub key_pem: String,
    /// The CA clients should trust (generated mode).
    pub ca_pem: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read or write {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create certificates")]
    Certificate(#[source] rcgen::Error),
    #[error("the server certificate, key or client CA is not usable: {0}")]
    Unusable(String),
}

impl ServerTls {
    /// A rustls configuration serving this certificate over HTTPS (HTTP/2
    /// and HTTP/1.1), for the dashboard and probes with `--http-tls`.
    pub fn https_config(&self) -> Result<std::sync::Arc<rustls::ServerConfig>, TlsError> {
        self.server_config(&[b"h2", b"http/1.1"], None)
    }

    /// A rustls configuration for the gRPC listener (HTTP/2): clients may
    /// present a certificate issued by `client_ca` (mutual TLS for agents)
    /// or none (bearer tokens).
    pub fn grpc_config(
        &self,
        client_ca: Option<&str>,
    ) -> Result<std::sync::Arc<rustls::ServerConfig>, TlsError> {
        self.server_config(&[b"h2"], client_ca)
    }

    fn server_config(
        &self,
        alpn: &[&[u8]],
        client_ca: Option<&str>,
    ) -> Result<std::sync::Arc<rustls::ServerConfig>, TlsError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let bad = |e: &dyn std::fmt::Display| TlsError::Unusable(e.to_string());
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let chain = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(&e))?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(|e| bad(&e))?;
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(&e))?;
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(ca.as_bytes()) {
                    roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    std::sync::Arc::new(roots),
                    provider,
                )
                .allow_unauthenticated()
                .build()
                .map_err(|e| bad(&e))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_single_cert(chain, key).map_err(|e| bad(&e))?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(std::sync::Arc::new(config))
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes a file atomically (a temporary file, fsynced, renamed over the
/// target) with `mode`, so a crash never leaves half a key or certificate.
fn write_atomic(path: &Path, text: &str, mode: u32) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(text.as_bytes()).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    if let Some(dir) = path.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        d.sync_all().map_err(io(dir))?;
    }
    Ok(())
}

/// The CA's parameters; rebuilding them with the stored key gives the same
/// issuer name and key identifier as the stored certificate.
fn ca_params() -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(TlsError::Certificate)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "unitsync hub CA");
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_after = rcgen::date_time_ymd(2036, 1, 1);
    Ok(params)
}

/// The hub CA, loaded once at start: it signs the server certificate
/// (generated mode), agents' client certificates and their renewals.
pub struct HubCa {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for HubCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HubCa(<key redacted>)")
    }
}

impl HubCa {
    /// The CA in `data_dir`, if both files are there (never creates one: a
    /// missing or unreadable CA must not be silently replaced).
    pub fn load(data_dir: &Path) -> Result<Option<HubCa>, TlsError> {
        let cert_path = data_dir.join("ca.crt");
        let key_path = data_dir.join("ca.key");
        if !cert_path.exists() && !key_path.exists() {
            return Ok(None);
        }
        let cert_pem = std::fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
        let key = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
        let key = KeyPair::from_pem(&key).map_err(TlsError::Certificate)?;
        Ok(Some(HubCa {
            cert_pem,
            issuer: Issuer::new(ca_params()?, key),
        }))
    }

    /// The CA in `data_dir`, created on first start (key 0600; both files
    /// written atomically).
    pub fn load_or_create(data_dir: &Path) -> Result<HubCa, TlsError> {
        if let Some(ca) = Self::load(data_dir)? {
            return Ok(ca);
        }
        let key = KeyPair::generate().map_err(TlsError::Certificate)?;
        let cert = ca_params()?
            .self_signed(&key)
            .map_err(TlsError::Certificate)?;
        let (cert_path, key_path) = (data_dir.join("ca.crt"), data_dir.join("ca.key"));
        write_atomic(&key_path, &key.serialize_pem(), 0o600)?;
        write_atomic(&cert_path, &cert.pem(), 0o644)?;
        tracing::info!(path = %cert_path.display(), "created the hub CA");
        Ok(HubCa {
            cert_pem: cert.pem(),
            issuer: Issuer::new(ca_params()?, key),
        })
    }

    /// The CA certificate clients trust (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a client certificate for `cluster`, valid from `not_before`
    /// for `validity` (CPU-bound: call off the async threads).
    pub fn issue_client_cert(
        &self,
        cluster: &str,
        not_before: std::time::SystemTime,
        validity: std::time::Duration,
    ) -> Result<ClientCert, TlsError> {
        let not_after = not_before + validity;
        let params = client_params(cluster, not_before, not_after)?;
        let key = KeyPair::generate().map_err(TlsError::Certificate)?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(TlsError::Certificate)?;
        Ok(ClientCert {
            fingerprint: fingerprint(cert.der()),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            not_after,
        })
    }

    /// Signs a CSR for `cluster`: the subject, names, usage and validity
    /// are the hub's, only the public key comes from the request. Returns
    /// the certificate, its fingerprint and expiry.
    pub fn sign_csr(
        &self,
        cluster: &str,
        csr_pem: &str,
        validity: std::time::Duration,
    ) -> Result<(String, String, std::time::SystemTime), TlsError> {
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(TlsError::Certificate)?;
        let now = std::time::SystemTime::now();
        let not_after = now + validity;
        csr.params = client_params(cluster, now - std::time::Duration::from_secs(60), not_after)?;
        let cert = csr.signed_by(&self.issuer).map_err(TlsError::Certificate)?;
        Ok((cert.pem(), fingerprint(cert.der()), not_after))
    }
}

/// Prepares the server's TLS material (`None` for plaintext) and the hub CA
/// (created in generated mode; otherwise used when the data directory has
/// one).
pub fn prepare(
    data_dir: &Path,
    mode: &TlsMode,
) -> Result<(Option<ServerTls>, Option<HubCa>), TlsError> {
    match mode {
        TlsMode::Plaintext => Ok((None, HubCa::load(data_dir)?)),
        TlsMode::Files { cert, key } => Ok((
            Some(ServerTls {
                cert_pem: std::fs::read_to_string(cert).map_err(io(cert))?,
                key_pem: std::fs::read_to_string(key).map_err(io(key))?,
                ca_pem: None,
            }),
            HubCa::load(data_dir)?,
        )),
        TlsMode::Generated { names } => {
            let ca = HubCa::load_or_create(data_dir)?;
            let mut params =
                CertificateParams::new(Vec::<String>::new()).map_err(TlsError::Certificate)?;
            params
                .distinguished_name
                .push(DnType::CommonName, "unitsync hub");
            params.subject_alt_names = names
                .iter()
                .map(|n| match n.parse::<std::net::IpAddr>() {
                    Ok(ip) => Ok(SanType::IpAddress(ip)),
                    Err(_) => n.clone().try_into().map(SanType::DnsName),
                })
                .collect::<Result<_, _>>()
                .map_err(TlsError::Certificate)?;
            let key = KeyPair::generate().map_err(TlsError::Certificate)?;
            let cert = params
                .signed_by(&key, &ca.issuer)
                .map_err(TlsError::Certificate)?;
            Ok((
                Some(ServerTls {
                    cert_pem: cert.pem(),
                    key_pem: key.serialize_pem(),
                    ca_pem: Some(ca.cert_pem.clone()),
                }),
                Some(ca),
            ))
        }
    }
}

/// What every client certificate says: the cluster (CN and a SPIFFE-style
/// URI), client-auth usage, and its validity.
fn client_params(
    cluster: &str,
    not_before: std::time::SystemTime,
    not_after: std::time::SystemTime,
) -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(TlsError::Certificate)?;
    params.distinguished_name.push(DnType::CommonName, cluster);
    params.subject_alt_names = vec![SanType::URI(
        format!("spiffe://unitsync/cluster/{cluster}")
            .try_into()
            .map_err(TlsError::Certificate)?,
    )];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    Ok(params)
}

/// A client certificate for an agent: PEM certificate and key, the
/// SHA-256 fingerprint of the certificate (hex) and its expiry.
pub struct ClientCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub fingerprint: String,
    pub not_after: std::time::SystemTime,
}

/// SHA-256 fingerprint (hex) of a DER certificate.
pub fn fingerprint(der: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(der))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let mode = TlsMode::Generated {
            names: vec!["localhost".into(), "127.0.0.1".into()],
        };
        let first = prepare(dir.path(), &mode).unwrap().0.unwrap();
        let second = prepare(dir.path(), &mode).unwrap().0.unwrap();
        assert_eq!(first.ca_pem, second.ca_pem);
        assert_ne!(
            first.key_pem, second.key_pem,
            "a fresh server key at every start"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("ca.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        assert!(
            prepare(dir.path(), &TlsMode::Plaintext)
                .unwrap()
                .0
                .is_none()
        );
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "tmp"))
            .collect();
        assert!(
            leftovers.is_empty(),
            "atomic writes leave no temporary files"
        );
    }

    #[test]
    fn a_missing_ca_is_never_replaced_behind_the_operators_back() {
        let dir = tempfile::tempdir().unwrap();
        assert!(HubCa::load(dir.path()).unwrap().is_none());
        assert!(!dir.path().join("ca.key").exists(), "load never creates");
        HubCa::load_or_create(dir.path()).unwrap();
        std::fs::remove_file(dir.path().join("ca.key")).unwrap();
        assert!(
            HubCa::load(dir.path()).is_err(),
            "half a CA is an error, not a new CA"
        );
    }
}
