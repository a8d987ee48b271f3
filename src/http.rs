//! HTTP helpers for every room: JSON answers and readable error chains. A
//! base room: it imports nothing of ours.

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Response, StatusCode};

/// A JSON answer in whichever body type the caller serves.
pub fn json_response<B: From<Bytes>>(status: StatusCode, body: &serde_json::Value) -> Response<B> {
    let mut response = Response::new(B::from(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// The whole cause chain of an error: hyper's top-level message alone
/// ("client error (Connect)") does not say what failed.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
