//! The agent's record of desired state: for every unit, the latest
//! revision the hub sent. It is what the agent acknowledges (an ack means
//! "recorded durably"), what it keeps enforcing while the hub is away, and
//! the version vector it presents on every connect.
//!
//! The file record keeps one file per unit, written atomically on a
//! blocking thread, so an update costs the size of its own unit and never
//! stalls the async threads that carry the hub session.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// One unit's desired state as the hub sent it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredUnit {
    pub unit: String,
    pub environment: String,
    pub revision: u64,
    pub digest: String,
    pub tombstone: bool,
    /// Shared, not copied, between the record, the unit's worker and its
    /// passes (a unit may hold megabytes).
    pub manifests: std::sync::Arc<str>,
}

impl DesiredUnit {
    /// Whether two records describe the same revision (a repeated offer).
    pub fn same_revision(&self, other: &DesiredUnit) -> bool {
        self.revision == other.revision
            && self.digest == other.digest
            && self.tombstone == other.tombstone
            && self.environment == other.environment
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("cannot write the desired-state file {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the desired-state file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the desired-state file {path} is corrupt")]
    Corrupt {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("unit name {0:?} cannot name a file (not a DNS-1123 label)")]
    UnitName(String),
}

/// Where desired state is recorded. `record` returns only once the entry
/// is durable.
#[async_trait]
pub trait DesiredStore: Send + Sync + 'static {
    fn load(&self) -> Vec<DesiredUnit>;
    async fn record(&self, unit: DesiredUnit) -> Result<(), RecordError>;
    /// Forgets a unit after its tombstone at `revision` was carried out;
    /// a newer revision recorded meanwhile is kept.
    async fn forget(&self, unit: &str, revision: u64) -> Result<(), RecordError>;
}

/// Writes a file readable by its owner only (atomically; the file and its
/// directory fsynced). Blocking: call it off the async threads.
pub fn write_private(path: &Path, bytes: impl AsRef<[u8]>) -> Result<(), RecordError> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| RecordError::Write {
        path: path.display().to_string(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(bytes.as_ref()).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)?;
    sync_dir(path).map_err(err)
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    if let Some(d) = path.parent().and_then(|dir| std::fs::File::open(dir).ok()) {
        d.sync_all()?;
    }
    Ok(())
}

/// In-memory record (tests, simulations).
#[derive(Default)]
pub struct MemoryStore {
    units: Mutex<BTreeMap<String, DesiredUnit>>,
}

impl MemoryStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, DesiredUnit>> {
        self.units
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl DesiredStore for MemoryStore {
    fn load(&self) -> Vec<DesiredUnit> {
        self.lock().values().cloned().collect()
    }

    async fn record(&self, unit: DesiredUnit) -> Result<(), RecordError> {
        self.lock().insert(unit.unit.clone(), unit);
        Ok(())
    }

    async fn forget(&self, unit: &str, revision: u64) -> Result<(), RecordError> {
        let mut units = self.lock();
        if units.get(unit).is_some_and(|u| u.revision <= revision) {
            units.remove(unit);
        }
        Ok(())
    }
}

/// One JSON file per unit in a directory, each replaced atomically
/// (write, fsync, rename, fsync directory).
pub struct FileStore {
    dir: PathBuf,
    units: Mutex<BTreeMap<String, DesiredUnit>>,
    /// Serializes writes so a unit's files land in the order recorded.
    writes: tokio::sync::Mutex<()>,
}

/// Unit names come from the hub (DNS-1123 labels); anything else is not
/// used as a file name.
fn file_name(unit: &str) -> Result<String, RecordError> {
    let ok = !unit.is_empty()
        && unit.len() <= 63
        && unit
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !unit.starts_with('-');
    if ok {
        Ok(format!("{unit}.json"))
    } else {
        Err(RecordError::UnitName(unit.to_owned()))
    }
}

fn read_unit(path: &Path) -> Result<DesiredUnit, RecordError> {
    let bytes = std::fs::read(path).map_err(|source| RecordError::Read {
        path: path.display().to_string(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|source| RecordError::Corrupt {
        path: path.display().to_string(),
        source,
    })
}

impl FileStore {
    /// Opens the record in `dir` (created if missing). A single-file record
    /// (`desired.json` beside `dir`, written by earlier agents) is moved
    /// into per-unit files.
    pub fn open(dir: &Path) -> Result<FileStore, RecordError> {
        let io = |source| RecordError::Read {
            path: dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut units = BTreeMap::new();
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            if path.extension().is_some_and(|e| e == "json") {
                let u = read_unit(&path)?;
                units.insert(u.unit.clone(), u);
            } else if path.extension().is_some_and(|e| e == "tmp") {
                // An interrupted write: the previous file is intact.
                let _ = std::fs::remove_file(&path);
            }
        }
        let legacy = dir.with_file_name("desired.json");
        if legacy.exists() {
            let bytes = std::fs::read(&legacy).map_err(|source| RecordError::Read {
                path: legacy.display().to_string(),
                source,
            })?;
            let old: BTreeMap<String, DesiredUnit> =
                serde_json::from_slice(&bytes).map_err(|source| RecordError::Corrupt {
                    path: legacy.display().to_string(),
                    source,
                })?;
            for (name, u) in old {
                if units.contains_key(&name) {
                    continue;
                }
                write_private(
                    &dir.join(file_name(&name)?),
                    serde_json::to_vec(&u).unwrap_or_default(),
                )?;
                units.insert(name, u);
            }
            std::fs::remove_file(&legacy).map_err(|source| RecordError::Write {
                path: legacy.display().to_string(),
                source,
            })?;
        }
        Ok(FileStore {
            dir: dir.to_owned(),
            units: Mutex::new(units),
            writes: tokio::sync::Mutex::new(()),
        })
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, DesiredUnit>> {
        self.units
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Runs blocking file work on the blocking pool.
async fn blocking<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> Result<T, RecordError> + Send + 'static,
) -> Result<T, RecordError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(RecordError::Write {
            path: path.display().to_string(),
            source: std::io::Error::other(e.to_string()),
        })
    })
}

#[async_trait]
impl DesiredStore for FileStore {
    fn load(&self) -> Vec<DesiredUnit> {
        self.cache().values().cloned().collect()
    }

    /// Manifests may hold Secrets: the files are private to the agent.
    async fn record(&self, unit: DesiredUnit) -> Result<(), RecordError> {
        let path = self.dir.join(file_name(&unit.unit)?);
        let bytes = serde_json::to_vec(&unit).map_err(|e| RecordError::Write {
            path: path.display().to_string(),
            source: std::io::Error::other(e),
        })?;
        let _order = self.writes.lock().await;
        let p = path.clone();
        blocking(&path, move || write_private(&p, bytes)).await?;
        self.cache().insert(unit.unit.clone(), unit);
        Ok(())
    }

    async fn forget(&self, unit: &str, revision: u64) -> Result<(), RecordError> {
        let path = self.dir.join(file_name(unit)?);
        let _order = self.writes.lock().await;
        if self.cache().get(unit).is_none_or(|u| u.revision > revision) {
            return Ok(());
        }
        let p = path.clone();
        blocking(&path, move || {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(RecordError::Write {
                        path: p.display().to_string(),
                        source,
                    });
                }
            }
            sync_dir(&p).map_err(|source| RecordError::Write {
                path: p.display().to_string(),
                source,
            })
        })
        .await?;
        self.cache().remove(unit);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(name: &str, rev: u64) -> DesiredUnit {
        DesiredUnit {
            unit: name.into(),
            environment: "dev".into(),
            revision: rev,
            digest: format!("d{rev}"),
            tombstone: false,
            manifests: "kind: ConfigMap".into(),
        }
    }

    #[tokio::test]
    async fn file_store_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("desired");
        let s = FileStore::open(&path).unwrap();
        s.record(unit("a", 1)).await.unwrap();
        s.record(unit("a", 2)).await.unwrap();
        s.record(unit("b", 7)).await.unwrap();
        s.forget("b", 7).await.unwrap();
        drop(s);
        let s = FileStore::open(&path).unwrap();
        assert_eq!(s.load(), vec![unit("a", 2)]);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path.join("a.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "manifests may hold Secrets");
    }

    #[tokio::test]
    async fn forgetting_a_tombstone_keeps_a_newer_revision() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStore::open(&dir.path().join("desired")).unwrap();
        s.record(unit("a", 3)).await.unwrap();
        s.forget("a", 2).await.unwrap();
        assert_eq!(s.load(), vec![unit("a", 3)]);
        let m = MemoryStore::default();
        m.record(unit("a", 3)).await.unwrap();
        m.forget("a", 2).await.unwrap();
        assert_eq!(m.load(), vec![unit("a", 3)]);
    }

    #[tokio::test]
    async fn an_update_rewrites_only_its_own_unit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("desired");
        let s = FileStore::open(&path).unwrap();
        s.record(unit("a", 1)).await.unwrap();
        s.record(unit("b", 1)).await.unwrap();
        let before = std::fs::metadata(path.join("a.json"))
            .unwrap()
            .modified()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        s.record(unit("b", 2)).await.unwrap();
        let after = std::fs::metadata(path.join("a.json"))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(before, after, "unit a's file was not rewritten");
    }

    #[tokio::test]
    async fn a_single_file_record_is_moved_into_unit_files() {
        let dir = tempfile::tempdir().unwrap();
        let legacy: BTreeMap<String, DesiredUnit> =
            [("a".to_owned(), unit("a", 4))].into_iter().collect();
        std::fs::write(
            dir.path().join("desired.json"),
            serde_json::to_vec(&legacy).unwrap(),
        )
        .unwrap();
        let s = FileStore::open(&dir.path().join("desired")).unwrap();
        assert_eq!(s.load(), vec![unit("a", 4)]);
        assert!(!dir.path().join("desired.json").exists());
        assert!(dir.path().join("desired/a.json").exists());
    }

    #[test]
    fn corrupt_file_is_an_error_not_an_empty_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("desired");
        std::fs::create_dir_all(&path).unwrap();
        std::fs::write(path.join("a.json"), b"{not json").unwrap();
        assert!(matches!(
            FileStore::open(&path),
            Err(RecordError::Corrupt { .. })
        ));
    }

    #[tokio::test]
    async fn unit_names_that_are_not_labels_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStore::open(&dir.path().join("desired")).unwrap();
        for bad in ["../x", "a/b", "", "UP"] {
            assert!(matches!(
                s.record(unit(bad, 1)).await,
                Err(RecordError::UnitName(_))
            ));
        }
    }
}
