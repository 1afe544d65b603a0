//! Scopes an operator can name, resolved once at start-up into the cgroup
//! directories the kernel programs attach to and the uid filter.
//!
//! | scope | config / flag | resolves to |
//! |---|---|---|
//! | all interactive users | `scope: (interactive: true)`, `--scope-interactive` | `<cgroup2>/user.slice` |
//! | named users | `scope: (users: ["alice"])`, `--user-name alice` | their uids, added to the uid filter; alone, with `user.slice` (their sessions) |
//! | systemd units and slices | `scope: (units: ["ci-runner.service"])`, `--unit NAME` | the unit's cgroup, found by walking the cgroup2 mount |
//! | a CI runner and its children | the runner's unit, as above | children live below the unit's cgroup and inherit |
//! | the whole host | `scope: (host: true)`, `--scope-host` | the cgroup2 root |
//! | `guard-agent exec` | `exec_cgroup` | attached by the daemon as before |
//!
//! Inheritance: programs attached to a cgroup run for every process in it
//! and in every cgroup created below it later (a job's transient scopes, a
//! runner's children, containers placed below the runner's slice). Not
//! covered: a process that root moves out of the attached subtree, and
//! sockets created before their process entered it. Named users narrow the
//! uid filter, which applies to every attached cgroup.
//!
//! Resolution only reads the cgroup hierarchy and the user database; it
//! never creates, moves or attaches anything, and the cgroup2 mount is a
//! parameter so tests resolve against a fake tree, never the real root.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Scopes as written in the config file (`scope: (...)`) or given as flags.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScopeConfig {
    /// Every interactive login: `user.slice`.
    pub interactive: bool,
    /// User names whose processes are monitored (narrows the uid filter).
    pub users: Vec<String>,
    /// systemd units or slices (`ci-runner.service`, `machine.slice`); a
    /// name without a known suffix means `NAME.service`; `*` matches any
    /// characters (`actions.runner.*.service`), among units running at start.
    pub units: Vec<String>,
    /// The whole host: the cgroup2 root (every process, every container).
    pub host: bool,
}

impl ScopeConfig {
    /// Whether any scope is named.
    pub fn is_empty(&self) -> bool {
        !self.interactive && !self.host && self.users.is_empty() && self.units.is_empty()
    }

    /// Flags and file combined: flags add to what the file names.
    pub fn merged(mut self, flags: ScopeConfig) -> Self {
        self.interactive |= flags.interactive;
        self.host |= flags.host;
        for u in flags.users {
            if !self.users.contains(&u) {
                self.users.push(u);
            }
        }
        for u in flags.units {
            if !self.units.contains(&u) {
                self.units.push(u);
            }
        }
        self
    }
}

/// A scope that names something that does not exist.
#[derive(Debug, thiserror::Error)]
pub enum ScopeError {
    #[error(
        "scope `interactive`: {path} does not exist (no user.slice: is this host run by systemd?)"
    )]
    NoUserSlice { path: PathBuf },
    #[error("scope `users`: no user named `{0}` on this host (see getent passwd)")]
    UnknownUser(String),
    #[error("scope `units`: `{unit}` has no cgroup below {mount} (is it running? `systemctl status {unit}`; a unit that is not running has no cgroup)")]
    UnknownUnit { unit: String, mount: PathBuf },
    #[error("scope `units`: `{0}` is not a unit name (expected e.g. ci-runner.service or machine.slice)")]
    BadUnitName(String),
    #[error("cannot read the cgroup hierarchy at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What a [`ScopeConfig`] resolved to.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ResolvedScope {
    /// cgroup directories to attach to, outermost first, none below another.
    pub cgroups: Vec<PathBuf>,
    /// uids to add to the uid filter.
    pub uids: Vec<u32>,
}

/// Unit suffixes systemd gives cgroups.
const UNIT_SUFFIXES: &[&str] = &[".service", ".slice", ".scope"];

/// The name as systemd spells the unit (`NAME` alone means `NAME.service`).
pub fn unit_name(name: &str) -> Result<String, ScopeError> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(ScopeError::BadUnitName(name.to_owned()));
    }
    if UNIT_SUFFIXES.iter().any(|s| name.ends_with(s)) {
        Ok(name.to_owned())
    } else {
        Ok(format!("{name}.service"))
    }
}

/// Finds every directory named `unit` (a glob when it holds `*`) below
/// `mount`, not following symlinks. Several units of one name can exist (a
/// system service and a user service); all of them are returned.
pub fn find_unit_cgroups(mount: &Path, unit: &str) -> Result<Vec<PathBuf>, ScopeError> {
    let glob = globset::GlobBuilder::new(unit)
        .literal_separator(true)
        .build()
        .map_err(|_| ScopeError::BadUnitName(unit.to_owned()))?
        .compile_matcher();
    let mut found = Vec::new();
    let mut stack = vec![mount.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            // A cgroup removed while walking is not an error.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && dir != mount => continue,
            Err(source) => return Err(ScopeError::Io { path: dir, source }),
        };
        for e in entries.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if !ft.is_dir() {
                continue;
            }
            let p = e.path();
            if e.file_name().to_str().is_some_and(|n| glob.is_match(n)) {
                found.push(p);
            } else {
                stack.push(p);
            }
        }
    }
    found.sort();
    Ok(found)
}

/// A user's uid, from the user database.
fn uid_of(name: &str) -> Result<u32, ScopeError> {
    match nix::unistd::User::from_name(name) {
        Ok(Some(u)) => Ok(u.uid.as_raw()),
        _ => Err(ScopeError::UnknownUser(name.to_owned())),
    }
}

/// Resolves named scopes against the cgroup2 hierarchy mounted at `mount`.
/// `other_cgroups`: whether cgroups are also given by path; named users
/// with nothing else to narrow mean those users' login sessions
/// (`user.slice`).
pub fn resolve(
    mount: &Path,
    scope: &ScopeConfig,
    other_cgroups: bool,
) -> Result<ResolvedScope, ScopeError> {
    let mut cgroups = Vec::new();
    if scope.host {
        cgroups.push(mount.to_path_buf());
    }
    let users_alone =
        !scope.users.is_empty() && !scope.host && scope.units.is_empty() && !other_cgroups;
    if scope.interactive || users_alone {
        let p = mount.join("user.slice");
        if !p.is_dir() {
            return Err(ScopeError::NoUserSlice { path: p });
        }
        cgroups.push(p);
    }
    for name in &scope.units {
        let unit = unit_name(name)?;
        let found = find_unit_cgroups(mount, &unit)?;
        if found.is_empty() {
            return Err(ScopeError::UnknownUnit {
                unit,
                mount: mount.to_path_buf(),
            });
        }
        cgroups.extend(found);
    }
    let uids = scope
        .users
        .iter()
        .map(|u| uid_of(u))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ResolvedScope {
        cgroups: outermost(cgroups),
        uids,
    })
}

/// Drops duplicates and every path that lies below another one: attaching
/// to both would run the programs twice for the inner cgroup.
pub fn outermost(mut paths: Vec<PathBuf>) -> Vec<PathBuf> {
    paths.sort();
    paths.dedup();
    let all = paths.clone();
    paths.retain(|p| !all.iter().any(|q| q != p && p.starts_with(q)));
    paths
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake cgroup2 tree shaped like a systemd host's.
    fn fake_tree() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        for d in [
            "user.slice/user-1000.slice/session-3.scope",
            "user.slice/user-1000.slice/user@1000.service/app.slice/ci-runner.service",
            "system.slice/ci-runner.service/job-42.scope",
            "system.slice/sshd.service",
            "machine.slice",
        ] {
            std::fs::create_dir_all(t.path().join(d)).unwrap();
        }
        t
    }

    #[test]
    fn interactive_is_user_slice() {
        let t = fake_tree();
        let r = resolve(
            t.path(),
            &ScopeConfig {
                interactive: true,
                ..Default::default()
            },
            false,
        )
        .unwrap();
        assert_eq!(r.cgroups, vec![t.path().join("user.slice")]);
        assert!(r.uids.is_empty());
    }

    #[test]
    fn a_unit_is_found_by_walking_the_tree() {
        let t = fake_tree();
        let r = resolve(
            t.path(),
            &ScopeConfig {
                units: vec!["sshd".into(), "machine.slice".into()],
                ..Default::default()
            },
            false,
        )
        .unwrap();
        assert_eq!(
            r.cgroups,
            vec![
                t.path().join("machine.slice"),
                t.path().join("system.slice/sshd.service")
            ]
        );
    }

    #[test]
    fn a_runner_unit_found_twice_gives_both_and_its_jobs_inherit() {
        let t = fake_tree();
        let r = resolve(
            t.path(),
            &ScopeConfig {
                units: vec!["ci-runner.service".into()],
                ..Default::default()
            },
            false,
        )
        .unwrap();
        assert_eq!(r.cgroups.len(), 2, "{:?}", r.cgroups);
        assert!(r
            .cgroups
            .contains(&t.path().join("system.slice/ci-runner.service")));
        // The job's scope lies below the attached unit: covered by inheritance.
        let job = t.path().join("system.slice/ci-runner.service/job-42.scope");
        assert!(r.cgroups.iter().any(|c| job.starts_with(c)));
    }

    #[test]
    fn a_missing_unit_says_so() {
        let t = fake_tree();
        let e = resolve(
            t.path(),
            &ScopeConfig {
                units: vec!["nope.service".into()],
                ..Default::default()
            },
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("nope.service"), "{e}");
        assert!(e.contains("is it running"), "{e}");
        let e = unit_name("../etc").unwrap_err().to_string();
        assert!(e.contains("not a unit name"), "{e}");
    }

    #[test]
    fn a_unit_glob_matches_runner_services() {
        let t = fake_tree();
        std::fs::create_dir_all(
            t.path()
                .join("system.slice/actions.runner.org-repo.r1.service"),
        )
        .unwrap();
        let r = resolve(
            t.path(),
            &ScopeConfig {
                units: vec!["actions.runner.*.service".into()],
                ..Default::default()
            },
            false,
        )
        .unwrap();
        assert_eq!(
            r.cgroups,
            vec![t
                .path()
                .join("system.slice/actions.runner.org-repo.r1.service")]
        );
    }

    #[test]
    fn no_user_slice_says_so() {
        let t = tempfile::tempdir().unwrap();
        let e = resolve(
            t.path(),
            &ScopeConfig {
                interactive: true,
                ..Default::default()
            },
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("user.slice"), "{e}");
    }

    #[test]
    fn users_resolve_to_uids_and_unknown_users_are_named() {
        let t = fake_tree();
        let r = resolve(
            t.path(),
            &ScopeConfig {
                users: vec!["root".into()],
                ..Default::default()
            },
            false,
        )
        .unwrap();
        assert_eq!(r.uids, vec![0]);
        // Users alone: their login sessions.
        assert_eq!(r.cgroups, vec![t.path().join("user.slice")]);
        let e = resolve(
            t.path(),
            &ScopeConfig {
                users: vec!["no-such-user-guard".into()],
                ..Default::default()
            },
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("no-such-user-guard"), "{e}");
    }

    #[test]
    fn host_scope_covers_everything_once() {
        let t = fake_tree();
        let r = resolve(
            t.path(),
            &ScopeConfig {
                host: true,
                interactive: true,
                units: vec!["sshd.service".into()],
                ..Default::default()
            },
            false,
        )
        .unwrap();
        assert_eq!(r.cgroups, vec![t.path().to_path_buf()]);
    }

    #[test]
    fn flags_add_to_the_file() {
        let file = ScopeConfig {
            units: vec!["a.service".into()],
            ..Default::default()
        };
        let flags = ScopeConfig {
            interactive: true,
            units: vec!["a.service".into(), "b.service".into()],
            ..Default::default()
        };
        let m = file.merged(flags);
        assert!(m.interactive);
        assert_eq!(m.units, vec!["a.service", "b.service"]);
    }
}
