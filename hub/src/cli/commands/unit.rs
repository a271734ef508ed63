//! `unitsync unit …`: revisions, history, diffs, overrides, rollbacks.

use super::*;

/// Overrides as a file lists them (`[{kind, name, namespace, path,
/// value}]`); an entry missing a field, with one misspelt or of the wrong
/// type is refused, naming the file, the entry and the field (a misspelt
/// `value` once became `null` and reached production as such).
fn overrides_from(file: &std::path::Path, text: &str) -> anyhow::Result<Vec<pb::Override>> {
    const FIELDS: [&str; 5] = ["kind", "name", "namespace", "path", "value"];
    // No source excerpt in the error: override values may be secret.
    let list: Vec<serde_json::Value> =
        serde_saphyr::from_str_with_options(text, unitsync_proto::units::yaml_options())
            .with_context(|| {
                format!(
                    "{}: overrides must be a YAML list of {{kind, name, namespace, path, value}}",
                    file.display()
                )
            })?;
    list.iter()
        .enumerate()
        .map(|(i, o)| {
            let at = format!("{}: override {i}", file.display());
            let map = o.as_object().with_context(|| {
                format!("{at}: not a mapping of {{kind, name, namespace, path, value}}")
            })?;
            if let Some(k) = map.keys().find(|k| !FIELDS.contains(&k.as_str())) {
                anyhow::bail!(
                    "{at}: unknown field `{k}` (the fields are kind, name, namespace, path, value)"
                );
            }
            let text = |field: &str, required: bool| -> anyhow::Result<String> {
                match map.get(field) {
                    Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(s.clone()),
                    None if !required => Ok(String::new()),
                    Some(serde_json::Value::String(_)) | None => {
                        anyhow::bail!("{at}: `{field}` is required")
                    }
                    Some(_) => anyhow::bail!("{at}: `{field}` must be a string"),
                }
            };
            let value = map.get("value").with_context(|| {
                format!("{at}: `value` is required (write `value: null` for null)")
            })?;
            Ok(pb::Override {
                kind: text("kind", true)?,
                name: text("name", true)?,
                namespace: text("namespace", false)?,
                path: text("path", true)?,
                value_json: value.to_string(),
            })
        })
        .collect()
}

pub(super) fn read_manifests(path: &std::path::Path) -> anyhow::Result<String> {
    if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("cannot read manifests from standard input")?;
        return Ok(s);
    }
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// The largest manifests the hub accepts in one message.
pub(super) const MAX_MANIFEST_BYTES: usize = unitsync_proto::MAX_MESSAGE_BYTES - 64 * 1024;

pub(super) async fn put(
    c: &mut Client,
    f: Format,
    args: PutArgs,
    mode: pb::PutMode,
) -> anyhow::Result<()> {
    if let Some(upstream) = &args.from {
        let rev = api(c
            .link_unit(pb::LinkUnitRequest {
                unit: args.unit.clone(),
                upstream: upstream.clone(),
                message: args.message.clone(),
            })
            .await)?;
        print(
            &structured(f, &RevisionView::from(&rev)).unwrap_or_else(|| {
                format!(
                    "{} created from {upstream} as revision {}",
                    args.unit, rev.number
                )
            }),
        );
        args.wait.run(c, &args.unit, rev.number, false).await?;
        return Ok(());
    }
    let file = args.file.as_ref().context("-f FILE is required")?;
    let manifests = read_manifests(file)?;
    if manifests.len() > MAX_MANIFEST_BYTES {
        bail!(
            "unit {}: the manifests are {} bytes; a unit holds at most {} bytes (split it into several units)",
            args.unit,
            manifests.len(),
            MAX_MANIFEST_BYTES
        );
    }
    let rev = api(c
        .put_unit(pb::PutUnitRequest {
            unit: args.unit.clone(),
            manifests,
            message: args.message,
            mode: mode.into(),
            labels: args.labels.into_iter().collect(),
        })
        .await)?;
    let view = RevisionView::from(&rev);
    print(&structured(f, &view).unwrap_or_else(|| {
        format!(
            "{} revision {} committed ({} documents, sha256 {})",
            view.unit,
            view.revision,
            view.documents,
            &view.digest[..12]
        )
    }));
    args.wait.run(c, &args.unit, rev.number, false).await?;
    Ok(())
}

pub(super) fn revision_table(revs: &[RevisionView]) -> String {
    table(
        &[
            "revision",
            "created",
            "author",
            "origin",
            "documents",
            "digest",
            "message",
        ],
        revs.iter()
            .map(|r| {
                vec![
                    if r.tombstone {
                        format!("{} (destroy)", r.revision)
                    } else {
                        r.revision.to_string()
                    },
                    r.created.clone(),
                    r.author.clone(),
                    r.origin.clone(),
                    r.documents.to_string(),
                    r.digest[..12.min(r.digest.len())].to_owned(),
                    r.message.clone(),
                ]
            })
            .collect(),
    )
}

pub(super) async fn unit(c: &mut Client, f: Format, cmd: UnitCommand) -> anyhow::Result<()> {
    match cmd {
        UnitCommand::Create(args) => put(c, f, args, pb::PutMode::Create).await?,
        UnitCommand::Update(args) => put(c, f, args, pb::PutMode::Update).await?,
        UnitCommand::Get { unit, manifests } => {
            let d = api(client::unit_detail(c, &unit, manifests).await)?;
            let u = UnitView::from(&d.unit.unwrap_or_default());
            let head = d.head.as_ref().map(RevisionView::from);
            let cells: Vec<CellView> = d.clusters.iter().map(CellView::from).collect();
            #[derive(serde::Serialize)]
            struct Detail<'a> {
                unit: &'a UnitView,
                head: &'a Option<RevisionView>,
                clusters: &'a [CellView],
            }
            match structured(
                f,
                &Detail {
                    unit: &u,
                    head: &head,
                    clusters: &cells,
                },
            ) {
                Some(s) => print(&s),
                None => {
                    print(&format!(
                        "unit {}  head revision {}{}  labels {}{}",
                        u.unit,
                        u.head_revision,
                        if u.destroyed { " (destroyed)" } else { "" },
                        output::labels(&u.labels),
                        if u.source.is_empty() {
                            String::new()
                        } else {
                            format!("  owned by {}", u.source)
                        }
                    ));
                    if let Some(h) = &head {
                        print(&format!(
                            "  committed {} by {} ({}): {}",
                            h.created, h.author, h.origin, h.message
                        ));
                    }
                    print(&status_cells(&cells));
                    if let Some(h) = head.filter(|h| !h.manifests.is_empty()) {
                        print("---");
                        print(&h.manifests);
                    }
                }
            }
        }
        UnitCommand::List { env } => {
            let r = api(c
                .list_units(pb::ListUnitsRequest {
                    environment: env.unwrap_or_default(),
                })
                .await)?;
            let views: Vec<UnitView> = r.units.iter().map(UnitView::from).collect();
            print(&structured(f, &views).unwrap_or_else(|| {
                table(
                    &["unit", "revision", "state", "labels", "updated"],
                    views
                        .iter()
                        .map(|u| {
                            vec![
                                u.unit.clone(),
                                u.head_revision.to_string(),
                                if u.destroyed { "destroyed" } else { "active" }.into(),
                                output::labels(&u.labels),
                                u.updated.clone(),
                            ]
                        })
                        .collect(),
                )
            }));
        }
        UnitCommand::History { unit } => {
            let r = api(c.unit_history(pb::UnitHistoryRequest { unit }).await)?;
            let views: Vec<RevisionView> = r.revisions.iter().map(RevisionView::from).collect();
            print(&structured(f, &views).unwrap_or_else(|| revision_table(&views)));
        }
        UnitCommand::Diff { unit, from, to } => {
            let to = match to {
                Some(n) => n,
                None => api(c
                    .get_unit(pb::GetUnitRequest {
                        unit: unit.clone(),
                        page_size: 1,
                        ..Default::default()
                    })
                    .await)?
                .unit
                .map_or(0, |u| u.head_revision),
            };
            let from = from.unwrap_or(to.saturating_sub(1));
            let text = |n: u64, c: &mut Client| {
                let unit = unit.clone();
                let mut c = c.clone();
                async move {
                    if n == 0 {
                        return Ok(String::new());
                    }
                    Ok::<_, anyhow::Error>(
                        api(c
                            .get_revision(pb::GetRevisionRequest { unit, number: n })
                            .await)?
                        .manifests,
                    )
                }
            };
            let old = text(from, c).await?;
            let new = text(to, c).await?;
            let diff = similar::TextDiff::from_lines(&old, &new);
            let out = diff
                .unified_diff()
                .context_radius(3)
                .header(&format!("{unit}@{from}"), &format!("{unit}@{to}"))
                .to_string();
            if out.is_empty() {
                eprintln!("{unit}: revisions {from} and {to} have the same manifests");
            } else {
                print!("{out}");
            }
        }
        UnitCommand::Rollback {
            unit,
            to,
            message,
            wait,
        } => {
            let rev = api(c
                .rollback_unit(pb::RollbackUnitRequest {
                    unit: unit.clone(),
                    to_revision: to,
                    message,
                })
                .await)?;
            print(
                &structured(f, &RevisionView::from(&rev)).unwrap_or_else(|| {
                    format!(
                        "{unit} rolled back to revision {to}'s content as revision {}",
                        rev.number
                    )
                }),
            );
            wait.run(c, &unit, rev.number, false).await?;
        }
        UnitCommand::Override { unit, file, clear } => {
            let overrides = if clear {
                Vec::new()
            } else {
                let file = file.as_ref().context("-f FILE is required")?;
                overrides_from(file, &read_manifests(file)?)?
            };
            let u = api(c
                .set_overrides(pb::SetOverridesRequest {
                    unit: unit.clone(),
                    overrides,
                })
                .await)?;
            print(&format!(
                "{unit}: {} override(s); they apply from the next promotion",
                u.overrides.len()
            ));
        }
        UnitCommand::Destroy {
            unit,
            message,
            wait,
        } => {
            let rev = api(c
                .destroy_unit(pb::DestroyUnitRequest {
                    unit: unit.clone(),
                    message,
                })
                .await)?;
            let view = RevisionView::from(&rev);
            print(
                &structured(f, &view)
                    .unwrap_or_else(|| format!("{unit} destroyed (revision {})", rev.number)),
            );
            wait.run(c, &unit, rev.number, true).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn override_files_name_the_file_entry_and_field_of_a_mistake() {
        let file = std::path::Path::new("o.yaml");
        let ok = overrides_from(
            file,
            "- {kind: Deployment, name: web, path: spec.replicas, value: 5}\n",
        )
        .unwrap();
        assert_eq!(ok[0].value_json, "5");
        assert_eq!(ok[0].namespace, "");
        for (text, says) in [
            (
                "- {kind: Deployment, name: web, path: spec.replicas, vaule: 5}\n",
                "o.yaml: override 0: unknown field `vaule`",
            ),
            (
                "- {kind: Deployment, name: web, path: spec.replicas}\n",
                "o.yaml: override 0: `value` is required",
            ),
            (
                "- {kind: Deployment, name: web, path: spec.replicas, value: 1}\n- {kind: Deployment, path: x, value: 1}\n",
                "o.yaml: override 1: `name` is required",
            ),
            (
                "- {kind: 3, name: web, path: x, value: 1}\n",
                "o.yaml: override 0: `kind` must be a string",
            ),
            ("- just text\n", "o.yaml: override 0: not a mapping"),
            (
                "kind: Deployment\n",
                "o.yaml: overrides must be a YAML list",
            ),
        ] {
            let e = format!("{:#}", overrides_from(file, text).unwrap_err());
            assert!(e.contains(says), "{e}");
        }
        // An explicit null is taken as written.
        let null = overrides_from(
            file,
            "- {kind: Deployment, name: web, path: spec.x, value: null}\n",
        )
        .unwrap();
        assert_eq!(null[0].value_json, "null");
    }

    #[test]
    fn a_broken_overrides_file_is_refused_without_quoting_its_values() {
        let text = "- kind: Secret\n  name: db\n  path: stringData.password\n  value: s3cr3t-value\n    oops: [\n";
        let e = format!(
            "{:#}",
            overrides_from(std::path::Path::new("o.yaml"), text).unwrap_err()
        );
        assert!(e.contains("o.yaml: overrides must be a YAML list"), "{e}");
        assert!(!e.contains("s3cr3t-value"), "{e}");
    }
}
