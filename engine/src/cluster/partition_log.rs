//! A partition's replicated log: the owner's store (appends fenced by the expected last
//! subject sequence), and reading a partition's log back (takeover, `callbus replay`).

use super::*;
use crate::core::Staged;
use crate::placement::Placement;
use crate::store::Store;

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
}

/// Where a new owner's store starts: after its takeover marker, at the input position its
/// log reached.
pub(crate) struct Fenced {
    /// The marker's sequence (the next append expects it).
    pub(crate) marker: u64,
    /// The input position the log reached.
    pub(crate) position: u64,
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
        Ok(())
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
pub(super) async fn rebuild(
    js: &jetstream::Context,
    dir: &std::path::Path,
    p: u16,
    until: u64,
    cache_bytes: u64,
) -> Result<(SledLog, u64), String> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| format!("clearing {}: {e}", dir.display()))?;
    }
    let log = SledLog::open_copy(dir, (cache_bytes / 16).max(4 << 20)).map_err(|e| e.to_string())?;
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
