//! The agent's record of desired state: for every unit, the latest
//! revision the hub sent. It is what the agent acknowledges (an ack means
//! "recorded durably"), what it keeps enforcing while the hub is away, and
//! the version vector it presents on every connect.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// One unit's desired state as the hub sent it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredUnit {
    pub unit: String,
    pub environment: String,
    pub revision: u64,
    pub digest: String,
    pub tombstone: bool,
    pub manifests: String,
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
}

/// Where desired state is recorded. `record` returns only once the entry
/// is durable.
pub trait DesiredStore: Send + Sync + 'static {
    fn load(&self) -> Vec<DesiredUnit>;
    fn record(&self, unit: DesiredUnit) -> Result<(), RecordError>;
    /// Forgets a unit (after its tombstone was carried out).
    fn forget(&self, unit: &str) -> Result<(), RecordError>;
}

/// Writes a file readable by its owner only (atomically; the file and its
/// directory fsynced).
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
    if let Some(d) = path.parent().and_then(|dir| std::fs::File::open(dir).ok()) {
        d.sync_all().map_err(err)?;
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

impl DesiredStore for MemoryStore {
    fn load(&self) -> Vec<DesiredUnit> {
        self.lock().values().cloned().collect()
    }

    fn record(&self, unit: DesiredUnit) -> Result<(), RecordError> {
        self.lock().insert(unit.unit.clone(), unit);
        Ok(())
    }

    fn forget(&self, unit: &str) -> Result<(), RecordError> {
        self.lock().remove(unit);
        Ok(())
    }
}

/// A JSON file replaced atomically (write, fsync, rename, fsync directory).
pub struct FileStore {
    path: PathBuf,
    units: Mutex<BTreeMap<String, DesiredUnit>>,
}

impl FileStore {
    pub fn open(path: &Path) -> Result<FileStore, RecordError> {
        let units = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| RecordError::Corrupt {
                path: path.display().to_string(),
                source,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => {
                return Err(RecordError::Read {
                    path: path.display().to_string(),
                    source,
                });
            }
        };
        Ok(FileStore {
            path: path.to_owned(),
            units: Mutex::new(units),
        })
    }

    /// Manifests may hold Secrets: the record is private to the agent.
    fn persist(&self, units: &BTreeMap<String, DesiredUnit>) -> Result<(), RecordError> {
        let bytes = serde_json::to_vec(units).map_err(|e| RecordError::Write {
            path: self.path.display().to_string(),
            source: std::io::Error::other(e),
        })?;
        write_private(&self.path, bytes)
    }

    fn update(
        &self,
        f: impl FnOnce(&mut BTreeMap<String, DesiredUnit>),
    ) -> Result<(), RecordError> {
        let mut units = self
            .units
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut next = units.clone();
        f(&mut next);
        self.persist(&next)?;
        *units = next;
        Ok(())
    }
}

impl DesiredStore for FileStore {
    fn load(&self) -> Vec<DesiredUnit> {
        self.units
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    fn record(&self, unit: DesiredUnit) -> Result<(), RecordError> {
        self.update(|m| {
            m.insert(unit.unit.clone(), unit);
        })
    }

    fn forget(&self, unit: &str) -> Result<(), RecordError> {
        self.update(|m| {
            m.remove(unit);
        })
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

    #[test]
    fn file_store_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("desired.json");
        let s = FileStore::open(&path).unwrap();
        s.record(unit("a", 1)).unwrap();
        s.record(unit("a", 2)).unwrap();
        s.record(unit("b", 7)).unwrap();
        s.forget("b").unwrap();
        drop(s);
        let s = FileStore::open(&path).unwrap();
        assert_eq!(s.load(), vec![unit("a", 2)]);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "manifests may hold Secrets");
    }

    #[test]
    fn corrupt_file_is_an_error_not_an_empty_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("desired.json");
        std::fs::write(&path, b"{not json").unwrap();
        assert!(matches!(
            FileStore::open(&path),
            Err(RecordError::Corrupt { .. })
        ));
    }
}
