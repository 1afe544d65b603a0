//! Reading policy files, reporting what is wrong with them, and swapping the
//! live policy.
//!
//! A directory loads whole or not at all: any unreadable, malformed or
//! invalid file fails the load, and `PolicyStore::reload` then keeps serving
//! the last good policy.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use ron::extensions::Extensions;

use super::compile::{compile, CompiledPolicy, ParsedFile};
use super::detectors::did_you_mean;
use super::schema::PolicyFile;

/// Everything that can stop a policy from loading. Each variant names the
/// file, and where known the line, column and rule.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read {}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("no policy files (*.ron) in {}", dir.display())]
    NoFiles { dir: PathBuf },
    /// The file is not valid RON, or does not fit the schema.
    #[error("{}:{line}:{column}: {message}", file.display())]
    Parse {
        file: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// The file parsed but says something impossible (bad glob, CIDR,
    /// regex, unknown detector, duplicate rule name, …).
    #[error("{}{}: {message}", file.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    Invalid {
        file: PathBuf,
        rule: Option<String>,
        line: Option<usize>,
        message: String,
    },
    /// The files parse and validate alone but do not combine.
    #[error("{message}")]
    Combine { message: String },
}

fn ron_options() -> ron::Options {
    ron::Options::default().with_default_extension(Extensions::IMPLICIT_SOME)
}

/// Parse one file's text. `path` is only used to name the file in errors.
pub fn parse_policy(path: &Path, text: &str) -> Result<PolicyFile, PolicyError> {
    ron_options()
        .from_str::<PolicyFile>(text)
        .map_err(|e| PolicyError::Parse {
            file: path.to_owned(),
            line: e.position.line,
            column: e.position.col,
            message: describe_ron_error(&e.code),
        })
}

fn one_of(expected: &[&str]) -> String {
    let names: Vec<String> = expected.iter().map(|e| format!("`{e}`")).collect();
    format!(" (expected one of {})", names.join(", "))
}

fn describe_ron_error(code: &ron::Error) -> String {
    use ron::Error;
    let inside = |outer: &Option<String>| match outer {
        Some(o) => format!(" in `{o}`"),
        None => String::new(),
    };
    match code {
        Error::NoSuchStructField {
            expected,
            found,
            outer,
        } => format!(
            "unknown field `{found}`{}{}{}",
            inside(outer),
            did_you_mean(found, expected.iter().copied()),
            one_of(expected)
        ),
        Error::NoSuchEnumVariant {
            expected,
            found,
            outer,
        } => format!(
            "unknown variant `{found}`{}{}{}",
            inside(outer),
            did_you_mean(found, expected.iter().copied()),
            one_of(expected)
        ),
        Error::MissingStructField { field, outer } => {
            format!("missing field `{field}`{}", inside(outer))
        }
        Error::DuplicateStructField { field, outer } => {
            format!("field `{field}` given twice{}", inside(outer))
        }
        other => other.to_string(),
    }
}

fn read_and_parse(path: &Path) -> Result<ParsedFile, PolicyError> {
    let text = std::fs::read_to_string(path).map_err(|error| PolicyError::Io {
        path: path.to_owned(),
        error,
    })?;
    let policy = parse_policy(path, &text)?;
    Ok(ParsedFile {
        path: path.to_owned(),
        text,
        policy,
    })
}

/// Load every `*.ron` file directly in `dir` (not subdirectories), in
/// file-name order, and compile them into one policy.
pub fn load_dir(dir: &Path) -> Result<CompiledPolicy, PolicyError> {
    let io = |error| PolicyError::Io {
        path: dir.to_owned(),
        error,
    };
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        if path.extension().is_some_and(|e| e == "ron") && path.is_file() {
            paths.push(path);
        }
    }
    if paths.is_empty() {
        return Err(PolicyError::NoFiles {
            dir: dir.to_owned(),
        });
    }
    paths.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    load_files(&paths)
}

/// Compile exactly these files, in this order (e.g. one example policy).
pub fn load_files(paths: &[PathBuf]) -> Result<CompiledPolicy, PolicyError> {
    let files = paths
        .iter()
        .map(|p| read_and_parse(p))
        .collect::<Result<Vec<_>, _>>()?;
    compile(&files)
}

/// Compile policy text that is not on disk (tests, `policy check -`).
/// Each source is (name used in errors, text).
pub fn load_sources(sources: &[(&str, &str)]) -> Result<CompiledPolicy, PolicyError> {
    let files = sources
        .iter()
        .map(|(name, text)| {
            let path = PathBuf::from(name);
            let policy = parse_policy(&path, text)?;
            Ok(ParsedFile {
                path,
                text: (*text).to_owned(),
                policy,
            })
        })
        .collect::<Result<Vec<_>, PolicyError>>()?;
    compile(&files)
}

/// The live policy, shared by every connection. Readers take a cheap
/// snapshot with [`PolicyStore::current`]; a reload swaps in a new policy
/// atomically, and in-flight requests finish under the one they started with.
#[derive(Debug)]
pub struct PolicyStore {
    current: ArcSwap<CompiledPolicy>,
    version: AtomicU64,
    reloading: Mutex<()>,
}

impl PolicyStore {
    /// A store serving `policy` as version 1.
    pub fn new(mut policy: CompiledPolicy) -> Self {
        policy.version = 1;
        PolicyStore {
            current: ArcSwap::from_pointee(policy),
            version: AtomicU64::new(1),
            reloading: Mutex::new(()),
        }
    }

    /// Load `dir` and serve it as version 1.
    pub fn open(dir: &Path) -> Result<Self, PolicyError> {
        load_dir(dir).map(Self::new)
    }

    /// The policy in force now.
    pub fn current(&self) -> Arc<CompiledPolicy> {
        self.current.load_full()
    }

    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Load `dir` and, if it is valid, make it current and return its
    /// version. On error the current policy stays in force, unchanged.
    pub fn reload(&self, dir: &Path) -> Result<u64, PolicyError> {
        let policy = load_dir(dir)?;
        Ok(self.replace(policy))
    }

    /// Make `policy` current; returns its version.
    pub fn replace(&self, mut policy: CompiledPolicy) -> u64 {
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let version = self.version.load(Ordering::Acquire) + 1;
        policy.version = version;
        self.current.store(Arc::new(policy));
        self.version.store(version, Ordering::Release);
        version
    }
}
