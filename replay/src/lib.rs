//! Reading a callbus log when something went wrong: a call's timeline, a determinism check of
//! today's machines against what was recorded, export, republishing the recorded OpenSIPS
//! events, and statistics. `callbus replay` is the command; this is the library it (and the
//! engine's tests) use.
//!
//! sled lets one process open a data dir at a time. [`LogReader::open`] opens the dir itself
//! when it can, and otherwise (a running engine holds it) reads a copy taken into a temporary
//! directory, saying so: the copy is what the engine had written by then.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod check;
mod export;
mod replayer;
mod republish;
mod skim;

pub use replayer::Replayer;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use callbus_engine::log::{EventLog, LogError, Record, SledLog};

pub use check::{check, CheckOptions, CheckReport, Divergence, Step, DEFAULT_CHUNK};
pub use export::{export, ExportFormat};
pub use republish::{republish, Speed};

/// A progress bar over `total` records on stderr (hidden unless `shown`; indicatif also hides
/// it when stderr is not a terminal).
pub(crate) fn progress_bar(total: u64, shown: bool) -> indicatif::ProgressBar {
    let bar = if shown { indicatif::ProgressBar::new(total) } else { indicatif::ProgressBar::hidden() };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} records {per_sec} eta {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// What can go wrong reading a log.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The log could not be opened or read.
    #[error(transparent)]
    Log(#[from] LogError),
    /// The data dir holds no callbus log.
    #[error("no callbus log in {dir} (it has no `db` file): check --data-dir")]
    NoLog {
        /// The data dir.
        dir: String,
    },
    /// The data dir could not be copied (while a running engine holds it).
    #[error("cannot copy the data dir {dir} to read it beside the running engine: {reason}")]
    Copy {
        /// The data dir.
        dir: String,
        /// The error.
        reason: String,
    },
    /// No such call in the log.
    #[error("no call {0:?} in this log (give a call_id or a SIP Call-ID)")]
    UnknownCall(String),
    /// Writing the output failed.
    #[error("writing the output failed: {0}")]
    Io(#[from] std::io::Error),
    /// Publishing on NATS failed.
    #[error("publishing on NATS failed: {0}")]
    Nats(String),
    /// An archive file could not be read.
    #[error("{0}")]
    Archive(String),
}

/// Builds in `into` (an empty dir) one log of the archive `archive` (a dir of hourly files, or
/// one file) and, when given, the live log `live`: every record once, by its sequence, with the
/// timeouts the live log recorded. Returns how many records came from the archive.
pub async fn merge_archive(archive: &Path, live: Option<&LogReader>, into: &Path) -> Result<u64, ReplayError> {
    let log = SledLog::open(into)?;
    let mut archived = 0u64;
    for file in callbus_engine::log::archive::files(archive).map_err(ReplayError::Archive)? {
        archived += callbus_engine::log::archive::read(&file, |seq, call_id, bytes| {
            log.stage_raw(seq, call_id, bytes).map_err(|e| e.to_string())
        })
        .map_err(ReplayError::Archive)?;
    }
    if let Some(live) = live {
        for record in live.log().raw_records_from(1) {
            let (seq, bytes) = record?;
            for (s, call_id, raw) in callbus_engine::log::split_records(&bytes).map_err(ReplayError::Archive)? {
                debug_assert_eq!(s, seq);
                log.stage_raw(s, &call_id, raw)?;
            }
        }
        log.stage_timeouts(&live.timeouts())?;
    }
    log.commit().await?;
    Ok(archived)
}

/// A log opened for reading.
pub struct LogReader {
    log: SledLog,
    dir: PathBuf,
    /// The temporary copy, when the dir itself was in use.
    copy: Option<tempfile::TempDir>,
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => dir_size(&e.path()),
                    _ => e.metadata().map(|m| m.len()).unwrap_or(0),
                })
                .sum()
        })
        .unwrap_or(0)
}

/// Counts by kind and final state, and the time span.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Stats {
    /// Records read.
    pub records: u64,
    /// Records that could not be read.
    pub unreadable: u64,
    /// Distinct calls.
    pub calls: u64,
    /// Calls by kind, then by their last state.
    pub by_kind_and_state: BTreeMap<String, BTreeMap<String, u64>>,
    /// Time of the first record (ms since the epoch).
    pub first_ms: Option<u64>,
    /// Time of the last record.
    pub last_ms: Option<u64>,
    /// Bytes the data dir takes.
    pub size_on_disk: u64,
    /// Bytes the records take as stored (what `engine.retention_bytes` bounds).
    pub stored_bytes: u64,
}

/// One line of a call's timeline.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TimelineRow {
    /// The record's sequence.
    pub seq: u64,
    /// When.
    pub time_ms: u64,
    /// The input, short.
    pub input: String,
    /// The state before (None for the call's first record).
    pub before: Option<String>,
    /// The state after.
    pub after: String,
    /// The effects, short.
    pub effects: Vec<String>,
}

impl LogReader {
    /// Opens the log in `dir`, or a copy of it when a running engine holds it.
    pub fn open(dir: &Path) -> Result<LogReader, ReplayError> {
        // Reading never creates a log: a mistyped --data-dir is an error, not an empty log.
        if !dir.join("db").is_file() {
            return Err(ReplayError::NoLog { dir: dir.display().to_string() });
        }
        match SledLog::open(dir) {
            Ok(log) => Ok(LogReader { log, dir: dir.to_owned(), copy: None }),
            Err(LogError::InUse { .. }) => {
                let tmp = tempfile::tempdir()
                    .map_err(|e| ReplayError::Copy { dir: dir.display().to_string(), reason: e.to_string() })?;
                copy_dir(dir, tmp.path())
                    .map_err(|e| ReplayError::Copy { dir: dir.display().to_string(), reason: e.to_string() })?;
                tracing::info!(dir = %dir.display(), "the data dir is in use (a running engine?): reading a copy of it");
                let log = SledLog::open(tmp.path())?;
                Ok(LogReader { log, dir: dir.to_owned(), copy: Some(tmp) })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The timeouts the engine ran with (recorded in the log), or the defaults.
    pub fn timeouts(&self) -> callbus_engine::machines::Timeouts {
        self.log.timeouts().ok().flatten().unwrap_or_default()
    }

    /// Whether this reads a copy (the dir was in use).
    pub fn is_copy(&self) -> bool {
        self.copy.is_some()
    }

    /// The log.
    pub fn log(&self) -> &SledLog {
        &self.log
    }

    /// Records with sequence in `from..=to`; unreadable ones come as errors and reading goes on.
    pub fn records(&self, from: u64, to: u64) -> impl Iterator<Item = Result<Record, LogError>> + '_ {
        self.log.records_from(from).take_while(move |r| match r {
            Ok(r) => r.seq <= to,
            Err(LogError::Corrupt { seq, .. }) => *seq <= to,
            Err(_) => true,
        })
    }

    /// The call id for a call id or a SIP Call-ID.
    pub fn find_call(&self, id: &str) -> Result<String, ReplayError> {
        if !self.log.seqs_of_call(id)?.is_empty() {
            return Ok(id.to_owned());
        }
        for record in self.log.records_from(1).flatten() {
            if record.after.sip_call_id() == Some(id) {
                return Ok(record.call_id);
            }
        }
        Err(ReplayError::UnknownCall(id.to_owned()))
    }

    /// A call's records as timeline rows.
    pub fn timeline(&self, id: &str) -> Result<Vec<TimelineRow>, ReplayError> {
        let call_id = self.find_call(id)?;
        Ok(self
            .log
            .records_of_call(&call_id)?
            .into_iter()
            .map(|r| TimelineRow {
                seq: r.seq,
                time_ms: r.time_ms,
                input: r.input.label(),
                before: r.before.as_deref().map(str::to_owned),
                after: r.after.name().to_owned(),
                effects: r.effects.iter().map(effect_label).collect(),
            })
            .collect())
    }

    /// Counts over the whole log.
    pub fn stats(&self) -> Stats {
        let mut stats =
            Stats { size_on_disk: dir_size(&self.dir), stored_bytes: self.log.stored_bytes(), ..Stats::default() };
        let mut last: HashMap<String, (String, String)> = HashMap::new();
        for record in self.log.records_from(1) {
            match record {
                Ok(r) => {
                    stats.records += 1;
                    stats.first_ms = Some(stats.first_ms.map_or(r.time_ms, |t| t.min(r.time_ms)));
                    stats.last_ms = Some(stats.last_ms.map_or(r.time_ms, |t| t.max(r.time_ms)));
                    last.insert(r.call_id, (r.after.kind().to_owned(), r.after.name().to_owned()));
                }
                Err(_) => stats.unreadable += 1,
            }
        }
        stats.calls = last.len() as u64;
        for (kind, state) in last.into_values() {
            *stats.by_kind_and_state.entry(kind).or_default().entry(state).or_default() += 1;
        }
        stats
    }
}

/// A short text for an effect.
pub fn effect_label(effect: &callbus_engine::machines::Effect) -> String {
    use callbus_engine::machines::Effect;
    match effect {
        Effect::Mi { command, .. } => format!("mi {command}"),
        Effect::Notify { event, .. } => format!("notify {event}"),
        Effect::StartTimer { name, after_ms } => format!("timer {name} {after_ms}ms"),
        Effect::CancelTimer { name } => format!("cancel {name}"),
    }
}
