//! The service account token key: JWTs signed ES256 with a PKCS#8 P-256 key, named in their
//! header by a key id derived from the public key. The API server (bound tokens, and verifying
//! every kind) and the controller manager (legacy tokens in Secrets) sign with the same key, so
//! the two must agree on all of this: it lives here once.

use base64::Engine as _;
use ring::{
    rand::SystemRandom,
    signature::{self, EcdsaKeyPair, KeyPair as _, UnparsedPublicKey},
};
use serde_json::{json, Value};

/// The issuer of legacy (Secret-based) tokens, as kube-controller-manager writes them.
pub const LEGACY_ISSUER: &str = "kubernetes/serviceaccount";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn unb64(text: &str) -> Result<Vec<u8>, String> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|_| "the token is not base64url".to_string())
}

/// A signing key (its Debug shows only the key id).
pub struct SigningKey {
    key: EcdsaKeyPair,
    key_id: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("key_id", &self.key_id)
            .finish()
    }
}

impl SigningKey {
    /// The first `PRIVATE KEY` (PKCS#8, P-256) block of `pem`.
    pub fn from_pem(pem: &str) -> Result<Self, String> {
        use rustls_pki_types::{pem::PemObject as _, PrivatePkcs8KeyDer};
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes()).map_err(|_| {
            if pem.contains("-----BEGIN EC PRIVATE KEY-----") {
                "a SEC1 key; convert it to PKCS#8 (openssl pkcs8 -topk8 -nocrypt)".to_string()
            } else {
                "no PEM PRIVATE KEY block".to_string()
            }
        })?;
        let key = EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            der.secret_pkcs8_der(),
            &SystemRandom::new(),
        )
        .map_err(|e| format!("not a PKCS#8 P-256 key: {e}"))?;
        let digest = ring::digest::digest(&ring::digest::SHA256, key.public_key().as_ref());
        Ok(SigningKey {
            key_id: b64(&digest.as_ref()[..16]),
            key,
        })
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The uncompressed P-256 point that verifies this key's tokens.
    pub fn public_key(&self) -> &[u8] {
        self.key.public_key().as_ref()
    }

    /// `claims` as a JWT signed with this key.
    pub fn sign(&self, claims: &Value) -> Result<String, String> {
        let header = json!({"alg": "ES256", "kid": self.key_id, "typ": "JWT"});
        let signing_input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let signature = self
            .key
            .sign(&SystemRandom::new(), signing_input.as_bytes())
            .map_err(|_| "signing the token failed".to_string())?;
        Ok(format!("{signing_input}.{}", b64(signature.as_ref())))
    }

    /// The claims of a token whose signature this key made; what they say is the caller's to
    /// check.
    pub fn verify(&self, token: &str) -> Result<Value, String> {
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
        let public = UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, self.public_key());
        let signed = token.rsplit_once('.').map(|(s, _)| s).unwrap_or_default();
        public
            .verify(signed.as_bytes(), &unb64(sig)?)
            .map_err(|_| "invalid token signature".to_string())?;
        serde_json::from_slice(&unb64(payload)?)
            .map_err(|_| "the token payload is not JSON".to_string())
    }
}

/// The claims of a legacy token for the service account `namespace/name` (`uid`) held in Secret
/// `secret`, as kube writes them: no audience, no expiry.
pub fn legacy_claims(namespace: &str, name: &str, uid: &str, secret: &str) -> Value {
    json!({
        "iss": LEGACY_ISSUER,
        "sub": format!("system:serviceaccount:{namespace}:{name}"),
        "kubernetes.io/serviceaccount/namespace": namespace,
        "kubernetes.io/serviceaccount/secret.name": secret,
        "kubernetes.io/serviceaccount/service-account.name": name,
        "kubernetes.io/serviceaccount/service-account.uid": uid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new PKCS#8 P-256 key.
    fn key() -> SigningKey {
        let doc = EcdsaKeyPair::generate_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &SystemRandom::new(),
        )
        .unwrap();
        let body = base64::engine::general_purpose::STANDARD.encode(doc.as_ref());
        SigningKey::from_pem(&format!(
            "-----BEGIN PRIVATE KEY-----\n{body}\n-----END PRIVATE KEY-----\n"
        ))
        .unwrap()
    }

    #[test]
    fn tokens_verify_with_the_key_that_signed_them_only() {
        let (a, b) = (key(), key());
        let claims = legacy_claims("default", "builder", "u-1", "builder-token");
        let token = a.sign(&claims).unwrap();
        assert_eq!(a.verify(&token).unwrap(), claims);
        assert_eq!(
            b.verify(&token).unwrap_err(),
            "invalid token signature",
            "another key"
        );
        let mut parts: Vec<&str> = token.split('.').collect();
        let forged = b64(br#"{"iss":"kubernetes/serviceaccount","sub":"system:admin"}"#);
        parts[1] = &forged;
        assert!(a.verify(&parts.join(".")).is_err(), "a changed payload");
        assert!(a.verify("a.b").is_err() && a.verify("").is_err());
        let header: Value =
            serde_json::from_slice(&unb64(token.split('.').next().unwrap()).unwrap()).unwrap();
        assert_eq!(header["kid"], a.key_id());
        assert_eq!(a.key_id().len(), 22);
    }

    #[test]
    fn keys_that_are_not_pkcs8_p256_are_refused_with_a_reason() {
        assert!(SigningKey::from_pem("")
            .unwrap_err()
            .contains("no PEM PRIVATE KEY"));
        let sec1 = "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n";
        assert!(SigningKey::from_pem(sec1).unwrap_err().contains("SEC1"));
    }
}
