//! From an artifact's files to units, by the source's mode: `confighub`
//! groups documents by the unit their `confighub.com/origin` annotation
//! names (provenance: space, unit, revision), `artifact` makes one unit
//! of everything, `file` one unit per YAML file. Errors name the file and
//! document.

use std::collections::BTreeMap;

use super::extract::File;
use crate::control::ReleaseUnit;
use crate::model::{SourceMode, SourceName, UnitName};

/// The annotation ConfigHub puts on every resource of a release.
pub const ORIGIN_ANNOTATION: &str = "confighub.com/origin";

fn is_yaml(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    lower.ends_with(".yaml") || lower.ends_with(".yml")
}

fn text(f: &File) -> Result<&str, String> {
    std::str::from_utf8(&f.bytes).map_err(|_| {
        format!(
            "file {} is not UTF-8 text",
            crate::manifest::prefix(&f.path)
        )
    })
}

/// A unit name from a file path: lowercase, other characters as `-`.
fn unit_name_of(path: &str) -> Result<UnitName, String> {
    let stem = path
        .rsplit_once('.')
        .map_or(path, |(stem, _)| stem)
        .to_ascii_lowercase();
    let mut name = String::new();
    for c in stem.chars() {
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() {
            c
        } else {
            '-'
        };
        if !(c == '-' && name.ends_with('-')) {
            name.push(c);
        }
    }
    let name: String = name.trim_matches('-').chars().take(63).collect();
    name.trim_end_matches('-')
        .parse()
        .map_err(|e: crate::model::NameError| {
            format!(
                "file {} gives no unit name: {e}",
                crate::manifest::prefix(path)
            )
        })
}

/// Where a ConfigHub resource came from.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Origin {
    #[serde(default)]
    space_slug: String,
    unit_slug: String,
    #[serde(default)]
    revision_num: i64,
}

fn origin_of(doc: &str) -> Result<Option<Origin>, String> {
    // No source excerpt in the error: documents may hold secret values.
    let v: serde_json::Value =
        serde_saphyr::from_str_with_options(doc, unitsync_proto::units::yaml_options())
            .map_err(|e| format!("not YAML: {e}"))?;
    let Some(raw) = v
        .get("metadata")
        .and_then(|m| m.get("annotations"))
        .and_then(|a| a.get(ORIGIN_ANNOTATION))
    else {
        return Ok(None);
    };
    let raw = raw
        .as_str()
        .ok_or_else(|| format!("{ORIGIN_ANNOTATION} is not a string"))?;
    serde_json::from_str(raw)
        .map(Some)
        .map_err(|e| format!("{ORIGIN_ANNOTATION} is not the JSON ConfigHub writes: {e}"))
}

/// The units of an artifact. `revision` is the Flux-style revision
/// (`<tag>@sha256:…`), part of every unit's origin.
pub fn units(
    mode: SourceMode,
    source: &SourceName,
    revision: &str,
    files: &[File],
) -> Result<Vec<ReleaseUnit>, String> {
    let yaml: Vec<&File> = files.iter().filter(|f| is_yaml(&f.path)).collect();
    if yaml.is_empty() {
        return Err("the artifact holds no YAML files (*.yaml, *.yml)".into());
    }
    let base = format!("{} {revision}", source.owner());
    match mode {
        SourceMode::Artifact => {
            let mut all = String::new();
            for f in &yaml {
                let t = text(f)?;
                if !all.is_empty() && !all.ends_with('\n') {
                    all.push('\n');
                }
                if !all.is_empty() {
                    all.push_str("---\n");
                }
                all.push_str(t);
            }
            let name: UnitName = source
                .as_str()
                .parse()
                .map_err(|e: crate::model::NameError| e.to_string())?;
            Ok(vec![ReleaseUnit {
                name,
                manifests: all,
                origin: base,
            }])
        }
        SourceMode::File => {
            let mut by_name: BTreeMap<UnitName, &File> = BTreeMap::new();
            let mut out = Vec::new();
            for f in &yaml {
                let name = unit_name_of(&f.path)?;
                if let Some(other) = by_name.insert(name.clone(), f) {
                    return Err(format!(
                        "files {} and {} both make unit {name}",
                        crate::manifest::prefix(&other.path),
                        crate::manifest::prefix(&f.path)
                    ));
                }
                out.push(ReleaseUnit {
                    name,
                    manifests: text(f)?.to_owned(),
                    origin: format!("{base} file {}", f.path),
                });
            }
            Ok(out)
        }
        SourceMode::ConfigHub => {
            // unit -> (documents, space, revision numbers seen)
            let mut groups: BTreeMap<String, (Vec<String>, String, i64)> = BTreeMap::new();
            for f in &yaml {
                for (index, _line, doc) in crate::manifest::documents(text(f)?) {
                    let at =
                        || format!("file {} document {index}", crate::manifest::prefix(&f.path));
                    let origin = origin_of(doc)
                        .map_err(|e| format!("{}: {e}", at()))?
                        .ok_or_else(|| {
                            format!(
                                "{}: no {ORIGIN_ANNOTATION} annotation (not a ConfigHub release? use --mode artifact or file)",
                                at()
                            )
                        })?;
                    let g = groups
                        .entry(origin.unit_slug)
                        .or_insert_with(|| (Vec::new(), origin.space_slug, origin.revision_num));
                    g.2 = g.2.max(origin.revision_num);
                    g.0.push(doc.trim_end().to_owned());
                }
            }
            groups
                .into_iter()
                .map(|(slug, (docs, space, rev))| {
                    let name: UnitName = slug.parse().map_err(|e: crate::model::NameError| {
                        format!("ConfigHub unit {}: {e}", crate::manifest::prefix(&slug))
                    })?;
                    Ok(ReleaseUnit {
                        name,
                        manifests: docs
                            .iter()
                            .map(|d| d.trim_start_matches('\n').to_owned())
                            .collect::<Vec<_>>()
                            .join("\n---\n")
                            + "\n",
                        origin: format!("{base} (confighub {space}/{slug}@{rev})"),
                    })
                })
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, text: &str) -> File {
        File {
            path: path.into(),
            bytes: text.as_bytes().to_vec(),
        }
    }

    fn cm(name: &str, origin: Option<&str>) -> String {
        let annotations = origin
            .map(|o| format!("  annotations:\n    confighub.com/origin: '{o}'\n"))
            .unwrap_or_default();
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n{annotations}data:\n  k: v\n"
        )
    }

    #[test]
    fn a_confighub_release_splits_by_the_unit_each_resource_names() {
        let web = r#"{"spaceId":"s1","spaceSlug":"shop-dev","unitId":"u1","unitSlug":"web","revisionNum":4}"#;
        let db = r#"{"spaceSlug":"shop-dev","unitSlug":"db","revisionNum":2}"#;
        let files = [
            file(
                "bundle.yaml",
                &format!(
                    "{}---\n{}---\n{}",
                    cm("a", Some(web)),
                    cm("b", Some(db)),
                    cm("c", Some(web))
                ),
            ),
            file("README.md", "not yaml"),
        ];
        let got = units(
            SourceMode::ConfigHub,
            &"shop".parse().unwrap(),
            "latest@sha256:ab",
            &files,
        )
        .unwrap();
        let names: Vec<&str> = got.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["db", "web"]);
        let web = &got[1];
        assert_eq!(
            web.origin,
            "oci:shop latest@sha256:ab (confighub shop-dev/web@4)"
        );
        assert_eq!(crate::manifest::documents(&web.manifests).len(), 2);
        assert!(web.manifests.contains("name: a") && web.manifests.contains("name: c"));
        let bare = [file("x.yaml", &cm("a", None))];
        let e = units(SourceMode::ConfigHub, &"shop".parse().unwrap(), "r", &bare).unwrap_err();
        assert!(
            e.contains("file x.yaml document 1: no confighub.com/origin"),
            "{e}"
        );
    }

    #[test]
    fn artifact_and_file_modes_name_units_after_the_source_and_the_files() {
        let files = [
            file("apps/Web_Front.yaml", &cm("a", None)),
            file("db.yml", &cm("b", None)),
        ];
        let one = units(
            SourceMode::Artifact,
            &"shop".parse().unwrap(),
            "1.0.0@sha256:cd",
            &files,
        )
        .unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].name.as_str(), "shop");
        assert_eq!(crate::manifest::documents(&one[0].manifests).len(), 2);
        let per_file = units(SourceMode::File, &"shop".parse().unwrap(), "r", &files).unwrap();
        let names: Vec<&str> = per_file.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["apps-web-front", "db"]);
        let clash = [
            file("a/b.yaml", &cm("a", None)),
            file("a_b.yaml", &cm("b", None)),
        ];
        let e = units(SourceMode::File, &"shop".parse().unwrap(), "r", &clash).unwrap_err();
        assert!(e.contains("both make unit a-b"), "{e}");
        let none = [file("notes.txt", "x")];
        assert!(
            units(SourceMode::File, &"shop".parse().unwrap(), "r", &none)
                .unwrap_err()
                .contains("no YAML")
        );
    }
}
