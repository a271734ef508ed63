//! An in-process hub with its own temporary data directory.

use std::net::SocketAddr;

use tempfile::TempDir;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use unitsync_hub::control::Tuning;
use unitsync_hub::source::confighub::ConfigHubConfig;
use unitsync_hub::{Config, RunningHub};
use unitsync_proto::v1 as pb;
use unitsync_proto::v1::hub_service_client::HubServiceClient;

use crate::wait::within;

/// Adds a bearer token to every call.
#[derive(Clone)]
pub struct BearerAuth(MetadataValue<Ascii>);

impl BearerAuth {
    /// `Authorization: Bearer <token>`.
    pub fn new(token: &str) -> anyhow::Result<BearerAuth> {
        Ok(BearerAuth(format!("Bearer {}", token.trim()).parse()?))
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

pub type Admin = HubServiceClient<InterceptedService<Channel, BearerAuth>>;

/// Logs warnings and errors into the test output (`UNITSYNC_LOG` overrides).
pub fn init_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_env("UNITSYNC_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

pub struct TestHub {
    pub dir: TempDir,
    pub addr: SocketAddr,
    pub admin_token: String,
    tuning: Tuning,
    database_url: Option<String>,
    confighub: Option<ConfigHubConfig>,
    running: Option<RunningHub>,
}

/// A fresh PostgreSQL database for one test, on the server named by
/// `UNITSYNC_TEST_POSTGRES_URL` (deploy/test.sh starts one).
pub async fn postgres_database() -> String {
    use sqlx::Connection;
    let admin = std::env::var("UNITSYNC_TEST_POSTGRES_URL")
        .expect("UNITSYNC_TEST_POSTGRES_URL names a PostgreSQL server (deploy/test.sh sets it)");
    let name = format!("unitsync_test_{:016x}", rand::random::<u64>());
    let mut conn = within("connect to PostgreSQL", sqlx::PgConnection::connect(&admin))
        .await
        .expect("PostgreSQL reachable");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .expect("create database");
    let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
    format!("{base}/{name}")
}

/// A TLS channel to `endpoint`, trusting `ca` (PEM).
pub async fn tls_channel(endpoint: &str, ca: &str) -> Channel {
    let ca = tonic::transport::Certificate::from_pem(ca);
    let endpoint = Channel::from_shared(endpoint.to_owned())
        .unwrap()
        .tls_config(tonic::transport::ClientTlsConfig::new().ca_certificate(ca))
        .unwrap();
    within("connect to hub", endpoint.connect())
        .await
        .expect("connect")
}

/// An operator's client on `channel`, with `token`.
pub fn operator_client(channel: Channel, token: &str) -> Admin {
    let value = format!("Bearer {token}").parse().expect("ascii token");
    HubServiceClient::with_interceptor(channel, BearerAuth(value))
}

impl TestHub {
    pub async fn start() -> TestHub {
        Self::start_with(Tuning::default()).await
    }

    pub async fn start_with(tuning: Tuning) -> TestHub {
        Self::start_full(tuning, None, None, None).await
    }

    /// A hub that is also a ConfigHub worker (on SQLite, or on the
    /// PostgreSQL database `database_url`, as a replica of `replica_of`).
    pub async fn start_confighub(
        confighub: ConfigHubConfig,
        database_url: Option<String>,
        replica_of: Option<&TestHub>,
    ) -> TestHub {
        Self::start_full(Tuning::default(), database_url, replica_of, Some(confighub)).await
    }

    /// A hub on a PostgreSQL database; `replica_of` shares another hub's
    /// admin token and CA (as replicas do through a shared Secret).
    pub async fn start_on_postgres(url: &str, replica_of: Option<&TestHub>) -> TestHub {
        Self::start_full(Tuning::default(), Some(url.to_owned()), replica_of, None).await
    }

    /// The same, with tuning.
    pub async fn start_on_postgres_with(
        url: &str,
        replica_of: Option<&TestHub>,
        tuning: Tuning,
    ) -> TestHub {
        Self::start_full(tuning, Some(url.to_owned()), replica_of, None).await
    }

    async fn start_full(
        tuning: Tuning,
        database_url: Option<String>,
        replica_of: Option<&TestHub>,
        confighub: Option<ConfigHubConfig>,
    ) -> TestHub {
        init_logs();
        crate::cluster::init_crypto();
        let dir = tempfile::tempdir().expect("temp dir");
        if let Some(other) = replica_of {
            let data = dir.path().join("data");
            std::fs::create_dir_all(&data).unwrap();
            for f in ["admin.token", "ca.crt", "ca.key"] {
                std::fs::copy(other.dir.path().join("data").join(f), data.join(f)).unwrap();
            }
        }
        let running = Self::launch(
            &dir,
            "127.0.0.1:0".parse().unwrap(),
            tuning.clone(),
            database_url.clone(),
            confighub.clone(),
        )
        .await;
        TestHub {
            addr: running.grpc_addr,
            admin_token: running.admin_token.clone(),
            dir,
            tuning,
            database_url,
            confighub,
            running: Some(running),
        }
    }

    async fn launch(
        dir: &TempDir,
        listen: SocketAddr,
        tuning: Tuning,
        database_url: Option<String>,
        confighub: Option<ConfigHubConfig>,
    ) -> RunningHub {
        let config = Config {
            listen,
            http_listen: Some("127.0.0.1:0".parse().unwrap()),
            http_tls: false,
            data_dir: dir.path().join("data"),
            database_url,
            tls: unitsync_hub::tls::TlsMode::Generated {
                names: vec!["localhost".into(), "127.0.0.1".into()],
            },
            tuning,
            confighub,
        };
        within("hub start", unitsync_hub::start(config))
            .await
            .expect("hub starts")
    }

    pub fn endpoint(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The hub's CA certificate (PEM).
    pub fn ca(&self) -> Option<&str> {
        self.running().ca_pem.as_deref()
    }

    /// A TLS channel to the hub.
    pub async fn channel(&self) -> Channel {
        tls_channel(&self.endpoint(), self.ca().expect("TLS is on")).await
    }

    pub fn running(&self) -> &RunningHub {
        self.running.as_ref().expect("hub is running")
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.running().http_addr.expect("http enabled")
    }

    /// The hub's Prometheus metrics text.
    pub async fn metrics(&self) -> String {
        within(
            "metrics",
            crate::processes::http_get(self.http_addr(), "/metrics"),
        )
        .await
        .expect("metrics served")
        .1
    }

    pub fn db_path(&self) -> std::path::PathBuf {
        self.dir.path().join("data").join("hub.db")
    }

    /// Stops the hub (sessions end, feedback is flushed).
    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            within("hub shutdown", r.shutdown()).await;
        }
    }

    /// Stops and starts again on the same address and data directory.
    pub async fn restart(&mut self) {
        self.stop().await;
        let r = Self::launch(
            &self.dir,
            self.addr,
            self.tuning.clone(),
            self.database_url.clone(),
            self.confighub.clone(),
        )
        .await;
        assert_eq!(
            r.admin_token, self.admin_token,
            "the admin token survives restarts"
        );
        self.running = Some(r);
    }

    pub async fn client(&self, token: &str) -> Admin {
        operator_client(self.channel().await, token)
    }

    pub async fn admin(&self) -> Admin {
        self.client(&self.admin_token).await
    }

    pub async fn create_env(&self, name: &str) {
        within(
            "create env",
            self.admin()
                .await
                .create_environment(pb::CreateEnvironmentRequest {
                    name: name.into(),
                    after: String::new(),
                    policy: None,
                }),
        )
        .await
        .expect("environment created");
    }

    /// Creates an operator (`admin` or `read-only`) and returns its token.
    pub async fn create_operator(&self, name: &str, role: &str) -> String {
        within(
            "create operator",
            self.admin()
                .await
                .create_operator(pb::CreateOperatorRequest {
                    name: name.into(),
                    role: role.into(),
                }),
        )
        .await
        .expect("operator created")
        .into_inner()
        .token
    }

    /// Links `unit` to `upstream` (`unit create UNIT --from UPSTREAM`).
    pub async fn link(&self, unit: &str, upstream: &str) {
        within(
            "link",
            self.admin().await.link_unit(pb::LinkUnitRequest {
                unit: unit.into(),
                upstream: upstream.into(),
                message: String::new(),
            }),
        )
        .await
        .expect("linked");
    }

    /// Has `env` promote its linked units automatically.
    pub async fn auto_promote(&self, env: &str) {
        within(
            "policy",
            self.admin()
                .await
                .set_environment_policy(pb::SetEnvironmentPolicyRequest {
                    name: env.into(),
                    policy: Some(pb::EnvironmentPolicy {
                        auto_promote: true,
                        ..Default::default()
                    }),
                }),
        )
        .await
        .expect("policy set");
    }

    /// Creates a cluster and returns its agent token.
    pub async fn create_cluster(&self, name: &str, env: &str) -> String {
        within(
            "create cluster",
            self.admin().await.create_cluster(pb::CreateClusterRequest {
                name: name.into(),
                environment: env.into(),
                labels: Default::default(),
            }),
        )
        .await
        .expect("cluster created")
        .into_inner()
        .token
    }

    pub async fn put(&self, unit: &str, manifests: &str) -> Result<pb::Revision, tonic::Status> {
        within(
            "put unit",
            self.admin().await.put_unit(pb::PutUnitRequest {
                unit: unit.into(),
                manifests: manifests.into(),
                message: format!("test put of {unit}"),
                mode: pb::PutMode::Unspecified.into(),
                labels: Default::default(),
            }),
        )
        .await
        .map(tonic::Response::into_inner)
    }

    pub async fn destroy(&self, unit: &str) -> Result<pb::Revision, tonic::Status> {
        within(
            "destroy unit",
            self.admin().await.destroy_unit(pb::DestroyUnitRequest {
                unit: unit.into(),
                message: "test destroy".into(),
            }),
        )
        .await
        .map(tonic::Response::into_inner)
    }

    pub async fn unit(&self, unit: &str) -> Result<pb::UnitDetail, tonic::Status> {
        within(
            "get unit",
            self.admin().await.get_unit(pb::GetUnitRequest {
                unit: unit.into(),
                include_manifests: true,
                ..Default::default()
            }),
        )
        .await
        .map(tonic::Response::into_inner)
    }
}
