//! Fuzz targets: every parser that reads bytes from outside (event datagrams, MI replies and
//! requests, command bodies, Call API frames, log records, subjects), their seeds (the real
//! OpenSIPS captures in `fixtures/opensips/` plus hand-made inputs) and a mutator (bit flips,
//! byte runs, deletions, duplications, splices with another seed, JSON tokens, numbers at
//! their limits, deep nesting, truncation). A target panics on a bug: an input it cannot
//! handle, or an accepted input that does not survive its own round trip. The `fuzz` binary
//! runs them; `tests/fuzz.rs` replays the kept crash inputs and a short run.

use callbus_engine::log::{Record, RECORD_FORMAT};
use callbus_engine::machines::{BridgedState, CallState, Ctx, DialogState, Input, Timeouts, UaState};
use callbus_schemas::command::CommandRequest;
use callbus_schemas::event::Event;
use callbus_schemas::mi::{MiReply, MiRequest};
use callbus_schemas::subjects::{Subject, Verb};

/// A xorshift generator: the same seed gives the same inputs.
pub struct Rng(pub u64);

impl Rng {
    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
}

const TOKENS: [&[u8]; 22] = [
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b":",
    b",",
    b"null",
    b"true",
    b"-1",
    b"0",
    b"18446744073709551616",
    b"-9223372036854775809",
    b"1e400",
    b"\\u0000",
    b"\\ud800",
    b"\xff\xfe",
    b"\"jsonrpc\":\"2.0\"",
    b"\"params\":{}",
    b"\"method\":\"E_UA_SESSION\"",
    b"\"id\":1",
    b"\xc1",
];

/// One mutation of `seed` (another seed may be spliced in).
pub fn mutate(rng: &mut Rng, seed: &[u8], other: &[u8]) -> Vec<u8> {
    let mut data = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = data.len();
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                data[i] = rng.next_u64() as u8;
            }
            2 if len > 0 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(32));
                data.drain(at..at + n);
            }
            3 if len > 0 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(64));
                let piece = data[at..at + n].to_vec();
                let to = rng.below(data.len() + 1);
                data.splice(to..to, piece);
            }
            4 => {
                let token = TOKENS[rng.below(TOKENS.len())];
                let to = rng.below(data.len() + 1);
                data.splice(to..to, token.iter().copied());
            }
            5 if !other.is_empty() => {
                let cut = rng.below(data.len() + 1);
                let from = rng.below(other.len());
                data.truncate(cut);
                data.extend_from_slice(&other[from..]);
            }
            6 => data.truncate(rng.below(len + 1)),
            7 => {
                // Deep nesting.
                let depth = 1 + rng.below(300);
                let to = rng.below(data.len() + 1);
                let open: Vec<u8> = std::iter::repeat_n(b'[', depth).collect();
                data.splice(to..to, open);
            }
            _ => {
                let n = 1 + rng.below(16);
                let to = rng.below(data.len() + 1);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                data.splice(to..to, bytes);
            }
        }
    }
    data
}

fn files(dir: &str, filter: impl Fn(&str) -> bool) -> Vec<Vec<u8>> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(crate::fixtures_dir().join(dir))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| filter(&e.file_name().to_string_lossy()))
                .filter_map(|e| Some((e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).ok()?)))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out.into_iter().map(|(_, b)| b).collect()
}

/// Log records of every kind, as the engine writes them.
fn record_seeds() -> Vec<Vec<u8>> {
    let timeouts = Timeouts::default();
    let states = [
        CallState::Dialog(DialogState::new("n1", "1-1@h")),
        CallState::Ua(UaState::client("n1")),
        CallState::Ua(UaState::server("n1", "B2B.1.2.3.4")),
        CallState::Bridged(Box::new(BridgedState::new("n1"))),
    ];
    let commands = [
        br#"{"caller":"sip:a@h","callee":"sip:b@h"}"#.as_slice(),
        br#"{"to":"sip:b@h","from":"sip:a@h","body":"v=0\r\n","headers":{"X-A":"1"}}"#,
        br#"{"call_id":"c1"}"#,
    ];
    let mut out = Vec::new();
    for (i, state) in states.iter().enumerate() {
        let verb = [Verb::CallEnd, Verb::UaStart, Verb::UaTerminate, Verb::CallStart][i];
        let body = commands[i % commands.len()];
        let Ok(request) = CommandRequest::parse(verb, body) else { continue };
        let input = Input::Command { cmd_id: format!("k{i}"), command: request.command };
        let ctx = Ctx { call_id: "c1", seq: 1, now_ms: 1, timeouts };
        let (after, effects) = state.step(&input, &ctx);
        let record = Record {
            format: RECORD_FORMAT,
            seq: 1,
            time_ms: 1,
            call_id: "c1".into(),
            partition: 0,
            input,
            before: None,
            after,
            effects,
        };
        if let Ok(bytes) = rmp_serde::to_vec_named(&record) {
            out.push(bytes);
        }
    }
    out
}

/// A parser under test.
pub struct Target {
    /// Its name.
    pub name: &'static str,
    /// Inputs to mutate.
    pub seeds: Vec<Vec<u8>>,
    /// Runs the target; true when the input was accepted (parsed), to see how deep the
    /// mutations reach.
    pub run: fn(&[u8]) -> bool,
}

/// Every target.
pub fn targets() -> Vec<Target> {
    let commands: Vec<Vec<u8>> = [
        r#"{"call_id":"c1","cmd_id":"x"}"#,
        r#"{"sip_call_id":"1@h","leg":"callee","destination":"sip:a@b"}"#,
        r#"{"call_id":"a","leg":"caller","transfer_sip_call_id":"b","transfer_leg":"callee"}"#,
        r#"{"caller":"sip:a@h","callee":"sip:b@h","max_duration_s":60}"#,
        r#"{"to":"Bob,sip:b@h","from":"sip:a@h","body":"v=0","content_type":"application/sdp","headers":{"X-A":"1"},"manual_ack":true}"#,
        r#"{"key":"B2B.1.2.3.4","code":486,"reason":"Busy","method":"INVITE"}"#,
        r#"{"key":"B2B.1.2.3.4","method":"INFO","body":"Signal=1","content_type":"application/dtmf-relay"}"#,
        r#"{"state":"confirmed","node":"n1"}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    let frames: Vec<Vec<u8>> = [
        r#"{"jsonrpc":"2.0","id":1,"method":"CallStart","params":{"caller":"sip:a@b","callee":"sip:c@d"}}"#,
        r#"{"jsonrpc":"2.0","id":"x","method":"CallBlindTransfer","params":{"callid":"1@h","leg":"callee","destination":"sip:t@h","cmd_id":"c"}}"#,
        r#"{"jsonrpc":"2.0","id":3,"method":"CallAttendedTransfer","params":{"callidA":"a","legA":"caller","callidB":"b","legB":"callee"}}"#,
        r#"{"jsonrpc":"2.0","id":null,"method":"CallHold","params":{"callid":"x"}}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    let subjects: Vec<Vec<u8>> = [
        "opensips.n1.event.E_DLG_STATE_CHANGED",
        "opensips.n1.mi.dlg_list",
        "callbus.cmd.call.transfer.blind",
        "callbus.call.c01a.ended",
        "opensips.n1.status",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    vec![
        Target {
            name: "event_datagram",
            seeds: files("events", |_| true),
            run: |b| {
                let _ = callbus_schemas::event::event_name(b);
                let Ok(e) = Event::parse(b) else { return false };
                // What parses must write back and parse again.
                let again = Event::parse(&e.to_bytes()).expect("a parsed event writes back parseable");
                assert_eq!(again, e, "an event changes through a write and a parse");
                true
            },
        },
        Target {
            name: "mi_reply",
            seeds: files("mi", |n| n.contains("reply")),
            run: |b| !matches!(MiReply::classify(b), MiReply::Unrecognized { .. }),
        },
        Target {
            name: "mi_request",
            seeds: files("mi", |n| n.contains("request")),
            run: |b| MiRequest::parse(b).is_ok(),
        },
        Target {
            name: "command",
            seeds: commands,
            run: |b| {
                let mut any = false;
                for verb in Verb::ALL {
                    if let Ok(r) = CommandRequest::parse(verb, b) {
                        any = true;
                        // A valid command must still encode for the log.
                        let input = Input::Command { cmd_id: "f".into(), command: r.command };
                        assert!(rmp_serde::to_vec_named(&input).is_ok(), "a parsed command does not encode");
                    }
                }
                any
            },
        },
        Target { name: "callapi_frame", seeds: frames, run: |b| callbus_schemas::callapi::parse_request(b).is_ok() },
        Target {
            name: "log_record",
            seeds: record_seeds(),
            run: |b| {
                let Ok(r) = rmp_serde::from_slice::<Record>(b) else { return false };
                // A record that decodes must step without panicking, as `replay check` does it,
                // and from its own state too.
                let ctx = Ctx { call_id: &r.call_id, seq: r.seq, now_ms: r.time_ms, timeouts: Timeouts::default() };
                let _ = callbus_engine::machines::initial_state(&r.after).step(&r.input, &ctx);
                let _ = r.after.step(&r.input, &ctx);
                true
            },
        },
        Target {
            name: "subject",
            seeds: subjects,
            run: |b| std::str::from_utf8(b).is_ok_and(|s| Subject::parse(s).is_ok()),
        },
    ]
}
