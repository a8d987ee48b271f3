//! The Grafana / PMM stand-in the tests use, run by hand:
//!
//! `cargo run --example grafana_stub -- --listen 127.0.0.1:3000 --flavor pmm`
//!
//! Options: `--listen ADDR` (default 127.0.0.1:3000), `--flavor pmm |
//! grafana11 | grafana10.4` (default pmm), `--session-cookie NAME` (default
//! the flavor's), `--auth-proxy` (trust X-WEBAUTH-* from 127.0.0.1).
//! Runs until Ctrl-C.

use std::net::SocketAddr;
use std::process::ExitCode;

use grafana_stub::{Flavor, GrafanaStub, StubOptions};

const USAGE: &str = "usage: grafana_stub [--listen ADDR] [--flavor pmm|grafana11|grafana10.4] \
                     [--session-cookie NAME] [--auth-proxy]";

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
    if let Err(e) = tokio::signal::ctrl_c().await {
        eprintln!("grafana_stub: cannot wait for Ctrl-C: {e}");
    }
    stub.stop().await;
    ExitCode::SUCCESS
}
