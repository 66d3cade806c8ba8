//! The WebTransport certificate: loaded from PEM files (or generated, self-signed, for
//! development), checked for changes and reloaded on SIGHUP, and published for `GET /v1/cert-hash`.

use std::path::PathBuf;
use std::sync::RwLock;
use std::time::{Duration, SystemTime};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::time::Instant;
use tracing::warn;

/// Self-signed development certificates are replaced this often (they are valid 14 days).
const SELF_SIGNED_ROTATION: Duration = Duration::from_secs(12 * 24 * 3600);

/// The names a self-signed development certificate is issued for.
const SELF_SIGNED_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// Self-signed development certificates are valid this long (browsers accept a certificate by
/// its hash only when it is valid at most 14 days).
const SELF_SIGNED_VALIDITY: Duration = Duration::from_secs(14 * 24 * 3600);

/// A certificate chain and its private key, as rustls takes them.
#[derive(Debug)]
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    /// Loads a PEM certificate chain and a PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub async fn load_pemfiles(cert: &std::path::Path, key: &std::path::Path) -> Result<Self, String> {
        let (cert, key) = (cert.to_owned(), key.to_owned());
        tokio::task::spawn_blocking(move || {
            let chain = CertificateDer::pem_file_iter(&cert)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("certificate: {e}"))?;
            if chain.is_empty() {
                return Err("certificate: the file holds no certificate".to_string());
            }
            let key = PrivateKeyDer::from_pem_file(&key).map_err(|e| format!("private key: {e}"))?;
            Ok(Self { chain, key })
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// An ECDSA P-256 certificate for `names`, valid from now for 14 days.
    pub fn self_signed(names: &[&str]) -> Result<Self, String> {
        let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names).map_err(|e| e.to_string())?;
        let mut subject = rcgen::DistinguishedName::new();
        subject.push(rcgen::DnType::CommonName, "courtside development");
        params.distinguished_name = subject;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now;
        params.not_after = now + SELF_SIGNED_VALIDITY;
        let cert = params.self_signed(&key_pair).map_err(|e| e.to_string())?;
        Ok(Self {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pair.serialize_der())),
        })
    }

    /// SHA-256 of the leaf certificate's DER, lowercase hex (what `serverCertificateHashes` takes).
    pub fn leaf_sha256(&self) -> String {
        self.chain
            .first()
            .map(|c| hex(ring::digest::digest(&ring::digest::SHA256, c.as_ref()).as_ref()))
            .unwrap_or_default()
    }
}

/// The certificate could not be loaded or generated.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("loading certificate {cert} and key {key}: {message}")]
    Load { cert: String, key: String, message: String },
    #[error("generating a self-signed development certificate: {0}")]
    SelfSigned(String),
}

/// The certificate currently served, for `GET /v1/cert-hash`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateInfo {
    /// SHA-256 of the leaf certificate's DER, lowercase hex.
    pub sha256: String,
    pub self_signed: bool,
    /// The UDP port WebTransport listens on (as bound; a load balancer may expose another).
    pub port: u16,
}

impl CertificateInfo {
    pub fn of(identity: &Identity, self_signed: bool, port: u16) -> Self {
        Self {
            sha256: identity.leaf_sha256(),
            self_signed,
            port,
        }
    }
}

/// Shared slot for the current certificate; empty while WebTransport is off.
#[derive(Debug, Default)]
pub struct CertificateSlot(RwLock<Option<CertificateInfo>>);

impl CertificateSlot {
    pub fn get(&self) -> Option<CertificateInfo> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set(&self, info: CertificateInfo) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Some(info);
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where the identity comes from, and what is needed to tell when it changes.
#[derive(Debug)]
pub enum CertificateSource {
    Files {
        cert: PathBuf,
        key: PathBuf,
        modified: Option<(SystemTime, SystemTime)>,
    },
    SelfSigned {
        created: Instant,
    },
}

fn file_times(cert: &PathBuf, key: &PathBuf) -> Option<(SystemTime, SystemTime)> {
    let modified = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    Some((modified(cert)?, modified(key)?))
}

impl CertificateSource {
    /// Loads the files (`Some((cert, key))`), or generates a self-signed certificate.
    pub async fn load(files: Option<&(PathBuf, PathBuf)>) -> Result<(Identity, Self), CertificateError> {
        match files {
            Some((cert, key)) => {
                let identity = Identity::load_pemfiles(cert, key)
                    .await
                    .map_err(|e| CertificateError::Load {
                        cert: cert.display().to_string(),
                        key: key.display().to_string(),
                        message: e,
                    })?;
                let modified = file_times(cert, key);
                let source = Self::Files {
                    cert: cert.clone(),
                    key: key.clone(),
                    modified,
                };
                Ok((identity, source))
            }
            None => {
                let identity = Identity::self_signed(&SELF_SIGNED_NAMES).map_err(CertificateError::SelfSigned)?;
                let source = Self::SelfSigned {
                    created: Instant::now(),
                };
                Ok((identity, source))
            }
        }
    }

    pub fn is_self_signed(&self) -> bool {
        matches!(self, Self::SelfSigned { .. })
    }

    /// A new identity when the files changed (or `forced`), or when a self-signed certificate
    /// is due for replacement; `None` keeps the current one (a load failure is logged).
    pub async fn reload_if_changed(&mut self, forced: bool) -> Option<Identity> {
        match self {
            Self::Files { cert, key, modified } => {
                let now = file_times(cert, key);
                if !forced && now == *modified {
                    return None;
                }
                match Identity::load_pemfiles(&*cert, &*key).await {
                    Ok(identity) => {
                        *modified = now;
                        Some(identity)
                    }
                    Err(error) => {
                        warn!(%error, "certificate files changed but cannot be loaded; keeping the current certificate");
                        None
                    }
                }
            }
            Self::SelfSigned { created } => {
                if !forced && created.elapsed() < SELF_SIGNED_ROTATION {
                    return None;
                }
                match Identity::self_signed(&SELF_SIGNED_NAMES) {
                    Ok(identity) => {
                        *created = Instant::now();
                        Some(identity)
                    }
                    Err(error) => {
                        warn!(%error, "cannot generate a new self-signed certificate");
                        None
                    }
                }
            }
        }
    }
}

/// SIGHUP, the operator's "reload the certificate now", listened for from creation on: until
/// a handler exists, its default action kills the process.
#[derive(Debug, Default)]
pub struct Hangup(#[cfg(unix)] Option<tokio::signal::unix::Signal>);

impl Hangup {
    #[cfg(unix)]
    pub fn listen() -> Self {
        Self(tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok())
    }

    #[cfg(not(unix))]
    pub fn listen() -> Self {
        Self()
    }

    /// Resolves on the next SIGHUP (never where there is none).
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        if let Some(signal) = &mut self.0 {
            signal.recv().await;
            return;
        }
        std::future::pending::<()>().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_self_signed_certificate_is_published_by_its_hash_and_kept_until_due() {
        let (identity, mut source) = CertificateSource::load(None).await.expect("self-signed");
        let info = CertificateInfo::of(&identity, source.is_self_signed(), 4433);
        assert_eq!(info.sha256.len(), 64);
        assert!(info.self_signed);
        assert!(source.reload_if_changed(false).await.is_none(), "not due yet");
        let renewed = source.reload_if_changed(true).await.expect("forced");
        assert_ne!(CertificateInfo::of(&renewed, true, 4433).sha256, info.sha256);
    }

    #[tokio::test]
    async fn missing_files_are_a_clear_error() {
        let files = (
            PathBuf::from("/nonexistent/cert.pem"),
            PathBuf::from("/nonexistent/key.pem"),
        );
        let Err(error) = CertificateSource::load(Some(&files)).await else {
            panic!("missing files loaded");
        };
        assert!(error.to_string().contains("/nonexistent/cert.pem"), "{error}");
    }
}
