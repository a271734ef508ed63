//! `unitsync agent install`: the manifests that install an agent in a cluster.

use super::*;

pub(super) async fn agent_install(global: &Global, args: &InstallArgs) -> anyhow::Result<()> {
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
