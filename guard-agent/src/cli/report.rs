//! `guard-agent report --since TIME`: the summary of a CI job (see
//! [`crate::report`]), as Markdown for `$GITHUB_STEP_SUMMARY` or JSON.
//!
//! Exit status: 0, or [`BLOCKED_EXIT`] with `--fail-on-block` when anything
//! was blocked in the window (1 stays "the report could not be made").

use anyhow::bail;
use clap::{Args, ValueEnum};
use time::OffsetDateTime;

use super::StateDirArg;
use crate::{
    report::Summary,
    store::{filter::parse_time, EventFilter},
};

/// The exit status of `report --fail-on-block` when something was blocked.
pub const BLOCKED_EXIT: i32 = 3;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ReportFormat {
    Markdown,
    Json,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    #[command(flatten)]
    pub state: StateDirArg,
    /// Start of the window: RFC 3339, Unix seconds (`date +%s`), or an age (10m).
    #[arg(long, value_name = "TIME")]
    pub since: String,
    /// End of the window (default: now).
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
    #[arg(long, value_enum, default_value = "markdown")]
    pub format: ReportFormat,
    /// Exit with status 3 when anything was blocked in the window.
    #[arg(long)]
    pub fail_on_block: bool,
}

/// `--since`/`--until`: what `events` takes, plus Unix seconds.
fn parse_when(s: &str, flag: &str, now: OffsetDateTime) -> anyhow::Result<OffsetDateTime> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        let secs: i64 = s
            .parse()
            .map_err(|_| anyhow::anyhow!("--{flag}: `{s}` is too large"))?;
        return OffsetDateTime::from_unix_timestamp(secs)
            .map_err(|e| anyhow::anyhow!("--{flag}: `{s}`: {e}"));
    }
    parse_time(s, now).map_err(|e| anyhow::anyhow!("--{flag}: {e}"))
}

pub fn run(args: ReportArgs) -> anyhow::Result<i32> {
    let now = OffsetDateTime::now_utc();
    let since = parse_when(&args.since, "since", now)?;
    let until = args
        .until
        .as_deref()
        .map(|u| parse_when(u, "until", now))
        .transpose()?;
    if until.is_some_and(|u| u < since) {
        bail!("--until is before --since");
    }
    let filter = EventFilter {
        since: Some(since),
        until,
        ..Default::default()
    };
    let events = super::events::load_events(&args.state.state_dir, &filter)?;
    let summary = Summary::build(&events, since, until);
    match args.format {
        ReportFormat::Markdown => print!("{}", summary.markdown()),
        ReportFormat::Json => println!("{}", serde_json::to_string_pretty(&summary)?),
    }
    if args.fail_on_block && summary.blocked > 0 {
        eprintln!(
            "guard-agent: {} connection(s) or request(s) were blocked (--fail-on-block)",
            summary.blocked
        );
        return Ok(BLOCKED_EXIT);
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_seconds_rfc3339_and_ages() {
        let now = OffsetDateTime::now_utc();
        assert_eq!(
            parse_when("1700000000", "since", now)
                .unwrap()
                .unix_timestamp(),
            1_700_000_000
        );
        assert!(parse_when("2026-11-24T10:00:00Z", "since", now).is_ok());
        assert!(parse_when("5m", "since", now).is_ok());
        let e = parse_when("job start", "since", now)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--since"), "{e}");
    }
}
