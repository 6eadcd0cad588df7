//! The append-only event log: every input that can change a call, with what the call's
//! machine made of it, in one global sequence.
//!
//! [`EventLog`] is the store's contract (the sled log here; a JetStream log for the cluster).
//! Writing is two steps: [`EventLog::stage`] records and snapshots (cheap, not durable), then
//! [`EventLog::commit`] makes everything staged so far durable. The engine acknowledges an
//! input (command reply, MI request, notification) only after the commit that covers it: group
//! commit, one flush for a whole batch of inputs.
//!
//! Snapshots are checkpoints, not part of every write: each record carries the call's state
//! after it, so the engine writes the snapshots of the calls it touched at most once a second
//! with [`EventLog::stage_checkpoint`], and a restart reads the snapshots and then only the
//! records after the checkpoint.

pub mod archive;
mod codec;
pub mod disk;
mod sled_log;
mod wal;

use std::future::Future;

use serde::{Deserialize, Serialize};

use crate::machines::{CallState, Effect, Input};

pub use sled_log::{Pruned, RawRecord, SledLog, DEFAULT_CACHE_BYTES};

/// The version of [`Record`]'s encoding; bumped when it changes incompatibly (2: enums
/// externally tagged, which MessagePack decodes without buffering).
pub const RECORD_FORMAT: u8 = 2;

/// One input and its outcome.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Encoding version ([`RECORD_FORMAT`]).
    pub format: u8,
    /// Global sequence number (1, 2, 3...).
    pub seq: u64,
    /// When the input was processed, milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// callbus's call id.
    pub call_id: String,
    /// The call's partition (0 in single-node mode).
    pub partition: u16,
    /// The input.
    pub input: Input,
    /// The name of the call's state before (None for its first record). The full state before
    /// is the `after` of the call's previous record: it is not stored twice. (A state's name is
    /// one of the machines' own: borrowed when the engine writes a record, owned when read.)
    pub before: Option<std::borrow::Cow<'static, str>>,
    /// The call's state after.
    pub after: CallState,
    /// What the machine asked for.
    pub effects: Vec<Effect>,
}

/// The latest state of a live call, so a restart does not re-read its history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The sequence of the last record applied.
    pub seq: u64,
    /// callbus's call id.
    pub call_id: String,
    /// The state.
    pub state: CallState,
    /// Its timers still to fire: name and when (wall clock, ms since the Unix epoch).
    #[serde(default)]
    pub timers: Vec<(String, u64)>,
}

/// A command the engine accepted, kept so that the same `cmd_id` sent again (a client's retry,
/// also after a restart) is answered with the first answer and not acted on twice.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RememberedCommand {
    /// The sequence of the command's record.
    pub seq: u64,
    /// When it was accepted, ms since the Unix epoch.
    pub time_ms: u64,
    /// The call it was accepted for (the first answer's `call_id`).
    pub call_id: String,
}

/// What can go wrong with the log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The store failed (disk full, I/O error...).
    #[error("the event log at {path} failed: {reason}; check the disk and the data dir")]
    Store {
        /// The data dir.
        path: String,
        /// The store's error.
        reason: String,
    },
    /// Free space under the reserve: nothing is written until there is room again.
    #[error("{0}")]
    DiskLow(disk::DiskLow),
    /// Another process has the data dir open (sled locks it while open).
    #[error("the data dir {path} is in use by another process (another `callbus up` or `callbus engine`?): stop it, or give this one another --data-dir")]
    InUse {
        /// The data dir.
        path: String,
    },
    /// A record could not be decoded.
    #[error("log record {seq} is corrupt: {reason}")]
    Corrupt {
        /// Its sequence number.
        seq: u64,
        /// The decoder's error.
        reason: String,
    },
    /// Another worker owns the partition now: its log refused this worker's append
    /// (`Nats-Expected-Last-Subject-Sequence` did not match).
    #[error("partition {partition} belongs to another worker now: its log refused this append")]
    Fenced {
        /// The partition.
        partition: u16,
    },
    /// The replicated log (JetStream) did not take a batch.
    #[error("the replicated log did not take partition {partition}'s batch: {reason}; check the NATS cluster")]
    Replica {
        /// The partition.
        partition: u16,
        /// What JetStream said.
        reason: String,
    },
    /// A record could not be encoded.
    #[error("log record {seq} could not be encoded: {reason}")]
    Encode {
        /// Its sequence number.
        seq: u64,
        /// The encoder's error.
        reason: String,
    },
}

/// A record's stored bytes: MessagePack with field names.
pub fn encode(record: &Record) -> Result<Vec<u8>, LogError> {
    // Room for a typical record at once (a proxied call's are ~600 bytes), not grown from empty;
    // under glibc's large-block size (1 KiB), whose allocation first merges every small free
    // block (`malloc_consolidate`).
    let mut out = Vec::with_capacity(768);
    rmp_serde::encode::write_named(&mut out, record)
        .map_err(|e| LogError::Encode { seq: record.seq, reason: e.to_string() })?;
    Ok(out)
}

/// One record of a log message: its sequence, its call, its bytes.
pub type RecordSlice<'a> = (u64, String, &'a [u8]);

/// The records of concatenated MessagePack record bytes (a log message, an archive frame).
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

/// An append-only store of records and snapshots.
pub trait EventLog: Send + Sync + 'static {
    /// The sequence number the next record gets.
    fn next_seq(&self) -> u64;
    /// Adds a record (not durable until [`EventLog::commit`]).
    fn stage(&self, record: &Record) -> Result<(), LogError>;
    /// Replaces a live call's snapshot (not durable until [`EventLog::commit`]).
    fn stage_snapshot(&self, snapshot: &Snapshot) -> Result<(), LogError>;
    /// Removes an ended call's snapshot.
    fn remove_snapshot(&self, call_id: &str) -> Result<(), LogError>;
    /// Records that every record up to `seq` is reflected in the snapshots (staged with them,
    /// durable with the next commit).
    fn stage_checkpoint(&self, seq: u64) -> Result<(), LogError>;
    /// The last checkpoint (0 when none): recovery reads snapshots, then the records after it.
    fn checkpoint(&self) -> Result<u64, LogError>;
    /// Records the machines' timeouts (part of every step's context), durable with the next commit.
    fn stage_timeouts(&self, timeouts: &crate::machines::Timeouts) -> Result<(), LogError>;
    /// The timeouts the engine last ran with, if recorded.
    fn timeouts(&self) -> Result<Option<crate::machines::Timeouts>, LogError>;
    /// Keeps an accepted command's `cmd_id` (durable with the next commit).
    fn stage_command(&self, cmd_id: &str, command: &RememberedCommand) -> Result<(), LogError>;
    /// Forgets a kept `cmd_id` (durable with the next commit).
    fn remove_command(&self, cmd_id: &str) -> Result<(), LogError>;
    /// Every kept `cmd_id`, in no particular order.
    fn commands(&self) -> Result<Vec<(String, RememberedCommand)>, LogError>;
    /// Makes everything staged so far durable.
    fn commit(&self) -> impl Future<Output = Result<(), LogError>> + Send;
    /// Every snapshot.
    fn snapshots(&self) -> Result<Vec<Snapshot>, LogError>;
    /// Records with sequence ≥ `from`, in order; a corrupt record is returned as its error
    /// and reading goes on.
    fn records_from(&self, from: u64) -> Box<dyn Iterator<Item = Result<Record, LogError>> + '_>;
    /// The records of one call, in order.
    fn records_of_call(&self, call_id: &str) -> Result<Vec<Record>, LogError>;
}
