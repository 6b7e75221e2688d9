//! The Node object of this kubelet: registration (or adoption of a Node that exists), its status
//! (addresses, capacity, allocatable, nodeInfo, the Ready and pressure conditions) and its
//! heartbeat Lease in `kube-node-lease`, as the kubelet's node status manager keeps them.

use std::{collections::BTreeMap, time::Duration};

use anyhow::Context as _;
use k8s_openapi::{
    api::{
        coordination::v1::{Lease, LeaseSpec},
        core::v1::{Node, NodeAddress, NodeCondition, NodeStatus, NodeSystemInfo},
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference, Time},
    },
    jiff::Timestamp,
};
use kube::{
    api::{Patch, PatchParams, PostParams},
    Api, Client,
};
use serde_json::json;
use tracing::{info, warn};

use crate::{
    cri::{RuntimeHealth, RuntimeVersion},
    eviction::Pressure,
    machine::{self, Capacity, Identity},
    Config,
};

pub const LEASE_NAMESPACE: &str = "kube-node-lease";
/// The kubelet's default `nodeLeaseDurationSeconds`.
const LEASE_DURATION_SECONDS: i32 = 40;

/// The kubelet's labels of its own Node.
pub fn labels(config: &Config) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([
        ("kubernetes.io/hostname".into(), config.node_name.clone()),
        ("kubernetes.io/os".into(), "linux".into()),
        ("kubernetes.io/arch".into(), machine::go_arch().into()),
        ("beta.kubernetes.io/os".into(), "linux".into()),
        ("beta.kubernetes.io/arch".into(), machine::go_arch().into()),
    ]);
    labels.extend(config.node_labels.clone());
    labels
}

/// Registers the Node, or takes over one that exists (another kubelet run, or created by hand):
/// its labels are brought to this kubelet's, its spec is kept.
pub async fn register(client: &Client, config: &Config) -> anyhow::Result<Node> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node = Node {
        metadata: ObjectMeta {
            name: Some(config.node_name.clone()),
            labels: Some(labels(config)),
            annotations: Some(BTreeMap::from([(
                "node.alpha.kubernetes.io/ttl".to_string(),
                "0".to_string(),
            )])),
            ..Default::default()
        },
        ..Default::default()
    };
    match nodes.create(&PostParams::default(), &node).await {
        Ok(created) => {
            info!(node = %config.node_name, "registered the node");
            Ok(created)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let patch = json!({"metadata": {"labels": labels(config)}});
            let adopted = nodes
                .patch(
                    &config.node_name,
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
                .context("updating the labels of the existing node")?;
            info!(node = %config.node_name, "the node exists: took it over");
            Ok(adopted)
        }
        Err(e) => Err(e).context("registering the node"),
    }
}

fn quantity(value: impl ToString) -> Quantity {
    Quantity(value.to_string())
}

fn resources(cpus: u64, memory: u64, storage: u64, pods: u32) -> BTreeMap<String, Quantity> {
    BTreeMap::from([
        ("cpu".into(), quantity(cpus)),
        ("memory".into(), quantity(format!("{}Ki", memory / 1024))),
        (
            "ephemeral-storage".into(),
            quantity(format!("{}Ki", storage / 1024)),
        ),
        ("pods".into(), quantity(pods)),
    ])
}

/// One condition's truth, reason and message, before transition times.
struct Fact {
    type_: &'static str,
    status: bool,
    reason: &'static str,
    message: String,
}

fn facts(health: &RuntimeHealth, pressure: &Pressure) -> [Fact; 4] {
    let (memory, disk, pid) = (pressure.memory, pressure.disk, pressure.pid);
    let not_ready = health.not_ready_message();
    [
        Fact {
            type_: "MemoryPressure",
            status: memory,
            reason: if memory {
                "KubeletHasInsufficientMemory"
            } else {
                "KubeletHasSufficientMemory"
            },
            message: format!(
                "kubelet has {} memory available",
                if memory { "insufficient" } else { "sufficient" }
            ),
        },
        Fact {
            type_: "DiskPressure",
            status: disk,
            reason: if disk {
                "KubeletHasDiskPressure"
            } else {
                "KubeletHasNoDiskPressure"
            },
            message: format!("kubelet has {}disk pressure", if disk { "" } else { "no " }),
        },
        Fact {
            type_: "PIDPressure",
            status: pid,
            reason: if pid {
                "KubeletHasInsufficientPID"
            } else {
                "KubeletHasSufficientPID"
            },
            message: format!(
                "kubelet has {} PID available",
                if pid { "insufficient" } else { "sufficient" }
            ),
        },
        Fact {
            type_: "Ready",
            status: not_ready.is_none(),
            reason: if not_ready.is_none() {
                "KubeletReady"
            } else {
                "KubeletNotReady"
            },
            message: not_ready.unwrap_or_else(|| "kubelet is posting ready status".into()),
        },
    ]
}

/// The Node's conditions now: a condition keeps its transition time while its status stays.
pub fn conditions(
    previous: &[NodeCondition],
    health: &RuntimeHealth,
    pressure: &Pressure,
    now: Timestamp,
) -> Vec<NodeCondition> {
    facts(health, pressure)
        .into_iter()
        .map(|fact| {
            let status = if fact.status { "True" } else { "False" }.to_string();
            let transition = previous
                .iter()
                .find(|c| c.type_ == fact.type_ && c.status == status)
                .and_then(|c| c.last_transition_time.clone())
                .unwrap_or(Time(now));
            NodeCondition {
                type_: fact.type_.into(),
                status,
                reason: Some(fact.reason.into()),
                message: Some(fact.message),
                last_heartbeat_time: Some(Time(now)),
                last_transition_time: Some(transition),
            }
        })
        .collect()
}

/// Everything of the Node's status but the conditions' times: what decides whether to write.
#[derive(Debug, Clone, PartialEq)]
struct Reported {
    status: serde_json::Value,
}

/// Keeps the Node's status true to fact, writing it when it changes and at least every
/// `report_every` (the kubelet's nodeStatusReportFrequency), and renews the Lease.
pub struct StatusReporter {
    client: Client,
    config: Config,
    capacity: Capacity,
    identity: Identity,
    node_uid: Option<String>,
    conditions: Vec<NodeCondition>,
    last_written: Option<(Reported, std::time::Instant)>,
    report_every: Duration,
}

impl StatusReporter {
    pub fn new(client: Client, config: Config, node: &Node) -> Self {
        StatusReporter {
            capacity: machine::capacity(&config.root_dir),
            identity: machine::identity(),
            node_uid: node.metadata.uid.clone(),
            conditions: node
                .status
                .as_ref()
                .and_then(|s| s.conditions.clone())
                .unwrap_or_default(),
            client,
            config,
            last_written: None,
            report_every: Duration::from_secs(300),
        }
    }

    fn status(&self, version: Option<&RuntimeVersion>) -> NodeStatus {
        let c = &self.capacity;
        let pods = self.config.max_pods;
        let eviction = &self.config.eviction_hard;
        let allocatable_storage = c
            .ephemeral_storage_bytes
            .saturating_sub(eviction.nodefs_available.of(c.ephemeral_storage_bytes));
        let allocatable_memory = c
            .memory_bytes
            .saturating_sub(eviction.memory_available.of(c.memory_bytes));
        let mut addresses = vec![];
        if let Some(ip) = self.config.node_ip {
            addresses.push(NodeAddress {
                type_: "InternalIP".into(),
                address: ip.to_string(),
            });
        }
        addresses.push(NodeAddress {
            type_: "Hostname".into(),
            address: self.config.node_name.clone(),
        });
        let id = &self.identity;
        NodeStatus {
            addresses: Some(addresses),
            capacity: Some(resources(
                c.cpus,
                c.memory_bytes,
                c.ephemeral_storage_bytes,
                pods,
            )),
            allocatable: Some(resources(
                c.cpus,
                allocatable_memory,
                allocatable_storage,
                pods,
            )),
            node_info: Some(NodeSystemInfo {
                machine_id: id.machine_id.clone(),
                system_uuid: id.system_uuid.clone(),
                boot_id: id.boot_id.clone(),
                kernel_version: id.kernel_version.clone(),
                os_image: id.os_image.clone(),
                operating_system: "linux".into(),
                architecture: id.architecture.clone(),
                container_runtime_version: version
                    .map(|v| format!("{}://{}", v.name, v.version))
                    .unwrap_or_default(),
                kubelet_version: seine_component_base::KUBERNETES_VERSION.into(),
                kube_proxy_version: String::new(),
                ..Default::default()
            }),
            daemon_endpoints: Some(k8s_openapi::api::core::v1::NodeDaemonEndpoints {
                kubelet_endpoint: Some(k8s_openapi::api::core::v1::DaemonEndpoint {
                    port: i32::from(self.config.port),
                }),
            }),
            ..Default::default()
        }
    }

    /// Writes the status if it changed or is due; returns whether Ready is true.
    pub async fn report(
        &mut self,
        health: &RuntimeHealth,
        version: Option<&RuntimeVersion>,
    ) -> anyhow::Result<bool> {
        let pressure = self
            .config
            .eviction_hard
            .pressure(&machine::available(&self.config.root_dir));
        let conditions = conditions(&self.conditions, health, &pressure, Timestamp::now());
        let mut status = self.status(version);
        let ready = conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        // What decides a write: everything but the heartbeat times.
        let mut facts = serde_json::to_value(&status)?;
        facts["conditions"] = conditions
            .iter()
            .map(|c| {
                json!([
                    c.type_,
                    c.status,
                    c.reason,
                    c.message,
                    c.last_transition_time
                ])
            })
            .collect();
        let reported = Reported { status: facts };
        let due = match &self.last_written {
            Some((last, at)) => *last != reported || at.elapsed() >= self.report_every,
            None => true,
        };
        if due {
            status.conditions = Some(conditions.clone());
            let nodes: Api<Node> = Api::all(self.client.clone());
            let patch = json!({"status": status});
            nodes
                .patch_status(
                    &self.config.node_name,
                    &PatchParams::default(),
                    &Patch::Strategic(&patch),
                )
                .await
                .context("writing the node status")?;
            if self
                .last_written
                .as_ref()
                .map(|l| &l.0.status["conditions"])
                != Some(&reported.status["conditions"])
            {
                info!(ready, "node status written");
            }
            self.conditions = conditions;
            self.last_written = Some((reported, std::time::Instant::now()));
        }
        Ok(ready)
    }

    /// Renews (or creates) the Node's Lease, owned by the Node so that it goes with it.
    pub async fn renew_lease(&self) -> anyhow::Result<()> {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), LEASE_NAMESPACE);
        let name = &self.config.node_name;
        let spec = LeaseSpec {
            holder_identity: Some(name.clone()),
            lease_duration_seconds: Some(LEASE_DURATION_SECONDS),
            renew_time: Some(MicroTime(Timestamp::now())),
            ..Default::default()
        };
        let patch = json!({"spec": spec});
        match leases
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        namespace: Some(LEASE_NAMESPACE.into()),
                        owner_references: self.node_uid.as_ref().map(|uid| {
                            vec![OwnerReference {
                                api_version: "v1".into(),
                                kind: "Node".into(),
                                name: name.clone(),
                                uid: uid.clone(),
                                ..Default::default()
                            }]
                        }),
                        ..Default::default()
                    },
                    spec: Some(spec),
                };
                leases
                    .create(&PostParams::default(), &lease)
                    .await
                    .map(drop)
                    .context("creating the node lease")
            }
            Err(e) => {
                warn!(error = %e, "renewing the node lease");
                Err(e).context("renewing the node lease")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{eviction::Thresholds, machine::Available};

    fn plenty() -> Available {
        Available {
            memory_bytes: 8 << 30,
            memory_total_bytes: 16 << 30,
            nodefs_bytes: 50 << 30,
            nodefs_total_bytes: 100 << 30,
            pids: 300,
            pid_max: 4_194_304,
        }
    }

    /// The pressure of `available` under the default thresholds.
    fn under(available: &Available) -> Pressure {
        Thresholds::default().pressure(available)
    }

    #[test]
    fn conditions_tell_the_truth_and_keep_their_transition_times() {
        let t0 = Timestamp::from_second(1_000).unwrap();
        let t1 = Timestamp::from_second(2_000).unwrap();
        let network_down = RuntimeHealth {
            runtime_ready: None,
            network_ready: Some("reason:NetworkPluginNotReady message:no CNI config".into()),
        };
        let first = conditions(&[], &network_down, &under(&plenty()), t0);
        let ready = first.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(ready.status, "False");
        assert_eq!(ready.reason.as_deref(), Some("KubeletNotReady"));
        assert!(ready
            .message
            .as_deref()
            .unwrap()
            .contains("NetworkReady=false"));

        let low_memory = Available {
            memory_bytes: 10 << 20,
            ..plenty()
        };
        let second = conditions(&first, &RuntimeHealth::default(), &under(&low_memory), t1);
        let by_type = |t: &str| second.iter().find(|c| c.type_ == t).unwrap().clone();
        assert_eq!(by_type("Ready").status, "True");
        assert_eq!(by_type("Ready").last_transition_time, Some(Time(t1)));
        assert_eq!(by_type("MemoryPressure").status, "True");
        assert_eq!(by_type("DiskPressure").status, "False");
        // Unchanged: the transition time stays, the heartbeat moves.
        assert_eq!(by_type("DiskPressure").last_transition_time, Some(Time(t0)));
        assert_eq!(by_type("DiskPressure").last_heartbeat_time, Some(Time(t1)));
    }

    #[test]
    fn disk_and_pid_pressure_follow_the_eviction_thresholds() {
        let low = Available {
            nodefs_bytes: 5 << 30,
            pids: 4_100_000,
            ..plenty()
        };
        let c = conditions(
            &[],
            &RuntimeHealth::default(),
            &under(&low),
            Timestamp::now(),
        );
        let status = |t: &str| c.iter().find(|c| c.type_ == t).unwrap().status.clone();
        assert_eq!(status("DiskPressure"), "True");
        assert_eq!(status("PIDPressure"), "True");
        assert_eq!(status("MemoryPressure"), "False");
    }
}
