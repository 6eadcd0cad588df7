//! `callbus engine`, and the engine half of `callbus up`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use callbus_engine::callapi::CallApiDoor;
use callbus_engine::{Engine, EngineConfig};

use crate::config::{self, Dur, EngineSection, Overrides};
use crate::{bridge_cmd, duration, nats};

/// Flags of the engine. Each overrides the configuration file's `[engine]` key of the same
/// name.
#[derive(clap::Args, Debug)]
pub struct EngineFlags {
    /// Where the event log lives [default: ./callbus-data].
    #[arg(long, env = "CALLBUS_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// OpenSIPS nodes to reconcile with on start, comma-separated [default: default].
    #[arg(long, env = "CALLBUS_NODES", value_delimiter = ',')]
    pub nodes: Option<Vec<String>>,
    /// How long an ended call stays in memory to absorb late events [default: 60s].
    #[arg(long, env = "CALLBUS_ENDED_RETENTION", value_parser = duration::parse)]
    pub ended_retention: Option<Duration>,
    /// Serve the OpenSIPS Call API protocol (JSON-RPC over WebSocket, path /call-api) here,
    /// e.g. 127.0.0.1:5059; off unless set.
    #[arg(long, env = "CALLBUS_CALLAPI_LISTEN")]
    pub callapi_listen: Option<std::net::SocketAddr>,
    /// Bearer token Call API clients must present (required beyond loopback).
    #[arg(long, env = "CALLBUS_CALLAPI_TOKEN", hide_env_values = true)]
    pub callapi_token: Option<String>,
    /// The most live calls; new calls from apps are refused beyond it [default: 500000].
    #[arg(long, env = "CALLBUS_MAX_LIVE_CALLS")]
    pub max_live_calls: Option<usize>,
    /// How often live calls are checked against OpenSIPS's dialogs and UA sessions [default: 5m].
    #[arg(long, env = "CALLBUS_RECONCILE_EVERY", value_parser = duration::parse)]
    pub reconcile_every: Option<Duration>,
    /// Inputs waiting for the engine at most; commands beyond it are refused [default: 65536].
    #[arg(long, env = "CALLBUS_INPUT_QUEUE")]
    pub input_queue: Option<usize>,
}

impl EngineFlags {
    /// Puts the flags given (or their variables) over the configuration.
    pub fn overrides(&self, o: &mut Overrides) {
        o.set("engine", "data_dir", self.data_dir.clone());
        o.set("engine", "nodes", self.nodes.clone());
        o.set("engine", "ended_retention", self.ended_retention.map(Dur));
        o.set("engine", "callapi_listen", self.callapi_listen);
        o.set("engine", "callapi_token", self.callapi_token.clone());
        o.set("engine", "max_live_calls", self.max_live_calls);
        o.set("engine", "reconcile_every", self.reconcile_every.map(Dur));
        o.set("engine", "input_queue", self.input_queue);
    }
}

/// The engine's settings from the configuration.
pub fn engine_config(c: &EngineSection) -> EngineConfig {
    EngineConfig {
        data_dir: c.data_dir.clone(),
        nodes: c.nodes.clone(),
        ended_retention: c.ended_retention.0,
        max_live_calls: c.max_live_calls,
        reconcile_every: Some(c.reconcile_every.0).filter(|d| !d.is_zero()),
        input_queue: c.input_queue,
        ..EngineConfig::default()
    }
}

/// Flags of `callbus engine`.
#[derive(clap::Args, Debug)]
pub struct EngineArgs {
    /// NATS server URL [default: nats://127.0.0.1:4222].
    #[arg(long, env = "CALLBUS_NATS")]
    pub nats: Option<String>,
    /// Serve Prometheus metrics on http://<this>/metrics (e.g. 127.0.0.1:9465); off unless set.
    #[arg(long, env = "CALLBUS_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    #[command(flatten)]
    pub nats_auth: nats::NatsAuth,
    #[command(flatten)]
    pub engine: EngineFlags,
}

/// A running engine and, when asked for, its Call API door.
pub struct Running {
    /// The engine.
    pub engine: Engine,
    door: Option<CallApiDoor>,
}

impl Running {
    /// Stops the door, then the engine.
    pub async fn shutdown(self) {
        if let Some(door) = self.door {
            door.shutdown().await;
        }
        self.engine.shutdown().await;
    }
}

/// Starts the engine (and its Call API door) on `client`.
pub async fn start(section: &EngineSection, client: async_nats::Client) -> anyhow::Result<Running> {
    let engine = Engine::start(engine_config(section), client.clone()).await?;
    let door = match section.callapi_listen {
        Some(addr) => Some(
            CallApiDoor::start_with_token(addr, client, section.callapi_token.clone())
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen for Call API clients on {addr}: {e}"))?,
        ),
        None => None,
    };
    if let Some(door) = &door {
        println!("Call API door: ws://{}{}", door.local_addr(), callbus_engine::callapi::PATH);
    }
    Ok(Running { engine, door })
}

/// `callbus engine`.
pub async fn run(args: EngineArgs, file: Option<&std::path::Path>) -> anyhow::Result<ExitCode> {
    let mut o = Overrides::default();
    o.set("", "nats", args.nats.clone());
    o.set("", "metrics_listen", args.metrics_listen);
    o.set_auth(&args.nats_auth);
    args.engine.overrides(&mut o);
    let config = config::load(file, o)?;
    if let Some(addr) = config.metrics_listen {
        crate::metrics_http::serve(addr).await?;
    }
    let client = nats::connect(&config.nats, "callbus-engine", &config.nats_auth).await?;
    let engine = start(&config.engine, client.clone()).await?;
    println!(
        "callbus engine: log in {} | NATS {} | {} live calls recovered | Ctrl-C to stop",
        config.engine.data_dir.display(),
        config::mask_url(&config.nats),
        engine.engine.recovered_live_calls()
    );
    bridge_cmd::shutdown_signal().await;
    engine.shutdown().await;
    let _ = client.flush().await;
    Ok(ExitCode::SUCCESS)
}
