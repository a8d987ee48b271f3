//! Every row of the revocation table (`src/revoke.rs`), under both of
//! Grafana's spellings, on two replicas sharing one Redis: `/api/...` in the
//! `grafana` profile, and `/graph/api/...` (PMM's Grafana under its sub path,
//! an anonymous route the gateway forwards unjudged) in the `pmm` profile.
//! In each row the victim's credential is warm on replica B, the revoking
//! call goes through replica A, and B's very next request is refused.

use std::time::Duration;

use grafana_stub::{Flavor, GrafanaStub, StubOptions};
use portcullis::auth::Role;
use portcullis::config::{Profile, RouteConfig};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::fleet::{self, admin, revoked_on_a_is_refused_on_b, Auth, RedisServer};
use crate::support::{client, Gateway};

struct Fleet {
    stub: GrafanaStub,
    _redis: RedisServer,
    a: Gateway,
    b: Gateway,
    /// `""` or `/graph`: where Grafana's API is reached.
    prefix: &'static str,
    cookie: String,
    /// A Viewer route whose upstream does not check credentials itself.
    viewer_probe: &'static str,
}

const EDITOR_PROBE: &str = "/editor-probe";
const SERVER_ADMIN_PROBE: &str = "/server-admin-probe";

async fn fleet(profile: Profile) -> Fleet {
    let (flavor, prefix, viewer_probe) = match profile {
        Profile::Pmm => (Flavor::Pmm, "/graph", "/v1/version"),
        _ => (Flavor::Grafana11, "", "/__stub/echo/probe"),
    };
    let stub = GrafanaStub::start_with(StubOptions {
        flavor,
        // Keys stay keys (PMM 3 would turn them into service accounts).
        migrate_api_keys: Some(false),
        ..StubOptions::default()
    })
    .await;
    let redis = RedisServer::start(None).await;
    let cookie = stub.session_cookie_name();
    let mut gateways = Vec::new();
    for _ in 0..2 {
        let (mut config, dir) = fleet::fleet_config(&stub, &redis.url());
        config.auth.profile = profile;
        config.auth.session_cookie = cookie.clone();
        for (prefix, min_role) in [
            (EDITOR_PROBE, Role::Editor),
            (SERVER_ADMIN_PROBE, Role::GrafanaAdmin),
        ] {
            config.routes.push(RouteConfig::rule(prefix, min_role));
        }
        gateways.push(fleet::start_gateway(config, dir).await);
    }
    let b = gateways.pop().unwrap();
    let a = gateways.pop().unwrap();
    Fleet {
        stub,
        _redis: redis,
        a,
        b,
        prefix,
        cookie,
        viewer_probe,
    }
}

impl Fleet {
    fn session(&self, login: &str, password: &str) -> Auth {
        let value = self.stub.login(login, password).expect("login");
        Auth::Cookie(self.cookie.clone(), value)
    }

    /// Sends `method path` with `auth` (and a JSON body) through A.
    async fn on_a(
        &self,
        auth: Auth,
        method: Method,
        path: impl AsRef<str>,
        body: Option<Value>,
    ) -> StatusCode {
        let path = path.as_ref();
        let url = format!("{}{}{path}", self.a.url, self.prefix);
        let mut request = auth.apply(client().request(method, url));
        if let Some(body) = body {
            request = request.json(&body);
        }
        request.send().await.expect("request").status()
    }

    /// The id of one of `login`'s sessions other than `current`'s, read from
    /// Grafana directly.
    async fn other_session_id(&self, current: &Auth) -> i64 {
        let tokens: Vec<Value> = current
            .apply(client().get(format!("{}/api/user/auth-tokens", self.stub.url())))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        tokens
            .iter()
            .find(|t| t["isActive"] == false)
            .and_then(|t| t["id"].as_i64())
            .expect("another session")
    }

    /// One row: `victim` is refused on B (`refused`, on `probe`) right after
    /// `revoke` went through A.
    async fn row<F, Fut>(
        &self,
        name: &str,
        victim: &Auth,
        probe: &str,
        refused: StatusCode,
        revoke: F,
    ) -> (String, Duration)
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = StatusCode>,
    {
        let took = revoked_on_a_is_refused_on_b(&self.a, &self.b, victim, probe, refused, revoke).await;
        (format!("{}{name}", self.prefix), took)
    }
}

async fn every_row(profile: Profile) -> Vec<(String, Duration)> {
    let f = fleet(profile).await;
    let p = f.prefix;
    let viewer = f.viewer_probe;
    let mut rows = Vec::new();
    let unauthorized = StatusCode::UNAUTHORIZED;
    let forbidden = StatusCode::FORBIDDEN;

    // Keys and service accounts.
    let (key_id, key) = f.stub.add_api_key(&format!("key-{p}"), "Viewer", None);
    let victim = Auth::Bearer(key);
    rows.push(
        f.row("/api/auth/keys/:id", &victim, viewer, unauthorized, || {
            f.on_a(admin(), Method::DELETE, format!("/api/auth/keys/{key_id}"), None)
        })
        .await,
    );
    let sa = f.stub.add_service_account("deleted", "Viewer");
    let victim = Auth::Bearer(f.stub.add_sa_token(sa, "t", None).1);
    rows.push(
        f.row(
            "/api/serviceaccounts/:id (DELETE)",
            &victim,
            viewer,
            unauthorized,
            || {
                f.on_a(
                    admin(),
                    Method::DELETE,
                    format!("/api/serviceaccounts/{sa}"),
                    None,
                )
            },
        )
        .await,
    );
    let sa = f.stub.add_service_account("disabled", "Viewer");
    let victim = Auth::Bearer(f.stub.add_sa_token(sa, "t", None).1);
    rows.push(
        f.row(
            "/api/serviceaccounts/:id (PATCH)",
            &victim,
            viewer,
            unauthorized,
            || {
                f.on_a(
                    admin(),
                    Method::PATCH,
                    format!("/api/serviceaccounts/{sa}"),
                    Some(json!({"isDisabled": true})),
                )
            },
        )
        .await,
    );
    let sa = f.stub.add_service_account("token-deleted", "Viewer");
    let (token_id, token) = f.stub.add_sa_token(sa, "t", None);
    let victim = Auth::Bearer(token);
    rows.push(
        f.row(
            "/api/serviceaccounts/:id/tokens/:id",
            &victim,
            viewer,
            unauthorized,
            || {
                f.on_a(
                    admin(),
                    Method::DELETE,
                    format!("/api/serviceaccounts/{sa}/tokens/{token_id}"),
                    None,
                )
            },
        )
        .await,
    );

    // The caller's own sessions.
    f.stub.add_user("leaver", "leaver-pw-1", "Viewer", false);
    let victim = f.session("leaver", "leaver-pw-1");
    rows.push(
        f.row("/logout", &victim, viewer, unauthorized, || {
            f.on_a(victim.clone(), Method::GET, "/logout", None)
        })
        .await,
    );
    // The seeds' spelling, an alias of `/logout` in both profiles.
    let victim = f.session("leaver", "leaver-pw-1");
    let url = format!("{}/api/logout", f.a.url);
    rows.push(
        f.row(
            " (seed, no prefix) /api/logout",
            &victim,
            viewer,
            unauthorized,
            || async { victim.apply(client().get(url)).send().await.unwrap().status() },
        )
        .await,
    );
    f.stub.add_user("laptop", "laptop-pw-1", "Viewer", false);
    let victim = f.session("laptop", "laptop-pw-1");
    let current = f.session("laptop", "laptop-pw-1");
    let other = f.other_session_id(&current).await;
    rows.push(
        f.row(
            "/api/user/revoke-auth-token",
            &victim,
            viewer,
            unauthorized,
            || {
                f.on_a(
                    current.clone(),
                    Method::POST,
                    "/api/user/revoke-auth-token",
                    Some(json!({"authTokenId": other})),
                )
            },
        )
        .await,
    );
    f.stub.add_user("changer", "changer-pw-1", "Viewer", false);
    let victim = Auth::Basic("changer".into(), "changer-pw-1".into());
    let current = f.session("changer", "changer-pw-1");
    rows.push(
        f.row("/api/user/password", &victim, viewer, unauthorized, || {
            f.on_a(
                current.clone(),
                Method::PUT,
                "/api/user/password",
                Some(json!({"oldPassword": "changer-pw-1", "newPassword": "changer-pw-2", "confirmNew": "changer-pw-2"})),
            )
        })
        .await,
    );

    // An admin acting on a user.
    let u = f.stub.add_user("kicked", "kicked-pw-1", "Viewer", false);
    let victim = f.session("kicked", "kicked-pw-1");
    rows.push(
        f.row(
            "/api/admin/users/:id/logout",
            &victim,
            viewer,
            unauthorized,
            || {
                f.on_a(
                    admin(),
                    Method::POST,
                    format!("/api/admin/users/{u}/logout"),
                    None,
                )
            },
        )
        .await,
    );
    let u = f.stub.add_user("one-off", "one-off-pw-1", "Viewer", false);
    let victim = f.session("one-off", "one-off-pw-1");
    let victim_id = f.other_session_id(&f.session("one-off", "one-off-pw-1")).await;
    rows.push(
        f.row(
            "/api/admin/users/:id/revoke-auth-token",
            &victim,
            viewer,
            unauthorized,
            || {
                f.on_a(
                    admin(),
                    Method::POST,
                    format!("/api/admin/users/{u}/revoke-auth-token"),
                    Some(json!({"authTokenId": victim_id})),
                )
            },
        )
        .await,
    );
    let u = f.stub.add_user("disabled", "disabled-pw-1", "Viewer", false);
    let victim = Auth::Basic("disabled".into(), "disabled-pw-1".into());
    rows.push(
        f.row(
            "/api/admin/users/:id/disable",
            &victim,
            viewer,
            unauthorized,
            || {
                f.on_a(
                    admin(),
                    Method::POST,
                    format!("/api/admin/users/{u}/disable"),
                    None,
                )
            },
        )
        .await,
    );
    let u = f.stub.add_user("reset", "reset-pw-1", "Viewer", false);
    let victim = Auth::Basic("reset".into(), "reset-pw-1".into());
    rows.push(
        f.row(
            "/api/admin/users/:id/password",
            &victim,
            viewer,
            unauthorized,
            || {
                f.on_a(
                    admin(),
                    Method::PUT,
                    format!("/api/admin/users/{u}/password"),
                    Some(json!({"password": "reset-pw-2"})),
                )
            },
        )
        .await,
    );
    let u = f.stub.add_user("demoted", "demoted-pw-1", "Viewer", true);
    let victim = Auth::Basic("demoted".into(), "demoted-pw-1".into());
    rows.push(
        f.row(
            "/api/admin/users/:id/permissions",
            &victim,
            SERVER_ADMIN_PROBE,
            forbidden,
            || {
                f.on_a(
                    admin(),
                    Method::PUT,
                    format!("/api/admin/users/{u}/permissions"),
                    Some(json!({"isGrafanaAdmin": false})),
                )
            },
        )
        .await,
    );
    let u = f.stub.add_user("deleted", "deleted-pw-1", "Viewer", false);
    let victim = Auth::Basic("deleted".into(), "deleted-pw-1".into());
    rows.push(
        f.row(
            "/api/admin/users/:id (DELETE)",
            &victim,
            viewer,
            unauthorized,
            || f.on_a(admin(), Method::DELETE, format!("/api/admin/users/{u}"), None),
        )
        .await,
    );

    // An org admin acting on a member.
    let u = f.stub.add_user("lowered", "lowered-pw-1", "Editor", false);
    let victim = Auth::Basic("lowered".into(), "lowered-pw-1".into());
    rows.push(
        f.row(
            "/api/org/users/:id (PATCH)",
            &victim,
            EDITOR_PROBE,
            forbidden,
            || {
                f.on_a(
                    admin(),
                    Method::PATCH,
                    format!("/api/org/users/{u}"),
                    Some(json!({"role": "Viewer"})),
                )
            },
        )
        .await,
    );
    let u = f.stub.add_user("removed", "removed-pw-1", "Viewer", false);
    let victim = Auth::Basic("removed".into(), "removed-pw-1".into());
    rows.push(
        f.row(
            "/api/org/users/:id (DELETE)",
            &victim,
            viewer,
            unauthorized,
            || f.on_a(admin(), Method::DELETE, format!("/api/org/users/{u}"), None),
        )
        .await,
    );
    rows
}

/// A rotation through A leaves the old token to Grafana's judgement on B:
/// verified there on its next use, not served from B's memory.
async fn rotation_retires_the_old_token_everywhere(profile: Profile) {
    let f = fleet(profile).await;
    f.stub.add_user("rotor", "rotor-pw-1", "Viewer", false);
    let old = f.session("rotor", "rotor-pw-1");
    let http = client();
    let probe = f.viewer_probe;
    for gw in [&f.a, &f.b, &f.b] {
        assert_eq!(fleet::get(&http, gw, probe, &old).await, StatusCode::OK);
    }
    let status = f
        .on_a(old.clone(), Method::POST, "/api/user/auth-tokens/rotate", None)
        .await;
    assert_eq!(status, StatusCode::OK, "{}: rotation through A", f.prefix);
    for _ in 0..2 {
        let before = f.stub.verifications();
        // Grafana still takes the old token while the new one is unseen.
        assert_eq!(fleet::get(&http, &f.b, probe, &old).await, StatusCode::OK);
        assert!(
            f.stub.verifications() > before,
            "{}: B asked Grafana about the rotated-away token",
            f.prefix
        );
    }
}

fn summary(profile: &str, rows: &[(String, Duration)]) {
    let mut times: Vec<Duration> = rows.iter().map(|(_, d)| *d).collect();
    times.sort();
    for (name, took) in rows {
        println!("{profile}: {name}: revoked on A, refused on B after {took:?}");
    }
    println!(
        "{profile}: {} rows, A→B median {:?}, worst {:?}",
        rows.len(),
        times[times.len() / 2],
        times[times.len() - 1]
    );
}

#[tokio::test]
async fn every_revoking_call_under_api_stops_the_credential_on_the_other_replica() {
    let rows = every_row(Profile::Grafana).await;
    summary("grafana /api", &rows);
    rotation_retires_the_old_token_everywhere(Profile::Grafana).await;
}

#[tokio::test]
async fn every_revoking_call_under_graph_stops_the_credential_on_the_other_replica() {
    let rows = every_row(Profile::Pmm).await;
    summary("pmm /graph", &rows);
    rotation_retires_the_old_token_everywhere(Profile::Pmm).await;
}
