//! The API client every daemon builds the same way.

use std::path::Path;

use anyhow::Context as _;
use kube::{
    config::{KubeConfigOptions, Kubeconfig},
    Client, Config,
};

/// The API client: from `kubeconfig` when given (its current context), else what kube infers
/// (in-cluster: a pod's service account; then `$KUBECONFIG` or `~/.kube/config`).
pub async fn client(kubeconfig: Option<&Path>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path)
                .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("the kubeconfig {}", path.display()))?
        }
        None => Config::infer()
            .await
            .context("no --kubeconfig, and no in-cluster or default configuration")?,
    };
    Client::try_from(config).context("building the API client")
}
