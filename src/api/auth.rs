//! API keys: `Authorization: Bearer <key>` on every /v1 route when a keys file is given.
//! Keys are compared in constant time and never logged.

use std::path::Path;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::AppState;
use crate::api::error::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Inspect,
    Admin,
}

pub struct ApiKeys {
    keys: Vec<(Role, Vec<u8>)>,
}

impl ApiKeys {
    /// Reads `<role> <key>` lines; blank lines and `#` comments are skipped.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (role, key) = line
                .split_once(char::is_whitespace)
                .ok_or(format!("line {}: expected `<role> <key>`", n + 1))?;
            let role = match role {
                "inspect" => Role::Inspect,
                "admin" => Role::Admin,
                other => return Err(format!("line {}: unknown role {other:?} (inspect or admin)", n + 1)),
            };
            let key = key.trim();
            // A header carries visible ASCII only: a key with other characters never matches.
            if let Some(c) = key.chars().find(|c| !c.is_ascii_graphic() && !c.is_whitespace()) {
                return Err(format!(
                    "line {}: a key is visible ASCII characters only (it holds {c:?}, which no Authorization header can carry)",
                    n + 1
                ));
            }
            // One key a line: text after it (a comment) would silently become part of it.
            if key.contains(char::is_whitespace) {
                return Err(format!(
                    "line {}: expected `<role> <key>`, and a key holds no spaces (comments go on lines of their own, after #)",
                    n + 1
                ));
            }
            if key.len() < 16 {
                return Err(format!("line {}: keys must be at least 16 characters", n + 1));
            }
            // The shipped Kubernetes secret's placeholders are long enough to pass the
            // check above; applied unchanged, anyone who read the manifests has the keys.
            if key.to_ascii_uppercase().contains("CHANGE-ME") {
                return Err(format!(
                    "line {}: this is a placeholder key (CHANGE-ME): set a key of your own",
                    n + 1
                ));
            }
            // A key listed twice would silently take its last role.
            if keys.iter().any(|(_, k): &(Role, Vec<u8>)| k == key.as_bytes()) {
                return Err(format!("line {}: this key is listed twice", n + 1));
            }
            keys.push((role, key.as_bytes().to_vec()));
        }
        if keys.is_empty() {
            return Err("no keys".into());
        }
        Ok(Self { keys })
    }

    /// The role of `key`, comparing against every key in constant time.
    pub fn role_of(&self, key: &[u8]) -> Option<Role> {
        let mut found = None;
        for (role, k) in &self.keys {
            if bool::from(k.as_slice().ct_eq(key)) {
                found = Some(*role);
            }
        }
        found
    }
}

/// Admin routes: model reload and training jobs.
fn needs_admin(req: &Request) -> bool {
    (req.method() == Method::POST && req.uri().path().ends_with("/reload"))
        // Under `nest("/v1")` the middleware sees the path without the prefix.
        || req.uri().path().trim_start_matches("/v1").starts_with("/training-jobs")
}

pub async fn require_key(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let Some(keys) = &state.keys else {
        return next.run(req).await;
    };
    let presented = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        // The scheme name is case-insensitive (RFC 7235).
        .and_then(|v| {
            v.split_once(' ')
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, k)| k)
        })
        .map(|k| k.trim().as_bytes().to_vec());
    match presented.and_then(|k| keys.role_of(&k)) {
        None => ApiError::Unauthorized.into_response(),
        Some(Role::Inspect) if needs_admin(&req) => ApiError::Forbidden.into_response(),
        Some(role) => {
            let mut req = req;
            req.extensions_mut().insert(role);
            next.run(req).await
        }
    }
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct WhoAmI {
    /// Whether this server asks for API keys.
    pub keys_required: bool,
    /// The presented key's role; `admin` when the server has no keys (everyone may do everything).
    pub role: Role,
}

/// What the presented key may do (the operator's page hides what it may not).
#[utoipa::path(get, path = "/v1/whoami", responses((status = 200, body = WhoAmI), (status = 401, body = crate::api::error::ErrorBody)))]
pub async fn whoami(State(state): State<Arc<AppState>>, role: Option<axum::Extension<Role>>) -> axum::Json<WhoAmI> {
    axum::Json(WhoAmI {
        keys_required: state.keys.is_some(),
        role: role.map_or(Role::Admin, |r| r.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_roles_and_matches_keys() {
        let k = ApiKeys::parse("# keys\ninspect aaaaaaaaaaaaaaaa\nadmin bbbbbbbbbbbbbbbbbbbb\n").unwrap();
        assert_eq!(k.role_of(b"aaaaaaaaaaaaaaaa"), Some(Role::Inspect));
        assert_eq!(k.role_of(b"bbbbbbbbbbbbbbbbbbbb"), Some(Role::Admin));
        assert_eq!(k.role_of(b"aaaaaaaaaaaaaaa"), None);
        assert!(ApiKeys::parse("root aaaaaaaaaaaaaaaa").is_err());
        assert!(ApiKeys::parse("inspect short").is_err());
        // Text after the key would have become part of it: the key a client sends then fails.
        let e = ApiKeys::parse("inspect abcdefghijklmnopqr line 3 camera")
            .err()
            .unwrap();
        assert!(e.contains("line 1") && e.contains("no spaces"), "{e}");
        assert!(ApiKeys::parse("  inspect \t abcdefghijklmnopqr  ").is_ok());
        for bad in [
            "admin abcdefghijklmnop\u{e9}123",
            "admin abcdefghijklmnop0123\0x",
            "admin abcdefghijklmnopq\u{1}",
        ] {
            let e = ApiKeys::parse(bad).err().unwrap();
            assert!(e.contains("visible ASCII"), "{bad:?}: {e}");
        }
        let twice = ApiKeys::parse("admin aaaaaaaaaaaaaaaa\ninspect aaaaaaaaaaaaaaaa")
            .err()
            .unwrap();
        assert!(twice.contains("line 2") && twice.contains("twice"), "{twice}");
        // The placeholders of docker/k8s/secret.yaml, as shipped.
        let secret = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docker/k8s/secret.yaml")).unwrap();
        let shipped: String = secret
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("inspect ") || l.starts_with("admin "))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(shipped.lines().count(), 2, "{secret}");
        let placeholder = ApiKeys::parse(&shipped).err().unwrap();
        assert!(placeholder.contains("placeholder"), "{placeholder}");
    }
}
