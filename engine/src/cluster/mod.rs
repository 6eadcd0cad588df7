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

mod input;
mod lease;
mod partition_log;
mod router;
pub mod snapshot;
mod status;

pub use crate::log::{split_records, RecordSlice};
use crate::log::{EventLog, LogError, SledLog};
use crate::{EngineConfig, EngineError};
pub use input::position;
use input::*;
use lease::*;
pub use partition_log::{copy_partition, read_log, read_log_from, read_partition, read_partition_from, LogMessage};
use partition_log::{rebuild, Fenced, PartitionStore};
use router::*;
pub use status::{status, ClusterStatus, PartitionStatus};

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
    /// How long partition log messages are kept (`engine.retention`; zero: for ever). At least
    /// an hour: a takeover needs the log after the newest snapshot (at most 30 s old while the
    /// owner works), and live calls and remembered `cmd_id`s are in the snapshots.
    pub log_max_age: Duration,
    /// The most bytes the partition logs keep together (`engine.retention_bytes`; zero: no
    /// limit); at least [`LOG_MIN_BYTES_PER_PARTITION`] for each partition. JetStream drops the
    /// oldest messages beyond it.
    pub log_max_bytes: u64,
}

/// The smallest [`ClusterConfig::log_max_bytes`], for each partition: a takeover needs the
/// records since the partition's newest snapshot (taken every 30 s or 50 000 records, so at
/// most 50 000 records of ~600 bytes to ~1.3 KB with bodies).
pub const LOG_MIN_BYTES_PER_PARTITION: u64 = 64 << 20;

/// The shortest [`ClusterConfig::log_max_age`] (a longer outage of the snapshots than this would
/// leave a takeover without the records after the newest one).
pub const LOG_MIN_AGE: Duration = Duration::from_secs(3600);

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            worker: default_worker_name(),
            partitions: DEFAULT_PARTITIONS,
            replicas: 1,
            lease_ttl: Duration::from_secs(2),
            events_max_age: Duration::from_secs(24 * 3600),
            log_max_age: Duration::ZERO,
            log_max_bytes: 0,
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

pub use crate::placement::{call_id_in, partition_of, partition_of_call_id, placement};

/// The log subject of a partition.
pub fn log_subject(partition: u16) -> String {
    subjects::partition_log(partition)
}

/// The subject a partition's owner takes commands on (`<verb>` appended).
pub fn partition_cmd_prefix(partition: u16) -> String {
    subjects::partition_cmd_prefix(partition)
}

use callbus_schemas::cluster::lease_key;

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
            max_age: match config.log_max_age.is_zero() {
                true => Duration::ZERO,
                false => config.log_max_age.max(LOG_MIN_AGE),
            },
            max_bytes: match config.log_max_bytes {
                0 => -1,
                limit => i64::try_from(limit.max(LOG_MIN_BYTES_PER_PARTITION * u64::from(config.partitions)))
                    .unwrap_or(i64::MAX),
            },
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
        snapshot::stream_config(config.replicas),
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
                Ok(mut existing) => {
                    // The log's and the input's age limits follow the configuration.
                    if config.name == LOG_STREAM || config.name == EVENTS_STREAM {
                        if let Ok(info) = existing.info().await {
                            if info.config.max_age != config.max_age || info.config.max_bytes != config.max_bytes {
                                let mut updated = info.config.clone();
                                updated.max_age = config.max_age;
                                updated.max_bytes = config.max_bytes;
                                match js.update_stream(updated).await {
                                    Ok(_) => {
                                        tracing::info!(stream = %config.name, max_age = ?config.max_age, max_bytes = config.max_bytes, "stream's limits changed")
                                    }
                                    Err(e) => {
                                        tracing::warn!(stream = %config.name, error = %e, "stream's limits not changed")
                                    }
                                }
                            }
                        }
                    }
                    break;
                }
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
