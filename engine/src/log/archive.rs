//! The archive (`engine.archive_dir`): where retention puts calls before it removes them from
//! the log. Files are hourly, `records-<YYYY-MM-DD>T<HH>.zst` by the UTC hour of each call's
//! last record; each holds zstd frames (one per retention step) of the calls' records exactly as
//! the log stored them (MessagePack, concatenated), a call's records together and in order.
//! `callbus replay --archive <dir>` reads them like a log.
//!
//! A call is written (and the file synced) before its removal is staged, so a crash between the
//! two leaves it in both places, never in neither; reading skips a record seen twice.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::LogError;

/// zstd's level for archive files (the records compress ~8× at it).
const LEVEL: i32 = 3;

/// Where retention archives calls.
#[derive(Clone, Debug)]
pub struct Archive {
    dir: PathBuf,
}

/// One call to archive: the time of its last record and its records' bytes, in order.
pub type ArchivedCall = (u64, Vec<Vec<u8>>);

impl Archive {
    /// The archive in `dir` (created if missing).
    pub fn open(dir: &Path) -> Result<Archive, LogError> {
        std::fs::create_dir_all(dir).map_err(|e| LogError::Store {
            path: dir.display().to_string(),
            reason: format!("cannot create the archive dir: {e}"),
        })?;
        Ok(Archive { dir: dir.to_owned() })
    }

    /// Its dir.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file of the hour of `time_ms`.
    pub fn file_for(&self, time_ms: u64) -> PathBuf {
        let (date, hour) = hour_of(time_ms);
        self.dir.join(format!("records-{date}T{hour:02}.zst"))
    }

    /// Appends `calls` to their hours' files and syncs them; returns the bytes written.
    pub fn append(&self, calls: &[ArchivedCall]) -> Result<u64, LogError> {
        let mut by_file: std::collections::BTreeMap<PathBuf, Vec<u8>> = Default::default();
        for (last_ms, records) in calls {
            let raw = by_file.entry(self.file_for(*last_ms)).or_default();
            for r in records {
                raw.extend_from_slice(r);
            }
        }
        let mut written = 0;
        for (path, raw) in by_file {
            let store = |e: std::io::Error| LogError::Store {
                path: path.display().to_string(),
                reason: format!("cannot write the archive file: {e}"),
            };
            let frame = zstd::stream::encode_all(raw.as_slice(), LEVEL).map_err(store)?;
            let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(store)?;
            file.write_all(&frame).map_err(store)?;
            file.sync_data().map_err(store)?;
            written += frame.len() as u64;
        }
        Ok(written)
    }
}

/// The archive files in `dir` (or `dir` itself when it is a file), oldest hour first.
pub fn files(dir: &Path) -> Result<Vec<PathBuf>, String> {
    if dir.is_file() {
        return Ok(vec![dir.to_owned()]);
    }
    let entries = std::fs::read_dir(dir).map_err(|e| format!("cannot list the archive {}: {e}", dir.display()))?;
    let mut out: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("records-") && n.ends_with(".zst"))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// Reads an archive file's records (sequence, call, bytes), in the order written.
pub fn read(path: &Path, mut each: impl FnMut(u64, &str, &[u8]) -> Result<(), String>) -> Result<u64, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let mut raw = Vec::new();
    zstd::stream::read::Decoder::new(file)
        .and_then(|mut d| d.read_to_end(&mut raw))
        .map_err(|e| format!("{} is not a readable archive file: {e}", path.display()))?;
    let mut n = 0;
    for (seq, call_id, bytes) in super::split_records(&raw).map_err(|e| format!("{}: {e}", path.display()))? {
        each(seq, &call_id, bytes)?;
        n += 1;
    }
    Ok(n)
}

/// The UTC date (`YYYY-MM-DD`) and hour of `time_ms`.
fn hour_of(time_ms: u64) -> (String, u64) {
    let (year, month, day, hour, ..) = callbus_schemas::clock::civil(time_ms / 1000);
    (format!("{year:04}-{month:02}-{day:02}"), hour)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hours_are_named_in_utc() {
        assert_eq!(hour_of(0), ("1970-01-01".into(), 0));
        // 2026-12-06T07:30:00Z
        assert_eq!(hour_of(1_796_542_200_000), ("2026-12-06".into(), 7));
        // 2024-02-29T23:59:59Z (a leap day)
        assert_eq!(hour_of(1_709_251_199_000), ("2024-02-29".into(), 23));
    }
}
