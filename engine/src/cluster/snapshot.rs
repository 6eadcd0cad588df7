//! Partition snapshots: what bounds a takeover. Each partition's owner writes its core's whole
//! state (live calls with their timers, remembered `cmd_id`s, the next record's sequence) with
//! the log position it covers to the object store [`SNAPSHOTS_BUCKET`], object `p.<partition>`,
//! at most every [`SNAPSHOT_EVERY`] when it logged anything, and when it hands the partition
//! over. A new owner loads the newest snapshot and reads only the log after it.

use tokio::io::AsyncReadExt;

use super::*;
use crate::core::Whole;

/// The object store of partition snapshots.
pub const SNAPSHOTS_BUCKET: &str = "callbus_snapshots";
/// How often an owner that logged something writes its partition's snapshot.
pub(crate) const SNAPSHOT_EVERY: Duration = Duration::from_secs(30);
/// An owner that logged this many records since its last snapshot writes one sooner.
pub(crate) const SNAPSHOT_RECORDS: u64 = 50_000;
/// The version of [`PartitionSnapshot`]'s encoding.
const SNAPSHOT_FORMAT: u8 = 1;

/// A partition's state at a point of its log.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PartitionSnapshot {
    /// Encoding version.
    pub format: u8,
    /// The partition.
    pub partition: u16,
    /// The stream sequence of the last log message it covers: a new owner reads after it.
    pub log_seq: u64,
    /// The input position consumed.
    pub position: u64,
    /// The worker that wrote it.
    pub worker: String,
    /// When, ms since the Unix epoch.
    pub time_ms: u64,
    /// The core's state.
    pub whole: Whole,
}

/// The object's name of a partition's snapshot.
pub fn object_name(partition: u16) -> String {
    format!("p.{partition}")
}

/// The snapshots' object store (its stream made by hand, as the leases' bucket: async-nats's
/// `create_object_store` sends stream fields nats-server 2.9 refuses).
pub(crate) fn stream_config(replicas: usize) -> stream::Config {
    stream::Config {
        name: format!("OBJ_{SNAPSHOTS_BUCKET}"),
        subjects: vec![format!("$O.{SNAPSHOTS_BUCKET}.C.>"), format!("$O.{SNAPSHOTS_BUCKET}.M.>")],
        storage: stream::StorageType::File,
        num_replicas: replicas,
        discard: stream::DiscardPolicy::New,
        allow_rollup: true,
        allow_direct: true,
        ..Default::default()
    }
}

/// Writes `snapshot` (replacing the partition's previous one).
pub(crate) async fn save(js: &jetstream::Context, snapshot: &PartitionSnapshot) -> Result<usize, String> {
    let bytes = rmp_serde::to_vec_named(snapshot).map_err(|e| format!("encoding the snapshot: {e}"))?;
    let store =
        js.get_object_store(SNAPSHOTS_BUCKET).await.map_err(|e| format!("object store {SNAPSHOTS_BUCKET}: {e}"))?;
    let meta = jetstream::object_store::ObjectMetadata {
        name: object_name(snapshot.partition),
        chunk_size: Some(256 * 1024),
        ..Default::default()
    };
    store
        .put(meta, &mut bytes.as_slice())
        .await
        .map_err(|e| format!("writing {} to {SNAPSHOTS_BUCKET}: {e}", object_name(snapshot.partition)))?;
    Ok(bytes.len())
}

/// The partition's newest snapshot, if one was written.
pub(crate) async fn load(js: &jetstream::Context, partition: u16) -> Result<Option<PartitionSnapshot>, String> {
    let store =
        js.get_object_store(SNAPSHOTS_BUCKET).await.map_err(|e| format!("object store {SNAPSHOTS_BUCKET}: {e}"))?;
    let name = object_name(partition);
    let mut object = match store.get(&name).await {
        Ok(o) => o,
        Err(e) if e.kind() == jetstream::object_store::GetErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("reading {name} from {SNAPSHOTS_BUCKET}: {e}")),
    };
    let mut bytes = Vec::new();
    object.read_to_end(&mut bytes).await.map_err(|e| format!("reading {name} from {SNAPSHOTS_BUCKET}: {e}"))?;
    let snapshot: PartitionSnapshot =
        rmp_serde::from_slice(&bytes).map_err(|e| format!("{name} in {SNAPSHOTS_BUCKET} is unreadable: {e}"))?;
    if snapshot.format != SNAPSHOT_FORMAT || snapshot.partition != partition {
        return Err(format!(
            "{name} in {SNAPSHOTS_BUCKET} is of format {} for partition {}: not this version's",
            snapshot.format, snapshot.partition
        ));
    }
    Ok(Some(snapshot))
}

/// A snapshot of `whole` at the store's log position.
pub(crate) fn of(partition: u16, log_seq: u64, position: u64, worker: &str, whole: Whole) -> PartitionSnapshot {
    let time_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    PartitionSnapshot {
        format: SNAPSHOT_FORMAT,
        partition,
        log_seq,
        position,
        worker: worker.to_owned(),
        time_ms,
        whole,
    }
}
