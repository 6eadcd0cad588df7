//! Many engines on one NATS JetStream cluster.
//!
//! Calls are spread over partitions (default 64) by a stable hash of the call's key: the SIP
//! Call-ID of a proxied dialog, the b2b key of a UA server session, the `cmd_id` of a call an
//! app starts. Each partition has one owner at a time: a lease, key `p.<p>` in the KV bucket
//! [`LEASES_BUCKET`], whose messages expire after the lease's TTL unless renewed. The owner
//! appends its partition's records, a batch per message, to the subject `callbus.log.<p>` of the
//! stream [`LOG_STREAM`] with `Nats-Expected-Last-Subject-Sequence`: a worker whose lease was
//! taken cannot append any more (fencing), and a new owner's first act is an append of its own
//! (a marker), so the old one is fenced at once. OpenSIPS events are captured by the stream
//! [`EVENTS_STREAM`]; every batch message carries, in `Callbus-Input-Seq`, the input-stream
//! sequence up to which its partition has consumed events, so a new owner resumes exactly there.
//!
//! A worker's local sled (one directory per partition it holds) is its copy: on taking a
//! partition it is rebuilt from the JetStream log, and the calls from it as after a restart.
//! Partitions are placed by rendezvous hashing over the live workers (heartbeats `w.<worker>`
//! in the same bucket), handed over on a clean shutdown, and taken after a lease expires.
//!
//! Commands arrive on `callbus.cmd.<verb>` at any worker (queue group); the worker forwards
//! each to `callbus.part.<p>.cmd.<verb>`, which only the partition's owner reads, and relays the
//! answer. Notifications are unchanged.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use callbus_schemas::command::{CommandError, CommandErrorCode, CommandReply, CommandRequest};
use callbus_schemas::event::{Event, UaEventType};
use callbus_schemas::subjects::{self, Verb};
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::driver::{self, Work};
use crate::log::{EventLog, LogError, SledLog};
use crate::{EngineConfig, EngineError};

/// Partitions unless configured.
pub const DEFAULT_PARTITIONS: u16 = 64;
/// The stream of every partition's records (`callbus.log.<p>`).
pub const LOG_STREAM: &str = "CALLBUS_LOG";
/// The stream of the bridges' input batches (`callbus.input.<node>`, see
/// [`callbus_schemas::input`]).
pub const EVENTS_STREAM: &str = callbus_schemas::input::STREAM;
/// The KV bucket of leases (`p.<p>`) and worker heartbeats (`w.<worker>`).
pub const LEASES_BUCKET: &str = "callbus_leases";
/// Header of a log message: the input-stream sequence its partition has consumed up to.
pub const HEADER_INPUT_SEQ: &str = "Callbus-Input-Seq";
/// Header of a log message: the worker that wrote it.
pub const HEADER_OWNER: &str = "Callbus-Owner";
/// Header of a log message: how many records it holds (0: a takeover marker or a position).
pub const HEADER_RECORDS: &str = "Callbus-Records";
/// The largest log message (NATS's default `max_payload` is 1 MiB); a batch bigger than this
/// (it cannot be: see [`FULL_BATCH`]) would be split.
const MAX_MESSAGE: usize = 900 * 1024;
/// The owner stops taking input once its staged records reach this much, and commits: one
/// more input's records (bodies are at most 48 KiB) keep the batch under [`MAX_MESSAGE`].
const FULL_BATCH: usize = 512 * 1024;
/// How long a command waits for its partition to get an owner (during a handover).
const COMMAND_ROUTE_WAIT: Duration = Duration::from_secs(8);

/// How a worker joins the cluster.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// This worker's name (unique among live workers; letters, digits, `-`, `_`).
    pub worker: String,
    /// How many partitions (every worker of a cluster must agree).
    pub partitions: u16,
    /// JetStream replicas of the streams and the bucket (3 on a 3-node NATS cluster).
    pub replicas: usize,
    /// A lease not renewed for this long expires and another worker may take the partition.
    pub lease_ttl: Duration,
    /// How long OpenSIPS events are kept in the input stream.
    pub events_max_age: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            worker: default_worker_name(),
            partitions: DEFAULT_PARTITIONS,
            replicas: 1,
            lease_ttl: Duration::from_secs(2),
            events_max_age: Duration::from_secs(24 * 3600),
        }
    }
}

/// `<hostname>-<pid>`: unique among the workers of a cluster unless two share a host and pid.
pub fn default_worker_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_else(|_| "worker".into());
    sanitize(&format!("{}-{}", host.trim(), std::process::id()))
}

fn sanitize(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}

/// The partition of a key: FNV-1a (32 bits) modulo `partitions`; stable across versions.
pub fn partition_of(key: &str, partitions: u16) -> u16 {
    let mut h: u32 = 0x811c_9dc5;
    for b in key.as_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h % u32::from(partitions.max(1))) as u16
}

/// A call id with its partition appended (`…p<hex>`).
pub fn call_id_in(id: &str, partition: u16) -> String {
    format!("{id}p{partition:x}")
}

/// The partition of a call id: the one it names (`c<18 hex>p<hex>`), else its hash.
pub fn partition_of_call_id(id: &str, partitions: u16) -> u16 {
    let named = id
        .strip_prefix('c')
        .filter(|rest| rest.len() > 19 && rest.as_bytes()[18] == b'p')
        .and_then(|rest| u16::from_str_radix(&rest[19..], 16).ok())
        .filter(|p| *p < partitions);
    named.unwrap_or_else(|| partition_of(id, partitions))
}

/// The log subject of a partition.
pub fn log_subject(partition: u16) -> String {
    subjects::partition_log(partition)
}

/// The subject a partition's owner takes commands on (`<verb>` appended).
pub fn partition_cmd_prefix(partition: u16) -> String {
    subjects::partition_cmd_prefix(partition)
}

fn lease_key(partition: u16) -> String {
    format!("p.{partition}")
}

/// Which worker a partition belongs on: rendezvous hashing over the live workers.
pub fn placement(partition: u16, workers: &[String]) -> Option<&str> {
    workers
        .iter()
        .max_by_key(|w| {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for b in w.as_bytes().iter().chain(partition.to_be_bytes().iter()) {
                h ^= u64::from(*b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
            // FNV's low bits mix poorly: finish with a multiply-xorshift.
            h ^= h >> 33;
            h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
            h ^ (h >> 33)
        })
        .map(String::as_str)
}

/// UA session keys known on this worker, and their partitions.
#[derive(Default)]
pub(crate) struct Keys(Mutex<HashMap<String, u16>>);

impl Keys {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, u16>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn get(&self, key: &str) -> Option<u16> {
        self.lock().get(key).copied()
    }
}

/// A partition owner's side of the cluster: its replicated log.
pub(crate) struct PartCtx {
    pub partition: u16,
    /// How many partitions the cluster has.
    pub partitions: u16,
    worker: String,
    js: jetstream::Context,
    subject: String,
    /// The last sequence of this partition's subject, which the next append expects.
    expected: u64,
    /// Marks this ownership's message ids apart from any other's (the marker's sequence).
    epoch: u64,
    appends: u64,
    /// Input-stream position consumed (handled and staged).
    pub input_seq: u64,
    published_input: u64,
    last_publish: Instant,
    batch: Vec<u8>,
    ends: Vec<usize>,
    keys: Arc<Keys>,
}

impl PartCtx {
    pub(crate) fn add(&mut self, record: &[u8]) {
        self.batch.extend_from_slice(record);
        self.ends.push(self.batch.len());
    }

    pub(crate) fn learn_key(&self, key: &str) {
        self.keys.lock().insert(key.to_owned(), self.partition);
    }

    pub(crate) fn forget_key(&self, key: &str) {
        let mut keys = self.keys.lock();
        if keys.get(key) == Some(&self.partition) {
            keys.remove(key);
        }
    }

    /// Whether the staged records fill a log message (the owner then commits before it takes
    /// more input, so a batch is one message and its input position is exact).
    pub(crate) fn full(&self) -> bool {
        self.batch.len() >= FULL_BATCH
    }

    /// Whether the input position moved with no records to carry it for a second.
    pub(crate) fn position_due(&self) -> bool {
        self.input_seq > self.published_input && self.last_publish.elapsed() >= Duration::from_secs(1)
    }

    /// Appends the staged records (in messages of at most [`MAX_MESSAGE`]) and the input
    /// position; `Fenced` when another worker appended since.
    pub(crate) async fn publish(&mut self) -> Result<(), LogError> {
        if self.batch.is_empty() && self.input_seq <= self.published_input {
            return Ok(());
        }
        let batch = Bytes::from(std::mem::take(&mut self.batch));
        let ends = std::mem::take(&mut self.ends);
        let mut chunks: Vec<(usize, usize, usize)> = Vec::new();
        let (mut start, mut count) = (0usize, 0usize);
        for (i, end) in ends.iter().enumerate() {
            count += 1;
            let next = ends.get(i + 1).copied();
            if next.is_none_or(|n| n - start > MAX_MESSAGE) {
                chunks.push((start, *end, count));
                start = *end;
                count = 0;
            }
        }
        if chunks.is_empty() {
            chunks.push((0, 0, 0));
        }
        let last = chunks.len() - 1;
        for (i, (from, to, records)) in chunks.into_iter().enumerate() {
            // Only the last message says the batch's events are all in.
            let position = if i == last { self.input_seq } else { self.published_input };
            self.append(batch.slice(from..to), records, position).await?;
        }
        self.published_input = self.input_seq;
        self.last_publish = Instant::now();
        Ok(())
    }

    async fn append(&mut self, payload: Bytes, records: usize, position: u64) -> Result<(), LogError> {
        self.appends += 1;
        let id = format!("{}.{}.{}", self.partition, self.epoch, self.appends);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let message = jetstream::message::PublishMessage::build()
                .payload(payload.clone())
                .expected_last_subject_sequence(self.expected)
                .message_id(&id)
                .header(HEADER_INPUT_SEQ, position.to_string().as_str())
                .header(HEADER_OWNER, self.worker.as_str())
                .header(HEADER_RECORDS, records.to_string().as_str());
            let error = match self.js.send_publish(self.subject.clone(), message).await {
                Ok(ack) => match ack.await {
                    Ok(ack) => {
                        self.expected = ack.sequence;
                        return Ok(());
                    }
                    Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
                        return Err(LogError::Fenced { partition: self.partition });
                    }
                    Err(e) => e.to_string(),
                },
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(LogError::Replica { partition: self.partition, reason: error });
            }
            tracing::warn!(
                partition = self.partition,
                error,
                "append to the replicated log not acknowledged: retrying"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A JetStream context that gives up on a request or an ack after 2 s (async-nats waits 5 s
/// and 30 s): callers retry, and while a stream changes leader a quick retry is what works.
pub fn context(client: &async_nats::Client) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .ack_timeout(Duration::from_secs(2))
        .build(client.clone())
}

/// Creates the streams and the bucket if they are missing (waits up to 30 s for JetStream,
/// which a starting cluster needs to elect its leaders).
pub async fn ensure_streams(js: &jetstream::Context, config: &ClusterConfig) -> Result<jetstream::kv::Store, String> {
    let streams = [
        stream::Config {
            name: LOG_STREAM.into(),
            subjects: vec![subjects::ALL_PARTITION_LOGS.into()],
            storage: stream::StorageType::File,
            num_replicas: config.replicas,
            allow_direct: true,
            ..Default::default()
        },
        stream::Config {
            name: EVENTS_STREAM.into(),
            subjects: vec![callbus_schemas::input::STREAM_SUBJECTS.into()],
            storage: stream::StorageType::File,
            num_replicas: config.replicas,
            max_age: config.events_max_age,
            ..Default::default()
        },
        // A KV bucket made by hand: async-nats's `create_key_value` fails on nats-server 2.9.
        stream::Config {
            name: format!("KV_{LEASES_BUCKET}"),
            subjects: vec![format!("$KV.{LEASES_BUCKET}.>")],
            storage: stream::StorageType::File,
            num_replicas: config.replicas,
            max_messages_per_subject: 1,
            max_age: config.lease_ttl,
            duplicate_window: config.lease_ttl.min(Duration::from_secs(120)),
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            discard: stream::DiscardPolicy::New,
            ..Default::default()
        },
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    for config in streams {
        loop {
            let error = match js.get_stream(&config.name).await {
                Ok(_) => break,
                Err(e) => match js.create_stream(config.clone()).await {
                    Ok(_) => break,
                    Err(c) => format!("{e}; creating it: {c}"),
                },
            };
            if Instant::now() >= deadline {
                return Err(format!(
                    "JetStream stream {}: {error}; is JetStream enabled on the NATS servers?",
                    config.name
                ));
            }
            tracing::debug!(stream = %config.name, error, "JetStream not ready yet");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    loop {
        match js.get_key_value(LEASES_BUCKET).await {
            Ok(kv) => return Ok(kv),
            Err(e) if Instant::now() >= deadline => return Err(format!("KV bucket {LEASES_BUCKET}: {e}")),
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// Where each owned partition's events go, and up to which input sequence they went.
#[derive(Default)]
struct Dispatch {
    owned: HashMap<u16, (mpsc::Sender<Work>, u64)>,
}

/// What every task of a worker shares.
struct Shared {
    config: EngineConfig,
    cluster: ClusterConfig,
    client: async_nats::Client,
    js: jetstream::Context,
    kv: jetstream::kv::Store,
    keys: Arc<Keys>,
    dispatch: Mutex<Dispatch>,
    /// Partitions taken, for the event reader to feed (it registers them itself, in its own
    /// order, so it never announces a position past events a new partition has not seen).
    /// Bounded by the partition count: each partition taken registers once, and the reader
    /// takes registrations between input batches, so a full queue only makes a taker wait.
    register: mpsc::Sender<Register>,
    /// Live workers other than this one, by when their heartbeat was last seen.
    workers: Mutex<HashMap<String, Instant>>,
    /// When the heartbeat watch last showed this worker's own heartbeat (it is working).
    self_seen: Mutex<Option<Instant>>,
    /// The `callbus` NATS service: its stats count the commands this worker's partitions answer.
    service: callbus_service::Service,
}

impl Shared {
    fn dispatch(&self) -> std::sync::MutexGuard<'_, Dispatch> {
        self.dispatch.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn workers(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.workers.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn self_seen(&self) -> Option<Instant> {
        *self.self_seen.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A partition this worker owns.
struct Held {
    revision: u64,
    cancel: CancellationToken,
    owner: JoinHandle<Option<driver::Stopped>>,
    commands: JoinHandle<()>,
}

impl Drop for Held {
    fn drop(&mut self) {
        // A worker stopped at once takes its partitions' tasks with it, as a crash would.
        self.commands.abort();
        self.owner.abort();
    }
}

/// A worker of the cluster: owns some partitions, routes commands, reads the input stream.
pub struct ClusterEngine {
    worker: String,
    cancel: CancellationToken,
    manager: Option<JoinHandle<()>>,
    tasks: Vec<JoinHandle<()>>,
}

impl ClusterEngine {
    /// Joins the cluster: creates the streams if needed, then takes partitions in the
    /// background (this worker's share, once the lease of each is free).
    pub async fn start(
        config: EngineConfig,
        cluster: ClusterConfig,
        client: async_nats::Client,
    ) -> Result<ClusterEngine, EngineError> {
        let js = context(&client);
        let kv = ensure_streams(&js, &cluster).await.map_err(EngineError::Nats)?;
        std::fs::create_dir_all(config.data_dir.join("partitions")).map_err(|e| {
            EngineError::Log(LogError::Store { path: config.data_dir.display().to_string(), reason: e.to_string() })
        })?;
        let (register, register_rx) = mpsc::channel(usize::from(cluster.partitions.max(1)));
        let service = callbus_service::Service::start(&client, crate::commands_service(Some(&cluster.worker)))
            .await
            .map_err(EngineError::Nats)?;
        let shared = Arc::new(Shared {
            config,
            cluster: cluster.clone(),
            client: client.clone(),
            js,
            kv,
            keys: Default::default(),
            dispatch: Default::default(),
            register,
            workers: Default::default(),
            self_seen: Default::default(),
            service,
        });
        let cancel = CancellationToken::new();
        let commands = client
            .queue_subscribe(subjects::ALL_COMMANDS, subjects::ENGINE_QUEUE.into())
            .await
            .map_err(|e| EngineError::Nats(format!("cannot subscribe to {}: {e}", subjects::ALL_COMMANDS)))?;
        let tasks = vec![
            tokio::spawn(read_events(Arc::clone(&shared), register_rx, cancel.clone())),
            tokio::spawn(route_commands(Arc::clone(&shared), commands, cancel.clone())),
            tokio::spawn(watch_workers(Arc::clone(&shared), cancel.clone())),
        ];
        let manager = tokio::spawn(manage(shared, cancel.clone()));
        tracing::info!(worker = %cluster.worker, partitions = cluster.partitions, "joined the cluster");
        Ok(ClusterEngine { worker: cluster.worker, cancel, manager: Some(manager), tasks })
    }

    /// This worker's name.
    pub fn worker(&self) -> &str {
        &self.worker
    }

    /// Hands its partitions over (each drained and logged, its lease released) and leaves.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        if let Some(m) = self.manager.take() {
            let _ = m.await;
        }
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }

    /// Stops at once, as a crash would (leases expire, others take the partitions).
    pub fn abort(mut self) {
        if let Some(m) = self.manager.take() {
            m.abort();
        }
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

impl Drop for ClusterEngine {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct LeaseValue {
    worker: String,
}

/// Takes partitions, renews their leases, hands them over, and keeps the heartbeat.
async fn manage(shared: Arc<Shared>, cancel: CancellationToken) {
    let me = shared.cluster.worker.clone();
    let ttl = shared.cluster.lease_ttl;
    let renew_every = ttl / 4;
    let mut held: HashMap<u16, Held> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100).min(renew_every));
    let mut last_renew = Instant::now();
    let mut last_heartbeat: Option<Instant> = None;
    // Since when this worker's heartbeats have been written without a miss: only a worker
    // that has seen the bucket work for a whole TTL judges who is alive and takes partitions
    // (after a JetStream outage every heartbeat looks stale at first).
    let mut healthy_since: Option<Instant> = None;
    let started = Instant::now();
    let lease_value = Bytes::from(serde_json::to_vec(&serde_json::json!({ "worker": me })).unwrap_or_default());
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = cancel.cancelled() => break,
        }
        if last_heartbeat.is_none_or(|t| t.elapsed() >= renew_every) {
            let body = serde_json::json!({"worker": me, "partitions": held.len(), "up_ms": started.elapsed().as_millis() as u64});
            match tokio::time::timeout(ttl / 2, shared.kv.put(format!("w.{me}"), Bytes::from(body.to_string()))).await {
                Ok(Ok(_)) => {
                    last_heartbeat = Some(Instant::now());
                    healthy_since.get_or_insert_with(Instant::now);
                }
                Ok(Err(e)) => {
                    healthy_since = None;
                    tracing::warn!(error = %e, "cluster heartbeat not written: not taking partitions until it is");
                }
                Err(_) => {
                    healthy_since = None;
                    tracing::warn!("cluster heartbeat not written in time: not taking partitions until it is");
                }
            }
        }
        if last_renew.elapsed() >= renew_every {
            last_renew = Instant::now();
            let renewals = held.iter().map(|(p, h)| {
                let kv = shared.kv.clone();
                let (p, rev, value) = (*p, h.revision, lease_value.clone());
                async move { (p, tokio::time::timeout(ttl / 2, kv.update(lease_key(p), value, rev)).await) }
            });
            for (p, result) in futures::future::join_all(renewals).await {
                let Ok(result) = result else {
                    tracing::warn!(partition = p, "lease not renewed in time; retrying");
                    continue;
                };
                match result {
                    Ok(rev) => {
                        if let Some(h) = held.get_mut(&p) {
                            h.revision = rev;
                        }
                    }
                    Err(e) if e.kind() == jetstream::kv::UpdateErrorKind::WrongLastRevision => {
                        // A renewal whose answer was lost (a NATS server went away) moved the
                        // revision on: still ours if the lease names this worker.
                        match still_ours(&shared.kv, p, &me, lease_value.clone()).await {
                            Some(rev) => {
                                if let Some(h) = held.get_mut(&p) {
                                    h.revision = rev;
                                }
                            }
                            None => {
                                tracing::warn!(partition = p, "lease lost to another worker: stepping down");
                                if let Some(h) = held.remove(&p) {
                                    drop_partition(&shared, p, h);
                                }
                            }
                        }
                    }
                    Err(e) => tracing::warn!(partition = p, error = %e, "lease not renewed; retrying"),
                }
            }
        }
        // Owners that stopped on their own (their log refused them).
        let stopped: Vec<u16> = held.iter().filter(|(_, h)| h.owner.is_finished()).map(|(p, _)| *p).collect();
        for p in stopped {
            if let Some(h) = held.remove(&p) {
                let revision = h.revision;
                drop_partition(&shared, p, h);
                let _ = shared.kv.delete_expect_revision(lease_key(p), Some(revision)).await;
            }
        }
        let judged =
            healthy_since.is_some_and(|t| t.elapsed() >= ttl) && shared.self_seen().is_some_and(|t| t.elapsed() < ttl);
        if !judged {
            continue;
        }
        let mut live: Vec<String> = {
            let workers = shared.workers();
            workers.iter().filter(|(_, seen)| seen.elapsed() < ttl).map(|(w, _)| w.clone()).collect()
        };
        live.push(me.clone());
        live.sort();
        let partitions = shared.cluster.partitions;
        let wanted: Vec<u16> =
            (0..partitions).filter(|p| !held.contains_key(p) && placement(*p, &live) == Some(me.as_str())).collect();
        if !wanted.is_empty() {
            let attempts = wanted.into_iter().map(|p| {
                let shared = Arc::clone(&shared);
                let value = lease_value.clone();
                tokio::spawn(async move { (p, acquire(&shared, p, value).await) })
            });
            for joined in futures::future::join_all(attempts).await {
                match joined {
                    Ok((p, Ok(Some(h)))) => {
                        held.insert(p, h);
                    }
                    Ok((_, Ok(None))) => {}
                    Ok((p, Err(e))) => tracing::warn!(partition = p, error = %e, "partition not taken; retrying"),
                    Err(e) => tracing::error!(error = %e, "taking a partition panicked"),
                }
            }
        }
        // Hand over what belongs on another live worker (a few at a time, so calls keep flowing).
        let leaving: Vec<u16> =
            held.keys().copied().filter(|p| placement(*p, &live).is_some_and(|w| w != me.as_str())).take(8).collect();
        for p in leaving {
            if let Some(h) = held.remove(&p) {
                release(&shared, p, h).await;
            }
        }
    }
    let all: Vec<(u16, Held)> = held.drain().collect();
    let releases = all.into_iter().map(|(p, h)| release(&shared, p, h));
    futures::future::join_all(releases).await;
    let _ = shared.kv.delete(format!("w.{me}")).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), shared.client.flush()).await;
    tracing::info!(worker = %me, "left the cluster: partitions handed over");
}

/// The lease's revision if it still names `me`; a lease that expired meanwhile (JetStream was
/// away longer than the TTL) is taken again if no one else took it.
async fn still_ours(kv: &jetstream::kv::Store, p: u16, me: &str, value: Bytes) -> Option<u64> {
    let entry = match kv.entry(lease_key(p)).await.ok()? {
        Some(e) if e.operation == jetstream::kv::Operation::Put => e,
        _ => return kv.create(lease_key(p), value).await.ok(),
    };
    let holder: LeaseValue = serde_json::from_slice(&entry.value).ok()?;
    (entry.operation == jetstream::kv::Operation::Put && holder.worker == me).then_some(entry.revision)
}

/// Stops feeding a partition and drops it at once (its owner may not write any more).
fn drop_partition(shared: &Shared, p: u16, h: Held) {
    shared.dispatch().owned.remove(&p);
    h.commands.abort();
    h.cancel.cancel();
    h.owner.abort();
    metrics::gauge!("callbus_cluster_partitions_owned").decrement(1.0);
}

/// Hands a partition over cleanly: no more input, what is queued handled and logged, lease
/// released.
async fn release(shared: &Shared, p: u16, mut h: Held) {
    shared.dispatch().owned.remove(&p);
    h.commands.abort();
    h.cancel.cancel();
    let _ = (&mut h.owner).await;
    if let Err(e) = shared.kv.delete_expect_revision(lease_key(p), Some(h.revision)).await {
        tracing::warn!(partition = p, error = %e, "lease not released; it expires by itself");
    }
    metrics::gauge!("callbus_cluster_partitions_owned").decrement(1.0);
    tracing::info!(partition = p, "partition handed over");
}

/// Takes partition `p` if its lease is free: lease, fence, rebuild from the log, start.
async fn acquire(shared: &Arc<Shared>, p: u16, value: Bytes) -> Result<Option<Held>, String> {
    let key = lease_key(p);
    let me = &shared.cluster.worker;
    let revision = match shared.kv.create(&key, value.clone()).await {
        Ok(rev) => rev,
        Err(e) if e.kind() == jetstream::kv::CreateErrorKind::AlreadyExists => {
            // Ours from before (an owner that stopped)? Then take it back.
            match shared.kv.entry(&key).await {
                Ok(Some(entry)) => {
                    let holder: Option<LeaseValue> = serde_json::from_slice(&entry.value).ok();
                    if holder.is_some_and(|h| &h.worker == me) {
                        shared.kv.update(&key, value, entry.revision).await.map_err(|e| e.to_string())?
                    } else {
                        return Ok(None);
                    }
                }
                _ => return Ok(None),
            }
        }
        Err(e) => return Err(format!("lease {key}: {e}")),
    };
    let started = Instant::now();
    let subject = log_subject(p);
    let log_stream = shared.js.get_stream(LOG_STREAM).await.map_err(|e| format!("stream {LOG_STREAM}: {e}"))?;
    // Fence: append a marker after the last message, so the previous owner's next append fails.
    let mut marker_seq = 0;
    for attempt in 0..20 {
        let last = match log_stream.get_last_raw_message_by_subject(&subject).await {
            Ok(m) => m.sequence,
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => 0,
            Err(e) => return Err(format!("last message of {subject}: {e}")),
        };
        let marker = jetstream::message::PublishMessage::build()
            .expected_last_subject_sequence(last)
            .header(HEADER_OWNER, me.as_str())
            .header(HEADER_RECORDS, "0");
        match shared.js.send_publish(subject.clone(), marker).await {
            Ok(ack) => match ack.await {
                Ok(ack) => {
                    marker_seq = ack.sequence;
                    break;
                }
                Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {}
                Err(e) => return Err(format!("takeover marker on {subject}: {e}")),
            },
            Err(e) => return Err(format!("takeover marker on {subject}: {e}")),
        }
        tracing::debug!(partition = p, attempt, "the previous owner appended meanwhile: fencing again");
    }
    if marker_seq == 0 {
        return Err(format!("could not fence {subject}: the previous owner keeps appending"));
    }
    // The local copy, rebuilt from the replicated log.
    let dir = partition_dir(&shared.config.data_dir, p);
    let (log, position) = rebuild(&shared.js, &dir, p, marker_seq, shared.config.cache_bytes).await?;
    let log = Arc::new(log);
    let mut config = shared.config.clone();
    config.data_dir = dir;
    // Only the periodic reconciliation (`reconcile_every`): what happened while the partition
    // changed owner is in the input stream; what UDP lost before the bridge is not, and the
    // periodic list finds it.
    let (mut owner, rx) = driver::owner(config, Arc::clone(&log), shared.client.clone());
    owner.service = Some(shared.service.clone());
    owner.part = Some(PartCtx {
        partition: p,
        worker: me.clone(),
        js: shared.js.clone(),
        subject,
        expected: marker_seq,
        epoch: marker_seq,
        appends: 0,
        input_seq: position,
        published_input: position,
        last_publish: Instant::now(),
        batch: Vec::new(),
        ends: Vec::new(),
        keys: Arc::clone(&shared.keys),
        partitions: shared.cluster.partitions,
    });
    let (live, records) = driver::recover(&mut owner).map_err(|e| e.to_string())?;
    for key in owner.known_keys() {
        shared.keys.lock().insert(key, p);
    }
    let tx = owner.sender();
    let commands = shared
        .client
        .subscribe(format!("{}>", partition_cmd_prefix(p)))
        .await
        .map_err(|e| format!("subscribing to partition {p}'s commands: {e}"))?;
    let cancel = CancellationToken::new();
    let commands = tokio::spawn(driver::forward_commands_from(
        commands,
        partition_cmd_prefix(p),
        tx.clone(),
        shared.client.clone(),
        cancel.clone(),
        Some(shared.service.clone()),
    ));
    let _ = shared.register.send(Register { partition: p, tx, done: position }).await;
    let owner = tokio::spawn(owner.run(rx, cancel.clone()));
    metrics::gauge!("callbus_cluster_partitions_owned").increment(1.0);
    tracing::info!(
        partition = p,
        live,
        records,
        resume_after = position,
        took_ms = started.elapsed().as_millis() as u64,
        "partition taken"
    );
    Ok(Some(Held { revision, cancel, owner, commands }))
}

fn partition_dir(data_dir: &std::path::Path, p: u16) -> PathBuf {
    data_dir.join("partitions").join(p.to_string())
}

/// One record of a log message: its sequence, its call, its bytes.
pub type RecordSlice<'a> = (u64, String, &'a [u8]);

/// The records of one log message.
pub fn split_records(payload: &[u8]) -> Result<Vec<RecordSlice<'_>>, String> {
    #[derive(serde::Deserialize)]
    struct Head {
        seq: u64,
        call_id: String,
    }
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < payload.len() {
        let mut cursor = std::io::Cursor::new(&payload[at..]);
        let head: Head = {
            let mut de = rmp_serde::Deserializer::new(&mut cursor);
            serde::Deserialize::deserialize(&mut de).map_err(|e| format!("record at byte {at}: {e}"))?
        };
        let len = cursor.position() as usize;
        if len == 0 {
            return Err(format!("empty record at byte {at}"));
        }
        out.push((head.seq, head.call_id, &payload[at..at + len]));
        at += len;
    }
    Ok(out)
}

/// Copies partition `p`'s replicated log into a sled log in `dir` (which must not hold one),
/// for `callbus replay`; returns how many records.
pub async fn copy_partition(client: &async_nats::Client, p: u16, dir: &std::path::Path) -> Result<u64, String> {
    let js = context(client);
    let log = SledLog::open(dir).map_err(|e| e.to_string())?;
    let mut n = 0u64;
    read_partition(&js, p, 0, |seq, call_id, bytes| {
        n += 1;
        log.stage_raw(seq, call_id, bytes).map_err(|e| e.to_string())
    })
    .await?;
    log.commit().await.map_err(|e| e.to_string())?;
    Ok(n)
}

/// Reads a partition's log up to `until` into a fresh local sled copy; returns it and the
/// input position the log reached.
async fn rebuild(
    js: &jetstream::Context,
    dir: &std::path::Path,
    p: u16,
    until: u64,
    cache_bytes: u64,
) -> Result<(SledLog, u64), String> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| format!("clearing {}: {e}", dir.display()))?;
    }
    let log = SledLog::open_with_cache(dir, (cache_bytes / 16).max(4 << 20)).map_err(|e| e.to_string())?;
    let position = read_partition(js, p, until, |seq, call_id, bytes| {
        log.stage_raw(seq, call_id, bytes).map_err(|e| e.to_string())
    })
    .await?;
    log.commit().await.map_err(|e| e.to_string())?;
    Ok((log, position))
}

/// One message of a partition's log.
#[derive(Clone, Debug)]
pub struct LogMessage {
    /// Its stream sequence.
    pub seq: u64,
    /// The worker that appended it.
    pub owner: Option<String>,
    /// The input position it carries (absent on a takeover marker).
    pub input_seq: Option<u64>,
    /// Its records, concatenated (empty on a marker or a position).
    pub payload: Bytes,
}

/// Reads partition `p`'s log messages up to stream sequence `until` (0: to the end), calling
/// `each` on every record; returns the input position reached.
pub async fn read_partition(
    js: &jetstream::Context,
    p: u16,
    until: u64,
    mut each: impl FnMut(u64, &str, &[u8]) -> Result<(), String>,
) -> Result<u64, String> {
    let mut position = 0u64;
    read_log(js, p, until, |m| {
        position = position.max(m.input_seq.unwrap_or(0));
        for (rseq, call_id, bytes) in
            split_records(&m.payload).map_err(|e| format!("{} #{}: {e}", subjects::partition_log(p), m.seq))?
        {
            each(rseq, &call_id, bytes)?;
        }
        Ok(())
    })
    .await?;
    Ok(position)
}

/// Reads partition `p`'s log messages up to stream sequence `until` (0: to the end).
pub async fn read_log(
    js: &jetstream::Context,
    p: u16,
    until: u64,
    mut each: impl FnMut(LogMessage) -> Result<(), String>,
) -> Result<(), String> {
    let subject = log_subject(p);
    let stream = js.get_stream(LOG_STREAM).await.map_err(|e| format!("stream {LOG_STREAM}: {e}"))?;
    let until = if until > 0 {
        until
    } else {
        match stream.get_last_raw_message_by_subject(&subject).await {
            Ok(m) => m.sequence,
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => return Ok(()),
            Err(e) => return Err(format!("last message of {subject}: {e}")),
        }
    };
    // Direct gets, not a consumer: any replica answers them, while on nats-server 2.9 an
    // ephemeral consumer may be placed on a server that is down. A replica may lag behind
    // the leader, so "not found" before `until` means "not yet": ask again.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut next_seq = 1u64;
    let mut last_error = String::new();
    while Instant::now() < deadline {
        let got = tokio::time::timeout(
            Duration::from_secs(3),
            stream.direct_get_next_for_subject(subject.as_str(), Some(next_seq)),
        )
        .await;
        let msg = match got {
            Ok(Ok(m)) => m,
            Ok(Err(e)) if e.kind() == stream::DirectGetErrorKind::NotFound => {
                if next_seq > until {
                    return Ok(());
                }
                last_error = format!("sequence {until} not found (a lagging replica?)");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            Ok(Err(e)) => {
                last_error = e.to_string();
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(_) => {
                last_error = "no answer within 3 s".into();
                continue;
            }
        };
        if msg.sequence > until {
            return Ok(());
        }
        next_seq = msg.sequence + 1;
        let header = |name: &str| msg.headers.get(name).map(|v| v.as_str().to_owned());
        each(LogMessage {
            seq: msg.sequence,
            owner: header(HEADER_OWNER),
            input_seq: header(HEADER_INPUT_SEQ).and_then(|v| v.parse().ok()),
            payload: msg.payload.clone(),
        })?;
        if msg.sequence >= until {
            return Ok(());
        }
    }
    Err(format!("reading {subject}: {last_error}"))
}

/// Where an OpenSIPS event goes.
enum Route {
    One(u16),
    /// A UA event for a key no partition here knows yet: every partition parks it; the one
    /// that learns the key (from `ua_session_client_start`'s reply) handles it.
    All,
    None,
}

fn route(payload: &[u8], keys: &Keys, partitions: u16) -> Route {
    match Event::parse(payload) {
        Ok(Event::DlgStateChanged(d)) => Route::One(partition_of(&d.callid, partitions)),
        Ok(Event::CallHold(h)) => Route::One(partition_of(&h.callid, partitions)),
        Ok(Event::CallTransfer(t)) => Route::One(partition_of(&t.callid, partitions)),
        Ok(Event::UaSession(u)) => match keys.get(&u.key) {
            Some(p) => Route::One(p),
            None if u.event_type == UaEventType::New => Route::One(partition_of(&u.key, partitions)),
            None => Route::All,
        },
        _ => Route::None,
    }
}

/// A partition for the event reader to feed: its owner's queue and the input position its
/// log reached.
struct Register {
    partition: u16,
    tx: mpsc::Sender<Work>,
    done: u64,
}

/// An event's position in the input: its batch message's stream sequence times 2^16 plus
/// its index in the batch.
pub fn position(stream_seq: u64, index: usize) -> u64 {
    (stream_seq << 16) | (index as u64 & 0xffff)
}

/// Reads the input stream from the lowest position an owned partition needs and hands each
/// event to its partition's owner (once per partition).
async fn read_events(shared: Arc<Shared>, mut register: mpsc::Receiver<Register>, cancel: CancellationToken) {
    // Registers a partition; the batch to read from again when it needs earlier events.
    let add = |r: Register| -> u64 {
        let from = (r.done + 1) >> 16;
        if !r.tx.is_closed() {
            shared.dispatch().owned.insert(r.partition, (r.tx, r.done));
        }
        from
    };
    // The stream sequence of the next batch to read.
    let mut from: Option<u64> = None;
    'outer: loop {
        let start = match from {
            Some(s) => s,
            None => tokio::select! {
                r = register.recv() => match r { Some(r) => add(r), None => return },
                _ = cancel.cancelled() => return,
            },
        }
        .max(1);
        let stream = match shared.js.get_stream(EVENTS_STREAM).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "input stream not readable yet");
                from = Some(start);
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
        };
        let config = consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::ByStartSequence { start_sequence: start },
            ..Default::default()
        };
        let messages = match stream.create_consumer(config).await {
            Ok(c) => c.messages().await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let mut messages = match messages {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the input stream yet");
                from = Some(start);
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
        };
        tracing::debug!(from = start, "reading the input stream");
        let mut next = start;
        let mut last_position = Instant::now();
        loop {
            let msg = tokio::select! {
                m = messages.next() => m,
                r = register.recv() => match r {
                    Some(r) => {
                        let needs = add(r);
                        if needs < next {
                            from = Some(needs);
                            continue 'outer;
                        }
                        continue;
                    }
                    None => return,
                },
                _ = tokio::time::sleep(Duration::from_secs(1)) => {
                    post_positions(&shared, position(next, 0).saturating_sub(1)).await;
                    // Quiet: is the stream quiet too, or did the consumer stall (it may sit on
                    // a server that went away)?
                    let mut stream = stream.clone();
                    let behind = matches!(
                        tokio::time::timeout(Duration::from_secs(2), stream.info()).await,
                        Ok(Ok(info)) if info.state.last_sequence >= next
                    );
                    if behind {
                        tracing::warn!(next, "the input stream reader stalled: reading again from where it stopped");
                        from = Some(next);
                        continue 'outer;
                    }
                    continue;
                }
                _ = cancel.cancelled() => return,
            };
            let msg = match msg {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "input stream read failed: reading again");
                    from = Some(next);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue 'outer;
                }
                None => {
                    from = Some(next);
                    continue 'outer;
                }
            };
            let Ok(seq) = msg.info().map(|i| i.stream_sequence) else { continue };
            next = seq + 1;
            let Some(node) = callbus_schemas::input::node_of(msg.subject.as_str()) else { continue };
            let batch = match callbus_schemas::input::decode(&msg.payload) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(seq, subject = %msg.subject, error = %e, "an input batch is unreadable: skipped");
                    continue;
                }
            };
            for (index, (bridge_seq, datagram)) in batch.into_iter().enumerate() {
                let at = position(seq, index);
                let targets: Vec<mpsc::Sender<Work>> = {
                    let routed = route(datagram, &shared.keys, shared.cluster.partitions);
                    let mut dispatch = shared.dispatch();
                    let mut out = Vec::new();
                    let mut take = |entry: &mut (mpsc::Sender<Work>, u64)| {
                        if entry.1 < at {
                            entry.1 = at;
                            out.push(entry.0.clone());
                        }
                    };
                    match routed {
                        Route::One(p) => {
                            if let Some(e) = dispatch.owned.get_mut(&p) {
                                take(e);
                            }
                        }
                        Route::All => dispatch.owned.values_mut().for_each(take),
                        Route::None => {}
                    }
                    out
                };
                if targets.is_empty() {
                    continue;
                }
                let payload = msg.payload.slice_ref(datagram);
                for tx in targets {
                    let work = Work::Event {
                        node: node.to_owned(),
                        bridge_seq: Some(bridge_seq),
                        payload: payload.clone(),
                        stream_seq: Some(at),
                    };
                    let _ = tx.send(work).await;
                }
            }
            if last_position.elapsed() >= Duration::from_secs(1) {
                last_position = Instant::now();
                post_positions(&shared, position(seq + 1, 0) - 1).await;
            }
        }
    }
}

/// Tells every owned partition that the input stream was read up to `seq`.
async fn post_positions(shared: &Shared, seq: u64) {
    if seq == 0 {
        return;
    }
    let targets: Vec<mpsc::Sender<Work>> = {
        let mut dispatch = shared.dispatch();
        dispatch
            .owned
            .values_mut()
            .filter(|(_, done)| *done < seq)
            .map(|(tx, done)| {
                *done = seq;
                tx.clone()
            })
            .collect()
    };
    for tx in targets {
        let _ = tx.try_send(Work::Position { stream_seq: seq });
    }
}

/// Follows the workers' heartbeats. The watch is made anew when it stops showing this
/// worker's own heartbeat (a consumer can stall silently while JetStream moves a leader).
async fn watch_workers(shared: Arc<Shared>, cancel: CancellationToken) {
    let me = format!("w.{}", shared.cluster.worker);
    let ttl = shared.cluster.lease_ttl;
    loop {
        let mut watch = match shared.kv.watch("w.>").await {
            Ok(w) => w,
            Err(e) => {
                tracing::debug!(error = %e, "cannot watch the workers yet");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(250)) => continue,
                    _ = cancel.cancelled() => return,
                }
            }
        };
        let mut own = Instant::now();
        loop {
            let entry = tokio::select! {
                e = tokio::time::timeout(ttl, watch.next()) => e,
                _ = cancel.cancelled() => return,
            };
            match entry {
                Ok(Some(Ok(entry))) if entry.key == me => {
                    own = Instant::now();
                    *shared.self_seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(own);
                }
                Ok(Some(Ok(entry))) => {
                    let name = entry.key.trim_start_matches("w.").to_owned();
                    match entry.operation {
                        jetstream::kv::Operation::Put => {
                            shared.workers().insert(name, Instant::now());
                        }
                        _ => {
                            shared.workers().remove(&name);
                        }
                    }
                }
                Ok(Some(Err(_))) | Ok(None) => break,
                Err(_) => {}
            }
            if own.elapsed() >= ttl {
                tracing::debug!("the heartbeat watch went quiet: watching again");
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Forwards each command to the owner of its call's partition and relays the answer.
async fn route_commands(shared: Arc<Shared>, mut sub: async_nats::Subscriber, cancel: CancellationToken) {
    loop {
        let msg = tokio::select! {
            m = sub.next() => m,
            _ = cancel.cancelled() => break,
        };
        let Some(msg) = msg else { break };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move { route_command(&shared, msg).await });
    }
    let _ = sub.unsubscribe().await;
}

async fn route_command(shared: &Shared, msg: async_nats::Message) {
    let Some(reply) = msg.reply.clone() else { return };
    let verb = msg.subject.as_str().strip_prefix(subjects::CMD_PREFIX).unwrap_or_default().to_owned();
    if Verb::from_name(&verb).is_none() {
        let error =
            refusal(CommandErrorCode::Unsupported, format!("{} is not a command subject", msg.subject), &msg.payload);
        let _ = shared.client.publish(reply, error).await;
        return;
    }
    let partitions = shared.cluster.partitions;
    let body: Option<serde_json::Map<String, Value>> = serde_json::from_slice(&msg.payload).ok();
    let field = |name: &str| body.as_ref().and_then(|b| b.get(name)).and_then(Value::as_str).map(str::to_owned);
    let answer = if verb == Verb::CallList.as_str() {
        gather_list(shared, &verb, &msg.payload).await
    } else if verb == Verb::CallStart.as_str() || verb == Verb::UaStart.as_str() {
        // A new call: placed by its cmd_id, so a repeat goes where the first went.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let p = match field("cmd_id") {
            Some(id) => partition_of(&id, partitions),
            // No cmd_id, no repeat to land with: the partitions in turn.
            None => (NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % u64::from(partitions.max(1))) as u16,
        };
        ask(shared, p, &verb, &msg.payload).await
    } else if let Some(id) = field("call_id") {
        ask(shared, partition_of_call_id(&id, partitions), &verb, &msg.payload).await
    } else if let Some(p) = field("key").and_then(|k| shared.keys.get(&k)) {
        ask(shared, p, &verb, &msg.payload).await
    } else if let Some(sip) = field("sip_call_id") {
        let first = ask(shared, partition_of(&sip, partitions), &verb, &msg.payload).await;
        if is_unknown_call(&first) {
            // A click-to-dial leg's Call-ID does not hash to its call's partition: ask all.
            search(shared, &verb, &msg.payload).await.unwrap_or(first)
        } else {
            first
        }
    } else if field("key").is_some() {
        let p = partition_of(&field("key").unwrap_or_default(), partitions);
        let first = ask(shared, p, &verb, &msg.payload).await;
        if is_unknown_call(&first) {
            search(shared, &verb, &msg.payload).await.unwrap_or(first)
        } else {
            first
        }
    } else {
        // No target: any owner answers with the precise error.
        ask(shared, partition_of(&verb, partitions), &verb, &msg.payload).await
    };
    let _ = shared.client.publish(reply, answer).await;
}

fn refusal(code: CommandErrorCode, message: String, payload: &[u8]) -> Bytes {
    let cmd_id = CommandRequest::cmd_id_of(payload);
    Bytes::from(CommandReply::Refused { cmd_id, error: CommandError::new(code, message) }.to_bytes())
}

fn is_unknown_call(answer: &Bytes) -> bool {
    matches!(
        serde_json::from_slice::<CommandReply>(answer),
        Ok(CommandReply::Refused { error, .. }) if error.code == CommandErrorCode::UnknownCall
    )
}

/// Asks partition `p`'s owner, waiting through a handover (no owner yet) for a while.
async fn ask(shared: &Shared, p: u16, verb: &str, payload: &Bytes) -> Bytes {
    let subject = format!("{}{verb}", partition_cmd_prefix(p));
    let deadline = Instant::now() + COMMAND_ROUTE_WAIT;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), shared.client.request(subject.clone(), payload.clone()))
            .await
        {
            Ok(Ok(answer)) => return answer.payload,
            Ok(Err(e)) if e.kind() == async_nats::client::RequestErrorKind::NoResponders => {}
            Ok(Err(e)) => {
                return refusal(
                    CommandErrorCode::Unavailable,
                    format!("partition {p}'s owner did not answer: {e}"),
                    payload,
                )
            }
            Err(_) => {
                return refusal(
                    CommandErrorCode::Unavailable,
                    format!("partition {p}'s owner did not answer within 5 s: retry with the same cmd_id"),
                    payload,
                )
            }
        }
        if Instant::now() >= deadline {
            return refusal(
                CommandErrorCode::Unavailable,
                format!(
                    "no engine owns partition {p} now (a handover takes a few seconds): retry with the same cmd_id"
                ),
                payload,
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asks every partition with an owner; the first answer that knows the call.
async fn search(shared: &Shared, verb: &str, payload: &Bytes) -> Option<Bytes> {
    let asks = (0..shared.cluster.partitions).map(|p| {
        let subject = format!("{}{verb}", partition_cmd_prefix(p));
        let client = shared.client.clone();
        let payload = payload.clone();
        async move { tokio::time::timeout(Duration::from_secs(2), client.request(subject, payload)).await }
    });
    futures::future::join_all(asks)
        .await
        .into_iter()
        .filter_map(|r| r.ok().and_then(|r| r.ok()))
        .map(|m| m.payload)
        .find(|a| !is_unknown_call(a))
}

/// `call.list` across the cluster: every owned partition's live calls.
async fn gather_list(shared: &Shared, verb: &str, payload: &Bytes) -> Bytes {
    let asks = (0..shared.cluster.partitions).map(|p| {
        let subject = format!("{}{verb}", partition_cmd_prefix(p));
        let client = shared.client.clone();
        let payload = payload.clone();
        async move { tokio::time::timeout(Duration::from_secs(2), client.request(subject, payload)).await }
    });
    let mut calls = Vec::new();
    let mut cmd_id = None;
    let mut answered = HashSet::new();
    for (p, r) in futures::future::join_all(asks).await.into_iter().enumerate() {
        let Ok(Ok(m)) = r else { continue };
        match serde_json::from_slice::<CommandReply>(&m.payload) {
            Ok(CommandReply::Data { cmd_id: id, result }) => {
                answered.insert(p);
                cmd_id = Some(id);
                if let Some(Value::Array(list)) = result.get("calls") {
                    calls.extend(list.iter().cloned());
                }
            }
            Ok(other) => return Bytes::from(other.to_bytes()),
            Err(_) => {}
        }
    }
    let answer = CommandReply::Data {
        cmd_id: cmd_id.unwrap_or_default(),
        result: serde_json::json!({ "calls": calls, "partitions_answered": answered.len() }),
    };
    Bytes::from(answer.to_bytes())
}

/// One partition as `callbus cluster status` shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PartitionStatus {
    /// The partition.
    pub partition: u16,
    /// The worker holding its lease, if any.
    pub owner: Option<String>,
    /// Milliseconds since the lease was last renewed.
    pub lease_age_ms: Option<u64>,
    /// The last sequence of its log subject (0: never written).
    pub log_seq: u64,
    /// Input-stream events not yet consumed past its logged position (an upper bound: the
    /// events of every partition count).
    pub lag: u64,
}

/// The cluster as `callbus cluster status` shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ClusterStatus {
    /// Live workers and how many partitions each says it holds.
    pub workers: Vec<(String, u64)>,
    /// Every partition.
    pub partitions: Vec<PartitionStatus>,
    /// The input stream's last sequence.
    pub input_last_seq: u64,
}

/// Reads the workers, the leases and each partition's log position.
pub async fn status(client: &async_nats::Client, partitions: u16) -> Result<ClusterStatus, String> {
    let js = jetstream::new(client.clone());
    let kv = js
        .get_key_value(LEASES_BUCKET)
        .await
        .map_err(|e| format!("KV bucket {LEASES_BUCKET}: {e} (has a cluster engine run on this NATS?)"))?;
    let now_ns =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as i128).unwrap_or(0);
    let mut workers = Vec::new();
    let mut keys = kv.keys().await.map_err(|e| format!("listing {LEASES_BUCKET}: {e}"))?;
    while let Some(Ok(key)) = keys.next().await {
        if let Some(name) = key.strip_prefix("w.") {
            if let Ok(Some(entry)) = kv.entry(&key).await {
                let held = serde_json::from_slice::<Value>(&entry.value)
                    .ok()
                    .and_then(|v| v.get("partitions").and_then(Value::as_u64))
                    .unwrap_or(0);
                if entry.operation == jetstream::kv::Operation::Put {
                    workers.push((name.to_owned(), held));
                }
            }
        }
    }
    workers.sort();
    let log = js.get_stream(LOG_STREAM).await.map_err(|e| format!("stream {LOG_STREAM}: {e}"))?;
    let mut events = js.get_stream(EVENTS_STREAM).await.map_err(|e| format!("stream {EVENTS_STREAM}: {e}"))?;
    let input_last_seq = events.info().await.map(|i| i.state.last_sequence).unwrap_or(0);
    let mut out = Vec::new();
    for p in 0..partitions {
        let (owner, lease_age_ms) = match kv.entry(lease_key(p)).await {
            Ok(Some(e)) if e.operation == jetstream::kv::Operation::Put => {
                let owner = serde_json::from_slice::<LeaseValue>(&e.value).ok().map(|v| v.worker);
                let age = ((now_ns - e.created.unix_timestamp_nanos()).max(0) / 1_000_000) as u64;
                (owner, Some(age))
            }
            _ => (None, None),
        };
        let (log_seq, position) = match log.get_last_raw_message_by_subject(&log_subject(p)).await {
            Ok(m) => {
                let position = m.headers.get(HEADER_INPUT_SEQ).and_then(|v| v.as_str().parse().ok()).unwrap_or(0);
                (m.sequence, position)
            }
            Err(_) => (0, 0),
        };
        out.push(PartitionStatus {
            partition: p,
            owner,
            lease_age_ms,
            log_seq,
            lag: input_last_seq.saturating_sub(position >> 16),
        });
    }
    Ok(ClusterStatus { workers, partitions: out, input_last_seq })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_ids_name_their_partition() {
        for p in [0u16, 7, 63, 1000] {
            let id = call_id_in("c0123456789ab000001", p);
            assert_eq!(partition_of_call_id(&id, 1024), p, "{id}");
        }
        // A partition beyond the count, or an id of another form, is hashed.
        let id = call_id_in("c0123456789ab000001", 70);
        assert_eq!(partition_of_call_id(&id, 64), partition_of(&id, 64));
        assert_eq!(partition_of_call_id("abc", 64), partition_of("abc", 64));
        assert_eq!(partition_of_call_id("c0123456789ab000001pzz", 64), partition_of("c0123456789ab000001pzz", 64));
    }

    #[test]
    fn partition_hash_is_stable_and_spread() {
        // Pinned: a change would move every call of a running cluster.
        assert_eq!(partition_of("", 64), (0x811c_9dc5u32 % 64) as u16);
        assert_eq!(partition_of("a", 64), (0xe40c_292cu32 % 64) as u16);
        let mut counts = [0u32; 64];
        for i in 0..64_000 {
            counts[partition_of(&format!("{i}@10.0.0.1"), 64) as usize] += 1;
        }
        assert!(counts.iter().all(|c| (700..1300).contains(c)), "{counts:?}");
    }

    #[test]
    fn placement_moves_only_what_it_must() {
        let three: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let two: Vec<String> = ["a", "b"].map(String::from).to_vec();
        let mut moved = 0;
        let mut per = HashMap::new();
        for p in 0..64u16 {
            let before = placement(p, &three).map(str::to_owned);
            let after = placement(p, &two).map(str::to_owned);
            *per.entry(before.clone()).or_insert(0) += 1;
            if before != after {
                assert_eq!(before.as_deref(), Some("c"), "only c's partitions move when c leaves");
                moved += 1;
            }
        }
        assert_eq!(moved, per[&Some("c".to_owned())]);
        assert!(per.values().all(|n| (10..=32).contains(n)), "{per:?}");
        assert_eq!(placement(3, &[]), None);
    }

    #[test]
    fn records_split_back_out_of_a_message() {
        #[derive(serde::Serialize)]
        struct R<'a> {
            format: u8,
            seq: u64,
            call_id: &'a str,
            extra: Vec<u32>,
        }
        let mut payload = Vec::new();
        for (seq, id) in [(1u64, "a"), (2, "bb"), (3, "a")] {
            payload.extend(rmp_serde::to_vec_named(&R { format: 2, seq, call_id: id, extra: vec![1, 2, 3] }).unwrap());
        }
        let split = split_records(&payload).unwrap();
        assert_eq!(split.iter().map(|(s, c, _)| (*s, c.as_str())).collect::<Vec<_>>(), [(1, "a"), (2, "bb"), (3, "a")]);
        assert_eq!(split.iter().map(|(_, _, b)| b.len()).sum::<usize>(), payload.len());
        assert!(split_records(&payload[..payload.len() - 2]).is_err());
        assert!(split_records(&[0xc1]).is_err());
        assert!(split_records(&[]).unwrap().is_empty());
    }
}
