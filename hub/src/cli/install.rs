//! `unitsync agent install NAME --export`: the manifests that install an
//! agent in a cluster, least-privilege by default.
//!
//! - `admin` (default): a ClusterRole aggregated from `unitsync-agent-base`
//!   (the kinds units usually hold) and any ClusterRole labelled
//!   `unitsync.dev/aggregate-to-agent: "true"` (add your CRD groups there).
//!   No `escalate`, `bind` or `impersonate`, and not cluster-admin.
//! - `namespaced`: Roles and RoleBindings in the listed namespaces only.
//! - `cluster-admin`: only when asked, with a warning.
//!
//! The Deployment meets the `restricted` Pod Security Standard.

use serde_json::{Value, json};

/// How much the agent may do in its cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Rbac {
    Admin,
    Namespaced(Vec<String>),
    ClusterAdmin,
}

pub(super) struct Install {
    pub cluster: String,
    pub namespace: String,
    pub rbac: Rbac,
    pub image: String,
    pub hub: String,
    /// The agent token, when the Secret is exported.
    pub token: Option<String>,
    /// The hub's CA (PEM), shipped in a ConfigMap when known.
    pub ca_pem: Option<String>,
    pub include_workload: bool,
}

const VERBS: [&str; 7] = [
    "get", "list", "watch", "create", "update", "patch", "delete",
];

/// What units usually contain (workloads, config, networking, CRDs).
fn base_rules() -> Value {
    json!([
        {"apiGroups": [""], "resources": ["namespaces", "configmaps", "secrets", "services", "serviceaccounts", "persistentvolumeclaims", "limitranges", "resourcequotas"], "verbs": VERBS},
        {"apiGroups": [""], "resources": ["pods", "events"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["apps"], "resources": ["deployments", "statefulsets", "daemonsets", "replicasets"], "verbs": VERBS},
        {"apiGroups": ["batch"], "resources": ["jobs", "cronjobs"], "verbs": VERBS},
        {"apiGroups": ["networking.k8s.io"], "resources": ["ingresses", "networkpolicies"], "verbs": VERBS},
        {"apiGroups": ["policy"], "resources": ["poddisruptionbudgets"], "verbs": VERBS},
        {"apiGroups": ["autoscaling"], "resources": ["horizontalpodautoscalers"], "verbs": VERBS},
        {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles", "rolebindings"], "verbs": VERBS},
        {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": VERBS}
    ])
}

fn namespaced_rules() -> Value {
    json!([
        {"apiGroups": [""], "resources": ["configmaps", "secrets", "services", "serviceaccounts", "persistentvolumeclaims"], "verbs": VERBS},
        {"apiGroups": [""], "resources": ["pods", "events"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["apps"], "resources": ["deployments", "statefulsets", "daemonsets", "replicasets"], "verbs": VERBS},
        {"apiGroups": ["batch"], "resources": ["jobs", "cronjobs"], "verbs": VERBS},
        {"apiGroups": ["networking.k8s.io"], "resources": ["ingresses", "networkpolicies"], "verbs": VERBS},
        {"apiGroups": ["policy"], "resources": ["poddisruptionbudgets"], "verbs": VERBS},
        {"apiGroups": ["autoscaling"], "resources": ["horizontalpodautoscalers"], "verbs": VERBS}
    ])
}

impl Install {
    fn labels(&self) -> Value {
        json!({"app.kubernetes.io/name": "unitsync-agent", "app.kubernetes.io/instance": self.cluster, "app.kubernetes.io/managed-by": "unitsync"})
    }

    fn secret_name(&self) -> String {
        format!("unitsync-agent-{}", self.cluster)
    }

    fn role_name(&self) -> String {
        format!("unitsync-agent-{}", self.cluster)
    }

    /// The Secret carrying this cluster's credential.
    pub(super) fn secret(&self) -> Option<Value> {
        let token = self.token.as_ref()?;
        Some(json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": self.secret_name(), "namespace": self.namespace, "labels": self.labels()},
            "type": "Opaque",
            "stringData": {"token": token}
        }))
    }

    /// Every document, in apply order.
    pub(super) fn documents(&self) -> Vec<Value> {
        let ns = &self.namespace;
        let mut docs = Vec::new();
        if self.include_workload {
            docs.push(json!({
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": ns, "labels": {
                    "pod-security.kubernetes.io/enforce": "restricted",
                    "pod-security.kubernetes.io/enforce-version": "latest"
                }}
            }));
            docs.push(json!({
                "apiVersion": "v1", "kind": "ServiceAccount",
                "metadata": {"name": "unitsync-agent", "namespace": ns, "labels": self.labels()},
                "automountServiceAccountToken": true
            }));
            // The agent's own namespace: inventories.
            docs.push(json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                "metadata": {"name": "unitsync-agent-inventory", "namespace": ns, "labels": self.labels()},
                "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": VERBS}]
            }));
            docs.push(self.binding(
                "RoleBinding",
                "unitsync-agent-inventory",
                Some(ns),
                "Role",
                "unitsync-agent-inventory",
            ));
            docs.extend(self.rbac_documents());
            if let Some(ca) = &self.ca_pem {
                docs.push(json!({
                    "apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": "unitsync-hub-ca", "namespace": ns, "labels": self.labels()},
                    "data": {"ca.crt": ca}
                }));
            }
        }
        if let Some(s) = self.secret() {
            docs.push(s);
        }
        if self.include_workload {
            docs.push(self.deployment());
        }
        docs
    }

    fn binding(
        &self,
        kind: &str,
        name: &str,
        ns: Option<&str>,
        role_kind: &str,
        role: &str,
    ) -> Value {
        let mut meta = json!({"name": name, "labels": self.labels()});
        if let Some(ns) = ns {
            meta["namespace"] = json!(ns);
        }
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": kind, "metadata": meta,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": role},
            "subjects": [{"kind": "ServiceAccount", "name": "unitsync-agent", "namespace": self.namespace}]
        })
    }

    fn rbac_documents(&self) -> Vec<Value> {
        let role = self.role_name();
        match &self.rbac {
            Rbac::Admin => vec![
                json!({
                    "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                    "metadata": {"name": "unitsync-agent-base", "labels": {"unitsync.dev/aggregate-to-agent": "true", "app.kubernetes.io/managed-by": "unitsync"}},
                    "rules": base_rules()
                }),
                json!({
                    "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                    "metadata": {"name": role, "labels": self.labels()},
                    "aggregationRule": {"clusterRoleSelectors": [{"matchLabels": {"unitsync.dev/aggregate-to-agent": "true"}}]},
                    "rules": []
                }),
                self.binding("ClusterRoleBinding", &role, None, "ClusterRole", &role),
            ],
            Rbac::Namespaced(namespaces) => {
                let mut docs = Vec::new();
                for n in namespaces {
                    docs.push(json!({
                        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                        "metadata": {"name": role, "namespace": n, "labels": self.labels()},
                        "rules": namespaced_rules()
                    }));
                    docs.push(self.binding("RoleBinding", &role, Some(n), "Role", &role));
                }
                docs
            }
            Rbac::ClusterAdmin => vec![self.binding(
                "ClusterRoleBinding",
                &role,
                None,
                "ClusterRole",
                "cluster-admin",
            )],
        }
    }

    fn deployment(&self) -> Value {
        let mut args = vec![
            format!("--hub={}", self.hub),
            "--token-file=/etc/unitsync/token".to_owned(),
            format!("--namespace={}", self.namespace),
            "--state-dir=/var/lib/unitsync-agent".to_owned(),
            "--health-listen=0.0.0.0:8080".to_owned(),
        ];
        if let Rbac::Namespaced(ns) = &self.rbac {
            args.push(format!("--allowed-namespaces={}", ns.join(",")));
        }
        let mut mounts = vec![
            json!({"name": "credential", "mountPath": "/etc/unitsync", "readOnly": true}),
            json!({"name": "state", "mountPath": "/var/lib/unitsync-agent"}),
        ];
        let mut volumes = vec![
            json!({"name": "credential", "secret": {"secretName": self.secret_name(), "defaultMode": 0o400}}),
            json!({"name": "state", "emptyDir": {}}),
        ];
        if self.ca_pem.is_some() {
            args.push("--ca-file=/etc/unitsync-ca/ca.crt".to_owned());
            mounts
                .push(json!({"name": "hub-ca", "mountPath": "/etc/unitsync-ca", "readOnly": true}));
            volumes.push(json!({"name": "hub-ca", "configMap": {"name": "unitsync-hub-ca"}}));
        }
        let probe = |path: &str| json!({"httpGet": {"path": path, "port": "health"}, "periodSeconds": 10, "timeoutSeconds": 2, "failureThreshold": 3});
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "unitsync-agent", "namespace": self.namespace, "labels": self.labels()},
            "spec": {
                "replicas": 1,
                "strategy": {"type": "Recreate"},
                "selector": {"matchLabels": {"app.kubernetes.io/name": "unitsync-agent", "app.kubernetes.io/instance": self.cluster}},
                "template": {
                    "metadata": {
                        "labels": self.labels(),
                        // /metrics beside the probes.
                        "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "8080", "prometheus.io/path": "/metrics"}
                    },
                    "spec": {
                        "serviceAccountName": "unitsync-agent",
                        "securityContext": {
                            "runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532,
                            "seccompProfile": {"type": "RuntimeDefault"}
                        },
                        "containers": [{
                            "name": "agent",
                            "image": self.image,
                            "args": args,
                            "ports": [{"name": "health", "containerPort": 8080}],
                            "env": [
                                {"name": "UNITSYNC_LOG", "value": "info"},
                                // glibc hands memory back after a large unit:
                                // two arenas, trimmed past 128 KiB free.
                                {"name": "MALLOC_ARENA_MAX", "value": "2"},
                                {"name": "MALLOC_TRIM_THRESHOLD_", "value": "131072"}
                            ],
                            "resources": {"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"cpu": "500m", "memory": "128Mi"}},
                            "livenessProbe": probe("/healthz"),
                            "readinessProbe": probe("/readyz"),
                            "securityContext": {
                                "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "runAsNonRoot": true,
                                "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}
                            },
                            "volumeMounts": mounts
                        }],
                        "volumes": volumes
                    }
                }
            }
        })
    }
}

/// Multi-document YAML.
pub(super) fn to_yaml(docs: &[Value]) -> String {
    docs.iter()
        .map(|d| serde_saphyr::to_string(d).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("---\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn install(rbac: Rbac, token: Option<&str>) -> Install {
        Install {
            cluster: "prod-eu".into(),
            namespace: "unitsync-system".into(),
            rbac,
            image: "ghcr.io/unitsync/agent:0.1.0".into(),
            hub: "https://hub.example.com:7443".into(),
            token: token.map(str::to_owned),
            ca_pem: Some("-----BEGIN CERTIFICATE-----\n...\n-----END CERTIFICATE-----\n".into()),
            include_workload: true,
        }
    }

    #[test]
    fn default_rbac_is_not_cluster_admin_and_cannot_escalate() {
        let docs = install(Rbac::Admin, None).documents();
        assert!(!to_yaml(&docs).contains("cluster-admin"));
        for rule in docs.iter().filter_map(|d| d["rules"].as_array()).flatten() {
            for verb in rule["verbs"].as_array().unwrap() {
                assert!(
                    !["escalate", "bind", "impersonate", "*"].contains(&verb.as_str().unwrap()),
                    "{rule}"
                );
            }
            assert!(
                !rule["resources"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|r| r == "*"),
                "{rule}"
            );
        }
        assert!(
            docs.iter().all(|d| d["kind"] != "Secret"),
            "no Secret unless asked"
        );
    }

    #[test]
    fn secrets_are_per_cluster_and_only_on_request() {
        let docs = install(Rbac::Admin, Some("usk_agent_x")).documents();
        let secret = docs.iter().find(|d| d["kind"] == "Secret").unwrap();
        assert_eq!(secret["metadata"]["name"], "unitsync-agent-prod-eu");
        let deploy = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
        assert_eq!(
            deploy["spec"]["template"]["spec"]["volumes"][0]["secret"]["secretName"],
            "unitsync-agent-prod-eu"
        );
    }

    #[test]
    fn namespaced_mode_binds_only_listed_namespaces() {
        let docs = install(Rbac::Namespaced(vec!["a".into(), "b".into()]), None).documents();
        assert!(
            docs.iter()
                .all(|d| d["kind"] != "ClusterRole" && d["kind"] != "ClusterRoleBinding")
        );
        let bound: Vec<&str> = docs
            .iter()
            .filter(|d| d["kind"] == "RoleBinding")
            .filter_map(|d| d["metadata"]["namespace"].as_str())
            .collect();
        assert_eq!(bound, ["unitsync-system", "a", "b"]);
    }
}
