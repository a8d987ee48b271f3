//! The Grafana / PMM stand-in the tests use, run by hand:
//!
//! `cargo run --example grafana_stub -- --listen 127.0.0.1:3000 --flavor pmm`
//!
//! Options: `--listen ADDR` (default 127.0.0.1:3000), `--flavor pmm |
//! grafana11 | grafana10.4` (default pmm), `--session-cookie NAME` (default
//! the flavor's), `--auth-proxy` (trust X-WEBAUTH-* from 127.0.0.1),
//! `--rotation-interval SECONDS` (Grafana's token rotation interval,
//! default 600), `--sub-path PATH` (where Grafana is served, default the
//! flavor's: `/graph` for pmm; `""` for none). Open `{sub}/login` in a
//! browser to sign in (admin/admin) and `{sub}/d/x` for a page that keeps
//! the session alive the way Grafana's frontend does. Runs until Ctrl-C.

use std::net::SocketAddr;
use std::process::ExitCode;

use grafana_stub::{Flavor, GrafanaStub, StubOptions};

const USAGE: &str = "usage: grafana_stub [--listen ADDR] [--flavor pmm|grafana11|grafana10.4] \
                     [--session-cookie NAME] [--auth-proxy] [--rotation-interval SECONDS] \
                     [--sub-path PATH]";

fn parse_args() -> Result<StubOptions, String> {
    let mut options = StubOptions {
        listen: SocketAddr::from(([127, 0, 0, 1], 3000)),
        ..StubOptions::default()
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        // Both `--name value` and `--name=value`.
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
            None => (arg.clone(), None),
        };
        let mut value = |what: &str| {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{name} needs {what}"))
        };
        match name.as_str() {
            "--listen" => {
                let v = value("an address")?;
                options.listen = v.parse().map_err(|e| format!("--listen {v}: {e}"))?;
            }
            "--flavor" => options.flavor = value("a flavor")?.parse::<Flavor>()?,
            "--session-cookie" => options.session_cookie = Some(value("a cookie name")?),
            "--auth-proxy" => options.auth_proxy = true,
            "--rotation-interval" => {
                let v = value("a number of seconds")?;
                let secs: u64 = v.parse().map_err(|e| format!("--rotation-interval {v}: {e}"))?;
                options.rotation_interval = std::time::Duration::from_secs(secs);
            }
            "--sub-path" => options.sub_path = Some(value("a path")?),
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    Ok(options)
}

#[tokio::main]
async fn main() -> ExitCode {
    let options = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let password = options.admin_password.clone();
    let stub = match GrafanaStub::try_start_with(options).await {
        Ok(stub) => stub,
        Err(e) => {
            eprintln!("grafana_stub: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("grafana stub ({}) listening on {}", stub.flavor(), stub.url());
    println!("seeded Grafana admin: admin / {password}");
    println!("session cookie: {}", stub.session_cookie_name());
    println!("login page: {}{}/login", stub.url(), stub.sub_path());
    if let Err(e) = tokio::signal::ctrl_c().await {
        eprintln!("grafana_stub: cannot wait for Ctrl-C: {e}");
    }
    stub.stop().await;
    ExitCode::SUCCESS
}
