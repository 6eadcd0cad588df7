//! `callbus engine`, and the engine half of `callbus up`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use callbus_door::CallApiDoor;
use callbus_engine::{ClusterConfig, ClusterEngine, Engine, EngineConfig};

use crate::config::{self, ClusterSection, Dur, EngineSection, Overrides};
use crate::{duration, nats};

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
    #[arg(long, env = "CALLBUS_CALLAPI_LISTEN", value_parser = crate::addr::parse)]
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
    /// Make each commit an fdatasync of the log's write-ahead file, so acknowledged inputs survive
    /// a power cut or kernel crash (without it a commit is written with sync_file_range, which
    /// survives a crash of callbus only). Single engine only: in cluster mode the log is JetStream's.
    #[arg(long, env = "CALLBUS_SYNC_DATA")]
    pub sync_data: bool,
    /// Free space kept on the data dir's disk: under it the engine writes nothing and refuses
    /// commands until there is room, so a full disk never costs the log; 0 turns it off
    /// [default: 64MiB].
    #[arg(long, env = "CALLBUS_DISK_RESERVE", value_parser = crate::size::parse)]
    pub disk_reserve: Option<u64>,
    /// How long an ended call stays in the event log (removed whole once every record of it is
    /// older; live calls never); 0 keeps everything [default: 30d].
    #[arg(long, env = "CALLBUS_RETENTION", value_parser = duration::parse)]
    pub retention: Option<Duration>,
    /// The most the event log's records may take (as stored, compressed): beyond it the oldest
    /// ended calls are removed, however young; 0: no limit [default: 0].
    #[arg(long, env = "CALLBUS_RETENTION_BYTES", value_parser = crate::size::parse)]
    pub retention_bytes: Option<u64>,
    /// Where retention archives calls before removing them (`callbus replay --archive` reads it).
    #[arg(long, env = "CALLBUS_ARCHIVE_DIR")]
    pub archive_dir: Option<PathBuf>,
}

/// Flags of cluster mode. Each overrides the configuration file's `[cluster]` key of the same
/// name.
#[derive(clap::Args, Debug)]
pub struct ClusterFlags {
    /// Join the worker group on NATS JetStream (partitions, leases, a replicated log) instead of
    /// running a single engine.
    #[arg(long, env = "CALLBUS_CLUSTER")]
    pub cluster: bool,
    /// This worker's name, unique among the live workers [default: <hostname>-<pid>].
    #[arg(long, env = "CALLBUS_WORKER")]
    pub worker: Option<String>,
    /// Partitions the calls are spread over; every worker must agree [default: 64].
    #[arg(long, env = "CALLBUS_PARTITIONS")]
    pub partitions: Option<u16>,
    /// JetStream replicas of the log, input stream and leases (3 on a 3-node NATS) [default: 1].
    #[arg(long, env = "CALLBUS_REPLICAS")]
    pub replicas: Option<usize>,
    /// A lease not renewed this long expires and another worker takes the partition [default: 2s].
    #[arg(long, env = "CALLBUS_LEASE_TTL", value_parser = duration::parse)]
    pub lease_ttl: Option<Duration>,
}

impl ClusterFlags {
    /// Puts the flags given (or their variables) over the configuration.
    pub fn overrides(&self, o: &mut Overrides) {
        o.set("cluster", "enabled", self.cluster.then_some(true));
        o.set("cluster", "worker", self.worker.clone());
        o.set("cluster", "partitions", self.partitions);
        o.set("cluster", "replicas", self.replicas);
        o.set("cluster", "lease_ttl", self.lease_ttl.map(Dur));
    }
}

/// The cluster settings from the configuration.
pub fn cluster_config(c: &ClusterSection) -> anyhow::Result<ClusterConfig> {
    let worker = c.worker.clone().unwrap_or_else(callbus_engine::cluster::default_worker_name);
    if worker.is_empty() || !worker.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_') {
        anyhow::bail!("cluster.worker {worker:?}: use letters, digits, '-' and '_' only (it is a NATS KV key)");
    }
    if c.partitions == 0 {
        anyhow::bail!("cluster.partitions must be at least 1");
    }
    if c.lease_ttl.0 < Duration::from_millis(500) {
        anyhow::bail!(
            "cluster.lease_ttl {:?} is too short: at least 500ms (it is renewed at a quarter of it)",
            c.lease_ttl.0
        );
    }
    Ok(ClusterConfig {
        worker,
        partitions: c.partitions,
        replicas: c.replicas.max(1),
        lease_ttl: c.lease_ttl.0,
        events_max_age: c.events_max_age.0,
        log_max_age: Duration::ZERO,
        log_max_bytes: 0,
    })
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
        o.set("engine", "sync_data", self.sync_data.then_some(true));
        o.set("engine", "disk_reserve", self.disk_reserve.map(crate::size::Size));
        o.set("engine", "retention", self.retention.map(Dur));
        o.set("engine", "retention_bytes", self.retention_bytes.map(crate::size::Size));
        o.set("engine", "archive_dir", self.archive_dir.clone());
    }
}

/// The engine's settings from the configuration.
pub fn engine_config(c: &EngineSection) -> EngineConfig {
    EngineConfig {
        data_dir: c.data_dir.clone(),
        nodes: c.nodes.clone(),
        ended_retention: c.ended_retention.0,
        cmd_id_window: c.cmd_id_window.0,
        max_live_calls: c.max_live_calls,
        reconcile_every: Some(c.reconcile_every.0).filter(|d| !d.is_zero()),
        input_queue: c.input_queue,
        sync_data: c.sync_data,
        disk_reserve: c.disk_reserve.0,
        retention: Some(c.retention.0).filter(|d| !d.is_zero()),
        retention_bytes: c.retention_bytes.0,
        archive_dir: c.archive_dir.clone(),
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
    #[arg(long, env = "CALLBUS_METRICS_LISTEN", value_parser = crate::addr::parse)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    #[command(flatten)]
    pub nats_auth: nats::NatsAuth,
    #[command(flatten)]
    pub engine: EngineFlags,
    #[command(flatten)]
    pub cluster: ClusterFlags,
}

/// A single engine or a cluster worker.
pub enum Kind {
    /// The single-node engine.
    Single(Engine),
    /// A worker of the cluster.
    Worker(ClusterEngine),
}

/// A running engine and, when asked for, its Call API door.
pub struct Running {
    /// The engine.
    pub engine: Kind,
    door: Option<CallApiDoor>,
}

impl Running {
    /// Stops the door, then the engine (a worker hands its partitions over).
    pub async fn shutdown(self) {
        if let Some(door) = self.door {
            door.shutdown().await;
        }
        match self.engine {
            Kind::Single(e) => e.shutdown().await,
            Kind::Worker(w) => w.shutdown().await,
        }
    }

    /// What the engine says of itself when it starts.
    pub fn describe(&self) -> String {
        match &self.engine {
            Kind::Single(e) => format!("{} live calls recovered", e.recovered_live_calls()),
            Kind::Worker(w) => format!("cluster worker {}: taking its share of the partitions", w.worker()),
        }
    }
}

/// Starts the engine, or a cluster worker when `cluster` is given, and the Call API door;
/// `local` is the bridge running in this process (`callbus up`), if any.
pub async fn start_kind(
    section: &EngineSection,
    cluster: Option<ClusterConfig>,
    client: async_nats::Client,
    local: Option<callbus_engine::LocalNode>,
) -> anyhow::Result<Running> {
    let engine = match cluster {
        None => Kind::Single(Engine::start_with_local(engine_config(section), client.clone(), local).await?),
        Some(c) => Kind::Worker(ClusterEngine::start(engine_config(section), c, client.clone()).await?),
    };
    let door = match section.callapi_listen {
        Some(addr) => Some(
            CallApiDoor::start_with_token(addr, client, section.callapi_token.clone())
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen for Call API clients on {addr}: {e}"))?,
        ),
        None => None,
    };
    if let Some(door) = &door {
        println!("Call API door: ws://{}{}", door.local_addr(), callbus_door::PATH);
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
    args.cluster.overrides(&mut o);
    let config = config::load(file, o)?;
    let cluster = match config.cluster.enabled {
        // The partition logs are kept as long as `engine.retention` (at least an hour), and
        // within `engine.retention_bytes`.
        true => Some(ClusterConfig {
            log_max_age: config.engine.retention.0,
            log_max_bytes: config.engine.retention_bytes.0,
            ..cluster_config(&config.cluster)?
        }),
        false => None,
    };
    if let Some(addr) = config.metrics_listen {
        crate::metrics_http::serve(addr).await?;
    }
    let client = nats::connect(&config.nats, "callbus-engine", &config.nats_auth).await?;
    let engine = start_kind(&config.engine, cluster, client.clone(), None).await?;
    println!(
        "callbus engine: log in {} | NATS {} | {} | Ctrl-C to stop",
        config.engine.data_dir.display(),
        crate::nats::mask_url(&config.nats),
        engine.describe()
    );
    crate::signals::shutdown_signal().await;
    engine.shutdown().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
    Ok(ExitCode::SUCCESS)
}
