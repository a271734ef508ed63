//! Deployment artefacts: every manifest under `deploy/kubernetes/` and every
//! `unitsync agent install` variant validates against the Kubernetes 1.37
//! schemas (`kubernetes-validate --strict`) and meets the restricted Pod
//! Security Standard; example configuration files parse.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn unitsync_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().join("unitsync")
}

fn validate(path: &Path) {
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "--kubernetes-version", "1.37.0"])
        .arg(path)
        .output()
        .expect("kubernetes-validate is installed (deploy/test.sh installs it from PyPI)");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}: {text}", path.display());
    assert!(
        !text.contains("ERROR") && !text.contains("FAILED"),
        "{}: {text}",
        path.display()
    );
}

/// The restricted Pod Security Standard, for every pod template.
fn restricted(doc: &Value, what: &str) {
    let spec = match doc["kind"].as_str() {
        Some("Deployment" | "StatefulSet" | "DaemonSet" | "Job") => {
            &doc["spec"]["template"]["spec"]
        }
        Some("Pod") => &doc["spec"],
        _ => return,
    };
    let pod = &spec["securityContext"];
    for key in ["hostNetwork", "hostPID", "hostIPC"] {
        assert!(spec[key] != true, "{what}: {key}");
    }
    for v in spec["volumes"].as_array().into_iter().flatten() {
        assert!(v.get("hostPath").is_none(), "{what}: hostPath volume");
    }
    let containers = spec["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(spec["initContainers"].as_array().into_iter().flatten());
    for c in containers {
        let sc = &c["securityContext"];
        let name = c["name"].as_str().unwrap_or("?");
        assert_eq!(
            sc["allowPrivilegeEscalation"], false,
            "{what}/{name}: allowPrivilegeEscalation"
        );
        assert!(sc["privileged"] != true, "{what}/{name}: privileged");
        assert_eq!(
            sc["capabilities"]["drop"],
            serde_json::json!(["ALL"]),
            "{what}/{name}: capabilities"
        );
        assert!(
            sc["capabilities"]["add"]
                .as_array()
                .is_none_or(Vec::is_empty),
            "{what}/{name}: added capabilities"
        );
        assert!(
            sc["runAsNonRoot"] == true || pod["runAsNonRoot"] == true,
            "{what}/{name}: runAsNonRoot"
        );
        assert!(
            sc["runAsUser"] != 0 && pod["runAsUser"] != 0,
            "{what}/{name}: root user"
        );
        let seccomp = sc["seccompProfile"]["type"]
            .as_str()
            .or(pod["seccompProfile"]["type"].as_str());
        assert!(
            matches!(seccomp, Some("RuntimeDefault" | "Localhost")),
            "{what}/{name}: seccomp"
        );
        assert_eq!(
            sc["readOnlyRootFilesystem"], true,
            "{what}/{name}: readOnlyRootFilesystem"
        );
        assert!(
            c["resources"]["limits"]["memory"].is_string()
                && c["resources"]["requests"]["cpu"].is_string(),
            "{what}/{name}: resources"
        );
        assert!(
            c["livenessProbe"].is_object() && c["readinessProbe"].is_object(),
            "{what}/{name}: probes"
        );
    }
}

fn docs(text: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(text)
        .unwrap()
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

#[test]
fn deploy_manifests_validate_and_are_restricted() {
    let dir = root().join("deploy/kubernetes");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            validate(&path);
            for d in docs(&std::fs::read_to_string(&path).unwrap()) {
                restricted(&d, &path.display().to_string());
            }
            seen += 1;
        }
    }
    assert!(seen >= 2, "manifests found in {}", dir.display());
}

#[test]
fn every_agent_install_variant_validates_and_is_least_privilege() {
    let tmp = tempfile::tempdir().unwrap();
    let variants: [(&str, &[&str]); 4] = [
        ("admin", &[]),
        (
            "namespaced",
            &["--rbac", "namespaced", "--namespaces", "apps,web"],
        ),
        ("cluster-admin", &["--rbac", "cluster-admin"]),
        (
            "custom-namespace",
            &[
                "--namespace",
                "platform-agents",
                "--image",
                "registry.example.com/unitsync-agent:1",
            ],
        ),
    ];
    for (name, extra) in variants {
        let out = Command::new(unitsync_bin())
            .args([
                "agent",
                "install",
                "prod-eu",
                "--export",
                "--hub",
                "https://hub.example.com:7443",
            ])
            .args(extra)
            .output()
            .expect("the unitsync binary is built (cargo build --workspace --bins)");
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let path = tmp.path().join(format!("{name}.yaml"));
        std::fs::write(&path, &text).unwrap();
        validate(&path);
        let all = docs(&text);
        for d in &all {
            restricted(d, name);
        }
        let kinds: Vec<&str> = all.iter().filter_map(|d| d["kind"].as_str()).collect();
        assert!(
            kinds.contains(&"Deployment") && kinds.contains(&"ServiceAccount"),
            "{name}: {kinds:?}"
        );
        assert!(
            !kinds.contains(&"Secret"),
            "{name}: no Secret without --include-secret"
        );
        let binds_cluster_admin = all.iter().any(|d| d["roleRef"]["name"] == "cluster-admin");
        assert_eq!(binds_cluster_admin, name == "cluster-admin", "{name}");
        let rules = all
            .iter()
            .filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role")
            .filter_map(|d| d["rules"].as_array())
            .flatten();
        for rule in rules {
            for verb in rule["verbs"].as_array().unwrap() {
                let verb = verb.as_str().unwrap();
                assert!(
                    !["escalate", "bind", "impersonate", "*"].contains(&verb),
                    "{name}: {rule}"
                );
            }
            assert!(
                !rule["resources"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|r| r == "*"),
                "{name}: {rule}"
            );
        }
        if name == "cluster-admin" {
            assert!(
                String::from_utf8_lossy(&out.stderr).contains("warning"),
                "a warning for cluster-admin"
            );
        }
        if name == "namespaced" {
            assert!(kinds.iter().all(|k| *k != "ClusterRoleBinding"));
        }
    }
}

#[test]
fn example_environment_files_name_only_known_settings() {
    // The settings the binaries read: what their --help lists as `[env: …]`,
    // plus the log filter (read by the tracing set-up, not by clap).
    let mut known = vec!["UNITSYNC_LOG".to_owned()];
    for (bin, args) in [
        (unitsync_bin(), &["serve", "--help"][..]),
        (
            unitsync_bin().with_file_name("unitsync-agent"),
            &["--help"][..],
        ),
    ] {
        let out = Command::new(&bin)
            .args(args)
            .output()
            .expect("the binaries are built (cargo build --workspace --bins)");
        let help = String::from_utf8(out.stdout).unwrap();
        known.extend(
            help.split("[env: ")
                .skip(1)
                .filter_map(|rest| rest.split(['=', ']']).next())
                .map(str::to_owned),
        );
    }
    assert!(
        known.iter().any(|k| k == "UNITSYNC_AGENT_TOKEN_FILE"),
        "{known:?}"
    );
    let known: Vec<&str> = known.iter().map(String::as_str).collect();
    for file in ["deploy/config/hub.env", "deploy/config/agent.env"] {
        let text = std::fs::read_to_string(root().join(file)).unwrap();
        for line in text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let (k, v) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("{file}: {line}"));
            assert!(known.contains(&k), "{file}: unknown setting {k}");
            assert!(!v.is_empty(), "{file}: {k} is empty");
        }
    }
    // The hub's ConfigMap uses the same names.
    let hub = std::fs::read_to_string(root().join("deploy/kubernetes/hub.yaml")).unwrap();
    let cm = docs(&hub)
        .into_iter()
        .find(|d| d["kind"] == "ConfigMap")
        .unwrap();
    for k in cm["data"].as_object().unwrap().keys() {
        assert!(
            known.contains(&k.as_str()),
            "hub ConfigMap: unknown setting {k}"
        );
    }
}
