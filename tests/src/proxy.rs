//! seine-agent as the node's service proxy, on the API: a real etcd and seine-apiserver, one
//! node namespace with a client pod and backend pods, and the agent reaching the API server
//! through a relay in its namespace (as a node reaches its control plane). Services and their
//! EndpointSlices are written through the API, as a user or a controller writes them; slices
//! are managed by hand (`endpointslice.kubernetes.io/managed-by` is the test's), since no
//! kubelet runs the backend pods.

use std::time::Duration;

use anyhow::{bail, Result};
use serde_json::{json, Value};

use crate::{apiserver::ApiServer, cni::Relay, etcd::Etcd, topology, wait_until, Node};

/// The manager the test's EndpointSlices name, so that the EndpointSlice controller (when one
/// runs) leaves them alone.
pub const MANAGED_BY: &str = "seine-tests";

pub struct ProxyLab {
    pub node: Node,
    pub api: ApiServer,
    _relay: Relay,
    pub etcd: Etcd,
}

impl ProxyLab {
    /// A node with `backends` backend pods serving on `port`, and its agent in `mode` on the
    /// API, as node `node-1`.
    pub fn start(
        tag: &str,
        backends: usize,
        port: u16,
        mode: &str,
        extra: &[&str],
    ) -> Result<Self> {
        let etcd = Etcd::start()?;
        let api = ApiServer::start(&etcd)?;
        let mut node = topology(tag, backends, port)?;
        let (code, body) = api.post(
            "/api/v1/nodes",
            &json!({"metadata": {"name": "node-1",
                                 "labels": {"topology.kubernetes.io/zone": "zone-a"}}}),
        )?;
        if code != 201 {
            bail!("creating the Node: {code} {body}");
        }
        let relay = Relay::start(&node.ns, api.addr.port())?;
        node.services_from_api = true;
        let kubeconfig = api.kubeconfig.display().to_string();
        let mut args = vec![
            "--datapath",
            mode,
            "--kubeconfig",
            &kubeconfig,
            "--node-name",
            "node-1",
            "--no-pod-network",
        ];
        args.extend(extra);
        node.start_agent(&args)?;
        Ok(ProxyLab {
            node,
            api,
            _relay: relay,
            etcd,
        })
    }

    /// Creates or replaces an object at `collection` (a POST, else a PUT of `name`).
    pub fn apply(&self, collection: &str, object: Value) -> Result<Value> {
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let (code, body) = self.api.post(collection, &object)?;
        if code == 201 {
            return Ok(body);
        }
        if code != 409 {
            bail!("creating {collection}/{name}: {code} {body}");
        }
        let path = format!("{collection}/{name}");
        let (_, current) = self.api.get(&path)?;
        let mut object = object;
        object["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"].clone();
        if object.get("spec").is_some() && current["spec"].get("clusterIP").is_some() {
            // A Service keeps its cluster IPs.
            for field in ["clusterIP", "clusterIPs"] {
                if object["spec"].get(field).is_none() {
                    object["spec"][field] = current["spec"][field].clone();
                }
            }
        }
        let (code, body) = self.api.put(&path, &object)?;
        if code != 200 {
            bail!("replacing {path}: {code} {body}");
        }
        Ok(body)
    }

    /// A Service without a selector in `default`.
    pub fn service(&self, name: &str, spec: Value) -> Result<Value> {
        self.apply(
            "/api/v1/namespaces/default/services",
            json!({"apiVersion": "v1", "kind": "Service",
                   "metadata": {"name": name, "namespace": "default"}, "spec": spec}),
        )
    }

    /// An EndpointSlice of Service `service` with `endpoints` (JSON endpoint objects) on `ports`.
    pub fn slice(
        &self,
        name: &str,
        service: &str,
        ports: Value,
        endpoints: Value,
    ) -> Result<Value> {
        self.apply(
            "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices",
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                   "metadata": {"name": name, "namespace": "default",
                                "labels": {"kubernetes.io/service-name": service,
                                           "endpointslice.kubernetes.io/managed-by": MANAGED_BY}},
                   "addressType": "IPv4", "ports": ports, "endpoints": endpoints}),
        )
    }

    /// A ready endpoint of backend pod `pod`, on node `node-1` unless said.
    pub fn endpoint(&self, pod: &str) -> Value {
        json!({"addresses": [self.node.pod(pod).ip.to_string()],
               "conditions": {"ready": true, "serving": true, "terminating": false},
               "nodeName": "node-1"})
    }

    pub fn delete(&self, path: &str) -> Result<()> {
        let (code, body) = self.api.delete(path, None)?;
        if code != 200 && code != 404 {
            bail!("deleting {path}: {code} {body}");
        }
        Ok(())
    }

    /// The value of the agent's metric line `name` (with its labels), if it has one.
    pub fn metric(&self, name: &str) -> Option<f64> {
        let text = self.node.metrics().ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    }

    /// Waits until the datapath holds `frontends` service frontends.
    pub fn wait_frontends(&self, frontends: usize) -> Result<()> {
        wait_until(Duration::from_secs(30), || {
            self.metric("seine_services") == Some(frontends as f64)
        })
        .map_err(|_| {
            anyhow::anyhow!(
                "the datapath holds {:?} frontends, not {frontends}:\n{}",
                self.metric("seine_services"),
                self.node
                    .agent
                    .as_ref()
                    .map(|a| a.log_text())
                    .unwrap_or_default()
            )
        })
    }
}
