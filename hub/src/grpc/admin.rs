//! `HubService`: the operator API behind the `unitsync` CLI. Every call is
//! authenticated; writes need the admin role and are audited with the actor.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use unitsync_proto::v1 as pb;

use super::convert::{self, parse};
use crate::auth::{authenticate, require_operator};
use crate::control::Hub;
use crate::error::{HubError, Result};
use crate::model::{Actor, ClusterName, EnvName, Labels, PutMode, RevisionNum, UnitRef};

pub struct AdminService {
    hub: Arc<Hub>,
}

impl AdminService {
    pub fn new(hub: Arc<Hub>) -> Self {
        Self { hub }
    }

    async fn operator<T>(&self, req: &Request<T>, write: bool) -> Result<Actor> {
        let p = authenticate(self.hub.store.as_ref(), req.metadata()).await?;
        require_operator(&p, write)
    }
}

fn optional_env(s: &str) -> Result<Option<EnvName>> {
    if s.is_empty() {
        Ok(None)
    } else {
        parse(s).map(Some)
    }
}

fn labels(map: std::collections::HashMap<String, String>) -> Result<Labels> {
    for (k, v) in &map {
        if k.is_empty() || k.len() > 317 || v.len() > 63 {
            return Err(HubError::InvalidArgument(format!("invalid label {k}={v}")));
        }
    }
    Ok(map.into_iter().collect())
}

type Reply<T> = std::result::Result<Response<T>, Status>;

fn ok<T>(r: Result<T>) -> Reply<T> {
    r.map(Response::new).map_err(Status::from)
}

#[tonic::async_trait]
impl pb::hub_service_server::HubService for AdminService {
    async fn create_environment(
        &self,
        req: Request<pb::CreateEnvironmentRequest>,
    ) -> Reply<pb::Environment> {
        ok(async {
            let actor = self.operator(&req, true).await?;
            let r = req.into_inner();
            let env = self
                .hub
                .create_environment(actor, parse(&r.name)?, optional_env(&r.after)?)
                .await?;
            Ok(convert::environment(&env))
        }
        .await)
    }

    async fn list_environments(
        &self,
        req: Request<pb::ListEnvironmentsRequest>,
    ) -> Reply<pb::ListEnvironmentsResponse> {
        ok(async {
            self.operator(&req, false).await?;
            let envs = self.hub.store.list_environments().await?;
            Ok(pb::ListEnvironmentsResponse {
                environments: envs.iter().map(convert::environment).collect(),
            })
        }
        .await)
    }

    async fn create_cluster(
        &self,
        req: Request<pb::CreateClusterRequest>,
    ) -> Reply<pb::CreateClusterResponse> {
        ok(async {
            let actor = self.operator(&req, true).await?;
            let r = req.into_inner();
            let (cluster, token) = self
                .hub
                .create_cluster(
                    actor,
                    parse(&r.name)?,
                    parse(&r.environment)?,
                    labels(r.labels)?,
                )
                .await?;
            Ok(pb::CreateClusterResponse {
                cluster: Some(convert::cluster(&cluster, None)),
                token: token.expose().to_owned(),
            })
        }
        .await)
    }

    async fn list_clusters(
        &self,
        req: Request<pb::ListClustersRequest>,
    ) -> Reply<pb::ListClustersResponse> {
        ok(async {
            self.operator(&req, false).await?;
            let env = optional_env(&req.get_ref().environment)?;
            let clusters = self.hub.store.list_clusters(env.as_ref()).await?;
            Ok(pb::ListClustersResponse {
                clusters: clusters
                    .iter()
                    .map(|c| convert::cluster(c, self.hub.fanout.session(&c.name).as_deref()))
                    .collect(),
            })
        }
        .await)
    }

    async fn get_cluster(&self, req: Request<pb::GetClusterRequest>) -> Reply<pb::Cluster> {
        ok(async {
            self.operator(&req, false).await?;
            let name: ClusterName = parse(&req.get_ref().name)?;
            let c = self
                .hub
                .store
                .get_cluster(&name)
                .await?
                .ok_or_else(|| HubError::NotFound(format!("cluster {name}")))?;
            Ok(convert::cluster(
                &c,
                self.hub.fanout.session(&name).as_deref(),
            ))
        }
        .await)
    }

    async fn delete_cluster(
        &self,
        req: Request<pb::DeleteClusterRequest>,
    ) -> Reply<pb::DeleteClusterResponse> {
        ok(async {
            let actor = self.operator(&req, true).await?;
            self.hub
                .delete_cluster(actor, parse(&req.get_ref().name)?)
                .await?;
            Ok(pb::DeleteClusterResponse {})
        }
        .await)
    }

    async fn put_unit(&self, req: Request<pb::PutUnitRequest>) -> Reply<pb::Revision> {
        ok(async {
            let actor = self.operator(&req, true).await?;
            let r = req.into_inner();
            let mode = match pb::PutMode::try_from(r.mode).unwrap_or(pb::PutMode::Unspecified) {
                pb::PutMode::Unspecified => PutMode::CreateOrUpdate,
                pb::PutMode::Create => PutMode::Create,
                pb::PutMode::Update => PutMode::Update,
            };
            let labels = if r.labels.is_empty() {
                None
            } else {
                Some(labels(r.labels)?)
            };
            let rev = self
                .hub
                .put_unit(actor, parse(&r.unit)?, r.manifests, r.message, mode, labels)
                .await?;
            let mut out = convert::revision(&rev);
            out.manifests.clear();
            Ok(out)
        }
        .await)
    }

    async fn destroy_unit(&self, req: Request<pb::DestroyUnitRequest>) -> Reply<pb::Revision> {
        ok(async {
            let actor = self.operator(&req, true).await?;
            let r = req.into_inner();
            let rev = self
                .hub
                .destroy_unit(actor, parse(&r.unit)?, r.message)
                .await?;
            Ok(convert::revision(&rev))
        }
        .await)
    }

    async fn get_unit(&self, req: Request<pb::GetUnitRequest>) -> Reply<pb::UnitDetail> {
        ok(async {
            self.operator(&req, false).await?;
            let r = req.get_ref();
            let unit: UnitRef = parse(&r.unit)?;
            let store = &self.hub.store;
            let u = store
                .get_unit(&unit)
                .await?
                .ok_or_else(|| HubError::NotFound(format!("unit {unit}")))?;
            let mut head = store
                .get_revision(&unit, u.head)
                .await?
                .map(|h| convert::revision(&h));
            if !r.include_manifests
                && let Some(h) = head.as_mut()
            {
                h.manifests.clear();
            }
            let cells = store.statuses(Some(&unit.env), Some(&unit)).await?;
            Ok(pb::UnitDetail {
                unit: Some(convert::unit(&u)),
                head,
                clusters: cells
                    .iter()
                    .map(|c| convert::status_cell(c, self.hub.fanout.session(&c.cluster).is_some()))
                    .collect(),
            })
        }
        .await)
    }

    async fn list_units(&self, req: Request<pb::ListUnitsRequest>) -> Reply<pb::ListUnitsResponse> {
        ok(async {
            self.operator(&req, false).await?;
            let env = optional_env(&req.get_ref().environment)?;
            let units = self.hub.store.list_units(env.as_ref()).await?;
            Ok(pb::ListUnitsResponse {
                units: units.iter().map(convert::unit).collect(),
            })
        }
        .await)
    }

    async fn unit_history(
        &self,
        req: Request<pb::UnitHistoryRequest>,
    ) -> Reply<pb::UnitHistoryResponse> {
        ok(async {
            self.operator(&req, false).await?;
            let unit: UnitRef = parse(&req.get_ref().unit)?;
            let revs = self.hub.store.history(&unit).await?;
            if revs.is_empty() {
                return Err(HubError::NotFound(format!("unit {unit}")));
            }
            Ok(pb::UnitHistoryResponse {
                revisions: revs.iter().map(convert::revision).collect(),
            })
        }
        .await)
    }

    async fn get_revision(&self, req: Request<pb::GetRevisionRequest>) -> Reply<pb::Revision> {
        ok(async {
            self.operator(&req, false).await?;
            let r = req.get_ref();
            let unit: UnitRef = parse(&r.unit)?;
            let number = if r.number == 0 {
                self.hub
                    .store
                    .get_unit(&unit)
                    .await?
                    .ok_or_else(|| HubError::NotFound(format!("unit {unit}")))?
                    .head
            } else {
                RevisionNum(r.number)
            };
            let rev = self
                .hub
                .store
                .get_revision(&unit, number)
                .await?
                .ok_or_else(|| HubError::NotFound(format!("unit {unit} revision {number}")))?;
            Ok(convert::revision(&rev))
        }
        .await)
    }

    async fn get_status(&self, req: Request<pb::GetStatusRequest>) -> Reply<pb::StatusMatrix> {
        ok(async {
            self.operator(&req, false).await?;
            let env = optional_env(&req.get_ref().environment)?;
            let store = &self.hub.store;
            let units = store.list_units(env.as_ref()).await?;
            let clusters = store.list_clusters(env.as_ref()).await?;
            let cells = store.statuses(env.as_ref(), None).await?;
            let fanout = &self.hub.fanout;
            Ok(pb::StatusMatrix {
                units: units.iter().map(convert::unit).collect(),
                clusters: clusters
                    .iter()
                    .map(|c| convert::cluster(c, fanout.session(&c.name).as_deref()))
                    .collect(),
                cells: cells
                    .iter()
                    .map(|c| convert::status_cell(c, fanout.session(&c.cluster).is_some()))
                    .collect(),
            })
        }
        .await)
    }

    async fn list_audit(&self, req: Request<pb::ListAuditRequest>) -> Reply<pb::ListAuditResponse> {
        ok(async {
            self.operator(&req, false).await?;
            let r = req.get_ref();
            let limit = if r.limit == 0 {
                100
            } else {
                r.limit.min(10_000)
            };
            let entries = self.hub.store.list_audit(limit, &r.target_prefix).await?;
            Ok(pb::ListAuditResponse {
                entries: entries.iter().map(convert::audit).collect(),
            })
        }
        .await)
    }
}
