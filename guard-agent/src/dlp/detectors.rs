//! The built-in detector catalogue: one constant per detector, each with
//! its stable kebab-case name, its regex, the literal anchors that the
//! Aho-Corasick prefilter looks for, its validator, its home hosts, its
//! default mask style and its known-good values. DETECTORS.md lists them.
//!
//! Regexes are compiled with ASCII-only classes over bytes (`\w`, `\d`,
//! `\b` are ASCII). A pattern's first capture group that took part in the
//! match is the reported value; without groups the whole match is.

use crate::dlp::settings::{DetectorClass, MaskStyle};
use crate::dlp::validators::Validator;

/// Where the Aho-Corasick prefilter sends a detector's regex: on each hit
/// of a literal, the regex runs over `[hit - back, hit + span)` and only
/// matches that contain the hit count. `back == 0` means an anchored search
/// at the hit. Detectors without anchors run in the single shape pass.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Anchor {
    pub literals: &'static [&'static str],
    pub back: usize,
    pub span: usize,
}

/// One built-in detector. See DETECTORS.md.
#[derive(Debug, Clone, Copy)]
pub struct Detector {
    pub(crate) name: &'static str,
    pub(crate) class: DetectorClass,
    pub(crate) pattern: &'static str,
    pub(crate) anchor: Option<Anchor>,
    pub(crate) validator: Validator,
    pub(crate) home: &'static [&'static str],
    pub(crate) mask: MaskStyle,
    pub(crate) allow_exact: &'static [&'static str],
    pub(crate) allow_regex: &'static [&'static str],
    /// Lower wins when findings overlap: 0 a specific credential, 1 a
    /// container (a password in a URL, a header, a `key=value`), 2 PII.
    pub(crate) priority: u8,
}

impl Detector {
    pub fn name(&self) -> &'static str {
        self.name
    }
    pub fn class(&self) -> DetectorClass {
        self.class
    }
    pub fn home(&self) -> &'static [&'static str] {
        self.home
    }
    pub fn default_mask(&self) -> MaskStyle {
        self.mask
    }
}

/// Placeholders that look like credentials in docs and templates. Applies
/// to every secret detector; must match the whole value.
pub(crate) const SECRET_PLACEHOLDERS: &str = r"(?is).*(?:x{5,}|your[_-]?(?:api[_-]?)?(?:key|token|secret|password|pass)|<[^>]*>|\$\{|\{\{|example|dummy|placeholder|changeme|change_me|redacted|\*{4,}|0{12,}).*";

/// Literals of which every match of [`SECRET_PLACEHOLDERS`] contains one
/// (ignoring case): one per alternative. Checked first, so the regex runs
/// only on the few values that hold one. Keep the two in step; a test
/// checks the claim on generated values.
pub(crate) const SECRET_PLACEHOLDER_LITERALS: &[&str] = &[
    "xxxxx",
    "your",
    "<",
    "${",
    "{{",
    "example",
    "dummy",
    "placeholder",
    "changeme",
    "change_me",
    "redacted",
    "****",
    "000000000000",
];

const fn anchor(literals: &'static [&'static str], back: usize, span: usize) -> Option<Anchor> {
    Some(Anchor {
        literals,
        back,
        span,
    })
}

const fn secret(name: &'static str, pattern: &'static str, anchor: Option<Anchor>) -> Detector {
    Detector {
        name,
        class: DetectorClass::Secret,
        pattern,
        anchor,
        validator: Validator::None,
        home: &[],
        mask: MaskStyle::Token,
        allow_exact: &[],
        allow_regex: &[],
        priority: 0,
    }
}

/// AWS access key IDs: `AKIA`/`ASIA`/`ABIA`/`ACCA`/`A3T?` + 16 upper-case
/// alphanumerics.
pub const AWS_ACCESS_KEY_ID: Detector = Detector {
    home: &[
        "*.amazonaws.com",
        "amazonaws.com",
        "*.amazonaws.com.cn",
        "*.api.aws",
    ],
    allow_exact: &["AKIAIOSFODNN7EXAMPLE"],
    ..secret(
        "aws-access-key-id",
        r"\b((?:AKIA|ASIA|ABIA|ACCA|A3T[A-Z0-9])[A-Z0-9]{16})\b",
        anchor(&["AKIA", "ASIA", "ABIA", "ACCA", "A3T"], 0, 24),
    )
};

/// AWS secret access keys: 40 base64 characters right after a key word
/// such as `aws_secret_access_key =` or `"SecretAccessKey":`.
pub const AWS_SECRET_ACCESS_KEY: Detector = Detector {
    home: AWS_ACCESS_KEY_ID.home,
    allow_exact: &["wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"],
    validator: Validator::Entropy(3.5),
    ..secret(
        "aws-secret-access-key",
        r#"(?i)(?:aws_?secret_?access_?key|aws_?secret_?key|secret_?access_?key)["']?\s*(?:=>|:=|[:=])\s*["']?([A-Za-z0-9/+]{40})(?:[^A-Za-z0-9/+=]|$)"#,
        anchor(
            &[
                "aws_secret",
                "awssecret",
                "secret_access_key",
                "secretaccesskey",
            ],
            0,
            128,
        ),
    )
};

/// GitHub tokens: classic `ghp_`/`gho_`/`ghu_`/`ghs_` (apps'
/// installation tokens)/`ghr_` + 36+ alphanumerics, fine-grained
/// `github_pat_` + 82.
pub const GITHUB_TOKEN: Detector = Detector {
    home: &[
        "github.com",
        "*.github.com",
        "*.githubusercontent.com",
        "ghcr.io",
    ],
    ..secret(
        "github-token",
        r"\b((?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36,251}|github_pat_[A-Za-z0-9_]{82})\b",
        anchor(
            &["ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"],
            0,
            300,
        ),
    )
};

/// GitLab tokens: personal/project/group `glpat-`, deploy `gldt-`, runner
/// `glrt-`/`GR1348941`, pipeline trigger `glptt-`, CI build `glcbt-`,
/// feed `glft-`, OAuth app secret `gloas-`.
pub const GITLAB_TOKEN: Detector = Detector {
    home: &["gitlab.com", "*.gitlab.com"],
    ..secret(
        "gitlab-token",
        r"\b((?:glpat|gldt|glrt|glcbt|glft|gloas)-[A-Za-z0-9_-]{20,64}|glptt-[0-9a-f]{40}|GR1348941[A-Za-z0-9_-]{20})(?:[^A-Za-z0-9_-]|$)",
        anchor(
            &[
                "glpat-",
                "gldt-",
                "glrt-",
                "glcbt-",
                "glft-",
                "gloas-",
                "glptt-",
                "GR1348941",
            ],
            0,
            100,
        ),
    )
};

/// Slack API tokens: `xoxb-`/`xoxp-`/`xoxa-`/`xoxo-`/`xoxr-`/`xoxs-`
/// with a numeric team part, and app-level `xapp-` tokens.
pub const SLACK_TOKEN: Detector = Detector {
    home: &["slack.com", "*.slack.com"],
    ..secret(
        "slack-token",
        r"\b(xox[abposr]-[0-9]{6,}-[0-9A-Za-z-]{8,250}|xapp-[0-9]-[A-Z0-9]{6,}-[0-9]{6,}-[a-f0-9]{32,})(?:[^0-9A-Za-z-]|$)",
        anchor(&["xox", "xapp-"], 0, 300),
    )
};

/// Slack incoming webhook URLs: the whole URL is the credential.
pub const SLACK_WEBHOOK: Detector = Detector {
    home: &["hooks.slack.com"],
    ..secret(
        "slack-webhook",
        r"(https://hooks\.slack\.com/(?:services|workflows|triggers)/[A-Za-z0-9+/_-]{20,200})",
        anchor(&["hooks.slack.com"], 8, 240),
    )
};

/// Stripe secret and restricted keys (`sk_live_`, `rk_live_`, test
/// variants) and webhook signing secrets (`whsec_`).
pub const STRIPE_KEY: Detector = Detector {
    home: &["api.stripe.com", "files.stripe.com", "connect.stripe.com"],
    ..secret(
        "stripe-key",
        r"\b((?:sk|rk)_(?:live|test)_[0-9A-Za-z]{24,247}|whsec_[A-Za-z0-9+/=]{32,})\b",
        anchor(
            &["sk_live_", "sk_test_", "rk_live_", "rk_test_", "whsec_"],
            0,
            300,
        ),
    )
};

/// Google API keys: `AIza` + 35 URL-safe characters.
pub const GOOGLE_API_KEY: Detector = Detector {
    home: &["*.googleapis.com", "googleapis.com"],
    ..secret(
        "google-api-key",
        r"\b(AIza[0-9A-Za-z_-]{35})(?:[^0-9A-Za-z_-]|$)",
        anchor(&["AIza"], 0, 48),
    )
};

/// OpenAI API keys: `sk-proj-`/`sk-svcacct-`/`sk-admin-` keys and legacy
/// `sk-` keys carrying the `T3BlbkFJ` marker.
pub const OPENAI_KEY: Detector = Detector {
    home: &["api.openai.com"],
    ..secret(
        "openai-key",
        r"\b(sk-(?:(?:proj|svcacct|admin)-[A-Za-z0-9_-]{40,250}|[A-Za-z0-9]{20}T3BlbkFJ[A-Za-z0-9]{20}))(?:[^A-Za-z0-9_-]|$)",
        anchor(&["sk-"], 0, 300),
    )
};

/// Anthropic API keys: `sk-ant-api03-`, `sk-ant-admin01-`, `sk-ant-oat01-`.
pub const ANTHROPIC_KEY: Detector = Detector {
    home: &["api.anthropic.com"],
    ..secret(
        "anthropic-key",
        r"\b(sk-ant-(?:api03|admin01|oat01)-[A-Za-z0-9_-]{80,120})(?:[^A-Za-z0-9_-]|$)",
        anchor(&["sk-ant-"], 0, 160),
    )
};

/// Hugging Face user (`hf_`) and org (`api_org_`) tokens: 34 letters.
pub const HUGGINGFACE_TOKEN: Detector = Detector {
    home: &["huggingface.co", "*.huggingface.co", "hf.co", "*.hf.co"],
    ..secret(
        "huggingface-token",
        r"\b((?:hf|api_org)_[A-Za-z]{34})\b",
        anchor(&["hf_", "api_org_"], 0, 48),
    )
};

/// npm access tokens (`npm_` + 36) and `_authToken=` lines of `.npmrc`.
pub const NPM_TOKEN: Detector = Detector {
    home: &["registry.npmjs.org", "*.npmjs.org", "registry.npmjs.com"],
    ..secret(
        "npm-token",
        r"\b(npm_[A-Za-z0-9]{36})\b|_authToken\s*=\s*([A-Za-z0-9_.-]{20,})",
        anchor(&["npm_", "_authToken"], 0, 200),
    )
};

/// PyPI upload tokens: macaroons starting `pypi-AgEIcHlwaS5vcmc` (pypi.org)
/// or `pypi-AgENdGVzdC5weXBpLm9yZw` (test.pypi.org).
pub const PYPI_TOKEN: Detector = Detector {
    home: &["upload.pypi.org", "pypi.org", "test.pypi.org"],
    ..secret(
        "pypi-token",
        r"\b(pypi-(?:AgEIcHlwaS5vcmc|AgENdGVzdC5weXBpLm9yZw)[A-Za-z0-9_-]{50,1000})(?:[^A-Za-z0-9_-]|$)",
        anchor(&["pypi-Ag"], 0, 1100),
    )
};

/// SendGrid API keys: `SG.` + 22 + `.` + 43.
pub const SENDGRID_KEY: Detector = Detector {
    home: &["api.sendgrid.com"],
    ..secret(
        "sendgrid-key",
        r"\b(SG\.[A-Za-z0-9_-]{22}\.[A-Za-z0-9_-]{43})(?:[^A-Za-z0-9_-]|$)",
        anchor(&["SG."], 0, 80),
    )
};

/// Twilio API key SIDs with their secret in reach: `SK` + 32 lower hex.
pub const TWILIO_KEY: Detector = Detector {
    home: &["api.twilio.com", "*.twilio.com"],
    ..secret(
        "twilio-key",
        r"\b(SK[0-9a-f]{32})\b",
        anchor(&["SK"], 0, 40),
    )
};

/// HashiCorp Vault service (`hvs.`), batch (`hvb.`) and recovery (`hvr.`)
/// tokens.
pub const VAULT_TOKEN: Detector = Detector {
    ..secret(
        "vault-token",
        r"\b(hv[sbr]\.[A-Za-z0-9_-]{24,400})(?:[^A-Za-z0-9_-]|$)",
        anchor(&["hvs.", "hvb.", "hvr."], 0, 420),
    )
};

/// Azure AD / Entra ID client secrets: 3 characters, a digit, `Q~`, 31-34
/// more.
pub const AZURE_CLIENT_SECRET: Detector = Detector {
    home: &["login.microsoftonline.com", "*.microsoftonline.com"],
    ..secret(
        "azure-client-secret",
        r"(?:^|[^A-Za-z0-9_~.-])([A-Za-z0-9_~.-]{3}[0-9]Q~[A-Za-z0-9_~.-]{31,34})(?:[^A-Za-z0-9_~.-]|$)",
        anchor(&["Q~"], 5, 48),
    )
};

/// GCP service-account key files: a JSON object with `"type":
/// "service_account"` and a `"private_key"`; the value is the key.
pub const GCP_SERVICE_ACCOUNT: Detector = Detector {
    home: &["*.googleapis.com", "oauth2.googleapis.com"],
    ..secret(
        "gcp-service-account",
        r#""type"\s*:\s*"service_account"[^{}]*?"private_key"\s*:\s*"(-----BEGIN[^"]{32,})"|"private_key"\s*:\s*"(-----BEGIN[^"]{32,})"[^{}]*?"type"\s*:\s*"service_account""#,
        anchor(&["\"private_key\""], 4096, 12288),
    )
};

/// Credentials inside URLs and connection strings
/// (`postgres://user:pass@`, `mongodb+srv://`, `redis://`, `amqp://`,
/// `mysql://`, `https://user:token@`) and JDBC `password=` parameters.
pub const URL_CREDENTIALS: Detector = Detector {
    priority: 1,
    allow_exact: &[
        "password", "pass", "passwd", "pwd", "secret", "user", "test",
    ],
    ..secret(
        "url-credentials",
        r#"\b[A-Za-z][A-Za-z0-9+.-]{1,20}://[^\s:/?#@"'<>]{0,256}:([^\s/?#@"'<>]{1,256})@|\bjdbc:[a-z0-9]+:[^\s"'<>]*?[;?&](?i:password|pwd)=([^;&\s"'<>]{1,256})"#,
        anchor(&["://", "jdbc:"], 24, 600),
    )
};

/// Authorization header values (`Authorization: Basic ...`, `Bearer ...`,
/// `Token ...`), also as text (`-H 'Authorization: ...'`) and bare
/// `Bearer <token>`.
pub const AUTHORIZATION_HEADER: Detector = Detector {
    priority: 1,
    validator: Validator::AuthValue,
    ..secret(
        "authorization-header",
        r#"(?i)\b(?:basic|bearer|token|digest)\s+([A-Za-z0-9._~+/-]{8,4096}=*)"#,
        anchor(&["basic", "bearer", "token", "digest"], 0, 4200),
    )
};

/// PEM (`-----BEGIN ... PRIVATE KEY-----`), OpenSSH and PGP private key
/// blocks, up to the END line.
pub const PRIVATE_KEY: Detector = Detector {
    mask: MaskStyle::Redact,
    ..secret(
        "private-key",
        r"(-----BEGIN[ A-Z0-9]{0,40}PRIVATE KEY(?: BLOCK)?-----(?s:.){16,}?-----END[ A-Z0-9]{0,40}PRIVATE KEY(?: BLOCK)?-----)",
        anchor(&["-----BEGIN"], 0, 16384),
    )
};

/// JSON Web Tokens: three base64url segments, header and payload both
/// JSON objects (`eyJ`), header names an `alg`.
pub const JWT: Detector = Detector {
    validator: Validator::Jwt,
    ..secret(
        "jwt",
        r"\b(eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{16,})",
        anchor(&["eyJ"], 0, 8192),
    )
};

/// A high-entropy value right after a key word: `password=`, `secret:`,
/// `token`, `api_key`, `client_secret`, ... Not UUIDs, not placeholders,
/// not expressions like `process.env.X`.
pub const GENERIC_SECRET: Detector = Detector {
    priority: 1,
    validator: Validator::GenericSecret,
    ..secret(
        "generic-secret",
        r#"(?i)(?:password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key|auth[_-]?key|private[_-]?key|credential|passphrase)[a-z0-9_.-]{0,30}["']?\s*(?:=>|:=|[:=])\s*["']?([^\s"'`,;&<>{}()\[\]]{8,256})"#,
        anchor(
            &[
                "password",
                "passwd",
                "pwd",
                "secret",
                "token",
                "api_key",
                "api-key",
                "apikey",
                "access_key",
                "access-key",
                "auth_key",
                "private_key",
                "credential",
                "passphrase",
            ],
            0,
            340,
        ),
    )
};

const fn pii(
    name: &'static str,
    pattern: &'static str,
    validator: Validator,
    mask: MaskStyle,
) -> Detector {
    Detector {
        name,
        class: DetectorClass::Pii,
        pattern,
        anchor: None,
        validator,
        home: &[],
        mask,
        allow_exact: &[],
        allow_regex: &[],
        priority: 2,
    }
}

/// Payment card numbers: 12-19 digits, optionally grouped by spaces or
/// dashes (one kind), with a known issuer prefix and length (Visa,
/// Mastercard incl. 2221-2720, Amex, Discover, Diners, JCB, UnionPay,
/// Maestro) and a valid Luhn checksum.
pub const CREDIT_CARD: Detector = pii(
    "credit-card",
    r"\b(?:[0-9]{12,19}|[0-9]{4}(?:[ -][0-9]{4}){2}[ -][0-9]{1,4}(?:[ -][0-9]{3})?|[0-9]{4}[ -][0-9]{6}[ -][0-9]{4,5})\b",
    Validator::CreditCard,
    MaskStyle::KeepLast4,
);

/// IBANs: country code, check digits, BBAN (optionally in groups of 4),
/// the country's length and mod 97 == 1.
pub const IBAN: Detector = pii(
    "iban",
    r"\b[A-Z]{2}[0-9]{2}(?:[A-Z0-9]{11,30}|(?: [A-Z0-9]{4}){2,7}(?: [A-Z0-9]{1,3})?)\b",
    Validator::Iban,
    MaskStyle::KeepLast4,
);

/// US Social Security numbers `AAA-GG-SSSS` (or spaced): area not 000, 666,
/// 9xx; group not 00; serial not 0000.
pub const US_SSN: Detector = Detector {
    allow_exact: &["123-45-6789", "219-09-9999"],
    ..pii(
        "us-ssn",
        r"\b[0-9]{3}-[0-9]{2}-[0-9]{4}\b|\b[0-9]{3} [0-9]{2} [0-9]{4}\b",
        Validator::UsSsn,
        MaskStyle::Redact,
    )
};

/// Email addresses. Documentation domains (example.com/.org/.net) and
/// `git@` remotes are known-good.
pub const EMAIL: Detector = Detector {
    anchor: anchor(&["@"], 64, 340),
    allow_regex: &[r"(?i).*@example\.(?:com|org|net)", r"git@.*"],
    ..pii(
        "email",
        r"\b[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.[A-Za-z]{2,24}\b",
        Validator::None,
        MaskStyle::Token,
    )
};

/// Phone numbers: E.164 (`+14155552671`, `+44 20 7946 0958`), NANP
/// (`(415) 555-2671`, `415-555-2671`, `415.555.2671`) and European
/// national forms with a trunk 0 in groups (`030 1234 5678`,
/// `01 23 45 67 89`). Bare digit runs never match.
pub const PHONE: Detector = pii(
    "phone",
    r"\+[1-9][0-9]{7,14}\b|\+[1-9][0-9]{0,2}[ .-]\(?[0-9]{1,4}\)?(?:[ .-][0-9]{2,4}){1,4}\b|(?:\([0-9]{3}\) ?|\b[0-9]{3}[.-])[0-9]{3}[.-][0-9]{4}\b|\b0[1-9][0-9]{1,3}[ -][0-9]{3,4}[ -][0-9]{3,4}\b|\b0[1-9](?: [0-9]{2}){4}\b",
    Validator::Phone,
    MaskStyle::Redact,
);

/// Private IPv4 addresses (RFC 1918: 10/8, 172.16/12, 192.168/16): internal
/// topology leaving the host.
pub const PRIVATE_IP: Detector = Detector {
    class: DetectorClass::Infrastructure,
    anchor: anchor(&["10.", "172.", "192.168."], 0, 20),
    ..pii(
        "private-ip",
        r"\b(?:10(?:\.(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}|172\.(?:1[6-9]|2[0-9]|3[01])(?:\.(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){2}|192\.168(?:\.(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){2})",
        Validator::Ipv4End,
        MaskStyle::Redact,
    )
};

/// Every built-in detector, in a fixed order (the order of DETECTORS.md).
pub const BUILTIN: &[Detector] = &[
    AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY,
    GITHUB_TOKEN,
    GITLAB_TOKEN,
    SLACK_TOKEN,
    SLACK_WEBHOOK,
    STRIPE_KEY,
    GOOGLE_API_KEY,
    OPENAI_KEY,
    ANTHROPIC_KEY,
    HUGGINGFACE_TOKEN,
    NPM_TOKEN,
    PYPI_TOKEN,
    SENDGRID_KEY,
    TWILIO_KEY,
    VAULT_TOKEN,
    AZURE_CLIENT_SECRET,
    GCP_SERVICE_ACCOUNT,
    URL_CREDENTIALS,
    AUTHORIZATION_HEADER,
    PRIVATE_KEY,
    JWT,
    GENERIC_SECRET,
    CREDIT_CARD,
    IBAN,
    US_SSN,
    EMAIL,
    PHONE,
    PRIVATE_IP,
];

/// The generic-secret key words, for field names (JSON keys, form fields,
/// query parameters, header names) whose whole value is then a candidate.
pub(crate) const SECRET_FIELD_NAME: &str = r"(?i)(?:password|passwd|pwd|secret|token|api[_-]?key|apikey|access[_-]?key|auth[_-]?key|private[_-]?key|client[_-]?secret|credential|passphrase)";

/// Three bytes (any case) of which every match of [`SECRET_FIELD_NAME`]
/// holds one: `pas`sword/`pas`swd/`pas`sphrase, `pwd`, se`cre`t/`cre`dential,
/// `tok`en, every `key`. Lets a body be cleared of secret-sounding names
/// with one SIMD pass instead of the regex over every byte.
pub(crate) const SECRET_FIELD_NAME_TRIGRAMS: &[&str] = &["pas", "pwd", "cre", "tok", "key"];

/// The longest match of [`SECRET_FIELD_NAME`] (`client_secret`), rounded
/// up: a match holding a trigram at `at` lies within this many bytes of it.
pub(crate) const SECRET_FIELD_NAME_MAX: usize = 16;
