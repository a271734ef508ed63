//! Execution of the operator commands against a running hub.

use std::io::Read;
use std::time::Duration;

use anyhow::{Context, bail};
use unitsync_proto::v1 as pb;

use super::client::{self, Client};
use super::output::{
    self, AuditView, CellView, ClusterView, EnvView, RevisionView, UnitView, structured, table,
};
use super::{ClusterCommand, Command, EnvCommand, Format, Global, PutArgs, UnitCommand, wait};

/// Runs one operator command; the caller maps errors to exit codes.
pub async fn run_client(global: &Global, command: Command) -> anyhow::Result<()> {
    let mut c = client::connect(global).await?;
    let f = global.output;
    match command {
        Command::Serve(_) => unreachable!("serve is not a client command"),
        Command::Env(cmd) => env(&mut c, f, cmd).await,
        Command::Cluster(cmd) => cluster(&mut c, f, cmd).await,
        Command::Unit(cmd) => unit(&mut c, f, cmd).await,
        Command::Status { env } => status(&mut c, f, env.unwrap_or_default()).await,
        Command::Audit { limit, target } => audit(&mut c, f, limit, target).await,
    }
}

/// Turns a gRPC status into a plain error message.
fn api<T>(r: Result<tonic::Response<T>, tonic::Status>) -> anyhow::Result<T> {
    match r {
        Ok(r) => Ok(r.into_inner()),
        Err(s) if s.code() == tonic::Code::Unavailable => {
            bail!("the hub is unavailable: {}", s.message())
        }
        Err(s) => bail!("{}", s.message()),
    }
}

fn print(s: &str) {
    println!("{}", s.trim_end());
}

async fn env(c: &mut Client, f: Format, cmd: EnvCommand) -> anyhow::Result<()> {
    let envs = match cmd {
        EnvCommand::Create { name, after } => {
            let e = api(c
                .create_environment(pb::CreateEnvironmentRequest {
                    name,
                    after: after.unwrap_or_default(),
                })
                .await)?;
            vec![e]
        }
        EnvCommand::List => {
            api(c.list_environments(pb::ListEnvironmentsRequest {}).await)?.environments
        }
    };
    let views: Vec<EnvView> = envs.iter().map(EnvView::from).collect();
    print(&structured(f, &views).unwrap_or_else(|| {
        table(
            &["name", "position", "created"],
            views
                .iter()
                .map(|e| vec![e.name.clone(), e.position.to_string(), e.created.clone()])
                .collect(),
        )
    }));
    Ok(())
}

fn cluster_table(views: &[ClusterView]) -> String {
    table(
        &[
            "name",
            "environment",
            "connected",
            "agent",
            "labels",
            "created",
        ],
        views
            .iter()
            .map(|c| {
                vec![
                    c.name.clone(),
                    c.environment.clone(),
                    if c.connected { "yes" } else { "no" }.into(),
                    c.agent_version.clone(),
                    output::labels(&c.labels),
                    c.created.clone(),
                ]
            })
            .collect(),
    )
}

async fn cluster(c: &mut Client, f: Format, cmd: ClusterCommand) -> anyhow::Result<()> {
    match cmd {
        ClusterCommand::Create { name, env, labels } => {
            let r = api(c
                .create_cluster(pb::CreateClusterRequest {
                    name,
                    environment: env,
                    labels: labels.into_iter().collect(),
                })
                .await)?;
            let cluster = r.cluster.context("the hub returned no cluster")?;
            let mut view = ClusterView::from(&cluster);
            view.token = Some(r.token.clone());
            match structured(f, &view) {
                Some(s) => print(&s),
                None => {
                    print(&format!(
                        "cluster {} created in environment {}",
                        view.name, view.environment
                    ));
                    eprintln!("agent token (shown once; store it as the agent's credential):");
                    print(&r.token);
                }
            }
        }
        ClusterCommand::List { env } => {
            let r = api(c
                .list_clusters(pb::ListClustersRequest {
                    environment: env.unwrap_or_default(),
                })
                .await)?;
            let views: Vec<ClusterView> = r.clusters.iter().map(ClusterView::from).collect();
            print(&structured(f, &views).unwrap_or_else(|| cluster_table(&views)));
        }
        ClusterCommand::Get { name } => {
            let r = api(c.get_cluster(pb::GetClusterRequest { name }).await)?;
            let view = ClusterView::from(&r);
            print(
                &structured(f, &view).unwrap_or_else(|| cluster_table(std::slice::from_ref(&view))),
            );
        }
        ClusterCommand::Delete { name } => {
            api(c
                .delete_cluster(pb::DeleteClusterRequest { name: name.clone() })
                .await)?;
            eprintln!("cluster {name} deleted; its token no longer works");
        }
    }
    Ok(())
}

fn read_manifests(path: &std::path::Path) -> anyhow::Result<String> {
    if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("cannot read manifests from standard input")?;
        return Ok(s);
    }
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

async fn put(c: &mut Client, f: Format, args: PutArgs, mode: pb::PutMode) -> anyhow::Result<()> {
    let manifests = read_manifests(&args.file)?;
    let rev = api(c
        .put_unit(pb::PutUnitRequest {
            unit: args.unit.clone(),
            manifests,
            message: args.message,
            mode: mode.into(),
            labels: args.labels.into_iter().collect(),
        })
        .await)?;
    let view = RevisionView::from(&rev);
    print(&structured(f, &view).unwrap_or_else(|| {
        format!(
            "{} revision {} committed ({} documents, sha256 {})",
            view.unit,
            view.revision,
            view.documents,
            &view.digest[..12]
        )
    }));
    if args.wait.wait {
        wait::until_ready(
            c,
            &args.unit,
            rev.number,
            false,
            Duration::from_secs(args.wait.timeout),
        )
        .await?;
    }
    Ok(())
}

fn revision_table(revs: &[RevisionView]) -> String {
    table(
        &[
            "revision",
            "created",
            "author",
            "origin",
            "documents",
            "digest",
            "message",
        ],
        revs.iter()
            .map(|r| {
                vec![
                    if r.tombstone {
                        format!("{} (destroy)", r.revision)
                    } else {
                        r.revision.to_string()
                    },
                    r.created.clone(),
                    r.author.clone(),
                    r.origin.clone(),
                    r.documents.to_string(),
                    r.digest[..12.min(r.digest.len())].to_owned(),
                    r.message.clone(),
                ]
            })
            .collect(),
    )
}

async fn unit(c: &mut Client, f: Format, cmd: UnitCommand) -> anyhow::Result<()> {
    match cmd {
        UnitCommand::Create(args) => put(c, f, args, pb::PutMode::Create).await?,
        UnitCommand::Update(args) => put(c, f, args, pb::PutMode::Update).await?,
        UnitCommand::Get { unit, manifests } => {
            let d = api(c
                .get_unit(pb::GetUnitRequest {
                    unit,
                    include_manifests: manifests,
                })
                .await)?;
            let u = UnitView::from(&d.unit.unwrap_or_default());
            let head = d.head.as_ref().map(RevisionView::from);
            let cells: Vec<CellView> = d.clusters.iter().map(CellView::from).collect();
            #[derive(serde::Serialize)]
            struct Detail<'a> {
                unit: &'a UnitView,
                head: &'a Option<RevisionView>,
                clusters: &'a [CellView],
            }
            match structured(
                f,
                &Detail {
                    unit: &u,
                    head: &head,
                    clusters: &cells,
                },
            ) {
                Some(s) => print(&s),
                None => {
                    print(&format!(
                        "unit {}  head revision {}{}  labels {}",
                        u.unit,
                        u.head_revision,
                        if u.destroyed { " (destroyed)" } else { "" },
                        output::labels(&u.labels)
                    ));
                    if let Some(h) = &head {
                        print(&format!(
                            "  committed {} by {} ({}): {}",
                            h.created, h.author, h.origin, h.message
                        ));
                    }
                    print(&status_cells(&cells));
                    if let Some(h) = head.filter(|h| !h.manifests.is_empty()) {
                        print("---");
                        print(&h.manifests);
                    }
                }
            }
        }
        UnitCommand::List { env } => {
            let r = api(c
                .list_units(pb::ListUnitsRequest {
                    environment: env.unwrap_or_default(),
                })
                .await)?;
            let views: Vec<UnitView> = r.units.iter().map(UnitView::from).collect();
            print(&structured(f, &views).unwrap_or_else(|| {
                table(
                    &["unit", "revision", "state", "labels", "updated"],
                    views
                        .iter()
                        .map(|u| {
                            vec![
                                u.unit.clone(),
                                u.head_revision.to_string(),
                                if u.destroyed { "destroyed" } else { "active" }.into(),
                                output::labels(&u.labels),
                                u.updated.clone(),
                            ]
                        })
                        .collect(),
                )
            }));
        }
        UnitCommand::History { unit } => {
            let r = api(c.unit_history(pb::UnitHistoryRequest { unit }).await)?;
            let views: Vec<RevisionView> = r.revisions.iter().map(RevisionView::from).collect();
            print(&structured(f, &views).unwrap_or_else(|| revision_table(&views)));
        }
        UnitCommand::Diff { unit, from, to } => {
            let to = match to {
                Some(n) => n,
                None => api(c
                    .get_unit(pb::GetUnitRequest {
                        unit: unit.clone(),
                        include_manifests: false,
                    })
                    .await)?
                .unit
                .map_or(0, |u| u.head_revision),
            };
            let from = from.unwrap_or(to.saturating_sub(1));
            let text = |n: u64, c: &mut Client| {
                let unit = unit.clone();
                let mut c = c.clone();
                async move {
                    if n == 0 {
                        return Ok(String::new());
                    }
                    Ok::<_, anyhow::Error>(
                        api(c
                            .get_revision(pb::GetRevisionRequest { unit, number: n })
                            .await)?
                        .manifests,
                    )
                }
            };
            let old = text(from, c).await?;
            let new = text(to, c).await?;
            let diff = similar::TextDiff::from_lines(&old, &new);
            let out = diff
                .unified_diff()
                .context_radius(3)
                .header(&format!("{unit}@{from}"), &format!("{unit}@{to}"))
                .to_string();
            if out.is_empty() {
                eprintln!("{unit}: revisions {from} and {to} have the same manifests");
            } else {
                print!("{out}");
            }
        }
        UnitCommand::Destroy {
            unit,
            message,
            wait,
        } => {
            let rev = api(c
                .destroy_unit(pb::DestroyUnitRequest {
                    unit: unit.clone(),
                    message,
                })
                .await)?;
            let view = RevisionView::from(&rev);
            print(
                &structured(f, &view)
                    .unwrap_or_else(|| format!("{unit} destroyed (revision {})", rev.number)),
            );
            if wait.wait {
                wait::until_ready(
                    c,
                    &unit,
                    rev.number,
                    true,
                    Duration::from_secs(wait.timeout),
                )
                .await?;
            }
        }
    }
    Ok(())
}

fn status_cells(cells: &[CellView]) -> String {
    table(
        &[
            "cluster",
            "acked",
            "revision",
            "phase",
            "connected",
            "message",
        ],
        cells
            .iter()
            .map(|c| {
                vec![
                    c.cluster.clone(),
                    c.acked_revision.to_string(),
                    c.revision.to_string(),
                    c.phase.into(),
                    if c.connected { "yes" } else { "no" }.into(),
                    c.message.clone(),
                ]
            })
            .collect(),
    )
}

async fn status(c: &mut Client, f: Format, env: String) -> anyhow::Result<()> {
    let m = api(c
        .get_status(pb::GetStatusRequest { environment: env })
        .await)?;
    let cells: Vec<CellView> = m.cells.iter().map(CellView::from).collect();
    if let Some(s) = structured(f, &cells) {
        print(&s);
        return Ok(());
    }
    // Matrix: one row per unit, one column per cluster of the unit's environment.
    let clusters: Vec<&pb::Cluster> = m.clusters.iter().collect();
    let mut header: Vec<String> = vec!["unit".into(), "head".into()];
    header.extend(clusters.iter().map(|c| c.name.clone()));
    let rows = m
        .units
        .iter()
        .map(|u| {
            let env = u.unit.split_once('/').map_or("", |(e, _)| e);
            let mut row = vec![
                u.unit.clone(),
                if u.destroyed {
                    format!("{} (destroyed)", u.head_revision)
                } else {
                    u.head_revision.to_string()
                },
            ];
            for cl in &clusters {
                let cell = if cl.environment != env {
                    String::new()
                } else {
                    match m
                        .cells
                        .iter()
                        .find(|s| s.cluster == cl.name && s.unit == u.unit)
                    {
                        Some(s) if s.revision > 0 => {
                            format!("{} {}", s.revision, output::phase(s.phase))
                        }
                        Some(s) if s.acked_revision > 0 => format!("{} received", s.acked_revision),
                        _ => "-".into(),
                    }
                };
                row.push(cell);
            }
            row
        })
        .collect();
    let header_refs: Vec<&str> = header.iter().map(String::as_str).collect();
    print(&table(&header_refs, rows));
    Ok(())
}

async fn audit(c: &mut Client, f: Format, limit: u32, target: String) -> anyhow::Result<()> {
    let r = api(c
        .list_audit(pb::ListAuditRequest {
            limit,
            target_prefix: target,
        })
        .await)?;
    let views: Vec<AuditView> = r.entries.iter().map(AuditView::from).collect();
    print(&structured(f, &views).unwrap_or_else(|| {
        table(
            &["time", "actor", "action", "target", "detail"],
            views
                .iter()
                .map(|a| {
                    vec![
                        a.time.clone(),
                        a.actor.clone(),
                        a.action.clone(),
                        a.target.clone(),
                        a.detail.clone(),
                    ]
                })
                .collect(),
        )
    }));
    Ok(())
}
