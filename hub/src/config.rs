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
    /// HTTP address for `/healthz`, `/readyz`, `/metrics` and the
    /// dashboard (`/ui/`); none disables it.
    pub http_listen: Option<SocketAddr>,
    /// Serve the HTTP address over TLS with the hub's certificate.
    pub http_tls: bool,
    /// Holds `hub.db` (SQLite) and `admin.token`.
    pub data_dir: PathBuf,
    /// `postgres://…` to share a PostgreSQL database between hub replicas;
    /// `None` keeps the SQLite file in `data_dir`. Never logged.
    pub database_url: Option<String>,
    pub tls: crate::tls::TlsMode,
    pub tuning: Tuning,
    /// Be a ConfigHub worker for every cluster.
    pub confighub: Option<crate::source::confighub::ConfigHubConfig>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("http_listen", &self.http_listen)
            .field("http_tls", &self.http_tls)
            .field("data_dir", &self.data_dir)
            .field(
                "database_url",
                &self.database_url.as_deref().map(redact_url),
            )
            .field("tls", &self.tls)
            .field("tuning", &self.tuning)
            .field("confighub", &self.confighub)
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
        if self.http_tls && matches!(self.tls, crate::tls::TlsMode::Plaintext) {
            return Err(ConfigError::Invalid(
                "--http-tls serves the hub's certificate; it cannot go with --insecure-plaintext"
                    .into(),
            ));
        }
        if self.tuning.max_sessions == 0 {
            return Err(ConfigError::Invalid("max sessions must be positive".into()));
        }
        if let Some(c) = &self.confighub {
            // The worker secret travels with every call: plain HTTP only on
            // this machine.
            let url = reqwest::Url::parse(&c.url).ok();
            let loopback = url
                .as_ref()
                .and_then(reqwest::Url::host_str)
                .is_some_and(|h| {
                    let h = h.trim_matches(['[', ']']);
                    h == "localhost" || h.parse::<std::net::IpAddr>().is_ok_and(|a| a.is_loopback())
                });
            let scheme = url.as_ref().map(reqwest::Url::scheme);
            if !(scheme == Some("https") || (scheme == Some("http") && loopback)) {
                return Err(ConfigError::Invalid(format!(
                    "the ConfigHub URL {:?} must be https:// (plain http:// only to this machine)",
                    crate::manifest::prefix(&c.url)
                )));
            }
            if c.worker_id.trim().is_empty() {
                return Err(ConfigError::Invalid(
                    "the ConfigHub worker id is empty".into(),
                ));
            }
            if c.secret.expose().len() < 8 {
                return Err(ConfigError::Invalid(
                    "the ConfigHub worker secret is too short (under 8 characters)".into(),
                ));
            }
            if c.wait_timeout.is_zero() {
                return Err(ConfigError::Invalid(
                    "the ConfigHub wait timeout must be positive".into(),
                ));
            }
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
            http_tls: false,
            data_dir: "/data".into(),
            database_url: Some("postgres://hub:s3cret-pw@db:5432/unitsync?password=also".into()),
            tls: crate::tls::TlsMode::Plaintext,
            tuning: Tuning::default(),
            confighub: None,
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

    #[test]
    fn the_confighub_secret_never_travels_in_clear_off_this_machine() {
        let with_url = |url: &str| Config {
            listen: "127.0.0.1:7443".parse().unwrap(),
            http_listen: None,
            http_tls: false,
            data_dir: "/data".into(),
            database_url: None,
            tls: crate::tls::TlsMode::Plaintext,
            tuning: Tuning::default(),
            confighub: Some(crate::source::confighub::ConfigHubConfig {
                url: url.into(),
                worker_id: "w".into(),
                secret: crate::auth::Secret::from_string("ch_secret_value".into()),
                transport: crate::source::confighub::Transport::LongPoll,
                ca_pem: None,
                environments: None,
                wait_timeout: std::time::Duration::from_secs(60),
                stuck_result: crate::source::confighub::StuckResult::WaitFailed,
            }),
        };
        for ok in [
            "https://hub.confighub.com",
            "http://127.0.0.1:8080",
            "http://localhost:1",
            "http://[::1]:9",
        ] {
            assert!(with_url(ok).validate().is_ok(), "{ok}");
        }
        for bad in [
            "http://hub.confighub.com",
            "http://10.0.0.1",
            "ftp://x",
            "hub.confighub.com",
        ] {
            let e = with_url(bad).validate().unwrap_err().to_string();
            assert!(e.contains("must be https://"), "{bad}: {e}");
        }
        let shown = format!("{:?}", with_url("https://hub.confighub.com"));
        assert!(!shown.contains("ch_secret_value"), "{shown}");
    }
}
