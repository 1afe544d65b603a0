//! `guard-agent policy check | explain`: validate a policy directory, and
//! show what the policy and the detectors make of one request, offline.
//!
//! `explain` runs the same code as the agent: the DLP engine built from the
//! policy's detector settings (with a throwaway key), `Inspector` over URL,
//! headers and body, then `CompiledPolicy::explain`. It never prints a raw
//! value: findings carry masks, and the body and URL are shown masked.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use clap::{Args, Subcommand};
use serde_json::json;

use crate::{
    daemon::{dlp_settings, BUILT_IN_POLICY},
    dlp::{Engine, MaskKey},
    http::inspect::{Inspector, Part},
    policy::{
        load_dir, load_sources, CompiledPolicy, FindingFact, Mode, Protocol, RequestFacts,
        RuleOutcome, Verdict,
    },
    store::FindingRecord,
};

#[derive(Debug, Args)]
pub struct PolicyArgs {
    #[command(subcommand)]
    pub command: PolicyCommand,
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Load and validate every *.ron file in DIR; exit 1 on the first error.
    Check(CheckArgs),
    /// Show what the policy decides for one request, rule by rule.
    Explain(ExplainArgs),
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The policy directory.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// Policy directory (default: the built-in default policy).
    #[arg(long, value_name = "DIR")]
    pub policy_dir: Option<PathBuf>,
    /// HTTP method.
    #[arg(long, default_value = "GET")]
    pub method: String,
    /// Full URL, e.g. https://api.example.com/v1/upload?x=1.
    #[arg(long)]
    pub url: String,
    /// Executable path of the sending process.
    #[arg(long, value_name = "PATH")]
    pub exe: Option<String>,
    /// User name of the sending process.
    #[arg(long)]
    pub user: Option<String>,
    /// An ancestor's executable path, parent first (repeatable).
    #[arg(long = "ancestor", value_name = "EXE")]
    pub ancestors: Vec<String>,
    /// A request header, 'Name: value' (repeatable).
    #[arg(long = "header", value_name = "'K: V'")]
    pub headers: Vec<String>,
    /// File holding the request body (as sent, e.g. gzip-compressed).
    #[arg(long, value_name = "FILE")]
    pub body: Option<PathBuf>,
    /// Content-Type of the body (same as --header 'Content-Type: T').
    #[arg(long, value_name = "T")]
    pub content_type: Option<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: PolicyArgs) -> anyhow::Result<i32> {
    match args.command {
        PolicyCommand::Check(a) => check(&a.dir),
        PolicyCommand::Explain(a) => explain(a),
    }
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Enforce => "Enforce",
        Mode::Monitor => "Monitor",
    }
}

fn check(dir: &Path) -> anyhow::Result<i32> {
    let policy = load_dir(dir).map_err(|e| anyhow!("{e}"))?;
    println!(
        "ok: {} rules in {} files ({}, {})",
        policy.rule_names().count(),
        policy.files().len(),
        policy.name(),
        mode_name(policy.mode())
    );
    Ok(0)
}

fn load(dir: Option<&Path>) -> anyhow::Result<CompiledPolicy> {
    match dir {
        Some(d) => load_dir(d).map_err(|e| anyhow!("{e}")),
        None => load_sources(&[("policies/default.ron (built in)", BUILT_IN_POLICY)])
            .map_err(|e| anyhow!("{e}")),
    }
}

fn explain(a: ExplainArgs) -> anyhow::Result<i32> {
    let policy = load(a.policy_dir.as_deref())?;
    let key = MaskKey::new(rand::random());
    let engine = Engine::compile(&dlp_settings(policy.detectors()), key.clone())
        .context("compiling the policy's detector settings")?;
    let inspector = Inspector::new(engine, key);

    // The request, as the pipeline would see it.
    let uri: http::Uri = a
        .url
        .parse()
        .with_context(|| format!("--url `{}` is not a URL", a.url))?;
    let scheme = uri.scheme_str().unwrap_or("http").to_ascii_lowercase();
    let Some(host) = uri
        .host()
        .map(|h| h.trim_matches(['[', ']']).to_ascii_lowercase())
    else {
        bail!(
            "--url `{}` has no host (give a full URL: https://host/path)",
            a.url
        );
    };
    let port = uri
        .port_u16()
        .unwrap_or(if scheme == "https" { 443 } else { 80 });
    let mut req = http::Request::builder()
        .method(a.method.to_ascii_uppercase().as_str())
        .uri(uri.clone());
    for h in &a.headers {
        let Some((k, v)) = h.split_once(':') else {
            bail!("--header `{h}`: expected 'Name: value'");
        };
        req = req.header(k.trim(), v.trim());
    }
    if let Some(ct) = &a.content_type {
        req = req.header(http::header::CONTENT_TYPE, ct.as_str());
    }
    let (parts, ()) = req
        .body(())
        .context("building the request from --method/--url/--header")?
        .into_parts();
    let body = match &a.body {
        Some(p) => std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
        None => Vec::new(),
    };
    let inspection = inspector.inspect_request(&parts, &body, &host);

    let comm = a.exe.as_deref().map(|e| {
        let base = e.rsplit('/').next().unwrap_or(e);
        base.chars().take(15).collect::<String>()
    });
    let uid = a.user.as_deref().and_then(|u| {
        nix::unistd::User::from_name(u)
            .ok()
            .flatten()
            .map(|u| u.uid.as_raw())
    });
    let facts = RequestFacts {
        exe: a.exe.clone(),
        comm,
        ancestors: a.ancestors.clone(),
        user: a.user.clone(),
        uid,
        dest_host: Some(host.clone()),
        dest_ip: host.parse().ok(),
        dest_port: Some(port),
        protocol: Some(if scheme == "https" {
            Protocol::Https
        } else {
            Protocol::Http
        }),
        method: Some(parts.method.to_string()),
        path: Some(parts.uri.path().to_owned()),
        findings: inspection
            .findings
            .iter()
            .map(|l| FindingFact::new(&l.finding.detector, l.goes_home))
            .collect(),
        ..Default::default()
    };
    let ex = policy.explain(&facts);

    // What the pipeline would do with the findings (see http/pipeline.rs).
    let masking = match &ex.decision.action {
        Verdict::Mask(scope) => inspection
            .findings
            .iter()
            .any(|l| scope.applies_to(&l.finding.detector, l.goes_home)),
        _ => false,
    };
    let findings: Vec<FindingRecord> = inspection
        .findings
        .iter()
        .map(|l| {
            let applied = match &ex.decision.action {
                Verdict::Mask(scope) => scope.applies_to(&l.finding.detector, l.goes_home),
                _ => false,
            };
            l.record(&inspector, masking && applied)
        })
        .collect();
    // Only ever show masked forms: the raw body and URL may hold secrets.
    let masked_url = inspection.url.clone();
    let masked_body = inspection
        .body
        .as_deref()
        .map(|b| String::from_utf8_lossy(b).into_owned());
    let masked_headers: Vec<(String, String)> = inspection
        .headers
        .iter()
        .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v).into_owned()))
        .collect();
    let header_findings = inspection
        .findings
        .iter()
        .filter(|l| matches!(l.part, Part::Header(_)))
        .count();

    if a.json {
        let trace: Vec<_> = ex
            .trace
            .iter()
            .map(|t| {
                let (outcome, condition, detail) = match &t.outcome {
                    RuleOutcome::Matched => ("matched", None, None),
                    RuleOutcome::NotMatched { condition, detail } => (
                        "not_matched",
                        Some(condition.as_str()),
                        Some(detail.clone()),
                    ),
                    RuleOutcome::Excepted => ("excepted", None, None),
                    RuleOutcome::NotReached => ("not_reached", None, None),
                };
                json!({
                    "rule": t.rule.as_ref(),
                    "file": t.file.display().to_string(),
                    "outcome": outcome,
                    "condition": condition,
                    "detail": detail,
                })
            })
            .collect();
        let d = &ex.decision;
        let out = json!({
            "policy": {
                "name": policy.name(),
                "mode": mode_name(policy.mode()),
                "files": policy.files().iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
            },
            "facts": facts,
            "decision": {
                "action": d.action.kind(),
                "detail": d.action.to_string(),
                "rule": d.rule.as_ref(),
                "mode": mode_name(d.mode),
                "would_have": d.would_have.as_ref().map(|v| v.kind()),
                "reason": d.reason.as_ref(),
            },
            "trace": trace,
            "findings": findings,
            "forwarded_masked": masking,
            "masked_url": masked_url,
            "masked_headers": masked_headers,
            "masked_body": masked_body,
            "body_error": inspection.body_error,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(0);
    }

    println!(
        "policy: {} ({}), {} files",
        policy.name(),
        mode_name(policy.mode()),
        policy.files().len()
    );
    println!(
        "request: {} {}://{}:{}{}",
        parts.method,
        scheme,
        host,
        port,
        // The path only: the query may carry a secret (shown masked below).
        parts.uri.path()
    );
    print!("{ex}");
    if findings.is_empty() {
        println!("findings: none");
    } else {
        println!("findings:");
        for f in &findings {
            println!(
                "  {:<22} {:<28} {}{}{}",
                f.detector,
                f.location,
                f.masked,
                if f.goes_home { "  (goes home)" } else { "" },
                if f.applied {
                    "  (masked when sent)"
                } else {
                    ""
                },
            );
        }
    }
    if let Some(e) = &inspection.body_error {
        println!("body not inspected: {e}");
    }
    println!(
        "sent: {}",
        match &ex.decision.action {
            Verdict::Block { .. } | Verdict::RequireApproval { .. } => "no (blocked)",
            _ if masking => "masked",
            _ => "unchanged",
        }
    );
    if let Some(u) = &masked_url {
        println!("masked url: {u}");
    }
    if header_findings > 0 {
        for (k, v) in &masked_headers {
            println!("masked header: {k}: {v}");
        }
    }
    if let Some(b) = &masked_body {
        println!("masked body:");
        println!("{b}");
    }
    Ok(0)
}
