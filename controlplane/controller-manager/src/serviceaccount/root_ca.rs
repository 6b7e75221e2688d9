//! The root CA publisher (kube-controller-manager's `root-ca-cert-publisher`): every namespace has
//! a `kube-root-ca.crt` ConfigMap whose `ca.crt` is the cluster's root CA (`--root-ca-file`), so
//! that pods can verify the API server; edits to it are put back.

use std::{collections::BTreeMap, path::Path};

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::{
    api::{ObjectMeta, PostParams},
    Api, Client, ResourceExt as _,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::{api_code, drive, error_policy, is_active, per_namespace, reconciled, Context, Error};

/// The ConfigMap every namespace gets.
pub const ROOT_CA_CONFIG_MAP: &str = "kube-root-ca.crt";
const DESCRIPTION_ANNOTATION: &str = "kubernetes.io/description";
/// kube's words, so that tools that look for them find them.
const DESCRIPTION: &str = "Contains a CA bundle that can be used to verify the kube-apiserver when using internal endpoints such as the internal service IP or kubernetes.default.svc. No other usage is guaranteed across distributions of Kubernetes clusters.";

/// Reads `--root-ca-file`: PEM certificates.
pub fn read(path: &Path) -> Result<String, Error> {
    let error = |reason: String| Error::RootCa {
        path: path.display().to_string(),
        reason,
    };
    let pem = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
    if !pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err(error("no PEM certificate in it".into()));
    }
    Ok(pem)
}

/// Runs the publisher of `ca` until its watches end.
pub async fn run(client: Client, ca: String, shutdown: CancellationToken) {
    let results = per_namespace::<ConfigMap>(&client, ROOT_CA_CONFIG_MAP, &shutdown).run(
        |ns, ctx| async move {
            let work = publish(&ns, &ctx);
            reconciled(&*ns, &ctx, work).await
        },
        error_policy,
        Context::new(client, ca),
    );
    drive("root-ca-cert-publisher", results).await;
}

fn wanted_data(ca: &str) -> BTreeMap<String, String> {
    [("ca.crt".to_string(), ca.to_string())].into()
}

/// Creates the namespace's ConfigMap, or puts its data and description back.
async fn publish(ns: &Namespace, ctx: &Context<String>) -> Result<(), Error> {
    if !is_active(ns) {
        return Ok(());
    }
    let namespace = ns.name_any();
    let maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &namespace);
    let data = wanted_data(&ctx.config);
    let description = [(DESCRIPTION_ANNOTATION.to_string(), DESCRIPTION.to_string())];
    let result = match maps.get_opt(ROOT_CA_CONFIG_MAP).await? {
        None => {
            let map = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(ROOT_CA_CONFIG_MAP.into()),
                    annotations: Some(description.into()),
                    ..ObjectMeta::default()
                },
                data: Some(data),
                ..ConfigMap::default()
            };
            maps.create(&PostParams::default(), &map).await
        }
        Some(map)
            if map.data.as_ref() == Some(&data)
                && map
                    .annotations()
                    .get(DESCRIPTION_ANNOTATION)
                    .is_some_and(|d| !d.is_empty()) =>
        {
            return Ok(());
        }
        Some(mut map) => {
            map.data = Some(data);
            map.annotations_mut()
                .insert(DESCRIPTION_ANNOTATION.into(), DESCRIPTION.into());
            maps.replace(ROOT_CA_CONFIG_MAP, &PostParams::default(), &map)
                .await
        }
    };
    match result {
        Ok(_) => {
            info!(%namespace, "root-ca-cert-publisher: {ROOT_CA_CONFIG_MAP} written");
            Ok(())
        }
        // Changed or made meanwhile (409: its event brings it back), or the namespace is gone
        // (404) or terminating (403).
        Err(e) if matches!(api_code(&e), Some(403 | 404 | 409)) => {
            debug!(%namespace, "root-ca-cert-publisher: not written: {e}");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}
