//! Config that fails loudly and checks what it will run: a named file must
//! exist, `check` runs start-up's own checks (files included) and prints no
//! secret, errors name the key or the environment variable, Kubernetes'
//! service links do not stop the start, `/readyz` watches the verifier.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use portcullis::config::Config;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::support::{self, binary, upstream};

/// Runs the binary to its end: (success, stdout, stderr).
async fn run(args: &[&str], env: &[(&str, &str)], cwd: &Path) -> (bool, String, String) {
    let mut command = binary::command();
    command.args(args).envs(env.iter().copied()).current_dir(cwd);
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("portcullis ends")
        .expect("portcullis runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A config file on loopback ports 0 with its certificate in `dir`, plus `extra`.
fn write_config(dir: &Path, extra: &str) -> String {
    let path = dir.join("gateway.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [tls]\ncert = \"{0}/certs/gateway.crt\"\nkey = \"{0}/certs/gateway.key\"\n\
             [log]\nformat = \"json\"\n{extra}",
            dir.display()
        ),
    )
    .unwrap();
    path.to_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_config_file_named_with_config_must_exist() {
    let dir = tempfile::tempdir().unwrap();
    let absent = dir.path().join("gateway.toml");
    let absent = absent.to_str().unwrap();
    for subcommand in ["check", "run"] {
        let (ok, _, stderr) = run(&["--config", absent, subcommand], &[], dir.path()).await;
        assert!(!ok, "{subcommand} ran without its config file");
        assert!(
            stderr.contains(absent) && stderr.contains("does not exist"),
            "{subcommand}: {stderr}"
        );
    }
    // Without --config, an absent ./gateway.toml means the built-in defaults,
    // and check says so.
    let (ok, stdout, stderr) = run(&["check"], &[], dir.path()).await;
    assert!(ok, "{stderr}");
    assert!(stderr.contains("built-in defaults"), "{stderr}");
    let printed = Config::from_toml(&stdout).expect("check prints a config");
    assert_eq!(printed.server.listen.port(), 8443);
}

/// Each config is refused by `portcullis::start`; `check` must refuse it
/// too, with the same message.
#[tokio::test]
async fn check_refuses_what_the_start_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    std::fs::write(dir.path().join("short.key"), "too short").unwrap();
    std::fs::write(dir.path().join("half.crt"), "not even PEM").unwrap();
    let cases = [
        (
            "a cache key file that is not there",
            format!("[cache]\nkey_file = \"{d}/absent.key\"\n"),
            "cache.key_file",
        ),
        (
            "a cache key file that is too short",
            format!("[cache]\nkey_file = \"{d}/short.key\"\n"),
            "at least 32",
        ),
        (
            "an admin token file that is not there",
            format!("[auth.grafana]\nadmin_token_file = \"{d}/absent-token\"\n"),
            "auth.grafana.admin_token_file",
        ),
        (
            "Redis without a shared HMAC key",
            "[cache.redis]\nurl = \"redis://127.0.0.1:9/0\"\n".to_owned(),
            "PORTCULLIS_CACHE_KEY",
        ),
        (
            "an [auth.proxy] shared secret file that is not there",
            format!("[identity]\nshared_secret_file = \"{d}/absent-secret\"\n"),
            "identity.shared_secret_file",
        ),
        (
            "an upstream CA bundle that is not there",
            format!("[upstream]\nurl = \"https://127.0.0.1:9\"\nca_file = \"{d}/absent-ca.pem\"\n"),
            "upstream.ca_file",
        ),
    ];
    for (what, extra, named) in cases {
        let path = write_config(dir.path(), &extra);
        let config = Config::load(Path::new(&path), Vec::new()).expect("the config itself is valid");
        let refused = match portcullis::start(config, None).await {
            Ok(_) => panic!("{what}: started"),
            Err(e) => e.to_string(),
        };
        assert!(refused.contains(named), "{what}: start said {refused}");
        let (ok, _, stderr) = run(&["--config", &path, "check"], &[], dir.path()).await;
        assert!(!ok, "{what}: check passed what the start refuses ({refused})");
        assert!(
            stderr.contains(&refused),
            "{what}: check said {stderr}, start said {refused}"
        );
    }
    // Half a TLS pair: named by both.
    let extra = format!("[tls]\ncert = \"{d}/half.crt\"\nkey = \"{d}/half.key\"\n");
    let path = dir.path().join("half.toml");
    std::fs::write(
        &path,
        format!("[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{extra}"),
    )
    .unwrap();
    let (ok, _, stderr) = run(&["--config", path.to_str().unwrap(), "check"], &[], dir.path()).await;
    assert!(!ok && stderr.contains("tls.key"), "{stderr}");
    // A cache key given in the environment satisfies Redis, for check as for start.
    let path = write_config(dir.path(), "[cache.redis]\nurl = \"redis://127.0.0.1:9/0\"\n");
    let key = "an-hmac-key-of-more-than-32-bytes-for-the-fleet";
    let (ok, stdout, stderr) = run(
        &["--config", &path, "check"],
        &[("PORTCULLIS_CACHE_KEY", key)],
        dir.path(),
    )
    .await;
    assert!(ok, "{stderr}");
    assert!(
        !stdout.contains(key) && !stderr.contains(key),
        "the key is printed"
    );
}

#[tokio::test]
async fn check_prints_no_password() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cache.key"), "k".repeat(40)).unwrap();
    let path = write_config(
        dir.path(),
        &format!(
            "[cache]\nkey_file = \"{}/cache.key\"\n[cache.redis]\nurl = \"redis://:file-redis-pw@127.0.0.1:9/0\"\n",
            dir.path().display()
        ),
    );
    let (ok, stdout, stderr) = run(&["--config", &path, "check"], &[], dir.path()).await;
    assert!(ok, "{stderr}");
    assert!(
        !stdout.contains("file-redis-pw") && !stderr.contains("file-redis-pw"),
        "{stdout}"
    );
    let printed = Config::from_toml(&stdout).expect("what check prints loads");
    assert_eq!(printed.cache.redis.url, "redis://:***@127.0.0.1:9/0");
    // The same from the environment, for a cluster too.
    let (ok, stdout, stderr) = run(
        &["--config", &path, "check"],
        &[
            (
                "PORTCULLIS_CACHE_REDIS_URL",
                "rediss://app:env-redis-pw@10.0.0.1:6380/1",
            ),
            (
                "PORTCULLIS_CACHE_REDIS_CLUSTER",
                "redis://:seed-pw@127.0.0.1:7000,redis://:seed-pw@127.0.0.1:7001",
            ),
        ],
        dir.path(),
    )
    .await;
    assert!(ok, "{stderr}");
    for secret in ["env-redis-pw", "seed-pw"] {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "{secret} in {stdout}"
        );
    }
}

#[tokio::test]
async fn errors_name_the_key_or_the_variable_with_the_value_and_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "");
    let cases: [(&str, &str, &[&str]); 6] = [
        (
            "PORTCULLIS_SERVER_LISTEN",
            "garbage",
            &["PORTCULLIS_SERVER_LISTEN", "garbage", "IP:PORT"],
        ),
        (
            "PORTCULLIS_SERVER_ADMIN_LISTEN",
            "localhost:9901",
            &["PORTCULLIS_SERVER_ADMIN_LISTEN", "127.0.0.1"],
        ),
        (
            "PORTCULLIS_SERVER_TRUSTED_PROXIES",
            "10.0.0.0/8,10.0.0.300",
            &["PORTCULLIS_SERVER_TRUSTED_PROXIES", "10.0.0.300", "CIDR"],
        ),
        (
            "PORTCULLIS_CACHE_NEGATIVE_TTL",
            "-5s",
            &["PORTCULLIS_CACHE_NEGATIVE_TTL", "-5s", "negative"],
        ),
        (
            "PORTCULLIS_LOG_LEVEL",
            "verbose",
            &["PORTCULLIS_LOG_LEVEL", "verbose", "level"],
        ),
        (
            "PORTCULLIS_UPSTREAM_URL",
            "http://grafana:3000/grafana",
            &["PORTCULLIS_UPSTREAM_URL", "/grafana", "auth.grafana.url"],
        ),
    ];
    for (var, value, named) in cases {
        for subcommand in ["check", "run"] {
            let (ok, _, stderr) = run(&["--config", &path, subcommand], &[(var, value)], dir.path()).await;
            assert!(!ok, "{var}={value} {subcommand} passed");
            for n in named {
                assert!(
                    stderr.contains(n),
                    "{var}={value} {subcommand}: {n} not in {stderr}"
                );
            }
        }
    }
    // From the file: the key.
    // (write_config's last section is [log].)
    let path = write_config(dir.path(), "level = \"verbose\"\n");
    let (ok, _, stderr) = run(&["--config", &path, "check"], &[], dir.path()).await;
    assert!(
        !ok && stderr.contains("log.level") && stderr.contains("verbose"),
        "{stderr}"
    );
    // A list from the environment, comma-separated; a bare address is one host.
    let path = write_config(dir.path(), "");
    let (ok, stdout, stderr) = run(
        &["--config", &path, "check"],
        &[("PORTCULLIS_SERVER_TRUSTED_PROXIES", "10.0.0.0/8, 192.168.1.7")],
        dir.path(),
    )
    .await;
    assert!(ok, "{stderr}");
    let printed = Config::from_toml(&stdout).unwrap();
    let nets: Vec<String> = printed
        .server
        .trusted_proxies
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(nets, ["10.0.0.0/8", "192.168.1.7/32"]);
}

/// What Kubernetes sets in every pod of a namespace with a Service named
/// `portcullis` (and one named `portcullis-redis`).
const SERVICE_LINKS: &[(&str, &str)] = &[
    ("PORTCULLIS_SERVICE_HOST", "10.96.12.7"),
    ("PORTCULLIS_SERVICE_PORT", "443"),
    ("PORTCULLIS_SERVICE_PORT_HTTPS", "443"),
    ("PORTCULLIS_PORT", "tcp://10.96.12.7:443"),
    ("PORTCULLIS_PORT_443_TCP", "tcp://10.96.12.7:443"),
    ("PORTCULLIS_PORT_443_TCP_PROTO", "tcp"),
    ("PORTCULLIS_PORT_443_TCP_PORT", "443"),
    ("PORTCULLIS_PORT_443_TCP_ADDR", "10.96.12.7"),
    ("PORTCULLIS_PORT_8443_TCP_PROTO", "tcp"),
    ("PORTCULLIS_REDIS_SERVICE_HOST", "10.96.0.9"),
    ("PORTCULLIS_REDIS_SERVICE_PORT", "6379"),
    ("PORTCULLIS_REDIS_PORT", "tcp://10.96.0.9:6379"),
    ("PORTCULLIS_REDIS_PORT_6379_TCP", "tcp://10.96.0.9:6379"),
    ("PORTCULLIS_REDIS_PORT_6379_TCP_ADDR", "10.96.0.9"),
];

#[tokio::test]
async fn kubernetes_service_links_do_not_stop_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "");
    let (ok, _, stderr) = run(&["--config", &path, "check"], SERVICE_LINKS, dir.path()).await;
    assert!(ok, "{stderr}");

    let mut child = binary::command()
        .args(["--config", &path, "run"])
        .envs(SERVICE_LINKS.iter().copied())
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let listening = tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(Some(line)) = lines.next_line().await {
            let done = line.contains("portcullis listening");
            seen.push(line);
            if done {
                return true;
            }
        }
        false
    })
    .await;
    assert!(
        matches!(listening, Ok(true)),
        "did not start with the service links set:\n{}",
        seen.join("\n")
    );
    child.kill().await.unwrap();

    // A real typo beside them still stops it.
    let mut with_typo = SERVICE_LINKS.to_vec();
    with_typo.push(("PORTCULLIS_SERVER_LISTN", "0.0.0.0:8443"));
    let (ok, _, stderr) = run(&["--config", &path, "run"], &with_typo, dir.path()).await;
    assert!(!ok && stderr.contains("PORTCULLIS_SERVER_LISTN"), "{stderr}");
}

#[tokio::test]
async fn readyz_is_not_ready_while_the_verifiers_grafana_is_down() {
    let up = upstream::start().await;
    let verifier = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let verifier_addr = verifier.local_addr().unwrap();
    let (mut config, dir) = support::config(&up.url);
    config.auth.grafana.url = format!("http://{verifier_addr}");
    let gw = support::start(config, dir).await;
    let client = support::client();
    let readyz = || async {
        let response = client
            .get(format!("{}/readyz", gw.admin_url))
            .send()
            .await
            .unwrap();
        let status = response.status();
        (status, response.json::<serde_json::Value>().await.unwrap())
    };

    let (status, body) = readyz().await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["verifier"], true, "{body}");
    assert_eq!(body["upstream"], true, "{body}");

    drop(verifier);
    let (status, body) = readyz().await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["verifier"], false, "{body}");
    assert_eq!(body["upstream"], true, "{body}");
    let reasons = body["reasons"].to_string();
    assert!(
        reasons.contains("auth.grafana.url") && reasons.contains(&verifier_addr.to_string()),
        "{body}"
    );
}
