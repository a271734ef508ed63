//! Planning a revision: its objects parsed, stamped and in apply order,
//! and what applying them means for the unit's inventory (what to write
//! ahead, what to prune, and the mass-prune guard). A pure step, checked
//! against arbitrary input.

use std::collections::BTreeSet;

use crate::desired::DesiredUnit;
use crate::inventory::{Entry, Inventory};
use crate::manifest::{self, Object};

/// Identity of an object within a unit (group, kind, namespace, name).
pub(super) type Key = (String, String, String, String);

pub(super) fn key_of(o: &Object) -> Key {
    (
        o.group().to_owned(),
        o.kind.clone(),
        o.namespace.clone().unwrap_or_default(),
        o.name.clone(),
    )
}

/// Apply order rank of an entry: CRDs, Namespaces, the rest.
pub(super) fn rank(e: &Entry) -> u8 {
    match (e.group.as_str(), e.kind.as_str()) {
        ("apiextensions.k8s.io", "CustomResourceDefinition") => 0,
        ("", "Namespace") => 1,
        _ => 2,
    }
}

/// The objects of a revision, stamped, in apply order, and what applying
/// them means for the unit's inventory: a pure step (no cluster access), so
/// it can be checked against arbitrary input.
#[derive(Debug)]
pub struct Plan {
    pub objects: Vec<Object>,
    /// Inventory entries no longer wanted (to prune).
    pub leaving: Vec<Entry>,
    /// The inventory to write before applying: what was there plus what
    /// is about to be applied (uid unknown yet).
    pub ahead: Inventory,
}

/// Plans a revision against the previous inventory; refuses what the
/// manifests cannot carry and a mass prune.
pub fn plan(
    unit: &DesiredUnit,
    previous: &Inventory,
    max_prune_ratio: f64,
) -> Result<Plan, String> {
    let mut objects = manifest::parse(&unit.manifests)
        .map_err(|e| format!("unit {} revision {}: {e}", unit.unit, unit.revision))?;
    for o in &mut objects {
        manifest::stamp(o, &unit.unit, &unit.environment, unit.revision)
            .map_err(|e| format!("unit {} revision {}: {e}", unit.unit, unit.revision))?;
    }
    let wanted: BTreeSet<Key> = objects.iter().map(key_of).collect();
    // An entry without a namespace is cluster-scoped: a document naming
    // one anyway (which apply drops) still wants it.
    let by_name: BTreeSet<(String, String, String)> = objects
        .iter()
        .map(|o| (o.group().to_owned(), o.kind.clone(), o.name.clone()))
        .collect();
    let leaving: Vec<Entry> = previous
        .entries
        .iter()
        .filter(|e| {
            !(wanted.contains(&e.key())
                || (e.namespace.is_empty()
                    && by_name.contains(&(e.group.clone(), e.kind.clone(), e.name.clone()))))
        })
        .cloned()
        .collect();
    // The guard counts objects known to exist (entries with a uid); entries
    // written ahead of an interrupted apply may never have been created,
    // and cleaning them up is not a mass prune.
    let total = previous
        .entries
        .iter()
        .filter(|e| !e.uid.is_empty())
        .count();
    let pruned = leaving.iter().filter(|e| !e.uid.is_empty()).count();
    if total > 0 && pruned >= 2 && pruned as f64 > total as f64 * max_prune_ratio {
        return Err(format!(
            "refusing to prune {pruned} of {total} objects (more than {:.0} %) without an explicit destroy",
            max_prune_ratio * 100.0
        ));
    }
    let mut ahead = Inventory {
        revision: unit.revision,
        entries: previous.entries.clone(),
    };
    for o in &objects {
        if !ahead
            .entries
            .iter()
            .any(|e| e.names(&Entry::of(o)) || Entry::of(o).names(e))
        {
            ahead.merge(Entry::of(o));
        }
    }
    Ok(Plan {
        objects,
        leaving,
        ahead,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(manifests: &str) -> DesiredUnit {
        DesiredUnit {
            unit: "web".into(),
            environment: "dev".into(),
            revision: 2,
            digest: String::new(),
            tombstone: false,
            manifests: manifests.into(),
        }
    }

    fn entry(name: &str, uid: &str) -> Entry {
        Entry {
            group: String::new(),
            version: "v1".into(),
            kind: "ConfigMap".into(),
            namespace: "a".into(),
            name: name.into(),
            uid: uid.into(),
        }
    }

    fn cms(names: &[&str]) -> String {
        names
            .iter()
            .map(|n| {
                format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {n}, namespace: a}}\n")
            })
            .collect::<Vec<_>>()
            .join("---\n")
    }

    #[test]
    fn the_plan_writes_ahead_the_union_and_prunes_what_left() {
        let previous = Inventory {
            revision: 1,
            entries: vec![entry("x", "u1"), entry("y", "u2")],
        };
        let p = plan(&unit(&cms(&["x", "z"])), &previous, 0.5).unwrap();
        assert_eq!(p.leaving, vec![entry("y", "u2")]);
        assert_eq!(
            p.ahead.entries,
            vec![entry("x", "u1"), entry("y", "u2"), entry("z", "")]
        );
        assert_eq!(p.objects[0].annotation("unitsync.dev/revision"), Some("2"));
    }

    #[test]
    fn the_plan_refuses_a_mass_prune() {
        let previous = Inventory {
            revision: 1,
            entries: ["a", "b", "c", "d"].iter().map(|n| entry(n, "u")).collect(),
        };
        let e = plan(&unit(&cms(&["a"])), &previous, 0.5).unwrap_err();
        assert!(e.contains("refusing to prune 3 of 4 objects"), "{e}");
    }

    #[test]
    fn a_manifest_the_agent_cannot_stamp_is_an_error_naming_the_document() {
        let e = plan(
            &unit(
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a, namespace: a, labels: x}\n",
            ),
            &Inventory::default(),
            0.5,
        )
        .unwrap_err();
        assert!(
            e.contains("document 1") && e.contains("metadata.labels"),
            "{e}"
        );
    }

    mod properties {
        use proptest::prelude::*;
        use serde_json::Value;

        use super::*;

        fn key() -> impl Strategy<Value = String> {
            prop_oneof![
                Just("apiVersion".to_owned()),
                Just("kind".to_owned()),
                Just("metadata".to_owned()),
                Just("name".to_owned()),
                Just("namespace".to_owned()),
                Just("labels".to_owned()),
                Just("annotations".to_owned()),
                Just("spec".to_owned()),
                Just("replicas".to_owned()),
                "[a-z./-]{0,8}",
            ]
        }

        fn json() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                any::<f64>().prop_map(Value::from),
                "[a-zA-Z0-9 ./:-]{0,12}".prop_map(Value::from),
            ];
            leaf.prop_recursive(4, 48, 6, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                    prop::collection::btree_map(key(), inner, 0..6)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        /// A document that looks like a Kubernetes object more often than not.
        fn document() -> impl Strategy<Value = Value> {
            (json(), json(), json(), any::<bool>()).prop_map(|(meta, spec, other, shaped)| {
                if shaped {
                    serde_json::json!({
                        "apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": meta, "spec": spec, "data": other,
                    })
                } else {
                    other
                }
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            /// The agent never panics on a manifest: parse, stamp and plan
            /// either succeed or name the problem.
            #[test]
            fn planning_never_panics(docs in prop::collection::vec(document(), 0..5)) {
                let text = docs
                    .iter()
                    .map(|d| serde_saphyr::to_string(d).unwrap_or_default())
                    .collect::<Vec<_>>()
                    .join("---\n");
                let previous = Inventory { revision: 1, entries: vec![entry("x", "u")] };
                if let Ok(p) = plan(&unit(&text), &previous, 0.5) {
                    for o in &p.objects {
                        prop_assert_eq!(o.annotation("unitsync.dev/unit"), Some("dev/web"));
                    }
                }
            }

            #[test]
            fn planning_arbitrary_text_never_panics(text in "\\PC{0,200}") {
                let _ = plan(&unit(&text), &Inventory::default(), 0.5);
            }
        }
    }
}
