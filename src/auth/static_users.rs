//! A verifier that needs no upstream: credentials listed in the config by the
//! SHA-256 of their secret (so the config file holds no secret either).

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{
    AuthMethod, Credential, DenyReason, Identity, IdentityRecord, Principal, PrincipalKind, Verdict,
};
use crate::config::{AuthConfig, StaticUserConfig};

pub struct StaticVerifier {
    users: Vec<(StaticUserConfig, [u8; 32])>,
}

impl StaticVerifier {
    pub fn from_config(auth: &AuthConfig) -> StaticVerifier {
        let users = auth
            .static_users
            .iter()
            .map(|u| {
                let mut digest = [0u8; 32];
                // Validated as 64 hex digits at config load.
                let _ = hex::decode_to_slice(&u.secret_sha256, &mut digest);
                (u.clone(), digest)
            })
            .collect();
        StaticVerifier { users }
    }

    /// A password matches the entry of that login; a token matches any entry.
    pub fn verify(&self, credential: &Credential) -> Verdict {
        let (login, secret, method) = match credential {
            Credential::Password { user, password } => {
                (Some(user.as_str()), password.as_str(), AuthMethod::Password)
            }
            Credential::ApiKey { key, .. } => (None, key.as_str(), AuthMethod::ApiKey),
            Credential::ServiceToken { token, .. } => (None, token.as_str(), AuthMethod::ServiceToken),
            Credential::Session { token } => (None, token.as_str(), AuthMethod::Session),
        };
        let digest: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        // Compare against every entry so timing does not tell which matched.
        let mut found = None;
        for (i, (user, expected)) in self.users.iter().enumerate() {
            let login_ok = login.is_none_or(|l| l == user.login);
            if bool::from(digest.ct_eq(expected)) && login_ok && found.is_none() {
                found = Some(i);
            }
        }
        let Some(i) = found else {
            return Verdict::Denied(DenyReason::Invalid);
        };
        let user = &self.users[i].0;
        Verdict::Allowed(Box::new(Identity::from(IdentityRecord {
            principal: Principal {
                kind: PrincipalKind::User,
                id: i as i64 + 1,
            },
            login: user.login.as_str().into(),
            email: user.email.as_str().into(),
            name: user.name.as_str().into(),
            org_id: 1,
            org_role: user.role,
            other_orgs: Default::default(),
            grafana_admin: user.grafana_admin,
            method,
            verified_at_ms: 0,
            expires_at_ms: 0,
        })))
    }
}
