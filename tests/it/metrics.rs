//! What operators read (issue 18): `/metrics` as Prometheus reads it —
//! checked by `promtool check metrics` (Debian's `prometheus` package), the
//! families they expect, no label that takes a path or a login — and the
//! access log of the binary in text format: no colour codes in a pipe,
//! durations to the microsecond, host, user agent and bytes sent.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use grafana_stub::{Flavor, GrafanaStub};
use portcullis::auth::Role;
use portcullis::config::{LogFormat, Profile, RouteConfig};

use crate::support::{self, binary, client};

/// Label names the gateway may use: each takes a bounded set of values.
const LABELS: [&str; 9] = [
    "route",
    "outcome",
    "le",
    "code",
    "credential",
    "source",
    "budget",
    "state",
    "version",
];

#[tokio::test]
async fn metrics_pass_promtool_and_the_text_access_log_reads_well() {
    let promtool = promtool();
    let stub = GrafanaStub::start(Flavor::Grafana11).await;
    stub.add_user("metered", "metered-pw-1", "Viewer", false);
    stub.add_user("victim", "victim-pw-1", "Viewer", false);
    let sa = stub.add_service_account("metered-sa", "Viewer");
    let (_, token) = stub.add_sa_token(sa, "t", None);

    let (mut config, dir) = support::config(&stub.url());
    config.auth.profile = Profile::Grafana;
    config.auth.login_failures = 2;
    config.log.access_log = true;
    config.log.format = LogFormat::Text;
    config.log.level = "info".into();
    config.routes.push(RouteConfig::rule("/api/admin", Role::Admin));
    let mut gw = binary::spawn_as_configured(config, dir).await;
    let http = client();
    let get = |path: &str, agent: &str| {
        http.get(format!("{}{path}", gw.url))
            .header("User-Agent", format!("metrics-test/{agent}"))
    };

    // One of each: anonymous, allowed (password, token), refused (no
    // credential, wrong password), forbidden, rate-limited; the path carries
    // a marker no label may take.
    let marker = "unbounded-path-marker";
    let anonymous = get(&format!("/public/{marker}"), "anonymous")
        .send()
        .await
        .unwrap();
    assert_ne!(anonymous.status(), 401);
    let allowed = get("/api/org", "password")
        .basic_auth("metered", Some("metered-pw-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(allowed.status(), 200);
    let allowed_len = allowed.bytes().await.unwrap().len();
    let by_token = get(&format!("/api/search/{marker}"), "token")
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_ne!(by_token.status(), 401);
    let none = get("/api/org", "none").send().await.unwrap();
    assert_eq!(none.status(), 401);
    let refused_len = none.bytes().await.unwrap().len();
    let wrong = get("/api/org", "wrong")
        .basic_auth("metered", Some("not-the-password"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let forbidden = get("/api/admin/users", "forbidden")
        .basic_auth("metered", Some("metered-pw-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(forbidden.status(), 403);
    let mut statuses = Vec::new();
    for i in 0..4 {
        let response = get("/api/org", "throttled")
            .basic_auth("victim", Some(&format!("wrong-{i}")))
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
    }
    assert!(statuses.contains(&429), "{statuses:?}");

    // Prometheus' text format, as curl or promtool get it.
    let scraped = http
        .get(format!("{}/metrics", gw.admin_url))
        .send()
        .await
        .unwrap();
    assert_eq!(scraped.status(), 200);
    assert_eq!(
        scraped.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = scraped.text().await.unwrap();
    let checked = tokio::process::Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    let output = {
        let mut checked = checked;
        let mut stdin = checked.stdin.take().unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut stdin, text.as_bytes())
            .await
            .unwrap();
        drop(stdin);
        checked.wait_with_output().await.unwrap()
    };
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && said.trim().is_empty(),
        "promtool check metrics: {:?}\n{said}\n--- /metrics:\n{text}",
        output.status
    );

    let samples = parse(&text);
    let value = |series: &str| -> f64 {
        *samples
            .get(series)
            .unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}"))
    };
    // Request durations by route class and outcome.
    assert!(
        value(
            r#"portcullis_request_duration_seconds_bucket{route="authenticated",outcome="forwarded",le="+Inf"}"#
        ) >= 2.0
    );
    assert!(
        value(r#"portcullis_request_duration_seconds_count{route="authenticated",outcome="refused"}"#) >= 4.0
    );
    assert!(
        value(r#"portcullis_request_duration_seconds_count{route="anonymous",outcome="forwarded"}"#) >= 1.0
    );
    assert!(value(r#"portcullis_upstream_duration_seconds_count"#) >= 3.0);
    assert!(value(r#"portcullis_verifier_duration_seconds_count"#) >= 3.0);
    // Authentication outcomes by credential kind.
    for (credential, outcome) in [
        ("password", "allowed"),
        ("service_token", "allowed"),
        ("none", "refused"),
        ("password", "refused"),
        ("password", "forbidden"),
        ("password", "rate_limited"),
    ] {
        let series =
            format!(r#"portcullis_authentications_total{{credential="{credential}",outcome="{outcome}"}}"#);
        assert!(value(&series) >= 1.0, "{series}");
    }
    assert_eq!(
        value(r#"portcullis_authentications_total{credential="session",outcome="unavailable"}"#),
        0.0
    );
    // Responses by status code.
    assert!(value(r#"portcullis_responses_total{code="200"}"#) >= 1.0);
    assert!(value(r#"portcullis_responses_total{code="401"}"#) >= 2.0);
    assert!(value(r#"portcullis_responses_total{code="403"}"#) >= 1.0);
    assert!(value(r#"portcullis_responses_total{code="429"}"#) >= 1.0);
    // The build, the process, the certificate, Redis, the older families.
    assert_eq!(
        value(&format!(
            r#"portcullis_build_info{{version="{}"}}"#,
            env!("CARGO_PKG_VERSION")
        )),
        1.0
    );
    assert!(value("process_resident_memory_bytes") > 1e6);
    assert!(value("process_open_fds") >= 3.0);
    assert!(value("process_cpu_seconds_total") > 0.0);
    assert!(value("process_start_time_seconds") > 1e9);
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(value("portcullis_tls_certificate_expiry_timestamp_seconds") > now);
    assert_eq!(value(r#"portcullis_redis_state{state="not_configured"}"#), 1.0);
    assert_eq!(value(r#"portcullis_redis_state{state="up"}"#), 0.0);
    assert!(value(r#"portcullis_identity_lookups_total{source="verifier"}"#) >= 3.0);
    assert!(value(r#"portcullis_throttled_total{budget="login"}"#) >= 1.0);
    assert!(value("portcullis_failed_checks_total") >= 1.0);
    assert!(value("portcullis_cache_entries") >= 1.0);
    assert!(value("portcullis_connections_open") >= 0.0);

    // No label takes an unbounded value: every name is one of the known
    // few, and no value is a path or a login.
    for series in samples.keys() {
        for (name, label_value) in labels(series) {
            assert!(LABELS.contains(&name.as_str()), "label {name} in {series}");
            for unbounded in [marker, "metered", "victim", "/"] {
                assert!(!label_value.contains(unbounded), "{series}");
            }
        }
    }

    // OpenMetrics for a scraper that asks for it (Prometheus does).
    let open = http
        .get(format!("{}/metrics", gw.admin_url))
        .header(
            "Accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        open.headers()["content-type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let open = open.text().await.unwrap();
    assert!(open.ends_with("# EOF\n"), "{open}");
    assert!(open.contains("# TYPE portcullis_build info\n"), "{open}");
    assert!(
        open.contains("# UNIT portcullis_request_duration_seconds seconds\n"),
        "{open}"
    );
    let families = openmetrics_families(&open).await;
    for family in [
        "portcullis_build:info",
        "portcullis_request_duration_seconds:histogram",
        "portcullis_authentications:counter",
        "portcullis_responses:counter",
        "process_cpu_seconds:counter",
        "process_resident_memory_bytes:gauge",
        "portcullis_tls_certificate_expiry_timestamp_seconds:gauge",
    ] {
        assert!(
            families.contains(&family.to_owned()),
            "{family} not in {families:?}"
        );
    }

    // The access log, as a pipe gets it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.signal(libc::SIGTERM);
    assert!(gw.wait(Duration::from_secs(30)).await.success());
    // The last lines, read after the exit.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let logs = gw.logs.lock().unwrap().clone();
    for line in &logs {
        assert!(
            !line.contains('\x1b'),
            "a colour code in a piped log line: {line:?}"
        );
    }
    let access: Vec<BTreeMap<String, String>> = logs
        .iter()
        .filter(|l| l.contains(" access: "))
        .map(|l| fields(l))
        .collect();
    assert!(access.len() >= 10, "{logs:#?}");
    for line in &access {
        for key in [
            "request_id",
            "peer",
            "method",
            "host",
            "path",
            "status",
            "duration_ms",
        ] {
            assert!(line.contains_key(key), "no {key} in {line:?}");
        }
        for key in ["duration_ms", "upstream_ms"] {
            if let Some(ms) = line.get(key) {
                let decimals = ms.split_once('.').map_or(0, |(_, d)| d.len());
                assert!(
                    decimals <= 3 && ms.parse::<f64>().is_ok(),
                    "{key}={ms} in {line:?}"
                );
            }
        }
        assert!(
            line["host"].trim_matches('"').starts_with("127.0.0.1:"),
            "{line:?}"
        );
    }
    let by_agent = |agent: &str| {
        access
            .iter()
            .find(|l| {
                l.get("user_agent").map(|a| a.trim_matches('"')) == Some(&format!("metrics-test/{agent}"))
            })
            .unwrap_or_else(|| panic!("no access line with user agent {agent}: {access:#?}"))
    };
    let line = by_agent("password");
    assert_eq!(line["status"], "200");
    assert_eq!(line["bytes"], allowed_len.to_string(), "{line:?}");
    assert_eq!(line["user"].trim_matches('"'), "metered");
    assert!(line.contains_key("upstream_ms"), "{line:?}");
    let line = by_agent("none");
    assert_eq!(line["status"], "401");
    assert_eq!(line["bytes"], refused_len.to_string(), "{line:?}");
    assert!(!line.contains_key("upstream_ms"), "{line:?}");
}

/// Where promtool is, or a failure that says how to get it.
fn promtool() -> String {
    let found = std::process::Command::new("promtool")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "promtool is missing: it checks /metrics as Prometheus parses it. Install Debian's \
         `prometheus` package (`apt-get install prometheus`, as .ci/run does)"
    );
    "promtool".to_owned()
}

/// The families (`name:type`) of an OpenMetrics text as the Python client's
/// parser reads it (Debian's `python3-prometheus-client`); its errors fail.
async fn openmetrics_families(text: &str) -> Vec<String> {
    const PYTHON: &str = "/usr/bin/python3";
    let found = std::process::Command::new(PYTHON)
        .args(["-c", "import prometheus_client"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "{PYTHON} cannot import prometheus_client: it parses the OpenMetrics form of /metrics. \
         Install Debian's `python3-prometheus-client` (as .ci/run does)"
    );
    let script = "import sys\n\
        from prometheus_client.openmetrics.parser import text_string_to_metric_families\n\
        for f in text_string_to_metric_families(sys.stdin.read()):\n    print(f.name + ':' + f.type)\n";
    let mut child = tokio::process::Command::new(PYTHON)
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut stdin = child.stdin.take().unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stdin, text.as_bytes())
        .await
        .unwrap();
    drop(stdin);
    let output = child.wait_with_output().await.unwrap();
    assert!(
        output.status.success(),
        "the OpenMetrics parser refused /metrics: {}\n--- /metrics:\n{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// `series → value` of Prometheus' text format (comments skipped).
fn parse(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("sample line {l:?}"));
            let value = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("value in {l:?}")),
            };
            (series.to_owned(), value)
        })
        .collect()
}

/// The labels of a series: `name{a="x",b="y"}` → [(a, x), (b, y)]. The
/// gateway's label values hold no quote or comma.
fn labels(series: &str) -> Vec<(String, String)> {
    let Some((_, inner)) = series.split_once('{') else {
        return Vec::new();
    };
    inner
        .trim_end_matches('}')
        .split(',')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair
                .split_once('=')
                .unwrap_or_else(|| panic!("label in {series}"));
            (name.to_owned(), value.trim_matches('"').to_owned())
        })
        .collect()
}

/// The `key=value` fields of a text log line (values quoted when they hold
/// spaces or quotes; kept as written).
fn fields(line: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = line;
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq].rsplit(' ').next().unwrap_or("").to_owned();
        let after = &rest[eq + 1..];
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            let mut end = 0;
            let bytes = quoted.as_bytes();
            while end < bytes.len() && bytes[end] != b'"' {
                end += if bytes[end] == b'\\' { 2 } else { 1 };
            }
            let end = end.min(quoted.len());
            (
                format!("\"{}\"", &quoted[..end]),
                quoted.get(end + 1..).unwrap_or(""),
            )
        } else {
            let end = after.find(' ').unwrap_or(after.len());
            (after[..end].to_owned(), &after[end..])
        };
        out.insert(key, value);
        rest = next;
    }
    out
}
