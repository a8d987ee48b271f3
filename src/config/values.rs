//! Values that need more than serde's default reading: listen addresses,
//! CIDRs, log filters, base URLs, and the secrets that `check` must not print.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};

/// `IP:PORT`; a host name or a bare port gets a message that says so.
pub fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    parse_socket_addr(&text).map_err(serde::de::Error::custom)
}

pub fn parse_socket_addr(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let hint = if text.parse::<u16>().is_ok() {
        format!("a port alone is not an address: write 0.0.0.0:{text} (every interface) or 127.0.0.1:{text}")
    } else if text.parse::<IpAddr>().is_ok() {
        "the port is missing: write e.g. 0.0.0.0:8443, or [::1]:8443 for IPv6".to_owned()
    } else {
        "an IP:PORT address is wanted, e.g. 0.0.0.0:8443, 127.0.0.1:9901 or [::]:8443 \
         (host names such as localhost are not resolved: write 127.0.0.1)"
            .to_owned()
    };
    Err(format!("`{text}` is not IP:PORT: {hint}"))
}

/// A list of CIDRs; a bare address is the one host (`/32` or `/128`).
pub fn cidrs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
    let items = Vec::<String>::deserialize(d)?;
    items
        .iter()
        .map(|item| parse_cidr(item))
        .collect::<Result<_, _>>()
        .map_err(serde::de::Error::custom)
}

pub fn parse_cidr(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    if let Ok(net) = IpNet::from_str(text) {
        return Ok(net);
    }
    if let Ok(ip) = IpAddr::from_str(text) {
        return Ok(IpNet::from(ip));
    }
    Err(format!(
        "`{text}` is not a CIDR: write e.g. 10.0.0.0/8, 192.168.1.10/32 or fd00::/8 \
         (a bare address such as 10.1.2.3 means that one host)"
    ))
}

/// A tracing filter as `log.level` takes it: comma-separated directives, each
/// a level (`trace`, `debug`, `info`, `warn`, `error`, `off`) or
/// `target=level`. tracing itself reads a bare word that is no level as a
/// target name (`verbose` = "everything under the target `verbose`"), which
/// silences every other line: such a word is refused here.
pub fn check_log_filter(filter: &str) -> Result<(), String> {
    use tracing::level_filters::LevelFilter;
    const LEVELS: &str = "trace, debug, info, warn, error or off";
    if filter.trim().is_empty() {
        return Err(format!("is empty: write a level ({LEVELS})"));
    }
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        if directive.contains('[') {
            // A span filter: tracing's own parser below judges it.
            continue;
        }
        match directive.rsplit_once('=') {
            Some((target, level)) => {
                if target.is_empty() || LevelFilter::from_str(level).is_err() {
                    return Err(format!(
                        "`{directive}` is not target=level (the level one of {LEVELS}), e.g. portcullis=debug"
                    ));
                }
            }
            None => {
                if LevelFilter::from_str(directive).is_err() {
                    return Err(format!(
                        "`{directive}` is not a level: write one of {LEVELS}, or target=level such as portcullis=debug"
                    ));
                }
            }
        }
    }
    tracing_subscriber::EnvFilter::try_new(filter)
        .map(|_| ())
        .map_err(|e| format!("not a log filter: {e}"))
}

/// An upstream base URL: http(s), a host, no query, and (unless
/// `path_allowed`) no path, since the proxy sends each request with the
/// client's own path (`rewrite` changes it per route). Errors never show a
/// password written in the URL.
pub fn check_base_url(url: &str, path_allowed: bool) -> Result<http::Uri, String> {
    let shown = redact_url(url);
    let uri: http::Uri = url.parse().map_err(|e| format!("`{shown}` is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(format!("`{shown}`: the scheme must be http or https")),
    }
    if uri.authority().is_none() || uri.host().is_none_or(str::is_empty) {
        return Err(format!("`{shown}` needs a host"));
    }
    if uri.query().is_some() {
        return Err(format!("`{shown}` has a query string; none is allowed here"));
    }
    if !path_allowed && !matches!(uri.path(), "" | "/") {
        return Err(format!("`{shown}` has a path (`{}`)", uri.path()));
    }
    Ok(uri)
}

/// `host:port` of a base URL (the scheme's port when none is written), as a
/// TCP connect wants it.
pub fn connect_target(uri: &http::Uri) -> String {
    let port = uri.port_u16().unwrap_or(if uri.scheme_str() == Some("https") {
        443
    } else {
        80
    });
    let host = uri.host().unwrap_or("127.0.0.1");
    format!("{host}:{port}")
}

/// A URL with its password replaced by `***`.
pub fn redact_url(url: &str) -> String {
    super::redis::redact(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_filters() {
        for ok in ["info", "warn", "portcullis=debug,info", "OFF", "info,hyper=warn"] {
            check_log_filter(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "verbose",
            "",
            "info,loud",
            "portcullis=chatty",
            "=debug",
            "debug, rustls=error",
        ] {
            assert!(check_log_filter(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn base_urls() {
        assert!(check_base_url("http://grafana:3000", false).is_ok());
        assert!(check_base_url("http://grafana:3000/", false).is_ok());
        assert!(check_base_url("https://[::1]:3000/", false).is_ok());
        let err = check_base_url("http://grafana:3000/grafana", false).unwrap_err();
        assert!(err.contains("/grafana"), "{err}");
        assert!(check_base_url("http://grafana:3000/grafana", true).is_ok());
        assert!(check_base_url("http://g:3000/?x=1", true).is_err());
        assert!(check_base_url("ftp://g", true).is_err());
        assert!(check_base_url("/just/a/path", true).is_err());
        let err = check_base_url("http://admin:hunter2@g:3000/?q", true).unwrap_err();
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn connect_targets() {
        let t = |u: &str| connect_target(&u.parse().unwrap());
        assert_eq!(t("http://grafana"), "grafana:80");
        assert_eq!(t("https://grafana"), "grafana:443");
        assert_eq!(t("http://127.0.0.1:3000/x"), "127.0.0.1:3000");
        assert_eq!(t("http://[::1]:3000"), "[::1]:3000");
    }
}
