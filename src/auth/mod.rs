//! Who is calling: credential parsing, identities, the policy check and the
//! verifiers that turn a credential into an identity.

pub mod credential;
pub mod grafana;
pub mod identity;
pub mod org;
pub mod static_users;

pub use credential::{Credential, CredentialError, CredentialKind};
pub use identity::{AuthMethod, Identity, IdentityRecord, OrgRole, Principal, PrincipalKind, Role};

use crate::config::{Config, VerifierKind};

/// Why a credential was refused. Cached (briefly) like an identity, except
/// for [`DenyReason::Grafana`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DenyReason {
    /// The upstream said the credential is not valid.
    Invalid,
    /// The account exists but is disabled.
    Disabled,
    /// Grafana refused a session with an answer its frontend acts on (a
    /// `messageId` such as `session.token.rotate`): that answer goes back to
    /// the client unchanged, and is never cached — the same cookie may be
    /// good again a moment later, once the browser has rotated it.
    Grafana(GrafanaRefusal),
}

impl DenyReason {
    /// Whether this refusal may be remembered for `cache.negative_ttl`.
    pub fn is_cacheable(&self) -> bool {
        !matches!(self, DenyReason::Grafana(_))
    }
}

/// Grafana's own refusal: its status and JSON body, byte for byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrafanaRefusal {
    pub status: http::StatusCode,
    pub body: bytes::Bytes,
    /// The `messageId`, already read from `body`.
    pub message_id: Box<str>,
}

impl GrafanaRefusal {
    /// `authn.ErrTokenNeedsRotation`: the session is good once rotated.
    pub fn needs_rotation(&self) -> bool {
        &*self.message_id == "session.token.rotate"
    }
}

/// The verifier's answer for a well-formed credential.
#[derive(Debug, Clone)]
pub enum Verdict {
    Allowed(Box<Identity>),
    Denied(DenyReason),
}

/// The verifier could not answer: never a reason to allow or to refuse.
#[derive(Debug, Clone, thiserror::Error)]
pub enum VerifyError {
    #[error("verifier did not answer in time")]
    Timeout,
    #[error("verifier unreachable: {0}")]
    Unreachable(String),
    #[error("verifier answered {status} on {path}")]
    Upstream { status: u16, path: &'static str },
    #[error("verifier answer on {path} not understood: {reason}")]
    Malformed { path: &'static str, reason: String },
    /// Held back before reaching the verifier: the login's (or the client's)
    /// budget of failed checks is used up.
    #[error("too many failed checks {}; retry in {retry_after:?}", if *.per_login { "for this login" } else { "from this address" })]
    Throttled {
        retry_after: std::time::Duration,
        per_login: bool,
    },
}

/// One of the configured ways of checking a credential.
pub enum Verifier {
    Grafana(Box<grafana::GrafanaVerifier>),
    Static(static_users::StaticVerifier),
}

impl Verifier {
    pub fn from_config(config: &Config) -> Result<Verifier, crate::Error> {
        Ok(match config.auth.verifier {
            VerifierKind::Grafana => {
                Verifier::Grafana(Box::new(grafana::GrafanaVerifier::from_config(config)?))
            }
            VerifierKind::Static => Verifier::Static(static_users::StaticVerifier::from_config(&config.auth)),
        })
    }

    pub async fn verify(&self, credential: &Credential) -> Result<Verdict, VerifyError> {
        match self {
            Verifier::Grafana(g) => g.verify(credential).await,
            Verifier::Static(s) => Ok(s.verify(credential)),
        }
    }
}
