//! The agent's configuration: a RON file (`--config FILE`) whose every field
//! can also be given as a flag, validated once into [`AgentConfig`].
//!
//! Errors name the file, the line and column (for syntax), the field and what
//! is wrong with it. Nothing here touches the kernel or the network.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::IpNet;
use serde::Deserialize;

/// Default port of the agent's listener for redirected connections.
pub const DEFAULT_PORT: u16 = 15001;
/// Default `SO_MARK` on the agent's own upstream sockets.
pub const DEFAULT_MARK: u32 = 0x6775_6172; // "guar"
/// Shortest fail-open window: the heartbeat is written every second.
pub const MIN_FAIL_OPEN_AFTER: Duration = Duration::from_secs(2);
/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/guard";

/// The configuration file as written (all fields optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub state_dir: Option<PathBuf>,
    pub listen: Option<Vec<String>>,
    pub cgroups: Option<Vec<PathBuf>>,
    pub exec_cgroup: Option<PathBuf>,
    pub uids: Option<Vec<u32>>,
    pub intercept: Option<Vec<String>>,
    pub exclude: Option<Vec<String>>,
    pub mark: Option<u32>,
    pub admin_group: Option<String>,
    pub retention: Option<RetentionFile>,
    pub policy_dir: Option<PathBuf>,
    pub upstream_roots: Option<Vec<PathBuf>>,
    pub tls_passthrough: Option<Vec<String>>,
    pub inspect_tls: Option<bool>,
    /// The resolver: `dns: (upstream: ["10.0.0.2"], block_answer: "refused")`.
    pub dns: Option<crate::dns::settings::DnsFile>,
    /// UDP destinations refused in the kernel (default: port 443, QUIC).
    pub udp_block: Option<Vec<crate::dns::settings::UdpRuleFile>>,
    /// Exceptions to `udp_block`.
    pub udp_allow: Option<Vec<crate::dns::settings::UdpRuleFile>>,
    /// Group whose members may list, approve and deny holds and read
    /// events (besides root). Default: the admin group.
    pub approver_group: Option<String>,
    /// Program and arguments run for each new hold (summary JSON on stdin).
    pub notify_command: Option<Vec<String>>,
    /// URL receiving a Slack-compatible `{"text": ...}` for each new hold.
    pub notify_webhook: Option<String>,
    /// Secrets for credential injection (RON, root-owned, mode 0600).
    pub secrets_file: Option<PathBuf>,
    /// Named scopes (users, units, slices, the whole host): see `scope.rs`.
    pub scope: Option<crate::scope::ScopeConfig>,
    /// Prometheus metrics endpoint, e.g. "127.0.0.1:9115" (off by default).
    pub metrics: Option<String>,
    /// Allow a metrics address that is not loopback.
    pub metrics_non_loopback: Option<bool>,
    /// Fail open: monitored connects go direct once the agent's heartbeat
    /// is older than this (e.g. "5s"). Unset: fail closed (enforce).
    pub fail_open_after: Option<String>,
    /// cgroups (and their descendants) never redirected, even below an
    /// attached cgroup.
    pub exclude_cgroups: Option<Vec<PathBuf>>,
    /// Threads that carry connections (default: one per CPU).
    pub worker_threads: Option<usize>,
}

/// Retention as written: `(max_age: "30d", max_bytes: 1073741824)`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionFile {
    pub max_age: Option<String>,
    pub max_bytes: Option<u64>,
}

/// Values given on the command line; they override the file.
#[derive(Debug, Default, Clone)]
pub struct ConfigFlags {
    pub state_dir: Option<PathBuf>,
    pub listen: Vec<String>,
    pub cgroups: Vec<PathBuf>,
    pub exec_cgroup: Option<PathBuf>,
    pub uids: Vec<u32>,
    pub intercept: Vec<String>,
    pub exclude: Vec<String>,
    pub policy_dir: Option<PathBuf>,
    pub upstream_roots: Vec<PathBuf>,
    pub tls_passthrough: Vec<String>,
    pub no_inspect_tls: bool,
    pub dns: crate::dns::settings::DnsFlags,
    pub admin_group: Option<String>,
    pub approver_group: Option<String>,
    /// A program (no arguments) run for each new hold.
    pub notify_command: Option<String>,
    pub notify_webhook: Option<String>,
    pub secrets_file: Option<PathBuf>,
    pub scope: crate::scope::ScopeConfig,
    pub metrics: Option<String>,
    pub fail_open_after: Option<String>,
    pub exclude_cgroups: Vec<PathBuf>,
    /// Take over from a running agent of the same state directory.
    pub takeover: bool,
    pub worker_threads: Option<usize>,
}

/// How long and how much the event store keeps.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub max_age: Duration,
    pub max_bytes: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            max_age: Duration::from_secs(30 * 24 * 3600),
            max_bytes: 1 << 30,
        }
    }
}

/// The validated configuration the agent runs with.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub state_dir: PathBuf,
    pub listen_v4: Option<SocketAddr>,
    pub listen_v6: Option<SocketAddr>,
    /// cgroup v2 directories whose processes are monitored.
    pub cgroups: Vec<PathBuf>,
    /// Parent of the cgroups `guard-agent exec` creates; attached like the others.
    pub exec_cgroup: Option<PathBuf>,
    /// When non-empty, only these uids are monitored.
    pub uids: Vec<u32>,
    pub intercept: Vec<IpNet>,
    pub exclude: Vec<IpNet>,
    pub mark: u32,
    pub admin_group: String,
    pub retention: Retention,
    /// Directory of policy files; None: the built-in default policy.
    pub policy_dir: Option<PathBuf>,
    /// Extra CA certificates (PEM) trusted for upstream TLS.
    pub upstream_roots: Vec<PathBuf>,
    /// SNI globs spliced without decryption.
    pub tls_passthrough: Vec<String>,
    /// Terminate TLS to inspect HTTPS (default true).
    pub inspect_tls: bool,
    /// The resolver for redirected DNS.
    pub dns: crate::dns::settings::DnsSettings,
    /// UDP destinations refused in the kernel.
    pub udp: crate::dns::settings::UdpRules,
    /// Root and this group may decide holds and read events.
    pub approver_group: String,
    /// Hook run for each new hold (empty: none).
    pub notify_command: Vec<String>,
    /// Webhook for each new hold.
    pub notify_webhook: Option<http::Uri>,
    pub secrets_file: Option<PathBuf>,
    /// Named scopes, resolved into `cgroups` and `uids` at start-up.
    pub scope: crate::scope::ScopeConfig,
    /// Where to serve Prometheus metrics (None: not served).
    pub metrics: Option<SocketAddr>,
    /// None: fail closed (enforce); Some: fail open after this heartbeat age.
    pub fail_open_after: Option<Duration>,
    /// cgroups whose processes (and descendants') are never redirected.
    pub exclude_cgroups: Vec<PathBuf>,
    /// Hand the running agent of this state directory over (SIGUSR2) and
    /// wait for it to drain before starting.
    pub takeover: bool,
    /// Threads that carry connections (None: one per CPU).
    pub worker_threads: Option<usize>,
}

/// A configuration problem, with where it is.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}, line {line}, column {column}: {message}")]
    Syntax {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{origin}: field `{field}`: {message}")]
    Field {
        origin: String,
        field: String,
        message: String,
    },
}

impl ConfigFile {
    /// Reads and parses a RON configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses RON text; `path` is only used in error messages.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        ron::Options::default()
            .with_default_extension(ron::extensions::Extensions::IMPLICIT_SOME)
            .from_str(text)
            .map_err(|e: ron::error::SpannedError| ConfigError::Syntax {
                path: path.to_owned(),
                line: e.position.line,
                column: e.position.col,
                message: e.code.to_string(),
            })
    }
}

fn field_err(origin: &str, field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        origin: origin.to_owned(),
        field: field.to_owned(),
        message: message.into(),
    }
}

fn parse_nets(origin: &str, field: &str, values: &[String]) -> Result<Vec<IpNet>, ConfigError> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| parse_net(v).map_err(|m| field_err(origin, &format!("{field}[{i}]"), m)))
        .collect()
}

/// Parses `10.0.0.0/8`, `::1/128`, or a bare address (a host prefix).
pub fn parse_net(v: &str) -> Result<IpNet, String> {
    if let Ok(net) = v.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    match v.parse::<IpAddr>() {
        Ok(ip) => Ok(IpNet::from(ip)),
        Err(_) => Err(format!(
            "`{v}` is not a CIDR (expected e.g. 10.0.0.0/8 or fd00::/8)"
        )),
    }
}

impl AgentConfig {
    /// Merges a file (if any) and flags (which win) into a validated config.
    pub fn build(
        file: Option<(&Path, ConfigFile)>,
        flags: ConfigFlags,
    ) -> Result<Self, ConfigError> {
        let (origin, file) = match file {
            Some((p, f)) => (format!("config file {}", p.display()), f),
            None => ("command line".to_owned(), ConfigFile::default()),
        };
        let pick =
            |flag: Vec<String>, file: Option<Vec<String>>, o: &str| -> (Vec<String>, String) {
                if flag.is_empty() {
                    (file.unwrap_or_default(), o.to_owned())
                } else {
                    (flag, "command line".to_owned())
                }
            };

        let (listen, listen_origin) = pick(flags.listen, file.listen, &origin);
        let (mut listen_v4, mut listen_v6) = (None, None);
        if listen.is_empty() {
            listen_v4 = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, DEFAULT_PORT)));
            listen_v6 = Some(SocketAddr::from((Ipv6Addr::LOCALHOST, DEFAULT_PORT)));
        }
        for (i, l) in listen.iter().enumerate() {
            let field = format!("listen[{i}]");
            let addr: SocketAddr = l.parse().map_err(|_| {
                field_err(
                    &listen_origin,
                    &field,
                    format!(
                        "`{l}` is not an address with a port (e.g. 127.0.0.1:15001 or [::1]:15001)"
                    ),
                )
            })?;
            if !addr.ip().is_loopback() {
                return Err(field_err(
                    &listen_origin,
                    &field,
                    format!("`{l}`: the agent listens on loopback only (127.0.0.0/8 or ::1)"),
                ));
            }
            if addr.port() == 0 {
                return Err(field_err(&listen_origin, &field, "port 0 is not allowed"));
            }
            let slot = if addr.is_ipv4() {
                &mut listen_v4
            } else {
                &mut listen_v6
            };
            if slot.replace(addr).is_some() {
                return Err(field_err(
                    &listen_origin,
                    &field,
                    "at most one IPv4 and one IPv6 listener",
                ));
            }
        }

        let (intercept, io) = pick(flags.intercept, file.intercept, &origin);
        let mut intercept = parse_nets(&io, "intercept", &intercept)?;
        if intercept.is_empty() {
            intercept = vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()];
        }
        let (exclude, eo) = pick(flags.exclude, file.exclude, &origin);
        let exclude = parse_nets(&eo, "exclude", &exclude)?;

        let cgroups = if flags.cgroups.is_empty() {
            file.cgroups.unwrap_or_default()
        } else {
            flags.cgroups
        };
        let exec_cgroup = flags.exec_cgroup.or(file.exec_cgroup);
        let scope = file.scope.unwrap_or_default().merged(flags.scope);
        if cgroups.is_empty() && exec_cgroup.is_none() && scope.is_empty() {
            return Err(field_err(
                &origin,
                "cgroups",
                "no cgroup to monitor: give at least one (--cgroup PATH, or `cgroups: [\"/sys/fs/cgroup/user.slice\"]`), a scope (--scope-interactive, --unit NAME, `scope: (interactive: true)`) or an exec_cgroup",
            ));
        }
        for (i, c) in cgroups.iter().enumerate() {
            if !c.is_absolute() {
                return Err(field_err(
                    &origin,
                    &format!("cgroups[{i}]"),
                    format!("`{}` must be an absolute path", c.display()),
                ));
            }
        }

        let uids = if flags.uids.is_empty() {
            file.uids.unwrap_or_default()
        } else {
            flags.uids
        };

        let mut retention = Retention::default();
        if let Some(r) = file.retention {
            if let Some(age) = r.max_age {
                retention.max_age = humantime::parse_duration(&age).map_err(|e| {
                    field_err(
                        &origin,
                        "retention.max_age",
                        format!("`{age}`: {e} (e.g. \"30d\", \"12h\")"),
                    )
                })?;
            }
            if let Some(b) = r.max_bytes {
                if b < 1 << 20 {
                    return Err(field_err(
                        &origin,
                        "retention.max_bytes",
                        "must be at least 1048576 (1 MiB)",
                    ));
                }
                retention.max_bytes = b;
            }
        }

        let tls_passthrough = if flags.tls_passthrough.is_empty() {
            file.tls_passthrough.unwrap_or_default()
        } else {
            flags.tls_passthrough
        };
        for (i, g) in tls_passthrough.iter().enumerate() {
            globset::Glob::new(g).map_err(|e| {
                field_err(
                    &origin,
                    &format!("tls_passthrough[{i}]"),
                    format!("`{g}` is not a valid glob: {e}"),
                )
            })?;
        }
        let dns = crate::dns::settings::DnsSettings::build(file.dns, &flags.dns)
            .map_err(|(field, m)| field_err(&origin, &field, m))?;
        let udp = crate::dns::settings::UdpRules::build(file.udp_block, file.udp_allow)
            .map_err(|(field, m)| field_err(&origin, &field, m))?;
        let upstream_roots = if flags.upstream_roots.is_empty() {
            file.upstream_roots.unwrap_or_default()
        } else {
            flags.upstream_roots
        };
        let admin_group = flags
            .admin_group
            .or(file.admin_group)
            .unwrap_or_else(|| "guard".to_owned());
        let approver_group = flags
            .approver_group
            .or(file.approver_group)
            .unwrap_or_else(|| admin_group.clone());
        let notify_command = match flags.notify_command {
            Some(p) => vec![p],
            None => file.notify_command.unwrap_or_default(),
        };
        if notify_command.first().is_some_and(|p| p.is_empty()) {
            return Err(field_err(&origin, "notify_command", "the program is empty"));
        }
        let notify_webhook = match flags.notify_webhook.or(file.notify_webhook) {
            None => None,
            Some(u) => {
                let uri: http::Uri = u.parse().map_err(|e| {
                    field_err(
                        &origin,
                        "notify_webhook",
                        format!("`{u}` is not a URL: {e}"),
                    )
                })?;
                if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                    return Err(field_err(
                        &origin,
                        "notify_webhook",
                        format!("`{u}`: expected an http:// or https:// URL with a host"),
                    ));
                }
                Some(uri)
            }
        };
        let metrics = match flags.metrics.or(file.metrics) {
            None => None,
            Some(m) => {
                let addr: SocketAddr = m.parse().map_err(|_| {
                    field_err(
                        &origin,
                        "metrics",
                        format!("`{m}` is not an address with a port (e.g. 127.0.0.1:9115)"),
                    )
                })?;
                if !addr.ip().is_loopback() && !file.metrics_non_loopback.unwrap_or(false) {
                    return Err(field_err(
                        &origin,
                        "metrics",
                        format!("`{m}` is not a loopback address; metrics are served on loopback only unless the config file sets `metrics_non_loopback: true`"),
                    ));
                }
                Some(addr)
            }
        };
        let fail_open_after = match flags.fail_open_after.or(file.fail_open_after) {
            None => None,
            Some(v) => {
                let d = humantime::parse_duration(&v).map_err(|e| {
                    field_err(
                        &origin,
                        "fail_open_after",
                        format!("`{v}`: {e} (e.g. \"5s\", \"1m\")"),
                    )
                })?;
                if d < MIN_FAIL_OPEN_AFTER {
                    return Err(field_err(
                        &origin,
                        "fail_open_after",
                        format!(
                            "`{v}`: must be at least 2s (the heartbeat is written every second)"
                        ),
                    ));
                }
                Some(d)
            }
        };
        let exclude_cgroups = if flags.exclude_cgroups.is_empty() {
            file.exclude_cgroups.unwrap_or_default()
        } else {
            flags.exclude_cgroups
        };
        for (i, c) in exclude_cgroups.iter().enumerate() {
            if !c.is_absolute() {
                return Err(field_err(
                    &origin,
                    &format!("exclude_cgroups[{i}]"),
                    format!("`{}` must be an absolute path", c.display()),
                ));
            }
        }
        let worker_threads = flags.worker_threads.or(file.worker_threads);
        if let Some(n) = worker_threads {
            if !(1..=256).contains(&n) {
                return Err(field_err(
                    &origin,
                    "worker_threads",
                    format!("{n}: must be between 1 and 256"),
                ));
            }
        }
        Ok(Self {
            worker_threads,
            fail_open_after,
            exclude_cgroups,
            takeover: flags.takeover,
            approver_group,
            notify_command,
            notify_webhook,
            secrets_file: flags.secrets_file.or(file.secrets_file),
            scope,
            metrics,
            policy_dir: flags.policy_dir.or(file.policy_dir),
            upstream_roots,
            tls_passthrough,
            inspect_tls: !flags.no_inspect_tls && file.inspect_tls.unwrap_or(true),
            state_dir: flags
                .state_dir
                .or(file.state_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            listen_v4,
            listen_v6,
            cgroups,
            exec_cgroup,
            uids,
            intercept,
            exclude,
            mark: file.mark.unwrap_or(DEFAULT_MARK),
            admin_group,
            retention,
            dns,
            udp,
        })
    }

    /// Path of the admin socket in a state directory.
    pub fn admin_socket(state_dir: &Path) -> PathBuf {
        state_dir.join("admin.sock")
    }

    /// Path of the event store in a state directory.
    pub fn store_dir(state_dir: &Path) -> PathBuf {
        state_dir.join("events.sled")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
        let p = Path::new("/etc/guard/agent.ron");
        let f = ConfigFile::parse(p, text)?;
        AgentConfig::build(Some((p, f)), ConfigFlags::default())
    }

    #[test]
    fn a_full_file_parses() {
        let c = parse(
            r#"(state_dir: "/tmp/g", listen: ["127.0.0.1:16000"], cgroups: ["/sys/fs/cgroup/x"],
                uids: [1000], intercept: ["10.0.0.0/8"], exclude: ["10.1.0.0/16"],
                retention: (max_age: "2d", max_bytes: 10000000))"#,
        )
        .unwrap();
        assert_eq!(c.listen_v4.unwrap().port(), 16000);
        assert!(c.listen_v6.is_none());
        assert_eq!(c.uids, vec![1000]);
        assert_eq!(c.retention.max_age, Duration::from_secs(2 * 86400));
        assert_eq!(c.exclude[0].to_string(), "10.1.0.0/16");
    }

    #[test]
    fn a_bad_cidr_names_the_field_and_value() {
        let e = parse(r#"(cgroups: ["/sys/fs/cgroup/x"], intercept: ["10.0.0/8"])"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("intercept[0]"), "{e}");
        assert!(e.contains("10.0.0/8"), "{e}");
        assert!(e.contains("/etc/guard/agent.ron"), "{e}");
    }

    #[test]
    fn an_unknown_field_gives_line_and_column() {
        let e = parse("(\n  cgroups: [\"/a\"],\n  lisen: [],\n)")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 3"), "{e}");
        assert!(e.contains("lisen"), "{e}");
    }

    #[test]
    fn flags_override_the_file() {
        let p = Path::new("a.ron");
        let f = ConfigFile::parse(p, r#"(cgroups: ["/a"], listen: ["127.0.0.1:1"])"#).unwrap();
        let flags = ConfigFlags {
            listen: vec!["127.0.0.1:2".into()],
            ..Default::default()
        };
        let c = AgentConfig::build(Some((p, f)), flags).unwrap();
        assert_eq!(c.listen_v4.unwrap().port(), 2);
    }

    #[test]
    fn approver_group_defaults_to_the_admin_group() {
        let c = parse(r#"(cgroups: ["/a"], admin_group: "ops")"#).unwrap();
        assert_eq!(c.approver_group, "ops");
        let c = parse(r#"(cgroups: ["/a"], approver_group: "leads", notify_command: ["notify-send", "Guard"], notify_webhook: "https://hooks.example/x")"#).unwrap();
        assert_eq!(c.approver_group, "leads");
        assert_eq!(c.admin_group, "guard");
        assert_eq!(c.notify_command, vec!["notify-send", "Guard"]);
        let e = parse(r#"(cgroups: ["/a"], notify_webhook: "ftp://x")"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("notify_webhook"), "{e}");
    }

    #[test]
    fn a_scope_alone_is_enough_and_flags_add_to_it() {
        let p = Path::new("a.ron");
        let f = ConfigFile::parse(p, r#"(scope: (units: ["ci-runner.service"]))"#).unwrap();
        let flags = ConfigFlags {
            scope: crate::scope::ScopeConfig {
                interactive: true,
                ..Default::default()
            },
            ..Default::default()
        };
        let c = AgentConfig::build(Some((p, f)), flags).unwrap();
        assert_eq!(c.scope.units, vec!["ci-runner.service"]);
        assert!(c.scope.interactive);
        let e = parse(r#"(scope: (unitz: ["x"]))"#).unwrap_err().to_string();
        assert!(e.contains("unitz"), "{e}");
    }

    #[test]
    fn metrics_are_loopback_only_unless_the_file_says_otherwise() {
        let c = parse(r#"(cgroups: ["/a"], metrics: "127.0.0.1:9115")"#).unwrap();
        assert_eq!(c.metrics.unwrap().port(), 9115);
        let e = parse(r#"(cgroups: ["/a"], metrics: "0.0.0.0:9115")"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("metrics") && e.contains("metrics_non_loopback"),
            "{e}"
        );
        let c = parse(r#"(cgroups: ["/a"], metrics: "0.0.0.0:9115", metrics_non_loopback: true)"#)
            .unwrap();
        assert!(c.metrics.is_some());
        let e = parse(r#"(cgroups: ["/a"], metrics: "9115")"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not an address"), "{e}");
    }

    #[test]
    fn worker_threads_are_taken_from_file_or_flag_and_bounded() {
        assert_eq!(
            parse(r#"(cgroups: ["/a"], worker_threads: 2)"#)
                .unwrap()
                .worker_threads,
            Some(2)
        );
        assert_eq!(parse(r#"(cgroups: ["/a"])"#).unwrap().worker_threads, None);
        let p = Path::new("/etc/guard/agent.ron");
        let f = ConfigFile::parse(p, r#"(cgroups: ["/a"], worker_threads: 2)"#).unwrap();
        let flags = ConfigFlags {
            worker_threads: Some(3),
            ..Default::default()
        };
        assert_eq!(
            AgentConfig::build(Some((p, f)), flags)
                .unwrap()
                .worker_threads,
            Some(3),
            "the flag wins over the file"
        );
        let e = parse(r#"(cgroups: ["/a"], worker_threads: 0)"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("worker_threads") && e.contains("between 1 and 256"),
            "{e}"
        );
    }

    #[test]
    fn fail_open_and_excluded_cgroups_are_validated() {
        let c = parse(r#"(cgroups: ["/a"], fail_open_after: "5s", exclude_cgroups: ["/a/b"])"#)
            .unwrap();
        assert_eq!(c.fail_open_after, Some(Duration::from_secs(5)));
        assert_eq!(c.exclude_cgroups, vec![PathBuf::from("/a/b")]);
        assert!(parse(r#"(cgroups: ["/a"])"#)
            .unwrap()
            .fail_open_after
            .is_none());
        let e = parse(r#"(cgroups: ["/a"], fail_open_after: "1s")"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("fail_open_after") && e.contains("at least 2s"),
            "{e}"
        );
        let e = parse(r#"(cgroups: ["/a"], fail_open_after: "soon")"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("fail_open_after") && e.contains("soon"), "{e}");
        let e = parse(r#"(cgroups: ["/a"], exclude_cgroups: ["b"])"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("exclude_cgroups[0]"), "{e}");
    }

    #[test]
    fn a_non_loopback_listener_is_refused() {
        let e = parse(r#"(cgroups: ["/a"], listen: ["0.0.0.0:15001"])"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("loopback"), "{e}");
    }
}
