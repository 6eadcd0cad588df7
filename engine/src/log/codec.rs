//! Records compressed on disk with a dictionary trained on the log's own records.
//!
//! A record is a few hundred bytes of MessagePack, most of it field names, SIP Call-IDs, tags
//! and the datagram's JSON keys, which every record of a deployment repeats. zstd alone saves
//! little on so small an input; with a dictionary trained on the log's first records it keeps
//! about a sixth (`bench-replay`, `RESULT|log size on disk`). The dictionary is trained once per
//! log, in the background, from the first [`SAMPLES`] records written (they stay as written:
//! plain MessagePack), and kept in the log's `meta` tree under its id, so every reader of the
//! log (a restart, `callbus replay`) decodes what it compressed. A log keeps every dictionary it
//! ever used: a later one (none is trained today) would not make older records unreadable.
//!
//! A stored value is either plain MessagePack (a record is a map: its first byte is never
//! `0xc1`) or `0xc1`, the dictionary's id (4 bytes, big-endian), then a zstd frame. `0xc1` is
//! the one byte MessagePack never uses.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use zstd::zstd_safe::{self, CCtx, CDict, DCtx, DDict};

/// The first byte of a compressed value (never used by MessagePack).
const COMPRESSED: u8 = 0xc1;
/// Records sampled to train the dictionary.
pub const SAMPLES: usize = 2_000;
/// The samples' bytes at most (a few large records must not hold megabytes).
const SAMPLE_BYTES: usize = 4 << 20;
/// The dictionary's size: zstd's guidance is about a hundredth of the samples.
const DICTIONARY_BYTES: usize = 8 << 10;
/// The largest record a compressed value may claim to hold (a record is bounded well below).
const MAX_PLAIN: u64 = 64 << 20;
/// zstd's level: the fastest, which with a dictionary compresses records about as well as any.
const LEVEL: i32 = 1;

/// Where a log keeps its dictionaries: `meta` keys with this prefix and the id (4 bytes, BE).
pub const DICTIONARY_PREFIX: &[u8] = b"\0dict\0";

/// A dictionary's `meta` key.
pub fn dictionary_key(id: u32) -> Vec<u8> {
    [DICTIONARY_PREFIX, &id.to_be_bytes()].concat()
}

thread_local! {
    /// One decompression context per thread: decoding happens on the replay's workers too.
    static DCTX: RefCell<DCtx<'static>> = RefCell::new(zstd_safe::create_dctx());
}

struct Active {
    id: u32,
    cdict: CDict<'static>,
    bytes: Arc<[u8]>,
}

/// State of the dictionary's training.
enum Training {
    /// Collecting samples (plain records).
    Sampling(Vec<Vec<u8>>, usize),
    /// A thread trains on them.
    Running(std::thread::JoinHandle<Option<Vec<u8>>>),
    /// Trained, or not to be trained in this log's life (a dictionary was loaded).
    Done,
}

/// A log's compression: its dictionaries, the one records are compressed with, and the training
/// of the first.
pub struct Codec {
    active: RwLock<Option<Arc<Active>>>,
    /// The compressor and the buffer it writes into (kept: room for the largest frame a
    /// record can make, allocated once and not zeroed per record).
    cctx: Mutex<(CCtx<'static>, Vec<u8>)>,
    ddicts: RwLock<HashMap<u32, Arc<DDict<'static>>>>,
    training: Mutex<Training>,
}

impl Codec {
    /// A codec for a log with these dictionaries (id and bytes, from its `meta` tree); the one
    /// with the highest id compresses. Without any, it samples records to train one.
    pub fn new(dictionaries: Vec<(u32, Vec<u8>)>) -> Codec {
        let active = dictionaries.iter().max_by_key(|(id, _)| *id).map(|(id, bytes)| {
            Arc::new(Active { id: *id, cdict: zstd_safe::create_cdict(bytes, LEVEL), bytes: bytes.as_slice().into() })
        });
        let training = if active.is_some() { Training::Done } else { Training::Sampling(Vec::new(), 0) };
        let ddicts = dictionaries.iter().map(|(id, bytes)| (*id, Arc::new(zstd_safe::create_ddict(bytes)))).collect();
        Codec {
            active: RwLock::new(active),
            cctx: Mutex::new((zstd_safe::create_cctx(), Vec::new())),
            ddicts: RwLock::new(ddicts),
            training: Mutex::new(training),
        }
    }

    /// What a record of `plain` MessagePack is stored as: compressed when there is a
    /// dictionary (or when compression would not save anything, plain). Without a dictionary
    /// yet, the record is kept as a sample.
    pub fn compress<'a>(&self, plain: &'a [u8]) -> Cow<'a, [u8]> {
        let active = self.active.read().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(active) = active else {
            self.sample(plain);
            return Cow::Borrowed(plain);
        };
        // The frame goes into the kept buffer, then after the header into a value of its size.
        let mut guard = self.cctx.lock().unwrap_or_else(|p| p.into_inner());
        let (cctx, scratch) = &mut *guard;
        let bound = zstd_safe::compress_bound(plain.len());
        if scratch.len() < bound {
            scratch.resize(bound, 0);
        }
        match cctx.compress_using_cdict(&mut scratch[..bound], plain, &active.cdict) {
            Ok(len) if len + 5 < plain.len() => {
                let mut out = Vec::with_capacity(5 + len);
                out.push(COMPRESSED);
                out.extend_from_slice(&active.id.to_be_bytes());
                out.extend_from_slice(&scratch[..len]);
                Cow::Owned(out)
            }
            _ => Cow::Borrowed(plain),
        }
    }

    /// The plain MessagePack of a stored value.
    pub fn plain<'a>(&self, stored: &'a [u8]) -> Result<Cow<'a, [u8]>, String> {
        if stored.first() != Some(&COMPRESSED) {
            return Ok(Cow::Borrowed(stored));
        }
        let (Some(id), Some(frame)) = (stored.get(1..5), stored.get(5..)) else {
            return Err("a compressed record is cut short".into());
        };
        let id = u32::from_be_bytes([id[0], id[1], id[2], id[3]]);
        let ddict = self.ddicts.read().unwrap_or_else(|p| p.into_inner()).get(&id).cloned();
        let Some(ddict) = ddict else {
            return Err(format!("the record was compressed with dictionary {id}, which this log does not have"));
        };
        let size = zstd_safe::get_frame_content_size(frame);
        if size > MAX_PLAIN {
            return Err(format!("the compressed record does not say a plausible size ({size})"));
        }
        let mut out = Vec::with_capacity(size as usize);
        DCTX.with(|dctx| dctx.borrow_mut().decompress_using_ddict(&mut out, frame, &ddict)).map_err(|code| {
            format!("the compressed record does not decompress: {}", zstd_safe::get_error_name(code))
        })?;
        if out.len() as u64 != size {
            return Err(format!("the compressed record holds {} bytes, not the {size} it says", out.len()));
        }
        Ok(Cow::Owned(out))
    }

    fn sample(&self, plain: &[u8]) {
        let mut training = self.training.lock().unwrap_or_else(|p| p.into_inner());
        let Training::Sampling(samples, bytes) = &mut *training else { return };
        samples.push(plain.to_vec());
        *bytes += plain.len();
        if samples.len() < SAMPLES && *bytes < SAMPLE_BYTES {
            return;
        }
        let samples = std::mem::take(samples);
        let thread = std::thread::Builder::new().name("callbus-log-dictionary".into()).spawn(move || {
            match zstd::dict::from_samples(&samples, DICTIONARY_BYTES) {
                Ok(dictionary) => Some(dictionary),
                Err(e) => {
                    tracing::warn!(error = %e, samples = samples.len(), "no dictionary could be trained on the log's first records: records stay uncompressed");
                    None
                }
            }
        });
        *training = match thread {
            Ok(thread) => Training::Running(thread),
            Err(e) => {
                tracing::warn!(error = %e, "no thread to train the log's dictionary: records stay uncompressed");
                Training::Done
            }
        };
    }

    /// A dictionary trained since the last call, with the id it gets (the caller stores it,
    /// then calls [`Codec::install`]). With `wait`, waits for a training under way.
    pub fn trained(&self, wait: bool) -> Option<(u32, Vec<u8>)> {
        let mut training = self.training.lock().unwrap_or_else(|p| p.into_inner());
        let Training::Running(thread) = &*training else { return None };
        if !wait && !thread.is_finished() {
            return None;
        }
        let Training::Running(thread) = std::mem::replace(&mut *training, Training::Done) else { return None };
        let dictionary = thread.join().ok().flatten()?;
        let id = self.ddicts.read().unwrap_or_else(|p| p.into_inner()).keys().max().map_or(1, |m| m + 1);
        Some((id, dictionary))
    }

    /// Compresses from now on with dictionary `id` (already stored with the log).
    pub fn install(&self, id: u32, dictionary: &[u8]) {
        self.ddicts
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, Arc::new(zstd_safe::create_ddict(dictionary)));
        *self.active.write().unwrap_or_else(|p| p.into_inner()) =
            Some(Arc::new(Active { id, cdict: zstd_safe::create_cdict(dictionary, LEVEL), bytes: dictionary.into() }));
    }

    /// The dictionary records are compressed with now, with its id.
    pub fn active_dictionary(&self) -> Option<(u32, Arc<[u8]>)> {
        self.active.read().unwrap_or_else(|p| p.into_inner()).as_ref().map(|a| (a.id, Arc::clone(&a.bytes)))
    }

    /// Stores records plain from now on, and trains no dictionary (benchmarks: the peer that
    /// shows what compression saves).
    pub fn disable(&self) {
        *self.training.lock().unwrap_or_else(|p| p.into_inner()) = Training::Done;
        *self.active.write().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// The id of the dictionary records are compressed with now, if any.
    pub fn active(&self) -> Option<u32> {
        self.active.read().unwrap_or_else(|p| p.into_inner()).as_ref().map(|a| a.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: usize) -> Vec<u8> {
        rmp_serde::to_vec_named(&serde_json::json!({
            "seq": i, "call_id": format!("c{i:016x}"), "datagram": format!("{{\"callid\":\"{i}-16765@127.0.0.1\",\"from_tag\":\"16765SIPpTag001\",\"state\":{}}}", i % 5),
        }))
        .expect("encode")
    }

    #[test]
    fn records_are_plain_until_a_dictionary_is_trained_then_compressed_and_read_back() {
        let codec = Codec::new(Vec::new());
        for i in 0..SAMPLES {
            let plain = record(i);
            assert_eq!(codec.compress(&plain).as_ref(), plain.as_slice(), "no dictionary yet: stored plain");
        }
        let (id, dictionary) = codec.trained(true).expect("trained after the samples");
        assert_eq!(id, 1);
        codec.install(id, &dictionary);
        let plain = record(SAMPLES + 7);
        let stored = codec.compress(&plain).into_owned();
        assert_eq!(stored[0], COMPRESSED);
        assert!(stored.len() * 2 < plain.len(), "{} bytes stored for {}", stored.len(), plain.len());
        assert_eq!(codec.plain(&stored).expect("plain").as_ref(), plain.as_slice());
        // Another reader of the log, with the dictionary from the log's meta.
        let reader = Codec::new(vec![(id, dictionary)]);
        assert_eq!(reader.plain(&stored).expect("plain").as_ref(), plain.as_slice());
        assert_eq!(reader.active(), Some(1));
        assert!(reader.trained(true).is_none(), "a log with a dictionary trains none");
    }

    #[test]
    fn damaged_compressed_values_are_errors_in_words() {
        let codec = Codec::new(Vec::new());
        for i in 0..SAMPLES {
            codec.compress(&record(i));
        }
        let (id, dictionary) = codec.trained(true).expect("trained");
        codec.install(id, &dictionary);
        let stored = codec.compress(&record(1)).into_owned();
        let cut = codec.plain(&stored[..3]).expect_err("cut short");
        assert!(cut.contains("cut short"), "{cut}");
        let mut other = stored.clone();
        other[4] = 9;
        let missing = codec.plain(&other).expect_err("unknown dictionary");
        assert!(missing.contains("dictionary 9"), "{missing}");
        let mut flipped = stored.clone();
        let last = flipped.len() - 1;
        flipped.truncate(last - 3);
        let broken = codec.plain(&flipped).expect_err("broken frame");
        assert!(broken.contains("compressed record"), "{broken}");
        // A plain value is passed through untouched.
        assert_eq!(codec.plain(b"\x81\xa1a\x01").expect("plain").as_ref(), b"\x81\xa1a\x01");
    }
}
