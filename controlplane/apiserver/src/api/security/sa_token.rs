//! Service account tokens: JWTs (ES256) signed with the API server's key, as kube-apiserver issues
//! them through the TokenRequest API (`kubectl create token`), and their verification.
//!
//! Claims follow Kubernetes' bound tokens: `iss`, `sub` (`system:serviceaccount:NS:NAME`), `aud`,
//! `exp`, `iat`, `nbf`, `jti` and `kubernetes.io` (namespace, service account name and uid, and the
//! pod the token is bound to, if any). Legacy tokens, which the controller manager's token
//! controller writes into `kubernetes.io/service-account-token` Secrets with the same key, are
//! verified too: issuer `kubernetes/serviceaccount`, flat `kubernetes.io/serviceaccount/...`
//! claims, no audience and no expiry.

use std::path::Path;

use anyhow::{bail, Context, Result};
use seine_apimachinery::jwt::SigningKey;
pub use seine_apimachinery::jwt::LEGACY_ISSUER;
use serde_json::{json, Value};

pub struct TokenSigner {
    key: SigningKey,
    pub issuer: String,
    pub audiences: Vec<String>,
}

/// What a valid token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenClaims {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// (name, uid) of the pod the token is bound to.
    pub pod: Option<(String, String)>,
    pub expires: i64,
}

/// What a valid legacy token says: the Secret that holds it and the service account it names.
/// It is good only while that Secret still holds it and the service account has that uid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacyClaims {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub secret: String,
}

/// A token this server's key signed, by kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifiedToken {
    Bound(TokenClaims),
    Legacy(LegacyClaims),
}

impl TokenSigner {
    /// Reads the PKCS#8 P-256 key at `path` (`--service-account-signing-key-file`), creating one
    /// there (0600) when the file does not exist.
    pub fn load_or_generate(path: &Path, issuer: &str, audiences: Vec<String>) -> Result<Self> {
        if !path.exists() {
            let key = rcgen::KeyPair::generate()?;
            crate::api::security::tls::write_private(path, &key.serialize_pem())?;
        }
        let pem = std::fs::read_to_string(path)
            .with_context(|| format!("reading the service account key {}", path.display()))?;
        let key =
            SigningKey::from_pem(&pem).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        if issuer.is_empty() {
            bail!("--service-account-issuer must not be empty");
        }
        Ok(TokenSigner {
            key,
            issuer: issuer.to_string(),
            audiences,
        })
    }

    /// A signed token for `claims`, valid for the given audiences (the server's by default).
    pub fn issue(&self, claims: &TokenClaims, audiences: &[String], now: i64) -> Result<String> {
        let mut kubernetes = json!({
            "namespace": claims.namespace,
            "serviceaccount": {"name": claims.name, "uid": claims.uid},
        });
        if let Some((name, uid)) = &claims.pod {
            kubernetes["pod"] = json!({"name": name, "uid": uid});
        }
        let audiences = if audiences.is_empty() {
            &self.audiences
        } else {
            audiences
        };
        let payload = json!({
            "iss": self.issuer,
            "sub": format!("system:serviceaccount:{}:{}", claims.namespace, claims.name),
            "aud": audiences,
            "exp": claims.expires,
            "iat": now,
            "nbf": now,
            "jti": crate::api::registry::meta::uid(),
            "kubernetes.io": kubernetes,
        });
        self.sign(&payload)
    }

    /// `payload` as a JWT signed with this server's key.
    fn sign(&self, payload: &Value) -> Result<String> {
        self.key.sign(payload).map_err(anyhow::Error::msg)
    }

    /// Checks a bound token's signature, issuer, audience and lifetime; returns what it claims.
    pub fn verify(&self, token: &str, now: i64) -> Result<TokenClaims, String> {
        let claims = self.signed_claims(token)?;
        self.bound_claims(&claims, now)
    }

    /// Checks a token of either kind: legacy when its issuer is [`LEGACY_ISSUER`] and it carries
    /// no bound-token claims, bound otherwise. A legacy token still has to be checked against the
    /// Secret and service account it names (see `auth::Authenticator`).
    pub fn verify_any(&self, token: &str, now: i64) -> Result<VerifiedToken, String> {
        let claims = self.signed_claims(token)?;
        if claims["iss"] == LEGACY_ISSUER && claims.get("kubernetes.io").is_none() {
            return legacy_claims(&claims, now).map(VerifiedToken::Legacy);
        }
        self.bound_claims(&claims, now).map(VerifiedToken::Bound)
    }

    /// The payload of a token whose signature this server's key made.
    fn signed_claims(&self, token: &str) -> Result<Value, String> {
        self.key.verify(token)
    }

    /// What a signed bound token claims, once its issuer, audience and lifetime are checked.
    fn bound_claims(&self, claims: &Value, now: i64) -> Result<TokenClaims, String> {
        if claims["iss"] != self.issuer.as_str() {
            return Err(format!("token issuer {} is not trusted", claims["iss"]));
        }
        let audiences: Vec<&str> = match &claims["aud"] {
            Value::String(a) => vec![a.as_str()],
            Value::Array(list) => list.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        if !audiences
            .iter()
            .any(|a| self.audiences.iter().any(|mine| mine == a))
        {
            return Err("token audiences are not this server's".into());
        }
        let expires = claims["exp"].as_i64().ok_or("the token has no expiry")?;
        if now >= expires {
            return Err("the token has expired".into());
        }
        if claims["nbf"].as_i64().is_some_and(|nbf| now + 60 < nbf) {
            return Err("the token is not valid yet".into());
        }
        let k8s = &claims["kubernetes.io"];
        let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
        let out = TokenClaims {
            namespace: text(&k8s["namespace"]),
            name: text(&k8s["serviceaccount"]["name"]),
            uid: text(&k8s["serviceaccount"]["uid"]),
            pod: k8s["pod"]["name"]
                .as_str()
                .map(|n| (n.to_string(), text(&k8s["pod"]["uid"]))),
            expires,
        };
        if out.namespace.is_empty() || out.name.is_empty() {
            return Err("the token names no service account".into());
        }
        Ok(out)
    }
}

/// The claims of a legacy token, as kube-apiserver's legacy validator checks them: every
/// `kubernetes.io/serviceaccount/...` claim present and `sub` naming the same service account.
/// Such tokens have no expiry; one that carries `exp` or `nbf` is held to them.
fn legacy_claims(claims: &Value, now: i64) -> Result<LegacyClaims, String> {
    let text = |key: &str| claims[key].as_str().unwrap_or_default().to_string();
    let out = LegacyClaims {
        namespace: text("kubernetes.io/serviceaccount/namespace"),
        name: text("kubernetes.io/serviceaccount/service-account.name"),
        uid: text("kubernetes.io/serviceaccount/service-account.uid"),
        secret: text("kubernetes.io/serviceaccount/secret.name"),
    };
    if out.namespace.is_empty() || out.name.is_empty() || out.uid.is_empty() {
        return Err("the token names no service account".into());
    }
    if out.secret.is_empty() {
        return Err("the token names no secret".into());
    }
    if text("sub") != format!("system:serviceaccount:{}:{}", out.namespace, out.name) {
        return Err("the token's sub claim is invalid".into());
    }
    if claims["exp"].as_i64().is_some_and(|exp| now >= exp) {
        return Err("the token has expired".into());
    }
    if claims["nbf"].as_i64().is_some_and(|nbf| now + 60 < nbf) {
        return Err("the token is not valid yet".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_only_as_issued() {
        let path = std::env::temp_dir().join(format!("seine-sa-{}.key", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let issuer = "https://kubernetes.default.svc.cluster.local";
        let signer = TokenSigner::load_or_generate(&path, issuer, vec![issuer.into()]).unwrap();
        let claims = TokenClaims {
            namespace: "default".into(),
            name: "builder".into(),
            uid: "u1".into(),
            pod: None,
            expires: 2_000,
        };
        let token = signer.issue(&claims, &[], 1_000).unwrap();
        assert_eq!(signer.verify(&token, 1_500).unwrap(), claims);
        assert!(signer
            .verify(&token, 2_000)
            .unwrap_err()
            .contains("expired"));
        // Another audience is not accepted; a tampered payload fails the signature.
        let other = signer.issue(&claims, &["vault".into()], 1_000).unwrap();
        assert!(signer.verify(&other, 1_500).is_err());
        let mut parts: Vec<&str> = token.split('.').collect();
        use base64::Engine as _;
        let forged = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"iss":"x"}"#);
        parts[1] = &forged;
        assert!(signer
            .verify(&parts.join("."), 1_500)
            .unwrap_err()
            .contains("signature"));
        // The same key file is reused.
        let again = TokenSigner::load_or_generate(&path, issuer, vec![issuer.into()]).unwrap();
        assert!(again.verify(&token, 1_500).is_ok());
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn legacy_tokens_verify_without_audience_or_expiry() {
        let path = std::env::temp_dir().join(format!("seine-sa-legacy-{}.key", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let issuer = "https://kubernetes.default.svc.cluster.local";
        let signer = TokenSigner::load_or_generate(&path, issuer, vec![issuer.into()]).unwrap();
        let legacy = json!({
            "iss": LEGACY_ISSUER,
            "sub": "system:serviceaccount:apps:builder",
            "kubernetes.io/serviceaccount/namespace": "apps",
            "kubernetes.io/serviceaccount/secret.name": "builder-token",
            "kubernetes.io/serviceaccount/service-account.name": "builder",
            "kubernetes.io/serviceaccount/service-account.uid": "u1",
        });
        let token = signer.sign(&legacy).unwrap();
        let expected = LegacyClaims {
            namespace: "apps".into(),
            name: "builder".into(),
            uid: "u1".into(),
            secret: "builder-token".into(),
        };
        // Valid at any time: legacy tokens do not expire.
        assert_eq!(
            signer.verify_any(&token, i64::MAX - 100).unwrap(),
            VerifiedToken::Legacy(expected)
        );
        // The bound-token path does not take them (no audience, another issuer).
        assert!(signer.verify(&token, 1_000).is_err());
        // Bound tokens still verify through the same entry point.
        let bound = TokenClaims {
            namespace: "apps".into(),
            name: "builder".into(),
            uid: "u1".into(),
            pod: None,
            expires: 2_000,
        };
        let issued = signer.issue(&bound, &[], 1_000).unwrap();
        assert_eq!(
            signer.verify_any(&issued, 1_500).unwrap(),
            VerifiedToken::Bound(bound)
        );

        // A sub that names another account, a missing claim, or an exp in the past: refused.
        let mut other = legacy.clone();
        other["sub"] = "system:serviceaccount:apps:admin".into();
        let err = signer.verify_any(&signer.sign(&other).unwrap(), 1_000);
        assert!(err.unwrap_err().contains("sub"));
        let mut no_secret = legacy.clone();
        no_secret["kubernetes.io/serviceaccount/secret.name"] = "".into();
        let err = signer.verify_any(&signer.sign(&no_secret).unwrap(), 1_000);
        assert!(err.unwrap_err().contains("secret"));
        let mut expired = legacy.clone();
        expired["exp"] = 500.into();
        let err = signer.verify_any(&signer.sign(&expired).unwrap(), 1_000);
        assert!(err.unwrap_err().contains("expired"));

        // Signed with another key: refused.
        let other_path = path.with_extension("other");
        let _ = std::fs::remove_file(&other_path);
        let stranger =
            TokenSigner::load_or_generate(&other_path, issuer, vec![issuer.into()]).unwrap();
        let foreign = stranger.sign(&legacy).unwrap();
        assert!(signer
            .verify_any(&foreign, 1_000)
            .unwrap_err()
            .contains("signature"));
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(&other_path);
    }
}
