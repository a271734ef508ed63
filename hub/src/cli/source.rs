//! `unitsync source …`: OCI sources (ConfigHub releases, Flux-style
//! artifacts). Credentials are read from files here and sent once; the hub
//! never shows them back.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine as _;
use clap::{ArgGroup, Args, Subcommand};
use serde::Serialize;
use unitsync_proto::v1 as pb;

use super::Format;
use super::client::Client;
use super::commands::{api, print};
use super::output::{self, structured, table};

#[derive(Subcommand, Debug)]
pub enum SourceCommand {
    /// Follow an OCI artifact: each new one lands as one release set.
    Create(Box<CreateArgs>),
    List,
    /// A source with its last sync: digest, revision, error, units.
    Get {
        name: String,
    },
    /// Stop syncing (units stay as they are).
    Suspend {
        name: String,
    },
    Resume {
        name: String,
    },
    /// Delete a source; its units stay, owned by the hub.
    Delete {
        name: String,
    },
    /// Sync now and wait for the outcome.
    Sync {
        name: String,
        /// The sync may destroy more than half of the source's units.
        #[arg(long)]
        allow_prune: bool,
        /// Seconds to wait for the outcome.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
}

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("reference").args(["tag", "semver", "digest"])))]
#[command(group(ArgGroup::new("credentials").args(["username", "docker_config", "bearer_file"])))]
pub struct CreateArgs {
    name: String,
    /// The environment its units live in.
    #[arg(long)]
    env: String,
    /// `oci://HOST/REPOSITORY` (ConfigHub: `oci://oci.hub.confighub.com/space/<space>`).
    #[arg(long)]
    oci: String,
    /// Follow a tag (default `latest`).
    #[arg(long)]
    tag: Option<String>,
    /// Follow the highest tag in a semver range (`>=1.2 <2`, `^1.4`).
    #[arg(long)]
    semver: Option<String>,
    /// Pin a manifest digest (`sha256:…`).
    #[arg(long)]
    digest: Option<String>,
    /// How often to check for a new digest.
    #[arg(long, default_value = "1m", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// `confighub` (units by ConfigHub's origin annotation), `artifact`
    /// (one unit named after the source) or `file` (one unit per file).
    #[arg(long, default_value = "artifact")]
    mode: String,
    #[arg(long, requires = "password_file")]
    username: Option<String>,
    #[arg(long, requires = "username")]
    password_file: Option<PathBuf>,
    /// A Docker config (`~/.docker/config.json`, a dockerconfigjson
    /// Secret's content): the entry for the registry's host is used.
    #[arg(long)]
    docker_config: Option<PathBuf>,
    /// A file holding a bearer token.
    #[arg(long)]
    bearer_file: Option<PathBuf>,
    /// Trust this CA (PEM) for the registry instead of the system roots
    /// (not `--ca-file`: that is the hub's CA, for every command).
    #[arg(long)]
    registry_ca_file: Option<PathBuf>,
    /// Reach this registry host over plain HTTP (a local registry); repeatable.
    #[arg(long = "insecure-host")]
    insecure_hosts: Vec<String>,
    /// Take the layer of this media type instead of the first one.
    #[arg(long, default_value = "")]
    layer_media_type: String,
    /// Create it suspended.
    #[arg(long)]
    suspended: bool,
}

fn read_secret(path: &Path, what: &str) -> anyhow::Result<String> {
    let s = std::fs::read_to_string(path)
        .with_context(|| format!("read the {what} {}", path.display()))?;
    let s = s.trim().to_owned();
    if s.is_empty() {
        bail!("the {what} {} is empty", path.display());
    }
    Ok(s)
}

/// The user name and password a Docker config holds for `host`.
fn docker_login(path: &Path, host: &str) -> anyhow::Result<(String, String)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let auths = v
        .get("auths")
        .and_then(|a| a.as_object())
        .with_context(|| format!("{} has no \"auths\"", path.display()))?;
    let entry = auths
        .iter()
        .find(|(k, _)| {
            let k = k
                .trim_start_matches("https://")
                .trim_start_matches("http://");
            k.trim_end_matches('/') == host || k.split('/').next() == Some(host)
        })
        .map(|(_, e)| e)
        .with_context(|| format!("{} has no entry for {host}", path.display()))?;
    if let (Some(u), Some(p)) = (entry["username"].as_str(), entry["password"].as_str()) {
        return Ok((u.to_owned(), p.to_owned()));
    }
    let auth = entry["auth"]
        .as_str()
        .with_context(|| format!("the entry for {host} has no auth"))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(auth)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .with_context(|| format!("the auth for {host} is not base64 of user:password"))?;
    let (u, p) = decoded
        .split_once(':')
        .with_context(|| format!("the auth for {host} is not user:password"))?;
    Ok((u.to_owned(), p.to_owned()))
}

fn create_request(a: CreateArgs) -> anyhow::Result<pb::CreateSourceRequest> {
    let host = a
        .oci
        .strip_prefix("oci://")
        .and_then(|r| r.split('/').next())
        .unwrap_or_default()
        .to_owned();
    let (username, password, bearer) = match (&a.username, &a.docker_config, &a.bearer_file) {
        (Some(u), _, _) => {
            let pw = a
                .password_file
                .as_deref()
                .context("--username needs --password-file")?;
            (u.clone(), read_secret(pw, "password file")?, String::new())
        }
        (None, Some(dc), _) => {
            let (u, p) = docker_login(dc, &host)?;
            (u, p, String::new())
        }
        (None, None, Some(b)) => (
            String::new(),
            String::new(),
            read_secret(b, "bearer token file")?,
        ),
        (None, None, None) => Default::default(),
    };
    let ca_pem = match &a.registry_ca_file {
        Some(f) => {
            std::fs::read_to_string(f).with_context(|| format!("read the CA {}", f.display()))?
        }
        None => String::new(),
    };
    let interval = a.interval.as_secs();
    if interval == 0 {
        bail!("--interval must be at least one second");
    }
    Ok(pb::CreateSourceRequest {
        source: Some(pb::Source {
            name: a.name,
            environment: a.env,
            url: a.oci,
            tag: a.tag.unwrap_or_default(),
            semver: a.semver.unwrap_or_default(),
            digest: a.digest.unwrap_or_default(),
            interval_seconds: interval,
            mode: a.mode,
            layer_media_type: a.layer_media_type,
            insecure_hosts: a.insecure_hosts,
            username,
            suspended: a.suspended,
            ..Default::default()
        }),
        password,
        bearer_token: bearer,
        ca_pem,
    })
}

/// A source as the CLI prints it.
#[derive(Serialize)]
struct SourceView {
    name: String,
    environment: String,
    url: String,
    reference: String,
    mode: String,
    interval_seconds: u64,
    credentials: String,
    suspended: bool,
    last_revision: String,
    last_digest: String,
    last_attempt: String,
    last_success: String,
    next_check: String,
    last_result: String,
    last_error: String,
    units: Vec<String>,
    metadata: std::collections::BTreeMap<String, String>,
}

impl From<&pb::Source> for SourceView {
    fn from(s: &pb::Source) -> Self {
        let st = s.status.clone().unwrap_or_default();
        let reference = if !s.digest.is_empty() {
            format!("digest {}", s.digest)
        } else if !s.semver.is_empty() {
            format!("semver {}", s.semver)
        } else {
            format!("tag {}", s.tag)
        };
        SourceView {
            name: s.name.clone(),
            environment: s.environment.clone(),
            url: s.url.clone(),
            reference,
            mode: s.mode.clone(),
            interval_seconds: s.interval_seconds,
            credentials: match s.auth.as_str() {
                "basic" => format!("basic ({})", s.username),
                other => other.to_owned(),
            },
            suspended: s.suspended,
            last_revision: st.last_revision,
            last_digest: st.last_digest,
            last_attempt: output::time(st.last_attempt.as_ref()),
            last_success: output::time(st.last_success.as_ref()),
            next_check: output::time(st.next_check.as_ref()),
            last_result: st.last_result,
            last_error: st.last_error,
            units: st.units,
            metadata: st.metadata.into_iter().collect(),
        }
    }
}

/// The sources table (also under `unitsync status`).
pub(super) fn sources_table(sources: &[pb::Source]) -> String {
    table(
        &["source", "env", "follows", "revision", "state", "units"],
        sources
            .iter()
            .map(|s| {
                let v = SourceView::from(s);
                let state = if v.suspended {
                    "suspended".to_owned()
                } else if !v.last_error.is_empty() {
                    format!("failing: {}", v.last_error)
                } else if v.last_attempt.is_empty() {
                    "waiting for the first sync".to_owned()
                } else {
                    format!("ok (checked {})", v.last_attempt)
                };
                vec![
                    v.name,
                    v.environment,
                    format!("{} {}", v.url, v.reference),
                    v.last_revision,
                    state,
                    v.units.len().to_string(),
                ]
            })
            .collect(),
    )
}

fn show(f: Format, s: &pb::Source) {
    let v = SourceView::from(s);
    if let Some(out) = structured(f, &v) {
        return print(&out);
    }
    let mut lines = vec![
        format!(
            "source {}  into {}{}",
            v.name,
            v.environment,
            if v.suspended { "  (suspended)" } else { "" }
        ),
        format!(
            "  follows     {} {} every {}s, mode {}",
            v.url, v.reference, v.interval_seconds, v.mode
        ),
        format!("  credentials {}", v.credentials),
        format!(
            "  revision    {}",
            if v.last_revision.is_empty() {
                "-"
            } else {
                &v.last_revision
            }
        ),
        format!(
            "  last sync   {} ({})",
            if v.last_attempt.is_empty() {
                "never"
            } else {
                &v.last_attempt
            },
            v.last_result
        ),
    ];
    if !v.last_error.is_empty() {
        lines.push(format!("  error       {}", v.last_error));
    }
    if !v.next_check.is_empty() {
        lines.push(format!("  next check  {}", v.next_check));
    }
    lines.push(format!("  units       {}", v.units.join(", ")));
    for (k, val) in &v.metadata {
        lines.push(format!("  {k}: {val}"));
    }
    print(&lines.join("\n"));
}

pub(super) async fn run(c: &mut Client, f: Format, cmd: SourceCommand) -> anyhow::Result<()> {
    match cmd {
        SourceCommand::Create(args) => {
            let s = api(c.create_source(create_request(*args)?).await)?;
            show(f, &s);
        }
        SourceCommand::List => {
            let r = api(c.list_sources(pb::ListSourcesRequest {}).await)?;
            let views: Vec<SourceView> = r.sources.iter().map(SourceView::from).collect();
            print(&structured(f, &views).unwrap_or_else(|| sources_table(&r.sources)));
        }
        SourceCommand::Get { name } => {
            show(f, &api(c.get_source(pb::GetSourceRequest { name }).await)?)
        }

        SourceCommand::Suspend { name } => {
            let s = api(c
                .set_source_suspended(pb::SetSourceSuspendedRequest {
                    name,
                    suspended: true,
                })
                .await)?;
            show(f, &s);
        }
        SourceCommand::Resume { name } => {
            let s = api(c
                .set_source_suspended(pb::SetSourceSuspendedRequest {
                    name,
                    suspended: false,
                })
                .await)?;
            show(f, &s);
        }
        SourceCommand::Delete { name } => {
            api(c
                .delete_source(pb::DeleteSourceRequest { name: name.clone() })
                .await)?;
            print(&format!(
                "source {name} deleted; its units stay, owned by the hub"
            ));
        }
        SourceCommand::Sync {
            name,
            allow_prune,
            timeout,
        } => {
            let asked = api(c
                .sync_source(pb::SyncSourceRequest {
                    name: name.clone(),
                    allow_prune,
                })
                .await)?
            .requested_at
            .unwrap_or_default();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
            loop {
                let s = api(c
                    .get_source(pb::GetSourceRequest { name: name.clone() })
                    .await)?;
                let st = s.status.clone().unwrap_or_default();
                let attempt = st.last_attempt.unwrap_or_default();
                if (attempt.seconds, attempt.nanos) >= (asked.seconds, asked.nanos) {
                    show(f, &s);
                    if !st.last_error.is_empty() {
                        bail!("source {name}: {}", st.last_error);
                    }
                    return Ok(());
                }
                if tokio::time::Instant::now() >= deadline {
                    bail!("source {name} did not sync within {timeout}s (is it suspended?)");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    Ok(())
}
