//! `replay export`: the records, one per line (JSON) or as a stream of MessagePack values.

use std::io::Write;

use callbus_engine::log::{EventLog, LogError, RawRecord};
use indicatif::ProgressBar;
use serde::Deserialize;

use crate::{LogReader, ReplayError};

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    /// One JSON record per line.
    Jsonl,
    /// MessagePack records, one after the other (each value delimits itself).
    Msgpack,
}

/// The fields an export filters on, read without decoding the rest of a record.
#[derive(serde::Deserialize)]
struct Head {
    seq: u64,
    time_ms: u64,
    call_id: String,
}

/// Records handed to a worker at a time.
const BATCH: usize = 512;

/// What an export keeps of each record.
struct Filter {
    call_id: Option<String>,
    since_ms: Option<u64>,
    format: ExportFormat,
}

impl Filter {
    /// Appends the export of one record to `buf`; Ok(false) when the filter leaves it out.
    fn one(&self, seq: u64, bytes: &[u8], buf: &mut Vec<u8>) -> Result<bool, String> {
        if self.call_id.is_some() || self.since_ms.is_some() {
            let head = rmp_serde::from_slice::<Head>(bytes).map_err(|e| e.to_string())?;
            let other_call = self.call_id.as_ref().is_some_and(|c| *c != head.call_id);
            if other_call || self.since_ms.is_some_and(|t| head.time_ms < t) || head.seq != seq {
                return Ok(false);
            }
        }
        let mark = buf.len();
        let done = match self.format {
            ExportFormat::Jsonl => {
                let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
                let mut ser = serde_json::Serializer::new(&mut *buf);
                serde_transcode::transcode(&mut de, &mut ser).map_err(|e| e.to_string())
            }
            ExportFormat::Msgpack => {
                let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
                serde::de::IgnoredAny::deserialize(&mut de).map(|_| ()).map_err(|e| e.to_string())
            }
        };
        if let Err(reason) = done {
            buf.truncate(mark);
            return Err(reason);
        }
        match self.format {
            ExportFormat::Jsonl => buf.push(b'\n'),
            ExportFormat::Msgpack => buf.extend_from_slice(bytes),
        }
        Ok(true)
    }

    /// The export of a batch, and how many records it holds.
    fn batch(&self, records: &[(u64, RawRecord)], bar: &ProgressBar) -> (Vec<u8>, u64) {
        let mut out = Vec::with_capacity(records.len() * 1024);
        let mut n = 0;
        for (seq, bytes) in records {
            match self.one(*seq, bytes, &mut out) {
                Ok(true) => n += 1,
                Ok(false) => {}
                Err(reason) => bar.suspend(|| eprintln!("record {seq} is unreadable, skipped: {reason}")),
            }
        }
        (out, n)
    }
}

/// One call's records, read through the log's per-call index (no scan of the whole log).
fn export_call(reader: &LogReader, out: &mut dyn Write, filter: &Filter, call_id: &str) -> Result<u64, ReplayError> {
    let mut records = Vec::new();
    for seq in reader.log().seqs_of_call(call_id)? {
        match reader.log().raw_record(seq) {
            Ok(Some(bytes)) => records.push((seq, bytes)),
            Ok(None) => {}
            // A compressed record that does not decompress: reported, as the others are.
            Err(LogError::Corrupt { seq, reason }) => eprintln!("record {seq} is unreadable, skipped: {reason}"),
            Err(e) => return Err(e.into()),
        }
    }
    let (bytes, written) = filter.batch(&records, &crate::progress_bar(0, false));
    out.write_all(&bytes)?;
    out.flush()?;
    Ok(written)
}

/// Writes the records (of one call, since a time) to `out`; returns how many. Records are
/// not decoded into types: MessagePack is passed through as stored (after a check that it is
/// well formed), JSON is transcoded from it; batches are converted on every core and written
/// in log order. One call's records are found through the log's per-call index. Unreadable
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
    let filter = Filter { call_id, since_ms, format };
    if let Some(call_id) = filter.call_id.as_deref() {
        return export_call(reader, out, &filter, call_id);
    }
    let total = reader.log().next_seq().saturating_sub(1);
    let bar = crate::progress_bar(total, progress);
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 8);
    let mut written = 0u64;
    let mut read_error = None;
    std::thread::scope(|scope| -> Result<(), ReplayError> {
        // Batches go to the workers round-robin; results come back in the same order.
        let mut to_workers = Vec::new();
        let mut from_workers = Vec::new();
        for _ in 0..workers {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<(u64, RawRecord)>>(2);
            let (rtx, rrx) = std::sync::mpsc::sync_channel::<(Vec<u8>, u64)>(2);
            let (filter, bar) = (&filter, &bar);
            scope.spawn(move || {
                for batch in rx {
                    if rtx.send(filter.batch(&batch, bar)).is_err() {
                        break;
                    }
                }
            });
            to_workers.push(tx);
            from_workers.push(rrx);
        }
        let (batches_tx, batches_rx) = std::sync::mpsc::sync_channel::<Vec<(u64, RawRecord)>>(workers * 2);
        let log = reader.log();
        let read_error = &mut read_error;
        let bar = &bar;
        scope.spawn(move || {
            let mut batch = Vec::with_capacity(BATCH);
            for item in log.raw_records_from(1) {
                match item {
                    Ok(r) => batch.push(r),
                    Err(LogError::Corrupt { seq, reason }) => {
                        bar.suspend(|| eprintln!("record {seq} is unreadable, skipped: {reason}"))
                    }
                    Err(e) => {
                        *read_error = Some(e);
                        break;
                    }
                }
                if batch.len() == BATCH
                    && batches_tx.send(std::mem::replace(&mut batch, Vec::with_capacity(BATCH))).is_err()
                {
                    return;
                }
            }
            if !batch.is_empty() {
                let _ = batches_tx.send(batch);
            }
        });
        let mut sent = 0usize;
        let mut received = 0usize;
        let mut position = 0u64;
        let mut input_open = true;
        while input_open || received < sent {
            // Keep every worker fed, then take the oldest result.
            while input_open && sent - received < workers {
                match batches_rx.recv() {
                    Ok(batch) => {
                        position += batch.len() as u64;
                        if to_workers[sent % workers].send(batch).is_err() {
                            input_open = false;
                        }
                        sent += 1;
                    }
                    Err(_) => input_open = false,
                }
            }
            if received == sent {
                break;
            }
            let Ok((bytes, n)) = from_workers[received % workers].recv() else { break };
            received += 1;
            out.write_all(&bytes)?;
            written += n;
            bar.set_position(position);
        }
        drop(to_workers);
        Ok(())
    })?;
    if let Some(e) = read_error {
        return Err(e.into());
    }
    bar.finish_and_clear();
    out.flush()?;
    Ok(written)
}
