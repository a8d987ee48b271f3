//! The gateway's life around the request path: the admin listener's probes,
//! SIGTERM letting in-flight requests finish, and the command line (`check`,
//! a bad config naming the key).

use std::time::{Duration, Instant};

use portcullis::auth::Role;
use portcullis::config::Config;

use crate::support::plain::{json_body, long_client, passthrough};
use crate::support::{self, binary, upstream};

#[tokio::test]
async fn healthz_and_readyz_with_the_upstream_up() {
    let up = upstream::start().await;
    let (config, dir) = passthrough(&up.url);
    let gw = support::start(config, dir).await;
    let client = support::client();

    let response = client
        .get(format!("{}/healthz", gw.admin_url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(json_body(response).await["status"], "alive");

    let response = client
        .get(format!("{}/readyz", gw.admin_url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = json_body(response).await;
    assert_eq!(body["status"], "ready", "{body}");
    assert_eq!(body["upstream"], true);
    assert_eq!(body["tls"], true);
    assert_eq!(body["listener"], true);
    assert_eq!(body["redis"], "not configured");

    // The probes live on the admin port only; on the TLS port they are
    // ordinary paths sent upstream.
    let echo = json_body(client.get(format!("{}/healthz", gw.url)).send().await.unwrap()).await;
    assert_eq!(echo["path"], "/healthz");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish_then_exits_0() {
    let up = upstream::start().await;
    let (mut config, dir) = passthrough(&up.url);
    config.server.shutdown_grace = Duration::from_secs(60);
    let mut gw = binary::spawn(config, dir).await;

    let in_flight = |client: reqwest::Client| {
        let url = format!("{}/gate", gw.url);
        tokio::spawn(async move {
            let response = client.get(url).send().await.expect("in-flight request answered");
            let version = response.version();
            (
                response.status(),
                version,
                response.text().await.expect("in-flight body"),
            )
        })
    };
    let over_h1 = in_flight(long_client(true));
    let over_h2 = in_flight(long_client(false));
    up.state.wait_gated(2).await;

    gw.signal(libc::SIGTERM);
    // The listener closes at once ...
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(gw.addr).await.is_ok() {
        assert!(Instant::now() < deadline, "still accepting 30s after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        gw.child.try_wait().unwrap().is_none(),
        "exited with requests in flight"
    );
    // ... while the requests already in flight are answered.
    up.state.open_gate();
    for (task, version) in [
        (over_h1, reqwest::Version::HTTP_11),
        (over_h2, reqwest::Version::HTTP_2),
    ] {
        let (status, got_version, body) = tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("in-flight request done")
            .unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(got_version, version);
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&body).unwrap()["gated"],
            true
        );
    }
    let status = gw.wait(Duration::from_secs(60)).await;
    assert!(status.success(), "exit status {status:?}; stderr:\n{}", gw.logs());
}

async fn run_binary(args: &[&str], env: &[(&str, &str)]) -> (std::process::ExitStatus, String, String) {
    let mut command = binary::command();
    command.args(args).envs(env.iter().copied());
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("portcullis ends")
        .expect("portcullis runs");
    (
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_bad_config_stops_the_binary_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "unknown.toml",
            "[server]\nlisten_on = \"127.0.0.1:1\"\n",
            "listen_on",
        ),
        ("section.toml", "[sever]\nlisten = \"127.0.0.1:1\"\n", "sever"),
        (
            "value.toml",
            "[upstream]\nresponse_timeout = \"soon\"\n",
            "upstream.response_timeout",
        ),
        (
            "address.toml",
            "[server]\nlisten = \"nowhere\"\n",
            "server.listen",
        ),
        ("url.toml", "[upstream]\nurl = \"ftp://x\"\n", "upstream.url"),
        ("syntax.toml", "[server\nlisten = 1\n", "syntax.toml"),
    ];
    for (name, text, named) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let path = path.to_str().unwrap();
        for subcommand in ["check", "run"] {
            let (status, _, stderr) = run_binary(&["--config", path, subcommand], &[]).await;
            assert!(!status.success(), "{name} {subcommand}: {status:?}");
            assert!(
                stderr.contains(named),
                "{name} {subcommand}: stderr does not name {named}: {stderr}"
            );
        }
    }
    // The same for an environment override that names no key.
    let path = dir.path().join("empty.toml");
    std::fs::write(&path, "").unwrap();
    let path = path.to_str().unwrap();
    let (status, _, stderr) =
        run_binary(&["--config", path, "check"], &[("PORTCULLIS_SERVER_LISTN", "1")]).await;
    assert!(!status.success());
    assert!(stderr.to_lowercase().contains("listn"), "{stderr}");
}

#[tokio::test]
async fn check_prints_the_effective_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = \"127.0.0.1:18443\"\nheader_read_timeout = \"3s\"\n\n\
         [upstream]\nurl = \"http://127.0.0.1:3999\"\n\n\
         [[routes]]\nprefix = \"/public\"\nmin_role = \"none\"\n",
    )
    .unwrap();
    let (status, stdout, stderr) = run_binary(
        &["--config", path.to_str().unwrap(), "check"],
        &[("PORTCULLIS_CACHE_TTL", "90s")],
    )
    .await;
    assert!(status.success(), "{stderr}");
    let printed: toml::Table = stdout
        .parse()
        .unwrap_or_else(|e| panic!("not TOML ({e}):\n{stdout}"));
    assert_eq!(printed["server"]["listen"].as_str(), Some("127.0.0.1:18443"));
    assert_eq!(printed["server"]["header_read_timeout"].as_str(), Some("3s"));
    assert_eq!(printed["upstream"]["url"].as_str(), Some("http://127.0.0.1:3999"));
    // The environment is applied, and the defaults are shown too.
    assert_eq!(printed["cache"]["ttl"].as_str(), Some("1m 30s"));
    assert_eq!(printed["server"]["admin_listen"].as_str(), Some("127.0.0.1:9901"));
    assert_eq!(printed["tls"]["cert"].as_str(), Some("certs/gateway.crt"));
    assert_eq!(printed["routes"][0]["prefix"].as_str(), Some("/public"));
    // What it prints is itself a valid config with the same meaning.
    let reparsed = Config::from_toml(&stdout).expect("printed config loads");
    assert_eq!(reparsed.server.listen.port(), 18443);
    assert_eq!(reparsed.cache.ttl, Duration::from_secs(90));
    assert_eq!(reparsed.routes.len(), 1);
    assert_eq!(reparsed.routes[0].min_role, Role::None);
}
