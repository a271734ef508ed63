//! Execution of the operator commands against a running hub.

use std::io::Read;

use anyhow::{Context, bail};
use unitsync_proto::v1 as pb;

use super::client::{self, Client};
use super::install::{Install, Rbac, to_yaml};
use super::output::{
    self, AuditView, CellView, ClusterView, EnvView, PromotionView, RevisionView, UnitView,
    structured, table,
};
use super::{
    AgentCommand, ClusterCommand, Command, EnvCommand, Format, Global, InstallArgs,
    OperatorCommand, PolicyArgs, PromoteArgs, PromotionCommand, PutArgs, UnitCommand,
};

mod agent;
mod cluster;
mod env;
mod promote;
mod status;
mod unit;

use self::agent::agent_install;
use self::cluster::{cluster, operator_token};
use self::env::env;
use self::promote::promote;
use self::status::{audit, status, status_cells, status_watch};
use self::unit::unit;

/// Runs one operator command; the caller maps errors to exit codes.
pub async fn run_client(global: &Global, command: Command) -> anyhow::Result<()> {
    if let Command::Agent(AgentCommand::Install(args)) = &command {
        return agent_install(global, args).await;
    }
    let mut c = client::connect(global).await?;
    let f = global.output;
    match command {
        Command::Serve(_) | Command::Agent(_) => unreachable!("not a hub client command"),
        Command::Env(cmd) => env(&mut c, f, cmd).await,
        Command::Cluster(cmd) => cluster(&mut c, f, cmd).await,
        Command::Unit(cmd) => unit(&mut c, f, cmd).await,
        Command::Source(cmd) => super::source::run(&mut c, f, cmd).await,
        Command::Status { env, watch: false } => status(&mut c, f, env.unwrap_or_default()).await,
        Command::Status { env, watch: true } => status_watch(&mut c, env.unwrap_or_default()).await,
        Command::Audit { limit, target } => audit(&mut c, f, limit, target).await,
        Command::Promote(args) => promote(&mut c, f, args).await,
        Command::Approve {
            unit,
            target,
            revision,
        } => {
            let r = api(c
                .approve(pb::ApproveRequest {
                    unit: unit.clone(),
                    revision: revision.unwrap_or(0),
                    target_environment: target.clone(),
                })
                .await)?;
            print(&format!(
                "{unit}@{} approved for {target}: {} of {} approvals",
                r.revision, r.approvals, r.required
            ));
            Ok(())
        }
        Command::Promotion(PromotionCommand::List { limit }) => {
            let r = api(c.list_promotions(pb::ListPromotionsRequest { limit }).await)?;
            let views: Vec<PromotionView> = r.promotions.iter().map(PromotionView::from).collect();
            print(&structured(f, &views).unwrap_or_else(|| {
                table(
                    &["id", "time", "actor", "from", "to", "kind", "units"],
                    views
                        .iter()
                        .map(|p| {
                            vec![
                                p.id.to_string(),
                                p.time.clone(),
                                p.actor.clone(),
                                p.from.clone(),
                                p.to.clone(),
                                if p.forced {
                                    format!("forced: {}", p.reason)
                                } else if p.automatic {
                                    "automatic".into()
                                } else {
                                    "manual".into()
                                },
                                p.units.join(", "),
                            ]
                        })
                        .collect(),
                )
            }));
            Ok(())
        }
        Command::Promotion(PromotionCommand::Rollback { id }) => {
            let r = api(c
                .rollback_promotion(pb::RollbackPromotionRequest { promotion_id: id })
                .await)?;
            print(&r.message);
            Ok(())
        }
        Command::Operator(OperatorCommand::Create { name, role }) => {
            let r = api(c
                .create_operator(pb::CreateOperatorRequest {
                    name: name.clone(),
                    role,
                })
                .await)?;
            operator_token(f, &r, "created")
        }
        Command::Operator(OperatorCommand::Rotate { name }) => {
            let r = api(c
                .rotate_operator_token(pb::RotateOperatorTokenRequest { name })
                .await)?;
            operator_token(f, &r, "has a new token (the old one no longer works)")
        }
    }
}

/// Turns a gRPC status into a plain error message.
pub(super) fn api<T>(r: Result<tonic::Response<T>, tonic::Status>) -> anyhow::Result<T> {
    r.map(tonic::Response::into_inner).map_err(refused)
}

/// The hub's refusal, as the operator reads it.
pub(super) fn refused(s: tonic::Status) -> anyhow::Error {
    if s.code() == tonic::Code::Unavailable {
        anyhow::anyhow!("the hub is unavailable: {}", s.message())
    } else {
        anyhow::anyhow!("{}", s.message())
    }
}

pub(super) fn print(s: &str) {
    println!("{}", s.trim_end());
}
