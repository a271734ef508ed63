//! `unitsync env …`: environments and their promotion policy.

use super::*;

/// `p` with what the flags change.
fn policy(mut p: pb::EnvironmentPolicy, args: &PolicyArgs) -> pb::EnvironmentPolicy {
    if let Some(a) = args.approvals {
        p.required_approvals = a;
    }
    if let Some(s) = args.soak {
        p.soak_seconds = s;
    }
    if let Some(a) = args.auto_promote {
        p.auto_promote = a;
    }
    p
}

pub(super) async fn env(c: &mut Client, f: Format, cmd: EnvCommand) -> anyhow::Result<()> {
    let envs = match cmd {
        EnvCommand::Create {
            name,
            after,
            policy: args,
        } => {
            // Created with its gates: never an ungated moment.
            vec![api(c
                .create_environment(pb::CreateEnvironmentRequest {
                    name,
                    after: after.unwrap_or_default(),
                    policy: Some(policy(pb::EnvironmentPolicy::default(), &args)),
                })
                .await)?]
        }
        EnvCommand::Policy { name, policy: args } => {
            let current = api(c.list_environments(pb::ListEnvironmentsRequest {}).await)?
                .environments
                .into_iter()
                .find(|e| e.name == name)
                .with_context(|| format!("environment {name} not found"))?;
            vec![api(c
                .set_environment_policy(pb::SetEnvironmentPolicyRequest {
                    name,
                    policy: Some(policy(current.policy.unwrap_or_default(), &args)),
                })
                .await)?]
        }
        EnvCommand::List => {
            api(c.list_environments(pb::ListEnvironmentsRequest {}).await)?.environments
        }
    };
    let views: Vec<EnvView> = envs.iter().map(EnvView::from).collect();
    print(&structured(f, &views).unwrap_or_else(|| {
        table(
            &[
                "name",
                "position",
                "approvals",
                "soak",
                "auto-promote",
                "created",
            ],
            views
                .iter()
                .map(|e| {
                    vec![
                        e.name.clone(),
                        e.position.to_string(),
                        e.required_approvals.to_string(),
                        format!("{}s", e.soak_seconds),
                        if e.auto_promote { "yes" } else { "no" }.to_owned(),
                        e.created.clone(),
                    ]
                })
                .collect(),
        )
    }));
    Ok(())
}
