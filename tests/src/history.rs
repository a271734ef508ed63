//! A history checker for the fault suite, after etcd's robustness tests:
//! it records every commit the CLI reported successful and every state of
//! every unit object the clusters show (a watch per cluster), then checks
//! the invariants that must survive any fault:
//!
//! - **no loss**: every acknowledged commit is in the hub's history with
//!   the content (digest) the CLI was told;
//! - **no reuse**: revision numbers are 1..=head, each with one content;
//! - **convergence**: every cluster runs every unit's head (a destroyed
//!   unit has no objects left: no orphans);
//! - **no regression**: no object went back to an older revision after a
//!   newer one was applied.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use kube::runtime::watcher;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A commit the CLI reported successful.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Commit {
    /// `ENV/NAME`.
    pub unit: String,
    pub revision: u64,
    pub digest: String,
}

/// One state of one object in one cluster, as its watch delivered it.
#[derive(Clone, Debug)]
pub struct Observation {
    pub cluster: String,
    /// `namespace/name`.
    pub object: String,
    /// `ENV/NAME` from the object's annotation.
    pub unit: String,
    /// The revision that last changed it (`unitsync.dev/revision`).
    pub revision: u64,
    pub deleted: bool,
}

/// A revision of a unit as the hub reports it.
#[derive(Clone, Debug)]
pub struct HubRevision {
    pub number: u64,
    pub digest: String,
    pub tombstone: bool,
}

/// What one cluster runs for one unit: `namespace/name` -> data.
pub type Objects = BTreeMap<String, BTreeMap<String, String>>;

#[derive(Default)]
pub struct History {
    commits: Mutex<Vec<Commit>>,
    observations: Mutex<Vec<Observation>>,
}

/// The checker's verdict.
#[derive(Debug, Default)]
pub struct Verdict {
    pub problems: Vec<String>,
    pub commits: usize,
    pub observations: usize,
}

impl Verdict {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.ok() {
            write!(
                f,
                "ok ({} commits, {} observations)",
                self.commits, self.observations
            )
        } else {
            write!(
                f,
                "{} violation(s): {}",
                self.problems.len(),
                self.problems.join("; ")
            )
        }
    }
}

impl History {
    pub fn commit(&self, c: Commit) {
        self.commits.lock().unwrap().push(c);
    }

    pub fn commits(&self) -> Vec<Commit> {
        self.commits.lock().unwrap().clone()
    }

    pub fn observe(&self, o: Observation) {
        self.observations.lock().unwrap().push(o);
    }

    /// Records every change of unit ConfigMaps in a cluster until `stop`.
    pub fn watch(
        self: &Arc<Self>,
        cluster: &str,
        client: kube::Client,
        stop: CancellationToken,
    ) -> JoinHandle<()> {
        let history = self.clone();
        let cluster = cluster.to_owned();
        tokio::spawn(async move {
            let api: Api<ConfigMap> = Api::all(client);
            let config = watcher::Config::default().labels("app.kubernetes.io/managed-by=unitsync");
            let mut stream = std::pin::pin!(watcher::watcher(api, config));
            loop {
                let ev = tokio::select! {
                    () = stop.cancelled() => return,
                    ev = stream.next() => ev,
                };
                let (cm, deleted) = match ev {
                    None => return,
                    Some(Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o))) => (o, false),
                    Some(Ok(watcher::Event::Delete(o))) => (o, true),
                    Some(Ok(_)) => continue,
                    Some(Err(_)) => {
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Some(a) = cm.metadata.annotations.as_ref() else {
                    continue;
                };
                let (Some(unit), Some(rev)) =
                    (a.get("unitsync.dev/unit"), a.get("unitsync.dev/revision"))
                else {
                    continue;
                };
                history.observe(Observation {
                    cluster: cluster.clone(),
                    object: format!(
                        "{}/{}",
                        cm.metadata.namespace.clone().unwrap_or_default(),
                        cm.metadata.name.clone().unwrap_or_default()
                    ),
                    unit: unit.clone(),
                    revision: rev.parse().unwrap_or(0),
                    deleted,
                });
            }
        })
    }

    /// Checks every invariant. `hub` holds each unit's history as the hub
    /// reports it; `expected` each unit's head content (`None`: destroyed);
    /// `clusters` what each cluster runs, per unit.
    pub fn check(
        &self,
        hub: &BTreeMap<String, Vec<HubRevision>>,
        expected: &BTreeMap<String, Option<Objects>>,
        clusters: &BTreeMap<String, BTreeMap<String, Objects>>,
    ) -> Verdict {
        let commits = self.commits();
        let observations = self.observations.lock().unwrap().clone();
        let mut v = Verdict {
            commits: commits.len(),
            observations: observations.len(),
            ..Verdict::default()
        };
        // No loss; no reuse.
        for (unit, revs) in hub {
            let numbers: Vec<u64> = revs.iter().map(|r| r.number).collect();
            let want: Vec<u64> = (1..=revs.len() as u64).collect();
            if numbers != want {
                v.problems.push(format!(
                    "{unit}: revision numbers {numbers:?} are not 1..={}",
                    revs.len()
                ));
            }
        }
        for c in &commits {
            match hub
                .get(&c.unit)
                .and_then(|revs| revs.iter().find(|r| r.number == c.revision))
            {
                None => v.problems.push(format!(
                    "acknowledged commit {}@{} is not in the hub's history",
                    c.unit, c.revision
                )),
                Some(r) if r.digest != c.digest => v.problems.push(format!(
                    "{}@{} was acknowledged with digest {} but the hub holds {}",
                    c.unit, c.revision, c.digest, r.digest
                )),
                Some(_) => {}
            }
        }
        let mut seen = BTreeSet::new();
        for c in &commits {
            if !seen.insert((c.unit.clone(), c.revision)) {
                v.problems.push(format!(
                    "revision {}@{} was acknowledged twice",
                    c.unit, c.revision
                ));
            }
        }
        // Convergence.
        for (cluster, units) in clusters {
            for (unit, want) in expected {
                let have = units.get(unit).cloned().unwrap_or_default();
                match want {
                    None if !have.is_empty() => v.problems.push(format!(
                        "{cluster}: destroyed unit {unit} left {} object(s): {}",
                        have.len(),
                        have.keys().cloned().collect::<Vec<_>>().join(", ")
                    )),
                    Some(want) if *want != have => v.problems.push(format!(
                        "{cluster}: {unit} did not converge to its head ({} objects wanted, {} found{})",
                        want.len(),
                        have.len(),
                        first_difference(want, &have)
                    )),
                    _ => {}
                }
            }
            for unit in units.keys().filter(|u| !expected.contains_key(*u)) {
                v.problems
                    .push(format!("{cluster}: objects of unknown unit {unit}"));
            }
        }
        // No regression.
        let mut last: BTreeMap<(String, String), u64> = BTreeMap::new();
        for o in observations.iter().filter(|o| !o.deleted) {
            let key = (o.cluster.clone(), o.object.clone());
            if let Some(prev) = last.get(&key)
                && o.revision < *prev
            {
                v.problems.push(format!(
                    "{}: {} went back from revision {prev} to {}",
                    o.cluster, o.object, o.revision
                ));
            }
            last.insert(key, o.revision);
        }
        v
    }
}

fn first_difference(want: &Objects, have: &Objects) -> String {
    for (k, w) in want {
        match have.get(k) {
            None => return format!("; {k} missing"),
            Some(h) if h != w => return format!("; {k} differs"),
            _ => {}
        }
    }
    have.keys()
        .find(|k| !want.contains_key(*k))
        .map(|k| format!("; {k} not wanted"))
        .unwrap_or_default()
}

/// The ConfigMaps of a manifest stream: `namespace/name` -> data.
pub fn objects_of(manifests: &str) -> Objects {
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(manifests).unwrap_or_default();
    docs.iter()
        .filter(|d| d["kind"] == "ConfigMap")
        .map(|d| {
            let key = format!(
                "{}/{}",
                d["metadata"]["namespace"].as_str().unwrap_or(""),
                d["metadata"]["name"].as_str().unwrap_or("")
            );
            let data = d["data"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                        .collect()
                })
                .unwrap_or_default();
            (key, data)
        })
        .collect()
}

/// What a cluster runs: per unit (`ENV/NAME`), its ConfigMaps.
pub async fn cluster_state(client: &kube::Client) -> anyhow::Result<BTreeMap<String, Objects>> {
    let api: Api<ConfigMap> = Api::all(client.clone());
    let list = api
        .list(&kube::api::ListParams::default().labels("app.kubernetes.io/managed-by=unitsync"))
        .await?;
    let mut out: BTreeMap<String, Objects> = BTreeMap::new();
    for cm in list.items {
        let Some(unit) = cm
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("unitsync.dev/unit"))
        else {
            continue;
        };
        let key = format!(
            "{}/{}",
            cm.metadata.namespace.clone().unwrap_or_default(),
            cm.metadata.name.clone().unwrap_or_default()
        );
        out.entry(unit.clone())
            .or_default()
            .insert(key, cm.data.unwrap_or_default().into_iter().collect());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(object: &str, revision: u64, deleted: bool) -> Observation {
        Observation {
            cluster: "c1".into(),
            object: object.into(),
            unit: "dev/a".into(),
            revision,
            deleted,
        }
    }

    fn hub(revs: &[(u64, &str)]) -> BTreeMap<String, Vec<HubRevision>> {
        [(
            "dev/a".to_owned(),
            revs.iter()
                .map(|(n, d)| HubRevision {
                    number: *n,
                    digest: (*d).into(),
                    tombstone: false,
                })
                .collect(),
        )]
        .into_iter()
        .collect()
    }

    fn objects(v: &str) -> Objects {
        [(
            "apps/x".to_owned(),
            [("v".to_owned(), v.to_owned())].into_iter().collect(),
        )]
        .into_iter()
        .collect()
    }

    #[test]
    fn a_clean_history_passes() {
        let h = History::default();
        h.commit(Commit {
            unit: "dev/a".into(),
            revision: 1,
            digest: "d1".into(),
        });
        h.observe(obs("apps/x", 1, false));
        let expected = [("dev/a".to_owned(), Some(objects("1")))]
            .into_iter()
            .collect();
        let clusters = [(
            "c1".to_owned(),
            [("dev/a".to_owned(), objects("1"))].into_iter().collect(),
        )]
        .into_iter()
        .collect();
        let v = h.check(&hub(&[(1, "d1")]), &expected, &clusters);
        assert!(v.ok(), "{v}");
    }

    #[test]
    fn every_violation_is_named() {
        let h = History::default();
        h.commit(Commit {
            unit: "dev/a".into(),
            revision: 2,
            digest: "d2".into(),
        });
        h.commit(Commit {
            unit: "dev/a".into(),
            revision: 3,
            digest: "d3".into(),
        });
        h.observe(obs("apps/x", 2, false));
        h.observe(obs("apps/x", 1, false));
        let expected = [("dev/a".to_owned(), Some(objects("2")))]
            .into_iter()
            .collect();
        let clusters = [(
            "c1".to_owned(),
            [("dev/a".to_owned(), objects("1"))].into_iter().collect(),
        )]
        .into_iter()
        .collect();
        let v = h.check(&hub(&[(1, "d1"), (2, "other")]), &expected, &clusters);
        let text = v.to_string();
        assert!(
            text.contains("dev/a@3 is not in the hub's history"),
            "{text}"
        );
        assert!(
            text.contains("dev/a@2 was acknowledged with digest d2"),
            "{text}"
        );
        assert!(text.contains("did not converge"), "{text}");
        assert!(text.contains("went back from revision 2 to 1"), "{text}");
    }

    #[test]
    fn orphans_of_a_destroyed_unit_are_violations() {
        let h = History::default();
        let expected = [("dev/a".to_owned(), None)].into_iter().collect();
        let clusters = [(
            "c1".to_owned(),
            [("dev/a".to_owned(), objects("1"))].into_iter().collect(),
        )]
        .into_iter()
        .collect();
        let v = h.check(&hub(&[(1, "d1")]), &expected, &clusters);
        assert!(
            v.to_string()
                .contains("destroyed unit dev/a left 1 object(s)"),
            "{v}"
        );
    }
}
