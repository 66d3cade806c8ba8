//! The `courtside` binary: parses the configuration, sets up logging, runs the node until
//! SIGTERM or Ctrl-C, drains, and exits 0.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;

use courtside::admission::{Admission, AdmissionSettings};
use courtside::config::{self, Command, LogFormat, ServeConfig, WtEngine};
use courtside::hub::{Hub, HubConfig};
use courtside::metrics::Metrics;
use courtside::node::Node;
use courtside::registry::{EmbeddedRegistry, RedisRegistry, RedisSettings, Registry};
use courtside::transport::webtransport::{WebTransportServer, WebTransportSettings};
use courtside::{listener, random, server};
use tracing::{error, info, warn};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

fn main() -> ExitCode {
    let cli = match config::parse_args(std::env::args_os().collect()) {
        Ok(cli) => cli,
        Err(error) => {
            eprintln!("courtside: {error:#}");
            return ExitCode::from(2);
        }
    };
    let Command::Serve(config) = cli.command;
    if let Err(error) = config.validate() {
        eprintln!("courtside: {error:#}");
        return ExitCode::from(2);
    }
    if let Err(error) = init_logging(&config) {
        eprintln!("courtside: {error:#}");
        return ExitCode::from(2);
    }
    match run(*config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(config: &ServeConfig) -> anyhow::Result<()> {
    let filter: Targets = config.log.log_level.parse().map_err(|error| {
        anyhow::anyhow!(
            "{}: takes a level (info) or directives (info,courtside=debug): {error}",
            config.sources.written("log-level", &config.log.log_level)
        )
    })?;
    let registry = tracing_subscriber::registry().with(filter);
    match config.log.log_format {
        LogFormat::Text => {
            let ansi = std::io::stderr().is_terminal();
            registry
                .with(
                    tracing_subscriber::fmt::layer()
                        .with_ansi(ansi)
                        .with_writer(std::io::stderr),
                )
                .try_init()?
        }
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_writer(std::io::stderr),
            )
            .try_init()?,
    }
    Ok(())
}

fn run(config: ServeConfig) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        // Installed before anything listens: until a handler exists, SIGTERM's default action
        // kills the process, and a task stopped while starting must drain, not die.
        let shutdown = shutdown_signal();
        let token = match &config.http.publish_token {
            Some(token) => token.clone(),
            None => {
                let token = random::generate_token();
                warn!(publish_token = %token, "no publish token configured; generated one for this run");
                token
            }
        };
        // Every setting that reads a file or the task's metadata is checked before anything
        // listens: a node that cannot serve fails before it logs that it listens.
        let metrics = Arc::new(Metrics::new());
        let admission = Admission::new(AdmissionSettings::from_config(&config, token), metrics.clone())
            // The keys file's errors name it as a flag; say where it really came from.
            .map_err(|e| anyhow::anyhow!(e.replacen("--jwt-keys", &config.sources.name("jwt-keys"), 1)))?;
        let quic_server_id = if config.webtransport.disabled {
            None
        } else {
            check_certificate(&config).await?;
            courtside::transport::webtransport::resolve_server_id(config.webtransport.quic_server_id)
                .await
                .with_context(|| format!("{} ecs-task", config.sources.name("quic-server-id")))?
        };
        let listener = listener::bind(config.http.addr).with_context(|| {
            format!(
                "binding the HTTP/WebSocket listener on {} ({})",
                config.http.addr,
                config.sources.name("http")
            )
        })?;
        let http = listener.local_addr()?;
        let hub = Hub::new(HubConfig::from_config(&config), metrics, random::random_u64());
        // The node's id as the registry knows it (`GET /v1/nodes`, the operations page).
        let (registry, node_id): (Arc<dyn Registry>, String) = match &config.cluster.redis {
            None => (Arc::new(EmbeddedRegistry::new(hub.clone())), "local".to_string()),
            Some(url) => {
                let settings = RedisSettings::from_config(&config, url, http);
                let node_id = settings.node_id.clone();
                let redis = RedisRegistry::connect(settings, hub.clone(), hub.metrics().clone())
                    .await
                    .context("connecting to redis")?;
                (Arc::new(redis), node_id)
            }
        };
        {
            // Keys rotate by replacing the file: it is re-read when it changes.
            let admission = admission.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
                loop {
                    every.tick().await;
                    match admission.reload_token_keys() {
                        Ok(true) => info!("jwt keys reloaded"),
                        Ok(false) => {}
                        Err(error) => warn!(%error, "jwt keys not reloaded; the keys in use stay"),
                    }
                }
            });
        }
        let node = Node::new(hub, registry, admission);
        info!(%http, version = env!("CARGO_PKG_VERSION"), "listening for HTTP and WebSocket (/ws)");
        if !config.webtransport.disabled {
            let mut settings = WebTransportSettings::from_config(&config);
            settings.quic_server_id = quic_server_id;
            match config.webtransport.wt_engine {
                WtEngine::Quinn => {
                    let wt = WebTransportServer::bind(settings, &node).await?;
                    info!(wt = %wt.local_addr(), "listening for WebTransport (/wt) on the quinn engine");
                    tokio::spawn(wt.run(node.clone()));
                }
                WtEngine::Proto => {
                    let wt = courtside::transport::wt::server::ProtoServer::bind(settings, &node).await?;
                    info!(wt = %wt.local_addr(), "listening for WebTransport (/wt)");
                    tokio::spawn(wt.run(node.clone()));
                }
            }
        }
        if let Some(emf) = courtside::emf::EmfSettings::from_config(&config) {
            info!(interval = ?emf.interval, namespace = %emf.namespace, "CloudWatch EMF metrics on standard output");
            let listener = node.shutdown_listener();
            tokio::spawn(courtside::emf::run(node.metrics.clone(), emf, listener));
        }
        tokio::spawn(courtside::ops::run(
            node_id,
            node.metrics.clone(),
            node.hub.clone(),
            node.registry.clone(),
            node.ops.clone(),
            node.shutdown_listener(),
        ));
        if config.demo {
            let listener = node.shutdown_listener();
            tokio::spawn(courtside::demo::run(
                node.registry.clone(),
                config.demo_speed,
                config.demo_seed,
                listener,
            ));
            info!("demo page: http://{}/", demo_host(http));
        }
        let report = server::serve(&config, node, listener, shutdown).await;
        if report.clean {
            info!("drained; every connection closed");
        } else if report.unflushed > 0 {
            error!(
                unflushed = report.unflushed,
                abandoned = report.abandoned,
                "drain timeout reached with publishes still queued for redis (answered 202): they are lost"
            );
        } else {
            warn!(
                abandoned = report.abandoned,
                "drain timeout reached; dropping remaining connections"
            );
        }
        Ok(())
    })
}

/// Loads `--cert` and `--key` once before anything listens, so that a missing or unreadable
/// certificate fails the start instead of a node that serves HTTP without WebTransport; the
/// WebTransport server loads them again when it binds (and whenever they change).
async fn check_certificate(config: &ServeConfig) -> anyhow::Result<()> {
    let (Some(cert), Some(key)) = (&config.webtransport.cert, &config.webtransport.key) else {
        return Ok(());
    };
    let files = (cert.clone(), key.clone());
    if let Err(error) = courtside::certs::CertificateSource::load(Some(&files)).await {
        let error = match error {
            courtside::certs::CertificateError::Load { message, .. } => message,
            other => other.to_string(),
        };
        anyhow::bail!(
            "{} {} and {} {}: cannot load the WebTransport certificate and key (PEM files): {error}",
            config.sources.name("cert"),
            cert.display(),
            config.sources.name("key"),
            key.display()
        );
    }
    Ok(())
}

/// The address to show for the demo page: loopback when listening on every interface.
fn demo_host(addr: std::net::SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        format!("127.0.0.1:{}", addr.port())
    } else {
        addr.to_string()
    }
}

/// Resolves on SIGTERM (ECS stopping the task) or Ctrl-C. The handlers are installed when this
/// is called, not when the future is first polled.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate());
        let interrupt = signal(SignalKind::interrupt());
        async move {
            match (term, interrupt) {
                (Ok(mut term), Ok(mut interrupt)) => tokio::select! {
                    _ = interrupt.recv() => info!("Ctrl-C received"),
                    _ = term.recv() => info!("SIGTERM received"),
                },
                (Err(error), Ok(mut interrupt)) => {
                    warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the server");
                    interrupt.recv().await;
                }
                (Ok(mut term), Err(error)) => {
                    warn!(%error, "cannot listen for Ctrl-C; only SIGTERM stops the server");
                    term.recv().await;
                }
                (Err(error), Err(_)) => {
                    warn!(%error, "cannot listen for SIGTERM or Ctrl-C; stop the server with SIGKILL");
                    std::future::pending::<()>().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let ctrl_c = tokio::signal::ctrl_c();
        async move {
            let _ = ctrl_c.await;
        }
    }
}
