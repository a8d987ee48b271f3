//! `PORTCULLIS_<SECTION>_<KEY>` overrides: which key a variable names, how its
//! value is read, and which variables are not meant for the gateway at all
//! (Kubernetes' service links).

use std::net::{IpAddr, SocketAddr};

use super::{Config, ConfigError, CACHE_KEY_ENV, ENV_PREFIX};

/// Sections whose keys may be overridden from the environment, longest first so
/// that `CACHE_REDIS_URL` is `cache.redis.url`, not `cache.redis_url`.
const ENV_SECTIONS: &[&[&str]] = &[
    &["cache", "redis"],
    &["auth", "grafana"],
    &["server"],
    &["tls"],
    &["upstream"],
    &["log"],
    &["auth"],
    &["identity"],
    &["cache"],
];

/// A config key set from the environment: `("server.listen", "PORTCULLIS_SERVER_LISTEN")`.
pub(super) type EnvKey = (String, String);

/// Writes every `PORTCULLIS_*` variable into `doc` and returns which key
/// each one set, so that an error about that key can name the variable.
pub(super) fn apply_env(
    doc: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<EnvKey>, ConfigError> {
    let defaults = toml::Table::try_from(Config::default()).unwrap_or_default();
    let mut set = Vec::new();
    for (var, raw) in env {
        let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if var == CACHE_KEY_ENV || is_service_link(&var, &raw) {
            continue;
        }
        let rest = rest.to_ascii_lowercase();
        let found = ENV_SECTIONS.iter().find_map(|section| {
            let joined = section.join("_");
            rest.strip_prefix(&joined)
                .and_then(|k| k.strip_prefix('_'))
                .filter(|k| !k.is_empty())
                .map(|k| (*section, k.to_owned()))
        });
        let Some((section, key)) = found else {
            return Err(ConfigError::Env {
                var,
                reason: "does not name a config key (PORTCULLIS_<SECTION>_<KEY>)".into(),
            });
        };
        let default = section
            .iter()
            .try_fold(&defaults, |table, name| table.get(*name)?.as_table())
            .and_then(|table| table.get(&key));
        let mut table = &mut *doc;
        for name in section {
            let entry = table
                .entry(name.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            table = entry.as_table_mut().ok_or_else(|| ConfigError::Env {
                var: var.clone(),
                reason: format!("`{name}` in the config file is not a table"),
            })?;
        }
        set.push((format!("{}.{key}", section.join(".")), var));
        table.insert(key, env_value(&raw, default));
    }
    Ok(set)
}

/// An environment value as the key it sets wants it: a string key takes the
/// text as it is; a list takes a TOML array or the comma-separated form
/// (`10.0.0.0/8,192.168.0.0/16`); any other key takes a TOML value when the
/// text is one (numbers, booleans), else the text.
fn env_value(raw: &str, default: Option<&toml::Value>) -> toml::Value {
    let parsed = || {
        format!("v = {raw}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
    };
    match default {
        Some(toml::Value::String(_)) => toml::Value::String(raw.to_owned()),
        Some(toml::Value::Array(_)) => match parsed() {
            Some(array @ toml::Value::Array(_)) => array,
            _ => toml::Value::Array(
                raw.split(',')
                    .map(str::trim)
                    .filter(|item| !item.is_empty())
                    .map(|item| toml::Value::String(item.to_owned()))
                    .collect(),
            ),
        },
        _ => parsed().unwrap_or_else(|| toml::Value::String(raw.to_owned())),
    }
}

/// Whether `var=value` is one of the variables Kubernetes injects for every
/// Service in the namespace (unless `enableServiceLinks: false`), here for a
/// Service named `portcullis` or `portcullis-<anything>`:
/// `<NAME>_SERVICE_HOST`, `<NAME>_SERVICE_PORT`, `<NAME>_SERVICE_PORT_<PORT>`,
/// `<NAME>_PORT`, `<NAME>_PORT_<N>_<PROTO>` and its `_PROTO`, `_PORT`, `_ADDR`.
/// The value has to have the form Kubernetes gives it too, so that a typo
/// such as `PORTCULLIS_SERVER_PORT=8443` is still refused.
pub fn is_service_link(var: &str, value: &str) -> bool {
    let Some(rest) = var.strip_prefix("PORTCULLIS_") else {
        return false;
    };
    let tokens: Vec<&str> = rest.split('_').collect();
    // Any leading tokens may be the rest of the Service's name.
    (0..tokens.len()).any(|start| link_tail(&tokens[start..], value))
}

fn link_tail(tail: &[&str], value: &str) -> bool {
    let is_ip = |v: &str| v.parse::<IpAddr>().is_ok();
    let is_port = |v: &str| v.parse::<u16>().is_ok_and(|p| p > 0);
    let is_proto = |p: &str| matches!(p, "TCP" | "UDP" | "SCTP");
    // `tcp://10.0.0.1:8443`, with the port given when asked for.
    let is_url = |v: &str, proto: Option<&str>, port: Option<&str>| {
        let Some((scheme, addr)) = v.split_once("://") else {
            return false;
        };
        let Ok(addr) = addr.parse::<SocketAddr>() else {
            return false;
        };
        is_proto(&scheme.to_ascii_uppercase())
            && proto.is_none_or(|p| p.eq_ignore_ascii_case(scheme))
            && port.is_none_or(|p| p == addr.port().to_string())
    };
    match tail {
        ["SERVICE", "HOST"] => is_ip(value),
        ["SERVICE", "PORT"] => is_port(value),
        ["SERVICE", "PORT", name @ ..] => !name.is_empty() && is_port(value),
        ["PORT"] => is_url(value, None, None),
        ["PORT", port, proto] => is_port(port) && is_proto(proto) && is_url(value, Some(proto), Some(port)),
        ["PORT", port, proto, "PROTO"] => {
            is_port(port) && is_proto(proto) && value.eq_ignore_ascii_case(proto)
        }
        ["PORT", port, proto, "PORT"] => is_port(port) && is_proto(proto) && value == *port,
        ["PORT", port, proto, "ADDR"] => is_port(port) && is_proto(proto) && is_ip(value),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_links_of_a_service_named_portcullis() {
        for (var, value) in [
            ("PORTCULLIS_SERVICE_HOST", "10.96.12.7"),
            ("PORTCULLIS_SERVICE_PORT", "8443"),
            ("PORTCULLIS_SERVICE_PORT_HTTPS", "8443"),
            ("PORTCULLIS_SERVICE_PORT_ADMIN_HTTP", "9901"),
            ("PORTCULLIS_PORT", "tcp://10.96.12.7:8443"),
            ("PORTCULLIS_PORT_8443_TCP", "tcp://10.96.12.7:8443"),
            ("PORTCULLIS_PORT_8443_TCP_PROTO", "tcp"),
            ("PORTCULLIS_PORT_8443_TCP_PORT", "8443"),
            ("PORTCULLIS_PORT_8443_TCP_ADDR", "10.96.12.7"),
            ("PORTCULLIS_PORT_9901_UDP_ADDR", "fd00::7"),
            ("PORTCULLIS_PORT_9901_TCP", "tcp://[fd00::7]:9901"),
            // Service `portcullis-redis`, `portcullis-server`.
            ("PORTCULLIS_REDIS_SERVICE_HOST", "10.96.0.9"),
            ("PORTCULLIS_REDIS_PORT_6379_TCP", "tcp://10.96.0.9:6379"),
            ("PORTCULLIS_SERVER_PORT", "tcp://10.96.0.10:443"),
        ] {
            assert!(is_service_link(var, value), "{var}={value}");
        }
    }

    #[test]
    fn look_alikes_are_not_service_links() {
        for (var, value) in [
            ("PORTCULLIS_SERVER_LISTN", "0.0.0.0:8443"),
            ("PORTCULLIS_SERVER_PORT", "8443"),
            ("PORTCULLIS_SERVICE_HOST", "grafana.example.com"),
            ("PORTCULLIS_PORT", "8443"),
            ("PORTCULLIS_PORT_8443_TCP", "tcp://10.96.12.7:9901"),
            ("PORTCULLIS_PORT_8443_TCP_PROTO", "udp"),
            ("PORTCULLIS_PORT_8443_TCP_PORT", "9901"),
            ("PORTCULLIS_PORT_8443_HTTP_ADDR", "10.96.12.7"),
            ("PORTCULLIS_SERVICE_PORT_HTTPS", "https"),
            ("PORTCULLIS_CACHE_REDIS_URL", "redis://10.0.0.1:6379"),
        ] {
            assert!(!is_service_link(var, value), "{var}={value}");
        }
    }

    #[test]
    fn no_config_key_is_spelled_like_a_service_link() {
        // Service links are skipped before keys are looked up: that is only
        // safe while no key ends in their shapes.
        let defaults = toml::Table::try_from(Config::default()).unwrap();
        let mut keys = Vec::new();
        fn walk(prefix: &str, table: &toml::Table, keys: &mut Vec<String>) {
            for (k, v) in table {
                let name = format!("{prefix}_{}", k.to_ascii_uppercase());
                match v {
                    toml::Value::Table(t) => walk(&name, t, keys),
                    _ => keys.push(name),
                }
            }
        }
        walk("PORTCULLIS", &defaults, &mut keys);
        for key in &keys {
            for tail in [
                "_SERVICE_HOST",
                "_SERVICE_PORT",
                "_PORT",
                "_PROTO",
                "_ADDR",
                "_TCP",
                "_UDP",
            ] {
                assert!(!key.ends_with(tail), "{key} ends like a service link");
            }
        }
    }
}
