//! Unpacking a layer (tar, gzip-compressed or not) under limits: only
//! regular files, relative paths without `..`, bounded counts and sizes.
//! A tar bomb or a gzip bomb stops at the first byte over a cap, with an
//! error naming it; nothing is kept from a refused archive.

use std::io::Read;
use std::path::{Component, Path};

use super::ArtifactLimits;

/// A file of the artifact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct File {
    /// Relative, `/`-separated, without a leading `./`.
    pub path: String,
    pub bytes: Vec<u8>,
}

/// Reads at most `left` bytes from the inner reader; an error past it.
struct Capped<R> {
    inner: R,
    left: u64,
    what: &'static str,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let n64 = n as u64;
        if n64 > self.left {
            return Err(std::io::Error::other(self.what));
        }
        self.left -= n64;
        Ok(n)
    }
}

fn shown(path: &Path) -> String {
    crate::manifest::prefix(&path.to_string_lossy())
}

/// The files of a layer, sorted by path.
pub fn extract(blob: &[u8], limits: &ArtifactLimits) -> Result<Vec<File>, String> {
    // Headers and padding ride along with the content; the stream as a
    // whole is capped too, so a bomb of zeros stops early.
    let stream_cap = limits
        .max_total
        .saturating_mul(2)
        .saturating_add((limits.max_files as u64).saturating_mul(1024))
        .saturating_add(1 << 20);
    let raw: Box<dyn Read + '_> = if blob.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::MultiGzDecoder::new(blob))
    } else {
        Box::new(blob)
    };
    let reader = Capped {
        inner: raw,
        left: stream_cap,
        what: "the archive unpacks to more than the limit (a compression bomb?)",
    };
    let mut archive = tar::Archive::new(reader);
    let mut files = Vec::new();
    let mut total = 0u64;
    let entries = archive
        .entries()
        .map_err(|e| format!("not a tar archive: {e}"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("unreadable archive: {e}"))?;
        let path = entry
            .path()
            .map_err(|e| format!("an archive entry has an unreadable path: {e}"))?
            .into_owned();
        let kind = entry.header().entry_type();
        if kind.is_dir() || kind.is_pax_global_extensions() {
            continue;
        }
        if kind.is_symlink() || kind.is_hard_link() {
            return Err(format!(
                "archive entry {} is a link; links are refused",
                shown(&path)
            ));
        }
        if !kind.is_file() {
            return Err(format!(
                "archive entry {} is not a regular file ({kind:?}); refused",
                shown(&path)
            ));
        }
        let mut parts = Vec::new();
        for c in path.components() {
            match c {
                Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
                Component::CurDir => {}
                Component::ParentDir => {
                    return Err(format!(
                        "archive entry {} leaves the archive (`..`); refused",
                        shown(&path)
                    ));
                }
                Component::RootDir | Component::Prefix(_) => {
                    return Err(format!(
                        "archive entry {} has an absolute path; refused",
                        shown(&path)
                    ));
                }
            }
        }
        // macOS metadata rides along in some archives: not content.
        if parts.is_empty()
            || parts.iter().any(|p| p == "PaxHeader" || p == "__MACOSX")
            || parts.last().is_some_and(|p| p.starts_with("._"))
        {
            continue;
        }
        // The size the archive will deliver (a pax header may override the
        // ustar one).
        let size = entry.size();
        if size > limits.max_file {
            return Err(format!(
                "archive entry {} is {size} bytes; files may have at most {}",
                shown(&path),
                limits.max_file
            ));
        }
        total = total.saturating_add(size);
        if total > limits.max_total {
            return Err(format!(
                "the archive's files exceed {} bytes together; refused",
                limits.max_total
            ));
        }
        if files.len() >= limits.max_files {
            return Err(format!(
                "the archive has more than {} files; refused",
                limits.max_files
            ));
        }
        let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        (&mut entry)
            .take(limits.max_file + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("archive entry {}: {e}", shown(&path)))?;
        if bytes.len() as u64 > limits.max_file {
            return Err(format!(
                "archive entry {} is larger than {} bytes; refused",
                shown(&path),
                limits.max_file
            ));
        }
        files.push(File {
            path: parts.join("/"),
            bytes,
        });
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    if let Some(w) = files.windows(2).find(|w| w[0].path == w[1].path) {
        return Err(format!(
            "the archive holds {} twice",
            crate::manifest::prefix(&w[0].path)
        ));
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar(entries: &[(&str, tar::EntryType, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            if kind.is_symlink() || kind.is_hard_link() {
                h.set_link_name("/etc/passwd").unwrap();
            }
            // Bypass the builder's path checks: hostile archives do.
            let name = path.as_bytes();
            h.as_old_mut().name[..name.len()].copy_from_slice(name);
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn gz(bytes: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn a_pax_size_cannot_slip_past_the_caps() {
        // The ustar header says 0 bytes; the pax header says 5000, and
        // 5000 bytes follow.
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([("size", &b"5000"[..])]).unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_path("big.yaml").unwrap();
        h.set_size(0);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        let raw = b.get_mut();
        raw.extend_from_slice(h.as_bytes());
        raw.extend_from_slice(&[b'a'; 5000]);
        raw.resize(raw.len().div_ceil(512) * 512, 0);
        let raw = b.into_inner().unwrap();
        let small = ArtifactLimits {
            max_blob: 1 << 20,
            max_total: 1 << 20,
            max_files: 10,
            max_file: 1000,
        };
        let e = extract(&raw, &small).unwrap_err();
        assert!(e.contains("big.yaml"), "{e}");
    }

    #[test]
    fn regular_files_come_out_sorted_from_tar_and_tar_gzip() {
        let t = tar(&[
            ("./b.yaml", tar::EntryType::Regular, b"b"),
            ("dir/a.yaml", tar::EntryType::Regular, b"a"),
            ("._a.yaml", tar::EntryType::Regular, b"junk"),
            ("dir", tar::EntryType::Directory, b""),
        ]);
        for blob in [t.clone(), gz(&t)] {
            let files = extract(&blob, &ArtifactLimits::default()).unwrap();
            let paths: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
            assert_eq!(paths, ["b.yaml", "dir/a.yaml"]);
        }
    }

    #[test]
    fn traversal_links_devices_and_bombs_are_refused() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                tar(&[("../escape.yaml", tar::EntryType::Regular, b"x")]),
                "leaves the archive",
            ),
            (
                tar(&[("/etc/x.yaml", tar::EntryType::Regular, b"x")]),
                "absolute path",
            ),
            (
                tar(&[("link.yaml", tar::EntryType::Symlink, b"")]),
                "is a link",
            ),
            (
                tar(&[("hard.yaml", tar::EntryType::Link, b"")]),
                "is a link",
            ),
            (
                tar(&[("dev", tar::EntryType::Char, b"")]),
                "not a regular file",
            ),
            (
                tar(&[("fifo", tar::EntryType::Fifo, b"")]),
                "not a regular file",
            ),
        ];
        for (blob, want) in cases {
            let e = extract(&blob, &ArtifactLimits::default()).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
        let small = ArtifactLimits {
            max_blob: 1 << 20,
            max_total: 4096,
            max_files: 3,
            max_file: 2048,
        };
        // One big file, many files, a bomb of zeros.
        let big = tar(&[("big.yaml", tar::EntryType::Regular, &[b'a'; 3000])]);
        assert!(extract(&big, &small).unwrap_err().contains("at most 2048"));
        let many: Vec<(String, Vec<u8>)> = (0..5)
            .map(|i| (format!("f{i}.yaml"), vec![b'x'; 10]))
            .collect();
        let many = tar(&many
            .iter()
            .map(|(p, d)| (p.as_str(), tar::EntryType::Regular, d.as_slice()))
            .collect::<Vec<_>>());
        assert!(
            extract(&many, &small)
                .unwrap_err()
                .contains("more than 3 files")
        );
        // A bomb: tiny outside, one large file inside.
        let content = tar(&[("x.yaml", tar::EntryType::Regular, &vec![b'a'; 8 << 20])]);
        let bomb = gz(&content);
        assert!(bomb.len() < 64 << 10, "small outside: {}", bomb.len());
        let e = extract(&bomb, &small).unwrap_err();
        assert!(e.contains("at most 2048"), "{e}");
        // Entries that carry no content (directories) still cannot make
        // the stream endless.
        let dirs: Vec<String> = (0..4000).map(|i| format!("d{i}/")).collect();
        let dirs = tar(&dirs
            .iter()
            .map(|d| (d.as_str(), tar::EntryType::Directory, &b""[..]))
            .collect::<Vec<_>>());
        let e = extract(&gz(&dirs), &small).unwrap_err();
        assert!(e.contains("compression bomb"), "{e}");
        let mut filler = tar::Builder::new(Vec::new());
        for i in 0..3 {
            let mut h = tar::Header::new_gnu();
            h.set_size(2000);
            h.set_mode(0o644);
            h.set_cksum();
            filler
                .append_data(&mut h, format!("f{i}.yaml"), &[b'a'; 2000][..])
                .unwrap();
        }
        let e = extract(&gz(&filler.into_inner().unwrap()), &small).unwrap_err();
        assert!(e.contains("exceed 4096 bytes"), "{e}");
    }
}
