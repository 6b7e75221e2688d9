//! Service account tokens: JWTs (ES256) signed with the API server's key, as kube-apiserver issues
//! them through the TokenRequest API (`kubectl create token`), and their verification.
//!
//! Claims follow Kubernetes' bound tokens: `iss`, `sub` (`system:serviceaccount:NS:NAME`), `aud`,
//! `exp`, `iat`, `nbf`, `jti` and `kubernetes.io` (namespace, service account name and uid, and the
//! pod the token is bound to, if any).

use std::path::Path;

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use ring::{
    rand::SystemRandom,
    signature::{self, EcdsaKeyPair, KeyPair as _, UnparsedPublicKey},
};
use serde_json::{json, Value};

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn unb64(text: &str) -> Result<Vec<u8>, String> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|_| "the token is not base64url".to_string())
}

pub struct TokenSigner {
    key: EcdsaKeyPair,
    key_id: String,
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

impl TokenSigner {
    /// Reads the PKCS#8 P-256 key at `path` (`--service-account-signing-key-file`), creating one
    /// there (0600) when the file does not exist.
    pub fn load_or_generate(path: &Path, issuer: &str, audiences: Vec<String>) -> Result<Self> {
        use tokio_rustls::rustls::pki_types::{pem::PemObject as _, PrivatePkcs8KeyDer};
        if !path.exists() {
            let key = rcgen::KeyPair::generate()?;
            super::tls::write_private(path, &key.serialize_pem())?;
        }
        let der = PrivatePkcs8KeyDer::from_pem_file(path)
            .with_context(|| format!("reading the service account key {}", path.display()))?;
        let key = EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            der.secret_pkcs8_der(),
            &SystemRandom::new(),
        )
        .map_err(|e| anyhow::anyhow!("{}: not a PKCS#8 P-256 key: {e}", path.display()))?;
        let digest = ring::digest::digest(&ring::digest::SHA256, key.public_key().as_ref());
        if issuer.is_empty() {
            bail!("--service-account-issuer must not be empty");
        }
        Ok(TokenSigner {
            key_id: b64(&digest.as_ref()[..16]),
            key,
            issuer: issuer.to_string(),
            audiences,
        })
    }

    /// A signed token for `claims`, valid for the given audiences (the server's by default).
    pub fn issue(&self, claims: &TokenClaims, audiences: &[String], now: i64) -> Result<String> {
        let header = json!({"alg": "ES256", "kid": self.key_id, "typ": "JWT"});
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
            "jti": super::handlers::uid(),
            "kubernetes.io": kubernetes,
        });
        let signing_input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(payload.to_string().as_bytes())
        );
        let signature = self
            .key
            .sign(&SystemRandom::new(), signing_input.as_bytes())
            .map_err(|_| anyhow::anyhow!("signing the token failed"))?;
        Ok(format!("{signing_input}.{}", b64(signature.as_ref())))
    }

    /// Checks a token's signature, issuer, audience and lifetime; returns what it claims.
    pub fn verify(&self, token: &str, now: i64) -> Result<TokenClaims, String> {
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("not a JWT".into());
        };
        let header: Value = serde_json::from_slice(&unb64(header)?)
            .map_err(|_| "the token header is not JSON".to_string())?;
        if header["alg"] != "ES256" {
            return Err(format!("unsupported token algorithm {}", header["alg"]));
        }
        let public = UnparsedPublicKey::new(
            &signature::ECDSA_P256_SHA256_FIXED,
            self.key.public_key().as_ref(),
        );
        let signed = token.rsplit_once('.').map(|(s, _)| s).unwrap_or_default();
        public
            .verify(signed.as_bytes(), &unb64(sig)?)
            .map_err(|_| "invalid token signature".to_string())?;
        let claims: Value = serde_json::from_slice(&unb64(payload)?)
            .map_err(|_| "the token payload is not JSON".to_string())?;
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
        let forged = b64(br#"{"iss":"x"}"#);
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
}
