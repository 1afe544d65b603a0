//! `guard-agent events export --format ndjson|har`: evidence for an
//! investigation, with the same filters as `guard-agent events`.
//!
//! NDJSON is one event per line, exactly what `events --json` prints; HAR
//! 1.2 (see [`super::har`]) holds the HTTP requests among the matching
//! events. Both carry only what the store holds (masked). An output file is
//! created 0600: it is as sensitive as the store it came from.

use std::{
    fs::OpenOptions,
    io::{self, BufWriter, Write},
    os::unix::fs::OpenOptionsExt,
    path::PathBuf,
};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};

use super::{
    events::{for_each_event, FilterArgs},
    har::Har,
    StateDirArg,
};
use crate::store::EventKind;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// One JSON event per line (as `events --json`).
    Ndjson,
    /// HTTP Archive 1.2: the HTTP requests, for browser devtools.
    Har,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Output format.
    #[arg(long, value_enum)]
    pub format: Format,
    /// Write here (created 0600, replaced if it exists) instead of stdout.
    #[arg(long, short, value_name = "FILE")]
    pub output: Option<PathBuf>,
    #[command(flatten)]
    pub filters: FilterArgs,
}

pub fn run(state: &StateDirArg, args: ExportArgs) -> anyhow::Result<()> {
    let mut filter = args.filters.filter()?;
    if args.format == Format::Har {
        match filter.kind {
            Some(EventKind::Connection) => bail!(
                "--format har holds HTTP requests only; use --format ndjson for connection events"
            ),
            _ => filter.kind = Some(EventKind::Http),
        }
    }
    let (mut out, path): (Box<dyn Write>, _) = match &args.output {
        Some(p) => {
            let f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(p)
                .with_context(|| format!("creating {}", p.display()))?;
            (Box::new(BufWriter::new(f)), Some(p))
        }
        None => (Box::new(BufWriter::new(io::stdout().lock())), None),
    };
    let mut count = 0usize;
    match args.format {
        Format::Ndjson => {
            for_each_event(state, &filter, false, |e| {
                serde_json::to_writer(&mut out, &e)?;
                count += 1;
                writeln!(out)
            })?;
        }
        Format::Har => {
            let mut events = Vec::new();
            for_each_event(state, &filter, false, |e| {
                events.push(e);
                Ok(())
            })?;
            count = events.len();
            serde_json::to_writer_pretty(&mut out, &Har::from_events(&events))?;
            writeln!(out)?;
        }
    }
    match out.flush() {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
        other => other.context("writing the export")?,
    }
    if let Some(p) = path {
        eprintln!("guard-agent: wrote {count} events to {}", p.display());
    }
    Ok(())
}
