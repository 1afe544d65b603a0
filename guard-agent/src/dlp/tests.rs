//! Scenario tests for the DLP module: per-detector true/false-positive
//! tables, locations, masking that keeps formats valid, encodings,
//! streaming across chunk boundaries, keyed tokens.

use super::*;

const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
const URLSAFE: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-";
const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const LETTERS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const HEXL: &[u8] = b"0123456789abcdef";

/// A deterministic random-looking string (test data, not a real credential).
fn r(len: usize, alphabet: &[u8]) -> String {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ (len as u64 * 0x1000_0001) ^ alphabet.len() as u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            alphabet[(x % alphabet.len() as u64) as usize] as char
        })
        .collect()
}

/// A number of `len` digits starting with `prefix` with a valid Luhn digit.
fn luhn_complete(prefix: &str, len: usize) -> String {
    let mut s = prefix.to_string();
    while s.len() < len - 1 {
        s.push('0');
    }
    for d in 0..10 {
        let cand = format!("{s}{d}");
        if validators::luhn(cand.as_bytes()) {
            return cand;
        }
    }
    unreachable!()
}

fn engine() -> Engine {
    Engine::compile(&DlpSettings::default(), MaskKey::new([7; 32]))
        .expect("default settings compile")
}

fn names(e: &Engine, text: &str) -> Vec<String> {
    e.scan_text(text.as_bytes())
        .findings
        .iter()
        .map(|f| f.detector.to_string())
        .collect()
}

/// Each `tp` text yields `detector`, and neither the findings nor the
/// masked text contain the text's secret part; each `fp` text does not
/// yield `detector`.
fn check(detector: &str, tp: &[String], fp: &[String]) {
    let e = engine();
    for t in tp {
        let ins = e.scan_text(t.as_bytes());
        let found: Vec<&str> = ins.findings.iter().map(|f| &*f.detector).collect();
        assert!(
            found.contains(&detector),
            "{detector}: missed in {t:?}; found {found:?}"
        );
        let masked = String::from_utf8(ins.masked.clone().expect("masked")).unwrap();
        for f in &ins.findings {
            let value = &t[f.range.clone()];
            assert!(
                !masked.contains(value) || value.len() < 6,
                "{detector}: {value:?} still in {masked:?}"
            );
            assert!(
                !format!("{f:?}").contains(value),
                "{detector}: finding carries the value"
            );
        }
    }
    for t in fp {
        assert!(
            !names(&e, t).iter().any(|n| n == detector),
            "{detector}: false positive on {t:?}"
        );
    }
}

macro_rules! detector_test {
    ($fn:ident, $name:literal, tp: [$($tp:expr),* $(,)?], fp: [$($fp:expr),* $(,)?]) => {
        #[test]
        fn $fn() {
            assert!(BUILTIN.iter().any(|d| d.name() == $name), "unknown detector {}", $name);
            check($name, &[$(String::from($tp)),*], &[$(String::from($fp)),*]);
        }
    };
}

detector_test!(aws_access_key_id, "aws-access-key-id",
    tp: ["key AKIAQ3EGRUL7ZC2XBK4M here", "ASIAY34FZKBOKMUTVV7A"],
    fp: ["AKIAIOSFODNN7EXAMPLE", "AKIA1234", "xAKIAQ3EGRUL7ZC2XBK4M"]);
detector_test!(aws_secret_access_key, "aws-secret-access-key",
    tp: [format!("aws_secret_access_key = {}", r(40, B64)), format!("\"SecretAccessKey\": \"{}\"", r(40, ALNUM))],
    fp: ["aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", format!("aws_secret_access_key = {}", r(30, B64)), format!("aws_secret_access_key = {}", "ab".repeat(20))]);
detector_test!(github_token, "github-token",
    tp: [format!("ghp_{}", r(36, ALNUM)), format!("token github_pat_{}", r(82, ALNUM)), format!("ghs_{} x", r(36, ALNUM))],
    fp: [format!("ghp_{}", "x".repeat(36)), "ghp_short", format!("ghx_{}", r(36, ALNUM))]);
detector_test!(gitlab_token, "gitlab-token",
    tp: [format!("glpat-{}", r(20, ALNUM)), format!("GR1348941{}", r(20, ALNUM))],
    fp: ["glpat-short", "glpat-xxxxxxxxxxxxxxxxxxxx"]);
detector_test!(slack_token, "slack-token",
    tp: [format!("xoxb-123456789012-1234567890123-{}", r(24, ALNUM))],
    fp: ["xoxb-abc", "xoxb-123456789012-xxxxxxxxxxxxxxxxxxxx"]);
detector_test!(slack_webhook, "slack-webhook",
    tp: [format!("url=https://hooks.slack.com/services/T0123ABCD/B0123ABCD/{}", r(24, ALNUM))],
    fp: ["https://hooks.slack.com/", "https://hooks.slack.com/services/short"]);
detector_test!(stripe_key, "stripe-key",
    tp: [format!("sk_live_{}", r(24, ALNUM)), format!("rk_test_{}", r(30, ALNUM))],
    fp: [format!("pk_live_{}", r(24, ALNUM)), "sk_live_short"]);
detector_test!(google_api_key, "google-api-key",
    tp: [format!("key=AIza{}", r(35, URLSAFE))],
    fp: [format!("AIza{}", r(20, URLSAFE)), "AIzaSyXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX"]);
detector_test!(openai_key, "openai-key",
    tp: [format!("sk-proj-{}", r(48, URLSAFE)), format!("sk-{}T3BlbkFJ{}", r(20, ALNUM), r(20, ALNUM))],
    fp: [format!("sk-{}", r(20, ALNUM)), "a risk-based approach", "sk-proj-short"]);
detector_test!(anthropic_key, "anthropic-key",
    tp: [format!("sk-ant-api03-{}", r(95, URLSAFE))],
    fp: ["sk-ant-api03-short", format!("sk-ant-foo-{}", r(95, URLSAFE))]);
detector_test!(huggingface_token, "huggingface-token",
    tp: [format!("hf_{}", r(34, LETTERS))],
    fp: [format!("hf_{}", r(10, LETTERS)), format!("hf_{}123", r(34, LETTERS))]);
detector_test!(npm_token, "npm-token",
    tp: [format!("npm_{}", r(36, ALNUM)), format!("//registry.npmjs.org/:_authToken={}", r(36, ALNUM))],
    fp: ["npm_install", format!("npm_{}", r(30, ALNUM))]);
detector_test!(pypi_token, "pypi-token",
    tp: [format!("pypi-AgEIcHlwaS5vcmc{}", r(60, URLSAFE))],
    fp: ["pypi-token", "pypi-AgEIcHlwaS5vcmcshort"]);
detector_test!(sendgrid_key, "sendgrid-key",
    tp: [format!("SG.{}.{}", r(22, URLSAFE), r(43, URLSAFE))],
    fp: ["SG.short.value", format!("SG.{}.{}", r(22, URLSAFE), r(10, URLSAFE))]);
detector_test!(twilio_key, "twilio-key",
    tp: [format!("SK{}", r(32, HEXL))],
    fp: [format!("SK{}", r(31, HEXL)), format!("SK{}", r(32, HEXL).to_uppercase()), format!("ASK{}", r(32, HEXL))]);
detector_test!(vault_token, "vault-token",
    tp: [format!("VAULT_TOKEN=hvs.{}", r(90, ALNUM))],
    fp: ["hvs.short", format!("hvs.{}", "x".repeat(30))]);
detector_test!(azure_client_secret, "azure-client-secret",
    tp: [format!("secret {}8Q~{} end", r(3, ALNUM), r(34, ALNUM))],
    fp: ["abc8Q~short", "Q~ nothing here"]);
detector_test!(gcp_service_account, "gcp-service-account",
    tp: [format!(r#"{{"type": "service_account", "project_id": "p", "private_key_id": "k1", "private_key": "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n", "client_id": "1"}}"#, r(64, B64))],
    fp: [format!(r#"{{"type": "authorized_user", "private_key": "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n"}}"#, r(64, B64))]);
detector_test!(url_credentials, "url-credentials",
    tp: ["DATABASE_URL=postgres://app:S3cr3tPass@db.internal:5432/app", "mongodb+srv://u:pw12345@cluster0.mongodb.net", "redis://:redispass99@cache:6379", "amqp://guest:Gu3stPw@rabbit/", "mysql://root:rootpw1@localhost/db", "jdbc:sqlserver://host;user=sa;password=Sql5erverPw", "jdbc:postgresql://db:5432/app?user=app&password=Jdbc5ecret"],
    fp: ["https://docs.rs:443/path", "postgres://user:password@localhost", "mailto:a@b.com"]);
detector_test!(authorization_header, "authorization-header",
    tp: [format!("Authorization: Bearer {}", r(40, ALNUM)), "curl -H 'Authorization: Basic dXNlcjpwYXNzd29yZDEyMw=='".to_string()],
    fp: ["a basic understanding of the system", "the Bearer of bad news", "Authorization: Bearer <token>"]);
detector_test!(private_key, "private-key",
    tp: [format!("-----BEGIN RSA PRIVATE KEY-----\n{}\n-----END RSA PRIVATE KEY-----", r(64, B64)), format!("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA{}\n-----END OPENSSH PRIVATE KEY-----\n", r(64, B64)), format!("-----BEGIN PGP PRIVATE KEY BLOCK-----\n\nlQOYBF{}\n-----END PGP PRIVATE KEY BLOCK-----", r(64, B64))],
    fp: [format!("-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----", r(64, B64)), format!("-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----", r(64, B64))]);
detector_test!(jwt, "jwt",
    tp: [format!("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.{}", r(43, URLSAFE))],
    fp: ["eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.abc", format!("eyJ0eXAiOiJKV1QifQ.eyJzdWIiOiIxMjM0NTY3ODkwIn0.{}", r(43, URLSAFE))]);
detector_test!(generic_secret, "generic-secret",
    tp: ["password=Hunter2!xyz", "api_key: 9f8e7d6c5b4a3f2e1d0c", "client_secret = \"q8W#e4R$t6Y\""],
    fp: ["password=550e8400-e29b-41d4-a716-446655440000", "password: ${DB_PASSWORD}", "token = getToken()", "password=changeme123", "secret: process.env.SECRET"]);
detector_test!(credit_card, "credit-card",
    tp: ["card 4111 1111 1111 1111 exp 12/29", "5500-0000-0000-0004", "2223003122003222", "378282246310005", "6011111111111117", luhn_complete("4", 19), luhn_complete("2720", 16), luhn_complete("2221", 16), "3782 822463 10005".to_string()],
    fp: ["4111111111111112", "1234567890123456", "order 2024-01-15 12:30", "4111 1111-1111 1111", luhn_complete("2721", 16), luhn_complete("1", 16)]);
detector_test!(iban, "iban",
    tp: ["GB82 WEST 1234 5698 7654 32", "DE89370400440532013000", "iban FR1420041010050500013M02606."],
    fp: ["GB82WEST12345698765433", "DE8937040044053201300", "XX82WEST12345698765432"]);
detector_test!(us_ssn, "us-ssn",
    tp: ["SSN 536-22-1234", "ssn: 215 65 4321"],
    fp: ["000-12-3456", "666-12-3456", "900-12-3456", "536-00-1234", "536-22-0000", "123-45-6789"]);
detector_test!(email, "email",
    tp: ["contact jane.doe@acme-corp.io now"],
    fp: ["user@example.com", "git@github.com:org/repo.git", "not an email@", "a@b"]);
detector_test!(phone, "phone",
    tp: ["call +14155552671", "+44 20 7946 0958", "(415) 555-2671", "tel 415-555-2671", "030 1234 5678", "01 23 45 67 89"],
    fp: ["order 123456789012", "2024-01-15", "v1.2.3", "+11111111111", "call 555-1234"]);
detector_test!(private_ip, "private-ip",
    tp: ["host 10.0.0.5", "172.16.4.20", "gw 192.168.1.1.", "db at 10.12.0.7:5432", "10.1.2.3", "10.1.2.3.", "ip=10.1.2.34x", "[10.0.0.255]"],
    fp: ["8.8.8.8", "172.32.0.1", "110.0.0.1", "version 10.0.0.1.2", "192.168.1.256", "10.1.2.3..", "10.1.2.03", "v10.0.0.1", "10.1.2.3.4.5"]);

#[test]
fn every_builtin_has_a_table() {
    // Keep this list in step with the detector_test! invocations above.
    let tested = [
        "aws-access-key-id",
        "aws-secret-access-key",
        "github-token",
        "gitlab-token",
        "slack-token",
        "slack-webhook",
        "stripe-key",
        "google-api-key",
        "openai-key",
        "anthropic-key",
        "huggingface-token",
        "npm-token",
        "pypi-token",
        "sendgrid-key",
        "twilio-key",
        "vault-token",
        "azure-client-secret",
        "gcp-service-account",
        "url-credentials",
        "authorization-header",
        "private-key",
        "jwt",
        "generic-secret",
        "credit-card",
        "iban",
        "us-ssn",
        "email",
        "phone",
        "private-ip",
    ];
    for d in BUILTIN {
        assert!(
            tested.contains(&d.name()),
            "{} has no TP/FP table",
            d.name()
        );
    }
}

#[test]
fn json_paths_quote_odd_keys_and_grow_past_the_inline_size() {
    let e = engine();
    let long = "k".repeat(70);
    let body = format!(
        r#"{{"a b": ["x", "536-22-1234"], "{long}": {{"12": [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, "4111 1111 1111 1111"]]}}}}"#
    );
    let ins = e
        .inspect_body(Some("application/json"), None, body.as_bytes())
        .unwrap();
    let paths: Vec<String> = ins
        .findings
        .iter()
        .map(|f| match &f.location {
            Location::Json(p) => p.to_string(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        paths,
        [
            r#"$["a b"][1]"#.to_string(),
            format!(r#"$.{long}["12"][0][11]"#)
        ]
    );
}

#[test]
fn json_paths_are_reported_and_masked_json_parses() {
    let e = engine();
    let body = br#"{"user": {"name": "Jane", "card": "4111 1111 1111 1111"}, "items": [{"note": "ok"}, {"ssn": "536-22-1234"}], "password": "Hunter2!xyz9", "n": 4111111111111111, "esc": "line\nkey AKIAQ3EGRUL7ZC2XBK4M\/x \"q\""}"#;
    let ins = e
        .inspect_body(Some("application/json; charset=utf-8"), None, body)
        .unwrap();
    let got: Vec<(String, Location)> = ins
        .findings
        .iter()
        .map(|f| (f.detector.to_string(), f.location.clone()))
        .collect();
    for (d, p) in [
        ("credit-card", "$.user.card"),
        ("us-ssn", "$.items[1].ssn"),
        ("generic-secret", "$.password"),
        ("credit-card", "$.n"),
        ("aws-access-key-id", "$.esc"),
    ] {
        assert!(
            got.contains(&(d.to_string(), Location::Json(p.into()))),
            "{d} at {p} not in {got:?}"
        );
    }
    let masked = ins.masked.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&masked).expect("masked JSON still parses");
    assert_eq!(v["user"]["card"], "****-****-****-1111".replace('-', " "));
    assert_eq!(v["user"]["name"], "Jane");
    assert_eq!(v["n"], "************1111");
    assert!(v["esc"].as_str().unwrap().starts_with("line\nkey tok_"));
    assert!(v["esc"].as_str().unwrap().ends_with("/x \"q\""));
    assert!(!String::from_utf8_lossy(&masked).contains("Hunter2"));
}

#[test]
fn invalid_json_falls_back_to_text() {
    let e = engine();
    let ins = e
        .inspect_body(
            Some("application/json"),
            None,
            b"{not json 4111111111111111",
        )
        .unwrap();
    assert_eq!(ins.findings[0].location, Location::Text);
}

#[test]
fn json_cut_after_a_backslash_falls_back_to_text() {
    // A string whose last byte is an escape's backslash: the parser must
    // stop at the end of the body, not read past it.
    let e = engine();
    for body in [&b"[\"4111111111111111 \\"[..], b"\"\\", b"{\"k\":\"\\"] {
        let ins = e
            .inspect_body(Some("application/json"), None, body)
            .unwrap();
        assert!(ins.findings.iter().all(|f| f.location == Location::Text));
    }
    let ins = e
        .inspect_body(Some("application/json"), None, b"[\"4111111111111111 \\")
        .unwrap();
    assert_eq!(ins.findings.len(), 1, "{ins:?}");
}

#[test]
fn form_fields_are_located_and_stay_form_encoded() {
    let e = engine();
    let body = b"user=bob&password=Hunter2%21xyz&card=4111+1111+1111+1111&q=hello";
    let ins = e
        .inspect_body(Some("application/x-www-form-urlencoded"), None, body)
        .unwrap();
    let locs: Vec<&Location> = ins.findings.iter().map(|f| &f.location).collect();
    assert!(locs.contains(&&Location::FormField("password".into())));
    assert!(locs.contains(&&Location::FormField("card".into())));
    let masked = String::from_utf8(ins.masked.unwrap()).unwrap();
    assert!(masked.starts_with("user=bob&password="), "{masked}");
    assert!(
        masked.contains("&card=%2A%2A") || masked.contains("&card=****"),
        "{masked}"
    );
    assert!(masked.ends_with("&q=hello"));
    assert!(!masked.contains("Hunter2"));
    assert_eq!(masked.matches('&').count(), 3);
}

#[test]
fn multipart_parts_and_files_are_scanned() {
    let e = engine();
    let body = b"--XyZ\r\nContent-Disposition: form-data; name=\"comment\"\r\n\r\nmy card 4111 1111 1111 1111\r\n--XyZ\r\nContent-Disposition: form-data; name=\"upload\"; filename=\"id_rsa\"\r\nContent-Type: application/octet-stream\r\n\r\n-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ\n-----END OPENSSH PRIVATE KEY-----\n\r\n--XyZ--\r\n";
    let ins = e
        .inspect_body(Some("multipart/form-data; boundary=XyZ"), None, body)
        .unwrap();
    let got: Vec<(String, Location)> = ins
        .findings
        .iter()
        .map(|f| (f.detector.to_string(), f.location.clone()))
        .collect();
    assert!(got.contains(&(
        "credit-card".into(),
        Location::Multipart {
            name: Some("comment".into()),
            filename: None
        }
    )));
    assert!(got.contains(&(
        "private-key".into(),
        Location::Multipart {
            name: Some("upload".into()),
            filename: Some("id_rsa".into())
        }
    )));
    let masked = String::from_utf8(ins.masked.unwrap()).unwrap();
    assert!(masked.contains("[REDACTED:private-key]\n\r\n--XyZ--"));
    assert!(masked.starts_with("--XyZ\r\n"));
}

#[test]
fn gzip_body_is_masked_and_reencoded() {
    let e = engine();
    let body = br#"{"card": "5500-0000-0000-0004"}"#;
    for ce in ["gzip", "deflate", "br", "zstd"] {
        let enc = Encoding::parse_list(ce).unwrap()[0];
        let compressed = enc.encode(body);
        let ins = e
            .inspect_body(Some("application/json"), Some(ce), &compressed)
            .unwrap();
        assert_eq!(ins.findings.len(), 1, "{ce}");
        let out = enc.decode(&ins.masked.unwrap(), 1 << 20).unwrap();
        assert_eq!(out, br#"{"card": "****-****-****-0004"}"#, "{ce}");
    }
}

#[test]
fn headers_and_urls_are_located() {
    let e = engine();
    let tok = format!("Bearer {}", r(40, ALNUM));
    let ins = e.inspect_header("Authorization", tok.as_bytes());
    assert_eq!(
        ins.findings[0].location,
        Location::Header("authorization".into())
    );
    let ins = e.inspect_header("X-Api-Key", b"9f8e7d6c5b4a3f2e1d0c");
    assert_eq!(ins.findings[0].detector.as_ref(), "generic-secret");

    let ins = e.inspect_url(
        "/users/jane.doe@acme-corp.io/profile?api_key=9f8e7d6c5b4a3f2e1d0c&q=hello%20world",
    );
    let locs: Vec<(&str, &Location)> = ins
        .findings
        .iter()
        .map(|f| (&*f.detector, &f.location))
        .collect();
    assert!(locs.contains(&("email", &Location::UrlPath)), "{locs:?}");
    assert!(
        locs.contains(&("generic-secret", &Location::QueryParam("api_key".into()))),
        "{locs:?}"
    );
    let masked = String::from_utf8(ins.masked.unwrap()).unwrap();
    assert!(
        masked.starts_with("/users/tok_") && masked.ends_with("&q=hello%20world"),
        "{masked}"
    );
}

#[test]
fn goes_home_by_host_glob() {
    let e = engine();
    for (d, host, home) in [
        ("github-token", "api.github.com", true),
        ("github-token", "github.com:443", true),
        ("github-token", "uploads.github.com.", true),
        ("github-token", "evilgithub.com", false),
        ("github-token", "github.com.evil.io", false),
        ("aws-access-key-id", "s3.us-east-1.amazonaws.com", true),
        ("stripe-key", "api.stripe.com", true),
        ("stripe-key", "api.openai.com", false),
        ("slack-webhook", "hooks.slack.com", true),
        ("credit-card", "api.stripe.com", false),
        ("no-such-detector", "github.com", false),
    ] {
        assert_eq!(e.goes_home(d, host), home, "{d} → {host}");
        assert_eq!(goes_home(d, host), home, "free fn: {d} → {host}");
    }
}

#[test]
fn streaming_finds_a_secret_split_at_every_offset() {
    let e = engine();
    let secret = format!("ghp_{}", r(36, ALNUM));
    let text = format!(
        "{}{} {}",
        "lorem ipsum dolor sit amet ".repeat(8),
        secret,
        "consectetur ".repeat(10)
    );
    let whole = e.scan_text(text.as_bytes());
    assert_eq!(whole.findings.len(), 1);
    let at = text.find(&secret).unwrap();
    for split in at.saturating_sub(2)..=at + secret.len() + 2 {
        let mut s = StreamScanner::with_overlap(&e, 64);
        let mut out = s.feed(&text.as_bytes()[..split]);
        let tail = s.feed(&text.as_bytes()[split..]);
        let end = s.finish();
        for o in [tail, end] {
            out.findings.extend(o.findings);
            out.output.extend(o.output);
        }
        assert_eq!(out.findings, whole.findings, "split at {split}");
        assert_eq!(Some(out.output), whole.masked, "split at {split}");
    }
    // And byte by byte, and in odd chunks.
    for size in [1, 7, 100] {
        let mut s = StreamScanner::with_overlap(&e, 64);
        let mut out = StreamOutput::default();
        for chunk in text.as_bytes().chunks(size) {
            let o = s.feed(chunk);
            out.findings.extend(o.findings);
            out.output.extend(o.output);
        }
        let o = s.finish();
        out.findings.extend(o.findings);
        out.output.extend(o.output);
        assert_eq!(out.findings, whole.findings, "chunks of {size}");
        assert_eq!(Some(out.output), whole.masked, "chunks of {size}");
    }
}

#[test]
fn keyed_tokens_are_stable_and_per_key() {
    let mut settings = DlpSettings::default();
    settings.mask.insert("credit-card".into(), MaskStyle::Token);
    let a = Engine::compile(&settings, MaskKey::new([1; 32])).unwrap();
    let b = Engine::compile(&settings, MaskKey::new([2; 32])).unwrap();
    let t1 = a.scan_text(b"4111111111111111").findings[0].masked.clone();
    let t2 = a.scan_text(b"paid with 4111111111111111 today").findings[0]
        .masked
        .clone();
    let t3 = b.scan_text(b"4111111111111111").findings[0].masked.clone();
    assert!(t1.starts_with("tok_"));
    assert_eq!(t1, t2);
    assert_ne!(t1, t3);
    assert_eq!(t1, token(&MaskKey::new([1; 32]), b"4111111111111111"));
}

#[test]
fn settings_enable_disable_and_allowlist() {
    let settings: DlpSettings = ron::from_str(
        r#"(disabled: ["email"], allowlist: {"credit-card": ["4111111111111111"]}, mask: {"us-ssn": token})"#,
    )
    .unwrap();
    let e = Engine::compile(&settings, MaskKey::new([0; 32])).unwrap();
    assert!(names(&e, "jane.doe@acme-corp.io").is_empty());
    assert!(names(&e, "4111111111111111").is_empty());
    assert_eq!(names(&e, "5500-0000-0000-0004"), vec!["credit-card"]);
    assert!(e.scan_text(b"536-22-1234").findings[0]
        .masked
        .starts_with("tok_"));
}

#[test]
fn custom_detectors_with_keywords_and_validators() {
    let settings: DlpSettings = ron::from_str(
        r#"(custom: [
            (name: "acme-account", regex: "\\bAC[0-9]{8}\\b", keywords: ["account"], class: pii, mask: redact),
            (name: "acme-card", regex: "\\bACME-([0-9]{16})\\b", validator: Some(luhn), home: ["*.acme.test"]),
        ])"#,
    )
    .unwrap();
    let e = Engine::compile(&settings, MaskKey::new([0; 32])).unwrap();
    assert_eq!(
        names(&e, "Account AC12345678 is closed"),
        vec!["acme-account"]
    );
    assert!(names(&e, "AC12345678 alone").is_empty());
    let ins = e.scan_text(b"x ACME-4111111111111111 y");
    assert_eq!(ins.findings[0].detector.as_ref(), "acme-card");
    assert_eq!(
        ins.findings[0].range,
        7..23,
        "the capture group is the value"
    );
    assert!(names(&e, "ACME-4111111111111112").is_empty());
    assert!(e.goes_home("acme-card", "pay.acme.test"));
}

#[test]
fn settings_errors_name_the_detector_and_the_problem() {
    let bad_regex = DlpSettings {
        custom: vec![CustomDetectorSettings {
            name: "broken".into(),
            regex: "ab(c".into(),
            keywords: vec![],
            validator: None,
            mask: MaskStyle::Redact,
            class: DetectorClass::Secret,
            home: vec![],
        }],
        ..DlpSettings::default()
    };
    let err = Engine::compile(&bad_regex, MaskKey::new([0; 32]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("`broken`") && err.contains("regex"), "{err}");

    let unknown = DlpSettings {
        disabled: vec!["credit-crad".into()],
        ..DlpSettings::default()
    };
    let err = Engine::compile(&unknown, MaskKey::new([0; 32]))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("credit-crad") && err.contains("credit-card"),
        "{err}"
    );

    let mut dup = bad_regex.clone();
    dup.custom[0].regex = "x".into();
    dup.custom[0].name = "jwt".into();
    let err = Engine::compile(&dup, MaskKey::new([0; 32]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("built-in"), "{err}");
}

#[test]
fn specific_credential_wins_over_generic_container() {
    let e = engine();
    let tok = format!("ghp_{}", r(36, ALNUM));
    assert_eq!(names(&e, &format!("password={tok}")), vec!["github-token"]);
    assert_eq!(
        names(&e, "postgres://app:S3cr3tPass@db.acme-corp.io/app"),
        vec!["url-credentials"]
    );
}

#[test]
fn naive_baseline_agrees_on_simple_input() {
    let e = engine();
    let text = format!("a 4111 1111 1111 1111 b ghp_{} c", r(36, ALNUM));
    assert_eq!(e.naive_scan(text.as_bytes()), 2);
}

#[test]
fn a_secret_in_a_form_field_name_is_found_and_masked() {
    // Not really a form, sent as one: the key sits before the `=`.
    let body = b"deploy key: AKIAZ3MHQ7X2LPVWRT5K / note=hello";
    let i = engine()
        .inspect_body(Some("application/x-www-form-urlencoded"), None, body)
        .unwrap();
    assert!(
        i.findings
            .iter()
            .any(|f| &*f.detector == "aws-access-key-id"),
        "{:?}",
        i.findings
    );
    let masked = i.masked.expect("masked");
    assert!(!String::from_utf8_lossy(&masked).contains("AKIAZ3MHQ7X2LPVWRT5K"));
    assert!(String::from_utf8_lossy(&masked).ends_with("note=hello"));
}

#[test]
fn a_mask_filter_rewrites_only_the_named_detectors() {
    let e = engine();
    let card = luhn_complete("411111", 16);
    let email = "jane.doe@acme-corp.io";
    let body = format!(r#"{{"card":"{card}","contact":"{email}"}}"#);
    let only_cards = |det: &str| det == "credit-card";
    let i = e
        .inspect_body_scoped(
            Some("application/json"),
            None,
            body.as_bytes(),
            Some(&only_cards),
        )
        .unwrap();
    let mut found: Vec<&str> = i.findings.iter().map(|f| &*f.detector).collect();
    found.sort();
    assert_eq!(found, ["credit-card", "email"], "both are reported");
    let masked = String::from_utf8(i.masked.expect("the card is masked")).unwrap();
    assert!(!masked.contains(&card), "{masked}");
    assert!(
        masked.contains(email),
        "the email is recorded only: {masked}"
    );
    serde_json::from_str::<serde_json::Value>(&masked).expect("still JSON");

    // Nothing in scope: nothing rewritten, everything reported.
    let none = |_: &str| false;
    let i = e.inspect_url_scoped(&format!("/p?c={card}&e={email}"), Some(&none));
    assert_eq!(i.findings.len(), 2);
    assert_eq!(i.masked, None);
    let i = e.inspect_header_scoped("x-card", card.as_bytes(), Some(&only_cards));
    assert!(i.masked.is_some_and(|m| !contains(&m, card.as_bytes())));
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// A JSON body where one raw scan finds nothing skips the walk; the walk
/// finds more only in escaped strings and under secret-sounding keys. On
/// tricky bodies, clean or not, the answer is the same as always walking.
#[test]
fn json_without_raw_hits_gets_the_same_answer_as_the_walk() {
    let e = engine();
    let ghp = format!("ghp_{}", r(36, ALNUM));
    let pw = r(18, ALNUM);
    // `\u0034` is `4`: the card only exists decoded.
    let escaped_card =
        r#"{"note":"card \u00341111111 1111 1111 1111"}"#.replace("1111111 ", "111 ");
    let bodies: Vec<(String, bool)> = vec![
        // Clean: no escapes, no secret-sounding name.
        (
            r#"{"id":1,"name":"a b","tags":["x","y"],"n":-1.5e3}"#.into(),
            false,
        ),
        (r#"[{"a":{"b":[1,2,{"c":"d"}]}}]"#.into(), false),
        // Not JSON at all, clean: the text fallback finds nothing either.
        ("{not json".into(), false),
        // Escapes hide values from the raw scan.
        (escaped_card, true),
        (
            format!(r#"{{"k":"{}\u005f{}"}}"#, &ghp[..3], &ghp[4..]),
            true,
        ),
        (r#"{"ssn":"536\u002d22\u002d1234"}"#.into(), true),
        (r#"{"q":"say \"hi\" \/ \n","n":1}"#.into(), false),
        // Keyed secrets: the value alone looks like nothing.
        (format!(r#"{{"password":"{pw}"}}"#), true),
        (
            r#"{"user":{"creds":[{"apiKey":"Zx81kq0aLm3pQr7s"}]}}"#.into(),
            true,
        ),
        (
            r#"{"deep":[[[{"CLIENT_SECRET":"s3cr3tV4lue99x"}]]]}"#.into(),
            true,
        ),
        (r#"{"Access-Key":"AbCdEf0123456789"}"#.into(), true),
        (r#"{"pASSword":"qwertyuiop12"}"#.into(), true),
        // A secret-sounding word in a value (not a key): walked, nothing.
        (r#"{"note":"the token expired"}"#.into(), false),
        // Raw hits: walked as before.
        (
            format!(r#"{{"a":{{"b":["{ghp}"]}},"n":4111111111111111}}"#),
            true,
        ),
        // Invalid JSON with a keyed secret: the text fallback decides.
        (format!(r#"{{"password":"{pw}""#), true),
    ];
    // Without generic-secret, secret-sounding keys still make the walk
    // scan their values alone: the shortcut must not assume otherwise.
    let no_generic = DlpSettings {
        disabled: vec!["generic-secret".into()],
        ..Default::default()
    };
    let no_generic = Engine::compile(&no_generic, MaskKey::new([3; 32])).unwrap();
    for (body, found) in bodies {
        let fast = e
            .inspect_body(Some("application/json"), None, body.as_bytes())
            .unwrap();
        let walked = e.inspect_json_walked(body.as_bytes());
        assert_eq!(fast, walked, "{body}");
        assert_eq!(
            !fast.findings.is_empty(),
            found,
            "{body}: {:?}",
            fast.findings
        );
        let fast = no_generic
            .inspect_body(Some("application/json"), None, body.as_bytes())
            .unwrap();
        assert_eq!(
            fast,
            no_generic.inspect_json_walked(body.as_bytes()),
            "{body}"
        );
    }
}

#[test]
fn a_secret_after_a_secret_sounding_flag_is_masked_in_a_command_line() {
    let e = engine();
    let key = "9f8e7d6c5b4a3f2e1d0c";
    let masked = |t: &str| {
        e.scan_command_line(t.as_bytes())
            .masked
            .map(|m| String::from_utf8(m).unwrap())
    };
    for line in [
        format!("deploy --api-key {key} --verbose"),
        format!("deploy -token {key}"),
        format!("deploy --api-key={key}"),
        format!("env API_KEY={key} ./run"),
    ] {
        let m = masked(&line).unwrap_or_else(|| panic!("{line:?} was not masked"));
        assert!(!m.contains(key), "{m}");
        assert!(m.starts_with("deploy ") || m.starts_with("env "), "{m}");
    }
    // Text alone does not look like a secret: only the flag's name makes it one.
    assert!(e
        .scan_text(format!("deploy --api-key {key}").as_bytes())
        .masked
        .is_none());
    // Ordinary flags and their values are left alone.
    assert_eq!(masked("cp --target-directory /tmp/out a.txt"), None);
    assert_eq!(masked("git commit -m fix --author ada"), None);
    assert_eq!(masked("--api-key"), None);
}
