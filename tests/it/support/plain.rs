//! The gateway as a plain TLS reverse proxy, with authentication out of the
//! way (profile "custom", one anonymous route `/`), and what the tests of it
//! (tls, connections, forwarding, upstream_exchange, lifecycle) share.

use std::time::Duration;

use portcullis::auth::Role;
use portcullis::config::{Config, Profile, RouteConfig};

use crate::support;

/// A config whose single rule lets every request through without a credential.
pub fn passthrough(upstream_url: &str) -> (Config, tempfile::TempDir) {
    let (mut config, dir) = support::config(upstream_url);
    config.auth.profile = Profile::Custom;
    config.routes = vec![RouteConfig::rule("/", Role::None)];
    (config, dir)
}

pub fn long_client(http1_only: bool) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(900));
    if http1_only {
        builder = builder.http1_only();
    }
    builder.build().expect("client")
}

/// The values the upstream saw for one header (empty when absent).
pub fn seen(echo: &serde_json::Value, name: &str) -> Vec<String> {
    echo["headers"][name]
        .as_array()
        .map(|values| {
            values
                .iter()
                .map(|v| v.as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

pub async fn json_body(response: reqwest::Response) -> serde_json::Value {
    let text = response.text().await.expect("body");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}
