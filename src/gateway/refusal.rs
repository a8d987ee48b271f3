//! Every answer the gateway gives itself: one `Refusal` variant each, with
//! one status and one JSON body (rpxy's single error-to-status mapping).

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use crate::auth::org::OrgError;
use crate::auth::{CredentialError, GrafanaRefusal, VerifyError};
use crate::http::json_response;
use crate::proxy::{Body, ProxyError};
use crate::routes::PathError;

/// Why a request was answered by the gateway itself.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("bad request path: {0}")]
    BadPath(#[from] PathError),
    #[error("bad credential: {0}")]
    BadCredential(#[from] CredentialError),
    #[error("bad organisation: {0}")]
    BadOrg(#[from] OrgError),
    /// The caller is not a member of the organisation the request selects
    /// (a token or key: not its org).
    #[error("not a member of organisation {0}")]
    NotInOrg(i64),
    /// Grafana's own refusal of a session, passed on unchanged.
    #[error("refused by Grafana ({})", .0.message_id)]
    Grafana(GrafanaRefusal),
    /// A browser page load with a session due for rotation: sent where
    /// Grafana sends it, to rotate and come back.
    #[error("session due for rotation")]
    Rotate { redirect_to: String },
    #[error("no credential")]
    NoCredential,
    #[error("credential refused")]
    Refused,
    #[error("role too low")]
    Forbidden,
    #[error("verifier unavailable: {0}")]
    VerifierUnavailable(VerifyError),
    /// The lock-out shield held the check back (`src/shield.rs`).
    #[error("{0}")]
    Throttled(VerifyError),
    #[error("login form larger than the gateway reads")]
    BadLoginForm,
    /// A login form the gateway cannot read exactly as Grafana would.
    #[error("login form not read as Grafana reads it")]
    UnreadableLoginForm,
    #[error("TRACE is not forwarded")]
    MethodNotAllowed,
    #[error("request header fields larger than server.max_header_bytes")]
    HeadTooLarge,
    /// The client's request body broke off or was malformed.
    #[error("unreadable request body")]
    BadBody,
    #[error("{0}")]
    Proxy(#[from] ProxyError),
    #[error("cannot build the upstream request: {0}")]
    Internal(String),
    /// A browser without a (valid) session: sent to Grafana's login page.
    #[error("login required")]
    Login { redirect_to: String },
}

impl From<VerifyError> for Refusal {
    fn from(e: VerifyError) -> Refusal {
        match e {
            VerifyError::Throttled { .. } => Refusal::Throttled(e),
            e => Refusal::VerifierUnavailable(e),
        }
    }
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::BadPath(_) | Refusal::BadOrg(_) => StatusCode::BAD_REQUEST,
            Refusal::BadCredential(e) if e.is_bad_request() => StatusCode::BAD_REQUEST,
            Refusal::NotInOrg(_) => StatusCode::FORBIDDEN,
            Refusal::Grafana(refusal) => refusal.status,
            Refusal::Rotate { .. } => StatusCode::FOUND,
            Refusal::BadCredential(_) | Refusal::NoCredential | Refusal::Refused => StatusCode::UNAUTHORIZED,
            Refusal::Forbidden => StatusCode::FORBIDDEN,
            Refusal::VerifierUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::Throttled(_) => StatusCode::TOO_MANY_REQUESTS,
            Refusal::BadLoginForm => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::UnreadableLoginForm => StatusCode::BAD_REQUEST,
            Refusal::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Refusal::HeadTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Refusal::BadBody => StatusCode::BAD_REQUEST,
            Refusal::Proxy(e) => e.status(),
            Refusal::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Refusal::Login { .. } => StatusCode::FOUND,
        }
    }

    /// The `message` of the JSON body: Grafana's wording where Grafana has one.
    pub fn message(&self) -> String {
        match self {
            Refusal::BadPath(e) => format!("Bad request: {e}"),
            Refusal::BadOrg(e) => format!("Bad request: {e}"),
            Refusal::BadCredential(e) if e.is_bad_request() => format!("Bad request: {e}"),
            Refusal::NotInOrg(_) => "Permission denied".into(),
            Refusal::Grafana(_) | Refusal::Rotate { .. } => "Unauthorized".into(),
            Refusal::BadCredential(_) | Refusal::NoCredential | Refusal::Refused => "Unauthorized".into(),
            Refusal::Forbidden => "Permission denied".into(),
            Refusal::VerifierUnavailable(_) => "Authentication service unavailable".into(),
            Refusal::Throttled(VerifyError::Throttled { per_login: true, .. }) => {
                "Too many failed logins for this user: try again later".into()
            }
            Refusal::Throttled(_) => "Too many failed attempts from this address: try again later".into(),
            Refusal::BadLoginForm => "Login form too large".into(),
            Refusal::UnreadableLoginForm => {
                "Bad request: a login form is one JSON object with one user and one password".into()
            }
            Refusal::MethodNotAllowed => "Method not allowed".into(),
            Refusal::HeadTooLarge => "Request header fields too large".into(),
            Refusal::BadBody => "Bad request: unreadable request body".into(),
            Refusal::Proxy(ProxyError::Unreachable(_)) => "Bad gateway: upstream unreachable".into(),
            Refusal::Proxy(ProxyError::InvalidResponse(_)) => {
                "Bad gateway: upstream sent an invalid response".into()
            }
            Refusal::Proxy(ProxyError::Timeout) => "Gateway timeout: upstream did not answer in time".into(),
            Refusal::Proxy(ProxyError::ClientBody) => {
                "Bad request: the request body broke off or was malformed".into()
            }
            Refusal::Internal(_) => "Internal error".into(),
            Refusal::Login { .. } => "Login required".into(),
        }
    }

    fn reason(&self) -> Option<String> {
        match self {
            Refusal::BadCredential(e) if !e.is_bad_request() => Some(e.to_string()),
            Refusal::NotInOrg(_) => Some(self.to_string()),
            _ => None,
        }
    }

    pub fn into_response(self) -> Response<Body> {
        if let Refusal::Grafana(refusal) = self {
            let mut response = Response::new(Body::whole(refusal.body));
            *response.status_mut() = refusal.status;
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            return response;
        }
        let mut body = serde_json::json!({ "message": self.message() });
        if let Some(reason) = self.reason() {
            body["reason"] = reason.into();
        }
        let mut response = json_response(self.status(), &body);
        if let Refusal::Throttled(VerifyError::Throttled { retry_after, .. }) = &self {
            let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
        }
        let redirect = match &self {
            Refusal::Login { redirect_to } => Some(("/login", redirect_to)),
            Refusal::Rotate { redirect_to } => Some(("/user/auth-tokens/rotate", redirect_to)),
            _ => None,
        };
        if let Some((page, redirect_to)) = redirect {
            let location = format!(
                "{page}?redirectTo={}",
                percent_encoding::utf8_percent_encode(redirect_to, percent_encoding::NON_ALPHANUMERIC)
            );
            if let Ok(value) = HeaderValue::from_str(&location) {
                response.headers_mut().insert(header::LOCATION, value);
            }
        }
        response
    }
}
