//! The token controller (kube-controller-manager's `serviceaccount-token`): Secrets of type
//! `kubernetes.io/service-account-token` that name a service account get a legacy token (an ES256
//! JWT signed with the key the API server verifies), the root CA and the namespace; such Secrets
//! whose service account is gone (or was made again with another uid) are deleted.

use std::path::Path;

use k8s_openapi::{
    api::core::v1::{Secret, ServiceAccount},
    ByteString,
};
use kube::{
    api::{DeleteParams, PostParams, Preconditions},
    runtime::{controller, reflector::ObjectRef, watcher, Controller},
    Api, Client, ResourceExt as _,
};
use seine_apimachinery::jwt::{self, SigningKey};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::{api_code, drive, error_policy, reconciled, Context, Error, CONCURRENT_SYNCS};

/// The Secret type the controller fills.
pub const SERVICE_ACCOUNT_TOKEN_TYPE: &str = "kubernetes.io/service-account-token";
/// The annotation that names a token Secret's service account.
pub const SERVICE_ACCOUNT_NAME_ANNOTATION: &str = "kubernetes.io/service-account.name";
/// The annotation the controller sets to the service account's uid.
pub const SERVICE_ACCOUNT_UID_ANNOTATION: &str = "kubernetes.io/service-account.uid";
/// The issuer of legacy tokens (kube's `serviceaccount.LegacyIssuer`).
pub use jwt::LEGACY_ISSUER;

/// Signs legacy service account tokens with the API server's key (its Debug shows only the
/// key id).
#[derive(Debug)]
pub struct TokenGenerator {
    key: SigningKey,
}

impl TokenGenerator {
    /// Reads the key at `path` (`--service-account-private-key-file`).
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        let error = |reason: String| Error::Key {
            path: path.display().to_string(),
            reason,
        };
        let pem = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
        Self::from_pem(&pem).map_err(error)
    }

    /// A generator for the first `PRIVATE KEY` (PKCS#8) block of `pem`.
    pub fn from_pem(pem: &str) -> Result<Self, String> {
        Ok(TokenGenerator {
            key: SigningKey::from_pem(pem)?,
        })
    }

    /// The uncompressed P-256 point that verifies this generator's tokens.
    #[cfg(test)]
    pub fn public_key(&self) -> &[u8] {
        self.key.public_key()
    }

    /// A legacy token for the service account `namespace/name` (`uid`) held in Secret `secret`,
    /// with the claims kube writes: no audience, no expiry.
    pub fn legacy_token(
        &self,
        namespace: &str,
        name: &str,
        uid: &str,
        secret: &str,
    ) -> Result<String, Error> {
        self.key
            .sign(&jwt::legacy_claims(namespace, name, uid, secret))
            .map_err(|_| Error::Signing)
    }
}

/// What the controller works with besides the client.
pub struct TokenConfig {
    pub generator: TokenGenerator,
    /// The PEM written as `ca.crt` (`--root-ca-file`), if any.
    pub root_ca: Option<String>,
}

/// Runs the token controller until its watches end.
pub async fn run(client: Client, config: TokenConfig, shutdown: CancellationToken) {
    let secrets = Api::<Secret>::all(client.clone());
    let only_tokens =
        watcher::Config::default().fields(&format!("type={SERVICE_ACCOUNT_TOKEN_TYPE}"));
    let controller = Controller::new(secrets, only_tokens)
        .with_config(controller::Config::default().concurrency(CONCURRENT_SYNCS))
        .graceful_shutdown_on(shutdown.cancelled_owned());
    // A service account's change (or deletion) wakes the token Secrets that name it.
    let store = controller.store();
    let results = controller
        .watches(
            Api::<ServiceAccount>::all(client.clone()),
            watcher::Config::default(),
            move |account| {
                let (namespace, name) = (account.namespace(), account.name_any());
                store
                    .state()
                    .into_iter()
                    .filter(|s| {
                        s.namespace() == namespace && service_account_name(s) == Some(&name)
                    })
                    .map(|s| ObjectRef::from_obj(&*s))
                    .collect::<Vec<_>>()
            },
        )
        .run(
            |secret, ctx| async move {
                let work = sync_secret(&secret, &ctx);
                reconciled(&*secret, &ctx, work).await
            },
            error_policy,
            Context::new(client, config),
        );
    drive("serviceaccount-token", results).await;
}

fn service_account_name(secret: &Secret) -> Option<&String> {
    secret
        .annotations()
        .get(SERVICE_ACCOUNT_NAME_ANNOTATION)
        .filter(|n| !n.is_empty())
}

async fn sync_secret(secret: &Secret, ctx: &Context<TokenConfig>) -> Result<(), Error> {
    if secret.type_.as_deref() != Some(SERVICE_ACCOUNT_TOKEN_TYPE) {
        return Ok(());
    }
    let (Some(namespace), Some(account_name)) = (secret.namespace(), service_account_name(secret))
    else {
        return Ok(());
    };
    let name = secret.name_any();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let accounts: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), &namespace);
    // Read live, not from a cache, so that a service account just made is not taken for gone.
    let want_uid = secret
        .annotations()
        .get(SERVICE_ACCOUNT_UID_ANNOTATION)
        .filter(|u| !u.is_empty());
    let account = accounts
        .get_opt(account_name)
        .await?
        .filter(|a| want_uid.is_none() || a.uid().as_ref() == want_uid);
    let Some(account) = account else {
        // Its service account is gone: so is the token. Only this Secret, not one made again
        // under the same name meanwhile.
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: secret.uid(),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        return match secrets.delete(&name, &params).await {
            Ok(_) => {
                info!(%namespace, secret = %name, account = %account_name, "serviceaccount-token: deleted the token of a service account that is gone");
                Ok(())
            }
            Err(e) if matches!(api_code(&e), Some(404 | 409)) => Ok(()),
            Err(e) => Err(e.into()),
        };
    };
    let Some(filled) = filled(secret, &account, &ctx.config)? else {
        return Ok(());
    };
    // The cached resourceVersion goes with it: a Secret changed meanwhile is not overwritten
    // (409), and its change brings it back here.
    match secrets
        .replace(&name, &PostParams::default(), &filled)
        .await
    {
        Ok(_) => {
            info!(%namespace, secret = %name, account = %account_name, "serviceaccount-token: token written");
            Ok(())
        }
        Err(e) if matches!(api_code(&e), Some(404 | 409)) => {
            debug!(%namespace, secret = %name, "serviceaccount-token: not written: {e}");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// The Secret with what it lacks (token, `ca.crt`, namespace) and the service account's
/// annotations, or None when it lacks nothing (kube's `secretUpdateNeeded`).
fn filled(
    secret: &Secret,
    account: &ServiceAccount,
    config: &TokenConfig,
) -> Result<Option<Secret>, Error> {
    let data = secret.data.clone().unwrap_or_default();
    let missing = |key: &str| data.get(key).is_none_or(|v| v.0.is_empty());
    let needs_ca = config
        .root_ca
        .as_ref()
        .is_some_and(|ca| data.get("ca.crt").map(|v| v.0.as_slice()) != Some(ca.as_bytes()));
    let needs_namespace = missing("namespace");
    let needs_token = missing("token");
    if !needs_ca && !needs_namespace && !needs_token {
        return Ok(None);
    }
    let namespace = secret.namespace().unwrap_or_default();
    let account_name = account.name_any();
    let account_uid = account.uid().unwrap_or_default();
    let mut out = secret.clone();
    let data = out.data.get_or_insert_with(Default::default);
    if let (true, Some(ca)) = (needs_ca, &config.root_ca) {
        data.insert("ca.crt".into(), ByteString(ca.as_bytes().to_vec()));
    }
    if needs_namespace {
        data.insert(
            "namespace".into(),
            ByteString(namespace.as_bytes().to_vec()),
        );
    }
    if needs_token {
        let token = config.generator.legacy_token(
            &namespace,
            &account_name,
            &account_uid,
            &secret.name_any(),
        )?;
        data.insert("token".into(), ByteString(token.into_bytes()));
    }
    let annotations = out.annotations_mut();
    annotations.insert(SERVICE_ACCOUNT_NAME_ANNOTATION.into(), account_name);
    annotations.insert(SERVICE_ACCOUNT_UID_ANNOTATION.into(), account_uid);
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use kube::api::ObjectMeta;
    use ring::{
        rand::SystemRandom,
        signature::{
            EcdsaKeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_FIXED,
            ECDSA_P256_SHA256_FIXED_SIGNING,
        },
    };
    use serde_json::json;

    fn generator() -> TokenGenerator {
        let der =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .unwrap();
        let body = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
        let lines: Vec<&str> = body
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        let pem = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            lines.join("\n")
        );
        TokenGenerator::from_pem(&pem).unwrap()
    }

    fn payload(token: &str) -> serde_json::Value {
        let part = token.split('.').nth(1).unwrap();
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[test]
    fn legacy_tokens_carry_kubes_claims_and_verify_with_the_key() {
        let generator = generator();
        let token = generator
            .legacy_token("apps", "builder", "u1", "builder-token")
            .unwrap();
        assert_eq!(
            payload(&token),
            json!({
                "iss": "kubernetes/serviceaccount",
                "sub": "system:serviceaccount:apps:builder",
                "kubernetes.io/serviceaccount/namespace": "apps",
                "kubernetes.io/serviceaccount/secret.name": "builder-token",
                "kubernetes.io/serviceaccount/service-account.name": "builder",
                "kubernetes.io/serviceaccount/service-account.uid": "u1",
            })
        );
        let (signed, signature) = token.rsplit_once('.').unwrap();
        let signature = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(signature)
            .unwrap();
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, generator.public_key())
            .verify(signed.as_bytes(), &signature)
            .unwrap();
    }

    #[test]
    fn keys_that_are_not_pkcs8_p256_are_refused_with_the_reason() {
        assert!(TokenGenerator::from_pem("nothing")
            .unwrap_err()
            .contains("no PEM"));
        let sec1 = "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n";
        assert!(TokenGenerator::from_pem(sec1)
            .unwrap_err()
            .contains("PKCS#8"));
        let junk = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        assert!(TokenGenerator::from_pem(junk)
            .unwrap_err()
            .contains("P-256"));
    }

    #[test]
    fn a_secret_is_filled_once_with_what_it_lacks() {
        let config = TokenConfig {
            generator: generator(),
            root_ca: Some("-----BEGIN CERTIFICATE-----\n...\n".into()),
        };
        let account = ServiceAccount {
            metadata: ObjectMeta {
                name: Some("builder".into()),
                namespace: Some("apps".into()),
                uid: Some("u1".into()),
                ..ObjectMeta::default()
            },
            ..ServiceAccount::default()
        };
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some("builder-token".into()),
                namespace: Some("apps".into()),
                annotations: Some(
                    [(
                        SERVICE_ACCOUNT_NAME_ANNOTATION.to_string(),
                        "builder".to_string(),
                    )]
                    .into(),
                ),
                ..ObjectMeta::default()
            },
            type_: Some(SERVICE_ACCOUNT_TOKEN_TYPE.into()),
            ..Secret::default()
        };
        let out = filled(&secret, &account, &config).unwrap().unwrap();
        let data = out.data.clone().unwrap();
        let token = String::from_utf8(data["token"].0.clone()).unwrap();
        assert_eq!(
            payload(&token)["kubernetes.io/serviceaccount/secret.name"],
            "builder-token"
        );
        assert_eq!(data["namespace"].0, b"apps");
        assert_eq!(
            data["ca.crt"].0,
            config.root_ca.as_ref().unwrap().as_bytes()
        );
        assert_eq!(out.annotations()[SERVICE_ACCOUNT_UID_ANNOTATION], "u1");
        assert!(
            filled(&out, &account, &config).unwrap().is_none(),
            "nothing lacks"
        );

        // A changed CA is written again; the token is kept.
        let mut other_ca = out.clone();
        other_ca
            .data
            .as_mut()
            .unwrap()
            .insert("ca.crt".into(), ByteString(b"old".to_vec()));
        let again = filled(&other_ca, &account, &config).unwrap().unwrap();
        assert_eq!(again.data.as_ref().unwrap()["token"].0, token.as_bytes());
        assert_eq!(
            again.data.unwrap()["ca.crt"].0,
            config.root_ca.as_ref().unwrap().as_bytes()
        );
    }
}
