//! What is said about a request: its id (shared with the upstream), the
//! facts the access log prints, and the audit trail's lines.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::Method;

use crate::auth::{Credential, CredentialKind, Identity, VerifyError};
use crate::cache::Source;

use super::*;

/// `X-Request-Id`: kept from a trusted proxy, made here otherwise.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Request ids unique across restarts and replicas: a random prefix per
/// process and a counter.
pub(super) struct RequestIds {
    pub(super) prefix: u32,
    pub(super) next: std::sync::atomic::AtomicU64,
}

impl RequestIds {
    pub(super) fn new() -> RequestIds {
        RequestIds {
            prefix: rand::random(),
            next: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// A trusted proxy's id when it sent one usable id, else a new one.
    pub(super) fn for_request(&self, headers: &HeaderMap, trusted_peer: bool) -> HeaderValue {
        if trusted_peer {
            let mut sent = headers.get_all(&X_REQUEST_ID).iter();
            if let (Some(id), None) = (sent.next(), sent.next()) {
                if !id.is_empty() && id.len() <= 128 && id.as_bytes().iter().all(u8::is_ascii_graphic) {
                    return id.clone();
                }
            }
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let mut text = [0u8; 25];
        let mut cursor = std::io::Cursor::new(&mut text[..]);
        let _ = std::io::Write::write_fmt(&mut cursor, format_args!("{:08x}-{n:016x}", self.prefix));
        let len = cursor.position() as usize;
        HeaderValue::from_bytes(&text[..len]).unwrap_or_else(|_| HeaderValue::from_static("-"))
    }
}

impl Outcomes<'_> {
    /// One audit line for a refused authentication: who tried what, from
    /// where, and why — never the password or token itself.
    pub(super) fn audit_refusal(&self, refusal: &Refusal, client: IpAddr, method: &Method) {
        let reason = match refusal {
            Refusal::NoCredential | Refusal::Login { .. } => "no_credential",
            Refusal::BadCredential(_) | Refusal::Refused => "bad_credential",
            Refusal::Grafana(r) if r.needs_rotation() => "session_rotation_due",
            Refusal::Rotate { .. } => "session_rotation_due",
            Refusal::Grafana(_) => "session_refused",
            Refusal::Forbidden => "forbidden",
            Refusal::NotInOrg(_) => "not_in_org",
            Refusal::Throttled(VerifyError::Throttled { per_login: true, .. }) => "login_budget_used_up",
            Refusal::Throttled(_) => "client_budget_used_up",
            Refusal::VerifierUnavailable(_) => "verifier_unavailable",
            _ => return,
        };
        // Only the user name of a password: never its secret half.
        let login = self
            .authorization
            .as_ref()
            .and_then(|v| Credential::from_authorization(v).ok())
            .and_then(|c| match c {
                Credential::Password { user, .. } => Some(user),
                _ => None,
            });
        tracing::info!(
            target: "audit",
            event = "auth_refused",
            request_id = self.request_id.to_str().unwrap_or("-"),
            client = %client,
            method = %method,
            route = self.route.unwrap_or("-"),
            credential = self.credential.map(CredentialKind::as_str),
            login = login.as_deref(),
            reason,
            status = refusal.status().as_u16(),
        );
    }
}

/// What the access log says about one request.
pub(super) struct Outcomes<'g> {
    /// Shared by the access log, the audit trail and the upstream.
    pub(super) request_id: HeaderValue,
    /// The prefix of the route the request matched.
    pub(super) route: Option<&'g str>,
    /// The credential as presented (a reference count, not a copy): the
    /// audit trail names the login a refused password was tried for.
    pub(super) authorization: Option<HeaderValue>,
    pub(super) credential: Option<CredentialKind>,
    pub(super) identity: Option<Arc<Identity>>,
    pub(super) source: Option<Source>,
    pub(super) upstream_time: Option<Duration>,
}
