//! `callbus engine`, and the engine half of `callbus up`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use callbus_engine::callapi::CallApiDoor;
use callbus_engine::{Engine, EngineConfig};

use crate::{bridge_cmd, duration, nats};

/// Flags of the engine.
#[derive(clap::Args, Debug)]
pub struct EngineFlags {
    /// Where the event log lives.
    #[arg(long, env = "CALLBUS_DATA_DIR", default_value = "./callbus-data")]
    pub data_dir: PathBuf,
    /// OpenSIPS nodes to reconcile with on start, comma-separated.
    #[arg(long, env = "CALLBUS_NODES", value_delimiter = ',', default_value = "default")]
    pub nodes: Vec<String>,
    /// How long an ended call stays in memory to absorb late events.
    #[arg(long, env = "CALLBUS_ENDED_RETENTION", default_value = "60s", value_parser = duration::parse)]
    pub ended_retention: Duration,
    /// Serve the OpenSIPS Call API protocol (JSON-RPC over WebSocket, path /call-api) here,
    /// e.g. 127.0.0.1:5059; off unless set.
    #[arg(long, env = "CALLBUS_CALLAPI_LISTEN")]
    pub callapi_listen: Option<std::net::SocketAddr>,
}

impl EngineFlags {
    /// The engine's configuration.
    pub fn config(&self) -> EngineConfig {
        EngineConfig {
            data_dir: self.data_dir.clone(),
            nodes: self.nodes.clone(),
            ended_retention: self.ended_retention,
            ..EngineConfig::default()
        }
    }
}

/// Flags of `callbus engine`.
#[derive(clap::Args, Debug)]
pub struct EngineArgs {
    /// NATS server URL.
    #[arg(long, env = "CALLBUS_NATS", default_value = "nats://127.0.0.1:4222")]
    pub nats: String,
    /// Serve Prometheus metrics on http://<this>/metrics (e.g. 127.0.0.1:9465); off unless set.
    #[arg(long, env = "CALLBUS_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
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
pub async fn start(flags: &EngineFlags, client: async_nats::Client) -> anyhow::Result<Running> {
    let engine = Engine::start(flags.config(), client.clone()).await?;
    let door = match flags.callapi_listen {
        Some(addr) => Some(
            CallApiDoor::start(addr, client)
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
pub async fn run(args: EngineArgs) -> anyhow::Result<ExitCode> {
    if let Some(addr) = args.metrics_listen {
        crate::metrics_http::serve(addr).await?;
    }
    let client = nats::connect(&args.nats, "callbus-engine").await?;
    let engine = start(&args.engine, client.clone()).await?;
    println!(
        "callbus engine: log in {} | NATS {} | {} live calls recovered | Ctrl-C to stop",
        args.engine.data_dir.display(),
        args.nats,
        engine.engine.recovered_live_calls()
    );
    bridge_cmd::shutdown_signal().await;
    engine.shutdown().await;
    let _ = client.flush().await;
    Ok(ExitCode::SUCCESS)
}
