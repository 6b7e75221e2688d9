//! The namespace controller (kube-controller-manager's "namespace"): a deleted namespace stays
//! Terminating, held by the `kubernetes` entry of its `spec.finalizers`, until this controller has
//! deleted everything in it. Every namespaced type that discovery lists as deletable is emptied
//! (deletecollection, else one delete per object) and listed again; while anything is left the
//! namespace's conditions say what and the work is retried, and once nothing is left
//! `kubernetes` comes off through `namespaces/NAME/finalize`, so the API server deletes it.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{stream, StreamExt as _};
use k8s_openapi::{
    api::core::v1::{Namespace, NamespaceCondition},
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};
use kube::{
    api::{ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams},
    discovery::{Discovery, Scope},
    runtime::{
        controller::{Action, Config},
        watcher, Controller,
    },
    Api, Client, ResourceExt as _,
};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics;

/// The finalizer in `spec.finalizers` that this controller owns.
pub const FINALIZER: &str = "kubernetes";
/// Namespaces worked on at once (kube's `--concurrent-namespace-syncs` is 10).
const WORKERS: u16 = 5;
/// Resource types emptied at once within one namespace.
const TYPES_AT_ONCE: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    #[error(transparent)]
    Api(#[from] kube::Error),
    #[error("discovery failed: {0}")]
    Discovery(#[source] kube::Error),
}

pub struct Context {
    client: Client,
    /// Retries per namespace uid, for the delay before the next look.
    attempts: Mutex<HashMap<String, u32>>,
}

impl Context {
    /// 1 s doubling up to 30 s per consecutive retry of one namespace.
    fn next_delay(&self, uid: &str) -> Duration {
        let n = self
            .attempts
            .lock()
            .map(|mut a| {
                let n = a.entry(uid.to_string()).or_insert(0);
                *n += 1;
                *n
            })
            .unwrap_or(1);
        Duration::from_secs(1 << n.saturating_sub(1).min(5)).min(Duration::from_secs(30))
    }

    fn forget(&self, uid: &str) {
        if let Ok(mut a) = self.attempts.lock() {
            a.remove(uid);
        }
    }
}

/// Runs the controller until its watch ends.
pub async fn run(client: Client, shutdown: CancellationToken) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ctx = Arc::new(Context {
        client,
        attempts: Mutex::new(HashMap::new()),
    });
    Controller::new(namespaces, watcher::Config::default())
        .with_config(Config::default().concurrency(WORKERS))
        .graceful_shutdown_on(shutdown.cancelled_owned())
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!("namespace controller: {e}");
            }
        })
        .await;
}

fn error_policy(ns: Arc<Namespace>, error: &NamespaceError, ctx: Arc<Context>) -> Action {
    warn!(namespace = %ns.name_any(), "namespace controller: {error}");
    metrics::synced("namespace", false);
    Action::requeue(ctx.next_delay(ns.metadata.uid.as_deref().unwrap_or_default()))
}

/// One namespaced type to empty.
struct Kind {
    ar: ApiResource,
    deletecollection: bool,
}

/// What emptying a namespace left.
#[derive(Debug, Default, PartialEq)]
struct Content {
    /// Errors, one per type that could not be emptied or listed.
    failures: Vec<String>,
    /// Objects left, by resource (`pods`, `jobs.batch`).
    remaining: BTreeMap<String, usize>,
    /// Finalizers on what is left, by finalizer.
    finalizers: BTreeMap<String, usize>,
}

async fn reconcile(ns: Arc<Namespace>, ctx: Arc<Context>) -> Result<Action, NamespaceError> {
    if ns.metadata.deletion_timestamp.is_none() {
        return Ok(Action::await_change());
    }
    let api: Api<Namespace> = Api::all(ctx.client.clone());
    let name = ns.name_any();
    let Some(live) = api.get_opt(&name).await? else {
        // Gone: its retry count is no longer needed.
        if let Some(uid) = &ns.metadata.uid {
            ctx.forget(uid);
        }
        return Ok(Action::await_change());
    };
    let uid = live.metadata.uid.clone().unwrap_or_default();
    let ours = live
        .spec
        .as_ref()
        .and_then(|s| s.finalizers.as_ref())
        .is_some_and(|f| f.iter().any(|f| f == FINALIZER));
    if live.metadata.deletion_timestamp.is_none() || !ours {
        ctx.forget(&uid);
        return Ok(Action::await_change());
    }
    let kinds = match namespaced_kinds(&ctx.client).await {
        Ok(k) => k,
        Err(e) => {
            let message = format!("Discovery failed for some groups: {e}");
            set_conditions(&api, &live, Some(&message), &Content::default()).await?;
            return Err(NamespaceError::Discovery(e));
        }
    };
    let content = empty(&ctx.client, &name, kinds).await;
    set_conditions(&api, &live, None, &content).await?;
    if !content.failures.is_empty() || !content.remaining.is_empty() {
        info!(namespace = %name, remaining = ?content.remaining, failures = content.failures.len(), "namespace controller: content left, looking again");
        metrics::synced("namespace", content.failures.is_empty());
        return Ok(Action::requeue(ctx.next_delay(&uid)));
    }
    finalize(&api, &name).await?;
    ctx.forget(&uid);
    metrics::synced("namespace", true);
    info!(namespace = %name, "namespace controller: content deleted, namespace finalized");
    Ok(Action::await_change())
}

/// The namespaced types that can be listed and deleted (their preferred versions).
async fn namespaced_kinds(client: &Client) -> Result<Vec<Kind>, kube::Error> {
    let discovery = Discovery::new(client.clone()).run().await?;
    let mut kinds = Vec::new();
    for group in discovery.groups() {
        for (ar, caps) in group.recommended_resources() {
            let can = |verb: &str| caps.supports_operation(verb);
            if caps.scope != Scope::Namespaced || !can("list") || !can("delete") {
                continue;
            }
            kinds.push(Kind {
                deletecollection: can("deletecollection"),
                ar,
            });
        }
    }
    Ok(kinds)
}

/// A resource as kube names it in messages: `pods`, `jobs.batch`.
fn resource_name(ar: &ApiResource) -> String {
    if ar.group.is_empty() {
        ar.plural.clone()
    } else {
        format!("{}.{}", ar.plural, ar.group)
    }
}

/// Deletes everything in the namespace, then lists what is left.
async fn empty(client: &Client, namespace: &str, kinds: Vec<Kind>) -> Content {
    let results: Vec<(String, Result<Vec<DynamicObject>, kube::Error>)> = stream::iter(kinds)
        .map(|kind| {
            let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &kind.ar);
            async move { (resource_name(&kind.ar), empty_one(&api, &kind).await) }
        })
        .buffer_unordered(TYPES_AT_ONCE)
        .collect()
        .await;
    let mut content = Content::default();
    for (resource, result) in results {
        match result {
            Ok(left) if left.is_empty() => {}
            Ok(left) => {
                for object in &left {
                    for f in object.finalizers() {
                        *content.finalizers.entry(f.clone()).or_insert(0) += 1;
                    }
                }
                content.remaining.insert(resource, left.len());
            }
            Err(e) => content.failures.push(format!("{resource}: {e}")),
        }
    }
    content.failures.sort();
    content
}

/// Deletes every object of one type (in the background, as kube does), then lists what is left.
async fn empty_one(
    api: &Api<DynamicObject>,
    kind: &Kind,
) -> Result<Vec<DynamicObject>, kube::Error> {
    let params = DeleteParams::background();
    if kind.deletecollection {
        api.delete_collection(&params, &ListParams::default())
            .await?;
    } else {
        for object in api.list(&ListParams::default()).await? {
            match api.delete(&object.name_any(), &params).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(api.list(&ListParams::default()).await?.items)
}

/// kube's five deletion conditions: each True with what went wrong, or False when all is well.
fn conditions(
    discovery_failure: Option<&str>,
    content: &Content,
    previous: &[NamespaceCondition],
    now: Timestamp,
) -> Vec<NamespaceCondition> {
    let join = |parts: Vec<String>| parts.join(", ");
    let failure =
        |failed: bool, reason: &str, message: String| (failed, reason.to_string(), message);
    let states = [
        (
            "NamespaceDeletionDiscoveryFailure",
            match discovery_failure {
                Some(m) => failure(true, "DiscoveryFailed", m.to_string()),
                None => failure(
                    false,
                    "ResourcesDiscovered",
                    "All resources successfully discovered".into(),
                ),
            },
        ),
        (
            "NamespaceDeletionGroupVersionParsingFailure",
            failure(
                false,
                "ParsedGroupVersions",
                "All legacy kube types successfully parsed".into(),
            ),
        ),
        (
            "NamespaceDeletionContentFailure",
            if content.failures.is_empty() {
                failure(
                    false,
                    "ContentDeleted",
                    "All content successfully deleted, may be waiting on finalization".into(),
                )
            } else {
                failure(
                    true,
                    "ContentDeletionFailed",
                    format!(
                        "Failed to delete all resource types, {} remaining: {}",
                        content.failures.len(),
                        content.failures.join(", ")
                    ),
                )
            },
        ),
        (
            "NamespaceContentRemaining",
            if content.remaining.is_empty() {
                failure(
                    false,
                    "ContentRemoved",
                    "All content successfully removed".into(),
                )
            } else {
                failure(
                    true,
                    "SomeResourcesRemain",
                    format!(
                        "Some resources are remaining: {}",
                        join(
                            content
                                .remaining
                                .iter()
                                .map(|(r, n)| format!("{r} has {n} resource instances"))
                                .collect()
                        )
                    ),
                )
            },
        ),
        (
            "NamespaceFinalizersRemaining",
            if content.finalizers.is_empty() {
                failure(
                    false,
                    "ContentHasNoFinalizers",
                    "All content-preserving finalizers finished".into(),
                )
            } else {
                failure(
                    true,
                    "SomeFinalizersRemain",
                    format!(
                        "Some content in the namespace has finalizers remaining: {}",
                        join(
                            content
                                .finalizers
                                .iter()
                                .map(|(f, n)| format!("{f} in {n} resource instances"))
                                .collect()
                        )
                    ),
                )
            },
        ),
    ];
    states
        .into_iter()
        .map(|(kind, (failed, reason, message))| {
            let status = if failed { "True" } else { "False" };
            let before = previous.iter().find(|c| c.type_ == kind);
            let since = before
                .filter(|c| c.status == status)
                .and_then(|c| c.last_transition_time.clone())
                .unwrap_or(Time(now));
            NamespaceCondition {
                type_: kind.into(),
                status: status.into(),
                reason: Some(reason),
                message: Some(message),
                last_transition_time: Some(since),
            }
        })
        .collect()
}

/// Writes the deletion conditions when they changed (merge patch of the status: only this
/// controller writes them).
async fn set_conditions(
    api: &Api<Namespace>,
    ns: &Namespace,
    discovery_failure: Option<&str>,
    content: &Content,
) -> Result<(), kube::Error> {
    let previous = ns
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let next = conditions(discovery_failure, content, &previous, Timestamp::now());
    let same = |a: &NamespaceCondition, b: &NamespaceCondition| {
        a.type_ == b.type_ && a.status == b.status && a.reason == b.reason && a.message == b.message
    };
    let unchanged =
        previous.len() == next.len() && previous.iter().zip(&next).all(|(a, b)| same(a, b));
    if unchanged {
        return Ok(());
    }
    let patch = json!({"status": {"conditions": next}});
    match api
        .patch_status(
            &ns.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Takes `kubernetes` off spec.finalizers (`PUT namespaces/NAME/finalize`), reading the
/// namespace again so the write is at its current version.
async fn finalize(api: &Api<Namespace>, name: &str) -> Result<(), kube::Error> {
    let Some(mut ns) = api.get_opt(name).await? else {
        return Ok(());
    };
    if let Some(spec) = ns.spec.as_mut() {
        if let Some(f) = spec.finalizers.as_mut() {
            f.retain(|f| f != FINALIZER);
        }
    }
    match api
        .replace_subresource("finalize", name, &PostParams::default(), &ns)
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_say_what_is_left_and_keep_their_transition_time() {
        let t0 = Timestamp::from_second(100).unwrap();
        let t1 = Timestamp::from_second(200).unwrap();
        let mut content = Content::default();
        content.remaining.insert("configmaps".into(), 2);
        content.finalizers.insert("example.com/hold".into(), 1);
        let first = conditions(None, &content, &[], t0);
        assert_eq!(first.len(), 5);
        let remaining = first
            .iter()
            .find(|c| c.type_ == "NamespaceContentRemaining")
            .unwrap();
        assert_eq!(remaining.status, "True");
        assert_eq!(remaining.reason.as_deref(), Some("SomeResourcesRemain"));
        assert_eq!(
            remaining.message.as_deref(),
            Some("Some resources are remaining: configmaps has 2 resource instances")
        );
        let finalizers = first
            .iter()
            .find(|c| c.type_ == "NamespaceFinalizersRemaining")
            .unwrap();
        assert_eq!(
            finalizers.message.as_deref(),
            Some("Some content in the namespace has finalizers remaining: example.com/hold in 1 resource instances")
        );
        // Later, all gone: the changed conditions get a new transition time, the rest keep theirs.
        let second = conditions(None, &Content::default(), &first, t1);
        let remaining = second
            .iter()
            .find(|c| c.type_ == "NamespaceContentRemaining")
            .unwrap();
        assert_eq!(remaining.status, "False");
        assert_eq!(remaining.last_transition_time, Some(Time(t1)));
        let discovery = second
            .iter()
            .find(|c| c.type_ == "NamespaceDeletionDiscoveryFailure")
            .unwrap();
        assert_eq!(discovery.last_transition_time, Some(Time(t0)));
    }
}
