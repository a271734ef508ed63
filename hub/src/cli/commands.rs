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
                "{unit} approved for {target}: {} of {} approvals",
                r.approvals, r.required
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

async fn agent_install(global: &Global, args: &InstallArgs) -> anyhow::Result<()> {
    if !args.export && !args.export_secret_only {
        bail!(
            "unitsync prints the manifests; use --export and pipe them into `kubectl apply -f -`"
        );
    }
    let rbac = match args.rbac.as_str() {
        "namespaced" if args.namespaces.is_empty() => {
            bail!("--rbac namespaced needs --namespaces a,b")
        }
        "namespaced" => Rbac::Namespaced(args.namespaces.clone()),
        "cluster-admin" => {
            eprintln!(
                "warning: --rbac cluster-admin gives the agent full control of the cluster; prefer the default"
            );
            Rbac::ClusterAdmin
        }
        _ => Rbac::Admin,
    };
    let token = if args.include_secret || args.export_secret_only {
        let mut c = client::connect(global).await?;
        let r = api(c
            .issue_cluster_token(pb::IssueClusterTokenRequest {
                name: args.name.clone(),
            })
            .await)?;
        eprintln!(
            "issued a new agent token for cluster {}; the previous one no longer works",
            args.name
        );
        Some(r.token)
    } else {
        None
    };
    let install = Install {
        cluster: args.name.clone(),
        namespace: args.namespace.clone(),
        rbac,
        image: args.image.clone(),
        hub: args.hub_url.clone().unwrap_or_else(|| global.hub.clone()),
        token,
        ca_pem: if args.export_secret_only {
            None
        } else {
            client::ca_pem(global)?
        },
        include_workload: !args.export_secret_only,
    };
    if !args.include_secret && !args.export_secret_only {
        eprintln!(
            "note: the Deployment reads its token from Secret unitsync-agent-{} (create it with --export-secret-only)",
            args.name
        );
    }
    print(&to_yaml(&install.documents()));
    Ok(())
}

/// Turns a gRPC status into a plain error message.
pub(super) fn api<T>(r: Result<tonic::Response<T>, tonic::Status>) -> anyhow::Result<T> {
    match r {
        Ok(r) => Ok(r.into_inner()),
        Err(s) if s.code() == tonic::Code::Unavailable => {
            bail!("the hub is unavailable: {}", s.message())
        }
        Err(s) => bail!("{}", s.message()),
    }
}

pub(super) fn print(s: &str) {
    println!("{}", s.trim_end());
}

async fn set_policy(
    c: &mut Client,
    name: String,
    mut p: pb::EnvironmentPolicy,
    args: &PolicyArgs,
) -> anyhow::Result<pb::Environment> {
    if let Some(a) = args.approvals {
        p.required_approvals = a;
    }
    if let Some(s) = args.soak {
        p.soak_seconds = s;
    }
    if let Some(a) = args.auto_promote {
        p.auto_promote = a;
    }
    api(c
        .set_environment_policy(pb::SetEnvironmentPolicyRequest {
            name,
            policy: Some(p),
        })
        .await)
}

async fn promote(c: &mut Client, f: Format, args: PromoteArgs) -> anyhow::Result<()> {
    let r = api(c
        .promote(pb::PromoteRequest {
            from: args.from.clone(),
            to: args.to.clone(),
            units: args.units.clone(),
            all: args.all,
            selector: args.selector.clone().unwrap_or_default(),
            revision: args.revision.unwrap_or(0),
            dry_run: args.dry_run,
            force: args.force,
            reason: args.reason.clone(),
        })
        .await)?;
    #[derive(serde::Serialize)]
    struct Item<'a> {
        source: String,
        target: &'a str,
        target_revision: u64,
        skipped: &'a str,
        gates: Vec<String>,
        diff: &'a str,
    }
    let items: Vec<Item<'_>> = r
        .items
        .iter()
        .map(|i| Item {
            source: format!("{}@{}", i.source_unit, i.source_revision),
            target: &i.target_unit,
            target_revision: i.target_revision,
            skipped: &i.skipped,
            gates: i
                .gates
                .iter()
                .map(|g| {
                    format!(
                        "{} {}: {}",
                        g.gate,
                        if g.passed { "passed" } else { "FAILED" },
                        g.detail
                    )
                })
                .collect(),
            diff: &i.diff,
        })
        .collect();
    match structured(f, &items) {
        Some(s) => print(&s),
        None => {
            if args.dry_run {
                for i in &r.items {
                    if !i.diff.is_empty() && i.skipped != "up to date" {
                        print(&i.diff);
                    }
                    for g in &i.gates {
                        print(&format!(
                            "  gate {} {}: {}",
                            g.gate,
                            if g.passed { "passed" } else { "FAILED" },
                            g.detail
                        ));
                    }
                }
            }
            print(&r.message);
            if r.promotion_id > 0 {
                print(&format!("promotion {} recorded", r.promotion_id));
            }
        }
    }
    if r.blocked {
        bail!("promotion from {} to {} blocked", args.from, args.to);
    }
    if !args.dry_run {
        for i in r.items.iter().filter(|i| i.target_revision > 0) {
            args.wait
                .run(c, &i.target_unit, i.target_revision, false)
                .await?;
        }
    }
    Ok(())
}

async fn env(c: &mut Client, f: Format, cmd: EnvCommand) -> anyhow::Result<()> {
    let envs = match cmd {
        EnvCommand::Create {
            name,
            after,
            policy,
        } => {
            let e = api(c
                .create_environment(pb::CreateEnvironmentRequest {
                    name: name.clone(),
                    after: after.unwrap_or_default(),
                })
                .await)?;
            if policy.approvals.is_some() || policy.soak.is_some() || policy.auto_promote.is_some()
            {
                vec![set_policy(c, name, e.policy.unwrap_or_default(), &policy).await?]
            } else {
                vec![e]
            }
        }
        EnvCommand::Policy { name, policy } => {
            let current = api(c.list_environments(pb::ListEnvironmentsRequest {}).await)?
                .environments
                .into_iter()
                .find(|e| e.name == name)
                .with_context(|| format!("environment {name} not found"))?;
            vec![set_policy(c, name, current.policy.unwrap_or_default(), &policy).await?]
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
        ClusterCommand::Certificate { name, out, days } => {
            let r = api(c
                .issue_cluster_certificate(pb::IssueClusterCertificateRequest {
                    name: name.clone(),
                    validity_seconds: days * 24 * 3600,
                })
                .await)?;
            std::fs::create_dir_all(&out)
                .with_context(|| format!("cannot create {}", out.display()))?;
            write_file(&out.join("tls.crt"), &r.certificate_pem, 0o644)?;
            write_file(&out.join("tls.key"), &r.private_key_pem, 0o600)?;
            write_file(&out.join("ca.crt"), &r.ca_pem, 0o644)?;
            eprintln!(
                "certificate for cluster {name} (sha256 {}) written to {}; valid until {}",
                r.fingerprint,
                out.display(),
                output::time(r.not_after.as_ref())
            );
        }
        ClusterCommand::Revoke { name } => {
            api(c
                .revoke_cluster(pb::RevokeClusterRequest { name: name.clone() })
                .await)?;
            eprintln!("cluster {name} revoked: its tokens and certificates no longer work");
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

fn write_file(path: &std::path::Path, text: &str, mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
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

/// An operator's new token, shown once (JSON/YAML: name, role and token).
fn operator_token(f: Format, r: &pb::CreateOperatorResponse, what: &str) -> anyhow::Result<()> {
    #[derive(serde::Serialize)]
    struct View<'a> {
        name: &'a str,
        role: &'a str,
        token: &'a str,
    }
    let view = View {
        name: &r.name,
        role: &r.role,
        token: &r.token,
    };
    match structured(f, &view) {
        Some(s) => print(&s),
        None => {
            eprintln!(
                "operator {} ({}) {what}; token (shown once):",
                r.name, r.role
            );
            print(&r.token);
        }
    }
    Ok(())
}

/// The largest manifests the hub accepts in one message.
const MAX_MANIFEST_BYTES: usize = unitsync_proto::MAX_MESSAGE_BYTES - 64 * 1024;

async fn put(c: &mut Client, f: Format, args: PutArgs, mode: pb::PutMode) -> anyhow::Result<()> {
    if let Some(upstream) = &args.from {
        let rev = api(c
            .link_unit(pb::LinkUnitRequest {
                unit: args.unit.clone(),
                upstream: upstream.clone(),
                message: args.message.clone(),
            })
            .await)?;
        print(
            &structured(f, &RevisionView::from(&rev)).unwrap_or_else(|| {
                format!(
                    "{} created from {upstream} as revision {}",
                    args.unit, rev.number
                )
            }),
        );
        args.wait.run(c, &args.unit, rev.number, false).await?;
        return Ok(());
    }
    let file = args.file.as_ref().context("-f FILE is required")?;
    let manifests = read_manifests(file)?;
    if manifests.len() > MAX_MANIFEST_BYTES {
        bail!(
            "unit {}: the manifests are {} bytes; a unit holds at most {} bytes (split it into several units)",
            args.unit,
            manifests.len(),
            MAX_MANIFEST_BYTES
        );
    }
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
    args.wait.run(c, &args.unit, rev.number, false).await?;
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
            let d = api(client::unit_detail(c, &unit, manifests).await)?;
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
                        "unit {}  head revision {}{}  labels {}{}",
                        u.unit,
                        u.head_revision,
                        if u.destroyed { " (destroyed)" } else { "" },
                        output::labels(&u.labels),
                        if u.source.is_empty() {
                            String::new()
                        } else {
                            format!("  owned by {}", u.source)
                        }
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
                        page_size: 1,
                        ..Default::default()
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
        UnitCommand::Rollback {
            unit,
            to,
            message,
            wait,
        } => {
            let rev = api(c
                .rollback_unit(pb::RollbackUnitRequest {
                    unit: unit.clone(),
                    to_revision: to,
                    message,
                })
                .await)?;
            print(
                &structured(f, &RevisionView::from(&rev)).unwrap_or_else(|| {
                    format!(
                        "{unit} rolled back to revision {to}'s content as revision {}",
                        rev.number
                    )
                }),
            );
            wait.run(c, &unit, rev.number, false).await?;
        }
        UnitCommand::Override { unit, file, clear } => {
            let overrides = if clear {
                Vec::new()
            } else {
                let text = read_manifests(file.as_ref().context("-f FILE is required")?)?;
                let list: Vec<serde_json::Value> = serde_saphyr::from_str(&text).context(
                    "overrides must be a YAML list of {kind, name, namespace, path, value}",
                )?;
                list.into_iter()
                    .map(|o| pb::Override {
                        kind: o["kind"].as_str().unwrap_or_default().into(),
                        name: o["name"].as_str().unwrap_or_default().into(),
                        namespace: o["namespace"].as_str().unwrap_or_default().into(),
                        path: o["path"].as_str().unwrap_or_default().into(),
                        value_json: o["value"].to_string(),
                    })
                    .collect()
            };
            let u = api(c
                .set_overrides(pb::SetOverridesRequest {
                    unit: unit.clone(),
                    overrides,
                })
                .await)?;
            print(&format!(
                "{unit}: {} override(s); they apply from the next promotion",
                u.overrides.len()
            ));
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
            wait.run(c, &unit, rev.number, true).await?;
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
    let m = api(client::status_matrix(c, &env).await)?;
    let cells: Vec<CellView> = m.cells.iter().map(CellView::from).collect();
    if let Some(s) = structured(f, &cells) {
        print(&s);
        return Ok(());
    }
    print(&matrix(&m));
    let sources = api(c.list_sources(pb::ListSourcesRequest {}).await)?.sources;
    let sources: Vec<pb::Source> = sources
        .into_iter()
        .filter(|s| env.is_empty() || s.environment == env)
        .collect();
    if !sources.is_empty() {
        print("");
        print(&super::source::sources_table(&sources));
    }
    Ok(())
}

/// `status --watch`: the matrix, redrawn as the hub pushes changes (at
/// most ten times a second).
async fn status_watch(c: &mut Client, env: String) -> anyhow::Result<()> {
    use std::collections::BTreeMap;
    use std::io::IsTerminal;
    use tokio::time::{Duration, Instant};
    let mut events = api(c
        .watch_status(pb::WatchStatusRequest {
            environment: env,
            unit: String::new(),
        })
        .await)?;
    let tty = std::io::stdout().is_terminal();
    let mut units: BTreeMap<String, pb::Unit> = BTreeMap::new();
    let mut clusters: BTreeMap<String, pb::Cluster> = BTreeMap::new();
    let mut cells: BTreeMap<(String, String), pb::ClusterUnitStatus> = BTreeMap::new();
    let mut complete = false;
    let mut drawn = Instant::now() - Duration::from_secs(1);
    let mut redraw: Option<Instant> = None;
    loop {
        tokio::select! {
            m = events.message() => {
                let Some(ev) = m? else {
                    bail!("the hub ended the status stream");
                };
                for u in ev.units {
                    units.insert(u.unit.clone(), u);
                }
                for cl in ev.clusters {
                    clusters.insert(cl.name.clone(), cl);
                }
                for cell in ev.cells {
                    cells.insert((cell.unit.clone(), cell.cluster.clone()), cell);
                }
                complete |= ev.snapshot_complete;
                if complete && redraw.is_none() {
                    redraw = Some((drawn + Duration::from_millis(100)).max(Instant::now()));
                }
            }
            () = tokio::time::sleep_until(redraw.unwrap_or_else(Instant::now)), if redraw.is_some() => {
                redraw = None;
                drawn = Instant::now();
                let m = pb::StatusMatrix {
                    units: units.values().cloned().collect(),
                    clusters: clusters.values().cloned().collect(),
                    cells: cells.values().cloned().collect(),
                    next_page_token: String::new(),
                };
                if tty {
                    print!("\x1b[2J\x1b[H");
                } else {
                    print(&format!("--- {}", humantime::format_rfc3339_seconds(std::time::SystemTime::now())));
                }
                print(&matrix(&m));
            }
        }
    }
}

/// The matrix: a row per unit, a column per cluster of its environment.
fn matrix(m: &pb::StatusMatrix) -> String {
    // Matrix: one row per unit, one column per cluster of the unit's environment.
    let clusters: Vec<&pb::Cluster> = m.clusters.iter().collect();
    let by_cell: std::collections::HashMap<(&str, &str), &pb::ClusterUnitStatus> = m
        .cells
        .iter()
        .map(|s| ((s.cluster.as_str(), s.unit.as_str()), s))
        .collect();
    let mut header: Vec<String> = vec!["unit".into(), "head".into(), "source".into()];
    header.extend(clusters.iter().map(|c| c.name.clone()));
    header.push("promotion".into());
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
                if u.source.is_empty() {
                    if u.upstream.is_empty() {
                        "hub"
                    } else {
                        "promotion"
                    }
                    .to_owned()
                } else {
                    u.source.clone()
                },
            ];
            for cl in &clusters {
                let cell = if cl.environment != env {
                    String::new()
                } else {
                    match by_cell.get(&(cl.name.as_str(), u.unit.as_str())) {
                        Some(s) if s.revision > 0 => {
                            format!("{} {}", s.revision, output::phase(s.phase))
                        }
                        Some(s) if s.acked_revision > 0 => format!("{} received", s.acked_revision),
                        _ => "-".into(),
                    }
                };
                row.push(cell);
            }
            row.push(promotion_state(u, &m.units));
            row
        })
        .collect();
    let header_refs: Vec<&str> = header.iter().map(String::as_str).collect();
    table(&header_refs, rows)
}

/// Whether a linked unit runs its upstream's head or a promotion is pending
/// (`unitsync promote --dry-run` tells what blocks it).
fn promotion_state(u: &pb::Unit, units: &[pb::Unit]) -> String {
    if u.upstream.is_empty() {
        return String::new();
    }
    match units.iter().find(|x| x.unit == u.upstream) {
        Some(up) if up.destroyed => format!("{} destroyed", u.upstream),
        Some(up) if up.head_revision != u.promoted_from_revision => {
            format!(
                "pending {}@{} (has @{})",
                u.upstream, up.head_revision, u.promoted_from_revision
            )
        }
        Some(_) => format!("= {}@{}", u.upstream, u.promoted_from_revision),
        None => format!("from {}@{}", u.upstream, u.promoted_from_revision),
    }
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
