//! A log record's fields found in its MessagePack bytes without decoding them: where `input`
//! lies, the scalars around it, and the bytes from the state after to the end (the state after,
//! then the effects: the order [`encode`](callbus_engine::log::encode) writes). `check` decodes
//! only the input and compares today's outcome, encoded, with those bytes, so a record that
//! replays the same is neither decoded whole nor walked past its input.

use callbus_engine::log::RECORD_FORMAT;

/// The fields of a record (format [`RECORD_FORMAT`]) as borrowed slices.
#[derive(Debug)]
pub(crate) struct Skim<'a> {
    /// Global sequence.
    pub seq: u64,
    /// When the input was processed.
    pub time_ms: u64,
    /// callbus's call id.
    pub call_id: &'a str,
    /// The record has a state before (it is not the call's first).
    pub has_before: bool,
    /// The input's bytes.
    pub input: &'a [u8],
    /// The bytes from the state after's value to the end: the state after, the key `effects`
    /// and the effects.
    pub outcome: &'a [u8],
}

impl<'a> Skim<'a> {
    /// The state after's bytes and the effects' bytes.
    pub fn after_and_effects(&self) -> Result<(&'a [u8], &'a [u8]), NotSkimmed> {
        let mut c = Cursor { bytes: self.outcome, at: 0 };
        let after = c.skip()?;
        if c.key()? != b"effects" {
            return Err(NotSkimmed("the effects do not follow the state after"));
        }
        let effects = c.skip()?;
        if c.at != self.outcome.len() {
            return Err(NotSkimmed("bytes after the record"));
        }
        Ok((after, effects))
    }
}

/// Why a record could not be skimmed (the caller then decodes it whole, which names the fault).
#[derive(Debug, PartialEq)]
pub(crate) struct NotSkimmed(pub &'static str);

/// The deepest nesting [`skip`] follows (a record's values nest a dozen levels at most).
const MAX_DEPTH: usize = 64;

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], NotSkimmed> {
        let end = self.at.checked_add(n).ok_or(NotSkimmed("length overflows"))?;
        let out = self.bytes.get(self.at..end).ok_or(NotSkimmed("truncated"))?;
        self.at = end;
        Ok(out)
    }

    fn byte(&mut self) -> Result<u8, NotSkimmed> {
        Ok(self.take(1)?[0])
    }

    fn be(&mut self, n: usize) -> Result<u64, NotSkimmed> {
        Ok(self.take(n)?.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    }

    fn uint(&mut self) -> Result<u64, NotSkimmed> {
        match self.byte()? {
            m @ 0x00..=0x7f => Ok(u64::from(m)),
            0xcc => self.be(1),
            0xcd => self.be(2),
            0xce => self.be(4),
            0xcf => self.be(8),
            _ => Err(NotSkimmed("expected an unsigned integer")),
        }
    }

    fn str_len(&mut self) -> Result<Option<usize>, NotSkimmed> {
        Ok(Some(match self.byte()? {
            m @ 0xa0..=0xbf => usize::from(m & 0x1f),
            0xd9 => self.be(1)? as usize,
            0xda => self.be(2)? as usize,
            0xdb => self.be(4)? as usize,
            0xc0 => return Ok(None),
            _ => return Err(NotSkimmed("expected a string")),
        }))
    }

    /// A string's raw bytes (a field name, compared as bytes).
    fn key(&mut self) -> Result<&'a [u8], NotSkimmed> {
        match self.str_len()? {
            Some(n) => self.take(n),
            None => Err(NotSkimmed("a field name is nil")),
        }
    }

    fn str(&mut self) -> Result<Option<&'a str>, NotSkimmed> {
        match self.str_len()? {
            Some(n) => std::str::from_utf8(self.take(n)?).map(Some).map_err(|_| NotSkimmed("a string is not UTF-8")),
            None => Ok(None),
        }
    }

    /// Skips one value (and everything inside it), returning its bytes.
    fn skip(&mut self) -> Result<&'a [u8], NotSkimmed> {
        let start = self.at;
        // Values still to skip at each open level.
        let mut pending = [0u64; MAX_DEPTH];
        pending[0] = 1;
        let mut depth = 1usize;
        while depth > 0 {
            if pending[depth - 1] == 0 {
                depth -= 1;
                continue;
            }
            pending[depth - 1] -= 1;
            let inner = match self.byte()? {
                0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => 0,
                m @ 0x80..=0x8f => 2 * u64::from(m & 0x0f),
                m @ 0x90..=0x9f => u64::from(m & 0x0f),
                m @ 0xa0..=0xbf => {
                    self.take(usize::from(m & 0x1f))?;
                    0
                }
                0xc4 | 0xd9 => self.sized(1, 0)?,
                0xc5 | 0xda => self.sized(2, 0)?,
                0xc6 | 0xdb => self.sized(4, 0)?,
                0xc7 => self.sized(1, 1)?,
                0xc8 => self.sized(2, 1)?,
                0xc9 => self.sized(4, 1)?,
                0xca => self.fixed(4)?,
                0xcb => self.fixed(8)?,
                0xcc | 0xd0 => self.fixed(1)?,
                0xcd | 0xd1 => self.fixed(2)?,
                0xce | 0xd2 => self.fixed(4)?,
                0xcf | 0xd3 => self.fixed(8)?,
                0xd4 => self.fixed(2)?,
                0xd5 => self.fixed(3)?,
                0xd6 => self.fixed(5)?,
                0xd7 => self.fixed(9)?,
                0xd8 => self.fixed(17)?,
                0xdc => self.be(2)?,
                0xdd => self.be(4)?,
                0xde => 2 * self.be(2)?,
                0xdf => 2 * self.be(4)?,
                0xc1 => return Err(NotSkimmed("the reserved byte 0xc1")),
            };
            if inner > 0 {
                // Every value is at least a byte: a count beyond the bytes left is a lie.
                if inner > (self.bytes.len() - self.at) as u64 {
                    return Err(NotSkimmed("truncated"));
                }
                if depth == MAX_DEPTH {
                    return Err(NotSkimmed("nested too deep"));
                }
                pending[depth] = inner;
                depth += 1;
            }
        }
        Ok(&self.bytes[start..self.at])
    }

    /// The `before` field: a state's name, or nil for a call's first record.
    fn before(&mut self) -> Result<bool, NotSkimmed> {
        match self.str_len()? {
            Some(n) => self.take(n).map(|_| true),
            None => Ok(false),
        }
    }

    fn fixed(&mut self, n: usize) -> Result<u64, NotSkimmed> {
        self.take(n)?;
        Ok(0)
    }

    /// A length of `width` bytes, then `extra` bytes (an ext's type), then that many bytes.
    fn sized(&mut self, width: usize, extra: usize) -> Result<u64, NotSkimmed> {
        let n = self.be(width)? as usize;
        self.take(extra)?;
        self.take(n)?;
        Ok(0)
    }
}

/// Finds a record's fields. Records of another format, or bytes that are not a record, are
/// refused.
pub(crate) fn skim(bytes: &[u8]) -> Result<Skim<'_>, NotSkimmed> {
    let mut c = Cursor { bytes, at: 0 };
    let fields = match c.byte()? {
        m @ 0x80..=0x8f => u64::from(m & 0x0f),
        0xde => c.be(2)?,
        0xdf => c.be(4)?,
        _ => return Err(NotSkimmed("a record is a map")),
    };
    let (mut format, mut seq, mut time_ms, mut call_id, mut has_before) = (None, None, None, None, None);
    let (mut input, mut outcome) = (None, None);
    for left in (0..fields).rev() {
        match c.key()? {
            b"format" => format = Some(c.uint()?),
            b"seq" => seq = Some(c.uint()?),
            b"time_ms" => time_ms = Some(c.uint()?),
            b"call_id" => call_id = Some(c.str()?.ok_or(NotSkimmed("call_id is nil"))?),
            b"before" => has_before = Some(c.before()?),
            b"input" => input = Some(c.skip()?),
            // The state after and then the effects end the record; read lazily.
            b"after" if left == 1 => {
                outcome = Some(&bytes[c.at..]);
                break;
            }
            b"after" | b"effects" => return Err(NotSkimmed("the state after and the effects do not end the record")),
            _ => {
                c.skip()?;
            }
        }
    }
    if format != Some(u64::from(RECORD_FORMAT)) {
        return Err(NotSkimmed("another record format"));
    }
    const MISSING: NotSkimmed = NotSkimmed("a field is missing");
    Ok(Skim {
        seq: seq.ok_or(MISSING)?,
        time_ms: time_ms.ok_or(MISSING)?,
        call_id: call_id.ok_or(MISSING)?,
        has_before: has_before.ok_or(MISSING)?,
        input: input.ok_or(MISSING)?,
        outcome: outcome.ok_or(MISSING)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use callbus_engine::log::{encode, Record};
    use callbus_engine::machines::{CallState, DialogState, Effect, Input};

    fn record() -> Record {
        Record {
            format: RECORD_FORMAT,
            seq: 70_000,
            time_ms: 1_795_417_936_000,
            call_id: "c0001".into(),
            partition: 3,
            input: Input::Event { node: "n1".into(), bridge_seq: Some(9), datagram: "{\"x\":1.5}".repeat(40) },
            before: Some("early".into()),
            after: CallState::Dialog(DialogState::new("n1", "a@b")),
            effects: vec![
                Effect::Notify { event: "answered".into(), cmd_id: None, data: serde_json::json!({"n": -3, "f": 0.5}) },
                Effect::StartTimer { name: "t".into(), after_ms: u64::MAX },
            ],
        }
    }

    #[test]
    fn finds_every_field_and_the_exact_bytes_of_the_values() {
        let r = record();
        let bytes = encode(&r).expect("encode");
        let s = skim(&bytes).expect("skim");
        assert_eq!((s.seq, s.time_ms, s.call_id, s.has_before), (70_000, 1_795_417_936_000, "c0001", true));
        assert_eq!(s.input, rmp_serde::to_vec_named(&r.input).expect("input"));
        let (after, effects) = s.after_and_effects().expect("outcome");
        assert_eq!(after, rmp_serde::to_vec_named(&r.after).expect("after"));
        assert_eq!(effects, rmp_serde::to_vec_named(&r.effects).expect("effects"));
        let mut tail = rmp_serde::to_vec_named(&r.after).expect("after");
        tail.extend(rmp_serde::to_vec_named(&"effects").expect("key"));
        tail.extend(rmp_serde::to_vec_named(&r.effects).expect("effects"));
        assert_eq!(s.outcome, tail, "the record ends with the state after and the effects");
        let first = Record { before: None, ..r };
        assert!(!skim(&encode(&first).expect("encode")).expect("skim").has_before);
    }

    #[test]
    fn refuses_truncated_malformed_and_foreign_bytes() {
        let bytes = encode(&record()).expect("encode");
        for cut in 0..bytes.len() {
            assert!(skim(&bytes[..cut]).and_then(|s| s.after_and_effects()).is_err(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0xc0);
        let s = skim(&longer).expect("the head reads");
        assert_eq!(s.after_and_effects().expect_err("trailing"), NotSkimmed("bytes after the record"));
        let other = Record { format: 1, ..record() };
        assert_eq!(skim(&encode(&other).expect("encode")).expect_err("format"), NotSkimmed("another record format"));
        assert!(skim(b"").is_err() && skim(&[0xc1]).is_err() && skim(&[0x91, 0x01]).is_err());
        let json = serde_json::to_vec(&record()).expect("json");
        assert!(skim(&json).is_err(), "JSON is not a record");
        // A map claiming 2^32 - 1 entries in a few bytes, and an array nested past any record.
        assert!(skim(&[0x81, 0xa1, b'x', 0xdf, 0xff, 0xff, 0xff, 0xff]).is_err());
        let mut deep = vec![0x81, 0xa1, b'x'];
        deep.extend(std::iter::repeat_n(0x91, 100));
        deep.push(0x01);
        assert_eq!(skim(&deep).expect_err("deep"), NotSkimmed("nested too deep"));
        let mut no_effects = vec![0x81];
        no_effects.extend_from_slice(&[0xa6, b'f', b'o', b'r', b'm', b'a', b't', 0x02]);
        assert_eq!(skim(&no_effects).expect_err("missing"), NotSkimmed("a field is missing"));
    }
}
