//! The server certificate: loaded from `tls.cert`/`tls.key`, generated once
//! (self-signed, rcgen) when neither exists, and reloaded when the files change
//! (cert-manager rotates the Secret under a running sidecar).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};

use crate::config::TlsConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls.cert {cert} exists but tls.key {key} does not (or the reverse); refusing to generate over one of them")]
    HalfPair { cert: PathBuf, key: PathBuf },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{path} holds no PEM {what}")]
    NoPem { path: PathBuf, what: &'static str },
    #[error("certificate {cert} and key {key} do not belong together: {reason}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Serves whichever certificate is current; swapped atomically on reload.
#[derive(Debug)]
pub struct CertResolver {
    current: ArcSwap<CertifiedKey>,
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl CertResolver {
    /// When the certificate being served expires (its notAfter), in seconds
    /// since the Unix epoch; `None` when its DER cannot be read that far.
    pub fn not_after(&self) -> Option<i64> {
        self.current
            .load()
            .cert
            .first()
            .and_then(|leaf| not_after(leaf.as_ref()))
    }
}

/// notAfter of a DER certificate (RFC 5280, 4.1: Certificate → tbsCertificate
/// → validity), in seconds since the Unix epoch.
fn not_after(der: &[u8]) -> Option<i64> {
    let (certificate, _) = der_element(der, 0x30)?;
    let (mut tbs, _) = der_element(certificate, 0x30)?;
    if tbs.first() == Some(&0xa0) {
        // [0] EXPLICIT version, absent from v1 certificates.
        tbs = der_element(tbs, 0xa0)?.1;
    }
    let (_serial, rest) = der_element(tbs, 0x02)?;
    let (_signature, rest) = der_element(rest, 0x30)?;
    let (_issuer, rest) = der_element(rest, 0x30)?;
    let (validity, _) = der_element(rest, 0x30)?;
    let (_not_before, rest) = der_time(validity)?;
    Some(der_time(rest)?.0)
}

/// The DER element tagged `tag` at the start of `input`: (its contents, what
/// follows it).
fn der_element(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&found, rest) = input.split_first()?;
    if found != tag {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (len, rest) = rest.split_at(n);
        (len.iter().fold(0usize, |acc, b| acc << 8 | usize::from(*b)), rest)
    };
    (rest.len() >= len).then(|| rest.split_at(len))
}

/// A certificate's time (RFC 5280, 4.1.2.5: UTCTime `YYMMDDHHMMSSZ` up to
/// 2049, GeneralizedTime `YYYYMMDDHHMMSSZ` after) in seconds since the epoch,
/// and what follows it.
fn der_time(input: &[u8]) -> Option<(i64, &[u8])> {
    let (tag, digits) = match input.first()? {
        0x17 => (0x17, 12),
        0x18 => (0x18, 14),
        _ => return None,
    };
    let (text, rest) = der_element(input, tag)?;
    if text.len() != digits + 1 || text[digits] != b'Z' || !text[..digits].iter().all(u8::is_ascii_digit) {
        return None;
    }
    let number = |at: usize, len: usize| {
        text[at..at + len]
            .iter()
            .fold(0i64, |acc, d| acc * 10 + i64::from(d - b'0'))
    };
    let (year, at) = if tag == 0x17 {
        let yy = number(0, 2);
        (if yy >= 50 { 1900 + yy } else { 2000 + yy }, 2)
    } else {
        (number(0, 4), 4)
    };
    let (month, day) = (number(at, 2), number(at + 2, 2));
    let (hour, minute, second) = (number(at + 4, 2), number(at + 6, 2), number(at + 8, 2));
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let seconds = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second;
    Some((seconds, rest))
}

/// Days from 1970-01-01 to a date of the proleptic Gregorian calendar
/// (H. Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    // Months from March, so that February comes last.
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

pub struct TlsMaterial {
    pub resolver: Arc<CertResolver>,
    pub server_config: Arc<rustls::ServerConfig>,
    pub fingerprint: String,
}

/// Loads (or creates) the pair and builds the rustls server config.
pub fn load(config: &TlsConfig) -> Result<TlsMaterial, TlsError> {
    ensure_pair(config)?;
    let key = read_pair(&config.cert, &config.key)?;
    let fingerprint = fingerprint(&key);
    let resolver = Arc::new(CertResolver {
        current: ArcSwap::from_pointee(key),
    });
    let mut server = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Generate(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(resolver.clone());
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsMaterial {
        resolver,
        server_config: Arc::new(server),
        fingerprint,
    })
}

/// SHA-256 of the leaf certificate, as `AB:CD:…` (what `openssl x509 -fingerprint -sha256` prints).
pub fn fingerprint(key: &CertifiedKey) -> String {
    let digest = key
        .cert
        .first()
        .map(|c| Sha256::digest(c.as_ref()))
        .unwrap_or_default();
    digest
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn ensure_pair(config: &TlsConfig) -> Result<(), TlsError> {
    match (config.cert.exists(), config.key.exists()) {
        (true, true) => Ok(()),
        (false, false) => generate(config),
        _ => Err(TlsError::HalfPair {
            cert: config.cert.clone(),
            key: config.key.clone(),
        }),
    }
}

fn generate(config: &TlsConfig) -> Result<(), TlsError> {
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
    if let Some(host) = host_name() {
        names.push(host);
    }
    names.extend(config.hostnames.iter().cloned());
    names.dedup();
    let generated =
        rcgen::generate_simple_self_signed(names.clone()).map_err(|e| TlsError::Generate(e.to_string()))?;
    write_file(&config.key, generated.key_pair.serialize_pem().as_bytes(), 0o600)?;
    write_file(&config.cert, generated.cert.pem().as_bytes(), 0o644)?;
    tracing::info!(cert = %config.cert.display(), names = ?names, "generated a self-signed certificate");
    Ok(())
}

fn host_name() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    (!name.is_empty()).then(|| name.to_owned())
}

fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    let fail = |source| TlsError::Write {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(fail)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(fail)?;
    file.write_all(contents).map_err(fail)
}

fn read_pair(cert_path: &Path, key_path: &Path) -> Result<CertifiedKey, TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let cert_pem = read(cert_path)?;
    let key_pem = read(key_path)?;
    let chain = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| TlsError::NoPem {
            path: cert_path.to_owned(),
            what: "certificate",
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoPem {
            path: cert_path.to_owned(),
            what: "certificate",
        });
    }
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .ok()
        .flatten()
        .ok_or_else(|| TlsError::NoPem {
            path: key_path.to_owned(),
            what: "private key",
        })?;
    CertifiedKey::from_der(chain, key, &provider()).map_err(|e| TlsError::Mismatch {
        cert: cert_path.to_owned(),
        key: key_path.to_owned(),
        reason: e.to_string(),
    })
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Watches the files and swaps the certificate when both change into a valid
/// pair; a half-written or broken pair is logged and the old one kept.
pub fn spawn_reloader(
    config: TlsConfig,
    resolver: Arc<CertResolver>,
    mut shutdown: crate::shutdown::Shutdown,
) {
    if config.reload_interval.is_zero() {
        return;
    }
    tokio::spawn(async move {
        let mut seen = (modified(&config.cert), modified(&config.key));
        let mut tick = tokio::time::interval(config.reload_interval);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.wait() => return,
            }
            let now = (modified(&config.cert), modified(&config.key));
            if now == seen {
                continue;
            }
            match read_pair(&config.cert, &config.key) {
                Ok(key) => {
                    tracing::info!(fingerprint = %fingerprint(&key), "reloaded TLS certificate");
                    resolver.current.store(Arc::new(key));
                    seen = now;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "TLS files changed but cannot be loaded; keeping the current certificate")
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> TlsConfig {
        TlsConfig {
            cert: dir.join("certs/gw.crt"),
            key: dir.join("certs/gw.key"),
            ..TlsConfig::default()
        }
    }

    #[test]
    fn generates_once_then_reuses() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(dir.path());
        let first = load(&c).unwrap().fingerprint;
        let mode = std::fs::metadata(&c.key).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.permissions().mode() & 0o777, 0o600);
        let second = load(&c).unwrap().fingerprint;
        assert_eq!(first, second);
    }

    #[test]
    fn reads_the_expiry_of_the_certificate_it_serves() {
        for ((y, m, d), expected) in [((2031, 5, 6), 1_935_792_000), ((2061, 12, 31), 2_903_212_800)] {
            let mut params = rcgen::CertificateParams::new(vec!["gw.test".to_owned()]).unwrap();
            params.not_after = rcgen::date_time_ymd(y, m, d);
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            assert_eq!(not_after(cert.der()), Some(expected), "{y}-{m}-{d}");
        }
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(not_after(b"\x30\x03\x02\x01\x01"), None);

        let dir = tempfile::tempdir().unwrap();
        let material = load(&config(dir.path())).unwrap();
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let expiry = material
            .resolver
            .not_after()
            .expect("the generated certificate's notAfter");
        assert!(expiry > now, "{expiry} <= {now}");
    }

    #[test]
    fn broken_pairs_are_errors_not_regenerations() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(dir.path());
        load(&c).unwrap();
        let other = config(&dir.path().join("other"));
        load(&other).unwrap();
        std::fs::copy(&other.key, &c.key).unwrap();
        assert!(matches!(load(&c), Err(TlsError::Mismatch { .. })));
        std::fs::write(&c.key, "garbage").unwrap();
        assert!(matches!(load(&c), Err(TlsError::NoPem { .. })));
        std::fs::remove_file(&c.key).unwrap();
        assert!(matches!(load(&c), Err(TlsError::HalfPair { .. })));
    }
}
