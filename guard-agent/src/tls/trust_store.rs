//! Making clients trust the Guard CA: installing it into the system trust
//! store, and writing a CA bundle for child processes.
//!
//! [`TrustStore::install`] copies the CA certificate to the distribution's
//! anchor directory and runs its update tool:
//!
//! | family | anchor | tool |
//! |---|---|---|
//! | Debian, Ubuntu | `/usr/local/share/ca-certificates/guard-local-ca.crt` | `update-ca-certificates` |
//! | Fedora, RHEL | `/etc/pki/ca-trust/source/anchors/guard-local-ca.crt` | `update-ca-trust extract` |
//!
//! The root directory and the directories searched for the tools are
//! parameters ([`TrustStore::at`]) so tests run against a temporary tree and
//! fake tools. Tools are looked up in fixed directories, never through
//! `PATH`: this runs as root.
//!
//! [`write_ca_bundle`] writes one PEM file holding the system's roots plus
//! the Guard CA, for programs that read a bundle from `SSL_CERT_FILE` and
//! friends ([`BUNDLE_ENV_VARS`]) instead of the system store.
//!
//! Never: write the CA key anywhere; only the certificate leaves the state
//! directory. Never write a bundle without the system roots (children would
//! lose every destination Guard does not intercept).

use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use super::ca::LocalCa;

/// The file name the CA gets in a system anchor directory.
pub const ANCHOR_FILE: &str = "guard-local-ca.crt";
/// Environment variables that point common runtimes at a CA bundle file:
/// OpenSSL (and Go, Ruby, ...), Python requests, curl, Node (extra CAs, on
/// top of its own), git.
pub const BUNDLE_ENV_VARS: &[&str] = &[
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
    "GIT_SSL_CAINFO",
];
/// Where distributions keep their PEM bundle of system roots, in the order
/// they are tried.
pub const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];
const DEFAULT_BIN_DIRS: &[&str] = &["/usr/sbin", "/usr/bin", "/sbin", "/bin"];

/// Why the trust store or the bundle could not be updated.
#[derive(Debug, thiserror::Error)]
pub enum TrustStoreError {
    #[error(
        "no trust store tool found: neither update-ca-certificates (Debian/Ubuntu) nor \
         update-ca-trust (Fedora/RHEL) is in {searched}; install the ca-certificates package, \
         or add the Guard CA certificate to your trust store by hand"
    )]
    NoTool { searched: String },
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{command} failed ({status}): {stderr}")]
    CommandFailed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("no system root certificates found (looked in {searched}); refusing to write a bundle holding only the Guard CA")]
    NoSystemRoots { searched: String },
    #[error("system bundle {path} is not a PEM certificate bundle: {reason}")]
    BadSystemBundle { path: PathBuf, reason: String },
}

/// The trust store families Guard knows how to update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrustStoreKind {
    /// Debian, Ubuntu and derivatives: `update-ca-certificates`.
    Debian,
    /// Fedora, RHEL and derivatives: `update-ca-trust`.
    Fedora,
}

impl TrustStoreKind {
    const ALL: [Self; 2] = [Self::Debian, Self::Fedora];

    fn anchor_dir(self) -> &'static str {
        match self {
            Self::Debian => "usr/local/share/ca-certificates",
            Self::Fedora => "etc/pki/ca-trust/source/anchors",
        }
    }

    fn tool(self) -> &'static str {
        match self {
            Self::Debian => "update-ca-certificates",
            Self::Fedora => "update-ca-trust",
        }
    }

    fn tool_args(self) -> &'static [&'static str] {
        match self {
            Self::Debian => &[],
            Self::Fedora => &["extract"],
        }
    }
}

/// The CA's place in a system trust store, after [`TrustStore::install`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    pub kind: TrustStoreKind,
    pub anchor: PathBuf,
}

/// A system trust store: a root directory and where its tools live.
#[derive(Debug, Clone)]
pub struct TrustStore {
    root: PathBuf,
    bin_dirs: Vec<PathBuf>,
}

impl TrustStore {
    /// This host's trust store.
    pub fn system() -> Self {
        Self::at("/", DEFAULT_BIN_DIRS.iter().map(PathBuf::from).collect())
    }

    /// A trust store rooted at `root` (anchor directories are under it),
    /// whose tools are looked up in `bin_dirs`.
    pub fn at(root: impl Into<PathBuf>, bin_dirs: Vec<PathBuf>) -> Self {
        Self {
            root: root.into(),
            bin_dirs,
        }
    }

    /// Which family this host is, by the tool it has, and that tool's path.
    pub fn detect(&self) -> Result<(TrustStoreKind, PathBuf), TrustStoreError> {
        for kind in TrustStoreKind::ALL {
            if let Some(tool) = self.find_tool(kind.tool()) {
                return Ok((kind, tool));
            }
        }
        Err(TrustStoreError::NoTool {
            searched: join_paths(&self.bin_dirs),
        })
    }

    /// Where the CA certificate goes for `kind`.
    pub fn anchor_path(&self, kind: TrustStoreKind) -> PathBuf {
        self.root.join(kind.anchor_dir()).join(ANCHOR_FILE)
    }

    /// Installs the CA certificate as a trust anchor (replacing an earlier
    /// Guard CA) and runs the update tool.
    pub fn install(&self, ca: &LocalCa) -> Result<Installed, TrustStoreError> {
        let (kind, tool) = self.detect()?;
        let anchor = self.anchor_path(kind);
        if let Some(dir) = anchor.parent() {
            fs::create_dir_all(dir).map_err(|source| TrustStoreError::Io {
                action: "create directory",
                path: dir.to_path_buf(),
                source,
            })?;
        }
        write_replace(&anchor, ca.export_pem().as_bytes(), 0o644)?;
        run(&tool, kind.tool_args())?;
        Ok(Installed { kind, anchor })
    }

    /// Removes the Guard CA from the trust store, if it is there, and runs
    /// the update tool. Returns the anchor removed, if any.
    pub fn uninstall(&self) -> Result<Option<PathBuf>, TrustStoreError> {
        let (kind, tool) = self.detect()?;
        let anchor = self.anchor_path(kind);
        match fs::remove_file(&anchor) {
            Ok(()) => {
                run(&tool, kind.tool_args())?;
                Ok(Some(anchor))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(TrustStoreError::Io {
                action: "remove",
                path: anchor,
                source,
            }),
        }
    }

    /// Whether `ca` is the certificate installed as this store's anchor.
    pub fn is_installed(&self, ca: &LocalCa) -> bool {
        TrustStoreKind::ALL.iter().any(|&kind| {
            fs::read_to_string(self.anchor_path(kind)).is_ok_and(|pem| pem == ca.export_pem())
        })
    }

    fn find_tool(&self, name: &str) -> Option<PathBuf> {
        self.bin_dirs.iter().map(|dir| dir.join(name)).find(|path| {
            fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    }
}

fn run(tool: &Path, args: &[&str]) -> Result<(), TrustStoreError> {
    let command = std::iter::once(tool.as_os_str())
        .chain(args.iter().map(OsStr::new))
        .map(|s| s.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    // ETXTBSY: the tool is being replaced (a package upgrade), or, in tests,
    // was just written while another thread forked. Try again shortly.
    let mut attempts = 0;
    let output = loop {
        match Command::new(tool).args(args).output() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && attempts < 5 => {
                attempts += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            result => {
                break result.map_err(|source| TrustStoreError::Io {
                    action: "run",
                    path: tool.to_path_buf(),
                    source,
                })?
            }
        }
    };
    if output.status.success() {
        return Ok(());
    }
    Err(TrustStoreError::CommandFailed {
        command,
        status: output.status.to_string(),
        stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
    })
}

/// Where a CA bundle takes the system's roots from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SystemRoots {
    /// The first of [`SYSTEM_BUNDLES`] that exists, else [`SystemRoots::Native`].
    Auto,
    /// A PEM bundle file.
    PemFile(PathBuf),
    /// Whatever `rustls-native-certs` finds.
    Native,
}

/// What [`write_ca_bundle`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleWritten {
    pub path: PathBuf,
    /// System roots in the bundle (the Guard CA comes on top).
    pub system_certs: usize,
}

/// Writes `dest` (mode 0644, atomically replaced): the system roots from
/// `system`, then the Guard CA. A Guard CA already among the system roots
/// (installed earlier) is not repeated.
pub fn write_ca_bundle(
    ca: &LocalCa,
    system: &SystemRoots,
    dest: &Path,
) -> Result<BundleWritten, TrustStoreError> {
    let (roots, searched) = system_roots(system)?;
    let roots: Vec<_> = roots.into_iter().filter(|c| c != ca.cert_der()).collect();
    if roots.is_empty() {
        return Err(TrustStoreError::NoSystemRoots { searched });
    }
    let mut bundle = String::new();
    for cert in &roots {
        bundle.push_str(&pem::encode(&pem::Pem::new("CERTIFICATE", cert.to_vec())));
    }
    bundle.push_str(&format!("# {}\n", ca.subject()));
    bundle.push_str(ca.export_pem());
    if !bundle.ends_with('\n') {
        bundle.push('\n');
    }
    write_replace(dest, bundle.as_bytes(), 0o644)?;
    Ok(BundleWritten {
        path: dest.to_path_buf(),
        system_certs: roots.len(),
    })
}

/// The environment that points child processes at a bundle written by
/// [`write_ca_bundle`].
pub fn bundle_env(bundle: &Path) -> Vec<(&'static str, PathBuf)> {
    BUNDLE_ENV_VARS
        .iter()
        .map(|&var| (var, bundle.to_path_buf()))
        .collect()
}

fn system_roots(
    system: &SystemRoots,
) -> Result<(Vec<CertificateDer<'static>>, String), TrustStoreError> {
    match system {
        SystemRoots::Auto => match SYSTEM_BUNDLES.iter().map(Path::new).find(|p| p.is_file()) {
            Some(path) => system_roots(&SystemRoots::PemFile(path.to_path_buf())),
            None => system_roots(&SystemRoots::Native),
        },
        SystemRoots::PemFile(path) => {
            let pem = fs::read(path).map_err(|source| TrustStoreError::Io {
                action: "read",
                path: path.clone(),
                source,
            })?;
            let certs = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| TrustStoreError::BadSystemBundle {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            Ok((certs, path.display().to_string()))
        }
        SystemRoots::Native => {
            let native = rustls_native_certs::load_native_certs();
            for err in &native.errors {
                tracing::warn!(error = %err, "problem loading system root certificates");
            }
            Ok((native.certs, "the system certificate store".to_string()))
        }
    }
}

/// Writes `contents` to `path` with `mode` through a temporary file in the
/// same directory and a rename, so readers see the old file or the new one.
fn write_replace(path: &Path, contents: &[u8], mode: u32) -> Result<(), TrustStoreError> {
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let io_err = |action: &'static str, p: &Path| {
        let p = p.to_path_buf();
        move |source| TrustStoreError::Io {
            action,
            path: p,
            source,
        }
    };
    let _ = fs::remove_file(&tmp);
    let result = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .and_then(|mut file| {
            file.set_permissions(fs::Permissions::from_mode(mode))?;
            file.write_all(contents)?;
            file.sync_all()
        })
        .map_err(io_err("write", &tmp))
        .and_then(|()| fs::rename(&tmp, path).map_err(io_err("replace", path)));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn join_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::leaf::tests::test_ca;

    /// A fake update tool that logs its invocation next to itself.
    fn fake_tool(bin: &Path, name: &str, exit: i32) {
        fs::create_dir_all(bin).unwrap();
        let path = bin.join(name);
        let script = format!(
            "#!/bin/sh\necho \"{name} $*\" >> \"$(dirname \"$0\")/calls.log\"\n\
             [ {exit} -eq 0 ] || echo 'boom: no certs dir' >&2\nexit {exit}\n"
        );
        fs::write(&path, script).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn calls(bin: &Path) -> String {
        fs::read_to_string(bin.join("calls.log")).unwrap_or_default()
    }

    #[test]
    fn debian_install_and_uninstall_write_the_anchor_and_run_the_tool() {
        let (_ca_dir, ca) = test_ca();
        let root = tempfile::tempdir().unwrap();
        let bin = root.path().join("fakebin");
        fake_tool(&bin, "update-ca-certificates", 0);
        let store = TrustStore::at(root.path(), vec![bin.clone()]);

        let installed = store.install(&ca).unwrap();
        assert_eq!(installed.kind, TrustStoreKind::Debian);
        assert_eq!(
            installed.anchor,
            root.path()
                .join("usr/local/share/ca-certificates/guard-local-ca.crt")
        );
        assert_eq!(
            fs::read_to_string(&installed.anchor).unwrap(),
            ca.export_pem()
        );
        let mode = fs::metadata(&installed.anchor)
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o644);
        assert!(store.is_installed(&ca));
        assert_eq!(calls(&bin), "update-ca-certificates \n");

        assert_eq!(store.uninstall().unwrap(), Some(installed.anchor.clone()));
        assert!(!installed.anchor.exists());
        assert!(!store.is_installed(&ca));
        assert_eq!(calls(&bin).lines().count(), 2);
        // Nothing to remove: no tool run.
        assert_eq!(store.uninstall().unwrap(), None);
        assert_eq!(calls(&bin).lines().count(), 2);
    }

    #[test]
    fn fedora_install_uses_the_anchors_directory_and_update_ca_trust() {
        let (_ca_dir, ca) = test_ca();
        let root = tempfile::tempdir().unwrap();
        let bin = root.path().join("fakebin");
        fake_tool(&bin, "update-ca-trust", 0);
        let store = TrustStore::at(root.path(), vec![bin.clone()]);

        let installed = store.install(&ca).unwrap();
        assert_eq!(installed.kind, TrustStoreKind::Fedora);
        assert_eq!(
            installed.anchor,
            root.path()
                .join("etc/pki/ca-trust/source/anchors/guard-local-ca.crt")
        );
        assert_eq!(calls(&bin), "update-ca-trust extract\n");
    }

    #[test]
    fn a_host_without_either_tool_gets_a_clear_error() {
        let (_ca_dir, ca) = test_ca();
        let root = tempfile::tempdir().unwrap();
        let store = TrustStore::at(root.path(), vec![root.path().join("empty-bin")]);
        let err = store.install(&ca).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, TrustStoreError::NoTool { .. }), "{msg}");
        assert!(msg.contains("update-ca-certificates"), "{msg}");
        assert!(msg.contains("update-ca-trust"), "{msg}");
    }

    #[test]
    fn a_failing_tool_reports_its_stderr() {
        let (_ca_dir, ca) = test_ca();
        let root = tempfile::tempdir().unwrap();
        let bin = root.path().join("fakebin");
        fake_tool(&bin, "update-ca-certificates", 3);
        let err = TrustStore::at(root.path(), vec![bin])
            .install(&ca)
            .unwrap_err();
        assert!(
            matches!(&err, TrustStoreError::CommandFailed { stderr, .. } if stderr == "boom: no certs dir"),
            "{err}"
        );
    }

    #[test]
    fn the_bundle_holds_the_system_roots_then_the_guard_ca() {
        let (_ca_dir, ca) = test_ca();
        let (_other_dir, other) = test_ca();
        let dir = tempfile::tempdir().unwrap();
        let system = dir.path().join("system.pem");
        // A system bundle that already holds the Guard CA (installed earlier).
        fs::write(
            &system,
            format!("{}{}", other.export_pem(), ca.export_pem()),
        )
        .unwrap();
        let dest = dir.path().join("bundle.pem");

        let written = write_ca_bundle(&ca, &SystemRoots::PemFile(system), &dest).unwrap();
        assert_eq!(written.system_certs, 1);
        let certs: Vec<_> = CertificateDer::pem_file_iter(&dest)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(certs, vec![other.cert_der().clone(), ca.cert_der().clone()]);
        let mode = fs::metadata(&dest).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        assert!(!fs::read_to_string(&dest).unwrap().contains("PRIVATE"));

        let env = bundle_env(&dest);
        assert!(env.contains(&("SSL_CERT_FILE", dest.clone())));
    }

    #[test]
    fn a_bundle_without_system_roots_is_refused() {
        let (_ca_dir, ca) = test_ca();
        let dir = tempfile::tempdir().unwrap();
        let system = dir.path().join("empty.pem");
        fs::write(&system, "").unwrap();
        let dest = dir.path().join("bundle.pem");
        let err = write_ca_bundle(&ca, &SystemRoots::PemFile(system), &dest).unwrap_err();
        assert!(
            matches!(err, TrustStoreError::NoSystemRoots { .. }),
            "{err}"
        );
        assert!(!dest.exists());
    }
}
