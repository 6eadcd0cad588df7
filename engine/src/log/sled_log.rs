//! The embedded log on sled 0.34.
//!
//! Trees: `records` (key: sequence, 8 bytes big-endian → MessagePack [`Record`]), `by_call`
//! (key: call id, 0x00, first sequence → the call's sequences since the previous chunk, 8 bytes
//! big-endian each), `snapshots` (call id → MessagePack [`Snapshot`]), `meta` (`checkpoint` →
//! the sequence the snapshots and the index reflect).
//!
//! One sled insert per input: sled copies a leaf node on every insert, so a second insert per
//! record (an index entry) cost a quarter of the engine's time. The per-call index is kept in
//! memory between checkpoints and written as one chunk per call at each checkpoint; on open,
//! the records after the last checkpoint are indexed again from the records themselves.
//! Big-endian keys keep sled's order equal to sequence order.
//!
//! Durability: a commit writes the frames of everything staged since the last one to the
//! write-ahead file ([`super::wal`]) and waits for them to reach the device, on the committing
//! task's own thread; sled itself is flushed in the background (its flusher every 500 ms, and
//! once per write-ahead file rotation) and on a clean close. On open, the files a crash left
//! are applied to sled again. The engine commits a whole batch at once and awaits nothing else
//! meanwhile, so blocking its worker for the write costs the engine nothing, and the runtime's
//! other worker keeps the bridge and NATS going. `bench-replay` times a commit of one record:
//! p50 ~0.06 ms, p99 ~0.2 ms, where a sled `flush()` per commit took 0.145 / 0.336 ms (it
//! hands the write to sled's I/O thread pool and waits on a condition variable). That brought
//! `bench-ua`'s callee answered → caller completion p99 under 1 ms in every run
//! (docs/engine.md).
//!
//! What a commit survives: the write-ahead range is synced with `sync_file_range`, as sled
//! 0.34's own flush does on Linux: the records reach the device, so a crash of the process (or
//! of the engine inside it) loses nothing acknowledged, but neither the file's metadata (its
//! size, its name when it is new) nor the device's volatile write cache is flushed, so a power
//! cut or a kernel crash can lose the last records. With `sync_data` each commit
//! `fdatasync`s the write-ahead file instead (and a new file's directory, and sled's file
//! before an older write-ahead file is deleted), which covers both.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::codec::{dictionary_key, Codec, DICTIONARY_PREFIX};
use super::wal::{SyncDb, Wal};
use super::{EventLog, LogError, Record, RememberedCommand, Snapshot};

const CHECKPOINT_KEY: &[u8] = b"checkpoint";
const TIMEOUTS_KEY: &[u8] = b"timeouts";
/// The records' stored bytes (8 bytes BE) and the next sequence then (8 bytes BE): the bytes of
/// the records after it are added at open.
const STORED_BYTES_KEY: &[u8] = b"stored_bytes";
/// Kept `cmd_id`s live in `meta` under this prefix (a NUL never starts another meta key).
const COMMAND_PREFIX: &[u8] = b"\0cmd\0";

fn command_key(cmd_id: &str) -> Vec<u8> {
    [COMMAND_PREFIX, cmd_id.as_bytes()].concat()
}

/// sled's page cache unless configured: enough for the live calls' snapshots and recent
/// records; sled's own default (1 GiB) is too much beside OpenSIPS on a small box.
pub const DEFAULT_CACHE_BYTES: u64 = 64 << 20;

/// The sled-backed [`EventLog`].
pub struct SledLog {
    path: PathBuf,
    db: sled::Db,
    records: sled::Tree,
    by_call: sled::Tree,
    snapshots: sled::Tree,
    meta: sled::Tree,
    /// Per call, the sequences staged since the last checkpoint (not yet in `by_call`).
    unindexed: std::sync::Mutex<Unindexed>,
    next_seq: AtomicU64,
    /// `next_seq` after the last commit that succeeded.
    committed_next_seq: AtomicU64,
    /// What makes commits durable (sled is flushed in the background).
    wal: Wal,
    /// `fdatasync` of sled's file with `sync_data`, else nothing.
    sync_db: SyncDb,
    /// How records are compressed ([`super::codec`]).
    codec: Codec,
    /// The records' keys and values, in bytes, as stored (what `engine.retention_bytes` bounds).
    stored_bytes: AtomicU64,
    /// `stored_bytes` after the last commit that succeeded.
    committed_stored_bytes: AtomicU64,
}

/// Per call, the sequences staged since the last checkpoint.
type Unindexed = std::collections::HashMap<String, Vec<u64>, foldhash::fast::RandomState>;

/// What a record takes in the `records` tree: its key and its stored value.
fn stored_len(value: &[u8]) -> u64 {
    8 + value.len() as u64
}

/// The byte a tree has in the write-ahead frames (the order of [`super::wal::TREES`]).
const RECORDS: u8 = 0;
const BY_CALL: u8 = 1;
const SNAPSHOTS: u8 = 2;
const META: u8 = 3;

fn call_key(call_id: &str, seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(call_id.len() + 9);
    key.extend_from_slice(call_id.as_bytes());
    key.push(0);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

impl SledLog {
    /// Opens (or creates) the log in `dir` with sled's page cache bounded to [`DEFAULT_CACHE_BYTES`].
    pub fn open(dir: &Path) -> Result<SledLog, LogError> {
        SledLog::open_with_cache(dir, DEFAULT_CACHE_BYTES)
    }

    /// Whether another open log holds `dir` (sled keeps an exclusive lock on `<dir>/db` while it
    /// is open, in this process or another). A dir without a log is not in use.
    pub fn in_use(dir: &Path) -> bool {
        match std::fs::File::open(dir.join("db")) {
            // The probe's own lock goes with the file when it is dropped.
            Ok(file) => matches!(file.try_lock(), Err(std::fs::TryLockError::WouldBlock)),
            Err(_) => false,
        }
    }

    /// Opens (or creates) the log in `dir` with a page cache of `cache_bytes`.
    pub fn open_with_cache(dir: &Path, cache_bytes: u64) -> Result<SledLog, LogError> {
        SledLog::open_with(dir, cache_bytes, false)
    }

    /// Opens (or creates) the log in `dir` with a page cache of `cache_bytes`; with
    /// `sync_data`, every commit also `fdatasync`s sled's file (see [`SledLog`]'s durability
    /// note).
    pub fn open_with(dir: &Path, cache_bytes: u64, sync_data: bool) -> Result<SledLog, LogError> {
        SledLog::open_journaled(dir, cache_bytes, sync_data, true)
    }

    /// Opens (or creates) a copy of a log whose durability is elsewhere (a cluster partition's
    /// JetStream log, from which it is rebuilt): no write-ahead file; staged changes go to sled
    /// alone, which flushes them in the background, and a commit writes nothing.
    pub fn open_copy(dir: &Path, cache_bytes: u64) -> Result<SledLog, LogError> {
        SledLog::open_journaled(dir, cache_bytes, false, false)
    }

    fn open_journaled(dir: &Path, cache_bytes: u64, sync_data: bool, journal: bool) -> Result<SledLog, LogError> {
        if SledLog::in_use(dir) {
            return Err(LogError::InUse { path: dir.display().to_string() });
        }
        let store = |e: sled::Error| LogError::Store { path: dir.display().to_string(), reason: sled_words(&e) };
        let db = sled::Config::new().path(dir).cache_capacity(cache_bytes).open().map_err(|e| match e {
            // Taken between the probe above and sled's own lock.
            sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock => {
                LogError::InUse { path: dir.display().to_string() }
            }
            other => store(other),
        })?;
        let sync_db: SyncDb = if sync_data {
            // sled 0.34 keeps its log in `<dir>/db`; an fdatasync on any descriptor of the file
            // covers every write to it.
            let file = dir.join("db");
            let file = std::fs::File::open(&file).map_err(|e| LogError::Store {
                path: dir.display().to_string(),
                reason: format!("cannot open {} to fdatasync it: {e}", file.display()),
            })?;
            std::sync::Arc::new(move || file.sync_data())
        } else {
            std::sync::Arc::new(|| Ok(()))
        };
        let records = db.open_tree(super::wal::TREES[RECORDS as usize]).map_err(store)?;
        let by_call = db.open_tree(super::wal::TREES[BY_CALL as usize]).map_err(store)?;
        let snapshots = db.open_tree(super::wal::TREES[SNAPSHOTS as usize]).map_err(store)?;
        let meta = db.open_tree(super::wal::TREES[META as usize]).map_err(store)?;
        let trees = [records.clone(), by_call.clone(), snapshots.clone(), meta.clone()];
        let (mut wal, recovered) =
            Wal::recover(&dir.join("wal"), &db, &trees, sync_data, std::sync::Arc::clone(&sync_db))
                .map_err(|reason| LogError::Store { path: dir.display().to_string(), reason })?;
        wal.journal = journal;
        if recovered.changes > 0 {
            tracing::info!(
                path = %dir.display(),
                files = recovered.files,
                changes = recovered.changes,
                "changes committed before the last stop applied again from the write-ahead files"
            );
        }
        let last = records.last().map_err(store)?.and_then(|(k, _)| k.as_ref().try_into().ok()).map(u64::from_be_bytes);
        let mut dictionaries = Vec::new();
        for item in meta.scan_prefix(DICTIONARY_PREFIX) {
            let (k, v) = item.map_err(store)?;
            if let Ok(id) = k[DICTIONARY_PREFIX.len()..].try_into().map(u32::from_be_bytes) {
                dictionaries.push((id, v.to_vec()));
            }
        }
        let log = SledLog {
            path: dir.to_owned(),
            db,
            records,
            by_call,
            snapshots,
            meta,
            unindexed: Default::default(),
            next_seq: AtomicU64::new(last.map_or(1, |s| s + 1)),
            committed_next_seq: AtomicU64::new(last.map_or(1, |s| s + 1)),
            wal,
            sync_db,
            codec: Codec::new(dictionaries),
            stored_bytes: AtomicU64::new(0),
            committed_stored_bytes: AtomicU64::new(0),
        };
        log.index_tail()?;
        log.count_stored_bytes()?;
        Ok(log)
    }

    /// Indexes (in memory) the records after the last checkpoint, which `by_call` lacks.
    fn index_tail(&self) -> Result<(), LogError> {
        let from = self.checkpoint()? + 1;
        let mut unindexed = self.unindexed();
        for item in self.records.range(from.to_be_bytes()..) {
            let (k, v) = item.map_err(|e| self.store_error(e))?;
            #[derive(serde::Deserialize)]
            struct Head {
                seq: u64,
                call_id: String,
            }
            let seq = k.as_ref().try_into().map_or(0, u64::from_be_bytes);
            match self.plain(seq, &v).and_then(|v| decode::<Head>(seq, &v)) {
                Ok(head) => unindexed.entry(head.call_id).or_default().push(head.seq),
                Err(e) => {
                    tracing::error!(path = %self.path.display(), error = %e, "a log record after the last checkpoint is unreadable; its call's history will miss it")
                }
            }
        }
        Ok(())
    }

    /// Counts the records' stored bytes: the count last staged with the log, plus the records
    /// written after it (a log without a count is read whole, once).
    fn count_stored_bytes(&self) -> Result<(), LogError> {
        let (mut bytes, from) = match self.meta.get(STORED_BYTES_KEY).map_err(|e| self.store_error(e))? {
            Some(v) if v.len() == 16 => {
                let (b, s) = v.split_at(8);
                (b.try_into().map_or(0, u64::from_be_bytes), s.try_into().map_or(1, u64::from_be_bytes))
            }
            _ => (0, 1),
        };
        for item in self.records.range(from.to_be_bytes()..) {
            let (_, v) = item.map_err(|e| self.store_error(e))?;
            bytes += stored_len(&v);
        }
        self.stored_bytes.store(bytes, Ordering::Relaxed);
        self.committed_stored_bytes.store(bytes, Ordering::Relaxed);
        Ok(())
    }

    /// Stages the count of stored bytes with the next sequence, durable with the next commit.
    fn stage_stored_bytes(&self) -> Result<(), LogError> {
        let mut value = self.stored_bytes.load(Ordering::Relaxed).to_be_bytes().to_vec();
        value.extend_from_slice(&self.next_seq.load(Ordering::Relaxed).to_be_bytes());
        self.wal.stage(META, STORED_BYTES_KEY, Some(&value), || {
            self.meta.insert(STORED_BYTES_KEY, value.as_slice()).map_err(|e| self.store_error(e))
        })
    }

    /// The bytes the log's records take as stored (keys and values; compressed when the log
    /// has its dictionary). sled's file is a multiple of it: it keeps old versions of its
    /// pages until it reuses their space (docs/operations.md, capacity).
    pub fn stored_bytes(&self) -> u64 {
        self.stored_bytes.load(Ordering::Relaxed)
    }

    fn unindexed(&self) -> std::sync::MutexGuard<'_, Unindexed> {
        self.unindexed.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn store_error(&self, e: sled::Error) -> LogError {
        LogError::Store { path: self.path.display().to_string(), reason: sled_words(&e) }
    }

    /// Flushes sled's own file and waits for it: what a commit would wait for without the
    /// write-ahead file (`bench-replay` compares the two).
    pub fn flush_sled(&self) -> Result<(), LogError> {
        self.db.flush().map(drop).map_err(|e| self.store_error(e))
    }

    /// Bytes the data dir takes on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0) + self.wal.size_on_disk()
    }
}

/// sled's error in words (its own text of an I/O error is Rust's debug form).
pub(crate) fn sled_words(e: &sled::Error) -> String {
    match e {
        sled::Error::Io(io) => format!("I/O error: {io}"),
        sled::Error::Corruption { .. } => {
            "sled's files are corrupt (restore the data dir from a backup, or move it away to start an empty log)"
                .into()
        }
        other => other.to_string(),
    }
}

fn decode<T: serde::de::DeserializeOwned>(seq: u64, bytes: &[u8]) -> Result<T, LogError> {
    rmp_serde::from_slice(bytes).map_err(|e| LogError::Corrupt { seq, reason: e.to_string() })
}

/// A record's MessagePack bytes (as stored when stored plain; decompressed otherwise).
pub type RawRecord = sled::IVec;

impl SledLog {
    /// Records with sequence ≥ `from` as MessagePack, undecoded: for exports that pass them
    /// through or transcode them.
    pub fn raw_records_from(&self, from: u64) -> impl Iterator<Item = Result<(u64, RawRecord), LogError>> + '_ {
        self.records.range(from.to_be_bytes()..).map(move |item| {
            let (k, v) = item.map_err(|e| self.store_error(e))?;
            let seq = k.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0);
            Ok((seq, self.plain_ivec(seq, v)?))
        })
    }

    /// A stored record's MessagePack.
    fn plain<'a>(&self, seq: u64, stored: &'a [u8]) -> Result<std::borrow::Cow<'a, [u8]>, LogError> {
        self.codec.plain(stored).map_err(|reason| LogError::Corrupt { seq, reason })
    }

    fn plain_ivec(&self, seq: u64, stored: sled::IVec) -> Result<RawRecord, LogError> {
        match self.plain(seq, &stored)? {
            std::borrow::Cow::Borrowed(_) => Ok(stored),
            std::borrow::Cow::Owned(plain) => Ok(plain.into()),
        }
    }

    /// The id of the dictionary new records are compressed with (None: stored plain, the
    /// dictionary not trained yet).
    pub fn dictionary(&self) -> Option<u32> {
        self.codec.active()
    }

    /// Stores the records staged from now on plain, as they are encoded (benchmarks: the peer
    /// that shows what compression saves).
    #[doc(hidden)]
    pub fn keep_records_plain(&self) {
        self.codec.disable();
    }

    /// Waits for the dictionary's training, if under way, and stages it (tests and benchmarks:
    /// the engine takes it when it is ready).
    #[doc(hidden)]
    pub fn settle_dictionary(&self) -> Result<(), LogError> {
        self.take_dictionary(true)
    }

    /// Stages a dictionary trained since the last record, and compresses with it from now on.
    fn take_dictionary(&self, wait: bool) -> Result<(), LogError> {
        if let Some((id, dictionary)) = self.codec.trained(wait) {
            self.stage_dictionary(id, &dictionary)?;
            self.codec.install(id, &dictionary);
            tracing::info!(path = %self.path.display(), id, bytes = dictionary.len(), "the log compresses its records with a dictionary trained on its first ones");
        }
        Ok(())
    }

    fn stage_dictionary(&self, id: u32, dictionary: &[u8]) -> Result<(), LogError> {
        let key = dictionary_key(id);
        self.wal.stage(META, &key, Some(dictionary), || {
            self.meta.insert(key.as_slice(), dictionary).map_err(|e| self.store_error(e))
        })
    }
}

/// What one [`SledLog::prune`] step did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Records looked at (the oldest first).
    pub scanned: usize,
    /// Records removed.
    pub records: usize,
    /// Calls whose whole history was removed.
    pub calls: usize,
    /// Where the next step starts: the first sequence not looked at (None: the scan reached
    /// records too young to go, or the end).
    pub next: Option<u64>,
    /// Compressed bytes written to the archive (`engine.archive_dir`).
    pub archived_bytes: u64,
    /// Every record from `from` up to this sequence is gone once the step is committed: the
    /// first sequence it looked at and kept, or where it stopped. A later pass may start here
    /// and not walk again over what was removed.
    pub floor: u64,
}

impl SledLog {
    /// One step of retention: looks at up to `budget` records from sequence `from` on (the
    /// oldest first) and stages the removal of every call whose whole history is older than
    /// `cutoff_ms`, is covered by the last checkpoint, and is not kept by `keep` (live calls); its
    /// per-call index goes with it. A call is removed whole or not at all, so what stays
    /// replays as it did. Durable with the next commit.
    pub fn prune(
        &self,
        from: u64,
        cutoff_ms: u64,
        keep: impl Fn(&str) -> bool,
        budget: usize,
        archive: Option<&super::archive::Archive>,
    ) -> Result<Pruned, LogError> {
        self.prune_with(from, cutoff_ms, None, keep, budget, archive)
    }

    /// One step of retention by size: as [`SledLog::prune`] with no age limit, the oldest
    /// calls first, until the removed records' stored bytes reach `free` (see
    /// [`SledLog::stored_bytes`]).
    pub fn prune_to_free(
        &self,
        from: u64,
        free: u64,
        keep: impl Fn(&str) -> bool,
        budget: usize,
        archive: Option<&super::archive::Archive>,
    ) -> Result<Pruned, LogError> {
        self.prune_with(from, u64::MAX, Some(free), keep, budget, archive)
    }

    fn prune_with(
        &self,
        from: u64,
        cutoff_ms: u64,
        free: Option<u64>,
        keep: impl Fn(&str) -> bool,
        budget: usize,
        archive: Option<&super::archive::Archive>,
    ) -> Result<Pruned, LogError> {
        #[derive(serde::Deserialize)]
        struct Head {
            seq: u64,
            time_ms: u64,
            call_id: String,
        }
        let checkpoint = self.checkpoint()?;
        let mut out = Pruned::default();
        let mut decided: std::collections::HashMap<String, bool> = Default::default();
        // The calls to remove, with their sequences: decided first, archived, then removed.
        let mut going: Vec<(String, Vec<u64>)> = Vec::new();
        let mut freeing = 0u64;
        // The first sequence kept, and the one after the last looked at.
        let (mut kept, mut after) = (None::<u64>, from);
        for item in self.records.range(from.to_be_bytes()..) {
            if out.scanned >= budget || free.is_some_and(|free| freeing >= free) {
                break;
            }
            let (k, v) = item.map_err(|e| self.store_error(e))?;
            let seq = k.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(after);
            let Ok(head) =
                self.codec.plain(&v).map_err(drop).and_then(|v| rmp_serde::from_slice::<Head>(&v).map_err(drop))
            else {
                out.scanned += 1;
                // An unreadable record is kept for `replay check` to report.
                kept.get_or_insert(seq);
                after = seq + 1;
                continue;
            };
            if head.time_ms >= cutoff_ms || head.seq > checkpoint {
                kept.get_or_insert(head.seq);
                out.next = None;
                break;
            }
            out.scanned += 1;
            out.next = Some(head.seq + 1);
            after = head.seq + 1;
            let goes = match decided.get(&head.call_id) {
                _ if keep(&head.call_id) => false,
                Some(goes) => *goes,
                None => {
                    // A call goes whole: every record of it (later ones too) and its index, at once.
                    let seqs = self.seqs_of_call(&head.call_id)?;
                    let prunable = self.call_is_older_than(&seqs, cutoff_ms, checkpoint)?;
                    decided.insert(head.call_id.clone(), prunable);
                    if prunable {
                        if free.is_some() {
                            for seq in &seqs {
                                let value = self.records.get(seq.to_be_bytes()).map_err(|e| self.store_error(e))?;
                                freeing += value.map_or(0, |v| stored_len(&v));
                            }
                        }
                        going.push((head.call_id, seqs));
                    }
                    prunable
                }
            };
            if !goes {
                kept.get_or_insert(head.seq);
            }
        }
        out.floor = kept.unwrap_or(after);
        let freed_enough = free.is_some_and(|free| freeing >= free);
        if out.scanned < budget && out.next.is_some() && !freed_enough {
            out.next = None;
        }
        if let Some(archive) = archive.filter(|_| !going.is_empty()) {
            let mut calls = Vec::with_capacity(going.len());
            for (_, seqs) in &going {
                let mut records = Vec::with_capacity(seqs.len());
                let mut last_ms = 0;
                for seq in seqs {
                    if let Some(bytes) = self.raw_record(*seq)? {
                        last_ms = rmp_serde::from_slice::<Head>(&bytes).map_or(last_ms, |h| h.time_ms);
                        records.push(bytes.to_vec());
                    }
                }
                calls.push((last_ms, records));
            }
            out.archived_bytes = archive.append(&calls)?;
        }
        for (call_id, seqs) in going {
            for seq in seqs {
                let key = seq.to_be_bytes();
                self.wal.stage(RECORDS, &key, None, || {
                    let removed = self.records.remove(key).map_err(|e| self.store_error(e))?;
                    if let Some(v) = &removed {
                        let _ = self.stored_bytes.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                            Some(b.saturating_sub(stored_len(v)))
                        });
                    }
                    Ok(removed)
                })?;
                out.records += 1;
            }
            self.remove_call_index(&call_id)?;
            out.calls += 1;
        }
        if out.records > 0 {
            self.stage_stored_bytes()?;
        }
        Ok(out)
    }

    /// Whether every record of a call (its sequences `seqs`) is older than `cutoff_ms` and
    /// covered by `checkpoint`.
    fn call_is_older_than(&self, seqs: &[u64], cutoff_ms: u64, checkpoint: u64) -> Result<bool, LogError> {
        let Some(last) = seqs.last().copied() else { return Ok(false) };
        if last > checkpoint {
            return Ok(false);
        }
        #[derive(serde::Deserialize)]
        struct Time {
            time_ms: u64,
        }
        let Some(bytes) = self.raw_record(last)? else {
            return Ok(false);
        };
        Ok(rmp_serde::from_slice::<Time>(&bytes).is_ok_and(|t| t.time_ms < cutoff_ms))
    }

    /// Stages the removal of a call's per-call index.
    fn remove_call_index(&self, call_id: &str) -> Result<(), LogError> {
        let mut prefix = call_id.as_bytes().to_vec();
        prefix.push(0);
        let keys: Vec<sled::IVec> =
            self.by_call.scan_prefix(&prefix).keys().collect::<Result<_, _>>().map_err(|e| self.store_error(e))?;
        for key in keys {
            self.wal.stage(BY_CALL, &key, None, || self.by_call.remove(&key).map_err(|e| self.store_error(e)))?;
        }
        Ok(())
    }
}

impl SledLog {
    /// The sequences of a call's records, in order (from the per-call index).
    pub fn seqs_of_call(&self, call_id: &str) -> Result<Vec<u64>, LogError> {
        let mut prefix = call_id.as_bytes().to_vec();
        prefix.push(0);
        let mut seqs = Vec::new();
        for item in self.by_call.scan_prefix(&prefix) {
            let (_, v) = item.map_err(|e| self.store_error(e))?;
            seqs.extend(v.chunks_exact(8).filter_map(|c| c.try_into().ok()).map(u64::from_be_bytes));
        }
        if let Some(recent) = self.unindexed().get(call_id) {
            seqs.extend_from_slice(recent);
        }
        seqs.sort_unstable();
        seqs.dedup();
        Ok(seqs)
    }

    /// One record's MessagePack, if there is a record `seq`.
    pub fn raw_record(&self, seq: u64) -> Result<Option<RawRecord>, LogError> {
        match self.records.get(seq.to_be_bytes()).map_err(|e| self.store_error(e))? {
            Some(stored) => self.plain_ivec(seq, stored).map(Some),
            None => Ok(None),
        }
    }

    /// Stages record `seq` cut short by four bytes, as a damaged disk would leave it (tests).
    #[doc(hidden)]
    pub fn damage_record(&self, seq: u64) -> Result<(), LogError> {
        let key = seq.to_be_bytes();
        let Some(stored) = self.records.get(key).map_err(|e| self.store_error(e))? else { return Ok(()) };
        let damaged = stored[..stored.len().saturating_sub(4)].to_vec();
        self.wal.stage(RECORDS, &key, Some(&damaged), || {
            self.records.insert(key, damaged.as_slice()).map_err(|e| self.store_error(e))
        })
    }

    /// Makes the next `n` commits fail as a broken disk would, their changes rolled back
    /// (tests: a store that fails on demand).
    #[doc(hidden)]
    pub fn fail_next_commits(&self, n: usize) {
        self.wal.fail_commits(n);
    }

    /// Adds a record already encoded (MessagePack, as [`encode`](super::encode) gives), not
    /// durable until [`EventLog::commit`]. It is stored compressed once the log has its
    /// dictionary ([`super::codec`]).
    pub fn stage_raw(&self, seq: u64, call_id: &str, bytes: &[u8]) -> Result<(), LogError> {
        self.take_dictionary(false)?;
        let stored = self.codec.compress(bytes);
        let stored = stored.as_ref();
        let key = seq.to_be_bytes();
        self.wal.stage(RECORDS, &key, Some(stored), || {
            let old = self.records.insert(key, stored).map_err(|e| self.store_error(e))?;
            let replaced = old.as_deref().map_or(0, stored_len);
            let _ = self.stored_bytes.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some((b + stored_len(stored)).saturating_sub(replaced))
            });
            Ok(old)
        })?;
        {
            // A new key only for a call not there yet (one allocation less per record).
            let mut unindexed = self.unindexed();
            match unindexed.get_mut(call_id) {
                Some(seqs) => seqs.push(seq),
                None => {
                    unindexed.insert(call_id.to_owned(), vec![seq]);
                }
            }
        }
        self.next_seq.fetch_max(seq + 1, Ordering::Relaxed);
        Ok(())
    }
}

impl EventLog for SledLog {
    fn next_seq(&self) -> u64 {
        self.next_seq.load(Ordering::Relaxed)
    }

    fn stage(&self, record: &Record) -> Result<(), LogError> {
        let bytes = super::encode(record)?;
        self.stage_raw(record.seq, &record.call_id, &bytes)
    }

    fn stage_snapshot(&self, snapshot: &Snapshot) -> Result<(), LogError> {
        let bytes = rmp_serde::to_vec_named(snapshot)
            .map_err(|e| LogError::Encode { seq: snapshot.seq, reason: e.to_string() })?;
        let key = snapshot.call_id.as_bytes();
        self.wal.stage(SNAPSHOTS, key, Some(&bytes), || {
            self.snapshots.insert(key, bytes.as_slice()).map_err(|e| self.store_error(e))
        })
    }

    fn remove_snapshot(&self, call_id: &str) -> Result<(), LogError> {
        let key = call_id.as_bytes();
        self.wal.stage(SNAPSHOTS, key, None, || self.snapshots.remove(key).map_err(|e| self.store_error(e)))
    }

    fn stage_checkpoint(&self, seq: u64) -> Result<(), LogError> {
        // In key order: call ids are time-ordered, so the chunks go one after another at the
        // tree's end (in the map's order each would land on a leaf of its own).
        let mut chunks: Vec<(String, Vec<u64>)> = std::mem::take(&mut *self.unindexed()).into_iter().collect();
        chunks.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for (call_id, seqs) in chunks {
            let Some(first) = seqs.first() else { continue };
            let value: Vec<u8> = seqs.iter().flat_map(|s| s.to_be_bytes()).collect();
            let key = call_key(&call_id, *first);
            self.wal.stage(BY_CALL, &key, Some(&value), || {
                self.by_call.insert(key.as_slice(), value.as_slice()).map_err(|e| self.store_error(e))
            })?;
        }
        self.stage_stored_bytes()?;
        let value = seq.to_be_bytes();
        self.wal.stage(META, CHECKPOINT_KEY, Some(&value), || {
            self.meta.insert(CHECKPOINT_KEY, &value).map_err(|e| self.store_error(e))
        })
    }

    fn checkpoint(&self) -> Result<u64, LogError> {
        let value = self.meta.get(CHECKPOINT_KEY).map_err(|e| self.store_error(e))?;
        Ok(value.and_then(|v| v.as_ref().try_into().ok()).map_or(0, u64::from_be_bytes))
    }

    fn stage_timeouts(&self, timeouts: &crate::machines::Timeouts) -> Result<(), LogError> {
        let bytes =
            rmp_serde::to_vec_named(timeouts).map_err(|e| LogError::Encode { seq: 0, reason: e.to_string() })?;
        self.wal.stage(META, TIMEOUTS_KEY, Some(&bytes), || {
            self.meta.insert(TIMEOUTS_KEY, bytes.as_slice()).map_err(|e| self.store_error(e))
        })
    }

    fn timeouts(&self) -> Result<Option<crate::machines::Timeouts>, LogError> {
        match self.meta.get(TIMEOUTS_KEY).map_err(|e| self.store_error(e))? {
            Some(v) => decode(0, &v).map(Some),
            None => Ok(None),
        }
    }

    fn stage_command(&self, cmd_id: &str, command: &RememberedCommand) -> Result<(), LogError> {
        let bytes =
            rmp_serde::to_vec(command).map_err(|e| LogError::Encode { seq: command.seq, reason: e.to_string() })?;
        let key = command_key(cmd_id);
        self.wal.stage(META, &key, Some(&bytes), || {
            self.meta.insert(key.as_slice(), bytes.as_slice()).map_err(|e| self.store_error(e))
        })
    }

    fn remove_command(&self, cmd_id: &str) -> Result<(), LogError> {
        let key = command_key(cmd_id);
        self.wal.stage(META, &key, None, || self.meta.remove(key.as_slice()).map_err(|e| self.store_error(e)))
    }

    fn commands(&self) -> Result<Vec<(String, RememberedCommand)>, LogError> {
        self.meta
            .scan_prefix(COMMAND_PREFIX)
            .map(|item| {
                let (k, v) = item.map_err(|e| self.store_error(e))?;
                let cmd_id = String::from_utf8_lossy(&k[COMMAND_PREFIX.len()..]).into_owned();
                Ok((cmd_id, decode(0, &v)?))
            })
            .collect()
    }

    async fn commit(&self) -> Result<(), LogError> {
        match self.wal.commit() {
            Ok(()) => {
                self.committed_next_seq.store(self.next_seq.load(Ordering::Relaxed), Ordering::Relaxed);
                self.committed_stored_bytes.store(self.stored_bytes.load(Ordering::Relaxed), Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                // The staged changes were taken back out of sled: so are their sequences.
                self.next_seq.store(self.committed_next_seq.load(Ordering::Relaxed), Ordering::Relaxed);
                self.stored_bytes.store(self.committed_stored_bytes.load(Ordering::Relaxed), Ordering::Relaxed);
                // A checkpoint among them took the unindexed sequences: read them again.
                self.unindexed().clear();
                // A dictionary staged among them went too, but stays in use: stage it again.
                if let Some((id, dictionary)) = self.codec.active_dictionary() {
                    if !matches!(self.meta.get(dictionary_key(id)), Ok(Some(_))) {
                        if let Err(e) = self.stage_dictionary(id, &dictionary) {
                            tracing::error!(error = %e, "the log's dictionary could not be staged again after a failed commit");
                        }
                    }
                }
                if let Err(e) = self.index_tail() {
                    tracing::error!(error = %e, "the log's tail could not be indexed again after a failed commit");
                }
                Err(LogError::Store {
                    path: self.path.display().to_string(),
                    reason: format!("writing the write-ahead file failed: {e}"),
                })
            }
        }
    }

    fn snapshots(&self) -> Result<Vec<Snapshot>, LogError> {
        // With many live calls, decoding is most of a restart: the threads share it (sled's
        // values are reference-counted, so collecting them first copies no call).
        let raw: Vec<sled::IVec> =
            self.snapshots.iter().values().collect::<Result<_, _>>().map_err(|e| self.store_error(e))?;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 4);
        if raw.len() < 10_000 || threads == 1 {
            return raw.iter().map(|v| decode(0, v)).collect();
        }
        let chunk = raw.len().div_ceil(threads);
        std::thread::scope(|scope| {
            let parts: Vec<_> = raw
                .chunks(chunk)
                .map(|part| {
                    scope.spawn(move || part.iter().map(|v| decode(0, v)).collect::<Result<Vec<Snapshot>, _>>())
                })
                .collect();
            let mut out = Vec::with_capacity(raw.len());
            for part in parts {
                match part.join() {
                    Ok(decoded) => out.extend(decoded?),
                    Err(_) => {
                        return Err(LogError::Store {
                            path: self.path.display().to_string(),
                            reason: "a thread decoding snapshots panicked".into(),
                        })
                    }
                }
            }
            Ok(out)
        })
    }

    fn records_from(&self, from: u64) -> Box<dyn Iterator<Item = Result<Record, LogError>> + '_> {
        Box::new(self.records.range(from.to_be_bytes()..).map(move |item| {
            let (k, v) = item.map_err(|e| self.store_error(e))?;
            let seq = k.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0);
            decode(seq, &self.plain(seq, &v)?)
        }))
    }

    fn records_of_call(&self, call_id: &str) -> Result<Vec<Record>, LogError> {
        let seqs = self.seqs_of_call(call_id)?;
        let mut out = Vec::with_capacity(seqs.len());
        for seq in seqs {
            if let Some(v) = self.raw_record(seq)? {
                out.push(decode(seq, &v)?);
            }
        }
        Ok(out)
    }
}

impl Drop for SledLog {
    /// A clean close: sled flushed, the write-ahead files hold nothing it lacks.
    fn drop(&mut self) {
        match self.db.flush().map_err(|e| sled_words(&e)).and_then(|_| (self.sync_db)().map_err(|e| e.to_string())) {
            Ok(()) => self.wal.remove_all(),
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "sled's last flush failed: the write-ahead files are applied again at the next open")
            }
        }
    }
}
