//! The callbus engine: turns OpenSIPS events and app commands into a durable, replayable
//! history per call, and drives OpenSIPS through the bridge.
//!
//! - [`machines`]: pure per-call state machines.
//! - [`core`]: the engine's decisions without I/O (which call an input is for, dedupe, queries,
//!   parking, reconciliation, timers, checkpoints, recovery), driven by inputs and the time.
//! - `driver`: the I/O around the core: NATS in, the store, effects out.
//! - [`log`]: the append-only event log (sled), with group commit; `store`: the contract the
//!   driver writes through, with the sled and the JetStream back ends.
//! - [`placement`]: which partition a call is in and which worker a partition is on.
//! - [`cluster`]: many engines on NATS JetStream: partitions, leases, a replicated log.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod allocator;
pub mod cluster;
pub mod core;
mod driver;
pub mod log;
pub mod machines;
pub mod placement;
mod restarts;
mod store;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use callbus_schemas::subjects;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use crate::cluster::{ClusterConfig, ClusterEngine};
use crate::log::SledLog;
pub use crate::machines::Timeouts;

/// The wall clock the engine stamps records and notifications with: the system's, shifted by
/// an offset tests can move to play a clock jump. Waits (timers) use the monotonic clock and
/// the log's order is its sequence, so a jump only shows in the recorded times.
#[derive(Clone, Debug, Default)]
pub struct WallClock(Arc<std::sync::atomic::AtomicI64>);

impl WallClock {
    /// Milliseconds since the Unix epoch, as this clock reads them.
    pub fn now_ms(&self) -> u64 {
        let system = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        system.saturating_add(self.0.load(std::sync::atomic::Ordering::Relaxed)).max(0) as u64
    }

    /// Moves the clock by `ms` (negative: back), as an NTP step would.
    pub fn jump(&self, ms: i64) {
        self.0.fetch_add(ms, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A count of commits the single engine fails on purpose, shared with a test that arms it.
#[doc(hidden)]
#[derive(Clone, Debug, Default)]
pub struct CommitFaults(Arc<std::sync::atomic::AtomicUsize>);

impl CommitFaults {
    /// Makes the next `n` commits fail.
    pub fn arm(&self, n: usize) {
        self.0.store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether this commit is to fail (then one fewer is left).
    pub(crate) fn take_one(&self) -> bool {
        self.0
            .fetch_update(std::sync::atomic::Ordering::SeqCst, std::sync::atomic::Ordering::SeqCst, |n| {
                n.checked_sub(1)
            })
            .is_ok()
    }
}

/// The `callbus` NATS service: one endpoint per command verb (its subject, the engines' queue
/// group, and in its metadata the request's fields, what it does and the reply's JSON Schema);
/// `worker` names the cluster worker it runs in.
pub fn commands_service(worker: Option<&str>) -> callbus_service::Spec {
    use callbus_schemas::catalog::COMMANDS;
    let reply_schema = callbus_schemas::json_schema::all()
        .into_iter()
        .find(|(name, _)| *name == "command_reply")
        .map(|(_, schema)| serde_json::to_string(&schema).unwrap_or_default())
        .unwrap_or_default();
    let endpoints = COMMANDS
        .iter()
        .map(|c| callbus_service::Endpoint {
            name: c.verb.as_str().to_owned(),
            subject: callbus_schemas::subjects::cmd(c.verb),
            queue_group: callbus_schemas::subjects::ENGINE_QUEUE.to_owned(),
            metadata: [
                ("request".to_owned(), c.body.to_owned()),
                ("does".to_owned(), c.does.to_owned()),
                ("response_schema".to_owned(), reply_schema.clone()),
            ]
            .into(),
        })
        .collect();
    let mut metadata = std::collections::BTreeMap::from([(
        "mode".to_owned(),
        if worker.is_some() { "cluster" } else { "single" }.to_owned(),
    )]);
    if let Some(worker) = worker {
        metadata.insert("worker".to_owned(), worker.to_owned());
    }
    callbus_service::Spec {
        name: "callbus".to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        description: "callbus commands: originate, answer, hold, transfer and end calls on OpenSIPS (docs/subjects.md)"
            .to_owned(),
        metadata,
        endpoints,
    }
}

/// How the engine is set up.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Where the log lives.
    pub data_dir: PathBuf,
    /// How long the machines wait for OpenSIPS.
    pub timeouts: Timeouts,
    /// OpenSIPS nodes to reconcile with on start (besides those of live calls).
    pub nodes: Vec<String>,
    /// How long to wait for a bridge's MI answer (the bridge's own timeout is 5 s).
    pub mi_timeout: Duration,
    /// How long an ended call stays in memory (late events for it are absorbed meanwhile).
    pub ended_retention: Duration,
    /// How long an accepted command's `cmd_id` is remembered (kept in the log, so also across
    /// restarts): the same `cmd_id` again within it gets the first answer. At most the last
    /// 100 000 are kept, whatever their age.
    pub cmd_id_window: Duration,
    /// Reconcile with OpenSIPS (`dlg_list`, `ua_session_list`) on start.
    pub reconcile: bool,
    /// Also reconcile every node with live calls this often (closes calls whose end was lost
    /// with a UDP event datagram, or that an OpenSIPS restart took away); `None`: only on start.
    pub reconcile_every: Option<Duration>,
    /// The log's page cache, in bytes.
    pub cache_bytes: u64,
    /// `fdatasync` the log's file after each commit as well, so acknowledged records survive a
    /// power cut or kernel crash, not only a crash of the process (see [`log::SledLog`]).
    pub sync_data: bool,
    /// The most live calls; `call.start` and `ua.start` are refused beyond it (calls OpenSIPS
    /// reports are always followed: refusing them would lose them).
    pub max_live_calls: usize,
    /// Bytes of free space kept in the data dir's file system (0: none): under it the single
    /// engine writes nothing and refuses commands until there is room (see [`log::disk`]).
    pub disk_reserve: u64,
    /// How long an ended call's records are kept in the log (`None` or zero: for ever); a
    /// call is removed whole once its last record is older, unless it is still in memory.
    pub retention: Option<Duration>,
    /// The most bytes the log's records may take as stored (0: no limit); beyond it the oldest
    /// calls are removed whole, however young, unless still in memory ([`log::SledLog::stored_bytes`]).
    pub retention_bytes: u64,
    /// Where retention archives calls before removing them (hourly zstd files that `callbus
    /// replay --archive` reads); `None`: they are only removed.
    pub archive_dir: Option<PathBuf>,
    /// Commits to fail on purpose, as a broken disk would (tests).
    #[doc(hidden)]
    pub commit_faults: CommitFaults,
    /// The wall clock (the system's).
    pub clock: WallClock,
    /// Commands (and a cluster partition's inputs) waiting for the engine at most; beyond it
    /// commands are refused as `unavailable` ("overloaded"). OpenSIPS events wait in their
    /// subscription until the engine takes them.
    pub input_queue: usize,
    /// The bridge running in this process (`callbus up`), if any: the engine takes its node's
    /// events and sends it MI requests directly instead of through NATS.
    pub local: Option<LocalNode>,
}

/// A bridge's MI client in the same process as the engine: the node it serves, and a function
/// that runs one MI command there (with the bridge's allow-list and its error replies).
#[derive(Clone)]
pub struct LocalMi {
    /// The bridge's node name.
    pub node: String,
    /// Runs `command` with `params` (a JSON object, or null for none) and answers as the bridge
    /// answers on `opensips.<node>.mi.<command>`.
    pub call: Arc<dyn Fn(String, serde_json::Value) -> LocalMiFuture + Send + Sync>,
}

/// The answer of a [`LocalMi`] call.
pub type LocalMiFuture = std::pin::Pin<Box<dyn std::future::Future<Output = callbus_schemas::bus::MiBusReply> + Send>>;

impl LocalMi {
    /// A local MI for `node` that runs commands with `call`.
    pub fn new<F, Fut>(node: impl Into<String>, call: F) -> LocalMi
    where
        F: Fn(String, serde_json::Value) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = callbus_schemas::bus::MiBusReply> + Send + 'static,
    {
        LocalMi { node: node.into(), call: Arc::new(move |command, params| Box::pin(call(command, params))) }
    }
}

impl std::fmt::Debug for LocalMi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalMi").field("node", &self.node).finish_non_exhaustive()
    }
}

/// A bridge in the same process as the engine (`callbus up`): its node's event datagrams,
/// handed over as they arrive (the bridge's sequence number and the datagram), and its MI.
/// The engine then ignores that node's events on NATS, which carry the same datagrams.
#[derive(Clone)]
pub struct LocalNode {
    /// The datagrams, in the bridge's order: one engine at a time reads them, and those that
    /// arrive while none runs wait for the next.
    pub events: LocalEvents,
    /// The bridge's MI.
    pub mi: LocalMi,
}

/// The receiving end of a bridge's tap (see [`LocalNode`]).
pub type LocalEvents = Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<(u64, bytes::Bytes)>>>;

impl std::fmt::Debug for LocalNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalNode").field("node", &self.mi.node).finish_non_exhaustive()
    }
}

impl LocalNode {
    /// The engine's side of a bridge's tap, and the bridge's MI.
    pub fn new(events: tokio::sync::mpsc::Receiver<(u64, bytes::Bytes)>, mi: LocalMi) -> LocalNode {
        LocalNode { events: Arc::new(tokio::sync::Mutex::new(events)), mi }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            data_dir: PathBuf::from("./callbus-data"),
            timeouts: Timeouts::default(),
            nodes: vec!["default".into()],
            mi_timeout: Duration::from_secs(7),
            ended_retention: Duration::from_secs(60),
            cmd_id_window: Duration::from_secs(24 * 3600),
            reconcile: true,
            reconcile_every: Some(Duration::from_secs(300)),
            cache_bytes: log::DEFAULT_CACHE_BYTES,
            sync_data: false,
            max_live_calls: 500_000,
            disk_reserve: log::disk::DEFAULT_RESERVE,
            commit_faults: CommitFaults::default(),
            retention: None,
            retention_bytes: 0,
            archive_dir: None,
            clock: WallClock::default(),
            input_queue: 65_536,
            local: None,
        }
    }
}

impl EngineConfig {
    /// What the core is told of this set-up (`placement`: the partition, in a cluster).
    pub fn core(&self, placement: Option<placement::Placement>) -> core::CoreConfig {
        core::CoreConfig {
            timeouts: self.timeouts,
            nodes: self.nodes.clone(),
            max_live_calls: self.max_live_calls,
            cmd_id_window: self.cmd_id_window,
            ended_retention: self.ended_retention,
            placement,
        }
    }
}

/// Why the engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The log could not be opened or read.
    #[error(transparent)]
    Log(#[from] log::LogError),
    /// NATS refused a subscription.
    #[error("NATS: {0}")]
    Nats(String),
}

/// A running engine.
pub struct Engine {
    cancel: CancellationToken,
    owner: Option<JoinHandle<()>>,
    forwarders: Vec<JoinHandle<()>>,
    recovered_live: usize,
    /// The `callbus` NATS service (`nats micro info callbus`).
    service: callbus_service::Service,
}

impl Engine {
    /// Opens the log, rebuilds live calls, subscribes to events and commands, and starts.
    pub async fn start(config: EngineConfig, client: async_nats::Client) -> Result<Engine, EngineError> {
        Engine::start_with_local(config, client, None).await
    }

    /// [`Engine::start`], with the bridge of `local`'s node in this process (or the one in
    /// `config.local`): its events and MI requests skip NATS (two NATS hops less on every call
    /// set-up step).
    pub async fn start_with_local(
        mut config: EngineConfig,
        client: async_nats::Client,
        local: Option<LocalNode>,
    ) -> Result<Engine, EngineError> {
        if local.is_some() {
            config.local = local;
        }
        let local_node = config.local.as_ref().map(|l| l.mi.node.clone());
        let started = std::time::Instant::now();
        let log = Arc::new(SledLog::open_with(&config.data_dir, config.cache_bytes, config.sync_data)?);
        let opened = started.elapsed();
        log::EventLog::stage_timeouts(&*log, &config.timeouts)?;
        let store = store::SledStore::new(Arc::clone(&log), config.commit_faults.clone());
        let (core, restored) = driver::recover(&config, &store)?;
        let (live, tail) = (restored.live, restored.tail);
        let mut owner = driver::Owner::new(config.clone(), core, store, client.clone(), true);
        let (tx, rx) = tokio::sync::mpsc::channel(config.input_queue.max(1));
        let disk = log::disk::DiskGuard::new(&config.data_dir, config.disk_reserve);
        disk.hold();
        if let Err(low) = disk.check() {
            tracing::error!(%low, "commands are refused until there is room");
        }
        owner.disk = Some(disk);
        tracing::info!(
            data_dir = %config.data_dir.display(),
            live,
            tail_records = tail,
            next_seq = owner.core().next_seq(),
            open_ms = opened.as_millis() as u64,
            recover_ms = (started.elapsed() - opened).as_millis() as u64,
            "engine recovered its calls"
        );
        let recovered_live = live;
        let cancel = CancellationToken::new();
        let events = client
            .subscribe(subjects::ALL_NODES_EVENTS)
            .await
            .map_err(|e| EngineError::Nats(format!("cannot subscribe to {}: {e}", subjects::ALL_NODES_EVENTS)))?;
        let commands = client
            .queue_subscribe(callbus_schemas::subjects::ALL_COMMANDS, callbus_schemas::subjects::ENGINE_QUEUE.into())
            .await
            .map_err(|e| {
                EngineError::Nats(format!("cannot subscribe to {}: {e}", callbus_schemas::subjects::ALL_COMMANDS))
            })?;
        let service =
            callbus_service::Service::start(&client, commands_service(None)).await.map_err(EngineError::Nats)?;
        owner.service = Some(service.clone());
        let mut forwarders = vec![tokio::spawn(driver::forward_commands(
            commands,
            tx.clone(),
            client.clone(),
            cancel.clone(),
            Some(service.clone()),
        ))];
        // The owner reads the events itself, but with a bridge in this process the NATS copies
        // of its node's events are dropped on a task of their own, off the owner's.
        let feed = driver::EventFeed::new(events, local_node);
        match config.local {
            Some(_) => forwarders.push(tokio::spawn(feed.forward(tx.clone(), cancel.clone()))),
            None => owner.events = Some(feed),
        }
        let owner = tokio::spawn(driver::supervise(owner, rx, cancel.clone(), config.clone(), client.clone()));
        Ok(Engine { cancel, owner: Some(owner), forwarders, recovered_live, service })
    }

    /// Live calls found in the log at start.
    pub fn recovered_live_calls(&self) -> usize {
        self.recovered_live
    }

    /// Stops taking new work, finishes and commits what is in flight, and stops.
    pub async fn shutdown(mut self) {
        self.service.stop();
        self.cancel.cancel();
        for f in self.forwarders.drain(..) {
            let _ = f.await;
        }
        if let Some(owner) = self.owner.take() {
            let _ = owner.await;
        }
    }

    /// Stops at once, as a crash would (nothing more is committed or carried out).
    pub fn abort(mut self) {
        self.service.stop();
        for f in self.forwarders.drain(..) {
            f.abort();
        }
        if let Some(owner) = self.owner.take() {
            owner.abort();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}
