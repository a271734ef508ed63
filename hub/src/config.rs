//! Typed configuration of `unitsync serve`, validated once at start-up.
//! Deployment facts (addresses, data directory) have no defaults in the
//! library; the CLI supplies documented ones.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::control::Tuning;

/// Environment variable names read by `unitsync serve` (through clap).
pub const ENV_LISTEN: &str = "UNITSYNC_LISTEN";
pub const ENV_HTTP_LISTEN: &str = "UNITSYNC_HTTP_LISTEN";
pub const ENV_DATA_DIR: &str = "UNITSYNC_DATA_DIR";

/// Everything a hub needs to run. Its `Debug` never shows a credential.
#[derive(Clone)]
pub struct Config {
    /// gRPC address (agents and operators).
    pub listen: SocketAddr,
    /// HTTP address for `/healthz`, `/readyz` and `/metrics`; none disables it.
    pub http_listen: Option<SocketAddr>,
    /// Holds `hub.db` (SQLite) and `admin.token`.
    pub data_dir: PathBuf,
    /// `postgres://…` to share a PostgreSQL database between hub replicas;
    /// `None` keeps the SQLite file in `data_dir`. Never logged.
    pub database_url: Option<String>,
    pub tls: crate::tls::TlsMode,
    pub tuning: Tuning,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("http_listen", &self.http_listen)
            .field("data_dir", &self.data_dir)
            .field(
                "database_url",
                &self.database_url.as_deref().map(redact_url),
            )
            .field("tls", &self.tls)
            .field("tuning", &self.tuning)
            .finish()
    }
}

/// A connection URL with its password (and query, which may carry one)
/// replaced: `postgres://user:***@host/db`.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let rest = rest.split_once('?').map_or(rest, |(r, _)| r);
    let rest = match rest.rsplit_once('@') {
        Some((user, host)) => {
            let user = user.split_once(':').map_or(user, |(u, _)| u);
            format!("{user}:***@{host}")
        }
        None => rest.to_owned(),
    };
    if scheme.is_empty() {
        rest
    } else {
        format!("{scheme}://{rest}")
    }
}

/// A configuration that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.tuning.limits;
        if l.max_bytes == 0 || l.max_documents == 0 || l.max_depth < 4 {
            return Err(ConfigError::Invalid(
                "manifest limits must allow at least one small document".into(),
            ));
        }
        if l.max_bytes > unitsync_proto::MAX_MESSAGE_BYTES - 64 * 1024 {
            return Err(ConfigError::Invalid(format!(
                "max unit size {} is over what one gRPC message carries ({} bytes)",
                l.max_bytes,
                unitsync_proto::MAX_MESSAGE_BYTES - 64 * 1024
            )));
        }
        if self.tuning.heartbeat.is_zero() {
            return Err(ConfigError::Invalid(
                "heartbeat interval must be positive".into(),
            ));
        }
        if self.tuning.max_sessions == 0 {
            return Err(ConfigError::Invalid("max sessions must be positive".into()));
        }
        Ok(())
    }

    pub fn database_path(&self) -> PathBuf {
        self.data_dir.join("hub.db")
    }

    pub fn admin_token_path(&self) -> PathBuf {
        self.data_dir.join("admin.token")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_the_database_password() {
        let config = Config {
            listen: "127.0.0.1:7443".parse().unwrap(),
            http_listen: None,
            data_dir: "/data".into(),
            database_url: Some("postgres://hub:s3cret-pw@db:5432/unitsync?password=also".into()),
            tls: crate::tls::TlsMode::Plaintext,
            tuning: Tuning::default(),
        };
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("s3cret-pw") && !shown.contains("also"),
            "{shown}"
        );
        assert!(
            shown.contains("postgres://hub:***@db:5432/unitsync"),
            "{shown}"
        );
    }
}
