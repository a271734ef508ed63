//! The CLI's connection to the hub: endpoint, bearer token, deadlines.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use unitsync_proto::dial::{self, Role};
use unitsync_proto::v1::hub_service_client::HubServiceClient;

use super::{DEFAULT_DATA_DIR, Global};

pub(super) type Client = HubServiceClient<InterceptedService<Channel, Bearer>>;

/// Adds `authorization: Bearer …` to every call.
#[derive(Clone)]
pub(super) struct Bearer(MetadataValue<tonic::metadata::Ascii>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut()
            .insert(unitsync_proto::AUTHORIZATION, self.0.clone());
        Ok(req)
    }
}

fn read_token(path: &Path) -> anyhow::Result<String> {
    let s = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the token file {}", path.display()))?;
    Ok(s.trim().to_owned())
}

fn data_dir() -> std::path::PathBuf {
    std::env::var_os(crate::config::ENV_DATA_DIR)
        .map_or_else(|| DEFAULT_DATA_DIR.into(), std::path::PathBuf::from)
}

/// The CA to trust: `--ca-file`, else `ca.crt` in the data directory.
pub(super) fn ca_pem(g: &Global) -> anyhow::Result<Option<String>> {
    let path = match &g.ca_file {
        Some(p) => p.clone(),
        None => {
            let p = data_dir().join("ca.crt");
            if !p.exists() {
                return Ok(None);
            }
            p
        }
    };
    Ok(Some(std::fs::read_to_string(&path).with_context(|| {
        format!("cannot read the CA file {}", path.display())
    })?))
}

/// The operator token: `--token`, then `--token-file`, then
/// `$UNITSYNC_DATA_DIR/admin.token` (or `./unitsync-data/admin.token`).
fn token(g: &Global) -> anyhow::Result<String> {
    if let Some(t) = &g.token {
        return Ok(t.trim().to_owned());
    }
    if let Some(p) = &g.token_file {
        return read_token(p);
    }
    let path = data_dir().join("admin.token");
    if path.exists() {
        return read_token(&path);
    }
    bail!(
        "no operator token: set UNITSYNC_TOKEN, pass --token-file, or run next to the hub's data directory"
    )
}

pub(super) async fn connect(g: &Global) -> anyhow::Result<Client> {
    let token = token(g)?;
    let value: MetadataValue<_> = format!("Bearer {token}")
        .parse()
        .context("the operator token contains characters that cannot be sent")?;
    let ca = if g.hub.starts_with("https://") {
        ca_pem(g)?
    } else {
        None
    };
    let (endpoint, dialer) = dial::prepare(&g.hub, Role::Operator, ca.as_deref(), None)?;
    let channel = endpoint
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(60))
        // A watch (`--wait`, `status --watch`) notices a hub that vanished
        // without closing the connection (its node died, a partition).
        .http2_keep_alive_interval(Duration::from_secs(15))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .connect_with_connector(dialer)
        .await
        .with_context(|| format!("cannot reach the hub at {}", g.hub))?;
    Ok(HubServiceClient::with_interceptor(channel, Bearer(value))
        .max_decoding_message_size(unitsync_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(unitsync_proto::MAX_MESSAGE_BYTES))
}

/// A unit with the status of every cluster (all pages).
pub(super) async fn unit_detail(
    c: &mut Client,
    unit: &str,
    include_manifests: bool,
) -> Result<tonic::Response<unitsync_proto::v1::UnitDetail>, tonic::Status> {
    use unitsync_proto::v1 as pb;
    let mut detail = c
        .get_unit(pb::GetUnitRequest {
            unit: unit.to_owned(),
            include_manifests,
            ..Default::default()
        })
        .await?
        .into_inner();
    while !detail.next_page_token.is_empty() {
        let more = c
            .get_unit(pb::GetUnitRequest {
                unit: unit.to_owned(),
                page_token: std::mem::take(&mut detail.next_page_token),
                ..Default::default()
            })
            .await?
            .into_inner();
        detail.clusters.extend(more.clusters);
        detail.next_page_token = more.next_page_token;
    }
    Ok(tonic::Response::new(detail))
}

/// The whole status matrix (all pages).
pub(super) async fn status_matrix(
    c: &mut Client,
    environment: &str,
) -> Result<tonic::Response<unitsync_proto::v1::StatusMatrix>, tonic::Status> {
    use unitsync_proto::v1 as pb;
    let mut m = c
        .get_status(pb::GetStatusRequest {
            environment: environment.to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner();
    while !m.next_page_token.is_empty() {
        let more = c
            .get_status(pb::GetStatusRequest {
                environment: environment.to_owned(),
                page_token: std::mem::take(&mut m.next_page_token),
                ..Default::default()
            })
            .await?
            .into_inner();
        m.cells.extend(more.cells);
        m.next_page_token = more.next_page_token;
    }
    Ok(tonic::Response::new(m))
}
