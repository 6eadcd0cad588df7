//! `callbus engine`, and the engine half of `callbus up`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

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
    /// Serve the OpenSIPS Call API protocol (JSON-RPC over WebSocket) on this address (not built yet).
    #[arg(long, env = "CALLBUS_CALLAPI_LISTEN")]
    pub callapi_listen: Option<String>,
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
    #[command(flatten)]
    pub engine: EngineFlags,
}

/// Starts the engine on `client`.
pub async fn start(flags: &EngineFlags, client: async_nats::Client) -> anyhow::Result<Engine> {
    if let Some(addr) = &flags.callapi_listen {
        anyhow::bail!("--callapi-listen {addr}: the Call API door is not built yet (issue 4); run without it");
    }
    let engine = Engine::start(flags.config(), client).await?;
    Ok(engine)
}

/// `callbus engine`.
pub async fn run(args: EngineArgs) -> anyhow::Result<ExitCode> {
    let client = nats::connect(&args.nats, "callbus-engine").await?;
    let engine = start(&args.engine, client.clone()).await?;
    println!(
        "callbus engine: log in {} | NATS {} | {} live calls recovered | Ctrl-C to stop",
        args.engine.data_dir.display(),
        args.nats,
        engine.recovered_live_calls()
    );
    bridge_cmd::shutdown_signal().await;
    engine.shutdown().await;
    let _ = client.flush().await;
    Ok(ExitCode::SUCCESS)
}
