//! SIGHUP reloads the configuration while requests keep flowing: routes,
//! identity and the rest take effect for new requests, no request fails, an
//! invalid file changes nothing, and what needs a restart is said so.

use std::time::{Duration, Instant};

use grafana_stub::{Flavor, GrafanaStub};
use portcullis::auth::Role;
use portcullis::config::{Config, Profile, RouteConfig};
use reqwest::StatusCode;

use crate::support::load::Load;
use crate::support::{self, binary, client};

const AREA: &str = "/__stub/echo/reloadable-area";

fn with_area(config: &mut Config, min_role: Role) {
    config.routes.retain(|r| r.prefix != AREA);
    config.routes.push(RouteConfig::rule(AREA, min_role));
}

async fn wait_for_log(process: &binary::Process, needle: &str, seen_before: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if process.logs().matches(needle).count() > seen_before {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in the log:\n{}",
            process.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_under_load_without_a_failed_request() {
    let stub = GrafanaStub::start(Flavor::Grafana11).await;
    stub.add_user("reader", "reader-pw-1", "Viewer", false);
    let (mut config, dir) = support::config(&stub.url());
    config.auth.profile = Profile::Grafana;
    with_area(&mut config, Role::Admin);
    let mut process = binary::spawn(config.clone(), dir).await;
    let url = process.url.clone();
    let http = client();
    let area = |http: &reqwest::Client| {
        http.get(format!("{url}{AREA}"))
            .basic_auth("reader", Some("reader-pw-1"))
            .send()
    };
    assert_eq!(area(&http).await.unwrap().status(), StatusCode::FORBIDDEN);

    // Load: clients on kept-alive connections, every answer must be 200.
    let load = {
        let url = url.clone();
        Load::start(8, move |_| {
            let (http, url) = (client(), url.clone());
            async move {
                http.get(format!("{url}/api/org"))
                    .basic_auth("reader", Some("reader-pw-1"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == StatusCode::OK)
            }
        })
    };
    load.progress(200).await;

    // A valid change: the area opens to Viewers, the log gets quieter, and a
    // listener change is reported as needing a restart.
    let mut changed = config.clone();
    with_area(&mut changed, Role::Viewer);
    changed.log.level = "warn,portcullis=info".into();
    changed.cache.ttl = Duration::from_secs(30);
    changed.server.admin_listen = "127.0.0.1:1".parse().unwrap();
    std::fs::write(&process.config_path, changed.to_toml()).unwrap();
    let before = process.logs().matches("configuration reloaded").count();
    process.signal(libc::SIGHUP);
    wait_for_log(&process, "configuration reloaded", before).await;
    // Said after the reload line: wait for it too.
    wait_for_log(&process, "take effect only after a restart", 0).await;
    assert!(
        process.logs().contains("server.admin_listen"),
        "a restart is asked for the listener"
    );
    load.progress(200).await;
    assert_eq!(
        area(&http).await.unwrap().status(),
        StatusCode::OK,
        "the new route applies"
    );

    // An invalid file: nothing changes, nothing fails.
    std::fs::write(&process.config_path, "[server]\nlisten = \"garbage\"\n").unwrap();
    let before = process.logs().matches("configuration not reloaded").count();
    process.signal(libc::SIGHUP);
    wait_for_log(&process, "configuration not reloaded", before).await;
    load.progress(200).await;
    assert_eq!(
        area(&http).await.unwrap().status(),
        StatusCode::OK,
        "the last good config stays"
    );

    let (done, failed) = load.stop().await;
    println!("{done} requests across two reloads, {failed} failed");
    assert_eq!(failed, 0, "no request may fail across a reload");
    process.signal(libc::SIGTERM);
    assert!(process.wait(Duration::from_secs(30)).await.success());
}
