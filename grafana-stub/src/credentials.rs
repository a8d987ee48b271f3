//! Credential formats exactly as Grafana builds and checks them
//! (docs/grafana.md, "Credential formats"): PBKDF2 password encoding, legacy API
//! keys, `glsa_` service-account tokens and session-token hashing.

use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine;
use rand::distributions::Alphanumeric;
use rand::{Rng, RngCore};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Grafana's `util.EncodePassword`: 10,000 iterations, 50 bytes.
pub const PBKDF2_ITERATIONS: u32 = 10_000;
const PBKDF2_LEN: usize = 50;

/// Prefix of every service-account token (`satokengen`: "gl" + "sa" + "_").
pub const SA_TOKEN_PREFIX: &str = "glsa_";
/// What makes Grafana treat a token as prefixed rather than legacy.
pub const GRAFANA_PREFIX: &str = "gl";

/// Go's `base64.StdEncoding`: padding is required, but — unlike the `base64`
/// crate's default — non-zero trailing bits are accepted. One of the seed keys
/// (`…MX1=`) relies on that.
const GO_STD_ENCODING: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_encode_padding(true)
        .with_decode_padding_mode(DecodePaddingMode::RequireCanonical)
        .with_decode_allow_trailing_bits(true),
);

/// `hex(PBKDF2-HMAC-SHA256(secret, salt, 10000, 50))`, Grafana's
/// `util.EncodePassword`, used for passwords, legacy keys and tokens alike.
pub fn encode_password(secret: &str, salt: &str) -> String {
    let mut out = [0u8; PBKDF2_LEN];
    pbkdf2::pbkdf2_hmac::<Sha256>(secret.as_bytes(), salt.as_bytes(), PBKDF2_ITERATIONS, &mut out);
    hex::encode(out)
}

/// Compares two stored hashes without leaking where they differ.
pub fn constant_time_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Grafana's `util.GetRandomString(n)`: alphanumerics.
pub fn random_alphanumeric(n: usize) -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(n)
        .map(char::from)
        .collect()
}

/// `n` random bytes as lower-case hex.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

/// The JSON inside a legacy API key (`apikeygen.ApiKeyJson`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegacyKey {
    #[serde(rename = "k")]
    pub secret: String,
    #[serde(rename = "n")]
    pub name: String,
    #[serde(rename = "id")]
    pub org_id: i64,
}

impl LegacyKey {
    /// A fresh key, as `apikeygen.New` makes one.
    pub fn generate(org_id: i64, name: &str) -> LegacyKey {
        LegacyKey {
            secret: random_alphanumeric(32),
            name: name.to_owned(),
            org_id,
        }
    }

    /// The string handed to the client: base64 of the JSON.
    pub fn encode(&self) -> String {
        // Serialising three plain fields cannot fail.
        let json = serde_json::to_vec(self).unwrap_or_default();
        GO_STD_ENCODING.encode(json)
    }

    /// `apikeygen.Decode`, Go semantics: StdEncoding (padding required,
    /// trailing bits allowed), then `json.Unmarshal`, which replaces invalid
    /// UTF-8 inside strings by U+FFFD instead of failing. Go also matches
    /// field names case-insensitively; the keys Grafana writes are lower case.
    pub fn decode(key: &str) -> Option<LegacyKey> {
        let raw = GO_STD_ENCODING.decode(key.as_bytes()).ok()?;
        let text = String::from_utf8_lossy(&raw);
        serde_json::from_str(&text).ok()
    }

    /// What Grafana stores: PBKDF2 of the secret, salted with the key name.
    pub fn hash(&self) -> String {
        encode_password(&self.secret, &self.name)
    }
}

/// A `glsa_<secret>_<checksum>` token split into its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaToken {
    pub secret: String,
    pub checksum: String,
}

impl SaToken {
    pub fn generate() -> SaToken {
        let secret = random_alphanumeric(32);
        let checksum = sa_checksum(&secret);
        SaToken { secret, checksum }
    }

    /// `satokengen.Decode`: a `gl` prefix, exactly three `_`-separated parts
    /// and a checksum over `<prefix part>_<secret>`; anything else is invalid
    /// without a lookup.
    pub fn decode(token: &str) -> Option<SaToken> {
        if !token.starts_with(GRAFANA_PREFIX) {
            return None;
        }
        let parts: Vec<&str> = token.split('_').collect();
        let [service, secret, checksum] = parts.as_slice() else {
            return None;
        };
        (checksum_of(&format!("{service}_{secret}")) == *checksum).then(|| SaToken {
            secret: (*secret).to_owned(),
            checksum: (*checksum).to_owned(),
        })
    }

    pub fn encode(&self) -> String {
        format!("{SA_TOKEN_PREFIX}{}_{}", self.secret, self.checksum)
    }

    /// What Grafana stores: PBKDF2 of the secret, salted with the checksum.
    pub fn hash(&self) -> String {
        encode_password(&self.secret, &self.checksum)
    }
}

/// CRC32-IEEE of `"glsa_" + secret`, as 4 little-endian bytes in hex.
pub fn sa_checksum(secret: &str) -> String {
    checksum_of(&format!("{SA_TOKEN_PREFIX}{secret}"))
}

fn checksum_of(text: &str) -> String {
    hex::encode(crc32fast::hash(text.as_bytes()).to_le_bytes())
}

/// Session tokens are stored as `sha256(token + secret_key)`, never in clear.
pub fn hash_session_token(token: &str, secret_key: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(token.as_bytes());
    hasher.update(secret_key.as_bytes());
    hex::encode(hasher.finalize())
}

/// Decodes `Authorization: Basic …` like Go's `Request.BasicAuth`: the scheme
/// is case-insensitive, the payload StdEncoding, split at the first colon.
pub fn decode_basic(header: &str) -> Option<(String, String)> {
    let scheme = header.get(..6)?;
    if !scheme.eq_ignore_ascii_case("basic ") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(&header.as_bytes()[6..])
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED_PMM_KEY: &str =
        "eyJrIjoiUXRkeDNMS1g1bFVyY0tUj1o0SmhBc3g4QUdTRVAwekoiLCJuIjoicG1tLXRlc3QiLCJpZCI6MX0=";
    const SEED_GRAFANA_KEY: &str =
        "eyJrIjoiWHZiSWd3NzdCYUZnNUtibE9obUpESmE3bzJYNDRIc0UiLCJuIjoibXlrZXkiLCJpZCI6MX1=";
    const SEED_TRUNCATED_KEY: &str = "eyJrIjoiT0tTcG1pUlY2RnVKZTFVaDFsNFZXdE9ZWmNrMkZYbk";

    #[test]
    fn grafana_token_vector() {
        // From Grafana's own satokengen tests (docs/grafana.md, "Credential formats").
        let token = SaToken::decode("glsa_iNValIdinValiDinvalidinvalidinva_5b582697").expect("well-formed");
        assert_eq!(token.secret, "iNValIdinValiDinvalidinvalidinva");
        assert_eq!(
            token.hash(),
            "c59a6e547944ef768df51d1fc8b2a9810bc777a0bd2e5daa9ef8590f300c884e0ab9470c22c6f789414fdb6485b531166ded"
        );
    }

    #[test]
    fn malformed_tokens_are_rejected_without_lookup() {
        assert!(SaToken::decode("glsa_iNValIdinValiDinvalidinvalidinva_5b582698").is_none());
        assert!(SaToken::decode("glsa_iNValIdinValiDinvalidinvalidinva").is_none());
        assert!(SaToken::decode("glsa_a_b_c").is_none());
        assert!(SaToken::decode("glsb_iNValIdinValiDinvalidinvalidinva_5b582697").is_none());
    }

    #[test]
    fn generated_tokens_round_trip() {
        let token = SaToken::generate();
        let text = token.encode();
        assert!(text.starts_with("glsa_") && text.len() == 5 + 32 + 1 + 8);
        assert_eq!(SaToken::decode(&text), Some(token));
    }

    #[test]
    fn seed_key_with_invalid_utf8_decodes_like_go() {
        let key = LegacyKey::decode(SEED_PMM_KEY).expect("Go accepts it");
        assert_eq!(key.name, "pmm-test");
        assert_eq!(key.org_id, 1);
        assert!(
            key.secret.contains('\u{FFFD}'),
            "0x8f became U+FFFD: {:?}",
            key.secret
        );
    }

    #[test]
    fn seed_key_with_non_canonical_padding_decodes_like_go() {
        let key = LegacyKey::decode(SEED_GRAFANA_KEY).expect("Go accepts it");
        assert_eq!(key.name, "mykey");
        assert_eq!(key.secret, "XvbIgw77BaFg5KblOhmJDJa7o2X44HsE");
        assert_eq!(key.org_id, 1);
    }

    #[test]
    fn truncated_documentation_key_is_no_key() {
        assert!(LegacyKey::decode(SEED_TRUNCATED_KEY).is_none());
        assert!(LegacyKey::decode("eyJrIjoi").is_none());
    }

    #[test]
    fn legacy_key_round_trip_and_hash() {
        let key = LegacyKey::generate(1, "round-trip");
        let text = key.encode();
        assert!(text.starts_with("eyJrIjoi"));
        let decoded = LegacyKey::decode(&text).expect("decodes");
        assert_eq!(decoded, key);
        assert_eq!(decoded.hash(), encode_password(&key.secret, "round-trip"));
        assert_eq!(decoded.hash().len(), 100);
    }

    #[test]
    fn password_hash_round_trip() {
        let salt = random_alphanumeric(10);
        let stored = encode_password("s3cret", &salt);
        assert!(constant_time_eq(&stored, &encode_password("s3cret", &salt)));
        assert!(!constant_time_eq(&stored, &encode_password("s3cret!", &salt)));
        assert!(!constant_time_eq(
            &stored,
            &encode_password("s3cret", "other-salt")
        ));
    }

    #[test]
    fn basic_header_like_go() {
        assert_eq!(
            decode_basic("Basic YWRtaW46YWRtaW4="),
            Some(("admin".into(), "admin".into()))
        );
        assert_eq!(decode_basic("basic YTpiOmM="), Some(("a".into(), "b:c".into())));
        assert_eq!(decode_basic("Basic !!!"), None);
        assert_eq!(decode_basic("Bearer x"), None);
    }

    #[test]
    fn session_hash_depends_on_secret_key() {
        assert_ne!(hash_session_token("t", "a"), hash_session_token("t", "b"));
        assert_eq!(hash_session_token("t", "a").len(), 64);
    }
}
