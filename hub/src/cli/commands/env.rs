//! `unitsync env …`: environments and their promotion policy.

use super::*;

pub(super) async fn set_policy(
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

pub(super) async fn env(c: &mut Client, f: Format, cmd: EnvCommand) -> anyhow::Result<()> {
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
