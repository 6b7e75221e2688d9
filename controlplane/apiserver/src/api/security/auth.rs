//! Authentication, in kube-apiserver's order: client certificates signed by the client CA (user =
//! CN, groups = O), bearer tokens from `--token-auth-file` (kube-apiserver's CSV format:
//! `token,user,uid[,"group1,group2"]`) and the admin token kept in the cert directory, and service
//! account tokens (JWTs this server's key signed, for service accounts that still exist: bound
//! tokens from the TokenRequest API, and legacy tokens that live in Secrets, good while their Secret
//! still holds them). Every authenticated user is in `system:authenticated`.

use std::{collections::HashMap, path::Path};

use axum::http::HeaderMap;

use crate::api::security::sa_token::{LegacyClaims, TokenSigner, VerifiedToken};
use crate::storage::{ObjectKey, Storage, StorageError};

/// The identity a verified client certificate carries (set on the request by the TLS acceptor).
#[derive(Debug, Clone)]
pub struct CertificateUser(pub User);

/// Why a request could not be authenticated.
#[derive(Debug)]
pub enum AuthError {
    /// No credentials, or credentials that are not valid.
    Unauthorized,
    /// The credentials could not be checked now (etcd is unavailable).
    Unavailable(StorageError),
}

pub struct Authenticator {
    pub tokens: TokenAuthenticator,
    pub signer: TokenSigner,
}

impl Authenticator {
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        certificate: Option<&CertificateUser>,
        storage: &Storage,
    ) -> Result<User, AuthError> {
        let mut user = match (bearer(headers), certificate) {
            (Some(token), _) => match self.tokens.lookup(token) {
                Some(user) => user.clone(),
                None => self.service_account(token, storage).await?,
            },
            (None, Some(CertificateUser(user))) => user.clone(),
            (None, None) => return Err(AuthError::Unauthorized),
        };
        if !user.groups.iter().any(|g| g == "system:authenticated") {
            user.groups.push("system:authenticated".into());
        }
        Ok(user)
    }

    /// A service account token: signed by this server, for a service account (and pod, when
    /// bound to one) that exists with the uid in the token.
    async fn service_account(&self, token: &str, storage: &Storage) -> Result<User, AuthError> {
        let now = chrono::Utc::now().timestamp();
        let claims = match self.signer.verify_any(token, now) {
            Ok(VerifiedToken::Bound(claims)) => claims,
            Ok(VerifiedToken::Legacy(claims)) => return legacy(token, &claims, storage).await,
            Err(_) => return Err(AuthError::Unauthorized),
        };
        let exists = |resource: &'static str, name: String, uid: String| {
            let key = ObjectKey::new(resource, Some(&claims.namespace), &name);
            async move {
                match storage.get(&key).await {
                    Ok(object) => Ok(object["metadata"]["uid"].as_str() == Some(uid.as_str())),
                    Err(StorageError::NotFound { .. }) => Ok(false),
                    Err(e) => Err(AuthError::Unavailable(e)),
                }
            }
        };
        if !exists("serviceaccounts", claims.name.clone(), claims.uid.clone()).await? {
            return Err(AuthError::Unauthorized);
        }
        if let Some((pod, uid)) = &claims.pod {
            if !exists("pods", pod.clone(), uid.clone()).await? {
                return Err(AuthError::Unauthorized);
            }
        }
        Ok(service_account_user(
            &claims.namespace,
            &claims.name,
            &claims.uid,
        ))
    }
}

fn service_account_user(namespace: &str, name: &str, uid: &str) -> User {
    User {
        name: format!("system:serviceaccount:{namespace}:{name}"),
        uid: uid.to_string(),
        groups: vec![
            "system:serviceaccounts".into(),
            format!("system:serviceaccounts:{namespace}"),
        ],
    }
}

/// The label that marks a legacy token invalid (kube-controller-manager's legacy token cleaner
/// sets it; removing it makes the token good again).
const INVALID_SINCE_LABEL: &str = "kubernetes.io/legacy-token-invalid-since";

/// A legacy token, as kube-apiserver's legacy validator checks it: the Secret it names still
/// exists, is not being deleted or marked invalid, and holds exactly this token; the service
/// account exists, is not being deleted, and has the uid in the token.
async fn legacy(token: &str, claims: &LegacyClaims, storage: &Storage) -> Result<User, AuthError> {
    use base64::Engine as _;
    let get = |resource: &'static str, name: &str| {
        let key = ObjectKey::new(resource, Some(&claims.namespace), name);
        async move {
            match storage.get(&key).await {
                Ok(object) => Ok(Some(object)),
                Err(StorageError::NotFound { .. }) => Ok(None),
                Err(e) => Err(AuthError::Unavailable(e)),
            }
        }
    };
    let Some(secret) = get("secrets", &claims.secret).await? else {
        return Err(AuthError::Unauthorized);
    };
    let meta = &secret["metadata"];
    if meta.get("deletionTimestamp").is_some() || meta["labels"].get(INVALID_SINCE_LABEL).is_some()
    {
        return Err(AuthError::Unauthorized);
    }
    let held = secret["data"]["token"]
        .as_str()
        .and_then(|t| base64::engine::general_purpose::STANDARD.decode(t).ok())
        .unwrap_or_default();
    if !same_bytes(&held, token.as_bytes()) {
        return Err(AuthError::Unauthorized);
    }
    let Some(account) = get("serviceaccounts", &claims.name).await? else {
        return Err(AuthError::Unauthorized);
    };
    if account["metadata"].get("deletionTimestamp").is_some()
        || account["metadata"]["uid"].as_str() != Some(claims.uid.as_str())
    {
        return Err(AuthError::Unauthorized);
    }
    Ok(service_account_user(
        &claims.namespace,
        &claims.name,
        &claims.uid,
    ))
}

/// Equality that takes as long wherever the first difference is (as kube's
/// `subtle.ConstantTimeCompare` of the token with the Secret's copy).
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get("authorization")?.to_str().ok()?;
    let token = value.strip_prefix("Bearer ")?.trim();
    (!token.is_empty()).then_some(token)
}

/// The user a client certificate names: CN is the user, each O a group.
pub fn certificate_user(der: &[u8]) -> Option<User> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    let name = subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())?
        .to_string();
    let groups = subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok())
        .map(str::to_string)
        .collect();
    Some(User {
        name,
        uid: String::new(),
        groups,
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: String,
    pub groups: Vec<String>,
}

impl User {
    /// Who a request is when nothing authenticated it.
    pub fn anonymous() -> Self {
        User {
            name: "system:anonymous".into(),
            uid: String::new(),
            groups: vec!["system:unauthenticated".into()],
        }
    }
}

#[derive(Default)]
pub struct TokenAuthenticator {
    tokens: HashMap<String, User>,
}

impl TokenAuthenticator {
    pub fn add(&mut self, token: &str, user: User) {
        self.tokens.insert(token.to_string(), user);
    }

    /// Reads a token file; a malformed line is an error naming it.
    pub fn load(&mut self, path: &Path) -> Result<(), String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (head, groups) = match line.split_once(",\"") {
                Some((head, groups)) => (head, groups.trim_end_matches('"')),
                None => (line, ""),
            };
            let fields: Vec<&str> = head.split(',').collect();
            let [token, user, uid, ..] = fields.as_slice() else {
                return Err(format!(
                    "{}:{}: expected token,user,uid[,\"groups\"]",
                    path.display(),
                    n + 1
                ));
            };
            if token.is_empty() || user.is_empty() {
                return Err(format!("{}:{}: empty token or user", path.display(), n + 1));
            }
            let mut groups: Vec<String> = groups
                .split(',')
                .filter(|g| !g.is_empty())
                .map(str::to_string)
                .collect();
            if let Some(extra) = fields.get(3) {
                groups.push(extra.to_string());
            }
            self.add(
                token,
                User {
                    name: user.to_string(),
                    uid: uid.to_string(),
                    groups,
                },
            );
        }
        Ok(())
    }

    pub fn lookup(&self, token: &str) -> Option<&User> {
        self.tokens.get(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_files_read_users_and_groups() {
        let dir = std::env::temp_dir().join(format!("seine-tokens-{}", std::process::id()));
        std::fs::write(&dir, "# comment\nabc,alice,1,\"dev,ops\"\nxyz,bob,2\n").unwrap();
        let mut auth = TokenAuthenticator::default();
        auth.load(&dir).unwrap();
        assert_eq!(auth.lookup("abc").unwrap().groups, ["dev", "ops"]);
        assert!(auth.lookup("nope").is_none());
        std::fs::write(&dir, "onlytoken\n").unwrap();
        assert!(auth.load(&dir).unwrap_err().contains(":1:"));
        let _ = std::fs::remove_file(&dir);
    }
}
