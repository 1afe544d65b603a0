//! `guard-agent install | uninstall`: make Guard a systemd service, and take
//! it away again.
//!
//! Install, in order: the binary (copied to `/usr/local/sbin` unless it
//! already lives in a system bin directory), `/etc/guard/agent.ron` (the
//! default below, or `--config FILE` after validating it),
//! `/etc/guard/policies/` (the repository's `policies/`, built in), the unit
//! ([`unit::unit_file`]), the `guard` group, the local CA (created in the
//! state directory) in the system trust store, then `systemctl enable --now`.
//! Existing configuration and policy files are kept, never overwritten.
//!
//! Uninstall reverses every step; configuration and policy files are removed
//! only while they are unchanged (or with `--purge`), and the state directory
//! (event store, CA) is kept unless `--purge`.
//!
//! `--root DIR` installs below DIR (like DESTDIR) for packaging and tests:
//! the steps that act on the running host (group, trust store, systemctl)
//! are skipped there, and the output says so. Without systemd
//! (`/run/systemd/system` missing) nothing is changed: the command says so
//! and prints the unit. Tools are run from fixed paths, never through PATH.

pub mod unit;

use std::{
    fs,
    io::{self, Write},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use crate::{
    config::{AgentConfig, ConfigFile, ConfigFlags, DEFAULT_STATE_DIR},
    tls::{ca::LocalCa, trust_store::TrustStore},
};

pub use unit::{unit_file, UnitParams, UNIT_NAME};

/// Where the unit, the configuration and the policies go (below the root).
pub const UNIT_DIR: &str = "etc/systemd/system";
pub const CONFIG_DIR: &str = "etc/guard";
pub const CONFIG_FILE: &str = "/etc/guard/agent.ron";
pub const POLICY_DIR: &str = "/etc/guard/policies";
/// Where `install` copies a binary that does not live in a system directory.
pub const INSTALLED_BINARY: &str = "/usr/local/sbin/guard-agent";
/// Directories a binary may already be installed in (by a package).
const SYSTEM_BIN_DIRS: &[&str] = &["/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin"];
/// The admin group.
pub const GROUP: &str = "guard";

/// The configuration written when `--config` is not given.
pub const DEFAULT_CONFIG: &str = r#"// Guard agent configuration (written by `guard-agent install`).
// Every field is also a flag of `guard-agent run`; see README.md.
(
    state_dir: "/var/lib/guard",
    // Who is monitored: every interactive login. Other scopes:
    //   units: ["ci-runner.service"]   a service and all its children
    //   users: ["alice"]               only these users
    //   host: true                     every process on the host
    scope: (interactive: true),
    policy_dir: "/etc/guard/policies",
    retention: (max_age: "30d", max_bytes: 1073741824),
    // Prometheus metrics on loopback (off unless set):
    // metrics: "127.0.0.1:9115",
)
"#;

/// The policy files installed into `/etc/guard/policies/` (relative name,
/// text). Only files directly in the directory are loaded; the examples
/// sit in `examples/` until an operator copies one up.
pub const POLICY_FILES: &[(&str, &str)] = &[
    ("default.ron", include_str!("../../../policies/default.ron")),
    ("README.md", include_str!("../../../policies/README.md")),
    (
        "examples/ci-strict-allowlist.ron",
        include_str!("../../../policies/examples/ci-strict-allowlist.ron"),
    ),
    (
        "examples/dev-box.ron",
        include_str!("../../../policies/examples/dev-box.ron"),
    ),
    (
        "examples/llm-apis.ron",
        include_str!("../../../policies/examples/llm-apis.ron"),
    ),
];

/// What `install` and `uninstall` act on.
#[derive(Debug, Clone)]
pub struct Target {
    /// Prefix for every path (`/` on a real host).
    pub root: PathBuf,
    /// Print what would be done; change nothing.
    pub dry_run: bool,
    /// Whether systemd runs this host (`/run/systemd/system` exists).
    pub systemd: bool,
}

impl Target {
    /// Whether this acts on the running host (not a `--root` tree).
    pub fn is_host(&self) -> bool {
        self.root == Path::new("/")
    }

    /// `path` (absolute, as on the host) below the root.
    pub fn path(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }
}

/// Whether systemd is the init system here (what `sd_booted()` checks).
pub fn systemd_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// Install options besides the target.
#[derive(Debug, Clone)]
pub struct InstallOptions {
    /// Configuration file to install instead of [`DEFAULT_CONFIG`].
    pub config: Option<PathBuf>,
    /// The binary to install (normally the running one).
    pub binary: PathBuf,
}

/// Where the unit will find the binary: in place when it already lives in a
/// system bin directory, else [`INSTALLED_BINARY`].
pub fn installed_binary_path(binary: &Path) -> PathBuf {
    if SYSTEM_BIN_DIRS
        .iter()
        .any(|d| binary.parent() == Some(Path::new(d)))
    {
        binary.to_path_buf()
    } else {
        PathBuf::from(INSTALLED_BINARY)
    }
}

/// The unit text for a binary at `binary` (as seen on the host).
pub fn unit_for(binary: &Path) -> String {
    unit_file(&UnitParams {
        binary,
        config: Path::new(CONFIG_FILE),
    })
}

/// Validates configuration text the way `guard-agent run --config` will.
fn validate_config(origin: &Path, text: &str) -> anyhow::Result<AgentConfig> {
    let file = ConfigFile::parse(origin, text)?;
    Ok(AgentConfig::build(
        Some((origin, file)),
        ConfigFlags::default(),
    )?)
}

/// Prints one line of the plan/progress.
struct Log<'a, W: Write> {
    out: &'a mut W,
    dry_run: bool,
}

impl<W: Write> Log<'_, W> {
    fn did(&mut self, what: impl AsRef<str>) -> io::Result<()> {
        let prefix = if self.dry_run { "would " } else { "" };
        writeln!(self.out, "  {prefix}{}", what.as_ref())
    }
    fn skip(&mut self, what: impl AsRef<str>) -> io::Result<()> {
        writeln!(self.out, "  skipped: {}", what.as_ref())
    }
}

/// Writes `contents` at `path` with `mode` unless a file is already there.
/// Returns whether it wrote.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> io::Result<bool> {
    if path.exists() {
        return Ok(false);
    }
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(path, contents)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(true)
}

fn write_replace(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("guard-new");
    fs::write(&tmp, contents)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
    fs::rename(&tmp, path)
}

/// Runs a tool by absolute path; an error names the command and its stderr.
fn run_tool(tool: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(tool)
        .args(args)
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run {tool}: {e}"))?;
    if !out.status.success() {
        anyhow::bail!(
            "`{tool} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The first of `candidates` that exists.
fn tool(candidates: &[&'static str]) -> Option<&'static str> {
    candidates.iter().copied().find(|p| Path::new(p).is_file())
}

fn group_exists(name: &str) -> bool {
    matches!(nix::unistd::Group::from_name(name), Ok(Some(_)))
}

/// Installs Guard under `t.root`; prints each step to `out`.
pub fn install(t: &Target, opts: &InstallOptions, out: &mut impl Write) -> anyhow::Result<()> {
    let config_text = match &opts.config {
        Some(p) => fs::read_to_string(p)
            .map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", p.display()))?,
        None => DEFAULT_CONFIG.to_owned(),
    };
    let origin = opts
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from("default configuration"));
    let cfg = validate_config(&origin, &config_text)?;
    let bin = installed_binary_path(&opts.binary);
    let unit = unit_for(&bin);

    if t.is_host() && !t.systemd {
        // Comment lines, so that the whole output is still a valid unit file.
        writeln!(
            out,
            "# systemd is not running on this host (/run/systemd/system is missing, e.g. a\n\
             # container): nothing was installed. Run the agent under your own supervisor\n\
             # as the unit below would:\n\
             #   {} run --config {CONFIG_FILE}\n#",
            bin.display()
        )?;
        write!(out, "{unit}")?;
        return Ok(());
    }
    let mut log = Log {
        out,
        dry_run: t.dry_run,
    };
    writeln!(log.out, "installing Guard below {}", t.root.display())?;

    // 1. The binary.
    let bin_dest = t.path(&bin.to_string_lossy());
    if bin_dest != opts.binary {
        log.did(format!(
            "copy {} to {}",
            opts.binary.display(),
            bin_dest.display()
        ))?;
        if !t.dry_run {
            let bytes = fs::read(&opts.binary)?;
            write_replace(&bin_dest, &bytes, 0o755)?;
        }
    } else {
        log.did(format!("use the binary in place: {}", bin.display()))?;
    }

    // 2. Configuration and policies (kept when present).
    let mut written: Vec<(String, Vec<u8>)> = Vec::new();
    let files = std::iter::once((CONFIG_FILE.to_owned(), config_text.as_str())).chain(
        POLICY_FILES
            .iter()
            .map(|(name, text)| (format!("{POLICY_DIR}/{name}"), *text)),
    );
    for (host_path, text) in files {
        let p = t.path(&host_path);
        if p.exists() {
            log.skip(format!("{} exists and is kept", p.display()))?;
            continue;
        }
        log.did(format!("write {} (0644)", p.display()))?;
        if !t.dry_run {
            write_new(&p, text.as_bytes(), 0o644)?;
            written.push((host_path, text.as_bytes().to_vec()));
        }
    }
    if !t.dry_run {
        record_in_manifest(t, &written)?;
    }

    // 3. The unit.
    let unit_path = t.path(UNIT_DIR).join(UNIT_NAME);
    log.did(format!("write {} (0644)", unit_path.display()))?;
    if !t.dry_run {
        write_replace(&unit_path, unit.as_bytes(), 0o644)?;
    }

    // 4. Host steps.
    if !t.is_host() {
        log.skip(format!(
            "--root {}: creating the `{GROUP}` group, installing the CA into the system trust store \
             and `systemctl enable --now {UNIT_NAME}` act on the running host",
            t.root.display()
        ))?;
        return Ok(());
    }
    if group_exists(GROUP) {
        log.skip(format!("group `{GROUP}` exists"))?;
    } else {
        log.did(format!("create the system group `{GROUP}`"))?;
        if !t.dry_run {
            let groupadd = tool(&["/usr/sbin/groupadd", "/sbin/groupadd"]).ok_or_else(|| {
                anyhow::anyhow!(
                    "groupadd not found in /usr/sbin or /sbin: create the `{GROUP}` group by hand"
                )
            })?;
            run_tool(groupadd, &["--system", GROUP])?;
        }
    }
    let ca_dir = cfg.state_dir.join("ca");
    log.did(format!(
        "create the local CA in {} if missing and add it to the system trust store",
        ca_dir.display()
    ))?;
    if !t.dry_run {
        fs::create_dir_all(&cfg.state_dir)?;
        fs::set_permissions(&cfg.state_dir, fs::Permissions::from_mode(0o750))?;
        let ca = LocalCa::load_or_create(&ca_dir)?;
        let done = TrustStore::system().install(&ca)?;
        writeln!(log.out, "    trusted: {}", done.anchor.display())?;
    }
    if cfg.state_dir != Path::new(DEFAULT_STATE_DIR) {
        writeln!(
            log.out,
            "  note: state_dir {} is not {DEFAULT_STATE_DIR}: the unit's ProtectSystem=strict \
             makes it read-only; add it with `systemctl edit guard-agent` (ReadWritePaths=)",
            cfg.state_dir.display()
        )?;
    }
    let systemctl = tool(&["/usr/bin/systemctl", "/bin/systemctl"]);
    log.did(format!(
        "systemctl daemon-reload; systemctl enable --now {UNIT_NAME}"
    ))?;
    if !t.dry_run {
        let systemctl =
            systemctl.ok_or_else(|| anyhow::anyhow!("systemctl not found in /usr/bin or /bin"))?;
        run_tool(systemctl, &["daemon-reload"])?;
        run_tool(systemctl, &["enable", "--now", UNIT_NAME])?;
    }
    if t.dry_run {
        writeln!(log.out, "\nthe unit:\n{unit}")?;
    }
    Ok(())
}

/// Where install records the SHA-256 of each configuration and policy file
/// it wrote (`sha256sum` format), so uninstall removes only unchanged ones.
pub const MANIFEST: &str = "/etc/guard/install-manifest";

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The manifest's entries: host path → SHA-256.
fn read_manifest(t: &Target) -> std::collections::BTreeMap<String, String> {
    fs::read_to_string(t.path(MANIFEST))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (sum, path) = l.split_once("  ")?;
            Some((path.to_owned(), sum.to_owned()))
        })
        .collect()
}

/// Adds `written` (host path, contents) to the manifest.
fn record_in_manifest(t: &Target, written: &[(String, Vec<u8>)]) -> io::Result<()> {
    let mut m = read_manifest(t);
    for (path, bytes) in written {
        m.insert(path.clone(), sha256_hex(bytes));
    }
    let text: String = m
        .iter()
        .map(|(path, sum)| format!("{sum}  {path}\n"))
        .collect();
    write_replace(&t.path(MANIFEST), text.as_bytes(), 0o644)
}

/// Removes a file we installed if it still holds what we wrote (by the
/// manifest, else the built-in `ours`), or when `purge`; says what it did.
fn remove_ours(
    log: &mut Log<'_, impl Write>,
    path: &Path,
    expected_sha256: &str,
    purge: bool,
) -> anyhow::Result<()> {
    match fs::read(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Ok(bytes) if sha256_hex(&bytes) != expected_sha256 && !purge => {
            log.skip(format!(
                "{} was changed since install and is kept (--purge removes it)",
                path.display()
            ))?;
            Ok(())
        }
        _ => {
            log.did(format!("remove {}", path.display()))?;
            if !log.dry_run {
                fs::remove_file(path)?;
            }
            Ok(())
        }
    }
}

/// Removes a directory if it is empty (or, with `purge`, with everything in it).
fn remove_dir(log: &mut Log<'_, impl Write>, dir: &Path, purge: bool) -> anyhow::Result<()> {
    if !dir.is_dir() {
        return Ok(());
    }
    let empty = fs::read_dir(dir)?.next().is_none();
    if purge {
        log.did(format!("remove {} and everything in it", dir.display()))?;
        if !log.dry_run {
            fs::remove_dir_all(dir)?;
        }
    } else if empty {
        log.did(format!("remove {}", dir.display()))?;
        if !log.dry_run {
            fs::remove_dir(dir)?;
        }
    }
    Ok(())
}

/// Reverses [`install`]. Keeps the state directory unless `purge`.
pub fn uninstall(t: &Target, purge: bool, out: &mut impl Write) -> anyhow::Result<()> {
    if t.is_host() && !t.systemd {
        writeln!(
            out,
            "systemd is not running on this host (/run/systemd/system is missing): there is no \
             unit to stop; removing the files `install` would have written"
        )?;
    }
    let mut log = Log {
        out,
        dry_run: t.dry_run,
    };
    writeln!(log.out, "uninstalling Guard below {}", t.root.display())?;
    // The state directory, from the installed configuration when readable.
    let conf = t.path(CONFIG_FILE);
    let state_dir = fs::read_to_string(&conf)
        .ok()
        .and_then(|text| validate_config(&conf, &text).ok())
        .map(|c| c.state_dir)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    let unit_path = t.path(UNIT_DIR).join(UNIT_NAME);

    if t.is_host() && t.systemd {
        log.did(format!("systemctl disable --now {UNIT_NAME}"))?;
        if !t.dry_run {
            if let Some(systemctl) = tool(&["/usr/bin/systemctl", "/bin/systemctl"]) {
                if unit_path.exists() {
                    run_tool(systemctl, &["disable", "--now", UNIT_NAME])?;
                }
            }
        }
    } else if !t.is_host() {
        log.skip(format!(
            "--root {}: stopping the unit, removing the CA from the system trust store and the \
             `{GROUP}` group act on the running host",
            t.root.display()
        ))?;
    }
    if t.is_host() {
        // The stopped unit left its programs attached (fail closed).
        log.did(format!(
            "detach the kernel programs the stopped agent of {} left attached",
            state_dir.display()
        ))?;
        if !t.dry_run && crate::handover::running_agent(&state_dir).is_none() {
            crate::bpf::pins::release_instance(&state_dir)?;
        }
    }
    if unit_path.exists() {
        log.did(format!("remove {}", unit_path.display()))?;
        if !t.dry_run {
            fs::remove_file(&unit_path)?;
        }
    }
    if t.is_host() && t.systemd && !t.dry_run {
        if let Some(systemctl) = tool(&["/usr/bin/systemctl", "/bin/systemctl"]) {
            run_tool(systemctl, &["daemon-reload"])?;
        }
    }

    let manifest = read_manifest(t);
    let expected = |host_path: &str, built_in: &str| {
        manifest
            .get(host_path)
            .cloned()
            .unwrap_or_else(|| sha256_hex(built_in.as_bytes()))
    };
    for (name, text) in POLICY_FILES {
        let host_path = format!("{POLICY_DIR}/{name}");
        let sum = expected(&host_path, text);
        remove_ours(&mut log, &t.path(&host_path), &sum, purge)?;
    }
    remove_dir(&mut log, &t.path(POLICY_DIR).join("examples"), purge)?;
    remove_dir(&mut log, &t.path(POLICY_DIR), purge)?;
    remove_ours(
        &mut log,
        &conf,
        &expected(CONFIG_FILE, DEFAULT_CONFIG),
        purge,
    )?;
    let manifest_path = t.path(MANIFEST);
    if manifest_path.exists() {
        log.did(format!("remove {}", manifest_path.display()))?;
        if !t.dry_run {
            fs::remove_file(&manifest_path)?;
        }
    }
    remove_dir(&mut log, &t.path(CONFIG_DIR), purge)?;

    let bin = t.path(INSTALLED_BINARY);
    if bin.exists() {
        log.did(format!("remove {}", bin.display()))?;
        if !t.dry_run {
            fs::remove_file(&bin)?;
        }
    }

    if t.is_host() {
        log.did("remove the Guard CA from the system trust store")?;
        if !t.dry_run {
            match TrustStore::system().uninstall() {
                Ok(Some(p)) => writeln!(log.out, "    removed {}", p.display())?,
                Ok(None) => writeln!(log.out, "    it was not installed")?,
                Err(e) => writeln!(log.out, "    could not: {e}")?,
            }
        }
        if group_exists(GROUP) {
            log.did(format!("delete the group `{GROUP}`"))?;
            if !t.dry_run {
                if let Some(groupdel) = tool(&["/usr/sbin/groupdel", "/sbin/groupdel"]) {
                    run_tool(groupdel, &[GROUP])?;
                }
            }
        }
    }

    let state = t.path(&state_dir.to_string_lossy());
    if purge {
        remove_dir(&mut log, &state, true)?;
    } else if state.exists() {
        log.skip(format!(
            "{} (event store, CA) is kept; `uninstall --purge` removes it",
            state.display()
        ))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn target(root: &Path) -> Target {
        Target {
            root: root.to_path_buf(),
            dry_run: false,
            systemd: false,
        }
    }

    fn fake_binary(dir: &Path) -> PathBuf {
        let b = dir.join("build/guard-agent");
        fs::create_dir_all(b.parent().unwrap()).unwrap();
        fs::write(&b, b"\x7fELF fake").unwrap();
        b
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .permissions()
            .mode()
            & 0o7777
    }

    #[test]
    fn the_default_config_and_policies_are_valid() {
        validate_config(Path::new("default"), DEFAULT_CONFIG).unwrap();
        let sources: Vec<(&str, &str)> = POLICY_FILES
            .iter()
            .filter(|(n, _)| n.ends_with(".ron") && !n.contains('/'))
            .copied()
            .collect();
        crate::policy::load_sources(&sources).unwrap();
        // Each example is valid on its own (operators copy one up).
        for (name, text) in POLICY_FILES {
            if name.starts_with("examples/") {
                crate::policy::load_sources(&[(name, text)])
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
            }
        }
    }

    #[test]
    fn the_ci_example_is_a_strict_allowlist() {
        use crate::policy::{RequestFacts, Verdict};
        let (name, text) = POLICY_FILES
            .iter()
            .find(|(n, _)| *n == "examples/ci-strict-allowlist.ron")
            .unwrap();
        let p = crate::policy::load_sources(&[(name, text)]).unwrap();
        let facts = |host: &str| RequestFacts {
            dest_host: Some(host.into()),
            dest_ip: Some("192.0.2.10".parse().unwrap()),
            dest_port: Some(443),
            method: Some("GET".into()),
            ..Default::default()
        };
        assert!(matches!(
            p.decide(&facts("registry.npmjs.org")).action,
            Verdict::Allow
        ));
        assert!(matches!(
            p.decide(&facts("paste.example")).action,
            Verdict::Block { .. }
        ));
    }

    #[test]
    fn install_into_a_root_writes_every_file_with_its_mode_and_uninstall_removes_them() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let bin = fake_binary(tmp.path());
        let t = target(&root);
        let mut out = Vec::new();
        install(
            &t,
            &InstallOptions {
                config: None,
                binary: bin.clone(),
            },
            &mut out,
        )
        .unwrap();
        let out = String::from_utf8(out).unwrap();
        assert!(out.contains("skipped: --root"), "{out}");
        assert!(out.contains("group"), "{out}");

        let unit = root.join("etc/systemd/system/guard-agent.service");
        assert_eq!(mode(&unit), 0o644);
        assert_eq!(
            fs::read_to_string(&unit).unwrap(),
            unit_for(Path::new(INSTALLED_BINARY))
        );
        let b = root.join("usr/local/sbin/guard-agent");
        assert_eq!(mode(&b), 0o755);
        assert_eq!(fs::read(&b).unwrap(), b"\x7fELF fake");
        let conf = root.join("etc/guard/agent.ron");
        assert_eq!(mode(&conf), 0o644);
        assert_eq!(fs::read_to_string(&conf).unwrap(), DEFAULT_CONFIG);
        for (name, text) in POLICY_FILES {
            let p = root.join("etc/guard/policies").join(name);
            assert_eq!(mode(&p), 0o644, "{name}");
            assert_eq!(&fs::read_to_string(&p).unwrap(), text);
        }

        // An edited policy survives a plain uninstall, not a purge.
        let edited = root.join("etc/guard/policies/default.ron");
        fs::write(&edited, "// mine\n").unwrap();
        let mut out = Vec::new();
        uninstall(&t, false, &mut out).unwrap();
        let out = String::from_utf8(out).unwrap();
        assert!(
            out.contains("was changed since install and is kept"),
            "{out}"
        );
        assert!(!unit.exists() && !b.exists() && !conf.exists());
        assert!(edited.exists());
        assert!(!root.join("etc/guard/policies/examples").exists());
        let mut out = Vec::new();
        uninstall(&t, true, &mut out).unwrap();
        assert!(!root.join("etc/guard").exists());
    }

    #[test]
    fn uninstall_keeps_the_store_unless_purge() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let t = target(&root);
        let bin = fake_binary(tmp.path());
        let opts = InstallOptions {
            config: None,
            binary: bin,
        };
        install(&t, &opts, &mut Vec::new()).unwrap();
        let store = root.join("var/lib/guard/events.sled");
        fs::create_dir_all(&store).unwrap();
        let mut out = Vec::new();
        uninstall(&t, false, &mut out).unwrap();
        assert!(store.exists());
        assert!(String::from_utf8(out).unwrap().contains("is kept"));
        uninstall(&t, true, &mut Vec::new()).unwrap();
        assert!(!root.join("var/lib/guard").exists());
    }

    #[test]
    fn a_given_config_is_validated_and_installed_and_existing_files_are_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let t = target(&root);
        let bad = tmp.path().join("bad.ron");
        fs::write(&bad, "(cgroups: [\"relative\"])").unwrap();
        let e = install(
            &t,
            &InstallOptions {
                config: Some(bad.clone()),
                binary: fake_binary(tmp.path()),
            },
            &mut Vec::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("bad.ron") && e.contains("absolute"), "{e}");
        assert!(!root.exists(), "nothing is written for a bad config");

        let good = tmp.path().join("good.ron");
        fs::write(&good, "(scope: (units: [\"ci-runner.service\"]))").unwrap();
        let opts = InstallOptions {
            config: Some(good.clone()),
            binary: fake_binary(tmp.path()),
        };
        install(&t, &opts, &mut Vec::new()).unwrap();
        let conf = root.join("etc/guard/agent.ron");
        assert_eq!(
            fs::read_to_string(&conf).unwrap(),
            fs::read_to_string(&good).unwrap()
        );
        fs::write(&conf, "(scope: (host: true))").unwrap();
        let mut out = Vec::new();
        install(&t, &opts, &mut out).unwrap();
        assert!(String::from_utf8(out)
            .unwrap()
            .contains("exists and is kept"));
        assert_eq!(fs::read_to_string(&conf).unwrap(), "(scope: (host: true))");
    }

    #[test]
    fn without_systemd_the_host_is_left_alone_and_the_unit_printed() {
        let tmp = tempfile::tempdir().unwrap();
        let t = Target {
            root: PathBuf::from("/"),
            dry_run: false,
            systemd: false,
        };
        let mut out = Vec::new();
        install(
            &t,
            &InstallOptions {
                config: None,
                binary: fake_binary(tmp.path()),
            },
            &mut out,
        )
        .unwrap();
        let out = String::from_utf8(out).unwrap();
        assert!(out.starts_with("# systemd is not running"), "{out}");
        assert!(out.contains("nothing was installed"), "{out}");
        // The whole output is the unit, the explanation as comments.
        let unit = unit_for(Path::new(INSTALLED_BINARY));
        assert!(out.ends_with(&unit), "{out}");
        assert!(out[..out.len() - unit.len()]
            .lines()
            .all(|l| l.starts_with('#')));
    }

    #[test]
    fn dry_run_changes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let t = Target {
            dry_run: true,
            ..target(&root)
        };
        let mut out = Vec::new();
        install(
            &t,
            &InstallOptions {
                config: None,
                binary: fake_binary(tmp.path()),
            },
            &mut out,
        )
        .unwrap();
        assert!(!root.exists());
        assert!(String::from_utf8(out).unwrap().contains("would write"));
    }

    #[test]
    fn a_packaged_binary_is_used_in_place() {
        assert_eq!(
            installed_binary_path(Path::new("/usr/bin/guard-agent")),
            Path::new("/usr/bin/guard-agent")
        );
        assert_eq!(
            installed_binary_path(Path::new("/home/me/target/release/guard-agent")),
            Path::new(INSTALLED_BINARY)
        );
    }
}
