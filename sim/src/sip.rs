//! What the simulated SIP peers and OpenSIPS write: identifiers, tags, header blocks and SDP,
//! shaped like the captures in `fixtures/opensips/` (a sipp UAC/UAS against OpenSIPS 3.4.18).

use std::time::{SystemTime, UNIX_EPOCH};

/// A small deterministic generator for ids and tags (xorshift64*): the sim needs variety, not
/// cryptographic randomness, and a seed makes a run reproducible.
#[derive(Clone, Debug)]
pub struct Ids {
    state: u64,
    counter: u64,
}

impl Ids {
    /// A generator seeded with `seed` (0 is replaced by a fixed odd constant).
    pub fn new(seed: u64) -> Self {
        Ids { state: if seed == 0 { 0x9E37_79B9_7F4A_7C15 } else { seed }, counter: 0 }
    }

    /// The next pseudo-random number.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A fresh sequence number (1, 2, 3...).
    pub fn next_counter(&mut self) -> u64 {
        self.counter += 1;
        self.counter
    }

    /// `n` lower-case hex digits.
    pub fn hex(&mut self, n: usize) -> String {
        let mut s = String::with_capacity(n);
        while s.len() < n {
            s.push_str(&format!("{:016x}", self.next_u64()));
        }
        s.truncate(n);
        s
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A hex number with its digits reversed, as the dialog module prints `h_entry`/`h_id`
/// (fixture: h_entry 0x180 prints as `081`).
pub fn reversed_hex(n: u32) -> String {
    format!("{n:x}").chars().rev().collect()
}

/// The dialog `ID` (`<h_entry>.<h_id>`) and `db_id` (decimal of `h_entry << 32 | h_id`).
pub fn dialog_ids(h_entry: u32, h_id: u32) -> (String, String) {
    let id = format!("{}.{}", reversed_hex(h_entry), reversed_hex(h_id));
    let db_id = ((u64::from(h_entry) << 32) | u64::from(h_id)).to_string();
    (id, db_id)
}

pub use callbus_schemas::clock::{ctime, datetime};

/// An SDP offer or answer like sipp's, with the given media direction and port.
pub fn sdp(origin: &str, port: u16, direction: Option<&str>) -> String {
    let mut s = format!(
        "v=0\r\no={origin} 53655765 2353687637 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
    );
    if let Some(dir) = direction {
        s.push_str(&format!("a={dir}\r\n"));
    }
    s
}

/// An SDP padded with `a=x:NNNNN` lines to at least `size` bytes (the big-body captures).
pub fn padded_sdp(size: usize) -> String {
    let mut s = sdp("uac", 20312, None);
    let mut n = 0;
    while s.len() < size {
        s.push_str(&format!("a=x:{n:05}\r\n"));
        n += 1;
    }
    s
}

/// Splits `Display,uri` (how `ua_session_client_start` takes `from`/`to`) into its parts.
pub fn split_display(value: &str) -> (Option<&str>, &str) {
    match value.split_once(',') {
        Some((display, uri)) => (Some(display), uri),
        None => (None, value),
    }
}

/// A name-addr: `Display <uri>` or `<uri>`.
pub fn name_addr(display: Option<&str>, uri: &str) -> String {
    match display {
        Some(d) if !d.is_empty() => format!("{d} <{uri}>"),
        _ => format!("<{uri}>"),
    }
}

/// The parts of one SIP message that end up in an `E_UA_SESSION` `headers` param.
pub struct HeaderBlock<'a> {
    /// The Via line's sent-by and branch.
    pub via: String,
    /// The From header value.
    pub from: String,
    /// The To header value.
    pub to: String,
    /// The Call-ID.
    pub call_id: &'a str,
    /// CSeq number.
    pub cseq: u32,
    /// CSeq method.
    pub method: &'a str,
    /// The Contact value.
    pub contact: &'a str,
    /// Extra lines (already CRLF-terminated).
    pub extra: &'a str,
    /// The body's length; `Content-Type: application/sdp` is added when it is not zero.
    pub body_len: usize,
}

impl HeaderBlock<'_> {
    /// The header lines, CRLF-terminated and concatenated, as the `h` flag reports them.
    pub fn render(&self) -> String {
        let mut h = format!(
            "Via: SIP/2.0/UDP {}\r\nFrom: {}\r\nTo: {}\r\nCall-ID: {}\r\nCSeq: {} {}\r\nContact: {}\r\n{}",
            self.via, self.from, self.to, self.call_id, self.cseq, self.method, self.contact, self.extra
        );
        if self.body_len > 0 {
            h.push_str(&format!("Content-Type: application/sdp\r\nContent-Length: {:>5}\r\n", self.body_len));
        } else {
            h.push_str("Content-Length: 0\r\n");
        }
        h
    }
}
