//! The `default/kubernetes` service's endpoints: the API servers that are up. Each server keeps
//! its address in etcd under a short lease (`/registry/masterleases/<ip>:<port>`), renewed every
//! 10 seconds and removed on shutdown; every server writes the Endpoints and EndpointSlice from
//! the addresses whose leases are alive, as kube-apiserver's lease reconciler does. A server that
//! dies without shutting down drops out when its lease expires (15 seconds).

use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use serde_json::{json, Value};
use tracing::warn;

use crate::api::{registry::meta, status::ApiError};
use crate::storage::{resource_version, ObjectKey, Storage, StorageError};

const PREFIX: &str = "/registry/masterleases/";
const TTL_SECONDS: i64 = 15;
pub const RENEW_EVERY: Duration = Duration::from_secs(10);

fn lease_key(address: SocketAddr) -> String {
    format!("{PREFIX}{address}")
}

/// Renews this server's lease and rewrites the endpoints from the live leases.
pub async fn reconcile(storage: &Storage, address: SocketAddr) -> Result<(), ApiError> {
    storage
        .put_with_ttl(&lease_key(address), &address.to_string(), TTL_SECONDS)
        .await?;
    write_endpoints(storage).await
}

/// Removes this server from the endpoints (at shutdown).
pub async fn withdraw(storage: &Storage, address: SocketAddr) -> Result<(), ApiError> {
    storage.delete_key(&lease_key(address)).await?;
    write_endpoints(storage).await
}

/// Keeps reconciling until the process ends.
pub async fn run(storage: Storage, address: SocketAddr) {
    let mut tick = tokio::time::interval(RENEW_EVERY);
    loop {
        tick.tick().await;
        if let Err(e) = reconcile(&storage, address).await {
            warn!("updating the kubernetes service's endpoints: {}", e.message);
        }
    }
}

async fn write_endpoints(storage: &Storage) -> Result<(), ApiError> {
    let live: BTreeSet<SocketAddr> = storage
        .values(PREFIX)
        .await?
        .into_iter()
        .filter_map(|(_, v)| v.parse().ok())
        .collect();
    // Endpoints: one subset per port (API servers normally share one).
    let ports: BTreeSet<u16> = live.iter().map(SocketAddr::port).collect();
    let subsets: Vec<Value> = ports
        .iter()
        .map(|port| {
            let addresses: Vec<Value> = live
                .iter()
                .filter(|a| a.port() == *port)
                .map(|a| json!({"ip": a.ip().to_string()}))
                .collect();
            json!({"addresses": addresses,
                   "ports": [{"name": "https", "port": port, "protocol": "TCP"}]})
        })
        .collect();
    upsert(
        storage,
        ObjectKey::new("endpoints", Some("default"), "kubernetes"),
        |endpoints| endpoints["subsets"] = Value::Array(subsets.clone()),
        json!({"apiVersion": "v1", "kind": "Endpoints",
               "metadata": {"name": "kubernetes", "namespace": "default",
                            "labels": {"endpointslice.kubernetes.io/skip-mirror": "true"}}}),
    )
    .await?;
    // The EndpointSlice carries one port: the most common one.
    let port = ports
        .iter()
        .max_by_key(|p| live.iter().filter(|a| a.port() == **p).count())
        .copied();
    let endpoints: Vec<Value> = live
        .iter()
        .filter(|a| Some(a.port()) == port)
        .map(|a| a.ip().to_string())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}}))
        .collect();
    let slice_ports: Vec<Value> = port
        .map(|p| json!({"name": "https", "port": p, "protocol": "TCP"}))
        .into_iter()
        .collect();
    upsert(
        storage,
        ObjectKey::new("endpointslices", Some("default"), "kubernetes"),
        |slice| {
            slice["endpoints"] = Value::Array(endpoints.clone());
            slice["ports"] = Value::Array(slice_ports.clone());
        },
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
               "metadata": {"name": "kubernetes", "namespace": "default",
                            "labels": {"kubernetes.io/service-name": "kubernetes",
                                       "endpointslice.kubernetes.io/managed-by": "endpointslicemirroring-controller.k8s.io"}}}),
    )
    .await
}

/// Creates or updates an object so that `set` holds, writing only when something changed.
async fn upsert(
    storage: &Storage,
    key: ObjectKey,
    set: impl Fn(&mut Value),
    empty: Value,
) -> Result<(), ApiError> {
    for _ in 0..5 {
        let current = match storage.get(&key).await {
            Ok(current) => Some(current),
            Err(StorageError::NotFound { .. }) => None,
            Err(e) => return Err(e.into()),
        };
        let mut object = current.clone().unwrap_or_else(|| {
            let mut o = empty.clone();
            o["metadata"]["uid"] = meta::uid().into();
            o["metadata"]["creationTimestamp"] = meta::now().into();
            o
        });
        set(&mut object);
        let written = match &current {
            Some(c) if *c == object => return Ok(()),
            Some(c) => {
                storage
                    .update(&key, object, Some(resource_version(c)))
                    .await
            }
            None => storage.create(&key, object).await,
        };
        match written {
            Ok(_) => return Ok(()),
            Err(StorageError::Conflict { .. } | StorageError::AlreadyExists { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::conflict(format!(
        "the kubernetes service's {} kept changing",
        key.resource
    )))
}
