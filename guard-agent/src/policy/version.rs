//! Which policy is in force, for `guard-agent status`: its version number
//! (1 at start, +1 per successful reload), a SHA-256 over the files it was
//! loaded from (name and contents, sorted by name) and when it was loaded.
//!
//! The digest is taken from the files right after a successful load; an
//! edit racing the load can make it describe the newer files. It identifies
//! a policy set across hosts; it is not a security boundary.

use std::{
    path::{Path, PathBuf},
    sync::Mutex,
};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

/// A snapshot of [`PolicyVersion`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PolicyStamp {
    pub version: u64,
    /// Hex SHA-256 of the policy files.
    pub sha256: String,
    #[serde(with = "time::serde::rfc3339")]
    pub loaded_at: OffsetDateTime,
    /// The directory, or "built-in".
    pub source: String,
}

/// The stamp of the policy in force, updated on each successful load.
#[derive(Debug)]
pub struct PolicyVersion(Mutex<PolicyStamp>);

/// SHA-256 over `(name, text)` pairs, in the order given.
pub fn digest(sources: &[(String, Vec<u8>)]) -> String {
    let mut h = Sha256::new();
    for (name, text) in sources {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update((text.len() as u64).to_le_bytes());
        h.update(text);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The `*.ron` files directly in `dir`, sorted by name, with their bytes.
fn dir_sources(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "ron") && p.is_file())
        .collect();
    paths.sort();
    paths
        .into_iter()
        .filter_map(|p| {
            let name = p.file_name()?.to_string_lossy().into_owned();
            Some((name, std::fs::read(&p).ok()?))
        })
        .collect()
}

impl PolicyVersion {
    /// The stamp of version 1: the files in `dir`, or the built-in text.
    pub fn new(dir: Option<&Path>, built_in: &str) -> Self {
        Self(Mutex::new(Self::stamp(1, dir, built_in)))
    }

    fn stamp(version: u64, dir: Option<&Path>, built_in: &str) -> PolicyStamp {
        let (sources, source) = match dir {
            Some(d) => (dir_sources(d), d.display().to_string()),
            None => (
                vec![("default.ron".to_owned(), built_in.as_bytes().to_vec())],
                "built-in".to_owned(),
            ),
        };
        PolicyStamp {
            version,
            sha256: digest(&sources),
            loaded_at: OffsetDateTime::now_utc(),
            source,
        }
    }

    /// Records a successful reload of `dir` as `version`.
    pub fn reloaded(&self, version: u64, dir: &Path) {
        let s = Self::stamp(version, Some(dir), "");
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = s;
    }

    pub fn current(&self) -> PolicyStamp {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_follows_the_files() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a.ron"), "A").unwrap();
        std::fs::write(d.path().join("notes.txt"), "ignored").unwrap();
        let v = PolicyVersion::new(Some(d.path()), "");
        let first = v.current();
        assert_eq!(first.version, 1);
        assert_eq!(first.sha256.len(), 64);
        std::fs::write(d.path().join("a.ron"), "B").unwrap();
        v.reloaded(2, d.path());
        let second = v.current();
        assert_eq!(second.version, 2);
        assert_ne!(first.sha256, second.sha256);
        let b = PolicyVersion::new(None, "text").current();
        assert_eq!(b.source, "built-in");
    }
}
