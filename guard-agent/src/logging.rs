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
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    v.to_str()
        .is_some_and(|v| names_stream(v, meta.dev(), meta.ino()))
}

/// Whether a `JOURNAL_STREAM` value (`DEVICE:INODE`) names this stream.
fn names_stream(value: &str, dev: u64, ino: u64) -> bool {
    value
        .split_once(':')
        .is_some_and(|(d, i)| d.parse() == Ok(dev) && i.parse() == Ok(ino))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_must_name_stderr() {
        assert!(names_stream("8:12345", 8, 12345));
        assert!(!names_stream("8:12345", 8, 99));
        assert!(!names_stream("garbage", 8, 12345));
    }
}
