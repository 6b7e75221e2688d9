//! A pod's status as the kubelet writes it, from what the runtime says of its sandbox and
//! containers: container states (with the last termination), restart counts, readiness, the
//! phase by the kubelet's rules, and the conditions with their transition times kept.

use k8s_cri::v1 as cri;
use k8s_openapi::{
    api::core::v1::{
        ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
        ContainerStatus, HostIP, Pod, PodCondition, PodIP, PodStatus,
    },
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};

/// One container of the spec as it stands on the node.
#[derive(Debug, Clone, Default)]
pub struct ContainerView {
    pub name: String,
    pub image: String,
    /// The newest instance.
    pub current: Option<cri::ContainerStatus>,
    /// The instance before it, when the newest is still running or being created.
    pub previous: Option<cri::ContainerStatus>,
    pub restart_count: i32,
    /// Why the container is not running: (reason, message), such as CrashLoopBackOff.
    pub waiting: Option<(String, String)>,
    /// The readiness verdict (true when running without a readiness probe).
    pub ready: bool,
    /// The startup verdict (true when running without a startup probe).
    pub started: bool,
}

/// The pod on the node, for its status.
pub struct PodView<'a> {
    pub pod: &'a Pod,
    pub init: Vec<ContainerView>,
    pub containers: Vec<ContainerView>,
    pub sandbox_ready: bool,
    pub pod_ips: Vec<String>,
    pub host_ip: Option<String>,
    pub now: Timestamp,
}

fn time(nanos: i64) -> Option<Time> {
    (nanos > 0)
        .then(|| Timestamp::from_nanosecond(i128::from(nanos)).ok().map(Time))
        .flatten()
}

pub fn container_id(id: &str) -> String {
    format!("containerd://{id}")
}

fn exited(status: &cri::ContainerStatus) -> bool {
    status.state == cri::ContainerState::ContainerExited as i32
}

fn terminated(status: &cri::ContainerStatus) -> ContainerStateTerminated {
    let reason = if !status.reason.is_empty() {
        status.reason.clone()
    } else if status.exit_code == 0 {
        "Completed".into()
    } else {
        "Error".into()
    };
    ContainerStateTerminated {
        exit_code: status.exit_code,
        reason: Some(reason),
        message: (!status.message.is_empty()).then(|| status.message.clone()),
        started_at: time(status.started_at),
        finished_at: time(status.finished_at),
        container_id: Some(container_id(&status.id)),
        signal: None,
    }
}

fn state(status: &cri::ContainerStatus) -> ContainerState {
    use cri::ContainerState as S;
    match S::try_from(status.state).unwrap_or(S::ContainerUnknown) {
        S::ContainerRunning => ContainerState {
            running: Some(ContainerStateRunning {
                started_at: time(status.started_at),
            }),
            ..Default::default()
        },
        S::ContainerExited => ContainerState {
            terminated: Some(terminated(status)),
            ..Default::default()
        },
        S::ContainerCreated => waiting("ContainerCreating", ""),
        S::ContainerUnknown => waiting(
            "ContainerStatusUnknown",
            "the runtime does not know the container's state",
        ),
    }
}

fn waiting(reason: &str, message: &str) -> ContainerState {
    ContainerState {
        waiting: Some(ContainerStateWaiting {
            reason: Some(reason.into()),
            message: (!message.is_empty()).then(|| message.into()),
        }),
        ..Default::default()
    }
}

pub fn container_status(view: &ContainerView) -> ContainerStatus {
    let (state, last) = match (&view.current, &view.waiting) {
        // Exited and held back (a back-off, an error starting the next instance).
        (Some(current), Some((reason, message))) if exited(current) => (
            waiting(reason, message),
            Some(ContainerState {
                terminated: Some(terminated(current)),
                ..Default::default()
            }),
        ),
        (Some(current), _) => (
            state(current),
            view.previous.as_ref().map(|p| ContainerState {
                terminated: Some(terminated(p)),
                ..Default::default()
            }),
        ),
        (None, Some((reason, message))) => (waiting(reason, message), None),
        (None, None) => (waiting("ContainerCreating", ""), None),
    };
    let running = state.running.is_some();
    ContainerStatus {
        name: view.name.clone(),
        image: view.image.clone(),
        image_id: view
            .current
            .as_ref()
            .map(|c| c.image_ref.clone())
            .unwrap_or_default(),
        container_id: view.current.as_ref().map(|c| container_id(&c.id)),
        ready: running && view.ready,
        started: Some(running && view.started),
        restart_count: view.restart_count,
        state: Some(state),
        last_state: last,
        ..Default::default()
    }
}

fn restart_policy(pod: &Pod) -> &str {
    pod.spec
        .as_ref()
        .and_then(|s| s.restart_policy.as_deref())
        .unwrap_or("Always")
}

/// Whether a container that exited with `code` runs again under the pod's restart policy.
pub fn restarts(pod: &Pod, code: i32) -> bool {
    match restart_policy(pod) {
        "Never" => false,
        "OnFailure" => code != 0,
        _ => true,
    }
}

/// Whether init container `view` has finished its work (exited 0).
pub fn init_done(view: &ContainerView) -> bool {
    view.current
        .as_ref()
        .is_some_and(|c| exited(c) && c.exit_code == 0)
}

/// Whether an init container failed for good (exited non-zero, and the pod does not restart it).
pub fn init_failed(pod: &Pod, view: &ContainerView) -> bool {
    view.current
        .as_ref()
        .is_some_and(|c| exited(c) && c.exit_code != 0 && restart_policy(pod) == "Never")
}

/// The pod's phase by the kubelet's rules.
pub fn phase(view: &PodView) -> &'static str {
    if view.init.iter().any(|c| init_failed(view.pod, c)) {
        return "Failed";
    }
    if !view.init.iter().all(init_done) {
        return "Pending";
    }
    let (mut waiting, mut running, mut stopped, mut succeeded) = (0, 0, 0, 0);
    for c in &view.containers {
        match &c.current {
            Some(s) if s.state == cri::ContainerState::ContainerRunning as i32 => running += 1,
            Some(s) if exited(s) => {
                stopped += 1;
                if s.exit_code == 0 {
                    succeeded += 1;
                }
            }
            _ => waiting += 1,
        }
    }
    if waiting > 0 {
        return "Pending";
    }
    if running > 0 {
        return "Running";
    }
    if stopped == 0 {
        return "Pending";
    }
    match restart_policy(view.pod) {
        "Always" => "Running",
        "OnFailure" if succeeded < stopped => "Running",
        _ if succeeded == stopped => "Succeeded",
        _ => "Failed",
    }
}

fn condition(
    previous: &[PodCondition],
    type_: &str,
    holds: bool,
    reason: Option<String>,
    message: Option<String>,
    now: Timestamp,
) -> PodCondition {
    let status = if holds { "True" } else { "False" }.to_string();
    let transition = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .and_then(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    PodCondition {
        type_: type_.into(),
        status,
        reason: if holds { None } else { reason },
        message: if holds { None } else { message },
        last_transition_time: Some(transition),
        last_probe_time: None,
        ..Default::default()
    }
}

/// The status to write: everything the kubelet owns, with what others own kept (PodScheduled,
/// DisruptionTarget and other conditions, nominatedNodeName, qosClass).
pub fn pod_status(view: &PodView) -> PodStatus {
    let current = view.pod.status.clone().unwrap_or_default();
    let previous = current.conditions.clone().unwrap_or_default();
    let init: Vec<ContainerStatus> = view.init.iter().map(container_status).collect();
    let containers: Vec<ContainerStatus> = view.containers.iter().map(container_status).collect();
    let phase = phase(view);
    let names = |list: &[ContainerStatus], pick: &dyn Fn(&ContainerStatus) -> bool| {
        list.iter()
            .filter(|c| pick(c))
            .map(|c| c.name.clone())
            .collect::<Vec<_>>()
    };
    let incomplete = names(&init, &|c| {
        c.state
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .is_none_or(|t| t.exit_code != 0)
    });
    let terminal = phase == "Succeeded" || phase == "Failed";
    let unready = names(&containers, &|c| !c.ready);
    let ready = unready.is_empty() && !terminal;
    let list = |names: &[String]| format!("[{}]", names.join(" "));
    let mut conditions = vec![
        condition(
            &previous,
            "PodReadyToStartContainers",
            view.sandbox_ready,
            None,
            None,
            view.now,
        ),
        condition(
            &previous,
            "Initialized",
            incomplete.is_empty(),
            Some("ContainersNotInitialized".into()),
            Some(format!(
                "containers with incomplete status: {}",
                list(&incomplete)
            )),
            view.now,
        ),
        condition(
            &previous,
            "ContainersReady",
            ready,
            Some(
                if terminal {
                    "PodCompleted"
                } else {
                    "ContainersNotReady"
                }
                .into(),
            ),
            (!terminal).then(|| format!("containers with unready status: {}", list(&unready))),
            view.now,
        ),
        condition(
            &previous,
            "Ready",
            ready,
            Some(
                if terminal {
                    "PodCompleted"
                } else {
                    "ContainersNotReady"
                }
                .into(),
            ),
            (!terminal).then(|| format!("containers with unready status: {}", list(&unready))),
            view.now,
        ),
    ];
    // A pod on the node is scheduled, however it got here (the kubelet says so too).
    if !previous.iter().any(|c| c.type_ == "PodScheduled") {
        conditions.push(condition(
            &previous,
            "PodScheduled",
            true,
            None,
            None,
            view.now,
        ));
    }
    // Conditions of others (PodScheduled, DisruptionTarget, readiness gates) stay.
    let ours = [
        "PodReadyToStartContainers",
        "Initialized",
        "ContainersReady",
        "Ready",
    ];
    conditions.extend(
        previous
            .iter()
            .filter(|c| !ours.contains(&c.type_.as_str()))
            .cloned(),
    );
    conditions.sort_by_key(|c| {
        [
            "PodReadyToStartContainers",
            "Initialized",
            "Ready",
            "ContainersReady",
            "PodScheduled",
        ]
        .iter()
        .position(|t| *t == c.type_)
        .unwrap_or(9)
    });
    PodStatus {
        phase: Some(phase.into()),
        conditions: Some(conditions),
        host_ip: view.host_ip.clone(),
        host_ips: view.host_ip.clone().map(|ip| vec![HostIP { ip }]),
        pod_ip: view.pod_ips.first().cloned(),
        pod_ips: (!view.pod_ips.is_empty()).then(|| {
            view.pod_ips
                .iter()
                .map(|ip| PodIP { ip: ip.clone() })
                .collect()
        }),
        start_time: current.start_time.clone().or(Some(Time(view.now))),
        init_container_statuses: (!init.is_empty()).then_some(init),
        container_statuses: Some(containers),
        qos_class: current.qos_class.clone(),
        nominated_node_name: current.nominated_node_name.clone(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(policy: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "d", "uid": "u"},
            "spec": {"restartPolicy": policy, "containers": [{"name": "c", "image": "i"}]},
            "status": {"conditions": [{"type": "PodScheduled", "status": "True"}]}
        }))
        .unwrap()
    }

    fn instance(state: cri::ContainerState, code: i32) -> cri::ContainerStatus {
        cri::ContainerStatus {
            id: "abc".into(),
            state: state as i32,
            exit_code: code,
            started_at: 1_000_000_000_000,
            finished_at: if state == cri::ContainerState::ContainerExited {
                2_000_000_000_000
            } else {
                0
            },
            image_ref: "sha256:1".into(),
            ..Default::default()
        }
    }

    fn view<'a>(pod: &'a Pod, c: ContainerView) -> PodView<'a> {
        PodView {
            pod,
            init: vec![],
            containers: vec![c],
            sandbox_ready: true,
            pod_ips: vec!["10.244.1.5".into()],
            host_ip: Some("192.168.50.11".into()),
            now: Timestamp::from_second(3_000).unwrap(),
        }
    }

    #[test]
    fn a_running_container_makes_a_ready_running_pod() {
        let p = pod("Always");
        let c = ContainerView {
            name: "c".into(),
            current: Some(instance(cri::ContainerState::ContainerRunning, 0)),
            ready: true,
            started: true,
            ..Default::default()
        };
        let status = pod_status(&view(&p, c));
        assert_eq!(status.phase.as_deref(), Some("Running"));
        assert_eq!(status.pod_ip.as_deref(), Some("10.244.1.5"));
        let conditions = status.conditions.unwrap();
        let get = |t: &str| {
            conditions
                .iter()
                .find(|c| c.type_ == t)
                .unwrap()
                .status
                .clone()
        };
        assert_eq!(get("Ready"), "True");
        assert_eq!(get("PodScheduled"), "True");
        let cs = &status.container_statuses.unwrap()[0];
        assert!(cs.ready);
        assert_eq!(cs.container_id.as_deref(), Some("containerd://abc"));
        assert!(cs.state.as_ref().unwrap().running.is_some());
    }

    #[test]
    fn a_crash_loop_shows_waiting_with_the_last_termination() {
        let p = pod("Always");
        let c = ContainerView {
            name: "c".into(),
            current: Some(instance(cri::ContainerState::ContainerExited, 3)),
            restart_count: 2,
            waiting: Some(("CrashLoopBackOff".into(), "back-off 20s".into())),
            ..Default::default()
        };
        let status = pod_status(&view(&p, c));
        assert_eq!(status.phase.as_deref(), Some("Running"));
        let cs = &status.container_statuses.unwrap()[0];
        let state = cs.state.as_ref().unwrap();
        assert_eq!(
            state.waiting.as_ref().unwrap().reason.as_deref(),
            Some("CrashLoopBackOff")
        );
        let last = cs.last_state.as_ref().unwrap().terminated.as_ref().unwrap();
        assert_eq!((last.exit_code, last.reason.as_deref()), (3, Some("Error")));
        assert_eq!(cs.restart_count, 2);
        assert!(!cs.ready);
    }

    #[test]
    fn phases_follow_the_restart_policy() {
        let exited = |code| ContainerView {
            name: "c".into(),
            current: Some(instance(cri::ContainerState::ContainerExited, code)),
            ..Default::default()
        };
        assert_eq!(phase(&view(&pod("Never"), exited(0))), "Succeeded");
        assert_eq!(phase(&view(&pod("Never"), exited(1))), "Failed");
        assert_eq!(phase(&view(&pod("OnFailure"), exited(1))), "Running");
        assert_eq!(phase(&view(&pod("OnFailure"), exited(0))), "Succeeded");
        assert_eq!(
            phase(&view(&pod("Always"), ContainerView::default())),
            "Pending"
        );
        assert!(!restarts(&pod("OnFailure"), 0) && restarts(&pod("OnFailure"), 1));
    }

    #[test]
    fn transition_times_stay_while_a_condition_holds() {
        let mut p = pod("Always");
        p.status
            .as_mut()
            .unwrap()
            .conditions
            .as_mut()
            .unwrap()
            .push(PodCondition {
                type_: "Ready".into(),
                status: "False".into(),
                last_transition_time: Some(Time(Timestamp::from_second(5).unwrap())),
                ..Default::default()
            });
        let status = pod_status(&view(
            &p,
            ContainerView {
                name: "c".into(),
                ..Default::default()
            },
        ));
        let ready = status
            .conditions
            .unwrap()
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(
            ready.last_transition_time,
            Some(Time(Timestamp::from_second(5).unwrap()))
        );
        assert_eq!(
            ready.message.as_deref(),
            Some("containers with unready status: [c]")
        );
    }
}
