//! `unitsync cluster …` and operator tokens: identities, tokens, certificates.

use super::*;

pub(super) fn cluster_table(views: &[ClusterView]) -> String {
    table(
        &[
            "name",
            "environment",
            "connected",
            "agent",
            "last seen",
            "certificate expires",
            "labels",
            "created",
        ],
        views
            .iter()
            .map(|c| {
                vec![
                    c.name.clone(),
                    c.environment.clone(),
                    match (c.revoked, c.connected) {
                        (true, _) => "revoked",
                        (false, true) => "yes",
                        (false, false) => "no",
                    }
                    .into(),
                    c.agent_version.clone(),
                    c.last_seen.clone(),
                    c.certificate_expires.clone(),
                    output::labels(&c.labels),
                    c.created.clone(),
                ]
            })
            .collect(),
    )
}

pub(super) async fn cluster(c: &mut Client, f: Format, cmd: ClusterCommand) -> anyhow::Result<()> {
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

pub(super) fn write_file(path: &std::path::Path, text: &str, mode: u32) -> anyhow::Result<()> {
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

/// An operator's new token, shown once (JSON/YAML: name, role and token).
pub(super) fn operator_token(
    f: Format,
    r: &pb::CreateOperatorResponse,
    what: &str,
) -> anyhow::Result<()> {
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
