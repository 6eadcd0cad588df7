//! The cluster's input: a bridge's event datagrams in batches, one JetStream message per batch
//! on `callbus.input.<node>`, each appended only after the previous one is stored (chained
//! with `Nats-Expected-Last-Subject-Sequence`), so the engines read a node's events in the
//! order the bridge received them, even across a stream's change of leader.
//!
//! A batch: the byte `B`, the format version (1), then per datagram its bridge sequence (u64,
//! big-endian), its length (u32, big-endian) and its bytes. Headers: [`HEADER_INPUT_RUN`]
//! (the bridge run's id) and [`HEADER_INPUT_LAST`] (the last datagram's bridge sequence), so a
//! bridge that lost an ack can tell from the stream what it stored.

use crate::subjects::{self, SubjectError};

/// The JetStream stream of every node's input batches (subjects `callbus.input.>`).
pub const STREAM: &str = "CALLBUS_EVENTS";
/// The subjects of [`STREAM`].
pub const STREAM_SUBJECTS: &str = subjects::ALL_INPUTS;

/// Header of an input batch: the bridge run that wrote it.
pub const HEADER_INPUT_RUN: &str = "Callbus-Input-Run";
/// Header of an input batch: the bridge sequence of its last datagram.
pub const HEADER_INPUT_LAST: &str = "Callbus-Input-Last";
/// The largest batch a bridge writes (NATS's default `max_payload` is 1 MiB).
pub const MAX_BATCH_BYTES: usize = 512 * 1024;
/// The most datagrams in a batch (a datagram's position in the input is its message's stream
/// sequence times 2^16 plus its index).
pub const MAX_BATCH_DATAGRAMS: usize = 1 << 16;

const MAGIC: u8 = b'B';
const VERSION: u8 = 1;

/// `callbus.input.<node>`.
pub fn subject(node: &str) -> Result<String, SubjectError> {
    subjects::validate_token("node", node)?;
    Ok(format!("{}.input.{node}", subjects::CALLBUS))
}

/// The node of an input subject.
pub fn node_of(subject: &str) -> Option<&str> {
    subject.strip_prefix(subjects::INPUT_PREFIX).filter(|n| !n.is_empty() && !n.contains('.'))
}

/// Encodes datagrams (bridge sequence, bytes) as one batch.
pub fn encode<'a>(datagrams: impl IntoIterator<Item = (u64, &'a [u8])>) -> Vec<u8> {
    let mut out = vec![MAGIC, VERSION];
    for (seq, bytes) in datagrams {
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        out.extend_from_slice(bytes);
    }
    out
}

/// Decodes a batch into (bridge sequence, datagram) pairs.
pub fn decode(batch: &[u8]) -> Result<Vec<(u64, &[u8])>, String> {
    match batch {
        [MAGIC, VERSION, ..] => {}
        [MAGIC, v, ..] => return Err(format!("input batch format {v} is not known (this engine reads 1)")),
        _ => return Err("not an input batch (no 'B' magic byte)".into()),
    }
    let mut out = Vec::new();
    let mut at = 2usize;
    while at < batch.len() {
        let head = batch.get(at..at + 12).ok_or_else(|| format!("input batch truncated in a header at byte {at}"))?;
        let seq = u64::from_be_bytes(head[..8].try_into().map_err(|_| "header")?);
        let len = u32::from_be_bytes(head[8..].try_into().map_err(|_| "header")?) as usize;
        let body = batch
            .get(at + 12..at + 12 + len)
            .ok_or_else(|| format!("input batch truncated: datagram {seq} says {len} bytes at byte {at}"))?;
        out.push((seq, body));
        at += 12 + len;
        if out.len() > MAX_BATCH_DATAGRAMS {
            return Err(format!("input batch holds more than {MAX_BATCH_DATAGRAMS} datagrams"));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_round_trip() {
        let a = br#"{"jsonrpc":"2.0","method":"E_DLG_STATE_CHANGED","params":{}}"#;
        let batch = encode([(7u64, &a[..]), (8, &b""[..]), (9, &b"x"[..])]);
        let back = decode(&batch).expect("valid");
        assert_eq!(back, vec![(7, &a[..]), (8, &b""[..]), (9, &b"x"[..])]);
        assert_eq!(decode(&encode(std::iter::empty())).expect("empty"), vec![]);
    }

    #[test]
    fn malformed_batches_are_refused_with_the_reason() {
        let batch = encode([(1u64, &b"hello"[..])]);
        for cut in 3..batch.len() {
            let e = decode(&batch[..cut]).expect_err("truncated");
            assert!(e.contains("truncated"), "{e}");
        }
        assert!(decode(b"").expect_err("empty").contains("magic"));
        assert!(decode(b"{\"json\":1}").expect_err("json").contains("magic"));
        assert!(decode(&[b'B', 9]).expect_err("version").contains("format 9"));
        let mut huge = vec![b'B', 1];
        huge.extend_from_slice(&1u64.to_be_bytes());
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode(&huge).expect_err("oversized").contains("truncated"));
    }

    #[test]
    fn subjects_name_the_node() {
        assert_eq!(subject("edge1").expect("valid"), "callbus.input.edge1");
        assert!(subject("a.b").is_err() && subject("").is_err() && subject("*").is_err());
        assert_eq!(node_of("callbus.input.edge1"), Some("edge1"));
        assert_eq!(node_of("callbus.input.a.b"), None);
        assert_eq!(node_of("opensips.edge1.event.X"), None);
    }
}
