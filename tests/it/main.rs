//! Integration tests: the real gateway on 127.0.0.1:0, real TLS clients, a real
//! upstream, the Grafana stand-in and (for fleets) real Redis servers.

mod audit;
mod auth;
mod auth_proxy;
mod browser;
mod config;
mod connections;
mod deploy;
mod desync;
mod fleet;
mod forwarding;
mod hardening;
mod layers;
mod lifecycle;
mod lockout;
mod metrics;
mod reload;
mod revocations;
mod sessions;
mod support;
mod tls;
mod upstream_exchange;
