//! `replay export`: the records, one per line (JSON) or as a stream of MessagePack values.

use std::io::Write;

use callbus_engine::log::{EventLog, LogError};
use indicatif::{ProgressBar, ProgressStyle};

use crate::{LogReader, ReplayError};

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    /// One JSON record per line.
    Jsonl,
    /// MessagePack records, one after the other (each value delimits itself).
    Msgpack,
}

/// Writes the records (of one call, since a time) to `out`; returns how many. Unreadable
/// records are reported on stderr with their sequence and skipped. A progress bar is drawn on
/// stderr when `progress` is set.
pub fn export(
    reader: &LogReader,
    out: &mut dyn Write,
    format: ExportFormat,
    call: Option<&str>,
    since_ms: Option<u64>,
    progress: bool,
) -> Result<u64, ReplayError> {
    let call_id = call.map(|c| reader.find_call(c)).transpose()?;
    let total = reader.log().next_seq().saturating_sub(1);
    let bar = if progress { ProgressBar::new(total) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} records {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut written = 0u64;
    let mut buf = Vec::with_capacity(1024);
    for (i, record) in reader.records(1, u64::MAX).enumerate() {
        if i % 4096 == 0 {
            bar.set_position(i as u64);
        }
        let record = match record {
            Ok(r) => r,
            Err(LogError::Corrupt { seq, reason }) => {
                bar.suspend(|| eprintln!("record {seq} is unreadable, skipped: {reason}"));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        if call_id.as_ref().is_some_and(|c| *c != record.call_id) || since_ms.is_some_and(|t| record.time_ms < t) {
            continue;
        }
        buf.clear();
        match format {
            ExportFormat::Jsonl => {
                serde_json::to_writer(&mut buf, &record).map_err(|e| std::io::Error::other(e.to_string()))?;
                buf.push(b'\n');
            }
            ExportFormat::Msgpack => {
                rmp_serde::encode::write_named(&mut buf, &record).map_err(|e| std::io::Error::other(e.to_string()))?;
            }
        }
        out.write_all(&buf)?;
        written += 1;
    }
    bar.finish_and_clear();
    out.flush()?;
    Ok(written)
}
