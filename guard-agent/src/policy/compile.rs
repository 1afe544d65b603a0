//! Validation and compilation: parsed files in, one `CompiledPolicy` out.
//!
//! How files combine (documented for users in `policies/README.md`):
//! - exactly one file, the base, sets both `mode` and `default`; the policy
//!   takes its `name`;
//! - rules of all files are concatenated in file-name order, and rule names
//!   are unique across the directory;
//! - detector settings are merged: `disabled`, `allowlist` and `custom` are
//!   concatenated; a detector's `mask` style may be set by one file only
//!   (or by several, to the same style).
//!
//! Everything that can be wrong is found here, once: globs, CIDRs, regexes,
//! detector names (with a suggestion), duplicate names. The result holds
//! only prebuilt matchers, so nothing is parsed on the hot path.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use ipnet::IpNet;

use super::decide::{MaskScope, Verdict, DEFAULT_RULE};
use super::detectors::{did_you_mean, group_class, is_builtin, BUILTIN_DETECTORS, DETECTOR_GROUPS};
use super::load::PolicyError;
use super::schema::{
    Action, DetectorClass, DetectorSettings, MaskStyle, Match, Mode, PolicyFile, PortRange,
    Protocol, Rule,
};

/// One file as read and parsed, with its text kept for error positions.
#[derive(Debug, Clone)]
pub(crate) struct ParsedFile {
    pub path: PathBuf,
    pub text: String,
    pub policy: PolicyFile,
}

/// A validated policy, ready to match. Immutable; reloads build a new one.
#[derive(Debug)]
pub struct CompiledPolicy {
    pub(crate) name: Arc<str>,
    pub(crate) mode: Mode,
    pub(crate) default: Verdict,
    pub(crate) default_reason: Arc<str>,
    pub(crate) default_rule_name: Arc<str>,
    pub(crate) rules: Vec<CompiledRule>,
    pub(crate) detectors: DetectorSettings,
    pub(crate) files: Vec<PathBuf>,
    pub(crate) version: u64,
    /// Rules listing `protocol: [Udp]`, in rule order, for the kernel.
    pub(crate) udp: Vec<super::udp::UdpPolicyRule>,
}

#[derive(Debug)]
pub(crate) struct CompiledRule {
    pub(crate) name: Arc<str>,
    /// Index into `CompiledPolicy::files`.
    pub(crate) file: usize,
    pub(crate) source: Rule,
    pub(crate) when: CompiledMatch,
    pub(crate) unless: Option<CompiledMatch>,
    pub(crate) verdict: Verdict,
    pub(crate) reason: Arc<str>,
}

#[derive(Debug, Default)]
pub(crate) struct CompiledMatch {
    pub(crate) exe: Option<PatternSet>,
    pub(crate) comm: Vec<String>,
    pub(crate) ancestor: Option<PatternSet>,
    pub(crate) user: Vec<String>,
    pub(crate) group: Vec<String>,
    pub(crate) uid: Vec<u32>,
    pub(crate) cgroup: Option<PatternSet>,
    pub(crate) unit: Option<PatternSet>,
    pub(crate) host: Option<PatternSet>,
    pub(crate) cidr: Vec<IpNet>,
    pub(crate) port: Vec<PortRange>,
    pub(crate) protocol: Vec<Protocol>,
    /// Upper-case.
    pub(crate) method: Vec<String>,
    pub(crate) path: Option<PatternSet>,
    pub(crate) findings: Option<DetectorSet>,
    pub(crate) leaving_home: Option<DetectorSet>,
}

#[derive(Debug)]
pub(crate) struct PatternSet {
    pub(crate) globs: GlobSet,
}

#[derive(Debug)]
pub(crate) enum DetectorSet {
    Any,
    /// Sorted, groups expanded.
    Names(Vec<Arc<str>>),
}

impl CompiledPolicy {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The files this policy was built from, in load order.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Set by `PolicyStore`: 1 for the first policy, +1 per successful reload;
    /// 0 for a policy compiled outside a store.
    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn rule_names(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|r| r.name.as_ref())
    }

    /// Merged detector settings, for the DLP engine.
    pub fn detectors(&self) -> &DetectorSettings {
        &self.detectors
    }

    pub fn detector_enabled(&self, detector: &str) -> bool {
        !self.detectors.disabled.iter().any(|d| d == detector)
    }

    pub fn mask_style(&self, detector: &str) -> MaskStyle {
        self.detectors
            .mask
            .get(detector)
            .copied()
            .unwrap_or_default()
    }
}

/// Where a problem is: the file, the rule (if any), and a byte offset from
/// which to look for the offending quoted value to find its line.
pub(crate) struct Ctx<'a> {
    file: &'a ParsedFile,
    rule: Option<&'a str>,
    from: usize,
}

impl Ctx<'_> {
    pub(crate) fn err(&self, needle: Option<&str>, message: String) -> PolicyError {
        let offset = needle.and_then(|n| find_quoted(&self.file.text, self.from, n));
        // Without the value, point at the rule (or custom detector) itself.
        let offset = offset.or(if self.rule.is_some() || self.from > 0 {
            Some(self.from)
        } else {
            None
        });
        PolicyError::Invalid {
            file: self.file.path.clone(),
            rule: self.rule.map(str::to_owned),
            line: offset.map(|o| line_at(&self.file.text, o)),
            message,
        }
    }

    /// " in rule `x`" or " in `detectors`".
    fn place(&self, field: &str) -> String {
        match self.rule {
            Some(rule) => format!(" in `{field}` of rule `{rule}`"),
            None => format!(" in `{field}`"),
        }
    }
}

fn find_quoted(text: &str, from: usize, needle: &str) -> Option<usize> {
    let quoted = format!("\"{needle}\"");
    text.get(from..)?.find(&quoted).map(|i| from + i)
}

fn line_at(text: &str, offset: usize) -> usize {
    text[..offset].matches('\n').count() + 1
}

/// Known detector names and classes: built-ins plus custom ones.
struct Detectors {
    classes: HashMap<String, DetectorClass>,
}

impl Detectors {
    fn all_names(&self) -> impl Iterator<Item = &str> {
        self.classes.keys().map(String::as_str)
    }

    /// Resolve names and groups; `None` means "any detector".
    fn resolve(
        &self,
        ctx: &Ctx,
        field: &str,
        names: &[String],
    ) -> Result<Option<Vec<Arc<str>>>, PolicyError> {
        let mut out: Vec<Arc<str>> = Vec::new();
        for name in names {
            match group_class(name) {
                Some(None) => return Ok(None),
                Some(Some(class)) => out.extend(
                    self.classes
                        .iter()
                        .filter(|(_, c)| **c == class)
                        .map(|(n, _)| Arc::from(n.as_str())),
                ),
                None => {
                    self.check(ctx, field, name)?;
                    out.push(Arc::from(name.as_str()));
                }
            }
        }
        out.sort();
        out.dedup();
        Ok(Some(out))
    }

    fn check(&self, ctx: &Ctx, field: &str, name: &str) -> Result<(), PolicyError> {
        if self.classes.contains_key(name) {
            return Ok(());
        }
        let candidates = self.all_names().chain(DETECTOR_GROUPS.iter().copied());
        let hint = did_you_mean(name, candidates);
        Err(ctx.err(
            Some(name),
            format!("unknown detector `{name}`{}{hint}", ctx.place(field)),
        ))
    }
}

/// Validate and combine parsed files (already in load order).
pub(crate) fn compile(files: &[ParsedFile]) -> Result<CompiledPolicy, PolicyError> {
    let base = find_base(files)?;
    let detectors = known_detectors(files)?;
    let settings = merge_detector_settings(files, &detectors)?;

    let mut rules = Vec::new();
    let mut udp = Vec::new();
    let mut seen: HashMap<&str, &ParsedFile> = HashMap::new();
    for (index, file) in files.iter().enumerate() {
        let mut cursor = 0;
        for rule in &file.policy.rules {
            let from = find_quoted(&file.text, cursor, &rule.name).unwrap_or(cursor);
            cursor = from + 1;
            let ctx = Ctx {
                file,
                rule: Some(&rule.name),
                from,
            };
            if rule.name.trim().is_empty() {
                return Err(ctx.err(None, "a rule has an empty name".into()));
            }
            if rule.name == DEFAULT_RULE {
                return Err(ctx.err(
                    None,
                    format!("`{DEFAULT_RULE}` is reserved for the default action; rename the rule"),
                ));
            }
            if let Some(first) = seen.insert(&rule.name, file) {
                return Err(ctx.err(
                    None,
                    format!(
                        "duplicate rule name `{}` (first defined in {})",
                        rule.name,
                        first.path.display()
                    ),
                ));
            }
            let compiled = compile_rule(&ctx, index, rule, &detectors)?;
            if let Some(u) = super::udp::udp_rule(&ctx, &compiled)? {
                udp.push(u);
            }
            rules.push(compiled);
        }
    }

    let base_file = &files[base];
    let base_ctx = Ctx {
        file: base_file,
        rule: None,
        from: 0,
    };
    let default_action = base_file
        .policy
        .default
        .as_ref()
        .expect("find_base checked that the base sets `default`");
    let default = compile_action(&base_ctx, DEFAULT_RULE, default_action, &detectors)?;
    let default_reason = match &default {
        Verdict::Block { reason } | Verdict::RequireApproval { reason, .. } => reason.clone(),
        _ => Arc::from("no rule matched; the policy's default applies"),
    };

    Ok(CompiledPolicy {
        name: Arc::from(base_file.policy.name.as_str()),
        mode: base_file.policy.mode.expect("find_base checked `mode`"),
        default,
        default_reason,
        default_rule_name: Arc::from(DEFAULT_RULE),
        rules,
        detectors: settings,
        files: files.iter().map(|f| f.path.clone()).collect(),
        version: 0,
        udp,
    })
}

/// The one file that sets `mode` and `default`.
fn find_base(files: &[ParsedFile]) -> Result<usize, PolicyError> {
    let mut base: Option<usize> = None;
    for (i, f) in files.iter().enumerate() {
        let p = &f.policy;
        match (p.mode.is_some(), p.default.is_some()) {
            (false, false) => {}
            (true, true) => {
                if let Some(prev) = base {
                    return Err(PolicyError::Combine {
                        message: format!(
                            "both {} and {} set `mode` and `default`; exactly one file (the base) may set them, the others add rules",
                            files[prev].path.display(),
                            f.path.display()
                        ),
                    });
                }
                base = Some(i);
            }
            (has_mode, _) => {
                let (set, missing) = if has_mode {
                    ("mode", "default")
                } else {
                    ("default", "mode")
                };
                return Err(PolicyError::Invalid {
                    file: f.path.clone(),
                    rule: None,
                    line: None,
                    message: format!(
                        "sets `{set}` but not `{missing}`; the base file sets both, other files set neither"
                    ),
                });
            }
        }
    }
    base.ok_or_else(|| PolicyError::Combine {
        message: format!(
            "no file sets `mode` and `default` (files: {}); add them to one base file",
            files
                .iter()
                .map(|f| f.path.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    })
}

fn known_detectors(files: &[ParsedFile]) -> Result<Detectors, PolicyError> {
    let mut classes: HashMap<String, DetectorClass> = BUILTIN_DETECTORS
        .iter()
        .map(|(n, c)| ((*n).to_owned(), *c))
        .collect();
    for file in files {
        let ctx = Ctx {
            file,
            rule: None,
            from: 0,
        };
        for custom in &file.policy.detectors.custom {
            let name = custom.name.as_str();
            let valid_name = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
            if !valid_name {
                return Err(ctx.err(
                    Some(name),
                    format!("custom detector name `{name}` must be kebab-case (a-z, 0-9, -)"),
                ));
            }
            if is_builtin(name) {
                return Err(ctx.err(
                    Some(name),
                    format!("custom detector `{name}` has the name of a built-in detector"),
                ));
            }
            if classes.insert(name.to_owned(), custom.class).is_some() {
                return Err(ctx.err(
                    Some(name),
                    format!("custom detector `{name}` is defined twice"),
                ));
            }
            let ctx = Ctx {
                file,
                rule: None,
                from: find_quoted(&file.text, 0, name).unwrap_or(0),
            };
            check_regex(&ctx, &format!("custom detector `{name}`"), &custom.regex)?;
            if let Some(super::schema::Validator::Entropy(bits)) = custom.validator {
                if !(bits > 0.0 && bits <= 8.0) {
                    return Err(ctx.err(
                        Some(name),
                        format!("custom detector `{name}`: Entropy({bits}) must be between 0 and 8 bits per character"),
                    ));
                }
            }
            build_globs(&ctx, "home", &custom.home, GlobKind::Host)?;
        }
    }
    Ok(Detectors { classes })
}

fn check_regex(ctx: &Ctx, place: &str, regex: &str) -> Result<(), PolicyError> {
    regex::Regex::new(regex).map(|_| ()).map_err(|e| {
        // The regex crate draws a caret diagram over several lines; keep
        // only its final "error: …" line.
        let text = e.to_string();
        let why = text
            .lines()
            .rev()
            .find_map(|l| l.trim().strip_prefix("error: "))
            .unwrap_or(text.as_str())
            .to_owned();
        ctx.err(None, format!("bad regex `{regex}` in {place}: {why}"))
    })
}

fn merge_detector_settings(
    files: &[ParsedFile],
    detectors: &Detectors,
) -> Result<DetectorSettings, PolicyError> {
    let mut merged = DetectorSettings::default();
    let mut mask_owner: BTreeMap<String, (MaskStyle, &PathBuf)> = BTreeMap::new();
    for file in files {
        let ctx = Ctx {
            file,
            rule: None,
            from: 0,
        };
        let s = &file.policy.detectors;
        for name in &s.disabled {
            detectors.check(&ctx, "detectors.disabled", name)?;
            if !merged.disabled.contains(name) {
                merged.disabled.push(name.clone());
            }
        }
        for (name, style) in &s.mask {
            detectors.check(&ctx, "detectors.mask", name)?;
            if let Some((other, path)) = mask_owner.get(name) {
                if other != style {
                    return Err(ctx.err(
                        Some(name),
                        format!(
                            "mask style of `{name}` is {style:?} here but {other:?} in {}",
                            path.display()
                        ),
                    ));
                }
            }
            mask_owner.insert(name.clone(), (*style, &file.path));
            merged.mask.insert(name.clone(), *style);
        }
        for entry in &s.allowlist {
            for name in &entry.detectors {
                detectors.check(&ctx, "detectors.allowlist", name)?;
            }
            check_regex(&ctx, "detectors.allowlist", &entry.regex)?;
            merged.allowlist.push(entry.clone());
        }
        merged.custom.extend(s.custom.iter().cloned());
    }
    Ok(merged)
}

#[derive(Clone, Copy)]
enum GlobKind {
    /// `*` stays within a `/`-separated segment; `**` crosses segments.
    Path,
    /// Case-insensitive; `*` matches any characters, dots included.
    Host,
}

fn build_globs(
    ctx: &Ctx,
    field: &str,
    patterns: &[String],
    kind: GlobKind,
) -> Result<Option<PatternSet>, PolicyError> {
    if patterns.is_empty() {
        return Ok(None);
    }
    let mut builder = GlobSetBuilder::new();
    for p in patterns {
        let mut glob = GlobBuilder::new(p);
        match kind {
            GlobKind::Path => glob.literal_separator(true),
            GlobKind::Host => glob.case_insensitive(true),
        };
        let glob = glob.build().map_err(|e| {
            ctx.err(
                Some(p),
                format!("bad glob `{p}`{}: {}", ctx.place(field), e.kind()),
            )
        })?;
        builder.add(glob);
    }
    let globs = builder
        .build()
        .map_err(|e| ctx.err(None, format!("bad globs{}: {e}", ctx.place(field))))?;
    Ok(Some(PatternSet { globs }))
}

fn compile_match(
    ctx: &Ctx,
    m: &Match,
    detectors: &Detectors,
) -> Result<CompiledMatch, PolicyError> {
    let mut cidr = Vec::with_capacity(m.cidr.len());
    for c in &m.cidr {
        let net = c
            .parse::<IpNet>()
            .or_else(|_| c.parse::<IpAddr>().map(IpNet::from))
            .map_err(|e| ctx.err(Some(c), format!("bad CIDR `{c}`{}: {e}", ctx.place("cidr"))))?;
        cidr.push(net.trunc());
    }
    for comm in &m.comm {
        if comm.len() > 15 {
            return Err(ctx.err(
                Some(comm),
                format!(
                    "comm `{comm}`{} is longer than 15 bytes; the kernel truncates comm, so it could never match (use `exe`)",
                    ctx.place("comm")
                ),
            ));
        }
    }
    let mut method = Vec::with_capacity(m.method.len());
    for x in &m.method {
        if x.is_empty() || !x.chars().all(|c| c.is_ascii_alphabetic()) {
            return Err(ctx.err(
                Some(x),
                format!("bad HTTP method `{x}`{}", ctx.place("method")),
            ));
        }
        method.push(x.to_ascii_uppercase());
    }
    let detector_set =
        |field: &str, names: &[String]| -> Result<Option<DetectorSet>, PolicyError> {
            if names.is_empty() {
                return Ok(None);
            }
            Ok(Some(match detectors.resolve(ctx, field, names)? {
                None => DetectorSet::Any,
                Some(names) => DetectorSet::Names(names),
            }))
        };
    Ok(CompiledMatch {
        exe: build_globs(ctx, "exe", &m.exe, GlobKind::Path)?,
        comm: m.comm.clone(),
        ancestor: build_globs(ctx, "ancestor", &m.ancestor, GlobKind::Path)?,
        user: m.user.clone(),
        group: m.group.clone(),
        uid: m.uid.clone(),
        cgroup: build_globs(ctx, "cgroup", &m.cgroup, GlobKind::Path)?,
        unit: build_globs(ctx, "unit", &m.unit, GlobKind::Path)?,
        host: build_globs(ctx, "host", &m.host, GlobKind::Host)?,
        cidr,
        port: m.port.clone(),
        protocol: m.protocol.clone(),
        method,
        path: build_globs(ctx, "path", &m.path, GlobKind::Path)?,
        findings: detector_set("findings", &m.findings)?,
        leaving_home: detector_set("leaving_home", &m.leaving_home)?,
    })
}

fn compile_action(
    ctx: &Ctx,
    rule: &str,
    action: &Action,
    detectors: &Detectors,
) -> Result<Verdict, PolicyError> {
    let who = if rule == DEFAULT_RULE {
        "the policy's default".to_owned()
    } else {
        format!("rule `{rule}`")
    };
    Ok(match action {
        Action::Allow => Verdict::Allow,
        Action::AuditOnly => Verdict::AuditOnly,
        Action::Block { reason } => Verdict::Block {
            reason: Arc::from(
                reason
                    .clone()
                    .unwrap_or_else(|| format!("blocked by {who}")),
            ),
        },
        Action::Mask {
            detectors: names,
            except_home,
        } => {
            let names = if names.is_empty() {
                None
            } else {
                detectors.resolve(ctx, "Mask.detectors", names)?
            };
            Verdict::Mask(MaskScope {
                detectors: names.map(Arc::from),
                except_home: *except_home,
            })
        }
        Action::RequireApproval { timeout, reason } => {
            if timeout.is_zero() {
                return Err(ctx.err(None, format!("RequireApproval in {who} has a zero timeout")));
            }
            Verdict::RequireApproval {
                timeout: *timeout,
                reason: Arc::from(
                    reason
                        .clone()
                        .unwrap_or_else(|| format!("approval required by {who}")),
                ),
            }
        }
    })
}

fn compile_rule(
    ctx: &Ctx,
    file: usize,
    rule: &Rule,
    detectors: &Detectors,
) -> Result<CompiledRule, PolicyError> {
    let when = compile_match(ctx, &rule.when, detectors)?;
    let unless = match &rule.unless {
        Some(m) => Some(compile_match(ctx, m, detectors)?),
        None => None,
    };
    let verdict = compile_action(ctx, &rule.name, &rule.action, detectors)?;
    let reason: Arc<str> = match (&verdict, &rule.description) {
        (Verdict::Block { reason } | Verdict::RequireApproval { reason, .. }, _) => reason.clone(),
        (_, Some(description)) => Arc::from(description.as_str()),
        (_, None) => Arc::from(format!("rule `{}` matched", rule.name)),
    };
    Ok(CompiledRule {
        name: Arc::from(rule.name.as_str()),
        file,
        source: rule.clone(),
        when,
        unless,
        verdict,
        reason,
    })
}
