//! Where the agent's log goes: journald (structured fields, priorities)
//! when systemd started it with its output connected to the journal
//! (`JOURNAL_STREAM` is set), else formatted lines on stderr (JSON lines
//! with `--log-json`).
//!
//! The filter is `GUARD_LOG` (e.g. `info`, `guard_agent=debug`) either way.
//! Never log a secret: events and log lines carry masked values only.

use tracing_subscriber::{layer::SubscriberExt, util::SubscriberInitExt, EnvFilter};

fn filter() -> EnvFilter {
    EnvFilter::try_from_env("GUARD_LOG").unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Whether stderr is the journal: systemd sets `JOURNAL_STREAM` to the
/// device and inode of the stream it connected, which must be stderr's.
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
}

/// Installs the global subscriber. `json` asks for JSON lines on stderr;
/// under journald the journal's own structured fields are used instead.
pub fn init(json: bool) {
    if stderr_is_journal() {
        match tracing_journald::layer() {
            Ok(layer) => {
                tracing_subscriber::registry()
                    .with(filter())
                    .with(layer.with_syslog_identifier("guard-agent".to_owned()))
                    .init();
                return;
            }
            Err(e) => eprintln!("guard-agent: journald unavailable ({e}); logging to stderr"),
        }
    }
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}
