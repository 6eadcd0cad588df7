//! The one store contract the driver writes through, and its single-engine back end.
//!
//! Two back ends, one durability path each (docs/engine.md, Durability):
//! - [`SledStore`], the single engine: records and checkpoints go to the sled log; a commit
//!   writes the batch's write-ahead frames and waits for them to reach the device (sled itself
//!   is flushed in the background; the write-ahead file is its journal and nothing else).
//! - the cluster's partition store (in the `cluster` module): a commit is JetStream's acknowledgement
//!   of the batch's message on the partition's subject; the worker's local sled copy has no
//!   journal (it is rebuilt from JetStream when the partition is taken).

use std::future::Future;
use std::sync::Arc;

use crate::core::{Checkpoint, Staged, Whole};
use crate::log::{EventLog, LogError, SledLog};
use crate::placement::Placement;
use crate::CommitFaults;

/// Saving a snapshot, in the background.
pub(crate) type SnapshotWork = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// Where the driver's batches go and how they become durable.
pub(crate) trait Store: Send + 'static {
    /// The local log: history queries, recovery, retention read it.
    fn log(&self) -> &Arc<SledLog>;

    /// Adds a record (durable with the next [`Store::commit`]).
    fn stage(&mut self, record: &Staged) -> Result<(), LogError>;

    /// Adds a checkpoint (durable with the next [`Store::commit`]).
    fn stage_checkpoint(&mut self, checkpoint: &Checkpoint) -> Result<(), LogError> {
        let log = self.log();
        for (cmd_id, kept) in &checkpoint.commands {
            log.stage_command(cmd_id, kept)?;
        }
        for cmd_id in &checkpoint.forgotten {
            log.remove_command(cmd_id)?;
        }
        for snapshot in &checkpoint.snapshots {
            log.stage_snapshot(snapshot)?;
        }
        for call_id in &checkpoint.removed {
            log.remove_snapshot(call_id)?;
        }
        log.stage_checkpoint(checkpoint.upto)
    }

    /// Makes everything staged durable.
    fn commit(&mut self) -> impl Future<Output = Result<(), LogError>> + Send;

    /// Whether the staged batch is as large as one commit takes: the driver commits before it
    /// takes more input.
    fn full(&self) -> bool {
        false
    }

    /// The partition this store logs, in a cluster.
    fn placement(&self) -> Option<Placement> {
        None
    }

    /// Cluster: every input-stream event up to `stream_seq` for this partition is handled.
    fn consumed(&mut self, _stream_seq: u64) {}

    /// Whether something unstaged (the input position) waits for a commit.
    fn commit_due(&self) -> bool {
        false
    }

    /// UA session keys this owner now has, and those it let go (the cluster routes their events).
    fn keys(&mut self, _learned: &[String], _forgotten: &[String]) {}

    /// Whether the store wants the core's whole state now (a cluster partition's snapshot);
    /// `stopping`: the owner is about to let the partition go.
    fn snapshot_due(&self, _stopping: bool) -> bool {
        false
    }

    /// The work that saves the core's whole state (the driver runs it in its task set, or
    /// awaits it when stopping).
    fn snapshot(&mut self, _whole: Whole) -> Option<SnapshotWork> {
        None
    }

    /// Whether this store keeps the data dir's disk reserve and removes old calls
    /// (`engine.retention`): the single engine's.
    fn local_upkeep(&self) -> bool {
        false
    }
}

/// The single engine's store: the sled log in the data dir.
pub(crate) struct SledStore {
    log: Arc<SledLog>,
    faults: CommitFaults,
}

impl SledStore {
    /// The store over `log`; `faults` fails commits on purpose (tests).
    pub(crate) fn new(log: Arc<SledLog>, faults: CommitFaults) -> SledStore {
        SledStore { log, faults }
    }
}

impl Store for SledStore {
    fn log(&self) -> &Arc<SledLog> {
        &self.log
    }

    fn stage(&mut self, record: &Staged) -> Result<(), LogError> {
        self.log.stage_raw(record.seq, &record.call_id, &record.bytes)
    }

    async fn commit(&mut self) -> Result<(), LogError> {
        if self.faults.take_one() {
            self.log.fail_next_commits(1);
        }
        self.log.commit().await
    }

    fn local_upkeep(&self) -> bool {
        true
    }
}
