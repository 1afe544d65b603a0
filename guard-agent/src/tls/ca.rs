//! The local certificate authority that signs the leaf certificates the agent
//! presents to intercepted clients.
//!
//! On first run [`LocalCa::load_or_create`] generates an ECDSA P-256 key and a
//! self-signed CA certificate named "Guard local CA (<hostname>)", valid for
//! about ten years, in the agent's state directory:
//!
//! - [`CA_KEY_FILE`] (PKCS#8 PEM), mode 0600. It is created with
//!   `O_CREAT|O_EXCL` and mode 0600 from the first byte, written to a
//!   temporary name and renamed into place, so it is never world-readable and
//!   never half-written.
//! - [`CA_CERT_FILE`] (PEM), mode 0644: the public part, which users install
//!   into trust stores (see [`super::trust_store`]).
//!
//! Later runs load both files. Loading refuses a key file whose mode grants
//! anything to group or others, a key that does not match the certificate,
//! and an expired CA, each with an error naming the file.
//!
//! Never: log, print, copy or export the private key. `Debug` shows only the
//! certificate's subject and paths; [`LocalCa::export_pem`] exports only the
//! certificate.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use time::{Duration, OffsetDateTime};

/// File name of the CA certificate in the state directory.
pub const CA_CERT_FILE: &str = "guard-ca.crt";
/// File name of the CA private key in the state directory.
pub const CA_KEY_FILE: &str = "guard-ca.key";
/// How long a new CA is valid.
pub const CA_VALIDITY: Duration = Duration::days(3650);

/// Why the CA could not be created or loaded.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "CA key file {path} has mode {mode:04o}, which lets other users read it; \
         Guard requires 0600: run `chmod 600 {path}` if the key was not exposed, \
         or delete both CA files to create a new CA"
    )]
    KeyFileTooOpen { path: PathBuf, mode: u32 },
    #[error(
        "incomplete CA in {dir}: {present} exists but {missing} does not; \
         restore the missing file, or delete {present} to create a new CA"
    )]
    Incomplete {
        dir: PathBuf,
        present: &'static str,
        missing: &'static str,
    },
    #[error("{path} is not a usable CA certificate: {reason}")]
    BadCertificate { path: PathBuf, reason: String },
    #[error("{path} is not a usable CA private key: {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("CA key {key} does not belong to CA certificate {cert}")]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    #[error(
        "CA certificate {path} expired on {not_after}; delete both CA files to create a new CA \
         (and re-install it in trust stores)"
    )]
    Expired { path: PathBuf, not_after: String },
    #[error("CA already exists in {dir}")]
    AlreadyExists { dir: PathBuf },
    #[error("cannot generate the CA: {0}")]
    Generate(String),
}

/// The Guard CA: its certificate and, kept inside this value only, its key.
pub struct LocalCa {
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    subject: String,
    not_after: OffsetDateTime,
    cert_path: PathBuf,
    key_path: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalCa")
            .field("subject", &self.subject)
            .field("not_after", &self.not_after)
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

/// The common name a new CA gets on this host: "Guard local CA (<hostname>)".
pub fn default_common_name() -> String {
    let host = fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string());
    format!("Guard local CA ({host})")
}

impl LocalCa {
    /// Loads the CA from `state_dir`, or creates it there if neither file
    /// exists yet (creating `state_dir` with mode 0700 if needed).
    pub fn load_or_create(state_dir: &Path) -> Result<Self, CaError> {
        let cert = state_dir.join(CA_CERT_FILE);
        let key = state_dir.join(CA_KEY_FILE);
        match (exists(&cert)?, exists(&key)?) {
            (false, false) => Self::create(state_dir, &default_common_name()),
            _ => Self::load(state_dir),
        }
    }

    /// Creates a new CA named `common_name` in `state_dir`. Fails if either
    /// CA file already exists: an existing CA is never overwritten.
    pub fn create(state_dir: &Path, common_name: &str) -> Result<Self, CaError> {
        let cert_path = state_dir.join(CA_CERT_FILE);
        let key_path = state_dir.join(CA_KEY_FILE);
        if exists(&cert_path)? || exists(&key_path)? {
            return Err(CaError::AlreadyExists {
                dir: state_dir.to_path_buf(),
            });
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(|source| CaError::Io {
                action: "create state directory",
                path: state_dir.to_path_buf(),
                source,
            })?;

        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| CaError::Generate(e.to_string()))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "Guard");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::days(1);
        params.not_after = now + CA_VALIDITY;
        params.serial_number =
            Some(super::random_serial().map_err(|_| CaError::Generate("no randomness".into()))?);
        let cert = params
            .self_signed(&key)
            .map_err(|e| CaError::Generate(e.to_string()))?;

        // Key first: a certificate without its key is useless, and the key
        // file's creation is the step that must never leak.
        write_new_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_new_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
        Self::load(state_dir)
    }

    /// Loads an existing CA from `state_dir`.
    pub fn load(state_dir: &Path) -> Result<Self, CaError> {
        let cert_path = state_dir.join(CA_CERT_FILE);
        let key_path = state_dir.join(CA_KEY_FILE);
        match (exists(&cert_path)?, exists(&key_path)?) {
            (true, true) => {}
            (true, false) => {
                return Err(CaError::Incomplete {
                    dir: state_dir.to_path_buf(),
                    present: CA_CERT_FILE,
                    missing: CA_KEY_FILE,
                })
            }
            (false, true) => {
                return Err(CaError::Incomplete {
                    dir: state_dir.to_path_buf(),
                    present: CA_KEY_FILE,
                    missing: CA_CERT_FILE,
                })
            }
            (false, false) => {
                return Err(CaError::Io {
                    action: "read",
                    path: cert_path,
                    source: io::Error::from(io::ErrorKind::NotFound),
                })
            }
        }

        let meta = fs::metadata(&key_path).map_err(|source| CaError::Io {
            action: "stat",
            path: key_path.clone(),
            source,
        })?;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(CaError::KeyFileTooOpen {
                path: key_path,
                mode,
            });
        }

        let cert_pem = fs::read_to_string(&cert_path).map_err(|source| CaError::Io {
            action: "read",
            path: cert_path.clone(),
            source,
        })?;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| {
            CaError::BadCertificate {
                path: cert_path.clone(),
                reason: format!("no PEM certificate ({e})"),
            }
        })?;
        let key_pem = fs::read_to_string(&key_path).map_err(|source| CaError::Io {
            action: "read",
            path: key_path.clone(),
            source,
        })?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::BadKey {
            path: key_path.clone(),
            reason: e.to_string(),
        })?;
        drop(key_pem);

        let (_, parsed) = x509_parser::parse_x509_certificate(&cert_der).map_err(|e| {
            CaError::BadCertificate {
                path: cert_path.clone(),
                reason: e.to_string(),
            }
        })?;
        if !parsed.is_ca() {
            return Err(CaError::BadCertificate {
                path: cert_path,
                reason: "it is not a CA certificate (basicConstraints CA:FALSE)".into(),
            });
        }
        if parsed.public_key().subject_public_key.data.as_ref() != key.der_bytes() {
            return Err(CaError::KeyMismatch {
                key: key_path,
                cert: cert_path,
            });
        }
        let not_after = parsed.validity().not_after.to_datetime();
        if not_after <= OffsetDateTime::now_utc() {
            return Err(CaError::Expired {
                path: cert_path,
                not_after: not_after.to_string(),
            });
        }
        let subject = parsed.subject().to_string();

        let issuer =
            Issuer::from_ca_cert_der(&cert_der, key).map_err(|e| CaError::BadCertificate {
                path: cert_path.clone(),
                reason: e.to_string(),
            })?;

        Ok(Self {
            cert_der: cert_der.into_owned(),
            cert_pem,
            subject,
            not_after,
            cert_path,
            key_path,
            issuer,
        })
    }

    /// The CA certificate in PEM, for trust stores and bundles. Never the key.
    pub fn export_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate in DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The certificate's subject, e.g. `CN=Guard local CA (host), O=Guard`.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// When the CA certificate expires; leaves never outlive it.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// Path of the CA certificate file.
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// The signer for leaf certificates; only [`super::leaf`] uses it.
    pub(crate) fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }
}

fn exists(path: &Path) -> Result<bool, CaError> {
    path.try_exists().map_err(|source| CaError::Io {
        action: "stat",
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `contents` to a new file at `path` with `mode`, atomically: a
/// temporary file created with `O_CREAT|O_EXCL` and `mode` (so it never has
/// looser permissions, whatever the umask allows), synced, then renamed
/// without replacing an existing `path`.
pub(crate) fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    let io_err = |action: &'static str, p: &Path| {
        let p = p.to_path_buf();
        move |source| CaError::Io {
            action,
            path: p,
            source,
        }
    };
    let tmp = temp_path(path);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err("create", &tmp))?;
    let result = (|| {
        // The umask may have removed bits (never added any); make the mode exact.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(contents)?;
        file.sync_all()
    })()
    .map_err(io_err("write", &tmp))
    .and_then(|()| {
        // hard_link + unlink: fails instead of replacing a file that appeared
        // at `path` in the meantime.
        fs::hard_link(&tmp, path).map_err(io_err("create", path))
    });
    let _ = fs::remove_file(&tmp);
    result
}

fn temp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn first_run_creates_a_ca_with_a_private_key_file_and_a_public_cert() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let ca = LocalCa::load_or_create(&state).unwrap();

        assert_eq!(mode_of(&state.join(CA_KEY_FILE)), 0o600);
        assert_eq!(mode_of(&state.join(CA_CERT_FILE)), 0o644);
        assert_eq!(mode_of(&state), 0o700);
        assert!(
            ca.subject().contains("Guard local CA ("),
            "{}",
            ca.subject()
        );
        assert!(ca.export_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(!ca.export_pem().contains("PRIVATE KEY"));
        assert!(!format!("{ca:?}").contains("PRIVATE"));

        let (_, cert) = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap();
        assert!(cert.is_ca());
        let lifetime = cert.validity().time_to_expiration().unwrap();
        assert!(lifetime > Duration::days(3600), "{lifetime}");
        assert_eq!(
            cert.public_key().algorithm.algorithm,
            x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
        );
        // No temporary files left behind.
        assert_eq!(fs::read_dir(&state).unwrap().count(), 2);
    }

    #[test]
    fn second_run_loads_the_same_ca() {
        let dir = tempfile::tempdir().unwrap();
        let first = LocalCa::load_or_create(dir.path()).unwrap();
        let second = LocalCa::load_or_create(dir.path()).unwrap();
        assert_eq!(first.cert_der(), second.cert_der());
        assert_eq!(first.export_pem(), second.export_pem());
    }

    #[test]
    fn create_never_overwrites_an_existing_ca() {
        let dir = tempfile::tempdir().unwrap();
        LocalCa::create(dir.path(), "Guard local CA (test)").unwrap();
        let err = LocalCa::create(dir.path(), "Guard local CA (test)").unwrap_err();
        assert!(matches!(err, CaError::AlreadyExists { .. }), "{err}");
    }

    #[test]
    fn a_group_or_world_readable_key_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        LocalCa::create(dir.path(), "Guard local CA (test)").unwrap();
        let key = dir.path().join(CA_KEY_FILE);
        for loose in [0o644, 0o640, 0o604, 0o660] {
            fs::set_permissions(&key, fs::Permissions::from_mode(loose)).unwrap();
            let err = LocalCa::load(dir.path()).unwrap_err();
            assert!(
                matches!(err, CaError::KeyFileTooOpen { mode, .. } if mode == loose),
                "{err}"
            );
            let msg = err.to_string();
            assert!(msg.contains(&key.display().to_string()), "{msg}");
            assert!(msg.contains("0600"), "{msg}");
        }
        // Stricter than 0600 is fine.
        fs::set_permissions(&key, fs::Permissions::from_mode(0o400)).unwrap();
        LocalCa::load(dir.path()).unwrap();
    }

    #[test]
    fn a_missing_half_is_reported_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        LocalCa::create(dir.path(), "Guard local CA (test)").unwrap();
        fs::remove_file(dir.path().join(CA_CERT_FILE)).unwrap();
        let err = LocalCa::load_or_create(dir.path()).unwrap_err();
        assert!(
            matches!(err, CaError::Incomplete { missing, .. } if missing == CA_CERT_FILE),
            "{err}"
        );
        assert!(dir.path().join(CA_KEY_FILE).exists());
    }

    #[test]
    fn a_key_from_another_ca_is_refused() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        LocalCa::create(a.path(), "Guard local CA (a)").unwrap();
        LocalCa::create(b.path(), "Guard local CA (b)").unwrap();
        fs::copy(b.path().join(CA_KEY_FILE), a.path().join(CA_KEY_FILE)).unwrap();
        fs::set_permissions(
            a.path().join(CA_KEY_FILE),
            fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let err = LocalCa::load(a.path()).unwrap_err();
        assert!(matches!(err, CaError::KeyMismatch { .. }), "{err}");
    }

    #[test]
    fn new_files_get_their_mode_and_never_replace_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        write_new_file(&path, b"secret", 0o600).unwrap();
        assert_eq!(mode_of(&path), 0o600);
        let err = write_new_file(&path, b"other", 0o600).unwrap_err();
        assert!(matches!(err, CaError::Io { .. }), "{err}");
        assert_eq!(fs::read(&path).unwrap(), b"secret");
    }
}
