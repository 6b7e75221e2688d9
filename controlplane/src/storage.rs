//! Object storage on etcd, with Kubernetes' key layout and concurrency rules: objects live at
//! `/registry/<resource>/<namespace>/<name>` (cluster-scoped: `/registry/<resource>/<name>`), their
//! `metadata.resourceVersion` is the etcd revision that last wrote them, a create fails if the key
//! exists, and an update or delete that names a resourceVersion succeeds only if nothing wrote the
//! object since — each one etcd transaction, so two API servers on one etcd agree.

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp, TxnOpResponse,
};
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{resource} {name:?} already exists")]
    AlreadyExists { resource: String, name: String },
    #[error("{resource} {name:?} not found")]
    NotFound { resource: String, name: String },
    #[error(
        "Operation cannot be fulfilled on {resource} {name:?}: the object has been modified; \
         please apply your changes to the latest version and try again"
    )]
    Conflict { resource: String, name: String },
    #[error("etcd is unavailable: {0}")]
    Unavailable(String),
    #[error("stored object at {key} is not valid JSON: {message}")]
    Corrupt { key: String, message: String },
}

/// Where an object lives: its resource (plural, with group for non-core: `deployments.apps`),
/// namespace (none for cluster-scoped resources) and name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectKey {
    pub resource: String,
    pub namespace: Option<String>,
    pub name: String,
}

impl ObjectKey {
    pub fn new(resource: &str, namespace: Option<&str>, name: &str) -> Self {
        ObjectKey {
            resource: resource.to_string(),
            namespace: namespace.map(str::to_string),
            name: name.to_string(),
        }
    }

    pub fn etcd_key(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("/registry/{}/{ns}/{}", self.resource, self.name),
            None => format!("/registry/{}/{}", self.resource, self.name),
        }
    }
}

/// The prefix that lists a resource, in one namespace or in all.
pub fn list_prefix(resource: &str, namespace: Option<&str>) -> String {
    match namespace {
        Some(ns) => format!("/registry/{resource}/{ns}/"),
        None => format!("/registry/{resource}/"),
    }
}

/// A page of a list: the objects, the revision the list was read at, and where to go on.
#[derive(Debug)]
pub struct ListPage {
    pub items: Vec<Value>,
    pub revision: i64,
    /// The key to continue from (exclusive), when `limit` cut the list.
    pub continue_after: Option<String>,
}

#[derive(Clone)]
pub struct Storage {
    client: Client,
}

impl Storage {
    pub async fn connect(endpoints: &[String]) -> Result<Self, StorageError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5));
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(unavailable)?;
        Ok(Storage { client })
    }

    /// Whether etcd answers now (for /readyz).
    pub async fn healthy(&self) -> bool {
        let mut client = self.client.clone();
        tokio::time::timeout(Duration::from_secs(2), client.status())
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Stores a new object; fails if one exists at the key. Returns it with its resourceVersion.
    pub async fn create(&self, key: &ObjectKey, mut object: Value) -> Result<Value, StorageError> {
        let etcd_key = key.etcd_key();
        strip_resource_version(&mut object);
        let body = object.to_string();
        let txn = Txn::new()
            .when([Compare::create_revision(
                etcd_key.as_str(),
                CompareOp::Equal,
                0,
            )])
            .and_then([TxnOp::put(etcd_key.as_str(), body, None)]);
        let resp = self.client.clone().txn(txn).await.map_err(unavailable)?;
        if !resp.succeeded() {
            return Err(StorageError::AlreadyExists {
                resource: key.resource.clone(),
                name: key.name.clone(),
            });
        }
        let revision = resp.header().map_or(0, |h| h.revision());
        set_resource_version(&mut object, revision);
        Ok(object)
    }

    pub async fn get(&self, key: &ObjectKey) -> Result<Value, StorageError> {
        let etcd_key = key.etcd_key();
        let resp = self
            .client
            .clone()
            .get(etcd_key.as_str(), None)
            .await
            .map_err(unavailable)?;
        let kv = resp.kvs().first().ok_or_else(|| StorageError::NotFound {
            resource: key.resource.clone(),
            name: key.name.clone(),
        })?;
        decode(&etcd_key, kv.value(), kv.mod_revision())
    }

    /// Objects under `prefix` in key order, at most `limit` (0: all), starting after `after`.
    pub async fn list(
        &self,
        prefix: &str,
        limit: i64,
        after: Option<&str>,
    ) -> Result<ListPage, StorageError> {
        let start = match after {
            // The smallest key greater than `after`.
            Some(after) => format!("{after}\0"),
            None => prefix.to_string(),
        };
        let mut options = GetOptions::new().with_range(prefix_end(prefix));
        if limit > 0 {
            options = options.with_limit(limit);
        }
        let resp = self
            .client
            .clone()
            .get(start.as_str(), Some(options))
            .await
            .map_err(unavailable)?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let mut items = Vec::with_capacity(resp.kvs().len());
        let mut last_key = None;
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            items.push(decode(&key, kv.value(), kv.mod_revision())?);
            last_key = Some(key);
        }
        Ok(ListPage {
            items,
            revision,
            continue_after: if resp.more() { last_key } else { None },
        })
    }

    /// Replaces an existing object. With `expected_revision`, only if the object is still at that
    /// revision (optimistic concurrency); without, unconditionally.
    pub async fn update(
        &self,
        key: &ObjectKey,
        mut object: Value,
        expected_revision: Option<i64>,
    ) -> Result<Value, StorageError> {
        let etcd_key = key.etcd_key();
        strip_resource_version(&mut object);
        let body = object.to_string();
        let guard = match expected_revision {
            Some(rev) => Compare::mod_revision(etcd_key.as_str(), CompareOp::Equal, rev),
            None => Compare::create_revision(etcd_key.as_str(), CompareOp::Greater, 0),
        };
        let txn = Txn::new()
            .when([guard])
            .and_then([TxnOp::put(etcd_key.as_str(), body, None)])
            .or_else([TxnOp::get(etcd_key.as_str(), None)]);
        let resp = self.client.clone().txn(txn).await.map_err(unavailable)?;
        if !resp.succeeded() {
            return Err(self.explain_failure(key, &resp.op_responses()));
        }
        let revision = resp.header().map_or(0, |h| h.revision());
        set_resource_version(&mut object, revision);
        Ok(object)
    }

    /// Deletes an object (only at `expected_revision`, when given); returns it as it was.
    pub async fn delete(
        &self,
        key: &ObjectKey,
        expected_revision: Option<i64>,
    ) -> Result<Value, StorageError> {
        let etcd_key = key.etcd_key();
        let current = self.get(key).await?;
        let revision = expected_revision.unwrap_or_else(|| resource_version(&current));
        let txn = Txn::new()
            .when([Compare::mod_revision(
                etcd_key.as_str(),
                CompareOp::Equal,
                revision,
            )])
            .and_then([TxnOp::delete(etcd_key.as_str(), None)])
            .or_else([TxnOp::get(etcd_key.as_str(), None)]);
        let resp = self.client.clone().txn(txn).await.map_err(unavailable)?;
        if !resp.succeeded() {
            return Err(self.explain_failure(key, &resp.op_responses()));
        }
        Ok(current)
    }

    fn explain_failure(&self, key: &ObjectKey, responses: &[TxnOpResponse]) -> StorageError {
        let exists = responses.iter().any(|r| match r {
            TxnOpResponse::Get(get) => !get.kvs().is_empty(),
            _ => false,
        });
        if exists {
            StorageError::Conflict {
                resource: key.resource.clone(),
                name: key.name.clone(),
            }
        } else {
            StorageError::NotFound {
                resource: key.resource.clone(),
                name: key.name.clone(),
            }
        }
    }
}

fn unavailable(e: etcd_client::Error) -> StorageError {
    StorageError::Unavailable(e.to_string())
}

fn decode(key: &str, bytes: &[u8], mod_revision: i64) -> Result<Value, StorageError> {
    let mut object: Value = serde_json::from_slice(bytes).map_err(|e| StorageError::Corrupt {
        key: key.to_string(),
        message: e.to_string(),
    })?;
    set_resource_version(&mut object, mod_revision);
    Ok(object)
}

/// The resourceVersion is the etcd revision, never part of the stored bytes.
fn strip_resource_version(object: &mut Value) {
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("resourceVersion");
    }
}

fn set_resource_version(object: &mut Value, revision: i64) {
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("resourceVersion".into(), revision.to_string().into());
    }
}

/// An object's resourceVersion as a revision (0 when absent or not a number).
pub fn resource_version(object: &Value) -> i64 {
    object["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The end of the key range that holds every key starting with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_kubernetes_layout() {
        assert_eq!(
            ObjectKey::new("services", Some("default"), "web").etcd_key(),
            "/registry/services/default/web"
        );
        assert_eq!(
            ObjectKey::new("namespaces", None, "kube-system").etcd_key(),
            "/registry/namespaces/kube-system"
        );
        assert_eq!(list_prefix("pods", Some("a")), "/registry/pods/a/");
    }

    #[test]
    fn the_prefix_range_ends_just_past_the_prefix() {
        assert_eq!(prefix_end("/registry/pods/"), b"/registry/pods0".to_vec());
    }

    #[test]
    fn resource_versions_are_not_stored() {
        let mut o = serde_json::json!({"metadata": {"name": "a", "resourceVersion": "7"}});
        strip_resource_version(&mut o);
        assert!(o["metadata"].get("resourceVersion").is_none());
        set_resource_version(&mut o, 9);
        assert_eq!(resource_version(&o), 9);
    }
}
