//! `callbus up` and `callbus bridge`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use callbus_bridge::{AllowList, Bridge, BridgeConfig};
use callbus_schemas::event::DEFAULT_EVENTS;

use crate::{duration, nats};

/// Flags of the bridge.
#[derive(clap::Args, Debug)]
pub struct BridgeArgs {
    /// NATS server URL.
    #[arg(long, env = "CALLBUS_NATS", default_value = "nats://127.0.0.1:4222")]
    pub nats: String,
    /// Name of the OpenSIPS node (a subject token).
    #[arg(long, env = "CALLBUS_NODE", default_value = "default")]
    pub node: String,
    /// OpenSIPS MI datagram socket.
    #[arg(long, env = "CALLBUS_MI", default_value = "127.0.0.1:8080")]
    pub mi: SocketAddr,
    /// Where to receive OpenSIPS event datagrams.
    #[arg(long, env = "CALLBUS_EVENTS_LISTEN", default_value = "127.0.0.1:8090")]
    pub events_listen: SocketAddr,
    /// The address OpenSIPS should send events to, when it differs from --events-listen.
    #[arg(long, env = "CALLBUS_EVENTS_ADVERTISE")]
    pub events_advertise: Option<SocketAddr>,
    /// How long to wait for an MI reply (e.g. 5s, 500ms).
    #[arg(long, env = "CALLBUS_MI_TIMEOUT", default_value = "5s", value_parser = duration::parse)]
    pub mi_timeout: Duration,
    /// MI commands the bus may run: `+cmd` adds to the default list, plain names replace it,
    /// `*` allows every command (dangerous: the bus could then stop OpenSIPS).
    #[arg(long, env = "CALLBUS_MI_ALLOW")]
    pub mi_allow: Option<String>,
    /// Events to subscribe to, comma-separated.
    #[arg(long, env = "CALLBUS_EVENTS", value_delimiter = ',', default_values_t = DEFAULT_EVENTS.map(String::from))]
    pub events: Vec<String>,
    /// Expiry of each event subscription (renewed at a third of it).
    #[arg(long, env = "CALLBUS_SUBSCRIBE_EXPIRE", default_value = "60s", value_parser = duration::parse)]
    pub subscribe_expire: Duration,
    /// The most event datagrams kept while NATS is slow or down.
    #[arg(long, env = "CALLBUS_BUFFER", default_value_t = 100_000)]
    pub buffer: usize,
    /// How often the bridge status is published on opensips.<node>.status.
    #[arg(long, env = "CALLBUS_STATUS_INTERVAL", default_value = "5s", value_parser = duration::parse)]
    pub status_interval: Duration,
    /// Serve Prometheus metrics on http://<this>/metrics (e.g. 127.0.0.1:9464); off unless set.
    #[arg(long, env = "CALLBUS_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
}

/// Flags of `callbus up`.
#[derive(clap::Args, Debug)]
pub struct UpArgs {
    #[command(flatten)]
    pub bridge: BridgeArgs,
    #[command(flatten)]
    pub engine: crate::engine_cmd::EngineFlags,
}

impl BridgeArgs {
    fn config(&self) -> anyhow::Result<BridgeConfig> {
        let mi_allow = match &self.mi_allow {
            Some(spec) => AllowList::parse(spec).context("--mi-allow")?,
            None => AllowList::default(),
        };
        if mi_allow == AllowList::All {
            tracing::warn!("--mi-allow=*: every MI command, including kill and shutdown, can be run from the bus");
        }
        Ok(BridgeConfig {
            node: self.node.clone(),
            mi: self.mi,
            events_listen: self.events_listen,
            events_advertise: self.events_advertise,
            mi_timeout: self.mi_timeout,
            mi_allow,
            events: self.events.clone(),
            subscribe_expire: self.subscribe_expire,
            status_interval: self.status_interval,
            buffer_capacity: self.buffer,
            ..BridgeConfig::default()
        })
    }
}

/// Waits for SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

async fn run_bridge(args: &BridgeArgs) -> anyhow::Result<ExitCode> {
    let config = args.config()?;
    if let Some(addr) = args.metrics_listen {
        crate::metrics_http::serve(addr).await?;
    }
    let client = nats::connect(&args.nats, &format!("callbus-bridge-{}", args.node)).await?;
    let bridge = Bridge::start(config, client.clone()).await?;
    println!(
        "callbus bridge: node {} | OpenSIPS MI {} | events on {} | NATS {} | Ctrl-C to stop",
        args.node,
        args.mi,
        bridge.events_addr(),
        args.nats
    );
    shutdown_signal().await;
    bridge.shutdown().await;
    let _ = client.flush().await;
    Ok(ExitCode::SUCCESS)
}

/// `callbus bridge`.
pub async fn bridge(args: BridgeArgs) -> anyhow::Result<ExitCode> {
    run_bridge(&args).await
}

/// `callbus up`: a local NATS if needed, then bridge and engine in one process.
pub async fn up(mut args: UpArgs) -> anyhow::Result<ExitCode> {
    let url = args.bridge.nats.clone();
    let local = tokio::task::spawn_blocking(move || nats::ensure_local(&url)).await??;
    if local.is_some() {
        println!("callbus up: started nats-server at {} (stopped on exit)", args.bridge.nats);
    }
    if !args.engine.nodes.contains(&args.bridge.node) {
        args.engine.nodes = vec![args.bridge.node.clone()];
    }
    let config = args.bridge.config()?;
    if let Some(addr) = args.bridge.metrics_listen {
        crate::metrics_http::serve(addr).await?;
    }
    let client = nats::connect(&args.bridge.nats, &format!("callbus-up-{}", args.bridge.node)).await?;
    let bridge = Bridge::start(config, client.clone()).await?;
    let engine = crate::engine_cmd::start(&args.engine, client.clone()).await?;
    println!(
        "callbus up: node {} | OpenSIPS MI {} | events on {} | NATS {} | log in {} | Ctrl-C to stop",
        args.bridge.node,
        args.bridge.mi,
        bridge.events_addr(),
        args.bridge.nats,
        args.engine.data_dir.display()
    );
    shutdown_signal().await;
    engine.shutdown().await;
    bridge.shutdown().await;
    let _ = client.flush().await;
    drop(local);
    Ok(ExitCode::SUCCESS)
}
