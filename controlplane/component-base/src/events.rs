//! Events about objects, as client-go's recorder writes them (core/v1 Events, which
//! `kubectl describe` and `kubectl get events` show): a repeat of the same reason and message
//! about the same object bumps the first Event's count instead of writing another.

use std::{collections::HashMap, sync::Arc};

use k8s_openapi::{
    api::core::v1::{Event, EventSource, ObjectReference},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    jiff::Timestamp,
};
use kube::{
    api::{Patch, PatchParams, PostParams},
    Api, Client,
};
use tokio::sync::Mutex;
use tracing::warn;

/// How many distinct events a recorder remembers for aggregation.
const REMEMBERED: usize = 4096;

/// (object uid, reason, message): what makes an Event a repeat.
type EventKey = (String, String, String);

/// Records Events for one component (and host, for the kubelet). Cheap to clone.
#[derive(Clone)]
pub struct Recorder {
    client: Client,
    component: String,
    host: Option<String>,
    /// The Event written for a key, and its count.
    seen: Arc<Mutex<HashMap<EventKey, (String, i32)>>>,
}

impl Recorder {
    pub fn new(client: Client, component: &str, host: Option<String>) -> Self {
        Recorder {
            client,
            component: component.into(),
            host,
            seen: Default::default(),
        }
    }

    pub async fn normal(&self, object: &ObjectReference, reason: &str, message: &str) {
        self.record(object, "Normal", reason, message).await
    }

    pub async fn warning(&self, object: &ObjectReference, reason: &str, message: &str) {
        self.record(object, "Warning", reason, message).await
    }

    /// Writes the Event; a failure is only logged (events are best effort, as in Kubernetes).
    pub async fn record(&self, object: &ObjectReference, type_: &str, reason: &str, message: &str) {
        let namespace = object.namespace.clone().unwrap_or_else(|| "default".into());
        let api: Api<Event> = Api::namespaced(self.client.clone(), &namespace);
        let now = Timestamp::now();
        let key = (
            object
                .uid
                .clone()
                .unwrap_or_else(|| object.name.clone().unwrap_or_default()),
            reason.to_string(),
            message.to_string(),
        );
        let mut seen = self.seen.lock().await;
        if let Some((name, count)) = seen.get_mut(&key) {
            *count += 1;
            let patch = serde_json::json!({"count": *count, "lastTimestamp": Time(now)});
            match api
                .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => return,
                // Expired or removed: write a new one.
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => {
                    warn!(reason, "updating an event: {e}");
                    return;
                }
            }
        }
        let object_name = object.name.clone().unwrap_or_default();
        let event = Event {
            metadata: ObjectMeta {
                // client-go's names: the object's, then a unique suffix.
                name: Some(format!("{object_name}.{:016x}", rand::random::<u64>())),
                namespace: Some(namespace),
                ..Default::default()
            },
            involved_object: object.clone(),
            reason: Some(reason.into()),
            message: Some(message.into()),
            type_: Some(type_.into()),
            source: Some(EventSource {
                component: Some(self.component.clone()),
                host: self.host.clone(),
            }),
            reporting_component: Some(self.component.clone()),
            reporting_instance: self.host.clone(),
            first_timestamp: Some(Time(now)),
            last_timestamp: Some(Time(now)),
            count: Some(1),
            ..Default::default()
        };
        match api.create(&PostParams::default(), &event).await {
            Ok(created) => {
                if seen.len() >= REMEMBERED {
                    seen.clear();
                }
                seen.insert(key, (created.metadata.name.unwrap_or_default(), 1));
            }
            Err(e) => warn!(reason, "recording an event: {e}"),
        }
    }
}
