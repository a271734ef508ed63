//! `HubService`: the operator API behind the `unitsync` CLI. Every call is
//! authenticated by [`OperatorLayer`](super::operator::OperatorLayer)
//! before it gets here; writes need the admin role and are audited with
//! the actor. Every call goes through a [`Hub`] operation (none touches the
//! store), and what it reads is masked for read-only operators.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use unitsync_proto::v1 as pb;

use super::convert::{self, parse};
use super::operator::Operator;
use crate::control::{DEFAULT_CERT_VALIDITY, Hub, MAX_CERT_VALIDITY};
use crate::error::{HubError, Result};
use crate::model::{ClusterName, EnvName, Labels, PutMode, RevisionNum, Role, UnitRef};
use crate::promote::{PromoteRequest, Selection};
use crate::store::Page;

/// Cells per page when the caller does not say.
const DEFAULT_PAGE: u32 = 1_000;
/// The most cells one page carries.
const MAX_PAGE: u32 = 5_000;

pub struct AdminService {
    hub: Arc<Hub>,
    /// The hub's shutdown: ends the streams that would outlive it.
    stop: CancellationToken,
}

impl AdminService {
    pub fn new(hub: Arc<Hub>, stop: CancellationToken) -> Self {
        Self { hub, stop }
    }
}

fn optional_env(s: &str) -> Result<Option<EnvName>> {
    if s.is_empty() {
        Ok(None)
    } else {
        parse(s).map(Some)
    }
}

/// Labels of `owner` (a unit or a cluster, named in the error).
fn labels(owner: &str, map: std::collections::HashMap<String, String>) -> Result<Labels> {
    let labels: Labels = map.into_iter().collect();
    crate::model::check_labels(&labels)
        .map_err(|e| HubError::InvalidArgument(format!("{owner}: {e}")))?;
    Ok(labels)
}

/// A page request from the wire: size (clamped) and the opaque token of
/// the previous answer (`ENV/UNIT CLUSTER`).
fn page(size: u32, token: &str) -> Result<Page> {
    let limit = match size {
        0 => DEFAULT_PAGE,
        n => n.min(MAX_PAGE),
    };
    let after = if token.is_empty() {
        None
    } else {
        let bad = || HubError::InvalidArgument("invalid page token".into());
        let (unit, cluster) = token.split_once(' ').ok_or_else(bad)?;
        Some((
            unit.parse::<UnitRef>().map_err(|_| bad())?,
            cluster.parse::<ClusterName>().map_err(|_| bad())?,
        ))
    };
    Ok(Page { after, limit })
}

fn page_token(next: Option<&Page>) -> String {
    next.and_then(|p| p.after.as_ref())
        .map(|(u, c)| format!("{u} {c}"))
        .unwrap_or_default()
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
            let actor = Operator::of(&req)?.admin()?;
            let r = req.into_inner();
            let env = self
                .hub
                .create_environment(
                    actor,
                    parse(&r.name)?,
                    optional_env(&r.after)?,
                    convert::env_policy(r.policy.unwrap_or_default()),
                )
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
            Operator::of(&req)?;
            let envs = self.hub.list_environments().await?;
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
            let actor = Operator::of(&req)?.admin()?;
            let r = req.into_inner();
            let (cluster, token) = self
                .hub
                .create_cluster(
                    actor,
                    parse(&r.name)?,
                    parse(&r.environment)?,
                    labels(&format!("cluster {}", r.name), r.labels)?,
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
            Operator::of(&req)?;
            let env = optional_env(&req.get_ref().environment)?;
            let clusters = self.hub.list_clusters(env.as_ref()).await?;
            Ok(pb::ListClustersResponse {
                clusters: clusters
                    .iter()
                    .map(|(c, s)| convert::cluster(c, s.as_ref()))
                    .collect(),
            })
        }
        .await)
    }

    async fn get_cluster(&self, req: Request<pb::GetClusterRequest>) -> Reply<pb::Cluster> {
        ok(async {
            Operator::of(&req)?;
            let (c, s) = self.hub.get_cluster(&parse(&req.get_ref().name)?).await?;
            Ok(convert::cluster(&c, s.as_ref()))
        }
        .await)
    }

    async fn delete_cluster(
        &self,
        req: Request<pb::DeleteClusterRequest>,
    ) -> Reply<pb::DeleteClusterResponse> {
        ok(async {
            let actor = Operator::of(&req)?.admin()?;
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
            let actor = Operator::of(&req)?.admin()?;
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
            let actor = Operator::of(&req)?.admin()?;
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
            Ok(pb::ClusterCertificate {
                certificate_pem: cert.cert_pem,
                private_key_pem: cert.key_pem,
                ca_pem: self.hub.ca_pem().unwrap_or_default().to_owned(),
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
            let actor = Operator::of(&req)?.admin()?;
            self.hub
                .revoke_cluster(actor, parse(&req.get_ref().name)?)
                .await?;
            Ok(pb::RevokeClusterResponse {})
        }
        .await)
    }

    async fn put_unit(&self, req: Request<pb::PutUnitRequest>) -> Reply<pb::Revision> {
        ok(async {
            let actor = Operator::of(&req)?.admin()?;
            let r = req.into_inner();
            let mode = match pb::PutMode::try_from(r.mode).unwrap_or(pb::PutMode::Unspecified) {
                pb::PutMode::Unspecified => PutMode::CreateOrUpdate,
                pb::PutMode::Create => PutMode::Create,
                pb::PutMode::Update => PutMode::Update,
            };
            let labels = if r.labels.is_empty() {
                None
            } else {
                Some(labels(&format!("unit {}", r.unit), r.labels)?)
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
            let actor = Operator::of(&req)?.admin()?;
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
            let role = Operator::of(&req)?.role;
            let r = req.get_ref();
            let unit: UnitRef = parse(&r.unit)?;
            let v = self
                .hub
                .get_unit(
                    &unit,
                    r.include_manifests,
                    role,
                    &page(r.page_size, &r.page_token)?,
                )
                .await?;
            Ok(pb::UnitDetail {
                unit: Some(convert::unit(&v.unit)),
                head: v.head.as_ref().map(convert::revision),
                clusters: v
                    .cells
                    .iter()
                    .map(|c| convert::status_cell(c, v.connected.contains(&c.cluster)))
                    .collect(),
                next_page_token: page_token(v.next.as_ref()),
            })
        }
        .await)
    }

    async fn list_units(&self, req: Request<pb::ListUnitsRequest>) -> Reply<pb::ListUnitsResponse> {
        ok(async {
            Operator::of(&req)?;
            let env = optional_env(&req.get_ref().environment)?;
            let units = self.hub.list_units(env.as_ref()).await?;
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
            Operator::of(&req)?;
            let revs = self.hub.unit_history(&parse(&req.get_ref().unit)?).await?;
            Ok(pb::UnitHistoryResponse {
                revisions: revs.iter().map(convert::revision).collect(),
            })
        }
        .await)
    }

    async fn get_revision(&self, req: Request<pb::GetRevisionRequest>) -> Reply<pb::Revision> {
        ok(async {
            let role = Operator::of(&req)?.role;
            let r = req.get_ref();
            let rev = self
                .hub
                .get_revision(&parse(&r.unit)?, RevisionNum(r.number), role)
                .await?;
            Ok(convert::revision(&rev))
        }
        .await)
    }

    async fn get_status(&self, req: Request<pb::GetStatusRequest>) -> Reply<pb::StatusMatrix> {
        ok(async {
            Operator::of(&req)?;
            let r = req.get_ref();
            let env = optional_env(&r.environment)?;
            let v = self
                .hub
                .status(env.as_ref(), &page(r.page_size, &r.page_token)?)
                .await?;
            let (units, clusters, cells) = convert::status_view(&v);
            Ok(pb::StatusMatrix {
                units,
                clusters,
                cells,
                next_page_token: page_token(v.next.as_ref()),
            })
        }
        .await)
    }

    type WatchStatusStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = std::result::Result<pb::StatusEvent, Status>> + Send>,
    >;

    async fn watch_status(
        &self,
        req: Request<pb::WatchStatusRequest>,
    ) -> Reply<Self::WatchStatusStream> {
        ok(async {
            Operator::of(&req)?;
            let r = req.into_inner();
            let unit: Option<UnitRef> = if r.unit.is_empty() {
                None
            } else {
                Some(parse(&r.unit)?)
            };
            let env =
                optional_env(&r.environment)?.or_else(|| unit.as_ref().map(|u| u.env.clone()));
            let (tx, rx) = tokio::sync::mpsc::channel(64);
            tokio::spawn(super::watch::run(
                self.hub.clone(),
                super::watch::Scope { env, unit },
                tx,
                self.stop.clone(),
            ));
            let stream: Self::WatchStatusStream =
                Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx));
            Ok(stream)
        }
        .await)
    }

    async fn list_audit(&self, req: Request<pb::ListAuditRequest>) -> Reply<pb::ListAuditResponse> {
        ok(async {
            Operator::of(&req)?;
            let r = req.get_ref();
            let limit = if r.limit == 0 {
                100
            } else {
                r.limit.min(10_000)
            };
            let entries = self.hub.list_audit(limit, &r.target_prefix).await?;
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
            let actor = Operator::of(&req)?.admin()?;
            let r = req.into_inner();
            let policy = convert::env_policy(r.policy.unwrap_or_default());
            Ok(convert::environment(
                &self
                    .hub
                    .set_environment_policy(actor, parse(&r.name)?, policy)
                    .await?,
            ))
        }
        .await)
    }

    async fn link_unit(&self, req: Request<pb::LinkUnitRequest>) -> Reply<pb::Revision> {
        ok(async {
            let actor = Operator::of(&req)?.admin()?;
            let r = req.into_inner();
            let rev = self
                .hub
                .link_unit(actor, parse(&r.unit)?, parse(&r.upstream)?, &r.message)
                .await?;
            let mut pb_rev = convert::revision(&rev);
            pb_rev.manifests.clear();
            Ok(pb_rev)
        }
        .await)
    }

    async fn set_overrides(&self, req: Request<pb::SetOverridesRequest>) -> Reply<pb::Unit> {
        ok(async {
            let actor = Operator::of(&req)?.admin()?;
            let r = req.into_inner();
            let overrides = r
                .overrides
                .into_iter()
                .map(convert::override_from_pb)
                .collect::<Result<Vec<_>>>()?;
            Ok(convert::unit(
                &self
                    .hub
                    .set_overrides(actor, parse(&r.unit)?, overrides)
                    .await?,
            ))
        }
        .await)
    }

    async fn promote(&self, req: Request<pb::PromoteRequest>) -> Reply<pb::PromoteResponse> {
        ok(async {
            let op = Operator::of(&req)?;
            let (actor, role) = (op.actor.clone(), op.role);
            if !req.get_ref().dry_run {
                op.admin()?;
            }
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
                                        "selector {:?} must be key=value",
                                        crate::manifest::prefix(kv)
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
                    reader: role,
                    confirmed: None,
                    message: None,
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
            let actor = Operator::of(&req)?.admin()?;
            let r = req.into_inner();
            let a = self
                .hub
                .approve(
                    actor,
                    parse(&r.unit)?,
                    (r.revision > 0).then_some(RevisionNum(r.revision)),
                    parse(&r.target_environment)?,
                )
                .await?;
            Ok(pb::ApproveResponse {
                approvals: a.approvals,
                required: a.required,
                revision: a.revision.0,
            })
        }
        .await)
    }

    async fn rollback_unit(&self, req: Request<pb::RollbackUnitRequest>) -> Reply<pb::Revision> {
        ok(async {
            let actor = Operator::of(&req)?.admin()?;
            let r = req.into_inner();
            let rev = self
                .hub
                .rollback(
                    actor,
                    parse(&r.unit)?,
                    RevisionNum(r.to_revision),
                    r.message,
                    None,
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
            let actor = Operator::of(&req)?.admin()?;
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
            Operator::of(&req)?;
            let limit = if req.get_ref().limit == 0 {
                50
            } else {
                req.get_ref().limit.min(1000)
            };
            let ps = self.hub.list_promotions(limit).await?;
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
            let actor = Operator::of(&req)?.admin()?;
            let r = req.into_inner();
            let role = Role::parse(&r.role).ok_or_else(|| {
                HubError::InvalidArgument(format!(
                    "role {:?} is not admin or read-only",
                    crate::manifest::prefix(&r.role)
                ))
            })?;
            // Operator names follow the same rule as other names.
            let name: ClusterName = parse(&r.name)?;
            let token = self
                .hub
                .create_operator(actor, name.to_string(), role)
                .await?;
            Ok(pb::CreateOperatorResponse {
                token: token.expose().to_owned(),
                name: name.to_string(),
                role: role.as_str().into(),
            })
        }
        .await)
    }

    async fn rotate_operator_token(
        &self,
        req: Request<pb::RotateOperatorTokenRequest>,
    ) -> Reply<pb::CreateOperatorResponse> {
        ok(async {
            let actor = Operator::of(&req)?.admin()?;
            let name: ClusterName = parse(&req.get_ref().name)?;
            let (op, token) = self.hub.rotate_operator(actor, name.to_string()).await?;
            Ok(pb::CreateOperatorResponse {
                token: token.expose().to_owned(),
                name: op.name,
                role: op.role.as_str().into(),
            })
        }
        .await)
    }

    async fn create_source(&self, req: Request<pb::CreateSourceRequest>) -> Reply<pb::Source> {
        ok(async {
            let actor = Operator::of(&req)?.admin()?;
            let (source, auth) = convert::source_from_pb(req.into_inner())?;
            let created = self.hub.create_source(actor, source, auth).await?;
            self.source_view(&created).await
        }
        .await)
    }

    async fn list_sources(
        &self,
        req: Request<pb::ListSourcesRequest>,
    ) -> Reply<pb::ListSourcesResponse> {
        ok(async {
            Operator::of(&req)?;
            let mut sources = Vec::new();
            for s in self.hub.list_sources().await? {
                sources.push(self.source_view(&s).await?);
            }
            Ok(pb::ListSourcesResponse { sources })
        }
        .await)
    }

    async fn get_source(&self, req: Request<pb::GetSourceRequest>) -> Reply<pb::Source> {
        ok(async {
            Operator::of(&req)?;
            let name = parse(&req.get_ref().name)?;
            let s = self.hub.get_source(&name).await?;
            self.source_view(&s).await
        }
        .await)
    }

    async fn set_source_suspended(
        &self,
        req: Request<pb::SetSourceSuspendedRequest>,
    ) -> Reply<pb::Source> {
        ok(async {
            let actor = Operator::of(&req)?.admin()?;
            let r = req.into_inner();
            let s = self
                .hub
                .set_source_suspended(actor, &parse(&r.name)?, r.suspended)
                .await?;
            self.source_view(&s).await
        }
        .await)
    }

    async fn delete_source(
        &self,
        req: Request<pb::DeleteSourceRequest>,
    ) -> Reply<pb::DeleteSourceResponse> {
        ok(async {
            let actor = Operator::of(&req)?.admin()?;
            self.hub
                .delete_source(actor, &parse(&req.get_ref().name)?)
                .await?;
            Ok(pb::DeleteSourceResponse {})
        }
        .await)
    }

    async fn sync_source(
        &self,
        req: Request<pb::SyncSourceRequest>,
    ) -> Reply<pb::SyncSourceResponse> {
        ok(async {
            let actor = Operator::of(&req)?.admin()?;
            let r = req.into_inner();
            let at = self
                .hub
                .sync_source(actor, &parse(&r.name)?, r.allow_prune)
                .await?;
            Ok(pb::SyncSourceResponse {
                requested_at: convert::timestamp(at),
            })
        }
        .await)
    }
}

impl AdminService {
    /// A source with its kind of credentials and user name (never the
    /// secret itself).
    async fn source_view(&self, s: &crate::model::OciSource) -> Result<pb::Source> {
        let auth = self.hub.source_auth(&s.name).await?;
        Ok(convert::source(s, auth.kind(), auth.username()))
    }
}
