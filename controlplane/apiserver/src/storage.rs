//! Object storage on etcd, with Kubernetes' key layout and concurrency rules: objects live at
//! `/registry/<resource>/<namespace>/<name>` (cluster-scoped: `/registry/<resource>/<name>`), their
//! `metadata.resourceVersion` is the etcd revision that last wrote them, a create fails if the key
//! exists, and an update or delete that names a resourceVersion succeeds only if nothing wrote the
//! object since — each one etcd transaction, so two API servers on one etcd agree.

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp, TxnOpResponse,
    WatchOptions, WatchStream,
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
    #[error("already allocated: {}", .0.join(", "))]
    Claimed(Vec<String>),
    #[error("revision {0} has been compacted")]
    Compacted(i64),
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
    /// The etcd key of each item.
    pub keys: Vec<String>,
    pub revision: i64,
    /// The key to continue from (exclusive), when `limit` cut the list.
    pub continue_after: Option<String>,
}

#[derive(Clone)]
pub struct Storage {
    client: Client,
    /// Tries per request: a request that could not reach one member (connection refused) is
    /// sent again, and the client's balancer picks another member.
    attempts: usize,
}

/// Whether an etcd error means the request never reached a member (so sending it again cannot
/// apply it twice).
fn not_sent(e: &etcd_client::Error) -> bool {
    let text = e.to_string();
    text.contains("tcp connect error") || text.contains("Connection refused")
}

impl Storage {
    pub async fn connect(endpoints: &[String]) -> Result<Self, StorageError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5));
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(unavailable)?;
        Ok(Storage {
            client,
            attempts: 2 * endpoints.len().max(1),
        })
    }

    async fn txn(&self, txn: Txn) -> Result<etcd_client::TxnResponse, etcd_client::Error> {
        let mut result = self.client.clone().txn(txn.clone()).await;
        for _ in 1..self.attempts {
            match &result {
                Err(e) if not_sent(e) => result = self.client.clone().txn(txn.clone()).await,
                _ => break,
            }
        }
        result
    }

    async fn range(
        &self,
        key: &str,
        options: Option<GetOptions>,
    ) -> Result<etcd_client::GetResponse, etcd_client::Error> {
        let mut result = self.client.clone().get(key, options.clone()).await;
        for _ in 1..self.attempts {
            match &result {
                Err(e) if not_sent(e) => {
                    result = self.client.clone().get(key, options.clone()).await
                }
                _ => break,
            }
        }
        result
    }

    /// Whether etcd answers now (for /readyz).
    pub async fn healthy(&self) -> bool {
        // A quorum read: answered only when the cluster has a leader.
        let read = self.range("/registry/", Some(GetOptions::new().with_count_only()));
        tokio::time::timeout(Duration::from_secs(2), read)
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Stores a new object; fails if one exists at the key. Returns it with its resourceVersion.
    pub async fn create(&self, key: &ObjectKey, object: Value) -> Result<Value, StorageError> {
        self.create_with(key, object, &Claims::default()).await
    }

    /// Stores a new object and, in the same transaction, claims keys that must not exist yet
    /// (an allocated IP or port) and releases others.
    pub async fn create_with(
        &self,
        key: &ObjectKey,
        mut object: Value,
        claims: &Claims,
    ) -> Result<Value, StorageError> {
        let etcd_key = key.etcd_key();
        strip_resource_version(&mut object);
        let body = object.to_string();
        let mut guards = vec![Compare::create_revision(
            etcd_key.as_str(),
            CompareOp::Equal,
            0,
        )];
        guards.extend(claims.guards());
        let mut ops = vec![TxnOp::put(etcd_key.as_str(), body, None)];
        ops.extend(claims.ops());
        let mut checks = vec![TxnOp::get(etcd_key.as_str(), None)];
        checks.extend(claims.checks());
        let txn = Txn::new().when(guards).and_then(ops).or_else(checks);
        let resp = self.txn(txn).await.map_err(unavailable)?;
        if !resp.succeeded() {
            let found = found_keys(&resp.op_responses());
            if found.contains(&etcd_key) {
                return Err(StorageError::AlreadyExists {
                    resource: key.resource.clone(),
                    name: key.name.clone(),
                });
            }
            return Err(StorageError::Claimed(found));
        }
        let revision = resp.header().map_or(0, |h| h.revision());
        set_resource_version(&mut object, revision);
        Ok(object)
    }

    pub async fn get(&self, key: &ObjectKey) -> Result<Value, StorageError> {
        let etcd_key = key.etcd_key();
        let resp = self
            .range(etcd_key.as_str(), None)
            .await
            .map_err(unavailable)?;
        let kv = resp.kvs().first().ok_or_else(|| StorageError::NotFound {
            resource: key.resource.clone(),
            name: key.name.clone(),
        })?;
        decode(&etcd_key, kv.value(), kv.mod_revision())
    }

    /// Objects under `prefix` in key order, at most `limit` (0: all), starting after `after`, at
    /// `revision` (a consistent continuation of an earlier page) or the latest one. Read from etcd
    /// in chunks, so that a large list never exceeds a gRPC message.
    pub async fn list(
        &self,
        prefix: &str,
        limit: i64,
        after: Option<&str>,
        revision: Option<i64>,
    ) -> Result<ListPage, StorageError> {
        const CHUNK: i64 = 500;
        let end = prefix_end(prefix);
        let mut start = match after {
            // The smallest key greater than `after`.
            Some(after) => format!("{after}\0"),
            None => prefix.to_string(),
        };
        let mut revision = revision.unwrap_or(0);
        let mut items = Vec::new();
        let mut keys = Vec::new();
        let mut last_key = None;
        loop {
            let want = if limit > 0 {
                CHUNK.min(limit - items.len() as i64)
            } else {
                CHUNK
            };
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(want);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let resp = self
                .range(start.as_str(), Some(options))
                .await
                .map_err(|e| match e.to_string() {
                    m if m.contains("required revision has been compacted") => {
                        StorageError::Compacted(revision)
                    }
                    _ => unavailable(e),
                })?;
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
            }
            for kv in resp.kvs() {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                items.push(decode(&key, kv.value(), kv.mod_revision())?);
                keys.push(key.clone());
                last_key = Some(key);
            }
            let more = resp.more();
            if !more {
                return Ok(ListPage {
                    items,
                    keys,
                    revision,
                    continue_after: None,
                });
            }
            if limit > 0 && items.len() as i64 >= limit {
                return Ok(ListPage {
                    items,
                    keys,
                    revision,
                    continue_after: last_key,
                });
            }
            match &last_key {
                Some(key) => start = format!("{key}\0"),
                None => {
                    return Ok(ListPage {
                        items,
                        keys,
                        revision,
                        continue_after: None,
                    })
                }
            }
        }
    }

    /// Replaces an existing object. With `expected_revision`, only if the object is still at that
    /// revision (optimistic concurrency); without, unconditionally.
    pub async fn update(
        &self,
        key: &ObjectKey,
        object: Value,
        expected_revision: Option<i64>,
    ) -> Result<Value, StorageError> {
        self.update_with(key, object, expected_revision, &Claims::default())
            .await
    }

    /// `update`, claiming and releasing keys in the same transaction.
    pub async fn update_with(
        &self,
        key: &ObjectKey,
        mut object: Value,
        expected_revision: Option<i64>,
        claims: &Claims,
    ) -> Result<Value, StorageError> {
        let etcd_key = key.etcd_key();
        strip_resource_version(&mut object);
        let put = TxnOp::put(etcd_key.as_str(), object.to_string(), None);
        let resp = self
            .guarded_write(key, expected_revision, put, claims)
            .await?;
        set_resource_version(&mut object, resp.header().map_or(0, |h| h.revision()));
        Ok(object)
    }

    /// Deletes an object (only at `expected_revision`, when given); returns it as it was.
    pub async fn delete(
        &self,
        key: &ObjectKey,
        expected_revision: Option<i64>,
    ) -> Result<Value, StorageError> {
        self.delete_with(key, expected_revision, &Claims::default())
            .await
    }

    /// `delete`, releasing (and claiming) keys in the same transaction. The object as it was
    /// comes back from the same transaction, at the revision that deleted it.
    pub async fn delete_with(
        &self,
        key: &ObjectKey,
        expected_revision: Option<i64>,
        claims: &Claims,
    ) -> Result<Value, StorageError> {
        let etcd_key = key.etcd_key();
        let delete = TxnOp::delete(
            etcd_key.as_str(),
            Some(etcd_client::DeleteOptions::new().with_prev_key()),
        );
        let resp = self
            .guarded_write(key, expected_revision, delete, claims)
            .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let previous = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Delete(d) => d.prev_kvs().first().map(|kv| kv.value().to_vec()),
            _ => None,
        });
        match previous {
            Some(bytes) => decode(&etcd_key, &bytes, revision),
            None => Err(StorageError::NotFound {
                resource: key.resource.clone(),
                name: key.name.clone(),
            }),
        }
    }

    /// One write to an existing object (`op`), with the claims, in a transaction that holds only
    /// while the object is at `expected_revision` (or, without one, exists).
    async fn guarded_write(
        &self,
        key: &ObjectKey,
        expected_revision: Option<i64>,
        op: TxnOp,
        claims: &Claims,
    ) -> Result<etcd_client::TxnResponse, StorageError> {
        let etcd_key = key.etcd_key();
        let mut guards = vec![match expected_revision {
            Some(rev) => Compare::mod_revision(etcd_key.as_str(), CompareOp::Equal, rev),
            None => Compare::create_revision(etcd_key.as_str(), CompareOp::Greater, 0),
        }];
        guards.extend(claims.guards());
        let mut ops = vec![op];
        ops.extend(claims.ops());
        let txn = Txn::new()
            .when(guards)
            .and_then(ops)
            .or_else([TxnOp::get(etcd_key.as_str(), None)]);
        let resp = self.txn(txn).await.map_err(unavailable)?;
        if !resp.succeeded() {
            return Err(self
                .explain_failure(key, expected_revision, &resp, claims)
                .await);
        }
        Ok(resp)
    }

    /// Which guard of a failed write did not hold: the object is gone, it changed, or a claimed
    /// key is taken.
    async fn explain_failure(
        &self,
        key: &ObjectKey,
        expected_revision: Option<i64>,
        resp: &etcd_client::TxnResponse,
        claims: &Claims,
    ) -> StorageError {
        let current = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.mod_revision()),
            _ => None,
        });
        match current {
            None => StorageError::NotFound {
                resource: key.resource.clone(),
                name: key.name.clone(),
            },
            Some(rev) if expected_revision.is_some_and(|e| e != rev) => StorageError::Conflict {
                resource: key.resource.clone(),
                name: key.name.clone(),
            },
            Some(_) => {
                let mut taken = Vec::new();
                for claim in &claims.claim {
                    if let Ok(resp) = self.range(claim.0.as_str(), None).await {
                        if !resp.kvs().is_empty() {
                            taken.push(claim.0.clone());
                        }
                    }
                }
                if taken.is_empty() {
                    // Nothing explains it any more: the state moved on; the caller retries.
                    StorageError::Conflict {
                        resource: key.resource.clone(),
                        name: key.name.clone(),
                    }
                } else {
                    StorageError::Claimed(taken)
                }
            }
        }
    }

    /// Puts `value` at `key` under a new etcd lease of `ttl` seconds: the key goes when nobody
    /// renews it (renewing is putting it again).
    pub async fn put_with_ttl(&self, key: &str, value: &str, ttl: i64) -> Result<(), StorageError> {
        let mut client = self.client.clone();
        let lease = client.lease_grant(ttl, None).await.map_err(unavailable)?;
        let options = etcd_client::PutOptions::new().with_lease(lease.id());
        client
            .put(key, value, Some(options))
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Deletes `key` (whatever its revision).
    pub async fn delete_key(&self, key: &str) -> Result<(), StorageError> {
        self.client
            .clone()
            .delete(key, None)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// The values under `prefix`, by key.
    pub async fn values(&self, prefix: &str) -> Result<Vec<(String, String)>, StorageError> {
        let options = GetOptions::new().with_range(prefix_end(prefix));
        let resp = self
            .range(prefix, Some(options))
            .await
            .map_err(unavailable)?;
        Ok(resp
            .kvs()
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    String::from_utf8_lossy(kv.value()).into_owned(),
                )
            })
            .collect())
    }

    /// Which keys under `prefix` exist (keys only).
    pub async fn keys(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        let options = GetOptions::new()
            .with_range(prefix_end(prefix))
            .with_keys_only();
        let resp = self
            .range(prefix, Some(options))
            .await
            .map_err(unavailable)?;
        Ok(resp
            .kvs()
            .iter()
            .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
            .collect())
    }

    /// The revision etcd is at now.
    pub async fn current_revision(&self) -> Result<i64, StorageError> {
        let resp = self
            .range("/registry/", Some(GetOptions::new().with_count_only()))
            .await
            .map_err(unavailable)?;
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    /// An etcd watch on every key under `prefix` from `start_revision` (inclusive), with progress
    /// notifications.
    pub async fn watch_prefix(
        &self,
        prefix: &str,
        start_revision: i64,
    ) -> Result<WatchStream, StorageError> {
        let options = WatchOptions::new()
            .with_range(prefix_end(prefix))
            .with_start_revision(start_revision)
            .with_progress_notify();
        self.client
            .clone()
            .watch(prefix, Some(options))
            .await
            .map_err(unavailable)
    }
}

/// Keys written with an object in one transaction: claimed keys must not exist and are created
/// with a value (the owner); released keys are deleted.
#[derive(Debug, Default, Clone)]
pub struct Claims {
    pub claim: Vec<(String, String)>,
    pub release: Vec<String>,
}

impl Claims {
    pub fn is_empty(&self) -> bool {
        self.claim.is_empty() && self.release.is_empty()
    }

    fn guards(&self) -> Vec<Compare> {
        self.claim
            .iter()
            .map(|(k, _)| Compare::create_revision(k.as_str(), CompareOp::Equal, 0))
            .collect()
    }

    fn ops(&self) -> Vec<TxnOp> {
        let mut ops: Vec<TxnOp> = self
            .claim
            .iter()
            .map(|(k, v)| TxnOp::put(k.as_str(), v.as_str(), None))
            .collect();
        ops.extend(self.release.iter().map(|k| TxnOp::delete(k.as_str(), None)));
        ops
    }

    fn checks(&self) -> Vec<TxnOp> {
        self.claim
            .iter()
            .map(|(k, _)| TxnOp::get(k.as_str(), None))
            .collect()
    }
}

/// The keys that exist among the Get results of a failed transaction.
fn found_keys(responses: &[TxnOpResponse]) -> Vec<String> {
    responses
        .iter()
        .filter_map(|r| match r {
            TxnOpResponse::Get(get) => get
                .kvs()
                .first()
                .map(|kv| String::from_utf8_lossy(kv.key()).into_owned()),
            _ => None,
        })
        .collect()
}

fn unavailable(e: etcd_client::Error) -> StorageError {
    StorageError::Unavailable(e.to_string())
}

pub fn decode(key: &str, bytes: &[u8], mod_revision: i64) -> Result<Value, StorageError> {
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
