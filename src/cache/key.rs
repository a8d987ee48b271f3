//! Cache keys: HMAC-SHA256 of the credential, so neither memory dumps nor Redis
//! ever hold a usable secret, and replicas sharing the HMAC key share entries.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::auth::Credential;
use crate::config::{CacheConfig, ConfigError, CACHE_KEY_ENV};

/// Shortest HMAC key accepted from a file or the environment.
const MIN_KEY_BYTES: usize = 32;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct CacheKey(pub [u8; 32]);

/// HMAC output is already uniformly random: its first eight bytes are the
/// hash, with no SipHash round over all 32 bytes on every lookup.
impl std::hash::Hash for CacheKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(first));
    }
}

/// Hasher for maps keyed by [`CacheKey`]: passes the key's own bits through.
#[derive(Default)]
pub struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only reached by other key types; fold them in (FNV-1a).
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 ^= value;
    }
}

pub type KeyHashBuilder = std::hash::BuildHasherDefault<KeyHasher>;

impl std::fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CacheKey({})", hex::encode(&self.0[..6]))
    }
}

impl CacheKey {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(text: &str) -> Option<CacheKey> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(text, &mut out).ok()?;
        Some(CacheKey(out))
    }
}

/// Where the HMAC key came from; a shared cache needs a shared key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyOrigin {
    File,
    Environment,
    /// Random per process: fine alone, useless for a fleet.
    Random,
}

pub struct Keyer {
    /// Keyed once; each request clones the prepared state instead of
    /// re-deriving the HMAC pads.
    mac: Hmac<Sha256>,
    pub origin: KeyOrigin,
}

impl Keyer {
    pub fn from_config(config: &CacheConfig, env_key: Option<&str>) -> Result<Keyer, ConfigError> {
        let (material, origin) = if let Some(path) = &config.key_file {
            let bytes = std::fs::read(path).map_err(|e| ConfigError::Key {
                key: "cache.key_file".into(),
                reason: format!("cannot read {}: {e}", path.display()),
            })?;
            let trimmed = bytes.trim_ascii().to_vec();
            if trimmed.len() < MIN_KEY_BYTES {
                return Err(ConfigError::Key {
                    key: "cache.key_file".into(),
                    reason: format!(
                        "holds {} bytes; at least {MIN_KEY_BYTES} are needed",
                        trimmed.len()
                    ),
                });
            }
            (trimmed, KeyOrigin::File)
        } else if let Some(text) = env_key {
            if text.len() < MIN_KEY_BYTES {
                return Err(ConfigError::Env {
                    var: CACHE_KEY_ENV.into(),
                    reason: format!("at least {MIN_KEY_BYTES} characters are needed"),
                });
            }
            (text.as_bytes().to_vec(), KeyOrigin::Environment)
        } else {
            let random: [u8; 32] = rand::random();
            (random.to_vec(), KeyOrigin::Random)
        };
        Ok(Keyer::new(&material, origin))
    }

    pub fn new(material: &[u8], origin: KeyOrigin) -> Keyer {
        Keyer {
            mac: Hmac::<Sha256>::new_from_slice(material).expect("HMAC takes keys of any length"),
            origin,
        }
    }

    pub fn key(&self, credential: &Credential) -> CacheKey {
        let mut mac = self.mac.clone();
        for part in credential.cache_material() {
            // Length-prefixed so that ("ab","c") and ("a","bc") differ.
            mac.update(&(part.len() as u32).to_be_bytes());
            mac.update(part);
        }
        CacheKey(mac.finalize().into_bytes().into())
    }

    /// The key under which failed logins of `login` are counted: Grafana
    /// counts them per lower-cased username. Its own tag keeps it apart from
    /// every credential's key.
    pub fn login_key(&self, login: &str) -> CacheKey {
        let mut mac = self.mac.clone();
        // Go's strings.ToLower maps each character on its own (`İ` to `i`);
        // Rust's full mapping would make `İ` two characters and a second
        // budget for what Grafana counts as the same login.
        let login: String = login
            .chars()
            .map(|c| c.to_lowercase().next().unwrap_or(c))
            .collect();
        for part in [b"login-failures".as_slice(), login.as_bytes()] {
            mac.update(&(part.len() as u32).to_be_bytes());
            mac.update(part);
        }
        CacheKey(mac.finalize().into_bytes().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logins_fold_as_go_folds_them() {
        let k = Keyer::new(&[1; 32], KeyOrigin::File);
        assert_eq!(k.login_key("admİn"), k.login_key("admin"));
        assert_eq!(k.login_key("ADMIN"), k.login_key("admin"));
        assert_ne!(k.login_key("admin2"), k.login_key("admin"));
    }

    #[test]
    fn key_depends_on_secret_and_hmac_key() {
        let a = Keyer::new(&[1; 32], KeyOrigin::File);
        let b = Keyer::new(&[2; 32], KeyOrigin::File);
        let c1 = Credential::Session { token: "x".into() };
        let c2 = Credential::Session { token: "y".into() };
        assert_eq!(a.key(&c1), a.key(&c1));
        assert_ne!(a.key(&c1), a.key(&c2));
        assert_ne!(a.key(&c1), b.key(&c1));
        let split1 = Credential::Password {
            user: "ab".into(),
            password: "c".into(),
        };
        let split2 = Credential::Password {
            user: "a".into(),
            password: "bc".into(),
        };
        assert_ne!(a.key(&split1), a.key(&split2));
    }
}
