//! Stopping a pod on the node: each running container's preStop hook and stop within the grace
//! period, then its sandboxes (the runtime calls CNI DEL), whatever attempt made them.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use k8s_cri::v1 as cri;
use k8s_openapi::api::core::v1::{Container, Pod};
use tracing::warn;

use super::{
    config::{pod_ref, LABEL_CONTAINER_NAME, LABEL_POD_UID},
    Context,
};

/// Stops and removes everything of the pod `uid` on the node: running containers get their
/// preStop hook and `grace` to exit, then the sandboxes go (the CNI DEL with them).
pub async fn terminate(ctx: &Context, uid: &str, pod: Option<&Pod>, grace: Duration) {
    let runtime = &ctx.runtime;
    let sandboxes = match runtime
        .sandboxes(HashMap::from([(
            LABEL_POD_UID.to_string(),
            uid.to_string(),
        )]))
        .await
    {
        Ok(s) => s,
        Err(e) => {
            warn!(uid, "listing the pod's sandboxes: {e}");
            return;
        }
    };
    let mut containers = Vec::new();
    for sandbox in &sandboxes {
        match runtime.containers(&sandbox.id).await {
            Ok(list) => containers.extend(list),
            Err(e) => warn!(sandbox = %sandbox.id, "listing containers: {e}"),
        }
    }
    let specs: Vec<Container> = pod
        .and_then(|p| p.spec.clone())
        .map(|s| {
            s.containers
                .into_iter()
                .chain(s.init_containers.unwrap_or_default())
                .collect()
        })
        .unwrap_or_default();
    let stops = containers
        .iter()
        .filter(|c| c.state == cri::ContainerState::ContainerRunning as i32)
        .map(|c| {
            let name = c
                .labels
                .get(LABEL_CONTAINER_NAME)
                .cloned()
                .unwrap_or_default();
            let spec = specs.iter().find(|s| s.name == name).cloned();
            async move {
                let begun = Instant::now();
                if let Some(command) = spec
                    .as_ref()
                    .and_then(|s| s.lifecycle.as_ref())
                    .and_then(|l| l.pre_stop.as_ref())
                    .and_then(|h| h.exec.as_ref())
                    .and_then(|e| e.command.clone())
                {
                    if let Err(e) = runtime
                        .exec_sync(&c.id, command, grace.max(Duration::from_secs(1)))
                        .await
                    {
                        warn!(container = %name, "preStop hook: {e}");
                    }
                }
                if let Some(pod) = pod {
                    ctx.recorder
                        .normal(
                            &pod_ref(pod, Some(&name)),
                            "Killing",
                            &format!("Stopping container {name}"),
                        )
                        .await;
                }
                let left = grace.saturating_sub(begun.elapsed());
                if let Err(e) = runtime.stop_container(&c.id, left).await {
                    warn!(container = %name, "stopping: {e}");
                }
            }
        });
    futures::future::join_all(stops).await;
    for sandbox in &sandboxes {
        if let Err(e) = runtime.stop_sandbox(&sandbox.id).await {
            warn!(sandbox = %sandbox.id, "stopping the sandbox: {e}");
        }
    }
    for c in &containers {
        if let Err(e) = runtime.remove_container(&c.id).await {
            if !e.not_found() {
                warn!(container = %c.id, "removing: {e}");
            }
        }
    }
    for sandbox in &sandboxes {
        if let Err(e) = runtime.remove_sandbox(&sandbox.id).await {
            warn!(sandbox = %sandbox.id, "removing the sandbox: {e}");
        }
    }
}
