//! `cub release publish SPACE`: bundles the space's units at their heads
//! into one tar+gzip layer (one `<unit>.yaml` per unit, every resource
//! annotated `confighub.com/origin` with its space, unit and revision),
//! pushes it to the OCI endpoint as `space/<slug>:latest` in ConfigHub's
//! layout, records the release and announces `release.published` on the
//! event log. Publishing an unchanged space fails as ConfigHub does.

use axum::body::Bytes;
use axum::extract::Path;
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use serde_json::{Value, json};
use sha2::Digest as _;

use super::model::{Release, new_id, now};
use super::server::{Reply, S, error, ok, space_id};

/// A unit's documents with the origin annotation, as JSON documents (JSON
/// is YAML).
fn annotate(data: &[u8], origin: &Value) -> Result<String, String> {
    let text = std::str::from_utf8(data).map_err(|_| "unit data is not UTF-8".to_owned())?;
    let mut out = Vec::new();
    for doc in text.split("\n---") {
        if doc.trim().is_empty() || doc.trim() == "---" {
            continue;
        }
        let mut v: Value =
            serde_saphyr::from_str(doc.trim_start_matches("---")).map_err(|e| e.to_string())?;
        if !v.is_object() {
            continue;
        }
        let meta = v
            .as_object_mut()
            .expect("an object")
            .entry("metadata")
            .or_insert_with(|| json!({}));
        let annotations = meta
            .as_object_mut()
            .ok_or("metadata is not a map")?
            .entry("annotations")
            .or_insert_with(|| json!({}));
        annotations["confighub.com/origin"] = json!(origin.to_string());
        out.push(v.to_string());
    }
    Ok(out.join("\n---\n") + "\n")
}

pub(super) async fn publish(
    sim: S,
    Path(space): Path<String>,
    h: HeaderMap,
    _body: Bytes,
) -> Reply {
    let axum::extract::State(sim) = sim;
    if let Err(r) = sim.operator(&h) {
        return r.into_response();
    }
    let Some(pusher) = sim.options.registry.clone() else {
        return error(400, "Space has no release target");
    };
    let _one = sim.publishing.lock().await;
    let (space_id, slug, units) = {
        let s = sim.state.lock().unwrap();
        let sid = match space_id(&s, &space) {
            Ok(x) => x,
            Err(r) => return r.into_response(),
        };
        let slug = s.space(&sid).map(|x| x.slug.clone()).unwrap_or_default();
        let units: Vec<(String, String, i64, Vec<u8>)> = s
            .units
            .iter()
            .filter(|u| u.space_id == sid)
            .map(|u| {
                (
                    u.id.clone(),
                    u.slug.clone(),
                    u.head().num,
                    u.head().data.clone(),
                )
            })
            .collect();
        (sid, slug, units)
    };
    let mut files = Vec::new();
    for (id, unit, rev, data) in &units {
        let origin = json!({"spaceId": space_id, "spaceSlug": slug, "unitId": id, "unitSlug": unit, "revisionNum": rev});
        match annotate(data, &origin) {
            Ok(text) => files.push((format!("{unit}.yaml"), text)),
            Err(e) => return error(400, format!("unit {unit}: {e}")),
        }
    }
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(p, t)| (p.as_str(), t.as_str()))
        .collect();
    let bundle = crate::registry::tar_gz(&refs);
    let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&bundle)));
    let last = sim
        .state
        .lock()
        .unwrap()
        .releases
        .iter()
        .rev()
        .find(|r| r.space_id == space_id)
        .cloned();
    if last.as_ref().is_some_and(|r| r.digest == digest) {
        return error(400, "no changes were made since :latest bundle");
    }
    let target = format!("release-target-{slug}");
    let manifest_digest = match pusher
        .push_release(&format!("space/{slug}"), "latest", bundle, &target)
        .await
    {
        Ok(d) => d,
        Err(e) => return error(502, format!("the OCI endpoint refused the bundle: {e:#}")),
    };
    let release = Release {
        id: new_id(),
        space_id: space_id.clone(),
        num: last.map_or(1, |r| r.num + 1),
        digest,
        manifest_digest,
        unit_count: units.len(),
        created_at: now(),
    };
    {
        let mut s = sim.state.lock().unwrap();
        s.releases.push(release.clone());
        s.append_log(
            "release.published",
            &space_id,
            "Release",
            &release.id,
            json!({"SpaceSlug": slug, "SpaceID": space_id, "ReleaseNum": release.num,
                   "BundleBaseName": space_id, "ReleaseID": release.id,
                   "ManifestDigest": release.manifest_digest}),
        );
    }
    sim.changed.notify_waiters();
    ok(json!({"Release": release.json()}))
}
