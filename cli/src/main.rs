//! `callbus`: the one binary. It runs the parts (`up`, `bridge`, `engine`, `sim`, `demo`) and
//! the clients (`call`, `ua`, `events`, `mi`, `replay`). Every flag has a `CALLBUS_*`
//! environment variable.

mod addr;
mod bridge_cmd;
mod call_cmd;
mod cluster_cmd;
mod config;
mod demo_cmd;
mod duration;
mod engine_cmd;
mod metrics_http;
mod mi_cmd;
mod nats;
mod replay_cmd;
mod signals;
mod sim_cmd;
mod size;
mod ua_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// Drive OpenSIPS calls from NATS, with a replayable event log.
#[derive(Parser, Debug)]
#[command(name = "callbus", version, about, long_about = None)]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value = "pretty", env = "CALLBUS_LOG_FORMAT", global = true)]
    log_format: LogFormat,
    /// Configuration file (TOML) for up, bridge and engine [default: ./callbus.toml if present].
    #[arg(long, env = "CALLBUS_CONFIG", global = true)]
    config: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run bridge and engine in one process (the single-node default); starts a local nats-server if none answers.
    Up(bridge_cmd::UpArgs),
    /// Run the bridge alone: OpenSIPS MI and event datagrams on NATS.
    Bridge(bridge_cmd::BridgeArgs),
    /// Run an engine alone: call state machines, the event log, commands and notifications.
    Engine(engine_cmd::EngineArgs),
    /// Run the OpenSIPS simulator (MI and event datagrams, scripted calls).
    Sim(sim_cmd::SimArgs),
    /// See the whole system work: a private NATS, simulated OpenSIPS, bridge and engine run a
    /// click-to-dial, a hold, an unhold and a hang-up, then print the call's timeline.
    Demo(demo_cmd::DemoArgs),
    /// Read the call log: a call's timeline, determinism check, export, republish, stats.
    Replay(replay_cmd::ReplayArgs),
    /// Start (click-to-dial), end, hold, unhold, transfer and inspect calls through the engine.
    Call(call_cmd::CallArgs),
    /// OpenSIPS as a SIP user agent: start, answer, update and terminate UA sessions.
    Ua(ua_cmd::UaArgs),
    /// Tail call notifications, or raw OpenSIPS events with --raw / --node.
    Events(call_cmd::EventsArgs),
    /// Run an OpenSIPS MI command through the bridge.
    Mi(mi_cmd::MiArgs),
    /// Many engines: the workers, who owns each partition, lease ages, lag.
    Cluster(cluster_cmd::ClusterArgs),
    /// Show the effective configuration (file, CALLBUS_* variables and flags), secrets masked.
    Config(ConfigArgs),
}

/// `callbus config`.
#[derive(clap::Args, Debug)]
struct ConfigArgs {
    #[command(subcommand)]
    command: ConfigCommand,
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Print the configuration `callbus up` would run with (the same flags apply), as TOML.
    Show(bridge_cmd::UpArgs),
}

fn init_logging(format: LogFormat, default_level: &str) {
    use std::io::IsTerminal;
    // async-nats says "connected successfully" and "event: connected" at info on every run;
    // callbus logs its own connection changes, so the client library only speaks up on trouble.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{default_level},async_nats=warn")));
    // Colour codes only on a terminal, and never with NO_COLOR set (log files stay plain text).
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    // Before any thread: the allocator set for a long run.
    let tuned = callbus_engine::allocator::tune();
    let cli = Cli::parse();
    // Services log their life at info. The demo's story is on stdout, and client commands print
    // their answers: their parts only speak up when something is wrong.
    let service = matches!(cli.command, Command::Up(_) | Command::Bridge(_) | Command::Engine(_) | Command::Sim(_));
    let default_level = if service { "info" } else { "warn" };
    init_logging(cli.log_format, default_level);
    tracing::debug!(?tuned.arenas, ?tuned.mmap_threshold, "malloc tuned (MALLOC_ARENA_MAX, MALLOC_MMAP_THRESHOLD_ override)");
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("callbus: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let file = match config::file(cli.config.as_deref()) {
            Ok(f) => f,
            Err(e) => return Err(e),
        };
        let file = file.as_deref();
        match cli.command {
            Command::Up(args) => bridge_cmd::up(args, file).await,
            Command::Bridge(args) => bridge_cmd::bridge(args, file).await,
            Command::Config(ConfigArgs { command: ConfigCommand::Show(args) }) => {
                let config = args.load(file)?;
                print!("{}", config::show(&config, file)?);
                Ok(ExitCode::SUCCESS)
            }
            Command::Sim(args) => sim_cmd::run(args).await,
            Command::Mi(args) => mi_cmd::run(args).await,
            Command::Engine(args) => engine_cmd::run(args, file).await,
            Command::Demo(args) => demo_cmd::run(args).await,
            Command::Replay(args) => replay_cmd::run(args).await,
            Command::Call(args) => call_cmd::run(args).await,
            Command::Ua(args) => ua_cmd::run(args).await,
            Command::Events(args) => call_cmd::events(args).await,
            Command::Cluster(args) => cluster_cmd::run(args).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("callbus: {e:#}");
            ExitCode::FAILURE
        }
    }
}
