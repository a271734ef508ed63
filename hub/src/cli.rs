//! The `unitsync` command line: `serve` runs the hub, every other command
//! is an operator client of a running hub's gRPC API.

mod client;
mod commands;
mod follow;
mod install;
mod output;
mod source;
mod wait;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

pub use commands::run_client;

/// Default gRPC address of `unitsync serve` and of the CLI's `--hub`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7443";
pub const DEFAULT_HUB: &str = "https://127.0.0.1:7443";
pub const DEFAULT_DATA_DIR: &str = "unitsync-data";

#[derive(Parser, Debug)]
#[command(
    name = "unitsync",
    version,
    about = "unitsync: sync units of Kubernetes manifests to many clusters"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Hub gRPC endpoint.
    #[arg(long, global = true, env = "UNITSYNC_HUB", default_value = DEFAULT_HUB)]
    pub hub: String,
    /// Operator token. Without it, the CLI reads `admin.token` from the data directory.
    #[arg(long, global = true, env = "UNITSYNC_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the operator token.
    #[arg(long, global = true, env = "UNITSYNC_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// CA certificate (PEM) to trust for the hub; default: `ca.crt` in the
    /// data directory when present, else the public web PKI roots.
    #[arg(long, global = true, env = "UNITSYNC_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
    Yaml,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the hub.
    Serve(Box<ServeArgs>),
    /// Manage environments (the promotion order).
    #[command(subcommand)]
    Env(EnvCommand),
    /// Manage clusters (agent identities).
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Manage units and their revisions.
    #[command(subcommand)]
    Unit(UnitCommand),
    /// Show which revision and phase every cluster reports for every unit.
    Status {
        #[arg(long)]
        env: Option<String>,
        /// Keep showing it: redrawn as statuses arrive, through hub restarts
        /// (Ctrl-C ends).
        #[arg(long)]
        watch: bool,
    },
    /// Promote units from one environment to the next (gates apply).
    Promote(PromoteArgs),
    /// Approve a source revision for promotion into an environment (the
    /// answer names the revision approved).
    Approve {
        /// The source unit, ENV/NAME.
        unit: String,
        /// The environment the approval is for.
        #[arg(long = "for")]
        target: String,
        /// Source revision (default: the head when the hub takes the call).
        #[arg(long)]
        revision: Option<u64>,
    },
    /// Recorded promotions (release sets).
    #[command(subcommand)]
    Promotion(PromotionCommand),
    /// Operator credentials.
    #[command(subcommand)]
    Operator(OperatorCommand),
    /// OCI sources: ConfigHub releases and Flux-style artifacts.
    #[command(subcommand)]
    Source(source::SourceCommand),
    /// Agent installation.
    #[command(subcommand)]
    Agent(AgentCommand),
    /// Show the audit log, newest first.
    Audit {
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Only entries whose target starts with this (e.g. `dev/web`, `cluster/`).
        #[arg(long, default_value = "")]
        target: String,
    },
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// gRPC listen address.
    #[arg(long, env = crate::config::ENV_LISTEN, default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// HTTP address for /healthz, /readyz, /metrics and the dashboard (/ui/).
    #[arg(long, env = crate::config::ENV_HTTP_LISTEN, default_value = "127.0.0.1:7080")]
    pub http_listen: SocketAddr,
    /// Disable the HTTP endpoints.
    #[arg(long)]
    pub no_http: bool,
    /// Serve the HTTP address over TLS with the hub's certificate (the
    /// dashboard's cookie is then `Secure`; probes must use HTTPS).
    #[arg(long, env = "UNITSYNC_HTTP_TLS", conflicts_with = "insecure_plaintext")]
    pub http_tls: bool,
    /// Directory for the SQLite store and the admin token.
    #[arg(long, env = crate::config::ENV_DATA_DIR, default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// PostgreSQL database shared by hub replicas (`postgres://…`); default: SQLite in --data-dir.
    #[arg(long, env = "UNITSYNC_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Largest accepted unit, in bytes.
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    pub max_unit_bytes: usize,
    /// Most documents in one unit.
    #[arg(long, default_value_t = 1_000)]
    pub max_documents: usize,
    /// Deepest nesting in one document.
    #[arg(long, default_value_t = 64)]
    pub max_depth: usize,
    /// Seconds between heartbeats on agent streams.
    #[arg(long, default_value_t = 30)]
    pub heartbeat_seconds: u64,
    /// Agent sessions accepted at once; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 20_000)]
    pub max_sessions: usize,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "UNITSYNC_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Names (DNS or IP) in the generated server certificate; repeatable.
    #[arg(long = "tls-name", env = "UNITSYNC_TLS_NAMES", value_delimiter = ',', default_values_t = ["localhost".to_owned(), "127.0.0.1".to_owned()])]
    pub tls_names: Vec<String>,
    /// Serve with this certificate chain (PEM) instead of a generated one.
    #[arg(long, requires = "tls_key", env = "UNITSYNC_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert", env = "UNITSYNC_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Serve gRPC without TLS (development only; logged loudly).
    #[arg(long, conflicts_with = "tls_cert")]
    pub insecure_plaintext: bool,
    #[command(flatten)]
    pub confighub: ConfigHubArgs,
}

/// The hub as a ConfigHub worker (all optional: without a URL, no worker).
#[derive(Args, Debug, Default)]
pub struct ConfigHubArgs {
    /// ConfigHub's URL; with it the hub is a ConfigHub worker for every
    /// cluster (`cub worker create` gives the id and secret).
    #[arg(long, env = "CONFIGHUB_URL")]
    pub confighub_url: Option<String>,
    #[arg(long, env = "CONFIGHUB_WORKER_ID", requires = "confighub_url")]
    pub confighub_worker_id: Option<String>,
    /// File holding the worker secret (or the secret itself in the
    /// environment variable CONFIGHUB_WORKER_SECRET; never a flag, which
    /// `ps` would show).
    #[arg(long, env = "CONFIGHUB_WORKER_SECRET_FILE", requires = "confighub_url")]
    pub confighub_worker_secret_file: Option<PathBuf>,
    /// `long-poll` (a lease: one replica works the queue) or `http2-stream`.
    #[arg(long, env = "CONFIGHUB_WORKER_TRANSPORT", default_value = "long-poll")]
    pub confighub_transport: String,
    /// Trust this CA (PEM) for ConfigHub instead of the system roots.
    #[arg(long, env = "CONFIGHUB_CA_FILE")]
    pub confighub_ca_file: Option<PathBuf>,
    /// Environments offered as ConfigHub targets (default: all). Promotions
    /// into them happen in ConfigHub.
    #[arg(long, env = "CONFIGHUB_ENVIRONMENTS", value_delimiter = ',')]
    pub confighub_environments: Vec<String>,
    /// How long an Apply or Destroy waits for every cluster (unless the
    /// target sets WaitTimeout), e.g. `10m`.
    #[arg(long, default_value = "10m")]
    pub confighub_wait_timeout: humantime::Duration,
    /// The result ending an Apply whose resources are stuck:
    /// `ApplyWaitFailed` (every server knows it) or `ApplyStuck`.
    #[arg(long, default_value = "ApplyWaitFailed")]
    pub confighub_stuck_result: String,
}

impl ConfigHubArgs {
    fn config(&self) -> Result<Option<crate::source::confighub::ConfigHubConfig>, String> {
        use crate::source::confighub::{ConfigHubConfig, StuckResult};
        let Some(url) = &self.confighub_url else {
            return Ok(None);
        };
        let worker_id = self.confighub_worker_id.clone().ok_or(
            "--confighub-worker-id (CONFIGHUB_WORKER_ID) is required with --confighub-url",
        )?;
        let from_env = std::env::var("CONFIGHUB_WORKER_SECRET")
            .ok()
            .filter(|s| !s.is_empty());
        let secret = match (&self.confighub_worker_secret_file, from_env) {
            (Some(f), _) => std::fs::read_to_string(f)
                .map_err(|e| {
                    format!(
                        "cannot read the ConfigHub worker secret {}: {e}",
                        f.display()
                    )
                })?
                .trim()
                .to_owned(),
            (None, Some(s)) => s.trim().to_owned(),
            (None, None) => {
                return Err("--confighub-worker-secret-file or CONFIGHUB_WORKER_SECRET is required with --confighub-url".into());
            }
        };
        let ca_pem = match &self.confighub_ca_file {
            Some(f) => Some(
                std::fs::read_to_string(f)
                    .map_err(|e| format!("cannot read the ConfigHub CA {}: {e}", f.display()))?,
            ),
            None => None,
        };
        let environments = if self.confighub_environments.is_empty() {
            None
        } else {
            Some(
                self.confighub_environments
                    .iter()
                    .map(|e| {
                        e.parse()
                            .map_err(|e: crate::model::NameError| e.to_string())
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            )
        };
        Ok(Some(ConfigHubConfig {
            url: url.clone(),
            worker_id,
            secret: crate::auth::Secret::from_string(secret),
            transport: self.confighub_transport.parse()?,
            ca_pem,
            environments,
            wait_timeout: self.confighub_wait_timeout.into(),
            stuck_result: match self.confighub_stuck_result.as_str() {
                "ApplyWaitFailed" => StuckResult::WaitFailed,
                "ApplyStuck" => StuckResult::Stuck,
                other => {
                    return Err(format!(
                        "--confighub-stuck-result {other:?}: ApplyWaitFailed or ApplyStuck"
                    ));
                }
            },
        }))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl ServeArgs {
    /// The hub's configuration (reads the files it names).
    pub fn config(&self) -> Result<crate::Config, crate::config::ConfigError> {
        let mut tuning = crate::control::Tuning::default();
        tuning.limits.max_bytes = self.max_unit_bytes;
        tuning.limits.max_documents = self.max_documents;
        tuning.limits.max_depth = self.max_depth;
        tuning.heartbeat = Duration::from_secs(self.heartbeat_seconds);
        tuning.max_sessions = self.max_sessions;
        let tls = match (&self.tls_cert, &self.tls_key) {
            _ if self.insecure_plaintext => crate::tls::TlsMode::Plaintext,
            (Some(cert), Some(key)) => crate::tls::TlsMode::Files {
                cert: cert.clone(),
                key: key.clone(),
            },
            _ => crate::tls::TlsMode::Generated {
                names: self.tls_names.clone(),
            },
        };
        Ok(crate::Config {
            listen: self.listen,
            http_listen: (!self.no_http).then_some(self.http_listen),
            http_tls: self.http_tls,
            data_dir: self.data_dir.clone(),
            database_url: self.database_url.clone(),
            tls,
            tuning,
            confighub: self
                .confighub
                .config()
                .map_err(crate::config::ConfigError::Invalid)?,
        })
    }
}

#[derive(Args, Debug, Clone, Default)]
pub struct PolicyArgs {
    /// Approvals from distinct operators required to promote into it.
    #[arg(long)]
    pub approvals: Option<u32>,
    /// Seconds the source revision must have been Ready everywhere.
    #[arg(long)]
    pub soak: Option<u64>,
    /// Promote into it automatically once the gates pass.
    #[arg(long)]
    pub auto_promote: Option<bool>,
}

#[derive(Subcommand, Debug)]
pub enum EnvCommand {
    /// Create an environment (appended to the pipeline unless --after),
    /// with its promotion policy in the same step.
    Create {
        name: String,
        #[arg(long)]
        after: Option<String>,
        #[command(flatten)]
        policy: PolicyArgs,
    },
    /// Change an environment's promotion policy (what the flags name; the
    /// rest stays).
    Policy {
        name: String,
        #[command(flatten)]
        policy: PolicyArgs,
    },
    /// List environments in pipeline order, with their promotion policy.
    List,
}

#[derive(Args, Debug)]
pub struct PromoteArgs {
    #[arg(long)]
    pub from: String,
    #[arg(long)]
    pub to: String,
    /// Unit names (without environment).
    pub units: Vec<String>,
    /// Every unit of the source environment.
    #[arg(long)]
    pub all: bool,
    /// Units whose labels match, `k=v[,k2=v2]`.
    #[arg(long)]
    pub selector: Option<String>,
    /// Source revision (one unit only; default: head).
    #[arg(long)]
    pub revision: Option<u64>,
    /// Show what would be committed and which gates block.
    #[arg(long)]
    pub dry_run: bool,
    /// Override the gates (an emergency; audited). Needs --reason.
    #[arg(long)]
    pub force: bool,
    #[arg(long, default_value = "")]
    pub reason: String,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Subcommand, Debug)]
pub enum PromotionCommand {
    List {
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Roll a release set back: each unit returns to its previous revision.
    Rollback { id: u64 },
}

#[derive(Subcommand, Debug)]
pub enum AgentCommand {
    /// Print the manifests installing the agent for cluster NAME, for
    /// `| kubectl apply -f -`.
    Install(InstallArgs),
}

#[derive(Args, Debug)]
pub struct InstallArgs {
    /// The cluster (as registered with `unitsync cluster create`).
    pub name: String,
    /// Print the manifests (the only mode: pipe them into kubectl).
    #[arg(long)]
    pub export: bool,
    /// Include the credential Secret (issues a new token; the old one stops working).
    #[arg(long)]
    pub include_secret: bool,
    /// Print only the credential Secret (issues a new token).
    #[arg(long, conflicts_with = "include_secret")]
    pub export_secret_only: bool,
    /// Namespace of the agent.
    #[arg(long, default_value = "unitsync-system")]
    pub namespace: String,
    /// Permissions: `admin` (default: aggregated ClusterRole, not cluster-admin),
    /// `namespaced` (RoleBindings in --namespaces only) or `cluster-admin`.
    #[arg(long, default_value = "admin", value_parser = ["admin", "namespaced", "cluster-admin"])]
    pub rbac: String,
    /// With `--rbac namespaced`: the namespaces, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub namespaces: Vec<String>,
    /// Agent image.
    #[arg(long, default_value = concat!("ghcr.io/unitsync/unitsync-agent:", env!("CARGO_PKG_VERSION")))]
    pub image: String,
    /// The hub address the agent dials (default: --hub).
    #[arg(long)]
    pub hub_url: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum OperatorCommand {
    /// Create an operator token (shown once); an existing name is refused.
    Create {
        name: String,
        #[arg(long, default_value = "admin")]
        role: String,
    },
    /// Issue a new token for an operator (shown once); the old one stops
    /// working at once.
    Rotate { name: String },
}

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Register a cluster and print its agent token (shown once).
    Create {
        name: String,
        #[arg(long)]
        env: String,
        /// Labels as key=value; repeatable.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    List {
        #[arg(long)]
        env: Option<String>,
    },
    Get {
        name: String,
    },
    /// Delete a cluster: its token stops working and its agent is disconnected.
    Delete {
        name: String,
    },
    /// Issue a client certificate (mutual TLS) for the cluster's agent:
    /// writes tls.crt, tls.key (0600) and ca.crt into --out.
    Certificate {
        name: String,
        #[arg(long)]
        out: PathBuf,
        /// Validity in days (at most 90; the agent renews before expiry).
        #[arg(long, default_value_t = 30)]
        days: u64,
    },
    /// Revoke every credential of the cluster for good; its agent is cut off.
    Revoke {
        name: String,
    },
}

#[derive(Args, Debug)]
pub struct PutArgs {
    /// The unit, as ENV/NAME.
    pub unit: String,
    /// Manifest file (multi-document YAML); `-` reads standard input.
    #[arg(short = 'f', long = "filename", required_unless_present = "from")]
    pub file: Option<PathBuf>,
    /// Create the unit linked to an upstream unit (ENV/NAME) instead.
    #[arg(long, conflicts_with = "file")]
    pub from: Option<String>,
    /// Change message recorded with the revision.
    #[arg(short = 'm', long, default_value = "")]
    pub message: String,
    /// Labels as key=value; repeatable (a unit created --from takes its
    /// upstream's).
    #[arg(long = "label", value_parser = parse_label, conflicts_with = "from")]
    pub labels: Vec<(String, String)>,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Args, Debug, Clone, Copy)]
pub struct WaitArgs {
    /// Wait until every cluster of the environment reports the new revision
    /// Ready (fails fast on Failed/Degraded or a later commit; outlives hub
    /// restarts).
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits, in seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
}

#[derive(Subcommand, Debug)]
pub enum UnitCommand {
    /// Create a unit (its revision 1).
    Create(PutArgs),
    /// Commit a new revision of an existing unit.
    Update(PutArgs),
    /// Show a unit, its head revision and per-cluster status.
    Get {
        unit: String,
        /// Print the head revision's manifests.
        #[arg(long)]
        manifests: bool,
    },
    List {
        #[arg(long)]
        env: Option<String>,
    },
    /// List a unit's revisions.
    History { unit: String },
    /// Diff two revisions (default: the head against the one before).
    Diff {
        unit: String,
        #[arg(long)]
        from: Option<u64>,
        #[arg(long)]
        to: Option<u64>,
    },
    /// Commit a new revision with an older revision's content.
    Rollback {
        unit: String,
        #[arg(long)]
        to: u64,
        #[arg(short = 'm', long, default_value = "")]
        message: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Set the unit's overrides (applied on top of every promotion) from a
    /// YAML list of {kind, name, namespace?, path, value}; `--clear` removes them.
    Override {
        unit: String,
        #[arg(short = 'f', long = "filename", required_unless_present = "clear")]
        file: Option<PathBuf>,
        #[arg(long)]
        clear: bool,
    },
    /// Destroy a unit: agents delete its objects.
    Destroy {
        unit: String,
        #[arg(short = 'm', long, default_value = "")]
        message: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("label {s:?} must be written key=value"))?;
    if k.is_empty() {
        return Err(format!("label {s:?} has an empty key"));
    }
    Ok((k.to_owned(), v.to_owned()))
}
