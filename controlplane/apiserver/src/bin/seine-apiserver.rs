//! seine-apiserver: the Kubernetes API on etcd, over HTTPS, with kube-apiserver's flag names.

use std::{net::IpAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use clap::Parser;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
    service::TowerToHyperService,
};
use rand::Rng as _;
use seine_apiserver::{
    api::{
        self,
        registry::alloc::ServiceRanges,
        security::{
            auth::{certificate_user, Authenticator, CertificateUser, TokenAuthenticator, User},
            rbac::Authorizer,
            sa_token::TokenSigner,
            tls,
        },
        ApiState,
    },
    storage::Storage,
    watch_cache::WatchCaches,
};
use tower::ServiceExt as _;
use tracing::{info, warn};

#[derive(Parser)]
#[command(
    name = "seine-apiserver",
    version,
    about = "A Kubernetes-compatible API server on etcd"
)]
struct Args {
    /// etcd client URLs, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    etcd_servers: Vec<String>,
    #[arg(long, default_value = "0.0.0.0")]
    bind_address: IpAddr,
    #[arg(long, default_value_t = 6443)]
    secure_port: u16,
    /// Bearer tokens: token,user,uid[,"group1,group2"] per line.
    #[arg(long)]
    token_auth_file: Option<PathBuf>,
    /// Serving certificate; without it one is generated under --cert-dir.
    #[arg(long, requires = "tls_private_key_file")]
    tls_cert_file: Option<PathBuf>,
    #[arg(long, requires = "tls_cert_file")]
    tls_private_key_file: Option<PathBuf>,
    /// Where generated certificates and the admin token are kept.
    #[arg(long, default_value = "/var/lib/seine/apiserver")]
    cert_dir: PathBuf,
    /// Write an admin kubeconfig for this server here.
    #[arg(long)]
    write_kubeconfig: Option<PathBuf>,
    /// Recent changes kept per resource for watchers resuming from a resourceVersion; older
    /// resourceVersions get 410 Gone.
    #[arg(long, default_value_t = 10_000)]
    watch_cache_size: usize,
    /// Service ClusterIPs come from this range; its first address is the `kubernetes` service's.
    #[arg(long, default_value = "10.96.0.0/12")]
    service_cluster_ip_range: String,
    /// NodePorts come from this range.
    #[arg(long, default_value = "30000-32767")]
    service_node_port_range: String,
    /// Client certificates signed by this CA authenticate (CN = user, O = groups); default: the
    /// generated CA.
    #[arg(long)]
    client_ca_file: Option<PathBuf>,
    /// The key service account tokens are signed with (PKCS#8 P-256 PEM); created under
    /// --cert-dir when not given.
    #[arg(long)]
    service_account_signing_key_file: Option<PathBuf>,
    #[arg(long, default_value = "https://kubernetes.default.svc.cluster.local")]
    service_account_issuer: String,
    /// Audiences tokens must name (default: the issuer).
    #[arg(long, value_delimiter = ',')]
    api_audiences: Vec<String>,
    /// RBAC, or AlwaysAllow (every authenticated request is allowed).
    #[arg(long, default_value = "RBAC", value_parser = ["RBAC", "AlwaysAllow"])]
    authorization_mode: String,
    /// The address the `kubernetes` service's endpoints point at (default: --bind-address, or
    /// 127.0.0.1 when that is unspecified).
    #[arg(long)]
    advertise_address: Option<IpAddr>,
}

fn main() -> ExitCode {
    seine_component_base::init_logging(false, "info");
    let args = Args::parse();
    seine_component_base::block_on("seine-apiserver", run(args))
}

async fn run(args: Args) -> Result<()> {
    let mut tokens = TokenAuthenticator::default();
    if let Some(path) = &args.token_auth_file {
        tokens.load(path).map_err(anyhow::Error::msg)?;
    }
    std::fs::create_dir_all(&args.cert_dir)
        .with_context(|| format!("creating {}", args.cert_dir.display()))?;
    let admin_token = admin_token(&args.cert_dir)?;
    tokens.add(
        &admin_token,
        User {
            name: "admin".into(),
            uid: "admin".into(),
            groups: vec!["system:masters".into()],
        },
    );

    let files = match (&args.tls_cert_file, &args.tls_private_key_file) {
        (Some(cert), Some(key)) => tls::ServingFiles {
            cert: cert.clone(),
            key: key.clone(),
            ca: None,
        },
        _ => {
            let mut addresses = vec![IpAddr::from([127, 0, 0, 1])];
            if !args.bind_address.is_unspecified() {
                addresses.push(args.bind_address);
            }
            tls::ensure_generated(&args.cert_dir, &addresses)?
        }
    };
    let client_ca = args.client_ca_file.clone().or_else(|| files.ca.clone());
    let tls_config = tls::server_config(&files.cert, &files.key, client_ca.as_deref())?;
    let signer = TokenSigner::load_or_generate(
        &args
            .service_account_signing_key_file
            .clone()
            .unwrap_or_else(|| args.cert_dir.join("sa.key")),
        &args.service_account_issuer,
        if args.api_audiences.is_empty() {
            vec![args.service_account_issuer.clone()]
        } else {
            args.api_audiences.clone()
        },
    )?;

    let ranges = ServiceRanges::parse(
        &args.service_cluster_ip_range,
        &args.service_node_port_range,
    )
    .map_err(anyhow::Error::msg)
    .context("--service-cluster-ip-range / --service-node-port-range")?;
    let storage = Storage::connect(&args.etcd_servers)
        .await
        .context("connecting to etcd")?;

    let listen = std::net::SocketAddr::new(args.bind_address, args.secure_port);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    let local = listener.local_addr()?;
    let watches = Arc::new(WatchCaches::start(
        &storage,
        api::registry::resources::RESOURCES
            .iter()
            .filter(|r| !r.review)
            .map(|r| r.storage_name()),
        args.watch_cache_size,
    ));
    let authorizer = Authorizer::new();
    tokio::spawn(authorizer.clone().follow(storage.clone(), watches.clone()));
    let state = Arc::new(ApiState {
        storage,
        auth: Authenticator { tokens, signer },
        authorizer,
        authorize: args.authorization_mode == "RBAC",
        metrics: Arc::default(),
        watches,
        ranges,
        openapi: api::http::openapi::OpenApi::build(),
    });
    let advertise = args
        .advertise_address
        .unwrap_or(if args.bind_address.is_unspecified() {
            IpAddr::from([127, 0, 0, 1])
        } else {
            args.bind_address
        });
    // Retried until etcd answers: the server starts before etcd is reachable, as kube-apiserver does.
    loop {
        match api::bootstrap::bootstrap(&state, std::net::SocketAddr::new(advertise, local.port()))
            .await
        {
            Ok(()) => break,
            Err(e) => {
                warn!(
                    "creating the system namespaces and the kubernetes service: {}; retrying",
                    e.message
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }

    if let Some(path) = &args.write_kubeconfig {
        let host = if args.bind_address.is_unspecified() {
            IpAddr::from([127, 0, 0, 1])
        } else {
            args.bind_address
        };
        let server = format!("https://{}", std::net::SocketAddr::new(host, local.port()));
        let config = tls::kubeconfig(&server, files.ca.as_deref(), &admin_token)?;
        std::fs::write(path, config).with_context(|| format!("writing {}", path.display()))?;
        info!(path = %path.display(), "admin kubeconfig written");
    }
    info!(address = %local, "serving the Kubernetes API over HTTPS");

    let advertised = std::net::SocketAddr::new(advertise, local.port());
    tokio::spawn(api::bootstrap::endpoints::run(
        state.storage.clone(),
        advertised,
    ));
    let storage = state.storage.clone();
    let app = api::router(state);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls_config);
    let mut shutdown = std::pin::pin!(seine_component_base::stop_signal());
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    warn!("accept: {e}");
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let stream = match acceptor.accept(stream).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%peer, "TLS handshake: {e}");
                    return;
                }
            };
            // A verified client certificate names the user of every request on the connection.
            let certificate = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|cert| certificate_user(cert.as_ref()))
                .map(CertificateUser);
            let service = TowerToHyperService::new(tower::service_fn(
                move |mut request: axum::http::Request<hyper::body::Incoming>| {
                    if let Some(certificate) = &certificate {
                        request.extensions_mut().insert(certificate.clone());
                    }
                    app.clone().oneshot(request)
                },
            ));
            if let Err(e) = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%peer, "connection: {e}");
            }
        });
    }
    info!("stopping");
    // Out of the kubernetes service's endpoints before going.
    match tokio::time::timeout(
        Duration::from_secs(3),
        api::bootstrap::endpoints::withdraw(&storage, advertised),
    )
    .await
    {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!("leaving the kubernetes endpoints: {}", e.message),
        Err(_) => warn!("leaving the kubernetes endpoints: etcd did not answer in time"),
    }
    Ok(())
}

/// The admin's bearer token, generated once and kept (0600) so restarts keep kubeconfigs valid.
fn admin_token(dir: &std::path::Path) -> Result<String> {
    let path = dir.join("admin.token");
    if let Ok(token) = std::fs::read_to_string(&path) {
        let token = token.trim().to_string();
        if !token.is_empty() {
            return Ok(token);
        }
    }
    let bytes: [u8; 24] = rand::rng().random();
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(token.as_bytes())?;
    Ok(token)
}
