//! The architecture's invariants, checked on the sources and the
//! dependency graph rather than kept by discipline: every module says what
//! it is (`//!`); prost types stay at the gRPC edges; the hub never talks to
//! Kubernetes and the agent never links the hub.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// Every `.rs` file under `dir`, relative to the workspace root.
fn sources(dir: &str) -> Vec<(String, String)> {
    fn walk(p: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(p).expect("read dir").flatten() {
            let path = e.path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|x| x == "rs") {
                out.push(path);
            }
        }
    }
    let base = root();
    let mut files = Vec::new();
    walk(&base.join(dir), &mut files);
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("read source");
            let rel = p.strip_prefix(&base).unwrap_or(&p).display().to_string();
            (rel, text)
        })
        .collect()
}

#[test]
fn every_module_starts_with_its_documentation() {
    let mut missing = Vec::new();
    for dir in [
        "proto/src",
        "hub/src",
        "agent/src",
        "tests/src",
        "tests/integration",
    ] {
        for (path, text) in sources(dir) {
            let first = text
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or_default();
            if !first.starts_with("//!") {
                missing.push(path);
            }
        }
    }
    assert!(
        missing.is_empty(),
        "modules without a `//!` description:\n  {}",
        missing.join("\n  ")
    );
}

/// Files that mention the generated protocol types.
fn uses_prost(text: &str) -> bool {
    text.contains("unitsync_proto::v1") || text.contains("pb::")
}

#[test]
fn prost_types_stay_at_the_grpc_edges() {
    let mut leaks = Vec::new();
    for (path, text) in sources("hub/src") {
        let edge = path.starts_with("hub/src/grpc") || path.starts_with("hub/src/cli");
        if !edge && uses_prost(&text) {
            leaks.push(path);
        }
    }
    for (path, text) in sources("agent/src") {
        if path != "agent/src/hub_client.rs" && uses_prost(&text) {
            leaks.push(path);
        }
    }
    assert!(
        leaks.is_empty(),
        "prost types outside hub/src/grpc, hub/src/cli and agent/src/hub_client.rs (convert at the edge):\n  {}",
        leaks.join("\n  ")
    );
}

/// Whether `package` depends (normal dependencies, transitively) on `dep`.
fn depends(package: &str, dep: &str) -> bool {
    let out = std::process::Command::new(env!("CARGO"))
        .args([
            "tree",
            "--offline",
            "-e",
            "normal",
            "-p",
            package,
            "-i",
            dep,
        ])
        .current_dir(root())
        .output()
        .expect("cargo tree");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if text.contains("did not match any packages") {
        return false;
    }
    assert!(out.status.success(), "cargo tree failed: {text}");
    text.contains(package)
}

#[test]
fn the_hub_never_talks_to_kubernetes_and_the_agent_never_links_the_hub() {
    assert!(
        depends("unitsync-agent", "kube"),
        "the check itself: the agent uses kube"
    );
    assert!(
        !depends("unitsync-hub", "kube"),
        "unitsync-hub depends on kube"
    );
    assert!(
        !depends("unitsync-hub", "k8s-openapi"),
        "unitsync-hub depends on k8s-openapi"
    );
    assert!(
        !depends("unitsync-agent", "unitsync-hub"),
        "unitsync-agent depends on unitsync-hub"
    );
}
