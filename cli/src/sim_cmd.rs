//! `callbus sim`: the OpenSIPS simulator, for demos and manual runs.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use opensips_sim::{CallScript, Sim, SimConfig, UasScript};

use crate::duration;

/// Flags of the simulator.
#[derive(clap::Args, Debug)]
pub struct SimArgs {
    /// Where the simulated MI datagram socket listens.
    #[arg(long, env = "CALLBUS_SIM_MI", default_value = "127.0.0.1:8080")]
    pub mi: SocketAddr,
    /// Delay between two steps of a simulated SIP exchange.
    #[arg(long, default_value = "20ms", value_parser = duration::parse)]
    pub step: Duration,
    /// How long an unanswered UA client INVITE rings before 408.
    #[arg(long, default_value = "5s", value_parser = duration::parse)]
    pub ua_timeout: Duration,
    /// Simulated SIP worker processes (each sends events from its own port).
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// Answered proxied calls to place once subscribers are there.
    #[arg(long, default_value_t = 0)]
    pub calls: usize,
    /// Hang those calls up after this long (e.g. 30s); kept up when absent.
    #[arg(long, value_parser = duration::parse)]
    pub hangup_after: Option<Duration>,
    /// Incoming calls for UA server sessions to place once subscribers are there.
    #[arg(long, default_value_t = 0)]
    pub uas_calls: usize,
}

/// Runs the simulator until Ctrl-C.
pub async fn run(args: SimArgs) -> anyhow::Result<ExitCode> {
    let config = SimConfig {
        mi_listen: args.mi,
        sip_workers: args.workers,
        step: args.step,
        ua_timeout: args.ua_timeout,
        ..SimConfig::default()
    };
    let sim = Sim::start(config)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind the simulated MI socket at {}: {e}", args.mi))?;
    println!("callbus sim: simulated OpenSIPS 3.4 MI at {} | Ctrl-C to stop", sim.mi_addr());
    if args.calls > 0 || args.uas_calls > 0 {
        // Calls are only worth placing once someone listens to their events.
        while sim.live_subscriptions().is_empty() {
            tokio::select! {
                _ = crate::signals::shutdown_signal() => return Ok(ExitCode::SUCCESS),
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
        for _ in 0..args.calls {
            let callid = sim.proxied_call(CallScript { hangup_after: args.hangup_after, ..CallScript::default() });
            tracing::info!(%callid, "proxied call placed");
        }
        for _ in 0..args.uas_calls {
            match sim.incoming_ua_call(UasScript::default()) {
                Some(key) => tracing::info!(%key, "incoming UA call placed"),
                None => tracing::warn!("incoming UA call lost: its NEW event did not fit a datagram"),
            }
        }
    }
    crate::signals::shutdown_signal().await;
    sim.stop().await;
    Ok(ExitCode::SUCCESS)
}
