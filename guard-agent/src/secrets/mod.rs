//! Credential injection: the developer's process never holds the real
//! secret. The agent sets a header (`Authorization: Bearer {secret}`) or
//! replaces a placeholder `guard:secret/NAME` that the client sent in a
//! header or the URL, on requests to the hosts (and paths) the secret is
//! bound to, just before the request leaves.
//!
//! Invariants:
//! - injection runs after DLP, policy and recording: the store, the logs and
//!   `policy explain` see the placeholder (or the client's own value,
//!   fingerprinted), never the secret;
//! - a placeholder for a host (or path) its secret is not bound to blocks
//!   the request, so a placeholder cannot carry a secret elsewhere;
//! - errors, `Debug` output and logs name secrets, never print values;
//! - the caller matches bindings against a destination it verified (the
//!   upstream certificate's name, or the original address), never the
//!   Host header alone;
//! - the secrets file is root-owned and 0600 or the agent refuses it.

pub mod file;

use std::{path::Path, sync::Arc};

use globset::{GlobBuilder, GlobMatcher, GlobSet, GlobSetBuilder};
use http::{header::HeaderName, HeaderValue};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

pub use file::SecretsError;

/// What a client writes where it wants a secret: `guard:secret/NAME`.
pub const PLACEHOLDER_PREFIX: &str = "guard:secret/";

/// Characters left as they are when a secret goes into a URL.
const URL_SAFE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

struct Secret {
    name: Arc<str>,
    value: Arc<str>,
}

struct Binding {
    secret: usize,
    hosts: GlobSet,
    path: Option<GlobMatcher>,
    header: Option<(HeaderName, String)>,
}

/// The loaded secrets and their bindings.
#[derive(Default)]
pub struct Secrets {
    secrets: Vec<Secret>,
    bindings: Vec<Binding>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.secrets.iter().map(|s| s.name.as_ref()).collect();
        f.debug_struct("Secrets")
            .field("names", &names)
            .field("bindings", &self.bindings.len())
            .finish()
    }
}

/// Why a request cannot have its placeholders filled in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InjectError {
    #[error("the request names secret `{name}`, which the secrets file does not define")]
    Unknown { name: String },
    #[error("secret `{name}` is not bound to {host}{path}: its placeholder may only go to the hosts the secrets file binds it to")]
    Unbound {
        name: String,
        host: String,
        path: String,
    },
}

/// What injection did, by secret name (for logs; never values).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Injected {
    pub names: Vec<String>,
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl Secrets {
    /// No secrets: nothing is injected, and any placeholder is refused.
    pub fn none() -> Self {
        Self::default()
    }

    /// Reads, checks and compiles a secrets file.
    pub fn load(path: &Path) -> Result<Self, SecretsError> {
        Self::compile(path, file::read(path)?)
    }

    /// Validates a parsed file; `path` is only used in messages.
    pub fn compile(path: &Path, f: file::SecretsFile) -> Result<Self, SecretsError> {
        let invalid = |field: String, message: String| SecretsError::Invalid {
            path: path.to_owned(),
            field,
            message,
        };
        let mut secrets: Vec<Secret> = Vec::new();
        for (i, s) in f.secrets.into_iter().enumerate() {
            if !valid_name(&s.name) {
                return Err(invalid(
                    format!("secrets[{i}].name"),
                    format!("`{}` is not a name (letters, digits, - _ . only)", s.name),
                ));
            }
            if secrets.iter().any(|x| *x.name == *s.name) {
                return Err(invalid(
                    format!("secrets[{i}].name"),
                    format!("`{}` is defined twice", s.name),
                ));
            }
            if s.value.is_empty() || s.value.bytes().any(|b| b.is_ascii_control()) {
                return Err(invalid(
                    format!("secrets[{i}].value"),
                    format!("the value of `{}` is empty or holds control characters (newline, tab, NUL)", s.name),
                ));
            }
            secrets.push(Secret {
                name: s.name.into(),
                value: s.value.into(),
            });
        }
        let mut bindings = Vec::new();
        for (i, b) in f.bindings.into_iter().enumerate() {
            let at = |f: &str| format!("bindings[{i}].{f}");
            let secret = secrets
                .iter()
                .position(|s| *s.name == *b.secret)
                .ok_or_else(|| {
                    invalid(
                        at("secret"),
                        format!("no secret named `{}` in `secrets`", b.secret),
                    )
                })?;
            if b.hosts.is_empty() {
                return Err(invalid(at("hosts"), "name at least one host".into()));
            }
            let mut hosts = GlobSetBuilder::new();
            for (j, h) in b.hosts.iter().enumerate() {
                let g = GlobBuilder::new(h)
                    .case_insensitive(true)
                    .build()
                    .map_err(|e| {
                        invalid(format!("bindings[{i}].hosts[{j}]"), format!("`{h}`: {e}"))
                    })?;
                hosts.add(g);
            }
            let hosts = hosts
                .build()
                .map_err(|e| invalid(at("hosts"), e.to_string()))?;
            let path_glob = match &b.path {
                None => None,
                Some(p) => Some(
                    GlobBuilder::new(p)
                        .literal_separator(true)
                        .build()
                        .map_err(|e| invalid(at("path"), format!("`{p}`: {e}")))?
                        .compile_matcher(),
                ),
            };
            let header = match b.header {
                None => None,
                Some((name, template)) => {
                    let hn = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                        invalid(at("header"), format!("`{name}` is not a header name"))
                    })?;
                    if !template.contains("{secret}") {
                        return Err(invalid(
                            at("header"),
                            format!("the template for `{name}` has no `{{secret}}`"),
                        ));
                    }
                    if HeaderValue::from_str(&template).is_err() {
                        return Err(invalid(
                            at("header"),
                            "the template is not a valid header value".into(),
                        ));
                    }
                    Some((hn, template))
                }
            };
            bindings.push(Binding {
                secret,
                hosts,
                path: path_glob,
                header,
            });
        }
        Ok(Self { secrets, bindings })
    }

    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }

    /// Whether any binding names `host` (whatever the path).
    pub fn binds_host(&self, host: &str) -> bool {
        self.bindings.iter().any(|b| b.hosts.is_match(host))
    }

    /// Names of the loaded secrets.
    pub fn names(&self) -> Vec<String> {
        self.secrets.iter().map(|s| s.name.to_string()).collect()
    }

    fn binding_applies(b: &Binding, host: &str, path: &str) -> bool {
        b.hosts.is_match(host) && b.path.as_ref().map_or(true, |g| g.is_match(path))
    }

    /// The value of secret `name` if it is bound to `host` and `path`.
    fn value_for(&self, name: &str, host: &str, path: &str) -> Result<&str, InjectError> {
        let idx = self
            .secrets
            .iter()
            .position(|s| &*s.name == name)
            .ok_or_else(|| InjectError::Unknown { name: name.into() })?;
        if self
            .bindings
            .iter()
            .any(|b| b.secret == idx && Self::binding_applies(b, host, path))
        {
            Ok(&self.secrets[idx].value)
        } else {
            Err(InjectError::Unbound {
                name: name.into(),
                host: host.into(),
                path: path.into(),
            })
        }
    }

    /// Fills in placeholders and sets bound headers on a request to `host`.
    /// On error nothing must be forwarded.
    pub fn inject(
        &self,
        host: &str,
        parts: &mut http::request::Parts,
    ) -> Result<Injected, InjectError> {
        let mut done = Injected::default();
        let path = parts.uri.path().to_owned();
        // 1. Placeholders in header values.
        let mut replaced: Vec<(HeaderName, Vec<HeaderValue>)> = Vec::new();
        for name in parts.headers.keys() {
            let values = parts.headers.get_all(name);
            if !values.iter().any(|v| {
                memchr::memmem::find(v.as_bytes(), PLACEHOLDER_PREFIX.as_bytes()).is_some()
            }) {
                continue;
            }
            let mut out = Vec::new();
            for v in values {
                let text = String::from_utf8_lossy(v.as_bytes());
                let filled = self.fill(&text, host, &path, &mut done, |s| s.to_owned())?;
                out.push(
                    HeaderValue::from_str(&filled).map_err(|_| InjectError::Unknown {
                        name: "(not a header value)".into(),
                    })?,
                );
            }
            replaced.push((name.clone(), out));
        }
        for (name, values) in replaced {
            parts.headers.remove(&name);
            for v in values {
                parts.headers.append(name.clone(), v);
            }
        }
        // 2. Placeholders in the path and query.
        if let Some(pq) = parts.uri.path_and_query() {
            if pq.as_str().contains(PLACEHOLDER_PREFIX) {
                let filled = self.fill(pq.as_str(), host, &path, &mut done, |s| {
                    utf8_percent_encode(s, URL_SAFE).to_string()
                })?;
                let mut up = parts.uri.clone().into_parts();
                up.path_and_query = filled.parse().ok();
                if let Ok(u) = http::Uri::from_parts(up) {
                    parts.uri = u;
                }
            }
        }
        // 3. Headers the bindings set (the client's own value is dropped).
        for b in &self.bindings {
            let Some((name, template)) = &b.header else {
                continue;
            };
            if !Self::binding_applies(b, host, &path) {
                continue;
            }
            let s = &self.secrets[b.secret];
            let value = template.replace("{secret}", &s.value);
            if let Ok(v) = HeaderValue::from_str(&value) {
                let mut v = v;
                v.set_sensitive(true);
                parts.headers.insert(name.clone(), v);
                done.names.push(s.name.to_string());
            }
        }
        Ok(done)
    }

    /// Replaces every `guard:secret/NAME` in `text`; `encode` escapes the
    /// value for where it goes.
    fn fill(
        &self,
        text: &str,
        host: &str,
        path: &str,
        done: &mut Injected,
        encode: impl Fn(&str) -> String,
    ) -> Result<String, InjectError> {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(i) = rest.find(PLACEHOLDER_PREFIX) {
            out.push_str(&rest[..i]);
            let after = &rest[i + PLACEHOLDER_PREFIX.len()..];
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
                .unwrap_or(after.len());
            let name = &after[..end];
            let value = self.value_for(name, host, path)?;
            out.push_str(&encode(value));
            done.names.push(name.to_owned());
            rest = &after[end..];
        }
        out.push_str(rest);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"(
        secrets: [(name: "billing", value: "sk_live_TOPSECRET"), (name: "other", value: "o/t+h")],
        bindings: [
            (secret: "billing", hosts: ["api.billing.example"], path: "/v1/**",
             header: ("Authorization", "Bearer {secret}")),
            (secret: "other", hosts: ["*.other.example"]),
        ],
    )"#;

    fn secrets() -> Secrets {
        let p = Path::new("s.ron");
        Secrets::compile(p, file::parse(p, FILE).unwrap()).unwrap()
    }

    fn parts(uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut b = http::Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn a_bound_header_replaces_the_clients_own_value() {
        let s = secrets();
        let mut p = parts("/v1/charge", &[("authorization", "Bearer fake")]);
        let done = s.inject("API.billing.example", &mut p).unwrap();
        assert_eq!(done.names, vec!["billing"]);
        let all: Vec<_> = p.headers.get_all("authorization").iter().collect();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0], "Bearer sk_live_TOPSECRET");
    }

    #[test]
    fn no_header_outside_the_bound_path() {
        let s = secrets();
        let mut p = parts("/v2/charge", &[]);
        s.inject("api.billing.example", &mut p).unwrap();
        assert!(p.headers.get("authorization").is_none());
    }

    #[test]
    fn placeholders_are_filled_in_headers_and_urls() {
        let s = secrets();
        let mut p = parts(
            "/x?key=guard:secret/other&a=1",
            &[("x-api-key", "guard:secret/other")],
        );
        s.inject("api.other.example", &mut p).unwrap();
        assert_eq!(p.headers["x-api-key"], "o/t+h");
        assert_eq!(p.uri.query(), Some("key=o%2Ft%2Bh&a=1"));
    }

    #[test]
    fn a_placeholder_to_an_unbound_host_is_refused_without_the_value() {
        let s = secrets();
        let mut p = parts("/", &[("x-api-key", "guard:secret/billing")]);
        let e = s.inject("evil.example", &mut p).unwrap_err();
        assert!(matches!(e, InjectError::Unbound { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("billing") && msg.contains("evil.example"),
            "{msg}"
        );
        assert!(!msg.contains("TOPSECRET"), "{msg}");
        let mut p = parts("/?k=guard:secret/nope", &[]);
        assert!(matches!(
            s.inject("api.other.example", &mut p),
            Err(InjectError::Unknown { .. })
        ));
    }

    #[test]
    fn a_binding_to_an_undefined_secret_names_the_field() {
        let p = Path::new("/etc/guard/secrets.ron");
        let f = file::parse(
            p,
            r#"(secrets: [], bindings: [(secret: "x", hosts: ["h"])])"#,
        )
        .unwrap();
        let e = Secrets::compile(p, f).unwrap_err().to_string();
        assert!(e.contains("bindings[0].secret"), "{e}");
        assert!(e.contains("/etc/guard/secrets.ron"), "{e}");
    }

    #[test]
    fn debug_output_has_names_only() {
        let d = format!("{:?}", secrets());
        assert!(d.contains("billing"), "{d}");
        assert!(!d.contains("TOPSECRET"), "{d}");
    }
}
