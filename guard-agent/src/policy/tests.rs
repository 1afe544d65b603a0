//! Scenarios for the policy module: the shipped policies, each matcher,
//! errors users will see, monitor mode and reload.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

fn policy(text: &str) -> CompiledPolicy {
    load_sources(&[("test.ron", text)]).unwrap_or_else(|e| panic!("{e}"))
}

fn error(text: &str) -> PolicyError {
    load_sources(&[("test.ron", text)]).expect_err("policy should be rejected")
}

/// A policy whose only rule has the given `when` and blocks; default Allow.
fn one_rule(when: &str) -> CompiledPolicy {
    policy(&format!(
        r#"Policy(name: "t", mode: Enforce, default: Allow,
            rules: [Rule(name: "r", when: {when}, action: Block(reason: "matched"))])"#
    ))
}

fn matches(p: &CompiledPolicy, facts: &RequestFacts) -> bool {
    p.decide(facts).rule.as_ref() == "r"
}

fn to_host(host: &str) -> RequestFacts {
    RequestFacts {
        dest_host: Some(host.into()),
        dest_port: Some(443),
        protocol: Some(Protocol::Https),
        method: Some("POST".into()),
        path: Some("/".into()),
        ..Default::default()
    }
}

fn with_finding(mut facts: RequestFacts, detector: &str, goes_home: bool) -> RequestFacts {
    facts.findings.push(FindingFact::new(detector, goes_home));
    facts
}

fn repo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies")
}

// ---- shipped policies ----------------------------------------------------

#[test]
fn every_shipped_policy_compiles() {
    let dir = repo_dir();
    let p = load_dir(&dir).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.name(), "default");
    let examples = dir.join("examples");
    let mut count = 0;
    for entry in std::fs::read_dir(&examples).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "ron") {
            load_files(std::slice::from_ref(&path)).unwrap_or_else(|e| panic!("{e}"));
            count += 1;
        }
    }
    assert!(count >= 3, "expected the three examples, found {count}");
}

#[test]
fn default_policy_lets_secrets_go_home_and_masks_them_elsewhere() {
    let p = load_dir(&repo_dir()).unwrap();

    let home = p.decide(&with_finding(
        to_host("api.github.com"),
        "github-token",
        true,
    ));
    assert_eq!(home.action, Verdict::Allow);
    assert_eq!(home.rule.as_ref(), "secrets-going-home");

    let away = p.decide(&with_finding(to_host("example.com"), "github-token", false));
    let Verdict::Mask(scope) = &away.action else {
        panic!("expected Mask, got {away}");
    };
    assert_eq!(away.rule.as_ref(), "secrets-leaving-home");
    assert!(scope.applies_to("github-token", false));
    assert!(
        !scope.applies_to("github-token", true),
        "a token going home stays"
    );
    assert!(
        scope.applies_to("credit-card", false),
        "cards in the same request too"
    );
}

#[test]
fn default_policy_masks_cards_records_emails_and_blocks_nothing() {
    let p = load_dir(&repo_dir()).unwrap();

    let card = p.decide(&with_finding(to_host("example.com"), "credit-card", false));
    assert!(matches!(card.action, Verdict::Mask(_)), "{card}");
    assert_eq!(p.mask_style("credit-card"), MaskStyle::Last4);

    let card_to_stripe = p.decide(&with_finding(
        to_host("api.stripe.com"),
        "credit-card",
        false,
    ));
    assert_eq!(card_to_stripe.action, Verdict::Allow);

    let email = p.decide(&with_finding(to_host("example.com"), "email", false));
    assert_eq!(email.action, Verdict::AuditOnly);
    assert_eq!(email.rule.as_ref(), "contact-details-recorded");

    let plain = p.decide(&to_host("anything.example"));
    assert_eq!(plain.action, Verdict::Allow);
    assert_eq!(plain.rule.as_ref(), DEFAULT_RULE);
}

#[test]
fn ci_example_blocks_unknown_hosts_and_allows_registries() {
    let p = load_files(&[repo_dir().join("examples/ci-strict-allowlist.ron")]).unwrap();
    assert_eq!(
        p.decide(&to_host("registry.npmjs.org")).action,
        Verdict::Allow
    );
    assert_eq!(
        p.decide(&to_host("objects.githubusercontent.com")).action,
        Verdict::Allow
    );
    let mut push = to_host("api.github.com");
    push.ancestors = vec!["/usr/bin/bash".into(), "/home/ci/.cargo/bin/cargo".into()];
    let d = p.decide(&push);
    assert_eq!(d.rule.as_ref(), "no-writes-to-code-host-from-tests", "{d}");
    push.ancestors.clear();
    assert_eq!(p.decide(&push).rule.as_ref(), "code-host");
    let other = p.decide(&to_host("evil.example"));
    assert_eq!(other.rule.as_ref(), DEFAULT_RULE);
    assert!(
        matches!(&other.action, Verdict::Block { reason } if reason.contains("allowlist")),
        "{other}"
    );
}

#[test]
fn llm_example_monitors_masking_of_prompts() {
    let p = load_files(&[repo_dir().join("examples/llm-apis.ron")]).unwrap();
    let facts = with_finding(
        with_finding(to_host("api.openai.com"), "openai-key", true),
        "email",
        false,
    );
    let d = p.decide(&facts);
    assert_eq!(d.mode, Mode::Monitor);
    assert_eq!(d.action, Verdict::AuditOnly, "monitor changes nothing");
    let Some(Verdict::Mask(scope)) = &d.would_have else {
        panic!("expected would_have Mask, got {d}");
    };
    assert!(scope.applies_to("email", false));
    assert!(!scope.applies_to("openai-key", true));
}

// ---- first match, default, actions ---------------------------------------

#[test]
fn first_matching_rule_wins_and_names_itself() {
    let p = policy(
        r#"Policy(name: "t", mode: Enforce, default: Block(reason: "nope"), rules: [
            Rule(name: "first", when: (host: ["*.example.com"]), action: AuditOnly),
            Rule(name: "second", when: (host: ["api.example.com"]), action: Allow),
        ])"#,
    );
    let d = p.decide(&to_host("api.example.com"));
    assert_eq!((d.rule.as_ref(), &d.action), ("first", &Verdict::AuditOnly));
    let d = p.decide(&to_host("example.org"));
    assert_eq!(d.rule.as_ref(), "default");
    assert_eq!(
        d.action,
        Verdict::Block {
            reason: "nope".into()
        }
    );
}

#[test]
fn require_approval_is_its_own_verdict_for_the_caller() {
    let p = one_rule("()");
    assert!(matches!(
        p.decide(&to_host("a")).action,
        Verdict::Block { .. }
    ));
    let p = policy(
        r#"Policy(name: "t", mode: Enforce, default: Allow, rules: [
            Rule(name: "hold", action: RequireApproval(timeout: "90s", reason: "uploads")),
        ])"#,
    );
    let d = p.decide(&to_host("a"));
    assert_eq!(
        d.action,
        Verdict::RequireApproval {
            timeout: Duration::from_secs(90),
            reason: "uploads".into()
        }
    );
    assert_eq!(d.reason.as_ref(), "uploads");
}

#[test]
fn unless_excepts_a_matching_rule() {
    let p = policy(
        r#"Policy(name: "t", mode: Enforce, default: Allow, rules: [
            Rule(name: "r", when: (port: [443]), unless: (host: ["ok.example"]), action: AuditOnly),
        ])"#,
    );
    assert_eq!(p.decide(&to_host("other.example")).rule.as_ref(), "r");
    assert_eq!(p.decide(&to_host("ok.example")).rule.as_ref(), "default");
}

// ---- each matcher ----------------------------------------------------------

#[test]
fn exe_glob_stays_within_a_directory_unless_double_star() {
    let p = one_rule(r#"(exe: ["/usr/bin/*"])"#);
    let mut f = to_host("a");
    f.exe = Some("/usr/bin/curl".into());
    assert!(matches(&p, &f));
    f.exe = Some("/usr/bin/sub/curl".into());
    assert!(!matches(&p, &f));
    f.exe = None;
    assert!(!matches(&p, &f), "an unknown exe matches no exe condition");

    let p = one_rule(r#"(exe: ["**/node"])"#);
    f.exe = Some("/home/me/.nvm/versions/node/v22/bin/node".into());
    assert!(matches(&p, &f));
}

#[test]
fn comm_user_group_and_uid_match_exactly() {
    let mut f = to_host("a");
    f.comm = Some("curl".into());
    f.user = Some("alice".into());
    f.groups = vec!["users".into(), "docker".into()];
    f.uid = Some(1000);
    assert!(matches(&one_rule(r#"(comm: ["wget", "curl"])"#), &f));
    assert!(!matches(&one_rule(r#"(comm: ["cur"])"#), &f));
    assert!(matches(&one_rule(r#"(user: ["alice"])"#), &f));
    assert!(!matches(&one_rule(r#"(user: ["bob"])"#), &f));
    assert!(matches(&one_rule(r#"(group: ["docker"])"#), &f));
    assert!(!matches(&one_rule(r#"(group: ["wheel"])"#), &f));
    assert!(matches(&one_rule("(uid: [0, 1000])"), &f));
    assert!(!matches(&one_rule("(uid: [0])"), &f));
}

#[test]
fn ancestor_matches_anything_started_by_node() {
    let p = one_rule(r#"(ancestor: ["**/node"])"#);
    let mut f = to_host("a");
    f.exe = Some("/usr/bin/git".into());
    f.ancestors = vec![
        "/bin/sh".into(),
        "/usr/local/bin/node".into(),
        "/usr/bin/bash".into(),
    ];
    assert!(matches(&p, &f));
    f.ancestors = vec!["/bin/sh".into(), "/usr/bin/bash".into()];
    assert!(!matches(&p, &f));
}

#[test]
fn cgroup_and_systemd_unit_globs() {
    let mut f = to_host("a");
    f.cgroup = Some("/system.slice/docker-abc.scope".into());
    f.systemd_unit = Some("docker-abc.scope".into());
    assert!(matches(&one_rule(r#"(cgroup: ["/system.slice/**"])"#), &f));
    assert!(!matches(&one_rule(r#"(cgroup: ["/user.slice/**"])"#), &f));
    assert!(matches(&one_rule(r#"(unit: ["docker-*.scope"])"#), &f));
    assert!(!matches(&one_rule(r#"(unit: ["ssh.service"])"#), &f));
}

#[test]
fn host_glob_is_case_insensitive_and_ignores_the_root_dot() {
    let p = one_rule(r#"(host: ["*.github.com"])"#);
    assert!(matches(&p, &to_host("API.GitHub.com.")));
    assert!(
        !matches(&p, &to_host("github.com")),
        "`*.x` does not match `x`"
    );
    assert!(!matches(&p, &to_host("github.com.evil.example")));
    let mut f = to_host("x");
    f.dest_host = None;
    assert!(!matches(&p, &f));
}

#[test]
fn cidr_matches_v4_and_v6_and_bare_addresses() {
    let p = one_rule(r#"(cidr: ["10.0.0.0/8", "fd00::/8", "192.0.2.7"])"#);
    let mut f = to_host("a");
    for (ip, expected) in [
        ("10.1.2.3", true),
        ("11.0.0.1", false),
        ("fd12::1", true),
        ("::1", false),
        ("192.0.2.7", true),
        ("192.0.2.8", false),
    ] {
        f.dest_ip = Some(ip.parse::<IpAddr>().unwrap());
        assert_eq!(matches(&p, &f), expected, "{ip}");
    }
}

#[test]
fn port_and_port_range() {
    let p = one_rule(r#"(port: [22, "8000-8999"])"#);
    let mut f = to_host("a");
    for (port, expected) in [
        (22, true),
        (8000, true),
        (8999, true),
        (9000, false),
        (443, false),
    ] {
        f.dest_port = Some(port);
        assert_eq!(matches(&p, &f), expected, "{port}");
    }
}

#[test]
fn protocol_method_and_path_glob() {
    let f = to_host("a"); // Https, POST, "/"
    assert!(matches(&one_rule("(protocol: [Https, Http])"), &f));
    assert!(!matches(&one_rule("(protocol: [Tls])"), &f));
    assert!(matches(&one_rule(r#"(method: ["get", "post"])"#), &f));
    assert!(!matches(&one_rule(r#"(method: ["GET"])"#), &f));

    let p = one_rule(r#"(path: ["/v1/files/*"])"#);
    let mut f = f;
    f.path = Some("/v1/files/abc?purpose=x".into());
    assert!(matches(&p, &f), "the query is ignored");
    f.path = Some("/v1/files/abc/content".into());
    assert!(!matches(&p, &f), "`*` stays within a segment");
    assert!(matches(&one_rule(r#"(path: ["/v1/**"])"#), &f));
}

#[test]
fn findings_by_name_and_by_group() {
    let f = with_finding(to_host("a"), "credit-card", false);
    assert!(matches(
        &one_rule(r#"(findings: ["iban", "credit-card"])"#),
        &f
    ));
    assert!(!matches(&one_rule(r#"(findings: ["iban"])"#), &f));
    assert!(matches(&one_rule(r#"(findings: ["@pii"])"#), &f));
    assert!(!matches(&one_rule(r#"(findings: ["@secret"])"#), &f));
    assert!(matches(&one_rule(r#"(findings: ["@any"])"#), &f));
    assert!(!matches(
        &one_rule(r#"(findings: ["@any"])"#),
        &to_host("a")
    ));
}

#[test]
fn leaving_home_needs_the_finding_and_a_foreign_destination() {
    let p = one_rule(r#"(leaving_home: ["github-token"])"#);
    let home = with_finding(to_host("api.github.com"), "github-token", true);
    let away = with_finding(to_host("example.com"), "github-token", false);
    assert!(!matches(&p, &home));
    assert!(matches(&p, &away));
    assert!(!matches(
        &p,
        &with_finding(to_host("x"), "slack-token", false)
    ));
    // One token going home does not hide another one leaving.
    let both = with_finding(home.clone(), "github-token", false);
    assert!(matches(&p, &both));
}

#[test]
fn custom_detectors_are_known_names_and_join_their_group() {
    let p = policy(
        r#"Policy(name: "t", mode: Enforce, default: Allow,
            detectors: (custom: [(name: "acme-token", regex: "acme_[a-z]{8}", validator: Entropy(3.0))]),
            rules: [Rule(name: "r", when: (findings: ["@secret"]), action: Mask(detectors: ["acme-token"]))])"#,
    );
    let d = p.decide(&with_finding(to_host("a"), "acme-token", false));
    assert_eq!(d.rule.as_ref(), "r");
    assert_eq!(p.detectors().custom[0].name, "acme-token");
}

// ---- monitor mode ------------------------------------------------------------

#[test]
fn monitor_mode_changes_nothing_but_says_what_it_would_have_done() {
    let p = policy(
        r#"Policy(name: "t", mode: Monitor, default: Allow, rules: [
            Rule(name: "r", when: (host: ["evil.example"]), action: Block(reason: "exfil")),
        ])"#,
    );
    let d = p.decide(&to_host("evil.example"));
    assert_eq!(d.mode, Mode::Monitor);
    assert_eq!(d.action, Verdict::AuditOnly);
    assert_eq!(
        d.would_have,
        Some(Verdict::Block {
            reason: "exfil".into()
        })
    );
    assert_eq!(d.rule.as_ref(), "r");

    let d = p.decide(&to_host("fine.example"));
    assert_eq!(d.action, Verdict::Allow);
    assert_eq!(d.would_have, Some(Verdict::Allow));
}

// ---- explain -------------------------------------------------------------------

#[test]
fn explain_traces_every_rule_and_agrees_with_decide() {
    let p = policy(
        r#"Policy(name: "t", mode: Enforce, default: Allow, rules: [
            Rule(name: "wrong-port", when: (port: [22]), action: Block()),
            Rule(name: "wrong-host", when: (host: ["*.internal"]), action: Block()),
            Rule(name: "excepted", when: (port: [443]), unless: (method: ["POST"]), action: Block()),
            Rule(name: "cards", when: (findings: ["credit-card"]), action: Mask()),
            Rule(name: "later", action: Block()),
        ])"#,
    );
    let facts = with_finding(to_host("shop.example"), "credit-card", false);
    let e = p.explain(&facts);
    assert_eq!(e.decision, p.decide(&facts));
    assert_eq!(e.decision.rule.as_ref(), "cards");
    let outcomes: Vec<&RuleOutcome> = e.trace.iter().map(|t| &t.outcome).collect();
    assert!(matches!(
        outcomes[0],
        RuleOutcome::NotMatched { condition: Condition::Port, detail } if detail.contains("port `443`") && detail.contains("`22`")
    ));
    assert!(matches!(
        outcomes[1],
        RuleOutcome::NotMatched { condition: Condition::Host, detail } if detail.contains("shop.example")
    ));
    assert_eq!(outcomes[2], &RuleOutcome::Excepted);
    assert_eq!(outcomes[3], &RuleOutcome::Matched);
    assert_eq!(outcomes[4], &RuleOutcome::NotReached);
    let text = e.to_string();
    assert!(text.contains("MATCHED"), "{text}");
}

// ---- errors users will see --------------------------------------------------

#[test]
fn syntax_error_names_file_line_and_column() {
    let e = error("Policy(\n    name: \"t\",\n    mode: Enforce\n    default: Allow,\n)");
    let PolicyError::Parse {
        file, line, column, ..
    } = &e
    else {
        panic!("{e}");
    };
    assert_eq!(file, Path::new("test.ron"));
    assert_eq!(*line, 4, "{e}");
    assert!(*column >= 5, "{e}");
    assert!(e.to_string().starts_with("test.ron:4:"), "{e}");
}

#[test]
fn unknown_field_suggests_the_closest_one() {
    let e = error(
        "Policy(name: \"t\", mode: Enforce, default: Allow, rules: [\n  Rule(name: \"r\", when: (hots: [\"a\"]), action: Allow),\n])",
    );
    let msg = e.to_string();
    assert!(msg.starts_with("test.ron:2:"), "{msg}");
    assert!(msg.contains("unknown field `hots`"), "{msg}");
    assert!(msg.contains("did you mean `host`?"), "{msg}");
}

#[test]
fn unknown_variant_suggests_the_closest_one() {
    let e = error("Policy(name: \"t\", mode: Enforse, default: Allow)");
    let msg = e.to_string();
    assert!(msg.contains("unknown variant `Enforse`"), "{msg}");
    assert!(msg.contains("did you mean `Enforce`?"), "{msg}");
    let e = error("Policy(name: \"t\", mode: Enforce, default: Alow)");
    assert!(e.to_string().contains("did you mean `Allow`?"), "{e}");
}

#[test]
fn unknown_detector_names_rule_line_and_suggestion() {
    let e = error(
        r#"Policy(name: "t", mode: Enforce, default: Allow, rules: [
    Rule(name: "audit", action: AuditOnly, when: (port: [1])),
    Rule(
        name: "mask-cards",
        when: (findings: ["credit-crad"]),
        action: Mask(),
    ),
])"#,
    );
    let PolicyError::Invalid { rule, line, .. } = &e else {
        panic!("{e}");
    };
    assert_eq!(rule.as_deref(), Some("mask-cards"));
    assert_eq!(*line, Some(5));
    assert_eq!(
        e.to_string(),
        "test.ron:5: unknown detector `credit-crad` in `findings` of rule `mask-cards`, did you mean `credit-card`?"
    );
}

#[test]
fn validation_errors_name_the_rule() {
    let cases = [
        (r#"(host: ["a[b"])"#, "bad glob `a[b` in `host` of rule `r`"),
        (
            r#"(cidr: ["10.0.0/8"])"#,
            "bad CIDR `10.0.0/8` in `cidr` of rule `r`",
        ),
        (r#"(method: ["GE T"])"#, "bad HTTP method"),
        (
            r#"(comm: ["a-very-long-process-name"])"#,
            "longer than 15 bytes",
        ),
        (r#"(leaving_home: ["@secrets"])"#, "did you mean `@secret`?"),
    ];
    for (when, expected) in cases {
        let e = load_sources(&[(
            "test.ron",
            &format!(
                "Policy(name: \"t\", mode: Enforce, default: Allow, rules: [\n Rule(name: \"r\", when: {when}, action: Allow)])"
            ),
        )])
        .expect_err(when);
        let msg = e.to_string();
        assert!(msg.contains(expected), "{when}: {msg}");
        assert!(msg.starts_with("test.ron:2:"), "{when}: {msg}");
    }
}

#[test]
fn bad_port_range_is_a_parse_error_with_position() {
    let e = error("Policy(name: \"t\", mode: Enforce, default: Allow, rules: [\n Rule(name: \"r\", when: (port: [\"90-80\"]), action: Allow)])");
    let msg = e.to_string();
    assert!(msg.starts_with("test.ron:2:"), "{msg}");
    assert!(msg.contains("start is greater than end"), "{msg}");
}

#[test]
fn bad_custom_regex_and_duplicate_rule_names_are_rejected() {
    let e = error(
        r#"Policy(name: "t", mode: Enforce, default: Allow,
            detectors: (custom: [(name: "x-token", regex: "x_[a-z")]))"#,
    );
    assert_eq!(
        e.to_string(),
        "test.ron:2: bad regex `x_[a-z` in custom detector `x-token`: unclosed character class"
    );

    let e = error(
        "Policy(name: \"t\", mode: Enforce, default: Allow, rules: [\n Rule(name: \"r\", action: Allow),\n Rule(name: \"r\", action: Block()),\n])",
    );
    assert_eq!(
        e.to_string(),
        "test.ron:3: duplicate rule name `r` (first defined in test.ron)"
    );

    let e = error(
        r#"Policy(name: "t", mode: Enforce, default: Allow,
            detectors: (mask: {"emial": Token}))"#,
    );
    assert!(e.to_string().contains("did you mean `email`?"), "{e}");
}

// ---- several files -------------------------------------------------------------

#[test]
fn fragments_add_rules_in_file_order_and_one_base_sets_mode() {
    let base = r#"Policy(name: "base", mode: Enforce, default: Allow,
        rules: [Rule(name: "base-rule", when: (port: [22]), action: Block())])"#;
    let extra = r#"Policy(name: "extra", rules: [Rule(name: "extra-rule", action: AuditOnly)])"#;
    let p = load_sources(&[("10-base.ron", base), ("20-extra.ron", extra)]).unwrap();
    assert_eq!(p.name(), "base");
    assert_eq!(
        p.rule_names().collect::<Vec<_>>(),
        ["base-rule", "extra-rule"]
    );
    assert_eq!(p.decide(&to_host("a")).rule.as_ref(), "extra-rule");

    let e = load_sources(&[("a.ron", base), ("b.ron", base)]).unwrap_err();
    assert!(
        e.to_string().contains("both a.ron and b.ron set `mode`"),
        "{e}"
    );
    let half = r#"Policy(name: "half", mode: Monitor)"#;
    let e = load_sources(&[("a.ron", base), ("b.ron", half)]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "b.ron: sets `mode` but not `default`; the base file sets both, other files set neither"
    );
    let e = load_sources(&[("a.ron", extra)]).unwrap_err();
    assert!(
        e.to_string().contains("no file sets `mode` and `default`"),
        "{e}"
    );
    let e = load_sources(&[
        ("a.ron", base),
        ("b.ron", base.replace("base\"", "other\"").as_str()),
    ])
    .unwrap_err();
    assert!(e.to_string().contains("set `mode` and `default`"), "{e}");
}

// ---- reload --------------------------------------------------------------------

#[test]
fn reload_swaps_in_a_good_policy_and_keeps_the_last_good_one_on_error() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
    write(
        "base.ron",
        r#"Policy(name: "v1", mode: Enforce, default: Allow)"#,
    );
    let store = PolicyStore::open(dir.path()).unwrap();
    assert_eq!(store.version(), 1);
    let before = store.current();

    write(
        "base.ron",
        r#"Policy(name: "v2", mode: Enforce, default: Block(reason: "closed"))"#,
    );
    assert_eq!(store.reload(dir.path()).unwrap(), 2);
    assert_eq!(store.current().name(), "v2");
    assert_eq!(store.current().version(), 2);
    assert_eq!(before.name(), "v1", "a snapshot taken earlier is unchanged");

    // A second file with a typo: the whole directory is refused.
    write(
        "extra.ron",
        r#"Policy(name: "x", rules: [Rule(name: "r", when: (findings: ["jwtt"]), action: Allow)])"#,
    );
    let e = store.reload(dir.path()).unwrap_err();
    assert!(e.to_string().contains("extra.ron"), "{e}");
    assert_eq!(store.version(), 2);
    assert_eq!(store.current().name(), "v2");

    std::fs::remove_file(dir.path().join("extra.ron")).unwrap();
    std::fs::remove_file(dir.path().join("base.ron")).unwrap();
    assert!(matches!(
        store.reload(dir.path()),
        Err(PolicyError::NoFiles { .. })
    ));
    assert_eq!(store.current().name(), "v2");
}

#[test]
fn the_annotated_example_in_the_readme_compiles_and_behaves() {
    let readme = std::fs::read_to_string(repo_dir().join("README.md")).unwrap();
    let start = readme.find("```ron\n").expect("a ```ron block") + "```ron\n".len();
    let len = readme[start..].find("```").unwrap();
    let p = policy(&readme[start..start + len]);
    assert_eq!(p.name(), "acme-laptops");
    assert!(!p.detector_enabled("private-ip"));

    let mut f = with_finding(to_host("pastebin.example"), "acme-internal-token", false);
    f.ancestors = vec!["/home/me/.local/bin/claude".into()];
    assert_eq!(p.decide(&f).rule.as_ref(), "agents-no-secrets-out");

    let mut f = to_host("api.openai.com");
    f.path = Some("/v1/files".into());
    let d = p.decide(&f);
    assert!(matches!(d.action, Verdict::RequireApproval { .. }), "{d}");

    let card = with_finding(to_host("api.stripe.com"), "credit-card", false);
    assert_eq!(p.decide(&card).rule.as_ref(), DEFAULT_RULE);
}

#[test]
fn actions_can_leave_out_every_optional_field() {
    let p = policy(
        r#"Policy(name: "t", mode: Enforce, default: RequireApproval(), rules: [
            Rule(name: "b", when: (port: [1]), action: Block()),
        ])"#,
    );
    assert_eq!(
        p.decide(&to_host("a")).action,
        Verdict::RequireApproval {
            timeout: Duration::from_secs(120),
            reason: "approval required by the policy's default".into()
        }
    );
}

#[test]
fn dns_queries_are_decided_only_by_rules_that_name_dns() {
    let p = policy(
        r#"Policy(name: "p", mode: Enforce, default: Block(reason: "not allowed"), rules: [
            Rule(name: "loopback", when: (cidr: ["127.0.0.0/8"]), action: Allow),
            Rule(name: "no-evil-names", when: (host: ["*.evil.example"], protocol: [Dns]), action: Block()),
            Rule(name: "no-tunnels", when: (findings: ["dns-tunnel"], protocol: [Dns]), action: Block()),
        ])"#,
    );
    let q = |host: &str| RequestFacts {
        dest_host: Some(host.into()),
        dest_ip: Some("127.0.0.53".parse().unwrap()),
        dest_port: Some(53),
        protocol: Some(Protocol::Dns),
        ..Default::default()
    };
    let d = p.decide_dns(&q("c2.evil.example"));
    assert!(matches!(d.action, Verdict::Block { .. }), "{d}");
    assert_eq!(d.rule.as_ref(), "no-evil-names");
    // Neither the loopback rule nor the default (written for connections) decides a name.
    let d = p.decide_dns(&q("pypi.org"));
    assert_eq!(d.action, Verdict::Allow, "{d}");
    assert_eq!(d.rule.as_ref(), DEFAULT_RULE);
    let d = p.decide_dns(&with_finding(q("x.tunnel.example"), "dns-tunnel", false));
    assert_eq!(d.rule.as_ref(), "no-tunnels", "{d}");
}

#[test]
fn the_approval_example_holds_llm_uploads_for_two_minutes() {
    let p = load_files(&[repo_dir().join("examples/approval.ron")]).unwrap();
    let facts = RequestFacts {
        dest_host: Some("api.openai.com".into()),
        method: Some("POST".into()),
        path: Some("/v1/files".into()),
        ..Default::default()
    };
    let d = p.decide(&facts);
    assert_eq!(d.rule.as_ref(), "llm-file-uploads", "{d}");
    assert!(
        matches!(d.action, Verdict::RequireApproval { timeout, .. } if timeout == Duration::from_secs(120)),
        "{d}"
    );
    let facts = RequestFacts {
        dest_host: Some("pastebin.com".into()),
        ..Default::default()
    };
    assert!(matches!(
        p.decide(&facts).action,
        Verdict::RequireApproval { timeout, .. } if timeout == Duration::from_secs(120)
    ));
}

#[test]
fn udp_rules_keep_destinations_in_rule_order_and_never_match_connections() {
    let p = policy(
        r#"Policy(name: "t", mode: Enforce, default: Allow, rules: [
            Rule(name: "dev-udp-ok", when: (protocol: [Udp], cidr: ["10.1.0.0/16"], port: [5000]), action: Allow),
            Rule(name: "no-udp-internal", when: (protocol: [Udp], cidr: ["10.0.0.0/8", "fd00::/8"], port: ["5000-5009"]), action: Block()),
            Rule(name: "no-udp-at-all", when: (protocol: [Udp]), action: Block(reason: "no UDP")),
            Rule(name: "tcp-only", when: (cidr: ["10.0.0.0/8"]), action: AuditOnly),
        ])"#,
    );
    let udp = p.udp_rules();
    assert_eq!(udp.len(), 3);
    assert_eq!(udp[0].name, "dev-udp-ok");
    assert!(udp[0].allow);
    assert_eq!(udp[1].nets.len(), 2);
    assert_eq!(udp[1].entry_count(), 20);
    assert!(udp[2].nets.is_empty() && udp[2].ports.is_empty() && !udp[2].allow);
    assert_eq!(udp[2].entry_count(), 2);
    // A TCP connection to the same place is decided by the other rules.
    let facts = RequestFacts {
        dest_ip: Some("10.1.2.3".parse().unwrap()),
        dest_port: Some(5000),
        protocol: Some(Protocol::Tcp),
        ..Default::default()
    };
    assert_eq!(p.decide(&facts).rule.as_ref(), "tcp-only");
}

#[test]
fn udp_rules_are_not_applied_in_monitor_mode() {
    let p = policy(
        r#"Policy(name: "t", mode: Monitor, default: Allow, rules: [
            Rule(name: "u", when: (protocol: [Udp], port: [9999]), action: Block()),
        ])"#,
    );
    assert!(p.udp_rules().is_empty());
}

#[test]
fn udp_rules_with_conditions_the_kernel_cannot_see_are_errors_naming_file_line_and_rule() {
    let cases = [
        (
            r#"when: (protocol: [Udp], host: ["*.example.com"], port: [443]), action: Block()"#,
            "rule `r` lists protocol Udp but also `host`",
        ),
        (
            r#"when: (protocol: [Udp, Tcp], exe: ["**/curl"], path: ["/x"]), action: Block()"#,
            "also `exe`, `path`",
        ),
        (
            r#"when: (protocol: [Udp], port: [9999]), unless: (cidr: ["10.0.0.0/8"]), action: Block()"#,
            "cannot have exceptions",
        ),
        (
            r#"when: (protocol: [Udp], port: [9999]), action: AuditOnly"#,
            "with action AuditOnly: UDP rules can only Allow or Block",
        ),
        (
            r#"when: (protocol: [Udp], cidr: ["10.0.0.0/8", "::/0"], port: ["1000-9000"]), action: Block()"#,
            "narrow its port ranges",
        ),
    ];
    for (body, expected) in cases {
        let text = format!(
            "Policy(name: \"t\", mode: Enforce, default: Allow, rules: [\n Rule(name: \"ok\", action: Allow),\n Rule(name: \"r\", {body})])"
        );
        let msg = load_sources(&[("udp.ron", &text)])
            .expect_err(body)
            .to_string();
        assert!(msg.starts_with("udp.ron:3:"), "{body}: {msg}");
        assert!(msg.contains(expected), "{body}: {msg}");
    }
}
