//! Shared test fixtures: a gateway started in-process on loopback with its own
//! certificate directory, and TLS clients that accept its self-signed cert.

#![allow(dead_code)]

pub mod binary;
pub mod load;
pub mod plain;
pub mod raw;
pub mod scripted;
pub mod shell;
pub mod upstream;

use std::path::PathBuf;
use std::time::Duration;

use portcullis::config::Config;
use portcullis::Running;

/// A gateway under test; dropped, it stops.
pub struct Gateway {
    pub running: Option<Running>,
    pub dir: tempfile::TempDir,
    /// `https://127.0.0.1:PORT`
    pub url: String,
    /// `http://127.0.0.1:PORT` of the admin listener.
    pub admin_url: String,
}

impl Gateway {
    pub fn running(&self) -> &Running {
        self.running.as_ref().expect("gateway running")
    }

    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("certs/gateway.crt")
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await;
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown();
        }
    }
}

/// A config for tests: loopback listeners on port 0, certificates in a fresh
/// temporary directory, access log off, given upstream.
pub fn config(upstream_url: &str) -> (Config, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::default();
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.server.admin_listen = "127.0.0.1:0".parse().unwrap();
    config.server.shutdown_grace = Duration::from_secs(5);
    config.tls.cert = dir.path().join("certs/gateway.crt");
    config.tls.key = dir.path().join("certs/gateway.key");
    config.upstream.url = upstream_url.to_owned();
    config.upstream.connect_timeout = Duration::from_secs(2);
    config.log.access_log = false;
    (config, dir)
}

pub async fn start(config: Config, dir: tempfile::TempDir) -> Gateway {
    start_with_key(config, dir, None).await
}

pub async fn start_with_key(config: Config, dir: tempfile::TempDir, cache_key: Option<String>) -> Gateway {
    let running = portcullis::start(config, cache_key)
        .await
        .expect("gateway starts");
    Gateway {
        url: format!("https://127.0.0.1:{}", running.addr.port()),
        admin_url: format!("http://127.0.0.1:{}", running.admin_addr.port()),
        running: Some(running),
        dir,
    }
}

/// A TLS client that accepts the gateway's self-signed certificate (`curl -k`).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// Same, speaking HTTP/2 (negotiated by ALPN).
pub fn http2_client() -> reqwest::Client {
    reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .redirect(reqwest::redirect::Policy::none())
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// Runs `curl -k` with the given arguments; returns (status, body).
pub async fn curl(args: &[&str]) -> (u16, String) {
    let output = tokio::process::Command::new("curl")
        .args(["-k", "-s", "-S", "--max-time", "20", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .await
        .expect("curl runs");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// The value a `Set-Cookie` of `response` gives `name`, if one does.
pub fn set_cookie(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.split(';').next())
        .find_map(|pair| {
            pair.split_once('=')
                .filter(|(n, v)| *n == name && !v.is_empty())
                .map(|(_, v)| v.to_owned())
        })
}
