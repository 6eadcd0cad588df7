//! `callbus up` and `callbus bridge`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use crate::config::{self, BridgeSection, Config, Dur, Overrides};
use crate::{duration, nats};
use anyhow::Context;
use callbus_bridge::{AllowList, Bridge, BridgeConfig};

/// Flags of the bridge. Each overrides the configuration file's `[bridge]` key of the same
/// name (defaults in `docs/operations.md` and `callbus config show`).
#[derive(clap::Args, Debug)]
pub struct BridgeArgs {
    /// NATS server URL [default: nats://127.0.0.1:4222].
    #[arg(long, env = "CALLBUS_NATS")]
    pub nats: Option<String>,
    /// Name of the OpenSIPS node, a subject token [default: default].
    #[arg(long, env = "CALLBUS_NODE")]
    pub node: Option<String>,
    /// OpenSIPS MI datagram socket [default: 127.0.0.1:8080].
    #[arg(long, env = "CALLBUS_MI", value_parser = crate::addr::parse)]
    pub mi: Option<SocketAddr>,
    /// Where to receive OpenSIPS event datagrams [default: 127.0.0.1:8090].
    #[arg(long, env = "CALLBUS_EVENTS_LISTEN", value_parser = crate::addr::parse)]
    pub events_listen: Option<SocketAddr>,
    /// The address OpenSIPS should send events to, when it differs from --events-listen.
    #[arg(long, env = "CALLBUS_EVENTS_ADVERTISE", value_parser = crate::addr::parse)]
    pub events_advertise: Option<SocketAddr>,
    /// How long to wait for an MI reply, e.g. 5s, 500ms [default: 5s].
    #[arg(long, env = "CALLBUS_MI_TIMEOUT", value_parser = duration::parse)]
    pub mi_timeout: Option<Duration>,
    /// MI commands the bus may run: `+cmd` adds to the default list, plain names replace it,
    /// `*` allows every command (dangerous: the bus could then stop OpenSIPS).
    #[arg(long, env = "CALLBUS_MI_ALLOW")]
    pub mi_allow: Option<String>,
    /// Events to subscribe to, comma-separated [default: the four callbus acts on].
    #[arg(long, env = "CALLBUS_EVENTS", value_delimiter = ',')]
    pub events: Option<Vec<String>>,
    /// Expiry of each event subscription, renewed at a third of it [default: 60s].
    #[arg(long, env = "CALLBUS_SUBSCRIBE_EXPIRE", value_parser = duration::parse)]
    pub subscribe_expire: Option<Duration>,
    /// The most event datagrams kept while NATS is slow or down [default: 100000].
    #[arg(long, env = "CALLBUS_BUFFER")]
    pub buffer: Option<usize>,
    /// How often the bridge status is published on opensips.<node>.status [default: 5s].
    #[arg(long, env = "CALLBUS_STATUS_INTERVAL", value_parser = duration::parse)]
    pub status_interval: Option<Duration>,
    /// Serve Prometheus metrics on http://<this>/metrics (e.g. 127.0.0.1:9464); off unless set.
    #[arg(long, env = "CALLBUS_METRICS_LISTEN", value_parser = crate::addr::parse)]
    pub metrics_listen: Option<SocketAddr>,
    /// Also append each batch of events to callbus.input.<node> in JetStream, kept until it is
    /// stored: the input of the engines of a cluster (engine --cluster). Needed by a cluster.
    #[arg(long, env = "CALLBUS_EVENTS_ACKED")]
    pub events_acked: bool,
    #[command(flatten)]
    pub nats_auth: nats::NatsAuth,
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
    /// Puts the flags given (or their variables) over the configuration.
    pub fn overrides(&self, o: &mut Overrides) {
        o.set("", "nats", self.nats.clone());
        o.set("", "metrics_listen", self.metrics_listen);
        o.set_auth(&self.nats_auth);
        o.set("bridge", "node", self.node.clone());
        o.set("bridge", "mi", self.mi);
        o.set("bridge", "events_listen", self.events_listen);
        o.set("bridge", "events_advertise", self.events_advertise);
        o.set("bridge", "mi_timeout", self.mi_timeout.map(Dur));
        o.set("bridge", "mi_allow", self.mi_allow.clone());
        o.set("bridge", "events", self.events.clone());
        o.set("bridge", "subscribe_expire", self.subscribe_expire.map(Dur));
        o.set("bridge", "buffer", self.buffer);
        o.set("bridge", "status_interval", self.status_interval.map(Dur));
        o.set("bridge", "events_acked", self.events_acked.then_some(true));
    }
}

impl UpArgs {
    /// The effective configuration: defaults, the file, the environment, the flags.
    pub fn load(&self, file: Option<&std::path::Path>) -> anyhow::Result<Config> {
        let mut o = Overrides::default();
        self.bridge.overrides(&mut o);
        self.engine.overrides(&mut o);
        let mut config = config::load(file, o)?;
        // `up` runs one node: its engine reconciles that node (whatever `engine.nodes` says).
        if !config.engine.nodes.contains(&config.bridge.node) {
            config.engine.nodes = vec![config.bridge.node.clone()];
        }
        Ok(config)
    }
}

/// The bridge's settings from the configuration.
fn bridge_config(c: &BridgeSection) -> anyhow::Result<BridgeConfig> {
    let mi_allow = match &c.mi_allow {
        Some(spec) => AllowList::parse(spec).context("mi_allow (--mi-allow)")?,
        None => AllowList::default(),
    };
    if mi_allow == AllowList::All {
        tracing::warn!("mi_allow = *: every MI command, including kill and shutdown, can be run from the bus");
    }
    Ok(BridgeConfig {
        node: c.node.clone(),
        mi: c.mi,
        events_listen: c.events_listen,
        events_advertise: c.events_advertise,
        mi_timeout: c.mi_timeout.0,
        mi_allow,
        events: c.events.clone(),
        subscribe_expire: c.subscribe_expire.0,
        status_interval: c.status_interval.0,
        buffer_capacity: c.buffer,
        events_acked: c.events_acked,
        ..BridgeConfig::default()
    })
}

/// `callbus bridge`.
pub async fn bridge(args: BridgeArgs, file: Option<&std::path::Path>) -> anyhow::Result<ExitCode> {
    let mut o = Overrides::default();
    args.overrides(&mut o);
    let config = config::load(file, o)?;
    let bridge_config = bridge_config(&config.bridge)?;
    if let Some(addr) = config.metrics_listen {
        crate::metrics_http::serve(addr).await?;
    }
    let node = &config.bridge.node;
    let client = nats::connect(&config.nats, &format!("callbus-bridge-{node}"), &config.nats_auth).await?;
    let bridge = Bridge::start(bridge_config, client.clone()).await?;
    println!(
        "callbus bridge: node {node} | OpenSIPS MI {} | events on {} | NATS {} | Ctrl-C to stop",
        config.bridge.mi,
        bridge.events_addr(),
        crate::nats::mask_url(&config.nats)
    );
    crate::signals::shutdown_signal().await;
    bridge.shutdown().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
    Ok(ExitCode::SUCCESS)
}

/// `callbus up`: a local NATS if needed, then bridge and engine in one process.
pub async fn up(args: UpArgs, file: Option<&std::path::Path>) -> anyhow::Result<ExitCode> {
    let config = args.load(file)?;
    let url = config.nats.clone();
    let local = tokio::task::spawn_blocking(move || nats::ensure_local(&url)).await??;
    if local.is_some() {
        println!("callbus up: started nats-server at {} (stopped on exit)", crate::nats::mask_url(&config.nats));
    }
    // Before the bridge subscribes anything: a data dir another callbus holds stops `up` here.
    if callbus_engine::log::SledLog::in_use(&config.engine.data_dir) {
        return Err(callbus_engine::log::LogError::InUse { path: config.engine.data_dir.display().to_string() }.into());
    }
    let bridge_config = bridge_config(&config.bridge)?;
    if let Some(addr) = config.metrics_listen {
        crate::metrics_http::serve(addr).await?;
    }
    let node = &config.bridge.node;
    let client = nats::connect(&config.nats, &format!("callbus-up-{node}"), &config.nats_auth).await?;
    // The engine takes this node's events and MI straight from the bridge (no NATS hop); apps
    // still see every event on NATS.
    let (tap, events) = tokio::sync::mpsc::channel(config.bridge.buffer.max(1024));
    let bridge = Bridge::start_with_tap(bridge_config, client.clone(), Some(tap)).await?;
    let mi = bridge.local_mi();
    let mi = callbus_engine::LocalMi::new(node.clone(), move |command, params| {
        let mi = mi.clone();
        async move { mi.call(&command, params).await }
    });
    let in_process = callbus_engine::LocalNode::new(events, mi);
    let engine = crate::engine_cmd::start_kind(&config.engine, None, client.clone(), Some(in_process)).await?;
    println!(
        "callbus up: node {node} | OpenSIPS MI {} | events on {} | NATS {} | log in {} | Ctrl-C to stop",
        config.bridge.mi,
        bridge.events_addr(),
        crate::nats::mask_url(&config.nats),
        config.engine.data_dir.display()
    );
    crate::signals::shutdown_signal().await;
    engine.shutdown().await;
    bridge.shutdown().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
    nats::closing();
    drop(local);
    Ok(ExitCode::SUCCESS)
}
