//! OCI sources against a real registry (Debian's `docker-registry` on
//! loopback, artifacts pushed with `oci-client`): Flux-style artifacts and
//! ConfigHub releases landing in every cluster, Flux's reference
//! semantics, credentials, outages, hostile archives, releases that drop
//! units, and ConfigHub's `release.published` waking a source early.

use std::time::Duration;

use unitsync_hub::control::Tuning;
use unitsync_proto::v1 as pb;
use unitsync_tests::cluster::TestCluster;
use unitsync_tests::registry::{Access, Layout, OCI_LAYER, TestRegistry, gzip, tar_gz};
use unitsync_tests::{TestHub, until, within};

fn cm(name: &str, value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: apps\ndata:\n  value: \"{value}\"\n"
    )
}

struct Setup {
    hub: TestHub,
    registry: TestRegistry,
    clusters: Vec<TestCluster>,
}

async fn setup(access: Access, clusters: usize) -> Setup {
    let hub = TestHub::start().await;
    setup_on(hub, access, clusters).await
}

async fn setup_on(hub: TestHub, access: Access, clusters: usize) -> Setup {
    let registry = within("registry", TestRegistry::start(access))
        .await
        .expect("docker-registry starts");
    hub.create_env("dev").await;
    let mut cs = Vec::new();
    for i in 1..=clusters {
        let token = hub.create_cluster(&format!("dev-{i}"), "dev").await;
        let mut c = TestCluster::new(&hub.endpoint(), hub.ca(), &token).await;
        c.apply_json(serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "apps"}}))
            .await;
        c.start_agent();
        cs.push(c);
    }
    Setup {
        hub,
        registry,
        clusters: cs,
    }
}

/// A source request: artifact mode, plain HTTP to the test registry.
fn source(s: &Setup, name: &str, repo: &str) -> pb::CreateSourceRequest {
    pb::CreateSourceRequest {
        source: Some(pb::Source {
            name: name.into(),
            environment: "dev".into(),
            url: s.registry.url(repo),
            tag: "latest".into(),
            interval_seconds: 1,
            mode: "artifact".into(),
            insecure_hosts: vec![s.registry.host()],
            ..Default::default()
        }),
        ..Default::default()
    }
}

impl Setup {
    async fn create(&self, req: pb::CreateSourceRequest) -> pb::Source {
        within("create source", self.hub.admin().await.create_source(req))
            .await
            .expect("source created")
            .into_inner()
    }

    async fn get(&self, name: &str) -> pb::Source {
        within(
            "get source",
            self.hub
                .admin()
                .await
                .get_source(pb::GetSourceRequest { name: name.into() }),
        )
        .await
        .expect("source")
        .into_inner()
    }

    /// Waits until the source's status satisfies `pred`.
    async fn wait(
        &self,
        name: &str,
        what: &str,
        pred: impl Fn(&pb::SourceStatus) -> bool,
    ) -> pb::SourceStatus {
        let mut last = None;
        let found = tokio::time::timeout(unitsync_tests::wait::DEADLINE, async {
            loop {
                let st = self.get(name).await.status.unwrap_or_default();
                if pred(&st) {
                    return st;
                }
                last = Some(st);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("source {name}: {what}; last status {last:?}"))
    }

    /// `source sync` and its outcome.
    async fn sync(&self, name: &str, allow_prune: bool) -> pb::SourceStatus {
        let asked = within(
            "sync source",
            self.hub.admin().await.sync_source(pb::SyncSourceRequest {
                name: name.into(),
                allow_prune,
            }),
        )
        .await
        .expect("sync")
        .into_inner()
        .requested_at
        .unwrap();
        self.wait(name, "a sync after the request", |st| {
            st.last_attempt
                .as_ref()
                .is_some_and(|a| (a.seconds, a.nanos) >= (asked.seconds, asked.nanos))
        })
        .await
    }

    async fn head(&self, unit: &str) -> Option<pb::Revision> {
        self.hub.unit(unit).await.ok().and_then(|d| d.head)
    }

    /// Every cluster runs `revision` of `unit`, Ready.
    async fn ready_everywhere(&self, unit: &str, revision: u64) {
        until(
            &format!("{unit}@{revision} Ready in every cluster"),
            || async {
                self.hub.unit(unit).await.is_ok_and(|d| {
                    d.clusters.len() == self.clusters.len()
                        && d.clusters
                            .iter()
                            .all(|c| c.revision == revision && c.phase == pb::Phase::Ready as i32)
                })
            },
        )
        .await;
    }

    fn value_in(&self, cluster: usize, name: &str) -> Option<String> {
        self.clusters[cluster]
            .object("v1", "configmaps", "apps", name)
            .and_then(|o| o["data"]["value"].as_str().map(str::to_owned))
    }
}

#[tokio::test]
async fn a_moving_tag_lands_new_revisions_in_every_cluster_and_an_unchanged_one_commits_nothing() {
    let s = setup(Access::Anonymous, 2).await;
    let d1 = s
        .registry
        .push_flux(
            "apps/web",
            "latest",
            &[
                ("web.yaml", &cm("web", "1")),
                ("extra/db.yaml", &cm("db", "1")),
            ],
        )
        .await
        .unwrap();
    s.create(source(&s, "web", "apps/web")).await;
    let st = s
        .wait("web", "the first sync", |st| !st.last_revision.is_empty())
        .await;
    assert_eq!(st.last_revision, format!("latest@{d1}"));
    assert_eq!(st.units, ["web"]);
    s.ready_everywhere("dev/web", 1).await;
    let head = s.head("dev/web").await.unwrap();
    assert_eq!(head.origin, format!("oci:web latest@{d1}"));
    assert_eq!(head.author, "oci:web");
    assert_eq!(head.documents, 2);
    // The tag moves.
    let d2 = s
        .registry
        .push_flux(
            "apps/web",
            "latest",
            &[
                ("web.yaml", &cm("web", "2")),
                ("extra/db.yaml", &cm("db", "1")),
            ],
        )
        .await
        .unwrap();
    assert_ne!(d1, d2);
    s.wait("web", "the new digest", |st| st.last_digest == d2)
        .await;
    s.ready_everywhere("dev/web", 2).await;
    for c in 0..2 {
        assert_eq!(s.value_in(c, "web").as_deref(), Some("2"));
    }
    // The same digest again: nothing committed.
    let st = s.sync("web", false).await;
    assert!(st.last_result.starts_with("unchanged"), "{st:?}");
    assert_eq!(s.head("dev/web").await.unwrap().number, 2);
    // A source's units are its own.
    let refused = s
        .hub
        .put("dev/web", &cm("web", "by hand"))
        .await
        .unwrap_err();
    assert!(
        refused.message().contains("belongs to oci:web"),
        "{}",
        refused.message()
    );
}

/// The fetch timeout stops a registry that stalls, never a commit under
/// way: a commit slower than it (the store busy) finishes, and the status
/// says what it committed.
#[tokio::test]
async fn a_commit_slower_than_the_fetch_timeout_finishes_and_is_reported() {
    use sqlx::Connection;
    // PostgreSQL: a commit waits for a lock another writer holds.
    let db = unitsync_tests::hub::postgres_database().await;
    let tuning = Tuning {
        source_fetch_timeout: Duration::from_secs(2),
        ..Tuning::default()
    };
    let hub = TestHub::start_on_postgres_with(&db, None, tuning).await;
    let s = setup_on(hub, Access::Anonymous, 0).await;
    s.registry
        .push_flux("apps/web", "latest", &[("web.yaml", &cm("web", "1"))])
        .await
        .unwrap();
    s.create(source(&s, "web", "apps/web")).await;
    s.wait("web", "the first sync", |st| !st.last_revision.is_empty())
        .await;
    let d2 = s
        .registry
        .push_flux("apps/web", "latest", &[("web.yaml", &cm("web", "2"))])
        .await
        .unwrap();
    // Another writer holds the units (for longer than the fetch timeout)
    // while the next sync commits.
    let mut writer = within("connect", sqlx::PgConnection::connect(&db))
        .await
        .unwrap();
    within(
        "lock",
        sqlx::raw_sql("BEGIN; LOCK TABLE units IN EXCLUSIVE MODE").execute(&mut writer),
    )
    .await
    .unwrap();
    let held = tokio::time::Instant::now();
    assert_eq!(s.head("dev/web").await.unwrap().number, 1);
    tokio::time::sleep_until(held + Duration::from_secs(4)).await;
    within("unlock", sqlx::raw_sql("ROLLBACK").execute(&mut writer))
        .await
        .unwrap();
    let st = s
        .wait("web", "the sync of the new digest", |st| {
            st.last_digest == d2 || !st.last_error.is_empty()
        })
        .await;
    assert!(st.last_error.is_empty(), "{st:?}");
    let head = s.head("dev/web").await.unwrap();
    assert_eq!(
        (head.number, head.origin),
        (2, format!("oci:web latest@{d2}"))
    );
    // No sync was counted failed (one that said "nothing changed" while
    // its commit went through).
    let metrics = s.hub.metrics().await;
    let failed: Vec<&str> = metrics
        .lines()
        .filter(|l| l.contains("source_syncs") && l.contains("result=\"failed\""))
        .collect();
    assert!(failed.is_empty(), "{failed:?}");
}

#[tokio::test]
async fn semver_picks_the_highest_match_and_a_digest_pins() {
    let s = setup(Access::Anonymous, 1).await;
    let mut digests = std::collections::BTreeMap::new();
    for tag in ["1.0.0", "1.2.0", "v1.3.0-rc.1", "2.0.0"] {
        let d = s
            .registry
            .push_flux("apps/web", tag, &[("web.yaml", &cm("web", tag))])
            .await
            .unwrap();
        digests.insert(tag, d);
    }
    let mut req = source(&s, "ranged", "apps/web");
    let src = req.source.as_mut().unwrap();
    src.tag.clear();
    src.semver = ">=1.0.0 <2.0.0".into();
    s.create(req).await;
    let st = s
        .wait("ranged", "a sync", |st| !st.last_revision.is_empty())
        .await;
    assert_eq!(st.last_revision, format!("1.2.0@{}", digests["1.2.0"]));
    until("1.2.0 runs", || async {
        s.value_in(0, "web").as_deref() == Some("1.2.0")
    })
    .await;

    assert!(
        s.hub.unit("dev/ranged").await.is_ok(),
        "artifact mode: one unit named after the source"
    );

    // A digest pins: a later push to the same tag moves nothing.
    let pinned = s
        .registry
        .push_flux(
            "apps/pinned",
            "1.0.0",
            &[("pinned.yaml", &cm("pinned", "first"))],
        )
        .await
        .unwrap();
    let mut req = source(&s, "pinned", "apps/pinned");
    let src = req.source.as_mut().unwrap();
    src.tag.clear();
    src.digest = pinned.clone();
    src.mode = "file".into();
    s.create(req).await;
    let st = s
        .wait("pinned", "a sync", |st| !st.last_revision.is_empty())
        .await;
    assert_eq!(st.last_revision, pinned, "a digest is its own revision");
    assert_eq!(st.units, ["pinned"], "file mode: a unit per file");
    s.registry
        .push_flux(
            "apps/pinned",
            "1.0.0",
            &[("pinned.yaml", &cm("pinned", "moved"))],
        )
        .await
        .unwrap();
    let st = s.sync("pinned", false).await;
    assert_eq!(st.last_revision, pinned);
    assert_eq!(s.head("dev/pinned").await.unwrap().number, 1);
    until("the pinned content runs", || async {
        s.value_in(0, "pinned").as_deref() == Some("first")
    })
    .await;
}

#[tokio::test]
async fn wrong_credentials_are_a_clear_error_and_commit_nothing() {
    let s = setup(
        Access::Password {
            user: "robot".into(),
            password: "s3cret-pass".into(),
        },
        1,
    )
    .await;
    // Pushing needs the login, too.
    s.registry
        .push_flux("apps/web", "latest", &[("web.yaml", &cm("web", "1"))])
        .await
        .unwrap();
    let mut bad = source(&s, "bad", "apps/web");
    bad.source.as_mut().unwrap().username = "robot".into();
    bad.password = "wrong-password".into();
    let created = s.create(bad).await;
    assert_eq!(
        (created.auth.as_str(), created.username.as_str()),
        ("basic", "robot")
    );
    let st = s
        .wait("bad", "a failed sync", |st| !st.last_error.is_empty())
        .await;
    assert!(
        st.last_error.contains("refused the credentials"),
        "{}",
        st.last_error
    );
    assert!(
        !st.last_error.contains("wrong-password"),
        "no secret in errors"
    );
    assert!(s.hub.unit("dev/bad").await.is_err(), "nothing committed");
    // The right ones work; the password is never shown back.
    let mut good = source(&s, "good", "apps/web");
    good.source.as_mut().unwrap().username = "robot".into();
    good.password = "s3cret-pass".into();
    s.create(good).await;
    s.wait("good", "a sync", |st| {
        !st.last_revision.is_empty() && st.last_error.is_empty()
    })
    .await;
    let listed = format!(
        "{:?}",
        s.hub
            .admin()
            .await
            .list_sources(pb::ListSourcesRequest {})
            .await
            .unwrap()
    );
    assert!(!listed.contains("s3cret-pass"), "{listed}");
}

#[tokio::test]
async fn a_registry_behind_tls_needs_its_ca() {
    let s = setup(Access::Tls, 1).await;
    s.registry
        .push_flux("apps/web", "latest", &[("web.yaml", &cm("web", "tls"))])
        .await
        .unwrap();
    let mut untrusted = source(&s, "untrusted", "apps/web");
    untrusted.source.as_mut().unwrap().insecure_hosts.clear();
    s.create(untrusted).await;
    let st = s
        .wait("untrusted", "a failed sync", |st| !st.last_error.is_empty())
        .await;
    assert!(
        st.last_error.contains("cannot reach registry"),
        "{}",
        st.last_error
    );
    let mut trusted = source(&s, "trusted", "apps/web");
    trusted.source.as_mut().unwrap().insecure_hosts.clear();
    trusted.ca_pem = s.registry.ca_pem.clone().unwrap();
    let created = s.create(trusted).await;
    assert!(created.has_ca);
    s.wait("trusted", "a sync", |st| {
        st.last_error.is_empty() && !st.last_revision.is_empty()
    })
    .await;
    until("the artifact runs", || async {
        s.value_in(0, "web").as_deref() == Some("tls")
    })
    .await;
}

#[tokio::test]
async fn a_registry_outage_is_reported_and_leaves_the_clusters_alone() {
    let mut s = setup(Access::Anonymous, 1).await;
    s.registry
        .push_flux("apps/web", "latest", &[("web.yaml", &cm("web", "1"))])
        .await
        .unwrap();
    s.create(source(&s, "web", "apps/web")).await;
    s.ready_everywhere("dev/web", 1).await;
    // A digest pin is checked too: its artifact may go away with the registry.
    let pin = s
        .registry
        .push_flux("apps/pin", "1.0.0", &[("pin.yaml", &cm("pin", "1"))])
        .await
        .unwrap();
    let mut pinned = source(&s, "pin", "apps/pin");
    let src = pinned.source.as_mut().unwrap();
    src.tag.clear();
    src.digest = pin;
    s.create(pinned).await;
    s.wait("pin", "a sync", |st| !st.last_revision.is_empty())
        .await;
    s.registry.stop().await;
    let pin = s.sync("pin", false).await;
    assert!(
        pin.last_error.contains("cannot reach registry"),
        "a pin too: {}",
        pin.last_error
    );
    let st = s.sync("web", false).await;
    assert!(
        st.last_error.contains("cannot reach registry"),
        "{}",
        st.last_error
    );
    assert_eq!(st.units, ["web"], "the units stay");
    assert_eq!(s.head("dev/web").await.unwrap().number, 1);
    assert_eq!(s.value_in(0, "web").as_deref(), Some("1"));
    let status = s
        .hub
        .admin()
        .await
        .get_source(pb::GetSourceRequest { name: "web".into() })
        .await
        .unwrap();
    assert!(status.into_inner().status.unwrap().last_success.is_some());
    s.registry.restart().await.unwrap();
    s.wait("web", "recovery", |st| st.last_error.is_empty())
        .await;
}

#[tokio::test]
async fn hostile_archives_are_refused_and_change_nothing() {
    let s = setup(Access::Anonymous, 1).await;
    s.registry
        .push_flux("apps/web", "latest", &[("web.yaml", &cm("web", "1"))])
        .await
        .unwrap();
    s.create(source(&s, "web", "apps/web")).await;
    s.ready_everywhere("dev/web", 1).await;
    let raw_tar = |path: &str, kind: tar::EntryType, data: &[u8]| {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        if kind.is_symlink() {
            h.set_link_name("/etc/passwd").unwrap();
        }
        let name = path.as_bytes();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_cksum();
        b.append(&h, data).unwrap();
        gzip(&b.into_inner().unwrap())
    };
    let big = "a".repeat(20 << 20);
    let bomb = tar_gz(&[("web.yaml", big.as_str())]);
    assert!(bomb.len() < 1 << 20, "small outside");
    for (layer, want) in [
        (
            raw_tar(
                "../../etc/cron.d/x.yaml",
                tar::EntryType::Regular,
                b"x: 1\n",
            ),
            "leaves the archive",
        ),
        (
            raw_tar("web.yaml", tar::EntryType::Symlink, b""),
            "is a link",
        ),
        (bomb, "files may have at most"),
    ] {
        s.registry
            .push("apps/web", "latest", layer, Layout::plain(OCI_LAYER))
            .await
            .unwrap();
        let st = s.sync("web", false).await;
        assert!(st.last_error.contains(want), "{want}: {}", st.last_error);
        assert_eq!(
            s.head("dev/web").await.unwrap().number,
            1,
            "nothing committed"
        );
    }
    assert_eq!(s.value_in(0, "web").as_deref(), Some("1"));
}

/// ConfigHub layout: units by origin annotation; a release dropping one
/// unit of four destroys it; dropping more than half waits for
/// `--allow-prune`.
#[tokio::test]
async fn a_release_that_drops_units_destroys_them_within_the_guard() {
    let s = setup(Access::Anonymous, 1).await;
    let origin = |unit: &str, rev: i64| {
        format!(
            r#"'{{"spaceId":"s","spaceSlug":"shop-dev","unitId":"u-{unit}","unitSlug":"{unit}","revisionNum":{rev}}}'"#
        )
    };
    let doc = |unit: &str, rev: i64| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {unit}\n  namespace: apps\n  annotations:\n    confighub.com/origin: {}\ndata:\n  value: \"{rev}\"\n",
            origin(unit, rev)
        )
    };
    let release = |units: &[&str]| {
        let body: Vec<String> = units.iter().map(|u| doc(u, 1)).collect();
        body.join("---\n")
    };
    let push = |units: &'static [&'static str]| {
        let text = release(units);
        let reg = &s.registry;
        async move {
            reg.push_confighub(
                "space/shop-dev",
                "latest",
                &[("bundle.yaml", &text)],
                "target-1",
            )
            .await
            .unwrap()
        }
    };
    push(&["a", "b", "c", "d"]).await;
    let mut req = source(&s, "shop", "space/shop-dev");
    req.source.as_mut().unwrap().mode = "confighub".into();
    s.create(req).await;
    let st = s
        .wait("shop", "the first release", |st| st.units.len() == 4)
        .await;
    assert!(st.last_error.is_empty(), "{}", st.last_error);
    let head = s.head("dev/a").await.unwrap();
    assert!(
        head.origin.ends_with("(confighub shop-dev/a@1)"),
        "{}",
        head.origin
    );
    // One of four leaves: destroyed.
    let d = push(&["a", "b", "c"]).await;
    s.wait("shop", "the second release", |st| st.last_digest == d)
        .await;
    assert!(s.hub.unit("dev/d").await.unwrap().unit.unwrap().destroyed);
    until("d is gone from the cluster", || async {
        s.value_in(0, "d").is_none()
    })
    .await;
    // A release with one invalid unit commits none of them.
    let bad = format!(
        "{}---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n  namespace: apps\n  annotations:\n    confighub.com/origin: {}\n  labels:\n    tier: [front]\n",
        doc("a", 2),
        origin("b", 2)
    );
    let bad_digest = s
        .registry
        .push_confighub(
            "space/shop-dev",
            "latest",
            &[("bundle.yaml", &bad)],
            "target-1",
        )
        .await
        .unwrap();
    let st = s
        .wait("shop", "the refusal", |st| {
            st.last_error.contains("metadata.labels")
        })
        .await;
    assert_ne!(st.last_digest, bad_digest);
    assert_eq!(
        s.head("dev/a").await.unwrap().number,
        1,
        "a is unchanged too"
    );
    // A permission to prune is used by the next sync, even an unchanged one.
    push(&["a", "b", "c"]).await;
    s.wait("shop", "back to a, b, c", |st| st.last_error.is_empty())
        .await;
    let st = s.sync("shop", true).await;
    assert!(st.last_result.starts_with("unchanged"), "{st:?}");
    // Two of three leave: refused, reported, nothing changes.
    let d = push(&["a"]).await;
    let st = s
        .wait("shop", "the refusal", |st| {
            st.last_error.contains("would destroy 2 of its 3 units")
        })
        .await;
    assert!(st.last_error.contains("--allow-prune"), "{}", st.last_error);
    assert_ne!(st.last_digest, d);
    assert!(!s.hub.unit("dev/b").await.unwrap().unit.unwrap().destroyed);
    // Allowed once: done.
    let st = s.sync("shop", true).await;
    assert_eq!(st.last_digest, d, "{st:?}");
    assert_eq!(st.units, ["a"]);
    for u in ["dev/b", "dev/c"] {
        assert!(s.hub.unit(u).await.unwrap().unit.unwrap().destroyed, "{u}");
    }
    let src = s.get("shop").await;
    assert!(src.status.unwrap().last_error.is_empty());
}

/// The hub as ConfigHub's worker follows `release.published`: a source
/// that checks hourly syncs as soon as ConfigHub publishes, from the last
/// event handled (kept in the store).
#[tokio::test]
async fn a_confighub_release_event_wakes_the_source_before_its_interval() {
    use unitsync_hub::auth::Secret;
    use unitsync_hub::source::confighub::{ConfigHubConfig, StuckResult, Transport};
    use unitsync_tests::confighub_sim::cub::Cub;
    use unitsync_tests::confighub_sim::{ConfigHubSim, SimOptions};

    let registry = within("registry", TestRegistry::start(Access::Anonymous))
        .await
        .unwrap();
    let sim = ConfigHubSim::start(
        "127.0.0.1:0".parse().unwrap(),
        SimOptions {
            registry: Some(registry.pusher()),
            ..SimOptions::default()
        },
    )
    .await
    .unwrap();
    let cub = Cub::new(&sim.url(), sim.operator_token());
    cub.space_create("shop-dev").await.unwrap();
    let w = cub.worker_create("shop-dev", "unitsync").await.unwrap();
    let hub = TestHub::start_confighub(
        ConfigHubConfig {
            url: sim.url(),
            worker_id: w["BridgeWorkerID"].as_str().unwrap().to_owned(),
            secret: Secret::from_string(w["Secret"].as_str().unwrap().to_owned()),
            transport: Transport::LongPoll,
            ca_pem: None,
            // The worker offers no targets here: releases only.
            environments: Some(vec!["ci".parse().unwrap()]),
            wait_timeout: Duration::from_secs(30),
            stuck_result: StuckResult::WaitFailed,
        },
        None,
        None,
    )
    .await;
    hub.create_env("dev").await;
    cub.unit_create("shop-dev", "web", &cm("web", "1"), None, &[])
        .await
        .unwrap();
    cub.release_publish("shop-dev").await.unwrap();
    let mut req = pb::CreateSourceRequest {
        source: Some(pb::Source {
            name: "shop".into(),
            environment: "dev".into(),
            url: registry.url("space/shop-dev"),
            tag: "latest".into(),
            interval_seconds: 3600,
            mode: "confighub".into(),
            insecure_hosts: vec![registry.host()],
            ..Default::default()
        }),
        ..Default::default()
    };
    req.password.clear();
    hub.admin().await.create_source(req).await.unwrap();
    until("the first release lands", || async {
        hub.unit("dev/web")
            .await
            .is_ok_and(|d| d.head.is_some_and(|h| h.number == 1))
    })
    .await;
    cub.unit_update("shop-dev", "web", &cm("web", "2"))
        .await
        .unwrap();
    let published = cub.release_publish("shop-dev").await.unwrap();
    until(
        "the new release lands long before the hourly check",
        || async {
            hub.unit("dev/web").await.is_ok_and(|d| {
                d.head.is_some_and(|h| {
                    h.number == 2 && h.origin.ends_with("(confighub shop-dev/web@2)")
                })
            })
        },
    )
    .await;
    let st = hub
        .admin()
        .await
        .get_source(pb::GetSourceRequest {
            name: "shop".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(
        st.last_digest,
        published["ManifestDigest"].as_str().unwrap()
    );
    // The event cursor is kept for the next start: a release published
    // while the hub is down wakes the source once it is back.
    let cursor = hub
        .running()
        .hub
        .hub_state("confighub.release_cursor")
        .await
        .unwrap();
    assert_eq!(cursor.as_deref(), Some("2"));
    let mut hub = hub;
    hub.stop().await;
    cub.unit_update("shop-dev", "web", &cm("web", "3"))
        .await
        .unwrap();
    cub.release_publish("shop-dev").await.unwrap();
    hub.restart().await;
    until("the release published while down lands", || async {
        hub.unit("dev/web")
            .await
            .is_ok_and(|d| d.head.is_some_and(|h| h.number == 3))
    })
    .await;
    let cursor = hub
        .running()
        .hub
        .hub_state("confighub.release_cursor")
        .await
        .unwrap();
    assert_eq!(cursor.as_deref(), Some("3"));
}

/// The CLI: create with a Docker config, get, sync, status.
#[tokio::test]
async fn the_cli_creates_shows_and_syncs_sources() {
    use unitsync_tests::processes::cli;
    let s = setup(
        Access::Password {
            user: "robot".into(),
            password: "pa55".into(),
        },
        1,
    )
    .await;
    s.registry
        .push_flux("apps/web", "latest", &[("web.yaml", &cm("web", "1"))])
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let docker = dir.path().join("config.json");
    let auth = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "robot:pa55");
    std::fs::write(
        &docker,
        format!(
            r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#,
            s.registry.host()
        ),
    )
    .unwrap();
    let data = s.hub.dir.path().join("data");
    let endpoint = s.hub.endpoint();
    let url = s.registry.url("apps/web");
    let host = s.registry.host();
    let out = within(
        "source create",
        cli(
            &data,
            &endpoint,
            &[
                "source",
                "create",
                "web",
                "--env",
                "dev",
                "--oci",
                &url,
                "--tag",
                "latest",
                "--interval",
                "1h",
                "--docker-config",
                docker.to_str().unwrap(),
                "--insecure-host",
                &host,
            ],
        ),
    )
    .await
    .unwrap();
    assert!(out.contains("credentials basic (robot)"), "{out}");
    assert!(!out.contains("pa55"), "{out}");
    let out = within(
        "source sync",
        cli(&data, &endpoint, &["source", "sync", "web"]),
    )
    .await
    .unwrap();
    assert!(out.contains("revision    latest@sha256:"), "{out}");
    assert!(out.contains("units       web"), "{out}");
    let status = within("status", cli(&data, &endpoint, &["status"]))
        .await
        .unwrap();
    assert!(
        status.contains("oci:web") && status.contains("SOURCE"),
        "{status}"
    );
    let suspended = within(
        "suspend",
        cli(&data, &endpoint, &["source", "suspend", "web"]),
    )
    .await
    .unwrap();
    assert!(suspended.contains("(suspended)"), "{suspended}");
    let e = within(
        "sync suspended",
        cli(
            &data,
            &endpoint,
            &["source", "sync", "web", "--timeout", "2"],
        ),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("did not sync"), "{e}");
    within(
        "delete",
        cli(&data, &endpoint, &["source", "delete", "web"]),
    )
    .await
    .unwrap();
    // Its unit stays, now the hub's.
    assert_eq!(
        s.hub.unit("dev/web").await.unwrap().unit.unwrap().source,
        ""
    );
}
