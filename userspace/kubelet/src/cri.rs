//! The container runtime, through the CRI's v1 gRPC services (`RuntimeService`, `ImageService`)
//! on a unix socket, as the kubelet's remote runtime: one channel, a deadline on every call, and
//! errors that name the call and carry the runtime's message.

use std::{collections::HashMap, path::PathBuf, time::Duration};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::{
    image_service_client::ImageServiceClient, runtime_service_client::RuntimeServiceClient, *,
};
use tonic::transport::{Channel, Endpoint, Uri};

/// The deadline of a call (the kubelet's `--runtime-request-timeout` is 2 minutes; sandboxes
/// with CNI and image pulls may take that long).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
#[error("CRI {call}: {message}")]
pub struct CriError {
    pub call: &'static str,
    pub code: tonic::Code,
    pub message: String,
}

impl CriError {
    fn from_status(call: &'static str, status: tonic::Status) -> Self {
        CriError {
            call,
            code: status.code(),
            message: status.message().to_string(),
        }
    }

    pub fn not_found(&self) -> bool {
        self.code == tonic::Code::NotFound
    }
}

pub type CriResult<T> = Result<T, CriError>;

/// A CRI runtime's clients on one channel (cheap to clone).
#[derive(Clone)]
pub struct Runtime {
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    pub endpoint: String,
}

/// The runtime's name and version, for `status.nodeInfo.containerRuntimeVersion`.
#[derive(Debug, Clone)]
pub struct RuntimeVersion {
    pub name: String,
    pub version: String,
}

/// What `Status` says: the runtime's and the network plugin's readiness with their reasons.
#[derive(Debug, Clone, Default)]
pub struct RuntimeHealth {
    pub runtime_ready: Option<String>,
    pub network_ready: Option<String>,
}

impl RuntimeHealth {
    /// The message of the Node's Ready condition when not ready, in the kubelet's words.
    pub fn not_ready_message(&self) -> Option<String> {
        if let Some(why) = &self.runtime_ready {
            return Some(format!("container runtime is down: {why}"));
        }
        self.network_ready
            .as_ref()
            .map(|why| format!("container runtime network not ready: NetworkReady=false {why}"))
    }
}

/// The socket path of `unix:///run/containerd/containerd.sock` (or of a bare path).
pub fn socket_path(endpoint: &str) -> PathBuf {
    PathBuf::from(endpoint.strip_prefix("unix://").unwrap_or(endpoint))
}

fn request<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(CALL_TIMEOUT);
    request
}

macro_rules! call {
    ($self:ident . $client:ident . $method:ident ($msg:expr)) => {
        $self
            .$client
            .clone()
            .$method(request($msg))
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| CriError::from_status(stringify!($method), s))
    };
}

impl Runtime {
    /// Connects lazily: a runtime that is not up yet is reported by the first call, and the
    /// channel reconnects when the runtime comes back.
    pub fn connect(endpoint: &str) -> anyhow::Result<Self> {
        let path = socket_path(endpoint);
        // The URI is a placeholder: the connector dials the socket.
        let channel = Endpoint::try_from("http://[::1]:0")?
            .connect_timeout(Duration::from_secs(5))
            .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }));
        Ok(Runtime {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
            endpoint: endpoint.to_string(),
        })
    }

    pub async fn version(&self) -> CriResult<RuntimeVersion> {
        let v = call!(self.runtime.version(VersionRequest {
            version: "v1".into()
        }))?;
        Ok(RuntimeVersion {
            name: v.runtime_name,
            version: v.runtime_version,
        })
    }

    pub async fn health(&self) -> CriResult<RuntimeHealth> {
        let status = call!(self.runtime.status(StatusRequest { verbose: false }))?;
        let mut health = RuntimeHealth::default();
        let conditions = status.status.map(|s| s.conditions).unwrap_or_default();
        let reason = |type_: &str| -> Option<String> {
            match conditions.iter().find(|c| c.r#type == type_) {
                Some(c) if c.status => None,
                Some(c) => Some(format!("reason:{} message:{}", c.reason, c.message)),
                None => Some(format!("the runtime reports no {type_} condition")),
            }
        };
        health.runtime_ready = reason("RuntimeReady");
        health.network_ready = reason("NetworkReady");
        Ok(health)
    }

    /// The image's ID when present on the node.
    pub async fn image_id(&self, image: &str) -> CriResult<Option<String>> {
        let status = call!(self.images.image_status(ImageStatusRequest {
            image: Some(ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            verbose: false,
        }))?;
        Ok(status.image.map(|i| i.id))
    }

    /// Pulls `image`; returns its reference.
    pub async fn pull(&self, image: &str) -> CriResult<String> {
        let pulled = call!(self.images.pull_image(PullImageRequest {
            image: Some(ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            ..Default::default()
        }))?;
        Ok(pulled.image_ref)
    }

    pub async fn run_sandbox(&self, config: PodSandboxConfig) -> CriResult<String> {
        let run = call!(self.runtime.run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config),
            runtime_handler: String::new(),
        }))?;
        Ok(run.pod_sandbox_id)
    }

    pub async fn sandbox_status(&self, id: &str) -> CriResult<Option<PodSandboxStatus>> {
        let status = call!(self.runtime.pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose: false,
        }))?;
        Ok(status.status)
    }

    /// The sandboxes whose labels include `labels`.
    pub async fn sandboxes(&self, labels: HashMap<String, String>) -> CriResult<Vec<PodSandbox>> {
        let list = call!(self.runtime.list_pod_sandbox(ListPodSandboxRequest {
            filter: Some(PodSandboxFilter {
                label_selector: labels,
                ..Default::default()
            }),
        }))?;
        Ok(list.items)
    }

    pub async fn stop_sandbox(&self, id: &str) -> CriResult<()> {
        call!(self.runtime.stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: id.into()
        }))
        .map(drop)
    }

    pub async fn remove_sandbox(&self, id: &str) -> CriResult<()> {
        call!(self.runtime.remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: id.into()
        }))
        .map(drop)
    }

    pub async fn create_container(
        &self,
        sandbox: &str,
        config: ContainerConfig,
        sandbox_config: PodSandboxConfig,
    ) -> CriResult<String> {
        let created = call!(self.runtime.create_container(CreateContainerRequest {
            pod_sandbox_id: sandbox.into(),
            config: Some(config),
            sandbox_config: Some(sandbox_config),
        }))?;
        Ok(created.container_id)
    }

    pub async fn start_container(&self, id: &str) -> CriResult<()> {
        call!(self.runtime.start_container(StartContainerRequest {
            container_id: id.into()
        }))
        .map(drop)
    }

    /// Stops a container: its stop signal, then SIGKILL after `grace`.
    pub async fn stop_container(&self, id: &str, grace: Duration) -> CriResult<()> {
        let mut request = request(StopContainerRequest {
            container_id: id.into(),
            timeout: grace.as_secs() as i64,
        });
        request.set_timeout(CALL_TIMEOUT + grace);
        self.runtime
            .clone()
            .stop_container(request)
            .await
            .map(drop)
            .map_err(|s| CriError::from_status("stop_container", s))
    }

    pub async fn remove_container(&self, id: &str) -> CriResult<()> {
        call!(self.runtime.remove_container(RemoveContainerRequest {
            container_id: id.into()
        }))
        .map(drop)
    }

    /// The containers of a sandbox.
    pub async fn containers(&self, sandbox: &str) -> CriResult<Vec<Container>> {
        let list = call!(self.runtime.list_containers(ListContainersRequest {
            filter: Some(ContainerFilter {
                pod_sandbox_id: sandbox.into(),
                ..Default::default()
            }),
        }))?;
        Ok(list.containers)
    }

    pub async fn container_status(&self, id: &str) -> CriResult<Option<ContainerStatus>> {
        let status = call!(self.runtime.container_status(ContainerStatusRequest {
            container_id: id.into(),
            verbose: false,
        }))?;
        Ok(status.status)
    }

    /// Runs `cmd` in a container and waits for it (an exec probe): stdout, stderr, exit code.
    pub async fn exec_sync(
        &self,
        id: &str,
        cmd: Vec<String>,
        timeout: Duration,
    ) -> CriResult<ExecSyncResponse> {
        let mut request = request(ExecSyncRequest {
            container_id: id.into(),
            cmd,
            timeout: timeout.as_secs().max(1) as i64,
        });
        request.set_timeout(timeout + Duration::from_secs(5));
        self.runtime
            .clone()
            .exec_sync(request)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| CriError::from_status("exec_sync", s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_name_their_socket() {
        assert_eq!(
            socket_path("unix:///run/containerd/containerd.sock"),
            PathBuf::from("/run/containerd/containerd.sock")
        );
        assert_eq!(socket_path("/tmp/c.sock"), PathBuf::from("/tmp/c.sock"));
    }

    #[test]
    fn not_ready_messages_read_as_the_kubelets() {
        let health = RuntimeHealth {
            runtime_ready: None,
            network_ready: Some(
                "reason:NetworkPluginNotReady message:cni plugin not initialized".into(),
            ),
        };
        assert_eq!(
            health.not_ready_message().unwrap(),
            "container runtime network not ready: NetworkReady=false reason:NetworkPluginNotReady message:cni plugin not initialized"
        );
        assert_eq!(RuntimeHealth::default().not_ready_message(), None);
    }
}
