//! Access levels: what a route requires and what an identity holds. A base
//! room: configuration and authentication both speak it, and it imports
//! nothing of ours.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Access levels, ordered: a route's minimum is met by anything at or above it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// No credential needed (on routes); no org access (on identities).
    None,
    Viewer,
    Editor,
    Admin,
    /// Grafana server admin (`isGrafanaAdmin`).
    GrafanaAdmin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::None => "None",
            Role::Viewer => "Viewer",
            Role::Editor => "Editor",
            Role::Admin => "Admin",
            Role::GrafanaAdmin => "GrafanaAdmin",
        }
    }

    /// Grafana's org role names; anything unknown grants nothing.
    pub fn from_grafana(name: &str) -> Role {
        Self::parse(name).unwrap_or(Role::None)
    }

    fn parse(name: &str) -> Option<Role> {
        Some(match name.to_ascii_lowercase().as_str() {
            "none" | "" => Role::None,
            "viewer" => Role::Viewer,
            "editor" => Role::Editor,
            "admin" => Role::Admin,
            "grafanaadmin" | "grafana_admin" | "serveradmin" => Role::GrafanaAdmin,
            _ => return None,
        })
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Role {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Role {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Role, D::Error> {
        let text = String::deserialize(d)?;
        Role::parse(&text).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "`{text}` is not a role (none, Viewer, Editor, Admin, GrafanaAdmin)"
            ))
        })
    }
}
