//! What every cluster has from its first start: the built-in RBAC policy, the system namespaces,
//! the default ServiceCIDR, and the `default/kubernetes` service whose endpoints are the API
//! servers that are up (`endpoints`).

pub mod endpoints;

use serde_json::json;

use crate::{
    api::{
        registry::{alloc, meta},
        security::rbac,
        status::ApiError,
        ApiState,
    },
    storage::{ObjectKey, StorageError},
};

/// What every cluster has, created at start when missing: the built-in RBAC policy, the system
/// namespaces, and the `default/kubernetes` service on the first address of the service range,
/// whose endpoints are the API servers that are up (see `endpoints`).
pub async fn bootstrap(state: &ApiState, advertise: std::net::SocketAddr) -> Result<(), ApiError> {
    let storage = &state.storage;
    rbac::bootstrap(storage).await?;
    for name in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        let object = json!({"apiVersion": "v1", "kind": "Namespace",
                            "metadata": {"name": name, "uid": meta::uid(), "creationTimestamp": meta::now(),
                                         "labels": {"kubernetes.io/metadata.name": name}},
                            "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}});
        match storage
            .create(&ObjectKey::new("namespaces", None, name), object)
            .await
        {
            Ok(_) | Err(StorageError::AlreadyExists { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    // The default ServiceCIDR, from --service-cluster-ip-range, as kube-apiserver makes it.
    let cidrs: Vec<String> = state
        .ranges
        .ranges
        .iter()
        .map(ToString::to_string)
        .collect();
    let service_cidr = json!({"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR",
        "metadata": {"name": "kubernetes", "uid": meta::uid(), "creationTimestamp": meta::now()},
        "spec": {"cidrs": cidrs},
        "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "",
                                   "message": "Kubernetes Service CIDR is ready",
                                   "lastTransitionTime": meta::now()}]}});
    match storage
        .create(
            &ObjectKey::new("servicecidrs", None, "kubernetes"),
            service_cidr,
        )
        .await
    {
        Ok(_) | Err(StorageError::AlreadyExists { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    alloc::repair(storage).await?;
    let ip = state.ranges.kubernetes_ip().to_string();
    let labels = json!({"component": "apiserver", "provider": "kubernetes"});
    let service = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "kubernetes", "namespace": "default", "uid": meta::uid(),
                     "creationTimestamp": meta::now(), "labels": labels},
        "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip], "sessionAffinity": "None",
                 "ipFamilies": [state.ranges.primary().family().name()], "ipFamilyPolicy": "SingleStack", "internalTrafficPolicy": "Cluster",
                 "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": advertise.port()}]},
        "status": {"loadBalancer": {}}});
    let key = ObjectKey::new("services", Some("default"), "kubernetes");
    match alloc::write_service(&state.ranges, storage, &key, None, service, None).await {
        Ok(_) => {}
        Err(e) if e.reason == "AlreadyExists" => {}
        Err(e) => return Err(e),
    }
    endpoints::reconcile(storage, advertise).await?;
    Ok(())
}
