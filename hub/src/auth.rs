//! Credentials: bearer tokens for operators and agents, and agents' client
//! certificates (identified by their SHA-256 fingerprint). Tokens are 256-bit
//! random values shown once; the store keeps only their SHA-256. Every
//! failure answers the same `authentication failed`.

use base64::Engine as _;
use rand::RngCore;
use sha2::{Digest as _, Sha256};
use tonic::metadata::MetadataMap;

use crate::error::{HubError, Result};
use crate::model::{Actor, Cluster, Role};
use crate::store::{Store, TokenHash};

/// Prefix of agent (cluster) tokens.
pub const AGENT_TOKEN_PREFIX: &str = "usk_agent_";
/// Prefix of operator tokens.
pub const OPERATOR_TOKEN_PREFIX: &str = "usk_op_";

/// A secret (a generated token, a credential read from a file). Its
/// `Debug` hides the value.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn generate(prefix: &str) -> Secret {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        Secret(format!(
            "{prefix}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
        ))
    }

    pub fn from_string(s: String) -> Secret {
        Secret(s)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn hash(&self) -> TokenHash {
        hash_token(&self.0)
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

pub fn hash_token(token: &str) -> TokenHash {
    TokenHash(hex::encode(Sha256::digest(token.as_bytes())))
}

/// Who is calling.
#[derive(Clone, Debug)]
pub enum Principal {
    Operator { name: String, role: Role },
    Agent(Cluster),
}

impl Principal {
    pub fn actor(&self) -> Actor {
        match self {
            Principal::Operator { name, .. } => Actor::Operator(name.clone()),
            Principal::Agent(c) => Actor::Agent(c.name.clone()),
        }
    }
}

fn bearer(md: &MetadataMap) -> Option<&str> {
    let v = md.get(unitsync_proto::AUTHORIZATION)?.to_str().ok()?;
    let token = v
        .strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))?;
    let token = token.trim();
    (!token.is_empty()).then_some(token)
}

/// The credential a session was opened with, re-checked while it lives.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Credential {
    Token(TokenHash),
    /// SHA-256 fingerprint of the client certificate.
    Certificate(String),
}

impl Credential {
    pub fn of<T>(req: &tonic::Request<T>) -> Option<Credential> {
        if let Some(leaf) = req.peer_certs().as_ref().and_then(|c| c.first().cloned()) {
            return Some(Credential::Certificate(crate::tls::fingerprint(
                leaf.as_ref(),
            )));
        }
        bearer(req.metadata()).map(|t| Credential::Token(hash_token(t)))
    }
}

/// Resolves the caller: a verified client certificate from the hub CA
/// names its cluster (by fingerprint); otherwise the bearer token decides.
pub async fn authenticate_request<T>(
    store: &dyn Store,
    req: &tonic::Request<T>,
) -> Result<Principal> {
    let certs = req.peer_certs();
    authenticate_peer(store, req.metadata(), certs.as_deref().map(Vec::as_slice)).await
}

/// The same from a request's metadata and the client certificates of its
/// TLS session (for a layer that sees the HTTP request).
pub async fn authenticate_peer(
    store: &dyn Store,
    md: &MetadataMap,
    peer_certs: Option<&[rustls::pki_types::CertificateDer<'static>]>,
) -> Result<Principal> {
    if let Some(leaf) = peer_certs.and_then(<[_]>::first) {
        let fp = crate::tls::fingerprint(leaf.as_ref());
        return match store.cluster_by_cert(&fp).await? {
            Some(c) => Ok(Principal::Agent(c)),
            None => Err(HubError::Unauthenticated),
        };
    }
    authenticate(store, md).await
}

/// Resolves the caller from its bearer token.
pub async fn authenticate(store: &dyn Store, md: &MetadataMap) -> Result<Principal> {
    let token = bearer(md).ok_or(HubError::Unauthenticated)?;
    let hash = hash_token(token);
    if token.starts_with(AGENT_TOKEN_PREFIX)
        && let Some(c) = store.cluster_by_token(&hash).await?
    {
        return Ok(Principal::Agent(c));
    }
    if token.starts_with(OPERATOR_TOKEN_PREFIX)
        && let Some(op) = store.operator_by_token(&hash).await?
    {
        return Ok(Principal::Operator {
            name: op.name,
            role: op.role,
        });
    }
    Err(HubError::Unauthenticated)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_prefixed_and_redacted() {
        let a = Secret::generate(AGENT_TOKEN_PREFIX);
        let b = Secret::generate(AGENT_TOKEN_PREFIX);
        assert_ne!(a.expose(), b.expose());
        assert!(a.expose().starts_with(AGENT_TOKEN_PREFIX));
        assert!(a.expose().len() > AGENT_TOKEN_PREFIX.len() + 40);
        assert_eq!(format!("{a:?}"), "Secret(<redacted>)");
        assert_ne!(a.hash().0, a.expose());
        assert_eq!(a.hash(), hash_token(a.expose()));
    }

    #[test]
    fn bearer_parsing() {
        let mut md = MetadataMap::new();
        assert_eq!(bearer(&md), None);
        md.insert("authorization", "Bearer abc".parse().unwrap());
        assert_eq!(bearer(&md), Some("abc"));
        md.insert("authorization", "Basic abc".parse().unwrap());
        assert_eq!(bearer(&md), None);
        md.insert("authorization", "Bearer ".parse().unwrap());
        assert_eq!(bearer(&md), None);
    }
}
