//! The service account controller (kube-controller-manager's `serviceaccount`): every active
//! namespace has a `default` ServiceAccount, made again when it is deleted; terminating namespaces
//! are left alone. Its siblings, about the same credentials: [`token`] (`serviceaccount-token`)
//! and [`root_ca`] (`root-ca-cert-publisher`).

pub mod root_ca;
pub mod token;

use std::{
    collections::HashMap,
    fmt::Debug,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::{
    api::{ObjectMeta, PostParams},
    runtime::{
        controller::{self, Action},
        reflector::ObjectRef,
        watcher, Controller,
    },
    Api, Client, Resource, ResourceExt as _,
};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::metrics;

/// The service account every namespace gets.
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// Objects reconciled at once per controller (kube's `--concurrent-serviceaccount-syncs`,
/// `--concurrent-serviceaccount-token-syncs` and the publisher's workers all default to 5).
const CONCURRENT_SYNCS: u16 = 5;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error("the service account key {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("signing a service account token failed")]
    Signing,
    #[error("the root CA {path}: {reason}")]
    RootCa { path: String, reason: String },
}

/// The HTTP status of an API error, if `e` is one.
fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

/// Whether a namespace takes new objects: Active and not being deleted.
fn is_active(ns: &Namespace) -> bool {
    ns.metadata.deletion_timestamp.is_none()
        && ns
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_none_or(|p| p == "Active")
}

/// Per-object retry delays after failed reconciles, as client-go's rate-limited queue: 100 ms
/// doubling up to a minute, forgotten on success.
#[derive(Default)]
struct Retries(Mutex<HashMap<String, u32>>);

impl Retries {
    fn failed(&self, key: String) -> Duration {
        let mut failures = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = failures.entry(key).or_insert(0);
        *n = n.saturating_add(1);
        (Duration::from_millis(100) * (1u32 << (*n - 1).min(10))).min(Duration::from_secs(60))
    }

    fn forget(&self, key: &str) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }
}

/// What a controller's reconciles share: the client, retry delays and its own settings.
struct Context<T> {
    client: Client,
    retries: Retries,
    config: T,
}

impl<T> Context<T> {
    fn new(client: Client, config: T) -> Arc<Self> {
        Arc::new(Context {
            client,
            retries: Retries::default(),
            config,
        })
    }
}

fn retry_key<K: Resource>(object: &K) -> String {
    format!(
        "{}/{}",
        object.meta().namespace.as_deref().unwrap_or_default(),
        object.meta().name.as_deref().unwrap_or_default()
    )
}

/// Runs `work` for `object`: a success forgets its past failures.
async fn reconciled<K: Resource, T>(
    object: &K,
    ctx: &Context<T>,
    work: impl std::future::Future<Output = Result<(), Error>>,
) -> Result<Action, Error> {
    work.await?;
    ctx.retries.forget(&retry_key(object));
    Ok(Action::await_change())
}

fn error_policy<K: Resource, T>(object: Arc<K>, _: &Error, ctx: Arc<Context<T>>) -> Action {
    Action::requeue(ctx.retries.failed(retry_key(&*object)))
}

/// Consumes a controller's results until its watches end: each reconcile counts in
/// `seine_controller_syncs_total{controller}`, failures are logged (and retried by the policy).
async fn drive<K: Resource>(
    name: &'static str,
    results: impl Stream<
        Item = Result<(ObjectRef<K>, Action), controller::Error<Error, watcher::Error>>,
    >,
) where
    K::DynamicType: Debug,
{
    results
        .for_each(|result| async move {
            match result {
                Ok(_) => metrics::synced(name, true),
                Err(controller::Error::ReconcilerFailed(e, object)) => {
                    metrics::synced(name, false);
                    warn!(controller = name, %object, "{e}");
                }
                // Deleted before its turn came: nothing to do.
                Err(controller::Error::ObjectNotFound(object)) => {
                    debug!(controller = name, %object, "gone before it was reconciled")
                }
                Err(e) => warn!(controller = name, "{e}"),
            }
        })
        .await;
}

/// A controller of Namespaces that is also woken for a namespace when its object of kind `K`
/// named `name` changes or goes away.
fn per_namespace<K>(
    client: &Client,
    name: &str,
    shutdown: &CancellationToken,
) -> Controller<Namespace>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + 'static,
{
    Controller::new(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
    )
    .with_config(controller::Config::default().concurrency(CONCURRENT_SYNCS))
    .watches(
        Api::<K>::all(client.clone()),
        watcher::Config::default().fields(&format!("metadata.name={name}")),
        |object| object.namespace().map(|ns| ObjectRef::new(&ns)),
    )
    .graceful_shutdown_on(shutdown.clone().cancelled_owned())
}

/// Runs the service account controller until its watches end or `shutdown`, which lets the
/// syncs in flight finish.
pub async fn run(client: Client, shutdown: CancellationToken) {
    let results = per_namespace::<ServiceAccount>(&client, DEFAULT_SERVICE_ACCOUNT, &shutdown).run(
        |ns, ctx| async move {
            let work = ensure_default(&ns, &ctx);
            reconciled(&*ns, &ctx, work).await
        },
        error_policy,
        Context::new(client, ()),
    );
    drive("serviceaccount", results).await;
}

/// Creates the namespace's `default` ServiceAccount when it has none.
async fn ensure_default(ns: &Namespace, ctx: &Context<()>) -> Result<(), Error> {
    if !is_active(ns) {
        return Ok(());
    }
    let namespace = ns.name_any();
    let accounts: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), &namespace);
    if accounts.get_opt(DEFAULT_SERVICE_ACCOUNT).await?.is_some() {
        return Ok(());
    }
    let account = ServiceAccount {
        metadata: ObjectMeta {
            name: Some(DEFAULT_SERVICE_ACCOUNT.into()),
            ..ObjectMeta::default()
        },
        ..ServiceAccount::default()
    };
    match accounts.create(&PostParams::default(), &account).await {
        Ok(_) => {
            info!(%namespace, "serviceaccount: created the default service account");
            Ok(())
        }
        // Made meanwhile (409), or the namespace is gone (404) or terminating (403).
        Err(e) if matches!(api_code(&e), Some(403 | 404 | 409)) => {
            debug!(%namespace, "serviceaccount: not created: {e}");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::{api::core::v1::NamespaceStatus, apimachinery::pkg::apis::meta::v1::Time};

    #[test]
    fn only_active_namespaces_get_objects() {
        let mut ns = Namespace::default();
        assert!(is_active(&ns), "no phase yet: as Active");
        ns.status = Some(NamespaceStatus {
            phase: Some("Active".into()),
            ..NamespaceStatus::default()
        });
        assert!(is_active(&ns));
        ns.metadata.deletion_timestamp = Some(Time(Default::default()));
        assert!(!is_active(&ns));
        ns.metadata.deletion_timestamp = None;
        ns.status = Some(NamespaceStatus {
            phase: Some("Terminating".into()),
            ..NamespaceStatus::default()
        });
        assert!(!is_active(&ns));
    }

    #[test]
    fn retries_back_off_per_object_and_reset_on_success() {
        let retries = Retries::default();
        assert_eq!(retries.failed("a/x".into()), Duration::from_millis(100));
        assert_eq!(retries.failed("a/x".into()), Duration::from_millis(200));
        assert_eq!(retries.failed("a/y".into()), Duration::from_millis(100));
        for _ in 0..20 {
            retries.failed("a/x".into());
        }
        assert_eq!(retries.failed("a/x".into()), Duration::from_secs(60));
        retries.forget("a/x");
        assert_eq!(retries.failed("a/x".into()), Duration::from_millis(100));
    }
}
