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
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn write_private(path: &Path, text: &str) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    f.write_all(text.as_bytes()).map_err(io(path))?;
    f.sync_all().map_err(io(path))
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

/// Loads or creates the hub CA.
fn ca(data_dir: &Path) -> Result<(String, KeyPair), TlsError> {
    let cert_path = data_dir.join("ca.crt");
    let key_path = data_dir.join("ca.key");
    if cert_path.exists() && key_path.exists() {
        let cert = std::fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
        let key = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
        return Ok((
            cert,
            KeyPair::from_pem(&key).map_err(TlsError::Certificate)?,
        ));
    }
    let key = KeyPair::generate().map_err(TlsError::Certificate)?;
    let cert = ca_params()?
        .self_signed(&key)
        .map_err(TlsError::Certificate)?;
    write_private(&key_path, &key.serialize_pem())?;
    std::fs::write(&cert_path, cert.pem()).map_err(io(&cert_path))?;
    tracing::info!(path = %cert_path.display(), "created the hub CA");
    Ok((cert.pem(), key))
}

/// Prepares the server's TLS material (`None` for plaintext).
pub fn prepare(data_dir: &Path, mode: &TlsMode) -> Result<Option<ServerTls>, TlsError> {
    match mode {
        TlsMode::Plaintext => Ok(None),
        TlsMode::Files { cert, key } => Ok(Some(ServerTls {
            cert_pem: std::fs::read_to_string(cert).map_err(io(cert))?,
            key_pem: std::fs::read_to_string(key).map_err(io(key))?,
            ca_pem: None,
        })),
        TlsMode::Generated { names } => {
            let (ca_pem, ca_key) = ca(data_dir)?;
            let issuer = Issuer::new(ca_params()?, ca_key);
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
                .signed_by(&key, &issuer)
                .map_err(TlsError::Certificate)?;
            Ok(Some(ServerTls {
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
                ca_pem: Some(ca_pem),
            }))
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

/// Issues a client certificate for `cluster`, signed by the hub CA, valid
/// from `not_before` for `validity`.
pub fn issue_client_cert(
    data_dir: &Path,
    cluster: &str,
    not_before: std::time::SystemTime,
    validity: std::time::Duration,
) -> Result<ClientCert, TlsError> {
    use sha2::Digest as _;
    let key_path = data_dir.join("ca.key");
    if !key_path.exists() {
        return Err(TlsError::Io {
            path: key_path.display().to_string(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "client certificates need the hub's generated CA",
            ),
        });
    }
    let (_, ca_key) = ca(data_dir)?;
    let issuer = Issuer::new(ca_params()?, ca_key);
    let not_after = not_before + validity;
    let params = client_params(cluster, not_before, not_after)?;
    let key = KeyPair::generate().map_err(TlsError::Certificate)?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(TlsError::Certificate)?;
    Ok(ClientCert {
        fingerprint: hex::encode(sha2::Sha256::digest(cert.der())),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        not_after,
    })
}

/// Signs a CSR for `cluster`: the subject, names, usage and validity are
/// the hub's, only the public key comes from the request.
pub fn sign_csr(
    data_dir: &Path,
    cluster: &str,
    csr_pem: &str,
    validity: std::time::Duration,
) -> Result<(String, String, std::time::SystemTime), TlsError> {
    use sha2::Digest as _;
    let (_, ca_key) = ca(data_dir)?;
    let issuer = Issuer::new(ca_params()?, ca_key);
    let mut csr =
        rcgen::CertificateSigningRequestParams::from_pem(csr_pem).map_err(TlsError::Certificate)?;
    let now = std::time::SystemTime::now();
    let not_after = now + validity;
    let params = client_params(cluster, now - std::time::Duration::from_secs(60), not_after)?;
    csr.params = params;
    let cert = csr.signed_by(&issuer).map_err(TlsError::Certificate)?;
    Ok((
        cert.pem(),
        hex::encode(sha2::Sha256::digest(cert.der())),
        not_after,
    ))
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
        let first = prepare(dir.path(), &mode).unwrap().unwrap();
        let second = prepare(dir.path(), &mode).unwrap().unwrap();
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
        assert!(prepare(dir.path(), &TlsMode::Plaintext).unwrap().is_none());
    }
}
