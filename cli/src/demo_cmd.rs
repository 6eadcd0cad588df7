//! `callbus demo`: the whole system in one command. A private nats-server, the OpenSIPS
//! simulator, a bridge and an engine with a temporary log; then a click-to-dial, a hold and an
//! unhold, a hang-up, and the call's timeline read back from the log.

use std::net::{SocketAddr, TcpListener};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use callbus_bridge::{Bridge, BridgeConfig};
use callbus_engine::{Engine, EngineConfig};
use callbus_schemas::command::CallNotification;
use opensips_sim::{Sim, SimConfig};
use serde_json::{json, Value};

use crate::{duration, nats};

/// Flags of `callbus demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Use this NATS server instead of starting a private one (the demo's subjects then share
    /// it: do not point it at a production bus).
    #[arg(long)]
    pub nats: Option<String>,
    /// Delay between two steps of a simulated SIP exchange (how fast the phones "answer").
    #[arg(long, default_value = "150ms", value_parser = duration::parse)]
    pub step: Duration,
}

const NODE: &str = "demo";

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0").context("no free loopback port")?.local_addr()?.port())
}

fn print_note(started: Instant, note: &CallNotification) {
    let mut data = note.data.clone();
    if let Value::Object(map) = &mut data {
        map.retain(|_, v| !v.is_null());
        for v in map.values_mut() {
            if let Value::String(s) = v {
                if s.len() > 40 {
                    *v = json!(format!("{}…", s.chars().take(40).collect::<String>()));
                }
            }
        }
    }
    println!("  {:>7.3}s  {:<18} {:<15} {}", started.elapsed().as_secs_f64(), note.event, note.state, data);
}

struct Demo {
    client: callbus_client::Client,
    started: Instant,
}

impl Demo {
    /// Sends a command and prints the call's notifications until the command's outcome.
    async fn step(&mut self, title: &str, verb: &str, body: Value) -> anyhow::Result<String> {
        println!("\n{title}  ({verb} {body})");
        let mut call = self.client.track(verb, body).await?;
        let started = self.started;
        match call.notes.outcome(&call.cmd_id, Duration::from_secs(15), |note| print_note(started, note)).await? {
            callbus_client::Outcome::Succeeded(_) => Ok(call.call_id),
            callbus_client::Outcome::Failed(reason) => bail!("{verb} failed: {reason}"),
        }
    }
}

/// `callbus demo`.
pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let (url, local) = match &args.nats {
        Some(url) => (url.clone(), None),
        None => {
            let url = format!("nats://127.0.0.1:{}", free_port()?);
            let for_thread = url.clone();
            let local = tokio::task::spawn_blocking(move || nats::ensure_local(&for_thread)).await??;
            (url, local)
        }
    };
    let data = tempfile::tempdir().context("cannot make a temporary data dir")?;
    println!("callbus demo");
    println!("  NATS      {url}{}", if local.is_some() { " (a private nats-server, stopped at the end)" } else { "" });
    let sim = Sim::start(SimConfig { step: args.step, ua_timeout: Duration::from_secs(10), ..SimConfig::default() })
        .await
        .context("cannot start the OpenSIPS simulator")?;
    println!("  OpenSIPS  simulated 3.4, MI at {}", sim.mi_addr());
    let client = nats::connect(&url, "callbus-demo", &nats::NatsAuth::default()).await?;
    let bridge_config = BridgeConfig {
        node: NODE.into(),
        mi: sim.mi_addr(),
        events_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..BridgeConfig::default()
    };
    let bridge = Bridge::start(bridge_config, client.clone()).await?;
    println!("  bridge    node {NODE}, events on {}", bridge.events_addr());
    let engine_config =
        EngineConfig { data_dir: data.path().to_owned(), nodes: vec![NODE.into()], ..EngineConfig::default() };
    let engine = Engine::start(engine_config, client.clone()).await?;
    println!("  engine    log in {}", data.path().display());
    let deadline = Instant::now() + Duration::from_secs(5);
    while sim.live_subscriptions().len() < 4 {
        if Instant::now() > deadline {
            bail!("the bridge did not subscribe to the simulator's events within 5 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let client =
        callbus_client::Client::new(client.clone()).with_timeout(Duration::from_secs(5)).with_cmd_prefix("demo");
    let mut demo = Demo { client, started: Instant::now() };
    let outcome = async {
        let call_id = demo
            .step(
                "1. Click-to-dial: ring Alice, then Bob, and connect them",
                "call.start",
                json!({"caller": "sip:alice@127.0.0.1", "callee": "sip:bob@127.0.0.1"}),
            )
            .await?;
        demo.step("2. Put the call on hold", "call.hold", json!({"call_id": call_id})).await?;
        demo.step("3. Take it off hold", "call.unhold", json!({"call_id": call_id})).await?;
        demo.step("4. Hang up", "call.end", json!({"call_id": call_id})).await?;
        anyhow::Ok(call_id)
    }
    .await;
    engine.shutdown().await;
    bridge.shutdown().await;
    sim.stop().await;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), demo.client.nats().flush()).await;
    let call_id = outcome?;
    println!("\nThe call's timeline, read back from the log (callbus replay timeline --call {call_id}):\n");
    let reader = callbus_replay::LogReader::open(data.path())?;
    crate::replay_cmd::print_timeline(&reader, &call_id, false, false)?;
    println!("\nDone: every step above was logged before it was acted on, and replays the same.");
    drop(demo);
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(local);
    Ok(ExitCode::SUCCESS)
}
