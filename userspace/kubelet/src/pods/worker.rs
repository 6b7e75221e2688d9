//! One pod's worker, as the kubelet's pod workers: it brings the node to the pod's spec (the
//! sandbox, the init containers in order, the containers, restarts with back-off, liveness
//! kills), writes the pod's status when it changes, and on deletion stops the containers within
//! the grace period, removes the sandbox and lets the API object go.
//!
//! Longer than 1,000 lines because a pod's lifecycle (adoption, sandbox, images, starts with
//! back-off, liveness kills, status) shares one worker's state; splitting it is next.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_cri::v1 as cri;
use k8s_openapi::{
    api::core::v1::{Container, Pod},
    jiff::Timestamp,
};
use kube::{
    api::{DeleteParams, Patch, PatchParams, Preconditions},
    Api,
};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    config::{
        self as podconfig, identity, pod_ref, ANNOTATION_RESTART_COUNT, LABEL_CONTAINER_NAME,
        LABEL_POD_UID,
    },
    env, hosts, probe,
    status::{self, ContainerView, PodView},
    terminate::terminate,
    volumes, Context,
};

/// The kubelet's container restart back-off: 10 s doubling to 5 minutes, forgotten after a
/// container ran 10 minutes.
const BACKOFF_INITIAL: Duration = Duration::from_secs(10);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
const BACKOFF_RESET: Duration = Duration::from_secs(600);
/// How often a worker looks at its containers when nothing wakes it (the kubelet's PLEG relist).
const RELIST: Duration = Duration::from_secs(1);
/// How often a static pod's status is written even when unchanged: its mirror pod may have been
/// made again, with no status.
const STATIC_REWRITE: Duration = Duration::from_secs(10);
/// How long the containers of a pod the API no longer has get to stop.
const GONE_GRACE: Duration = Duration::from_secs(2);

/// A container instance on the node.
struct Instance {
    id: String,
    status: Option<cri::ContainerStatus>,
    verdicts: Option<Arc<probe::Verdicts>>,
    probes: CancellationToken,
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.probes.cancel();
    }
}

impl Instance {
    fn running(&self) -> bool {
        self.status
            .as_ref()
            .is_some_and(|s| s.state == cri::ContainerState::ContainerRunning as i32)
    }

    fn exited(&self) -> Option<i32> {
        self.status
            .as_ref()
            .filter(|s| s.state == cri::ContainerState::ContainerExited as i32)
            .map(|s| s.exit_code)
    }
}

/// A container of the spec: its newest instance and what the next start waits for.
#[derive(Default)]
struct Slot {
    current: Option<Instance>,
    previous: Option<cri::ContainerStatus>,
    restart_count: i32,
    waiting: Option<(String, String)>,
    /// The crash back-off: how long the next restart waits after an exit.
    backoff: Option<Duration>,
    /// A failure to start (image, configuration) holds the next try until then.
    hold: Option<(Instant, Duration)>,
}

struct Sandbox {
    id: String,
    attempt: u32,
    ips: Vec<String>,
}

pub struct Worker {
    ctx: Arc<Context>,
    pod: Arc<Pod>,
    sandbox: Option<Sandbox>,
    sandbox_attempts: u32,
    sandbox_retry: Option<(Instant, Duration)>,
    slots: HashMap<String, Slot>,
    volumes: Option<BTreeMap<String, PathBuf>>,
    setup_error: Option<String>,
    written: Option<serde_json::Value>,
    written_at: Option<Instant>,
    wake: Arc<Notify>,
    adopted: bool,
    terminal: bool,
    /// The API had the pod finished before this worker ran it (a kubelet restarted after the
    /// sandbox went): it is not run again and its status stays as written.
    finished_before: bool,
    /// A static pod: its status goes to its mirror pod.
    from_file: bool,
}

fn next_backoff(current: Option<Duration>) -> Duration {
    current.map_or(BACKOFF_INITIAL, |d| (d * 2).min(BACKOFF_MAX))
}

/// The pull policy Kubernetes defaults: Always for `:latest` or untagged images.
fn pull_policy(container: &Container) -> String {
    if let Some(p) = &container.image_pull_policy {
        return p.clone();
    }
    let image = container.image.clone().unwrap_or_default();
    let name = image.rsplit('/').next().unwrap_or_default();
    if image.contains('@') || (name.contains(':') && !name.ends_with(":latest")) {
        "IfNotPresent".into()
    } else {
        "Always".into()
    }
}

impl Worker {
    pub fn new(ctx: Arc<Context>, pod: Arc<Pod>) -> Self {
        Worker {
            ctx,
            sandbox: None,
            sandbox_attempts: 0,
            sandbox_retry: None,
            slots: HashMap::new(),
            volumes: None,
            setup_error: None,
            written: None,
            written_at: None,
            wake: Arc::new(Notify::new()),
            adopted: false,
            terminal: false,
            finished_before: false,
            from_file: super::static_pods::is_static(&pod),
            pod,
        }
    }

    fn name(&self) -> String {
        let (name, namespace, _) = identity(&self.pod);
        format!("{namespace}/{name}")
    }

    fn spec_containers(&self) -> (Vec<Container>, Vec<Container>) {
        let spec = self.pod.spec.clone().unwrap_or_default();
        (spec.init_containers.unwrap_or_default(), spec.containers)
    }

    /// Runs until the pod is gone from the API (the manager sends `None`) or the kubelet stops
    /// (its containers are left running, to be adopted by the next kubelet).
    pub async fn run(
        mut self,
        mut pods: watch::Receiver<Option<Arc<Pod>>>,
        shutdown: CancellationToken,
    ) {
        // Only a new version replaces the pod held: it carries the status last written, whose
        // transition times the next status keeps.
        let mut new_version = false;
        loop {
            if std::mem::take(&mut new_version) {
                let latest = pods.borrow_and_update().clone();
                let Some(pod) = latest else {
                    let uid = identity(&self.pod).2;
                    // A static pod whose file went stops as a deleted pod would.
                    let grace = if self.from_file {
                        self.termination_grace()
                    } else {
                        GONE_GRACE
                    };
                    terminate(&self.ctx, &uid, Some(&self.pod), grace).await;
                    volumes::tear_down(&self.ctx.config.root_dir, &uid);
                    debug!(pod = %self.name(), "worker done");
                    return;
                };
                self.pod = pod;
            }
            if self.pod.metadata.deletion_timestamp.is_some() {
                self.delete().await;
            } else if let Err(e) = self.sync().await {
                warn!(pod = %self.name(), "sync: {e}");
            }
            tokio::select! {
                changed = pods.changed() => match changed {
                    Ok(()) => new_version = true,
                    Err(_) => return,
                },
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(RELIST) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// The pod is being deleted: stop it within its grace period, then remove the API object.
    async fn delete(&mut self) {
        let grace = self
            .pod
            .metadata
            .deletion_grace_period_seconds
            .or_else(|| {
                self.pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.termination_grace_period_seconds)
            })
            .unwrap_or(30)
            .max(0) as u64;
        let (_, namespace, uid) = identity(&self.pod);
        if self.slots.values().any(|s| s.current.is_some())
            || self.sandbox.is_some()
            || !self.adopted
        {
            info!(pod = %self.name(), grace, "stopping the pod's containers");
            terminate(&self.ctx, &uid, Some(&self.pod), Duration::from_secs(grace)).await;
            self.slots.clear();
            self.sandbox = None;
            self.adopted = true;
        }
        volumes::tear_down(&self.ctx.config.root_dir, &uid);
        let api: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &namespace);
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(uid),
                resource_version: None,
            }),
            ..Default::default()
        };
        match api.delete(&identity(&self.pod).0, &params).await {
            Ok(_) => info!(pod = %self.name(), "pod stopped; deleted from the API"),
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => warn!(pod = %self.name(), "deleting the pod object: {e}"),
        }
    }

    /// Finds what an earlier kubelet left running for this pod.
    async fn adopt(&mut self) -> anyhow::Result<()> {
        let uid = identity(&self.pod).2;
        let sandboxes = self
            .ctx
            .runtime
            .sandboxes(HashMap::from([(LABEL_POD_UID.to_string(), uid)]))
            .await?;
        self.sandbox_attempts = sandboxes
            .iter()
            .filter_map(|s| s.metadata.as_ref().map(|m| m.attempt + 1))
            .max()
            .unwrap_or(0);
        let newest = sandboxes
            .iter()
            .filter(|s| s.state == cri::PodSandboxState::SandboxReady as i32)
            .max_by_key(|s| s.created_at);
        for old in sandboxes
            .iter()
            .filter(|s| Some(s.id.as_str()) != newest.map(|n| n.id.as_str()))
        {
            let _ = self.ctx.runtime.stop_sandbox(&old.id).await;
            let _ = self.ctx.runtime.remove_sandbox(&old.id).await;
        }
        let Some(sandbox) = newest else { return Ok(()) };
        let ips = sandbox_ips(&self.ctx.runtime.sandbox_status(&sandbox.id).await?);
        let mut containers = self.ctx.runtime.containers(&sandbox.id).await?;
        containers.sort_by_key(|c| std::cmp::Reverse(c.created_at));
        for c in containers {
            let Some(name) = c.labels.get(LABEL_CONTAINER_NAME).cloned() else {
                continue;
            };
            let slot = self.slots.entry(name.clone()).or_default();
            let status = self.ctx.runtime.container_status(&c.id).await?;
            if slot.current.is_none() {
                slot.restart_count = c
                    .annotations
                    .get(ANNOTATION_RESTART_COUNT)
                    .and_then(|r| r.parse().ok())
                    .unwrap_or(0);
                slot.current = Some(Instance {
                    id: c.id.clone(),
                    status,
                    verdicts: None,
                    probes: CancellationToken::new(),
                });
            } else if slot.previous.is_none() {
                slot.previous = status;
            } else {
                // Older instances than the last termination are garbage.
                let _ = self.ctx.runtime.remove_container(&c.id).await;
            }
        }
        info!(pod = %self.name(), sandbox = %sandbox.id, containers = self.slots.len(), "adopted the running pod");
        self.sandbox = Some(Sandbox {
            id: sandbox.id.clone(),
            attempt: sandbox.metadata.as_ref().map(|m| m.attempt).unwrap_or(0),
            ips,
        });
        // Probes of adopted instances start over.
        let (init, app) = self.spec_containers();
        for container in init.iter().chain(app.iter()) {
            self.start_probes(container);
        }
        Ok(())
    }

    fn start_probes(&mut self, container: &Container) {
        let pod_ip = self.sandbox.as_ref().and_then(|s| s.ips.first().cloned());
        let target_base = (
            self.ctx.runtime.clone(),
            self.ctx.recorder.clone(),
            pod_ref(&self.pod, Some(&container.name)),
        );
        let wake = self.wake.clone();
        let Some(instance) = self
            .slots
            .get_mut(&container.name)
            .and_then(|s| s.current.as_mut())
        else {
            return;
        };
        if !instance.running() || instance.verdicts.is_some() {
            return;
        }
        let target = probe::Target {
            runtime: target_base.0,
            container_id: instance.id.clone(),
            pod_ip,
            container: container.clone(),
            recorder: target_base.1,
            pod_ref: target_base.2,
        };
        instance.verdicts = Some(probe::start(target, wake, instance.probes.clone()));
    }

    async fn event(&self, container: Option<&str>, warning: bool, reason: &str, message: &str) {
        let object = pod_ref(&self.pod, container);
        if warning {
            self.ctx.recorder.warning(&object, reason, message).await
        } else {
            self.ctx.recorder.normal(&object, reason, message).await
        }
    }

    /// Makes sure the pod has a ready sandbox; false while it has none.
    async fn ensure_sandbox(&mut self) -> anyhow::Result<bool> {
        if let Some(sandbox) = &self.sandbox {
            let ready = match self.ctx.runtime.sandbox_status(&sandbox.id).await {
                Ok(Some(s)) => s.state == cri::PodSandboxState::SandboxReady as i32,
                Ok(None) => false,
                Err(e) if e.not_found() => false,
                // The runtime did not answer: nothing is known to have changed.
                Err(e) => return Err(e.into()),
            };
            if ready {
                return Ok(true);
            }
            self.event(
                None,
                false,
                "SandboxChanged",
                "Pod sandbox changed, it will be killed and re-created.",
            )
            .await;
            let uid = identity(&self.pod).2;
            terminate(&self.ctx, &uid, Some(&self.pod), Duration::from_secs(2)).await;
            self.sandbox = None;
            for slot in self.slots.values_mut() {
                if let Some(old) = slot.current.take() {
                    slot.previous = old.status.clone();
                    slot.restart_count += 1;
                }
            }
        }
        if let Some((at, _)) = self.sandbox_retry {
            if Instant::now() < at {
                return Ok(false);
            }
        }
        if self.volumes.is_none() {
            match volumes::set_up(&self.ctx.client, &self.ctx.config.root_dir, &self.pod).await {
                Ok(v) => {
                    self.volumes = Some(v);
                    self.setup_error = None;
                }
                Err(e) => {
                    let message = format!("MountVolume.SetUp failed: {e}");
                    self.event(None, true, "FailedMount", &message).await;
                    self.setup_error = Some(message);
                    self.retry_sandbox_later();
                    return Ok(false);
                }
            }
        }
        let config =
            match podconfig::sandbox_config(&self.pod, &self.ctx.config, self.sandbox_attempts) {
                Ok(c) => c,
                Err(e) => {
                    self.event(None, true, "FailedCreatePodSandBox", &e).await;
                    self.setup_error = Some(e);
                    self.retry_sandbox_later();
                    return Ok(false);
                }
            };
        let _ = std::fs::create_dir_all(&config.log_directory);
        let attempt = self.sandbox_attempts;
        self.sandbox_attempts += 1;
        match self.ctx.runtime.run_sandbox(config).await {
            Ok(id) => {
                // Without its status now, the IPs come with the adopting read of a later sync.
                let ips = match self.ctx.runtime.sandbox_status(&id).await {
                    Ok(status) => sandbox_ips(&status),
                    Err(e) => {
                        warn!(pod = %self.name(), sandbox = %id, "sandbox status: {e}");
                        vec![]
                    }
                };
                debug!(pod = %self.name(), sandbox = %id, ?ips, "sandbox running");
                self.sandbox = Some(Sandbox { id, attempt, ips });
                self.sandbox_retry = None;
                self.setup_error = None;
                Ok(true)
            }
            Err(e) => {
                let message = format!("Failed to create pod sandbox: {}", e.message);
                self.event(None, true, "FailedCreatePodSandBox", &message)
                    .await;
                self.setup_error = Some(message);
                self.retry_sandbox_later();
                Ok(false)
            }
        }
    }

    fn retry_sandbox_later(&mut self) {
        let delay = next_backoff(self.sandbox_retry.map(|r| r.1));
        self.sandbox_retry = Some((Instant::now() + delay, delay));
    }

    /// Reads the state of every current instance; liveness failures kill theirs.
    async fn refresh(&mut self) {
        let grace = self.termination_grace();
        let mut kills = Vec::new();
        for (name, slot) in self.slots.iter_mut() {
            let Some(instance) = slot.current.as_mut() else {
                continue;
            };
            match self.ctx.runtime.container_status(&instance.id).await {
                Ok(status) => instance.status = status.map(settled),
                Err(e) if e.not_found() => {
                    instance.status = Some(cri::ContainerStatus {
                        id: instance.id.clone(),
                        state: cri::ContainerState::ContainerExited as i32,
                        exit_code: 137,
                        reason: "ContainerStatusUnknown".into(),
                        message: "The container could not be located when the pod was terminated"
                            .into(),
                        ..Default::default()
                    })
                }
                Err(e) => warn!(container = %name, "container status: {e}"),
            }
            if instance.running() {
                if let Some(why) = instance.verdicts.as_ref().and_then(|v| v.failure()) {
                    kills.push((name.clone(), instance.id.clone(), why));
                }
            } else {
                // Probes of a container that stopped stop with it.
                instance.probes.cancel();
            }
        }
        for (name, id, why) in kills {
            self.event(Some(&name), false, "Killing", &why).await;
            if let Err(e) = self.ctx.runtime.stop_container(&id, grace).await {
                warn!(container = %name, "stopping after a failed liveness probe: {e}");
            }
            if let Some(instance) = self.slots.get_mut(&name).and_then(|s| s.current.as_mut()) {
                instance.verdicts = None;
                if let Ok(status) = self.ctx.runtime.container_status(&id).await {
                    instance.status = status;
                }
            }
        }
    }

    fn termination_grace(&self) -> Duration {
        Duration::from_secs(
            self.pod
                .spec
                .as_ref()
                .and_then(|s| s.termination_grace_period_seconds)
                .unwrap_or(30)
                .max(0) as u64,
        )
    }

    /// Whether the container in `slot` may start (again) now; sets why not.
    fn may_start(slot: &mut Slot, pod: &Pod, container: &Container) -> bool {
        if slot.hold.is_some_and(|(at, _)| Instant::now() < at) {
            return false;
        }
        let Some(instance) = &slot.current else {
            return true;
        };
        let Some(code) = instance.exited() else {
            return false;
        };
        if !status::restarts(pod, code) {
            return false;
        }
        let status = instance.status.clone().unwrap_or_default();
        let ran = Duration::from_nanos(
            status.finished_at.saturating_sub(status.started_at).max(0) as u64
        );
        if ran >= BACKOFF_RESET {
            slot.backoff = None;
        }
        let finished =
            Timestamp::from_nanosecond(i128::from(status.finished_at)).unwrap_or(Timestamp::now());
        let since = Timestamp::now().duration_since(finished);
        match slot.backoff {
            Some(delay) if since.as_secs_f64() < delay.as_secs_f64() => {
                let (name, namespace, uid) = identity(pod);
                slot.waiting = Some((
                    "CrashLoopBackOff".into(),
                    format!(
                        "back-off {}s restarting failed container={} pod={name}_{namespace}({uid})",
                        delay.as_secs(),
                        container.name
                    ),
                ));
                false
            }
            _ => true,
        }
    }

    async fn sync(&mut self) -> anyhow::Result<()> {
        if !self.adopted {
            self.adopt().await?;
            self.adopted = true;
            let phase = self.pod.status.as_ref().and_then(|s| s.phase.as_deref());
            if self.sandbox.is_none() && matches!(phase, Some("Succeeded" | "Failed")) {
                self.finished_before = true;
                self.terminal = true;
            }
        }
        if self.finished_before {
            return Ok(());
        }
        if self.terminal {
            return self.write_status().await;
        }
        if !self.ensure_sandbox().await? {
            return self.write_status().await;
        }
        self.refresh().await;
        let (init, app) = self.spec_containers();
        let mut initialized = true;
        for container in &init {
            let slot = self.slots.entry(container.name.clone()).or_default();
            if slot.current.as_ref().and_then(Instance::exited) == Some(0) {
                continue;
            }
            initialized = false;
            if Self::may_start(slot, &self.pod.clone(), container) {
                self.start(container).await;
            }
            break;
        }
        if initialized {
            for container in &app {
                let slot = self.slots.entry(container.name.clone()).or_default();
                if Self::may_start(slot, &self.pod.clone(), container) {
                    self.start(container).await;
                }
            }
        }
        self.write_status().await
    }

    /// Makes sure the image is on the node, by the container's pull policy.
    async fn ensure_image(&mut self, container: &Container) -> Result<String, (String, String)> {
        let image = container.image.clone().unwrap_or_default();
        let policy = pull_policy(container);
        let present = self
            .ctx
            .runtime
            .image_id(&image)
            .await
            .map_err(|e| ("ErrImageInspect".to_string(), e.message.clone()))?;
        match (present, policy.as_str()) {
            (Some(id), "IfNotPresent" | "Never") => {
                self.event(
                    Some(&container.name),
                    false,
                    "Pulled",
                    &format!("Container image \"{image}\" already present on machine"),
                )
                .await;
                Ok(id)
            }
            (None, "Never") => {
                let message =
                    format!("Container image \"{image}\" is not present with pull policy of Never");
                self.event(Some(&container.name), true, "ErrImageNeverPull", &message)
                    .await;
                Err(("ErrImageNeverPull".into(), message))
            }
            _ => {
                self.event(
                    Some(&container.name),
                    false,
                    "Pulling",
                    &format!("Pulling image \"{image}\""),
                )
                .await;
                match self.ctx.runtime.pull(&image).await {
                    Ok(reference) => {
                        self.event(
                            Some(&container.name),
                            false,
                            "Pulled",
                            &format!("Successfully pulled image \"{image}\""),
                        )
                        .await;
                        Ok(reference)
                    }
                    Err(e) => {
                        let message = format!("Failed to pull image \"{image}\": {}", e.message);
                        self.event(Some(&container.name), true, "Failed", &message)
                            .await;
                        Err(("ErrImagePull".into(), message))
                    }
                }
            }
        }
    }

    /// Holds the container back after a failure to start it: shown as `reason` now and as
    /// `backoff_reason` while the back-off runs.
    fn hold(&mut self, name: &str, reason: String, message: String) {
        let slot = self.slots.entry(name.to_string()).or_default();
        let delay = next_backoff(slot.hold.map(|h| h.1));
        slot.hold = Some((Instant::now() + delay, delay));
        slot.waiting = Some((reason, message));
    }

    async fn start(&mut self, container: &Container) {
        let name = container.name.clone();
        // An image pull that failed before shows as a back-off until the retry.
        let image_id = match self.ensure_image(container).await {
            Ok(id) => id,
            Err((reason, message)) => {
                let image = container.image.clone().unwrap_or_default();
                let retrying = self.slots.get(&name).is_some_and(|s| {
                    s.waiting
                        .as_ref()
                        .is_some_and(|w| w.0 == "ErrImagePull" || w.0 == "ImagePullBackOff")
                });
                let (reason, message) = if retrying && reason == "ErrImagePull" {
                    self.event(
                        Some(&name),
                        false,
                        "BackOff",
                        &format!("Back-off pulling image \"{image}\""),
                    )
                    .await;
                    (
                        "ImagePullBackOff".to_string(),
                        format!("Back-off pulling image \"{image}\": {message}"),
                    )
                } else {
                    (reason, message)
                };
                self.hold(&name, reason, message);
                return;
            }
        };
        let config = match self.container_config(container, &image_id).await {
            Ok(c) => c,
            Err(e) => {
                self.event(Some(&name), true, "Failed", &format!("Error: {e}"))
                    .await;
                self.hold(&name, "CreateContainerConfigError".into(), e);
                return;
            }
        };
        let Some(sandbox) = &self.sandbox else { return };
        let sandbox_id = sandbox.id.clone();
        let sandbox_config =
            match podconfig::sandbox_config(&self.pod, &self.ctx.config, sandbox.attempt) {
                Ok(c) => c,
                Err(e) => {
                    self.hold(&name, "CreateContainerConfigError".into(), e);
                    return;
                }
            };
        let restart_count = config
            .metadata
            .as_ref()
            .map(|m| m.attempt as i32)
            .unwrap_or(0);
        let id = match self
            .ctx
            .runtime
            .create_container(&sandbox_id, config, sandbox_config)
            .await
        {
            Ok(id) => id,
            Err(e) => {
                self.event(
                    Some(&name),
                    true,
                    "Failed",
                    &format!("Error: {}", e.message),
                )
                .await;
                self.hold(&name, "CreateContainerError".into(), e.message);
                return;
            }
        };
        self.event(
            Some(&name),
            false,
            "Created",
            &format!("Created container: {name}"),
        )
        .await;
        let started = self.ctx.runtime.start_container(&id).await;
        let slot = self.slots.entry(name.clone()).or_default();
        let restarted = slot.current.is_some();
        let mut garbage = None;
        if let Some(old) = slot.current.take() {
            // Instances older than the last termination are garbage.
            garbage = slot
                .previous
                .take()
                .map(|o| o.id)
                .filter(|id| *id != old.id);
            slot.previous = old.status.clone();
        }
        slot.restart_count = restart_count;
        if restarted {
            slot.backoff = Some(next_backoff(slot.backoff));
        }
        slot.waiting = None;
        slot.hold = None;
        if let Some(id) = garbage {
            let _ = self.ctx.runtime.remove_container(&id).await;
        }
        let slot = self.slots.entry(name.clone()).or_default();
        let status = self
            .ctx
            .runtime
            .container_status(&id)
            .await
            .ok()
            .flatten()
            .map(settled);
        slot.current = Some(Instance {
            id,
            status,
            verdicts: None,
            probes: CancellationToken::new(),
        });
        match started {
            Ok(()) => {
                self.event(
                    Some(&name),
                    false,
                    "Started",
                    &format!("Started container {name}"),
                )
                .await;
                self.start_probes(container);
            }
            Err(e) => {
                self.event(
                    Some(&name),
                    true,
                    "Failed",
                    &format!("Error: {}", e.message),
                )
                .await;
                if let Some(slot) = self.slots.get_mut(&name) {
                    slot.waiting = Some(("RunContainerError".into(), e.message));
                }
            }
        }
    }

    async fn container_config(
        &mut self,
        container: &Container,
        image: &str,
    ) -> Result<cri::ContainerConfig, String> {
        let mut pod = (*self.pod).clone();
        // The environment may read the pod's IP before the API has it.
        let status = pod.status.get_or_insert_with(Default::default);
        if let Some(ip) = self.sandbox.as_ref().and_then(|s| s.ips.first()) {
            status.pod_ip = Some(ip.clone());
        }
        if let Some(ip) = self.ctx.config.node_ip {
            status.host_ip = Some(ip.to_string());
        }
        let envs = env::environment(&self.ctx.client, &pod, container).await?;
        let volumes = self.volumes.clone().unwrap_or_default();
        let mut mounts = volumes::mounts(container, &volumes)?;
        let ips = self
            .sandbox
            .as_ref()
            .map(|s| s.ips.clone())
            .unwrap_or_default();
        if let Some(hosts) = hosts::write(&self.pod, &ips, &self.ctx.config)? {
            if !mounts.iter().any(|m| m.container_path == "/etc/hosts") {
                mounts.push(cri::Mount {
                    container_path: "/etc/hosts".into(),
                    host_path: hosts.display().to_string(),
                    ..Default::default()
                });
            }
        }
        let slot = self.slots.get(&container.name);
        let attempt = match slot {
            Some(s) if s.current.is_some() => s.restart_count + 1,
            Some(s) => s.restart_count,
            None => 0,
        };
        let (name, namespace, uid) = identity(&self.pod);
        let spec = self.pod.spec.clone().unwrap_or_default();
        let expand = |list: &Option<Vec<String>>| {
            list.iter()
                .flatten()
                .map(|a| podconfig::expand(a, &envs))
                .collect::<Vec<_>>()
        };
        Ok(cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: container.name.clone(),
                attempt: attempt as u32,
            }),
            image: Some(cri::ImageSpec {
                image: image.into(),
                user_specified_image: container.image.clone().unwrap_or_default(),
                ..Default::default()
            }),
            command: expand(&container.command),
            args: expand(&container.args),
            working_dir: container.working_dir.clone().unwrap_or_default(),
            envs: envs
                .iter()
                .map(|(k, v)| cri::KeyValue {
                    key: k.clone(),
                    value: v.clone(),
                })
                .collect(),
            mounts,
            labels: HashMap::from([
                (podconfig::LABEL_POD_NAME.to_string(), name),
                (podconfig::LABEL_POD_NAMESPACE.to_string(), namespace),
                (LABEL_POD_UID.to_string(), uid),
                (LABEL_CONTAINER_NAME.to_string(), container.name.clone()),
            ]),
            annotations: HashMap::from([(
                ANNOTATION_RESTART_COUNT.to_string(),
                attempt.to_string(),
            )]),
            log_path: format!("{}/{attempt}.log", container.name),
            stdin: container.stdin.unwrap_or(false),
            stdin_once: container.stdin_once.unwrap_or(false),
            tty: container.tty.unwrap_or(false),
            linux: Some(cri::LinuxContainerConfig {
                resources: Some(podconfig::linux_resources(container)?),
                security_context: Some(podconfig::security_context(&spec, container)),
            }),
            ..Default::default()
        })
    }

    fn views(&self, containers: &[Container]) -> Vec<ContainerView> {
        containers
            .iter()
            .map(|c| {
                let slot = self.slots.get(&c.name);
                let current = slot.and_then(|s| s.current.as_ref());
                let verdicts = current.and_then(|i| i.verdicts.as_ref());
                ContainerView {
                    name: c.name.clone(),
                    image: c.image.clone().unwrap_or_default(),
                    current: current.and_then(|i| i.status.clone()),
                    previous: slot.and_then(|s| s.previous.clone()),
                    restart_count: slot.map(|s| s.restart_count).unwrap_or(0),
                    waiting: slot.and_then(|s| s.waiting.clone()).or_else(|| {
                        self.setup_error
                            .as_ref()
                            .map(|e| ("ContainerCreating".to_string(), e.clone()))
                    }),
                    ready: verdicts
                        .is_none_or(|v| v.ready.load(std::sync::atomic::Ordering::SeqCst))
                        && c.readiness_probe
                            .as_ref()
                            .is_none_or(|_| verdicts.is_some()),
                    started: verdicts
                        .is_none_or(|v| v.started.load(std::sync::atomic::Ordering::SeqCst))
                        && c.startup_probe.as_ref().is_none_or(|_| verdicts.is_some()),
                }
            })
            .collect()
    }

    async fn write_status(&mut self) -> anyhow::Result<()> {
        let (init, app) = self.spec_containers();
        let host_network = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false);
        let host_ip = self.ctx.config.node_ip.map(|ip| ip.to_string());
        let pod_ips = match (&self.sandbox, host_network) {
            (_, true) => host_ip.iter().cloned().collect(),
            (Some(s), false) => s.ips.clone(),
            (None, false) => vec![],
        };
        let view = PodView {
            pod: &self.pod,
            init: self.views(&init),
            containers: self.views(&app),
            sandbox_ready: self.sandbox.is_some() && !self.terminal,
            pod_ips,
            host_ip,
            now: Timestamp::now(),
        };
        let mut status = status::pod_status(&view);
        let phase = status.phase.clone().unwrap_or_default();
        if !self.terminal && (phase == "Succeeded" || phase == "Failed") {
            // A finished pod's sandbox goes (its network with it); its status stays.
            self.terminal = true;
            if let Some(sandbox) = &self.sandbox {
                if let Err(e) = self.ctx.runtime.stop_sandbox(&sandbox.id).await {
                    warn!(pod = %self.name(), "stopping the finished pod's sandbox: {e}");
                }
            }
            info!(pod = %self.name(), phase, "pod finished");
        }
        // Compare without the times that move by themselves.
        let mut comparable = serde_json::to_value(&status)?;
        comparable["startTime"] = serde_json::Value::Null;
        let due = self.from_file
            && self
                .written_at
                .is_none_or(|at| at.elapsed() >= STATIC_REWRITE);
        if self.written.as_ref() == Some(&comparable) && !due {
            return Ok(());
        }
        if self.terminal {
            if let Some(c) = status.conditions.as_mut() {
                c.retain(|c| c.type_ != "PodReadyToStartContainers" || c.status == "False");
            }
        }
        let (name, namespace, _) = identity(&self.pod);
        let api: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &namespace);
        let mut patch = serde_json::json!({"status": status});
        // Conditions merge by type: a reason or message that no longer holds is cleared.
        for condition in patch["status"]["conditions"]
            .as_array_mut()
            .into_iter()
            .flatten()
        {
            for key in ["reason", "message"] {
                if condition.get(key).is_none() {
                    condition[key] = serde_json::Value::Null;
                }
            }
        }
        match api
            .patch_status(&name, &PatchParams::default(), &Patch::Strategic(&patch))
            .await
        {
            Ok(_) => {
                self.written = Some(comparable);
                self.written_at = Some(Instant::now());
                // The next status keeps this one's transition times (a static pod has no
                // other copy of them).
                Arc::make_mut(&mut self.pod).status = Some(status);
                Ok(())
            }
            // No such pod (a static pod's mirror not made yet): written when it is.
            Err(kube::Error::Api(s)) if s.code == 404 => {
                self.written = None;
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// A container's CRI status as the kubelet judges it: one that was created but could not be
/// started (or whose state the runtime lost) has ended, with exit code 128, and restarts by the
/// pod's policy.
fn settled(mut status: cri::ContainerStatus) -> cri::ContainerStatus {
    use cri::ContainerState as S;
    let state = S::try_from(status.state).unwrap_or(S::ContainerUnknown);
    if matches!(state, S::ContainerCreated | S::ContainerUnknown) {
        status.reason = if state == S::ContainerCreated {
            "StartError".into()
        } else {
            "ContainerStatusUnknown".into()
        };
        status.state = S::ContainerExited as i32;
        status.exit_code = 128;
        if status.finished_at == 0 {
            status.finished_at = status.created_at;
        }
    }
    status
}

fn sandbox_ips(status: &Option<cri::PodSandboxStatus>) -> Vec<String> {
    let Some(network) = status.as_ref().and_then(|s| s.network.as_ref()) else {
        return vec![];
    };
    std::iter::once(network.ip.clone())
        .chain(network.additional_ips.iter().map(|p| p.ip.clone()))
        .filter(|ip| !ip.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_five_minutes() {
        let mut d = None;
        let mut seen = vec![];
        for _ in 0..7 {
            let next = next_backoff(d);
            seen.push(next.as_secs());
            d = Some(next);
        }
        assert_eq!(seen, [10, 20, 40, 80, 160, 300, 300]);
    }

    #[test]
    fn pull_policy_defaults_as_kubernetes() {
        let c = |image: &str| Container {
            image: Some(image.into()),
            ..Default::default()
        };
        assert_eq!(pull_policy(&c("busybox")), "Always");
        assert_eq!(pull_policy(&c("busybox:latest")), "Always");
        assert_eq!(pull_policy(&c("localhost:5000/busybox")), "Always");
        assert_eq!(pull_policy(&c("seine/echo:0.1")), "IfNotPresent");
        assert_eq!(pull_policy(&c("busybox@sha256:abc")), "IfNotPresent");
    }
}
