//! A partition's replicated log: the owner's store (appends fenced by the expected last
//! subject sequence), and reading a partition's log back (takeover, `callbus replay`).

use super::*;
use crate::core::{Staged, Whole};
use crate::placement::Placement;
use crate::store::SnapshotWork;
use crate::store::Store;
use snapshot::{SNAPSHOT_EVERY, SNAPSHOT_RECORDS};

/// A partition owner's store: its replicated log (JetStream), with the worker's local copy.
pub(crate) struct PartitionStore {
    placement: Placement,
    /// The local copy (no journal: rebuilt from the replicated log on takeover).
    log: Arc<SledLog>,
    worker: String,
    js: jetstream::Context,
    subject: String,
    /// The last sequence of this partition's subject, which the next append expects.
    expected: u64,
    /// Marks this ownership's message ids apart from any other's (the marker's sequence).
    epoch: u64,
    appends: u64,
    /// Input-stream position consumed (handled and staged).
    input_seq: u64,
    published_input: u64,
    last_publish: Instant,
    batch: Vec<u8>,
    ends: Vec<usize>,
    keys: Arc<Keys>,
    /// Records appended since the last snapshot, and when it was written.
    since_snapshot: u64,
    last_snapshot: Instant,
    /// A snapshot is being saved.
    saving: Arc<std::sync::atomic::AtomicBool>,
}

/// Where a new owner's store starts: after its takeover marker, at the input position its
/// log reached.
pub(crate) struct Fenced {
    /// The marker's sequence (the next append expects it).
    pub(crate) marker: u64,
    /// The input position the log reached.
    pub(crate) position: u64,
    /// Records read after the snapshot (all of them without one).
    pub(crate) tail: u64,
}

impl PartitionStore {
    pub(crate) fn new(shared: &Shared, partition: u16, log: Arc<SledLog>, fenced: Fenced) -> PartitionStore {
        PartitionStore {
            placement: Placement { partition, partitions: shared.cluster.partitions },
            log,
            worker: shared.cluster.worker.clone(),
            js: shared.js.clone(),
            subject: log_subject(partition),
            expected: fenced.marker,
            epoch: fenced.marker,
            appends: 0,
            input_seq: fenced.position,
            published_input: fenced.position,
            last_publish: Instant::now(),
            batch: Vec::new(),
            ends: Vec::new(),
            keys: Arc::clone(&shared.keys),
            // A new owner that read a tail writes a snapshot soon (it has "logged" the tail).
            since_snapshot: fenced.tail,
            last_snapshot: Instant::now() - SNAPSHOT_EVERY + Duration::from_secs(2),
            saving: Arc::default(),
        }
    }
}

impl Store for PartitionStore {
    fn log(&self) -> &Arc<SledLog> {
        &self.log
    }

    fn stage(&mut self, record: &Staged) -> Result<(), LogError> {
        self.log.stage_raw(record.seq, &record.call_id, &record.bytes)?;
        self.batch.extend_from_slice(&record.bytes);
        self.ends.push(self.batch.len());
        self.since_snapshot += 1;
        Ok(())
    }

    fn snapshot_due(&self, stopping: bool) -> bool {
        let logged = self.since_snapshot > 0 && self.batch.is_empty();
        let due = stopping || self.last_snapshot.elapsed() >= SNAPSHOT_EVERY || self.since_snapshot >= SNAPSHOT_RECORDS;
        logged && due && !self.saving.load(std::sync::atomic::Ordering::Acquire)
    }

    fn snapshot(&mut self, whole: Whole) -> Option<SnapshotWork> {
        let partition = self.placement.partition;
        let snap = snapshot::of(partition, self.expected, self.published_input, &self.worker, whole);
        let (js, saving, records) = (self.js.clone(), Arc::clone(&self.saving), self.since_snapshot);
        saving.store(true, std::sync::atomic::Ordering::Release);
        self.since_snapshot = 0;
        self.last_snapshot = Instant::now();
        Some(Box::pin(async move {
            let started = Instant::now();
            match snapshot::save(&js, &snap).await {
                Ok(bytes) => tracing::debug!(
                    partition,
                    calls = snap.whole.calls.len(),
                    bytes,
                    records,
                    log_seq = snap.log_seq,
                    took_ms = started.elapsed().as_millis() as u64,
                    "partition snapshot written"
                ),
                Err(e) => {
                    tracing::warn!(partition, error = %e, "partition snapshot not written: a takeover reads a longer tail until the next one")
                }
            }
            saving.store(false, std::sync::atomic::Ordering::Release);
        }))
    }

    async fn commit(&mut self) -> Result<(), LogError> {
        self.publish().await
    }

    /// Whether the staged records fill a log message (the owner then commits before it takes
    /// more input, so a batch is one message and its input position is exact).
    fn full(&self) -> bool {
        self.batch.len() >= FULL_BATCH
    }

    fn placement(&self) -> Option<Placement> {
        Some(self.placement)
    }

    fn consumed(&mut self, stream_seq: u64) {
        self.input_seq = self.input_seq.max(stream_seq);
    }

    /// Whether the input position moved with no records to carry it for a second.
    fn commit_due(&self) -> bool {
        self.input_seq > self.published_input && self.last_publish.elapsed() >= Duration::from_secs(1)
    }

    fn keys(&mut self, learned: &[String], forgotten: &[String]) {
        let partition = self.placement.partition;
        let mut keys = self.keys.lock();
        for key in learned {
            keys.insert(key.clone(), partition);
        }
        for key in forgotten {
            if keys.get(key) == Some(&partition) {
                keys.remove(key);
            }
        }
    }
}

impl PartitionStore {
    /// Appends the staged records (in messages of at most [`MAX_MESSAGE`]) and the input
    /// position; `Fenced` when another worker appended since.
    async fn publish(&mut self) -> Result<(), LogError> {
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
        let id = format!("{}.{}.{}", self.placement.partition, self.epoch, self.appends);
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
                        return Err(LogError::Fenced { partition: self.placement.partition });
                    }
                    Err(e) => e.to_string(),
                },
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(LogError::Replica { partition: self.placement.partition, reason: error });
            }
            tracing::warn!(
                partition = self.placement.partition,
                error,
                "append to the replicated log not acknowledged: retrying"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Copies partition `p`'s replicated log into a sled log in `dir` (which must not hold one),
/// for `callbus replay`; returns how many records.
pub async fn copy_partition(client: &async_nats::Client, p: u16, dir: &std::path::Path) -> Result<u64, String> {
    let js = context(client);
    let log = SledLog::open(dir).map_err(|e| e.to_string())?;
    let mut n = 0u64;
    read_partition_from(&js, p, 1, 0, |seq, call_id, bytes| {
        n += 1;
        log.stage_raw(seq, call_id, bytes).map_err(|e| e.to_string())
    })
    .await?;
    log.commit().await.map_err(|e| e.to_string())?;
    Ok(n)
}

/// A partition's local copy, rebuilt for its new owner.
pub(super) struct Rebuilt {
    pub(super) log: SledLog,
    /// The input position the log reached.
    pub(super) position: u64,
    /// Records read from the log (after the snapshot).
    pub(super) tail: u64,
    /// The snapshot's log position, if one was loaded.
    pub(super) snapshot: Option<u64>,
}

/// Rebuilds a partition's local copy up to `until` (the new owner's marker): the newest snapshot,
/// then the log after it (the whole log without one).
pub(super) async fn rebuild(
    js: &jetstream::Context,
    dir: &std::path::Path,
    p: u16,
    until: u64,
    cache_bytes: u64,
) -> Result<Rebuilt, String> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| format!("clearing {}: {e}", dir.display()))?;
    }
    let log = SledLog::open_copy(dir, (cache_bytes / 16).max(4 << 20)).map_err(|e| e.to_string())?;
    let snap = match snapshot::load(js, p).await {
        Ok(Some(s)) if s.log_seq < until => Some(s),
        Ok(Some(s)) => {
            tracing::warn!(
                partition = p,
                log_seq = s.log_seq,
                until,
                "a snapshot past the takeover marker: ignored, the whole log is read"
            );
            None
        }
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(partition = p, error = %e, "the partition's snapshot cannot be read: the whole log is read");
            None
        }
    };
    let mut position = 0;
    let from = match &snap {
        Some(s) => {
            for call in &s.whole.calls {
                log.stage_snapshot(call).map_err(|e| e.to_string())?;
            }
            for (cmd_id, kept) in &s.whole.commands {
                log.stage_command(cmd_id, kept).map_err(|e| e.to_string())?;
            }
            log.stage_checkpoint(s.whole.next_seq.saturating_sub(1)).map_err(|e| e.to_string())?;
            position = s.position;
            s.log_seq + 1
        }
        None => 1,
    };
    let mut tail = 0u64;
    let reached = read_partition_from(js, p, from, until, |seq, call_id, bytes| {
        tail += 1;
        log.stage_raw(seq, call_id, bytes).map_err(|e| e.to_string())
    })
    .await?;
    log.commit().await.map_err(|e| e.to_string())?;
    Ok(Rebuilt { log, position: position.max(reached), tail, snapshot: snap.map(|s| s.log_seq) })
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
/// `each` on every record; returns the input position reached. By direct gets, as [`read_log`].
pub async fn read_partition(
    js: &jetstream::Context,
    p: u16,
    until: u64,
    each: impl FnMut(u64, &str, &[u8]) -> Result<(), String>,
) -> Result<u64, String> {
    read_records(js, p, 1, until, false, each).await
}

/// [`read_partition`] from stream sequence `from` on, batched as [`read_log_from`].
pub async fn read_partition_from(
    js: &jetstream::Context,
    p: u16,
    from: u64,
    until: u64,
    each: impl FnMut(u64, &str, &[u8]) -> Result<(), String>,
) -> Result<u64, String> {
    read_records(js, p, from, until, true, each).await
}

async fn read_records(
    js: &jetstream::Context,
    p: u16,
    from: u64,
    until: u64,
    batched: bool,
    mut each: impl FnMut(u64, &str, &[u8]) -> Result<(), String>,
) -> Result<u64, String> {
    let mut position = 0u64;
    read_log_with(js, p, from, until, batched, |m| {
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

/// Reads partition `p`'s log messages up to stream sequence `until` (0: to the end), by direct
/// gets only (one request per message; any replica answers, so a degraded cluster is read as
/// well as a whole one: tools and tests that read often).
pub async fn read_log(
    js: &jetstream::Context,
    p: u16,
    until: u64,
    each: impl FnMut(LogMessage) -> Result<(), String>,
) -> Result<(), String> {
    read_log_with(js, p, 1, until, false, each).await
}

/// How long a read waits for its next message before it says it made no progress.
const READ_STALL: Duration = Duration::from_secs(30);
/// How long the ordered consumer may keep the next message before the read goes on by direct
/// gets instead.
const CONSUMER_STALL: Duration = Duration::from_secs(3);

/// Reads partition `p`'s log messages from stream sequence `from` up to `until` (0: to the end),
/// in order. First through an ordered consumer (batched pull requests: one round trip for many
/// messages); when it cannot be made or stops delivering (on nats-server 2.9 an ephemeral
/// consumer can be placed on a server that is down, or lose its server), the read goes on from
/// where it got to by direct gets, which any replica answers. No deadline on the whole read: it
/// goes on while messages come, says how far it got every 5 s, and fails only when none came
/// for 30 s.
pub async fn read_log_from(
    js: &jetstream::Context,
    p: u16,
    from: u64,
    until: u64,
    each: impl FnMut(LogMessage) -> Result<(), String>,
) -> Result<(), String> {
    read_log_with(js, p, from, until, true, each).await
}

async fn read_log_with(
    js: &jetstream::Context,
    p: u16,
    from: u64,
    until: u64,
    batched: bool,
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
    let mut progress = Progress { partition: p, until, next: from.max(1), read: 0, said: Instant::now() };
    if progress.next > until {
        return Ok(());
    }
    let ordered = match batched {
        true => read_ordered(&stream, &subject, &mut progress, &mut each).await,
        false => Err("direct gets asked for".to_owned()),
    };
    if let Err(why) = ordered {
        if progress.next > until {
            return Ok(());
        }
        tracing::debug!(partition = p, next = progress.next, why, "reading the partition's log by direct gets");
        read_direct(&stream, &subject, &mut progress, &mut each).await?;
    }
    Ok(())
}

/// How far a read got.
struct Progress {
    partition: u16,
    until: u64,
    /// The next sequence to read.
    next: u64,
    read: u64,
    said: Instant,
}

impl Progress {
    /// Hands a message on; true when the read is done.
    fn take(
        &mut self,
        seq: u64,
        headers: Option<&async_nats::HeaderMap>,
        payload: &Bytes,
        each: &mut impl FnMut(LogMessage) -> Result<(), String>,
    ) -> Result<bool, String> {
        if seq > self.until {
            return Ok(true);
        }
        let header = |name: &str| headers.and_then(|h| h.get(name)).map(|v| v.as_str().to_owned());
        each(LogMessage {
            seq,
            owner: header(HEADER_OWNER),
            input_seq: header(HEADER_INPUT_SEQ).and_then(|v| v.parse().ok()),
            payload: payload.clone(),
        })?;
        self.read += 1;
        self.next = seq + 1;
        if self.said.elapsed() >= Duration::from_secs(5) {
            self.said = Instant::now();
            let (partition, messages, until) = (self.partition, self.read, self.until);
            tracing::info!(partition, messages, at = seq, until, "reading the partition's log");
        }
        Ok(seq >= self.until)
    }
}

/// The ordered-consumer part of a read; `Err` (with why) when it cannot go on that way.
async fn read_ordered(
    stream: &jetstream::stream::Stream,
    subject: &str,
    progress: &mut Progress,
    each: &mut impl FnMut(LogMessage) -> Result<(), String>,
) -> Result<(), String> {
    let config = consumer::pull::OrderedConfig {
        filter_subject: subject.to_owned(),
        deliver_policy: consumer::DeliverPolicy::ByStartSequence { start_sequence: progress.next },
        ..Default::default()
    };
    let consumer = tokio::time::timeout(CONSUMER_STALL, stream.create_consumer(config))
        .await
        .map_err(|_| "no consumer within 3 s".to_owned())?
        .map_err(|e| e.to_string())?;
    let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
    loop {
        let msg = match tokio::time::timeout(CONSUMER_STALL, messages.next()).await {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => return Err(e.to_string()),
            Ok(None) => return Err("the consumer ended".into()),
            Err(_) => return Err("no message from the consumer within 3 s".into()),
        };
        let seq = msg.info().map(|i| i.stream_sequence).map_err(|e| e.to_string())?;
        if progress.take(seq, msg.headers.as_ref(), &msg.payload, each)? {
            return Ok(());
        }
    }
}

/// The direct-get part of a read: one request per message, answered by any replica. A replica
/// may lag behind the leader, so "not found" before `until` means "not yet": ask again.
async fn read_direct(
    stream: &jetstream::stream::Stream,
    subject: &str,
    progress: &mut Progress,
    each: &mut impl FnMut(LogMessage) -> Result<(), String>,
) -> Result<(), String> {
    let mut last_progress = Instant::now();
    let mut last_error = String::new();
    while last_progress.elapsed() < READ_STALL {
        let got = tokio::time::timeout(
            Duration::from_secs(3),
            stream.direct_get_next_for_subject(subject, Some(progress.next)),
        )
        .await;
        let msg = match got {
            Ok(Ok(m)) => m,
            Ok(Err(e)) if e.kind() == stream::DirectGetErrorKind::NotFound => {
                if progress.next > progress.until {
                    return Ok(());
                }
                last_error = format!("sequence {} not found (a lagging replica?)", progress.until);
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
        last_progress = Instant::now();
        if progress.take(msg.sequence, Some(&msg.headers), &msg.payload, each)? {
            return Ok(());
        }
    }
    Err(format!("reading {subject}: no progress for {READ_STALL:?} at sequence {}: {last_error}", progress.next))
}
