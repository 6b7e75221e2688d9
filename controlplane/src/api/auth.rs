//! Bearer-token authentication: tokens from `--token-auth-file` (kube-apiserver's CSV format:
//! `token,user,uid[,"group1,group2"]`) and the admin token the server keeps in its cert directory.

use std::{collections::HashMap, path::Path};

use axum::http::HeaderMap;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: String,
    pub groups: Vec<String>,
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

    pub fn authenticate(&self, headers: &HeaderMap) -> Option<&User> {
        let value = headers.get("authorization")?.to_str().ok()?;
        let token = value.strip_prefix("Bearer ")?.trim();
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
        let mut headers = HeaderMap::new();
        headers.insert("authorization", "Bearer abc".parse().unwrap());
        assert_eq!(auth.authenticate(&headers).unwrap().groups, ["dev", "ops"]);
        headers.insert("authorization", "Bearer nope".parse().unwrap());
        assert!(auth.authenticate(&headers).is_none());
        std::fs::write(&dir, "onlytoken\n").unwrap();
        assert!(auth.load(&dir).unwrap_err().contains(":1:"));
        let _ = std::fs::remove_file(&dir);
    }
}
