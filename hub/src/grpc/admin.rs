//! `HubService`: the operator API behind the `unitsync` CLI. Every call is
//! authenticated; writes need the admin role and are audited with the actor.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use unitsync_proto::v1 as pb;

use super::convert::{self, parse};
use crate::auth::{OPERATOR_TOKEN_PREFIX, Secret};
use crate::auth::{authenticate_request, require_operator};
use crate::control::{DEFAULT_CERT_VALIDITY, Hub, MAX_CERT_VALIDITY};
use crate::error::{HubError, Result};
use crate::model::{
    Actor, ClusterName, EnvName, EnvPolicy, Labels, NewAudit, PutMode, RevisionNum, Role, UnitRef,
};
use crate::promote::{PromoteRequest, Selection};
use crate::store::Operator;

pub struct AdminService {
    hub: Arc<Hub>,
}

impl AdminService {
    pub fn new(hub: Arc<Hub>) -> Self {
        Self { hub }
    }

    async fn operator<T>(&self, req: &Request<T>, write: bool) -> Result<Actor> {
        let p = authenticate_request(self.hub.store.as_ref(), req).await?;
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

    async fn issue_cluster_token(
        &self,
        req: Request<pb::IssueClusterTokenRequest>,
    ) -> Reply<pb::CreateClusterResponse> {
        ok(async {
            let actor = self.operator(&req, true).await?;
            let (cluster, token) = self
                .hub
                .issue_cluster_token(actor, parse(&req.get_ref().name)?)
                .await?;
            Ok(pb::CreateClusterResponse {
                cluster: Some(convert::cluster(&cluster, None)),
                token: token.expose().to_owned(),
            })
        }
        .await)
    }

    async fn issue_cluster_certificate(
        &self,
        req: Request<pb::IssueClusterCertificateRequest>,
    ) -> Reply<pb::ClusterCertificate> {
        ok(async {
            let actor = self.operator(&req, true).await?;
            let r = req.into_inner();
            let validity = match r.validity_seconds {
                0 => DEFAULT_CERT_VALIDITY,
                s if s > MAX_CERT_VALIDITY.as_secs() => {
                    return Err(HubError::InvalidArgument(format!(
                        "certificate validity is at most {} days",
                        MAX_CERT_VALIDITY.as_secs() / 86_400
                    )));
                }
                s => std::time::Duration::from_secs(s),
            };
            let cert = self
                .hub
                .issue_cluster_cert(actor, parse(&r.name)?, validity)
                .await?;
            let ca = std::fs::read_to_string(self.hub.ca_path()).unwrap_or_default();
            Ok(pb::ClusterCertificate {
                certificate_pem: cert.cert_pem,
                private_key_pem: cert.key_pem,
                ca_pem: ca,
                not_after: Some(cert.not_after.into()),
                fingerprint: cert.fingerprint,
            })
        }
        .await)
    }

    async fn revoke_cluster(
        &self,
        req: Request<pb::RevokeClusterRequest>,
    ) -> Reply<pb::RevokeClusterResponse> {
        ok(async {
            let actor = self.operator(&req, true).await?;
            self.hub
                .revoke_cluster(actor, parse(&req.get_ref().name)?)
                .await?;
            Ok(pb::RevokeClusterResponse {})
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
            let live = self.hub.fanout.connected();
            let pb_unit = convert::unit(&u);
            Ok(pb::UnitDetail {
                unit: Some(pb_unit),
                head,
                clusters: cells
                    .iter()
                    .map(|c| convert::status_cell(c, live.contains(&c.cluster)))
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
            let live = fanout.connected();
            Ok(pb::StatusMatrix {
                units: units.iter().map(convert::unit).collect(),
                clusters: clusters
                    .iter()
                    .map(|c| convert::cluster(c, fanout.session(&c.name).as_deref()))
                    .collect(),
                cells: cells
                    .iter()
                    .map(|c| convert::status_cell(c, live.contains(&c.cluster)))
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

    async fn set_environment_policy(
        &self,
        req: Request<pb::SetEnvironmentPolicyRequest>,
    ) -> Reply<pb::Environment> {
        ok(async {
            let actor = self.operator(&req, true).await?;
            let r = req.into_inner();
            let env: EnvName = parse(&r.name)?;
            let p = r.policy.unwrap_or_default();
            let policy = EnvPolicy {
                required_approvals: p.required_approvals,
                soak_seconds: p.soak_seconds,
                auto_promote: p.auto_promote,
            };
            let audit = NewAudit {
                actor,
                action: "environment.policy",
                target: format!("env/{env}"),
                detail: format!(
                    "approvals {} soak {}s auto-promote {}",
                    policy.required_approvals, policy.soak_seconds, policy.auto_promote
                ),
            };
            Ok(convert::environment(
                &self
                    .hub
                    .store
                    .set_environment_policy(&env, policy, audit)
                    .await?,
            ))
        }
        .await)
    }

    async fn link_unit(&self, req: Request<pb::LinkUnitRequest>) -> Reply<pb::Revision> {
        ok(async {
            let actor = self.operator(&req, true).await?;
            let r = req.into_inner();
            let unit: UnitRef = parse(&r.unit)?;
            let upstream: UnitRef = parse(&r.upstream)?;
            if unit.name != upstream.name {
                return Err(HubError::InvalidArgument(format!(
                    "a linked unit has its upstream's name: {}/{}",
                    unit.env, upstream.name
                )));
            }
            if self.hub.store.get_unit(&unit).await?.is_some() {
                return Err(HubError::AlreadyExists(format!("unit {unit}")));
            }
            let out = self
                .hub
                .promote(PromoteRequest {
                    actor,
                    from: upstream.env.clone(),
                    to: unit.env.clone(),
                    selection: Selection::Units(vec![upstream.name.clone()]),
                    revision: None,
                    dry_run: false,
                    force: None,
                    automatic: false,
                })
                .await?;
            let item = out
                .items
                .first()
                .ok_or_else(|| HubError::NotFound(format!("unit {upstream}")))?;
            if item.committed.0 == 0 {
                return Err(HubError::FailedPrecondition(out.message));
            }
            let rev = self
                .hub
                .store
                .get_revision(&unit, item.committed)
                .await?
                .ok_or_else(|| HubError::NotFound(format!("unit {unit}")))?;
            let mut pb_rev = convert::revision(&rev);
            pb_rev.manifests.clear();
            Ok(pb_rev)
        }
        .await)
    }

    async fn set_overrides(&self, req: Request<pb::SetOverridesRequest>) -> Reply<pb::Unit> {
        ok(async {
            let actor = self.operator(&req, true).await?;
            let r = req.into_inner();
            let unit: UnitRef = parse(&r.unit)?;
            let overrides = r
                .overrides
                .into_iter()
                .map(convert::override_from_pb)
                .collect::<Result<Vec<_>>>()?;
            let detail = overrides
                .iter()
                .map(|o| format!("{} {} {}={}", o.kind, o.name, o.path, o.value))
                .collect::<Vec<_>>()
                .join(", ");
            let audit = NewAudit {
                actor,
                action: "unit.overrides",
                target: unit.to_string(),
                detail,
            };
            Ok(convert::unit(
                &self
                    .hub
                    .store
                    .set_overrides(&unit, &overrides, audit)
                    .await?,
            ))
        }
        .await)
    }

    async fn promote(&self, req: Request<pb::PromoteRequest>) -> Reply<pb::PromoteResponse> {
        ok(async {
            let r = req.get_ref();
            let actor = self.operator(&req, !r.dry_run).await?;
            let r = req.into_inner();
            let selection = if r.all {
                Selection::All
            } else if !r.selector.is_empty() {
                Selection::Labels(
                    r.selector
                        .split(',')
                        .map(|kv| {
                            kv.split_once('=')
                                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                                .ok_or_else(|| {
                                    HubError::InvalidArgument(format!(
                                        "selector {kv:?} must be key=value"
                                    ))
                                })
                        })
                        .collect::<Result<_>>()?,
                )
            } else if !r.units.is_empty() {
                Selection::Units(r.units.iter().map(|u| parse(u)).collect::<Result<_>>()?)
            } else {
                return Err(HubError::InvalidArgument(
                    "name units, or use --all or --selector".into(),
                ));
            };
            if r.force && r.reason.trim().is_empty() {
                return Err(HubError::InvalidArgument(
                    "overriding the gates needs a reason".into(),
                ));
            }
            let out = self
                .hub
                .promote(PromoteRequest {
                    actor,
                    from: parse(&r.from)?,
                    to: parse(&r.to)?,
                    selection,
                    revision: (r.revision > 0).then_some(RevisionNum(r.revision)),
                    dry_run: r.dry_run,
                    force: r.force.then_some(r.reason),
                    automatic: false,
                })
                .await?;
            Ok(pb::PromoteResponse {
                promotion_id: out.promotion.unwrap_or(0),
                items: out.items.iter().map(convert::promotion_item).collect(),
                blocked: out.blocked,
                message: out.message,
            })
        }
        .await)
    }

    async fn approve(&self, req: Request<pb::ApproveRequest>) -> Reply<pb::ApproveResponse> {
        ok(async {
            let actor = self.operator(&req, true).await?;
            let r = req.into_inner();
            let (approvals, required) = self
                .hub
                .approve(
                    actor,
                    parse(&r.unit)?,
                    (r.revision > 0).then_some(RevisionNum(r.revision)),
                    parse(&r.target_environment)?,
                )
                .await?;
            Ok(pb::ApproveResponse {
                approvals,
                required,
            })
        }
        .await)
    }

    async fn rollback_unit(&self, req: Request<pb::RollbackUnitRequest>) -> Reply<pb::Revision> {
        ok(async {
            let actor = self.operator(&req, true).await?;
            let r = req.into_inner();
            let rev = self
                .hub
                .rollback(
                    actor,
                    parse(&r.unit)?,
                    RevisionNum(r.to_revision),
                    r.message,
                )
                .await?;
            let mut out = convert::revision(&rev);
            out.manifests.clear();
            Ok(out)
        }
        .await)
    }

    async fn rollback_promotion(
        &self,
        req: Request<pb::RollbackPromotionRequest>,
    ) -> Reply<pb::PromoteResponse> {
        ok(async {
            let actor = self.operator(&req, true).await?;
            let id = req.get_ref().promotion_id;
            let revs = self.hub.rollback_promotion(actor, id).await?;
            Ok(pb::PromoteResponse {
                promotion_id: id,
                items: revs
                    .iter()
                    .map(|r| pb::PromotionItem {
                        target_unit: r.unit.to_string(),
                        target_revision: r.number.0,
                        ..Default::default()
                    })
                    .collect(),
                blocked: false,
                message: format!("promotion {id} rolled back: {} unit(s)", revs.len()),
            })
        }
        .await)
    }

    async fn list_promotions(
        &self,
        req: Request<pb::ListPromotionsRequest>,
    ) -> Reply<pb::ListPromotionsResponse> {
        ok(async {
            self.operator(&req, false).await?;
            let limit = if req.get_ref().limit == 0 {
                50
            } else {
                req.get_ref().limit.min(1000)
            };
            let ps = self.hub.store.list_promotions(limit).await?;
            Ok(pb::ListPromotionsResponse {
                promotions: ps.iter().map(convert::promotion).collect(),
            })
        }
        .await)
    }

    async fn create_operator(
        &self,
        req: Request<pb::CreateOperatorRequest>,
    ) -> Reply<pb::CreateOperatorResponse> {
        ok(async {
            let actor = self.operator(&req, true).await?;
            let r = req.into_inner();
            let role = Role::parse(&r.role).ok_or_else(|| {
                HubError::InvalidArgument(format!("role {:?} is not admin or read-only", r.role))
            })?;
            let name: crate::model::ClusterName = parse(&r.name)?;
            let token = Secret::generate(OPERATOR_TOKEN_PREFIX);
            self.hub
                .store
                .put_operator(
                    &Operator {
                        name: name.to_string(),
                        role,
                    },
                    &token.hash(),
                    Some(NewAudit {
                        actor,
                        action: "operator.create",
                        target: format!("operator/{name}"),
                        detail: format!("role {}", role.as_str()),
                    }),
                )
                .await?;
            Ok(pb::CreateOperatorResponse {
                token: token.expose().to_owned(),
            })
        }
        .await)
    }
}
