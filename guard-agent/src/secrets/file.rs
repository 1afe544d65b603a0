//! The secrets file: RON, root-owned, mode 0600, read once at start.
//!
//! ```ron
//! (
//!     secrets: [
//!         (name: "billing-api", value: "sk_live_..."),
//!     ],
//!     bindings: [
//!         // Set a header on every request to these hosts (and paths).
//!         (secret: "billing-api", hosts: ["api.billing.example"], path: "/v1/**",
//!          header: ("Authorization", "Bearer {secret}")),
//!         // Only allow placeholders `guard:secret/billing-api` to this host.
//!         (secret: "billing-api", hosts: ["billing.example"]),
//!     ],
//! )
//! ```
//!
//! Errors name the file, and the line and column (syntax) or the field
//! (meaning); they never quote a secret's value, not even a malformed one.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use serde::Deserialize;

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretsFile {
    #[serde(default)]
    pub secrets: Vec<SecretEntry>,
    #[serde(default)]
    pub bindings: Vec<BindingEntry>,
}

/// One named secret.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretEntry {
    pub name: String,
    pub value: String,
}

impl std::fmt::Debug for SecretEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretEntry")
            .field("name", &self.name)
            .field("value", &"[secret]")
            .finish()
    }
}

/// Where a secret may go, and optionally a header to set there.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindingEntry {
    pub secret: String,
    /// Destination host globs (case-insensitive), e.g. `"api.example.com"`, `"*.example.com"`.
    pub hosts: Vec<String>,
    /// URL path glob (`*` within a segment, `**` across); none: every path.
    #[serde(default)]
    pub path: Option<String>,
    /// `(NAME, TEMPLATE)`: set header NAME to TEMPLATE with `{secret}`
    /// replaced, dropping the client's own value.
    #[serde(default)]
    pub header: Option<(String, String)>,
}

/// What is wrong with a secrets file.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("secrets file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("secrets file {path} is mode {mode:04o} and owned by uid {uid}: it must be mode 0600 (or stricter) and owned by root (chmod 600 {path}; chown root: {path})")]
    TooOpen { path: PathBuf, mode: u32, uid: u32 },
    #[error("secrets file {path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error("secrets file {path}, line {line}, column {column}: {message}")]
    Syntax {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("secrets file {path}: {field}: {message}")]
    Invalid {
        path: PathBuf,
        field: String,
        message: String,
    },
}

/// Checks owner and mode: root-owned, no group or other bits.
pub fn check_permissions(path: &Path, meta: &std::fs::Metadata) -> Result<(), SecretsError> {
    if !meta.is_file() {
        return Err(SecretsError::NotAFile {
            path: path.to_owned(),
        });
    }
    let mode = meta.mode() & 0o7777;
    if meta.uid() != 0 || mode & 0o077 != 0 {
        return Err(SecretsError::TooOpen {
            path: path.to_owned(),
            mode,
            uid: meta.uid(),
        });
    }
    Ok(())
}

/// Reads the file after checking its permissions.
pub fn read(path: &Path) -> Result<SecretsFile, SecretsError> {
    let err = |source| SecretsError::Read {
        path: path.to_owned(),
        source,
    };
    // Check the file we open, not the name (no swap in between).
    let f = std::fs::File::open(path).map_err(err)?;
    check_permissions(path, &f.metadata().map_err(err)?)?;
    let text = std::io::read_to_string(f).map_err(err)?;
    parse(path, &text)
}

/// Parses RON text; `path` is only used in messages.
pub fn parse(path: &Path, text: &str) -> Result<SecretsFile, SecretsError> {
    ron::Options::default()
        .with_default_extension(ron::extensions::Extensions::IMPLICIT_SOME)
        .from_str(text)
        .map_err(|e: ron::error::SpannedError| SecretsError::Syntax {
            path: path.to_owned(),
            line: e.position.line,
            column: e.position.col,
            message: without_quoted_values(&e.code.to_string()),
        })
}

/// serde messages quote the offending value (`invalid type: string "..."`);
/// a value here may be a secret, so quoted parts are elided.
fn without_quoted_values(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut inside = false;
    for c in msg.chars() {
        if c == '"' {
            if inside {
                out.push_str("…\"");
            } else {
                out.push('"');
            }
            inside = !inside;
        } else if !inside {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_group_readable_file_is_refused_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("secrets.ron");
        std::fs::write(&p, "(secrets: [], bindings: [])").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        let meta = std::fs::metadata(&p).unwrap();
        let e = check_permissions(&p, &meta).unwrap_err().to_string();
        assert!(e.contains("0640"), "{e}");
        assert!(e.contains("chmod 600"), "{e}");
        assert!(e.contains(&p.display().to_string()), "{e}");
        if nix::unistd::geteuid().is_root() {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
            read(&p).expect("0600 root-owned is accepted");
        }
    }

    #[test]
    fn bad_ron_names_the_file_and_line_without_the_value() {
        let p = Path::new("/etc/guard/secrets.ron");
        let text = "(\n  secrets: [\n    (name: \"k\", value: 12345678),\n  ],\n)";
        let e = parse(p, text).unwrap_err().to_string();
        assert!(e.contains("/etc/guard/secrets.ron"), "{e}");
        assert!(e.contains("line 3"), "{e}");
        assert!(!e.contains("12345678"), "{e}");

        let text = "(\n  secrets: [(name: \"k\", value: \"v\", valu: \"hunter2-secret\")],\n)";
        let e = parse(p, text).unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
        assert!(e.contains("valu"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn quoted_values_are_elided() {
        assert_eq!(
            without_quoted_values(r#"invalid type: string "s3cr3t", expected u32"#),
            r#"invalid type: string "…", expected u32"#
        );
    }
}
