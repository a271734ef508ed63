//! OCI sources as the store keeps them: what to follow (a registry
//! repository, a tag, semver range or digest, Flux `OCIRepository`
//! semantics), how to map the artifact to units, the credentials (never
//! shown back), and what the last sync found.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{EnvName, NameError, UnixMillis, check_dns1123_label};
use crate::auth::Secret;

label_newtype!(
    /// A source's name (DNS-1123 label); its units are owned by `oci:NAME`.
    SourceName,
    "source name"
);

impl SourceName {
    /// The owner recorded on the source's units.
    pub fn owner(&self) -> String {
        format!("oci:{self}")
    }
}

/// Which artifact of the repository to follow (Flux precedence: a digest
/// pins, a semver range picks the highest matching tag, else a tag).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OciRef {
    Tag(String),
    Semver(String),
    Digest(String),
}

impl fmt::Display for OciRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OciRef::Tag(t) => write!(f, "tag {t}"),
            OciRef::Semver(r) => write!(f, "semver {r}"),
            OciRef::Digest(d) => write!(f, "digest {d}"),
        }
    }
}

/// Parses a semver range the way Flux users write them (Masterminds
/// style): alternatives separated by `||`, comparators within one by
/// commas or spaces (`>=1.2 <2`, `^1.4`, `~1.2.3`, `1.x`, `1.2 - 1.4`).
/// A prerelease matches only a comparator that names a prerelease of the
/// same version (`>=1.0.0-0`).
pub fn semver_ranges(range: &str) -> Result<Vec<semver::VersionReq>, String> {
    let bad = |why: String| {
        format!(
            "invalid semver range {:?}: {why}",
            crate::manifest::prefix(range)
        )
    };
    if range.trim().is_empty() {
        return Err(bad("empty".into()));
    }
    range
        .split("||")
        .map(|alt| {
            let tokens: Vec<&str> = alt
                .split([' ', ',', '\t'])
                .filter(|t| !t.is_empty())
                .collect();
            let mut comparators: Vec<String> = Vec::new();
            let mut i = 0;
            while i < tokens.len() {
                let t = tokens[i];
                if tokens.get(i + 1) == Some(&"-") && i + 2 < tokens.len() {
                    // A hyphen range: inclusive at both ends.
                    comparators.push(format!(">={t}"));
                    comparators.push(format!("<={}", tokens[i + 2]));
                    i += 3;
                } else if ["=", ">", ">=", "<", "<=", "~", "^"].contains(&t) && i + 1 < tokens.len()
                {
                    comparators.push(format!("{t}{}", tokens[i + 1]));
                    i += 2;
                } else {
                    comparators.push(t.to_owned());
                    i += 1;
                }
            }
            if comparators.is_empty() {
                return Err(bad("an empty alternative".into()));
            }
            let text = comparators
                .iter()
                .map(|c| {
                    c.replacen(
                        'v',
                        "",
                        usize::from(
                            c.trim_start_matches(['=', '>', '<', '~', '^'])
                                .starts_with('v'),
                        ),
                    )
                })
                .collect::<Vec<_>>()
                .join(", ");
            semver::VersionReq::parse(&text).map_err(|e| bad(e.to_string()))
        })
        .collect()
}

/// The highest tag that is a semantic version (a leading `v` allowed)
/// matching any of `ranges`.
pub fn highest_match<'a>(
    tags: impl IntoIterator<Item = &'a str>,
    ranges: &[semver::VersionReq],
) -> Option<&'a str> {
    tags.into_iter()
        .filter_map(|t| {
            semver::Version::parse(t.strip_prefix('v').unwrap_or(t))
                .ok()
                .map(|v| (v, t))
        })
        .filter(|(v, _)| ranges.iter().any(|r| r.matches(v)))
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, t)| t)
}

/// How an artifact's files become units.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceMode {
    /// A ConfigHub release: documents grouped by the unit their
    /// `confighub.com/origin` annotation names.
    ConfigHub,
    /// The whole artifact is one unit named after the source.
    Artifact,
    /// One unit per YAML file, named after the file.
    File,
}

impl SourceMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceMode::ConfigHub => "confighub",
            SourceMode::Artifact => "artifact",
            SourceMode::File => "file",
        }
    }
}

impl FromStr for SourceMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "confighub" => Ok(SourceMode::ConfigHub),
            "artifact" => Ok(SourceMode::Artifact),
            "file" => Ok(SourceMode::File),
            other => Err(format!(
                "unknown mode {other:?} (confighub, artifact or file)"
            )),
        }
    }
}

/// What to follow and how (everything but the credentials).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OciSpec {
    /// `oci://HOST[:PORT]/REPOSITORY`, without a tag or digest.
    pub url: String,
    pub reference: OciRef,
    /// Seconds between digest checks.
    pub interval_seconds: u64,
    pub mode: SourceMode,
    /// The layer to take (first layer when empty).
    #[serde(default)]
    pub layer_media_type: String,
    /// Hosts reached over plain HTTP (a local registry).
    #[serde(default)]
    pub insecure_hosts: Vec<String>,
    /// A CA to trust for this registry instead of the system roots (PEM).
    #[serde(default)]
    pub ca_pem: String,
}

/// `s` (a URL or its host part) with any login before an `@` in its
/// authority replaced by `***`, for quoting it in an error.
fn without_login(s: &str) -> String {
    let (scheme, rest) = match s.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), s),
    };
    let end = rest.find('/').unwrap_or(rest.len());
    match rest[..end].rfind('@') {
        Some(at) => format!("{scheme}***{}", &rest[at..]),
        None => s.to_owned(),
    }
}

/// The shortest interval a source may poll at.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);

impl OciSpec {
    /// The registry host (with port) and the repository of `url`.
    pub fn parse_url(url: &str) -> Result<(String, String), String> {
        let rest = url.strip_prefix("oci://").ok_or_else(|| {
            format!(
                "the URL {:?} must start with oci://",
                crate::manifest::prefix(&without_login(url))
            )
        })?;
        let (host, repo) = rest
            .split_once('/')
            .ok_or("the URL names no repository (oci://HOST/REPOSITORY)")?;
        if host.is_empty() || repo.is_empty() {
            return Err("the URL names no registry host or no repository".into());
        }
        // No logins in URLs (they would be stored and shown as the URL),
        // no queries or fragments.
        if !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
        {
            return Err(format!(
                "registry host {:?}: a host name or address with an optional port (credentials go in --username/--password-file)",
                crate::manifest::prefix(&without_login(host))
            ));
        }
        if repo.contains('@')
            || repo
                .rsplit('/')
                .next()
                .is_some_and(|last| last.contains(':'))
        {
            return Err(
                "the URL must not carry a tag or digest; use --tag, --semver or --digest".into(),
            );
        }
        let valid_component = |c: &str| {
            !c.is_empty()
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
                && c.as_bytes()[0].is_ascii_alphanumeric()
        };
        if !repo.split('/').all(valid_component) {
            return Err(format!(
                "repository {:?}: components are lowercase letters, digits, '.', '_' or '-'",
                crate::manifest::prefix(repo)
            ));
        }
        Ok((host.to_owned(), repo.to_owned()))
    }

    /// Checks the spec once, before it is stored.
    pub fn validate(&self) -> Result<(), String> {
        Self::parse_url(&self.url)?;
        match &self.reference {
            OciRef::Tag(t) => {
                let ok = !t.is_empty()
                    && t.len() <= 128
                    && t.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
                    && (t.as_bytes()[0].is_ascii_alphanumeric() || t.starts_with('_'));
                if !ok {
                    return Err(format!("invalid tag {:?}", crate::manifest::prefix(t)));
                }
            }
            OciRef::Semver(r) => {
                semver_ranges(r)?;
            }
            OciRef::Digest(d) => {
                let hex = d.strip_prefix("sha256:").ok_or_else(|| {
                    format!(
                        "digest {:?} must be sha256:<64 hex>",
                        crate::manifest::prefix(d)
                    )
                })?;
                if hex.len() != 64
                    || !hex
                        .bytes()
                        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
                {
                    return Err(format!(
                        "digest {:?} must be sha256:<64 lowercase hex>",
                        crate::manifest::prefix(d)
                    ));
                }
            }
        }
        if self.interval_seconds < MIN_INTERVAL.as_secs() {
            return Err("the interval must be at least one second".into());
        }
        if !self.ca_pem.is_empty() && !self.ca_pem.contains("-----BEGIN CERTIFICATE-----") {
            return Err("the CA file holds no PEM certificate".into());
        }
        Ok(())
    }
}

/// How the hub authenticates to the registry. Secrets never leave the
/// hub: reads show the kind and user name only.
#[derive(Clone, Debug, Default)]
pub enum OciAuth {
    #[default]
    Anonymous,
    Basic {
        username: String,
        password: Secret,
    },
    Bearer {
        token: Secret,
    },
}

impl OciAuth {
    pub fn kind(&self) -> &'static str {
        match self {
            OciAuth::Anonymous => "none",
            OciAuth::Basic { .. } => "basic",
            OciAuth::Bearer { .. } => "bearer",
        }
    }

    pub fn username(&self) -> &str {
        match self {
            OciAuth::Basic { username, .. } => username,
            _ => "",
        }
    }
}

/// What the last syncs of a source found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SourceStatus {
    /// The manifest digest last committed (`sha256:…`).
    pub last_digest: String,
    /// Flux's revision string of it (`<tag>@sha256:…`, or the digest).
    pub last_revision: String,
    pub last_attempt: Option<UnixMillis>,
    pub last_success: Option<UnixMillis>,
    /// Why the last attempt failed (empty: it did not).
    pub last_error: String,
    /// What the last attempt did, in words.
    pub last_result: String,
    pub next_check: Option<UnixMillis>,
    /// The units the source owns, by name.
    pub units: Vec<String>,
    /// The artifact's annotations (`org.opencontainers.image.source`,
    /// `…revision`, `…created`, `com.confighub.target.id`).
    pub metadata: std::collections::BTreeMap<String, String>,
}

/// A source as the store keeps it.
#[derive(Clone, Debug)]
pub struct OciSource {
    pub name: SourceName,
    pub env: EnvName,
    pub spec: OciSpec,
    pub suspended: bool,
    pub status: SourceStatus,
    /// When a sync was last asked for (`source sync`, a release event).
    pub sync_requested: Option<UnixMillis>,
    /// The next sync may destroy more than half of the source's units.
    pub allow_prune: bool,
    pub created_at: UnixMillis,
}

impl OciSource {
    /// Whether a sync is due at `now`.
    pub fn due(&self, now: UnixMillis) -> bool {
        if self.suspended {
            return false;
        }
        let requested = match (self.sync_requested, self.status.last_attempt) {
            (Some(r), Some(a)) => r > a,
            (Some(_), None) => true,
            (None, _) => false,
        };
        requested || self.status.next_check.is_none_or(|n| n <= now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pick<'a>(tags: &[&'a str], range: &str) -> Option<&'a str> {
        highest_match(tags.iter().copied(), &semver_ranges(range).unwrap())
    }

    #[test]
    fn semver_ranges_read_like_flux_and_pick_the_highest_match() {
        let tags = [
            "1.0.0",
            "1.2.0",
            "v1.4.1",
            "2.0.0",
            "2.1.0-rc.1",
            "latest",
            "3.0.0-rc.1",
        ];
        assert_eq!(pick(&tags, ">=1.0.0 <2.0.0"), Some("v1.4.1"));
        assert_eq!(pick(&tags, ">=1.0.0, <2.0.0"), Some("v1.4.1"));
        assert_eq!(pick(&tags, ">= 1.0.0 < 2.0.0"), Some("v1.4.1"));
        assert_eq!(pick(&tags, "^1.0"), Some("v1.4.1"));
        assert_eq!(pick(&tags, "~1.2"), Some("1.2.0"));
        assert_eq!(pick(&tags, "1.x"), Some("v1.4.1"));
        assert_eq!(pick(&tags, "1.0 - 1.3"), Some("1.2.0"));
        assert_eq!(pick(&tags, "<1.0.0 || >=2.0.0"), Some("2.0.0"));
        assert_eq!(pick(&tags, ">=2.1.0-0"), Some("2.1.0-rc.1"));
        assert_eq!(pick(&tags, ">=4"), None);
        for bad in ["", "nonsense", ">=1 ||", "=>1.0"] {
            assert!(semver_ranges(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn urls_name_a_host_and_a_repository_and_nothing_else() {
        assert_eq!(
            OciSpec::parse_url("oci://127.0.0.1:5000/space/messagewall-dev").unwrap(),
            (
                "127.0.0.1:5000".to_owned(),
                "space/messagewall-dev".to_owned()
            )
        );
        for bad in [
            "https://r/x",
            "oci://r",
            "oci:///x",
            "oci://r/x:tag",
            "oci://r/x@sha256:00",
            "oci://r/Upper",
            "oci://user:pass@r/x",
            "oci://r?x=1/x",
        ] {
            assert!(OciSpec::parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_login_in_a_refused_url_is_never_quoted() {
        for url in [
            "oci://robot:s3cr3t-t0ken@ghcr.io/acme/app",
            "https://robot:s3cr3t-t0ken@ghcr.io/acme/app",
            "oci://s3cr3t-t0ken@ghcr.io/acme/app",
        ] {
            let e = OciSpec::parse_url(url).unwrap_err();
            assert!(!e.contains("s3cr3t-t0ken") && !e.contains("robot"), "{e}");
            assert!(e.contains("***@ghcr.io"), "{e}");
        }
    }
}
