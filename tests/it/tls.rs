//! The first stage of the request path, TLS: the self-signed certificate made
//! on first start and reused, and `curl -k` against it. Authentication is out
//! of the way (`support::plain::passthrough`).

use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::support::plain::{passthrough, seen};
use crate::support::upstream;
use crate::support::{self, raw};

fn sha256_fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

async fn presented_fingerprint(addr: std::net::SocketAddr) -> String {
    let tls = raw::tls_connect(addr, &[b"http/1.1"]).await;
    let certs = tls.get_ref().1.peer_certificates().expect("server certificate");
    sha256_fingerprint(certs[0].as_ref())
}

#[tokio::test]
async fn certificate_is_generated_on_first_start_and_reused() {
    use std::os::unix::fs::PermissionsExt;

    let up = upstream::start().await;
    let (config, dir) = passthrough(&up.url);
    assert!(!config.tls.cert.exists() && !config.tls.key.exists());

    let first = portcullis::start(config.clone(), None)
        .await
        .expect("first start");
    let cert_pem = std::fs::read(&config.tls.cert).expect("certificate written");
    let key_mode = std::fs::metadata(&config.tls.key)
        .expect("key written")
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600, "key file mode {key_mode:o}");
    assert!(!first.tls_fingerprint.is_empty());
    assert_eq!(presented_fingerprint(first.addr).await, first.tls_fingerprint);
    let fingerprint = first.tls_fingerprint.clone();
    first.stop().await;

    let gw = support::start(config.clone(), dir).await;
    assert_eq!(
        gw.running().tls_fingerprint,
        fingerprint,
        "same certificate on the second start"
    );
    assert_eq!(presented_fingerprint(gw.running().addr).await, fingerprint);
    assert_eq!(
        std::fs::read(&config.tls.cert).unwrap(),
        cert_pem,
        "certificate file untouched"
    );
    let key_mode = std::fs::metadata(&config.tls.key).unwrap().permissions().mode();
    assert_eq!(key_mode & 0o777, 0o600);

    // The generated certificate verifies for localhost and 127.0.0.1 when
    // trusted explicitly (no -k).
    let trusted = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&cert_pem).unwrap())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let port = gw.running().addr.port();
    for host in ["localhost", "127.0.0.1"] {
        let response = trusted
            .get(format!("https://{host}:{port}/echo"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{host}: {e:?}"));
        assert_eq!(response.status(), 200, "{host}");
    }
}

#[tokio::test]
async fn curl_k_against_the_self_signed_certificate() {
    let up = upstream::start().await;
    let (config, dir) = passthrough(&up.url);
    let gw = support::start(config, dir).await;

    let (status, body) = support::curl(&["-H", "X-From: curl", &format!("{}/echo/curl?q=1", gw.url)]).await;
    assert_eq!(status, 200, "{body}");
    let echo: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(echo["path"], "/echo/curl");
    assert_eq!(echo["query"], "q=1");
    assert_eq!(seen(&echo, "x-from"), ["curl"]);
    assert!(seen(&echo, "user-agent")[0].starts_with("curl/"));

    let (status, body) = support::curl(&["-d", "a=1&b=2", &format!("{}/form", gw.url)]).await;
    assert_eq!(status, 200, "{body}");
    let echo: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["body"], "a=1&b=2");

    let (status, _) = support::curl(&["--http1.1", &format!("{}/status/404", gw.url)]).await;
    assert_eq!(status, 404);
    let (status, _) = support::curl(&["-X", "DELETE", &format!("{}/status/204", gw.url)]).await;
    assert_eq!(status, 204);
}
