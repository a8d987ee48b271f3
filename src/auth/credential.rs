//! The credential a request carries, read from its headers exactly as Grafana
//! and PMM read them (docs/grafana.md, "Credential formats" and "Which header
//! forms Grafana accepts"). Nothing here logs or prints a secret:
//! `Debug` is written by hand for that reason.

use std::fmt;

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use http::header::{AUTHORIZATION, COOKIE};
use http::{HeaderMap, HeaderValue};
use serde::Deserialize;

/// Go's `base64.StdEncoding` as Grafana uses it: padding required, and
/// non-zero trailing bits accepted (a seed key relies on that).
const GO_STD_BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_allow_trailing_bits(true)
        .with_decode_padding_mode(DecodePaddingMode::RequireCanonical),
);

/// Lenient reading of Basic credentials: some clients drop the padding.
const BASIC_BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_allow_trailing_bits(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Longest credential header value looked at; anything longer is refused
/// before decoding.
const MAX_CREDENTIAL_LEN: usize = 8 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// Malformed request framing: answered 400.
    #[error("more than one Authorization header")]
    DuplicateAuthorization,
    #[error("Authorization header is not visible ASCII")]
    NotAscii,
    #[error("more than one session cookie, or an escaped one")]
    AmbiguousSession,
    /// Well-framed but unusable credentials: answered 401.
    #[error("unsupported authorization scheme")]
    UnsupportedScheme,
    #[error("Invalid Basic Auth Header")]
    InvalidBasic,
    #[error("Invalid API key")]
    InvalidApiKey,
    #[error("credential too long")]
    TooLong,
}

impl CredentialError {
    /// 400 for a request that is malformed as HTTP, 401 for a bad credential.
    pub fn is_bad_request(&self) -> bool {
        matches!(
            self,
            CredentialError::DuplicateAuthorization
                | CredentialError::NotAscii
                | CredentialError::AmbiguousSession
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CredentialKind {
    Password,
    ApiKey,
    ServiceToken,
    Session,
}

impl CredentialKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialKind::Password => "password",
            CredentialKind::ApiKey => "api_key",
            CredentialKind::ServiceToken => "service_token",
            CredentialKind::Session => "session",
        }
    }
}

#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// `Basic user:password`.
    Password { user: String, password: String },
    /// A legacy key (`eyJrIjoi…`), from Bearer or `Basic api_key:KEY`.
    ApiKey { key: String, name: String, org_id: i64 },
    /// A `glsa_` token, from Bearer, `Basic api_key:…` or `Basic service_token:…`.
    ServiceToken {
        token: String,
        from_service_token_basic: bool,
    },
    /// The browser session cookie's value.
    Session { token: String },
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Password { user, .. } => write!(f, "Password({user:?}, <redacted>)"),
            Credential::ApiKey { name, org_id, .. } => {
                write!(f, "ApiKey({name:?}, org {org_id}, <redacted>)")
            }
            Credential::ServiceToken { .. } => f.write_str("ServiceToken(<redacted>)"),
            Credential::Session { .. } => f.write_str("Session(<redacted>)"),
        }
    }
}

impl Credential {
    /// Reads the request's credential: `Authorization` first (as Grafana's
    /// client order does), then the session cookie. `Ok(None)` when there is none.
    pub fn from_headers(
        headers: &HeaderMap,
        session_cookie: &str,
    ) -> Result<Option<Credential>, CredentialError> {
        let mut auth = headers.get_all(AUTHORIZATION).iter();
        if let Some(value) = auth.next() {
            if auth.next().is_some() {
                return Err(CredentialError::DuplicateAuthorization);
            }
            return Self::from_authorization(value).map(Some);
        }
        Ok(session_from_cookies(headers, session_cookie)?.map(|token| Credential::Session { token }))
    }

    pub fn from_authorization(value: &HeaderValue) -> Result<Credential, CredentialError> {
        if value.len() > MAX_CREDENTIAL_LEN {
            return Err(CredentialError::TooLong);
        }
        let text = value.to_str().map_err(|_| CredentialError::NotAscii)?.trim();
        let (scheme, rest) = text.split_once(' ').unwrap_or((text, ""));
        let rest = rest.trim_start();
        if scheme.eq_ignore_ascii_case("basic") {
            parse_basic(rest)
        } else if scheme.eq_ignore_ascii_case("bearer") {
            parse_token(rest, false)
        } else {
            Err(CredentialError::UnsupportedScheme)
        }
    }

    pub fn kind(&self) -> CredentialKind {
        match self {
            Credential::Password { .. } => CredentialKind::Password,
            Credential::ApiKey { .. } => CredentialKind::ApiKey,
            Credential::ServiceToken { .. } => CredentialKind::ServiceToken,
            Credential::Session { .. } => CredentialKind::Session,
        }
    }

    /// The bytes that identify this credential for the cache key. Two spellings
    /// of one credential (Bearer or Basic `api_key:`) give the same bytes.
    pub fn cache_material(&self) -> [&[u8]; 3] {
        match self {
            Credential::Password { user, password } => [b"p", user.as_bytes(), password.as_bytes()],
            Credential::ApiKey { key, .. } => [b"k", key.as_bytes(), b""],
            Credential::ServiceToken { token, .. } => [b"t", token.as_bytes(), b""],
            Credential::Session { token } => [b"s", token.as_bytes(), b""],
        }
    }

    /// The `Authorization` value that presents this credential to Grafana, or
    /// `None` for a session (sent as a cookie).
    pub fn grafana_authorization(&self) -> Option<HeaderValue> {
        let value = match self {
            Credential::Password { user, password } => {
                let mut plain = String::with_capacity(user.len() + password.len() + 1);
                plain.push_str(user);
                plain.push(':');
                plain.push_str(password);
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(plain)
                )
            }
            Credential::ApiKey { key, .. } => format!("Bearer {key}"),
            Credential::ServiceToken { token, .. } => format!("Bearer {token}"),
            Credential::Session { .. } => return None,
        };
        let mut value = HeaderValue::from_str(&value).ok()?;
        value.set_sensitive(true);
        Some(value)
    }

    /// When forwarding upstream, the client's `Authorization` must be replaced:
    /// Grafana does not take `Basic service_token:…`, so it becomes Bearer.
    pub fn forwarded_authorization(&self) -> Option<HeaderValue> {
        match self {
            Credential::ServiceToken {
                from_service_token_basic: true,
                ..
            } => self.grafana_authorization(),
            _ => None,
        }
    }
}

fn parse_basic(encoded: &str) -> Result<Credential, CredentialError> {
    let decoded = BASIC_BASE64
        .decode(encoded.trim())
        .map_err(|_| CredentialError::InvalidBasic)?;
    let decoded = String::from_utf8(decoded).map_err(|_| CredentialError::InvalidBasic)?;
    let (user, password) = decoded.split_once(':').ok_or(CredentialError::InvalidBasic)?;
    if user.is_empty() {
        return Err(CredentialError::InvalidBasic);
    }
    match user {
        "api_key" => parse_token(password, false),
        // PMM's form; Grafana would treat it as a login of a user called
        // "service_token" and count failures against that user.
        "service_token" => parse_token(password, true),
        _ => Ok(Credential::Password {
            user: user.to_owned(),
            password: password.to_owned(),
        }),
    }
}

/// A Bearer-style token: `glsa_…` or a legacy key, checked locally so that
/// garbage never costs an upstream call.
fn parse_token(token: &str, from_service_token_basic: bool) -> Result<Credential, CredentialError> {
    let token = token.trim();
    if token.is_empty() {
        return Err(CredentialError::InvalidApiKey);
    }
    if token.starts_with("glsa_") {
        if !service_token_is_well_formed(token) {
            return Err(CredentialError::InvalidApiKey);
        }
        return Ok(Credential::ServiceToken {
            token: token.to_owned(),
            from_service_token_basic,
        });
    }
    let legacy = decode_legacy_key(token).ok_or(CredentialError::InvalidApiKey)?;
    Ok(Credential::ApiKey {
        key: token.to_owned(),
        name: legacy.n,
        org_id: legacy.id,
    })
}

/// `glsa_<32 alphanumerics>_<crc32-ieee("glsa_"+secret) as 4 LE bytes, hex>`.
/// Checked on every request, so by position and without allocating: the
/// checksum's hex is decoded and compared as a number.
pub fn service_token_is_well_formed(token: &str) -> bool {
    const PREFIX: &[u8] = b"glsa_";
    const SECRET: usize = 32;
    let bytes = token.as_bytes();
    if bytes.len() != PREFIX.len() + SECRET + 1 + 8 || !bytes.starts_with(PREFIX) {
        return false;
    }
    let secret = &bytes[PREFIX.len()..PREFIX.len() + SECRET];
    if !secret.iter().all(u8::is_ascii_alphanumeric) || bytes[PREFIX.len() + SECRET] != b'_' {
        return false;
    }
    let mut written = [0u8; 4];
    if hex::decode_to_slice(&bytes[PREFIX.len() + SECRET + 1..], &mut written).is_err() {
        return false;
    }
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&bytes[..PREFIX.len() + SECRET]);
    u32::from_le_bytes(written) == hasher.finalize()
}

#[derive(Deserialize)]
struct LegacyKey {
    k: String,
    n: String,
    id: i64,
}

/// Decodes a legacy key as Grafana's Go code does: strict-padding base64 with
/// lenient trailing bits, then JSON where invalid UTF-8 becomes U+FFFD (the PMM
/// documentation's example key has such a byte).
fn decode_legacy_key(token: &str) -> Option<LegacyKey> {
    let bytes = GO_STD_BASE64.decode(token).ok()?;
    let text = String::from_utf8_lossy(&bytes);
    let key: LegacyKey = serde_json::from_str(&text).ok()?;
    (!key.k.is_empty() && !key.n.is_empty()).then_some(key)
}

/// Finds the session cookie in every `Cookie` header (HTTP/2 may split them).
/// The session cookie, read exactly as Go's `net/http` (and so Grafana)
/// reads cookies: each `Cookie` line split on `;`, names and values trimmed,
/// one pair of surrounding quotes dropped, pairs with a bad name or value
/// skipped. More than one cookie of that name is ambiguous — which one
/// would Grafana take? — and refused like two `Authorization` headers.
fn session_from_cookies(headers: &HeaderMap, name: &str) -> Result<Option<String>, CredentialError> {
    let mut found = None;
    for (cookie, value) in go_cookies(headers) {
        if cookie != name {
            continue;
        }
        if found.is_some() {
            return Err(CredentialError::AmbiguousSession);
        }
        // Grafana unescapes the value (`url.QueryUnescape`) before looking
        // the token up: `%61bc` would be one session to Grafana and another
        // cache key here, out of reach of its logout. Tokens are plain.
        if value.contains(['%', '+']) {
            return Err(CredentialError::AmbiguousSession);
        }
        found = Some(value);
    }
    Ok(found
        .filter(|v| !v.is_empty() && v.len() <= 1024)
        .map(str::to_owned))
}

/// Every valid cookie of every `Cookie` line, as Go's `readCookies` yields
/// them: `(name, value)` with the value unquoted.
pub fn go_cookies(headers: &HeaderMap) -> impl Iterator<Item = (&str, &str)> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|line| line.to_str().ok())
        .flat_map(|line| line.split(';'))
        .filter_map(go_cookie)
}

/// One `name=value` part of a `Cookie` line, or `None` where Go skips it.
pub fn go_cookie(part: &str) -> Option<(&str, &str)> {
    let part = part.trim_matches(go_space);
    if part.is_empty() {
        return None;
    }
    let (name, value) = part.split_once('=').unwrap_or((part, ""));
    let name = name.trim_matches(go_space);
    let token = |b: u8| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b);
    if name.is_empty() || !name.bytes().all(token) {
        return None;
    }
    let value = value.trim_matches(go_space);
    let value = match value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        Some(inner) if value.len() >= 2 => inner,
        _ => value,
    };
    let valid = |b: u8| (0x20..0x7f).contains(&b) && b != b'"' && b != b';' && b != b'\\';
    value.bytes().all(valid).then_some((name, value))
}

/// Go's `textproto.TrimString`: ASCII space, tab, CR and LF.
fn go_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r' | '\n')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(value: &str) -> Result<Credential, CredentialError> {
        Credential::from_authorization(&HeaderValue::from_str(value).unwrap())
    }

    const SEED_PMM_KEY: &str =
        "eyJrIjoiUXRkeDNMS1g1bFVyY0tUj1o0SmhBc3g4QUdTRVAwekoiLCJuIjoicG1tLXRlc3QiLCJpZCI6MX0=";
    const SEED_GRAFANA_KEY: &str =
        "eyJrIjoiWHZiSWd3NzdCYUZnNUtibE9obUpESmE3bzJYNDRIc0UiLCJuIjoibXlrZXkiLCJpZCI6MX1=";

    #[test]
    fn cookies_read_as_go_reads_them() {
        let session = |lines: &[&str]| {
            let mut h = HeaderMap::new();
            for l in lines {
                h.append(COOKIE, HeaderValue::from_str(l).unwrap());
            }
            session_from_cookies(&h, "grafana_session")
        };
        assert_eq!(session(&["a=1; grafana_session=abc"]), Ok(Some("abc".into())));
        assert_eq!(session(&["grafana_session=\"abc\""]), Ok(Some("abc".into())));
        // Go trims the name: this is the session cookie to Grafana too.
        assert_eq!(session(&[" grafana_session =abc"]), Ok(Some("abc".into())));
        // Two of them, on one line or two: which would Grafana take?
        assert_eq!(
            session(&["grafana_session=abc; grafana_session=def"]),
            Err(CredentialError::AmbiguousSession)
        );
        assert_eq!(
            session(&["grafana_session=abc", "grafana_session=abc"]),
            Err(CredentialError::AmbiguousSession)
        );
        // The name inside another cookie's quoted value is no cookie to Go:
        // the quote left in the value makes it invalid.
        assert_eq!(session(&["x=\"a; grafana_session=evil\""]), Ok(None));
        assert_eq!(session(&["grafana_session=ab\\c"]), Ok(None));
        assert_eq!(session(&["grafana_session=\"abc"]), Ok(None));
        // Escaped: Grafana would unescape it into another spelling.
        assert_eq!(
            session(&["grafana_session=%61bc"]),
            Err(CredentialError::AmbiguousSession)
        );
        assert_eq!(
            session(&["grafana_session=a+bc"]),
            Err(CredentialError::AmbiguousSession)
        );
    }

    #[test]
    fn grafana_checksum_vector() {
        assert!(service_token_is_well_formed(
            "glsa_iNValIdinValiDinvalidinvalidinva_5b582697"
        ));
        assert!(!service_token_is_well_formed(
            "glsa_iNValIdinValiDinvalidinvalidinva_5b582698"
        ));
        assert!(!service_token_is_well_formed(
            "glsa_iNValIdinValiDinvalidinvalidinva_5b582697_x"
        ));
        assert!(!service_token_is_well_formed("glsa_short_5b582697"));
        // The checksum's hex is read in either case, as before.
        assert!(service_token_is_well_formed(
            "glsa_iNValIdinValiDinvalidinvalidinva_5B582697"
        ));
        for bad in [
            "glsa_iNValIdinValiDinvalidinvalidinva_5b58269g",
            "glsa_iNValIdinValiDinvalidinvalidinva-5b582697",
            "glsa_iNValIdinValiDinvalidinvalidin-a_5b582697",
            "glsb_iNValIdinValiDinvalidinvalidinva_5b582697",
            "glsa_iNValIdinValiDinvalidinvalidinva_5b58269",
            "glsa_iNValIdinValiDinvalidinvalidinvaé5b58269",
        ] {
            assert!(!service_token_is_well_formed(bad), "{bad}");
        }
    }

    #[test]
    fn seed_keys_decode_go_style() {
        match auth(&format!("Bearer {SEED_PMM_KEY}")).unwrap() {
            Credential::ApiKey { name, org_id, .. } => assert_eq!((name.as_str(), org_id), ("pmm-test", 1)),
            other => panic!("{other:?}"),
        }
        match auth(&format!("bearer {SEED_GRAFANA_KEY}")).unwrap() {
            Credential::ApiKey { name, .. } => assert_eq!(name, "mykey"),
            other => panic!("{other:?}"),
        }
        // The truncated key of Grafana's docs cannot be a key.
        assert_eq!(
            auth("Bearer eyJrIjoiT0tTcG1pUlY2RnVKZTFVaDFsNFZXdE9ZWmNrMkZYbk"),
            Err(CredentialError::InvalidApiKey)
        );
    }

    #[test]
    fn basic_forms() {
        assert_eq!(
            auth("Basic YWRtaW46YWRtaW4=").unwrap(),
            Credential::Password {
                user: "admin".into(),
                password: "admin".into()
            }
        );
        let b = base64::engine::general_purpose::STANDARD.encode(format!("api_key:{SEED_PMM_KEY}"));
        assert_eq!(
            auth(&format!("BASIC {b}")).unwrap().kind(),
            CredentialKind::ApiKey
        );
        let token = "glsa_iNValIdinValiDinvalidinvalidinva_5b582697";
        let b = base64::engine::general_purpose::STANDARD.encode(format!("service_token:{token}"));
        let c = auth(&format!("Basic {b}")).unwrap();
        assert_eq!(
            c.forwarded_authorization().unwrap(),
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap()
        );
        assert_eq!(auth("Basic !!!"), Err(CredentialError::InvalidBasic));
        assert_eq!(auth("Basic YWRtaW4="), Err(CredentialError::InvalidBasic)); // no colon
        assert_eq!(auth("Basic /w=="), Err(CredentialError::InvalidBasic)); // not UTF-8
        assert_eq!(auth("Digest x"), Err(CredentialError::UnsupportedScheme));
        assert_eq!(auth("Bearer "), Err(CredentialError::InvalidApiKey));
    }

    #[test]
    fn one_credential_two_spellings_one_cache_material() {
        let token = "glsa_iNValIdinValiDinvalidinvalidinva_5b582697";
        let bearer = auth(&format!("Bearer {token}")).unwrap();
        let b = base64::engine::general_purpose::STANDARD.encode(format!("service_token:{token}"));
        let basic = auth(&format!("Basic {b}")).unwrap();
        assert_eq!(bearer.cache_material(), basic.cache_material());
    }

    #[test]
    fn headers_and_cookies() {
        let mut h = HeaderMap::new();
        h.append(
            COOKIE,
            HeaderValue::from_static("a=b; grafana_session=0123456789abcdef0123456789abcdef"),
        );
        assert_eq!(
            Credential::from_headers(&h, "grafana_session")
                .unwrap()
                .unwrap()
                .kind(),
            CredentialKind::Session
        );
        assert_eq!(Credential::from_headers(&h, "pmm_session").unwrap(), None);
        h.append(AUTHORIZATION, HeaderValue::from_static("Basic YWRtaW46YWRtaW4="));
        h.append(AUTHORIZATION, HeaderValue::from_static("Basic YWRtaW46YWRtaW4="));
        assert_eq!(
            Credential::from_headers(&h, "grafana_session"),
            Err(CredentialError::DuplicateAuthorization)
        );
    }

    #[test]
    fn debug_never_prints_secrets() {
        let c = auth("Basic YWRtaW46aHVudGVyMg==").unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
