//! The MI side of the bridge: one UDP socket to OpenSIPS, many requests in flight.
//!
//! Each request gets a bridge-owned string id (`b<n>`: OpenSIPS echoes strings verbatim but
//! squeezes numbers through a C `int`). Replies are matched by id, never by order. A request
//! that gets no reply within the timeout is answered with [`BridgeErrorKind::Timeout`]; a
//! plain-text reply (`500 Internal error`, which has no id) is given to the oldest request in
//! flight, since OpenSIPS's MI process answers in order; a "connection refused" from the
//! kernel (nothing listens at the MI address) fails the oldest request likewise.
//!
//! OpenSIPS reads MI datagrams with one process and a kernel buffer of a few hundred kB: a
//! burst of hundreds of requests would overflow it and be lost silently. So at most
//! [`SEND_WINDOW`] requests are on the wire at once; the others wait in the bridge, under the
//! same deadline, and go out as replies come back.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_nats::Subject;
use bytes::Bytes;
use callbus_schemas::bus::{BridgeErrorKind, MiBusReply};
use callbus_schemas::mi::{MiError, MiId, MiParams, MiReply, MiRequest, JSONRPC_VERSION};
use callbus_schemas::MI_DATAGRAM_BUFFER;
use serde_json::Value;
use tokio::net::UdpSocket;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::Counters;

/// The most MI requests sent to OpenSIPS and not yet answered.
pub const SEND_WINDOW: usize = 64;

/// How often expired requests are looked for.
const SWEEP_EVERY: Duration = Duration::from_millis(20);

/// Where an MI reply goes.
pub(crate) enum Responder {
    /// A NATS request's reply subject, and when the request was taken.
    Nats(Subject, Instant),
    /// A caller inside the bridge.
    Local(oneshot::Sender<MiBusReply>),
}

struct Waiting {
    command: String,
    /// When the request was taken.
    started: Instant,
    deadline: Instant,
    responder: Responder,
    /// Whether the datagram went out (false: still queued in the bridge).
    sent: bool,
}

#[derive(Default)]
struct Pending {
    by_id: HashMap<u64, Waiting>,
    /// Ids in the order they were made (the oldest first): ids only grow.
    order: BTreeMap<u64, ()>,
    /// Datagrams waiting for room in the send window.
    queue: std::collections::VecDeque<(u64, Vec<u8>)>,
    on_wire: usize,
}

impl Pending {
    fn take(&mut self, id: u64) -> Option<Waiting> {
        self.order.remove(&id);
        let w = self.by_id.remove(&id)?;
        if w.sent {
            self.on_wire -= 1;
        } else {
            self.queue.retain(|(q, _)| *q != id);
        }
        Some(w)
    }

    /// The oldest request on the wire (a reply without id can only be for one of those).
    fn take_oldest_sent(&mut self) -> Option<(u64, Waiting)> {
        let id = self.order.keys().copied().find(|id| self.by_id.get(id).is_some_and(|w| w.sent))?;
        self.take(id).map(|w| (id, w))
    }

    /// Datagrams that now fit in the send window, marked as sent.
    fn ready_to_send(&mut self) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        while self.on_wire < SEND_WINDOW {
            let Some((id, bytes)) = self.queue.pop_front() else { break };
            if let Some(w) = self.by_id.get_mut(&id) {
                w.sent = true;
                self.on_wire += 1;
                out.push((id, bytes));
            }
        }
        out
    }
}

/// A client for OpenSIPS MI over UDP, shared by the NATS service and the bridge's own tasks.
#[derive(Clone)]
pub struct MiClient {
    inner: Arc<Inner>,
}

struct Inner {
    socket: UdpSocket,
    mi_addr: SocketAddr,
    pending: Mutex<Pending>,
    next_id: AtomicU64,
    timeout: Duration,
    max_in_flight: usize,
    nats: async_nats::Client,
    counters: Arc<Counters>,
    /// The `callbus-bridge` NATS service, once started: its stats count MI requests from NATS.
    service: std::sync::OnceLock<callbus_service::Service>,
    /// When OpenSIPS's absence was last said as a warning, and how many were kept quiet since.
    away_said: Mutex<(Option<Instant>, u64)>,
}

/// While OpenSIPS does not answer (timeouts, nothing listening), it is said as a warning at
/// most this often (each request's own reply still names it; the rest go to debug).
const AWAY_WARNING_EVERY: Duration = Duration::from_secs(30);

/// What a datagram on the MI socket is, for the bridge.
enum Incoming {
    /// A JSON-RPC reply to request `id`.
    Reply(u64, MiBusReply),
    /// A plain-text reply (no id).
    PlainText(String),
    /// Nothing the bridge can match.
    Stray(String),
}

fn classify(bytes: &[u8]) -> Incoming {
    let reply = MiReply::classify(bytes);
    let id = match reply.id() {
        Some(MiId::String(s)) => s.strip_prefix('b').and_then(|n| n.parse().ok()),
        _ => None,
    };
    match (id, reply) {
        (Some(id), MiReply::Success(s)) => Incoming::Reply(id, MiBusReply::Result { result: s.result }),
        (Some(id), MiReply::Error(e)) => Incoming::Reply(id, MiBusReply::Error { error: e.error }),
        (_, MiReply::PlainText(text)) => Incoming::PlainText(text.as_text()),
        (_, MiReply::Unrecognized { reason }) => Incoming::Stray(reason),
        (_, other) => Incoming::Stray(format!("reply with an id the bridge did not give: {:?}", other.id())),
    }
}

impl MiClient {
    /// Binds a UDP socket towards OpenSIPS MI at `mi_addr` and starts reading replies.
    pub(crate) async fn start(
        mi_addr: SocketAddr,
        timeout: Duration,
        max_in_flight: usize,
        nats: async_nats::Client,
        counters: Arc<Counters>,
        cancel: CancellationToken,
    ) -> std::io::Result<MiClient> {
        let bind =
            if mi_addr.is_ipv4() { SocketAddr::from(([0, 0, 0, 0], 0)) } else { SocketAddr::from(([0u16; 8], 0)) };
        let socket = UdpSocket::bind(bind).await?;
        socket.connect(mi_addr).await?;
        let client = MiClient {
            inner: Arc::new(Inner {
                socket,
                mi_addr,
                pending: Mutex::new(Pending::default()),
                next_id: AtomicU64::new(1),
                timeout,
                max_in_flight,
                nats,
                counters,
                service: std::sync::OnceLock::new(),
                away_said: Mutex::new((None, 0)),
            }),
        };
        tokio::spawn(client.clone().read_replies(cancel.clone()));
        tokio::spawn(client.clone().sweep_timeouts(cancel));
        Ok(client)
    }

    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.inner.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.pending().by_id.len()
    }

    /// Runs `command` and waits for its reply (OpenSIPS's, or the bridge's error).
    pub async fn call(&self, command: &str, params: Option<MiParams>) -> MiBusReply {
        let (tx, rx) = oneshot::channel();
        self.send(command, params, Responder::Local(tx)).await;
        rx.await
            .unwrap_or_else(|_| MiBusReply::bridge_error(BridgeErrorKind::Unavailable, "the bridge is shutting down"))
    }

    /// Sends `command`; its reply goes to `responder` (now, if it cannot be sent).
    pub(crate) async fn send(&self, command: &str, params: Option<MiParams>, responder: Responder) {
        self.inner.counters.mi_requests.fetch_add(1, Ordering::Relaxed);
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let request = MiRequest {
            jsonrpc: JSONRPC_VERSION.to_owned(),
            method: command.to_owned(),
            id: Some(MiId::String(format!("b{id}"))),
            params: params.filter(|p| !p.is_empty()),
        };
        let bytes = request.to_bytes();
        if bytes.len() > MI_DATAGRAM_BUFFER {
            let detail = format!(
                "the {command} request is {} bytes; OpenSIPS drops MI datagrams over {MI_DATAGRAM_BUFFER} bytes without a reply: send less",
                bytes.len()
            );
            self.refuse(responder, command, BridgeErrorKind::TooLarge, detail).await;
            return;
        }
        let refused = {
            let mut pending = self.pending();
            if pending.by_id.len() >= self.inner.max_in_flight {
                Some(responder)
            } else {
                let deadline = Instant::now() + self.inner.timeout;
                let waiting =
                    Waiting { command: command.to_owned(), started: Instant::now(), deadline, responder, sent: false };
                pending.by_id.insert(id, waiting);
                pending.order.insert(id, ());
                pending.queue.push_back((id, bytes));
                None
            }
        };
        if let Some(responder) = refused {
            let detail =
                format!("{} MI requests are already waiting for OpenSIPS: retry later", self.inner.max_in_flight);
            self.refuse(responder, command, BridgeErrorKind::Unavailable, detail).await;
            return;
        }
        self.pump().await;
    }

    /// Sends queued datagrams while the send window has room.
    async fn pump(&self) {
        loop {
            let ready = self.pending().ready_to_send();
            if ready.is_empty() {
                return;
            }
            for (id, bytes) in ready {
                if let Err(e) = self.inner.socket.send(&bytes).await {
                    let waiting = self.pending().take(id);
                    if let Some(w) = waiting {
                        let detail =
                            format!("sending {} to OpenSIPS MI at {} failed: {e}", w.command, self.inner.mi_addr);
                        self.refuse(w.responder, &w.command, BridgeErrorKind::Unreachable, detail).await;
                    }
                }
            }
        }
    }

    /// Says that OpenSIPS did not answer (a timeout, or nothing listening) as a warning, or at
    /// debug level when one was said less than [`AWAY_WARNING_EVERY`] ago (then the next
    /// warning counts those kept quiet).
    fn warn_away(&self, detail: &str) {
        let mut said = self.inner.away_said.lock().unwrap_or_else(|p| p.into_inner());
        let (last, quiet) = &mut *said;
        if last.is_some_and(|t| t.elapsed() < AWAY_WARNING_EVERY) {
            *quiet += 1;
            tracing::debug!("{detail}");
            return;
        }
        match *quiet {
            0 => tracing::warn!("{detail}"),
            n => tracing::warn!(more_since_last_warning = n, "{detail}"),
        }
        *last = Some(Instant::now());
        *quiet = 0;
    }

    /// Counts the MI requests from NATS in `service`'s stats from now on.
    pub(crate) fn count_in(&self, service: callbus_service::Service) {
        let _ = self.inner.service.set(service);
    }

    /// Answers with a bridge error that never reached OpenSIPS.
    pub(crate) async fn refuse(&self, responder: Responder, command: &str, kind: BridgeErrorKind, detail: String) {
        self.inner.counters.mi_refused.fetch_add(1, Ordering::Relaxed);
        match kind {
            // OpenSIPS away: said at most every 30 s, not at every health check.
            BridgeErrorKind::Unreachable => self.warn_away(&detail),
            _ => tracing::warn!(code = kind.code(), "{detail}"),
        }
        self.respond(responder, command, None, MiBusReply::bridge_error(kind, detail)).await;
    }

    /// Hands `reply` to whoever asked, and counts it (with its latency when it was sent).
    async fn respond(&self, responder: Responder, command: &str, started: Option<Instant>, reply: MiBusReply) {
        let outcome = match &reply {
            MiBusReply::Result { .. } => "ok",
            MiBusReply::Error { error } => {
                BridgeErrorKind::from_code(error.code).map_or("error", BridgeErrorKind::label)
            }
        };
        let labels = [("command", command.to_owned()), ("outcome", outcome.to_owned())];
        metrics::counter!("callbus_bridge_mi_requests_total", &labels).increment(1);
        if let Some(started) = started {
            metrics::histogram!("callbus_bridge_mi_duration_seconds", "command" => command.to_owned())
                .record(started.elapsed().as_secs_f64());
        }
        match responder {
            Responder::Local(tx) => {
                let _ = tx.send(reply);
            }
            Responder::Nats(subject, received) => {
                if let Some(service) = self.inner.service.get() {
                    let error = match &reply {
                        MiBusReply::Result { .. } => None,
                        MiBusReply::Error { error } => Some((u16::try_from(error.code).unwrap_or(500), outcome)),
                    };
                    service.record("mi", received.elapsed(), error);
                }
                if let Err(e) = self.inner.nats.publish(subject, Bytes::from(reply.to_bytes())).await {
                    tracing::warn!(error = %e, "MI reply could not be published on NATS");
                }
            }
        }
    }

    async fn read_replies(self, cancel: CancellationToken) {
        let mut buf = vec![0u8; 65_536];
        loop {
            let received = tokio::select! {
                _ = cancel.cancelled() => return,
                r = self.inner.socket.recv(&mut buf) => r,
            };
            match received {
                Ok(len) => {
                    self.on_datagram(&buf[..len]).await;
                    self.pump().await;
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    // The kernel got "port unreachable" for one of our datagrams.
                    let oldest = self.pending().take_oldest_sent();
                    if let Some((_, w)) = oldest {
                        let detail = format!(
                            "nothing answers MI at {} (connection refused) for {}: is OpenSIPS running with mi_datagram on that socket?",
                            self.inner.mi_addr, w.command
                        );
                        self.refuse(w.responder, &w.command, BridgeErrorKind::Unreachable, detail).await;
                    }
                    self.pump().await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading MI replies failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }

    async fn on_datagram(&self, bytes: &[u8]) {
        match classify(bytes) {
            Incoming::Reply(id, reply) => {
                let waiting = self.pending().take(id);
                match waiting {
                    Some(w) => {
                        if matches!(reply, MiBusReply::Error { .. }) {
                            self.inner.counters.mi_errors.fetch_add(1, Ordering::Relaxed);
                        }
                        self.respond(w.responder, &w.command, Some(w.started), reply).await;
                    }
                    None => tracing::info!(id, "MI reply for a request no longer waiting (it timed out): ignored"),
                }
            }
            Incoming::PlainText(text) => {
                let oldest = self.pending().take_oldest_sent();
                match oldest {
                    Some((id, w)) => {
                        tracing::warn!(id, command = %w.command, reply = %text, "OpenSIPS answered with a plain-text error; it carries no id, so it is given to the oldest request in flight");
                        self.inner.counters.mi_errors.fetch_add(1, Ordering::Relaxed);
                        let detail = format!(
                            "OpenSIPS answered {:?} to {}: for 500 the reply did not fit a datagram (page dlg_list with index/counter)",
                            text, w.command
                        );
                        let error = MiError {
                            code: BridgeErrorKind::PlainTextReply.code(),
                            message: BridgeErrorKind::PlainTextReply.message().to_owned(),
                            data: Some(Value::String(detail)),
                        };
                        self.respond(w.responder, &w.command, Some(w.started), MiBusReply::Error { error }).await;
                    }
                    None => tracing::warn!(reply = %text, "plain-text MI reply with no request in flight: ignored"),
                }
            }
            Incoming::Stray(reason) => {
                tracing::warn!(%reason, size = bytes.len(), "unmatched datagram on the MI socket: ignored");
            }
        }
    }

    async fn sweep_timeouts(self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {}
            }
            let now = Instant::now();
            let expired: Vec<Waiting> = {
                let mut pending = self.pending();
                let ids: Vec<u64> = pending
                    .order
                    .keys()
                    .copied()
                    .take_while(|id| pending.by_id.get(id).is_some_and(|w| w.deadline <= now))
                    .collect();
                ids.into_iter().filter_map(|id| pending.take(id)).collect()
            };
            for w in expired {
                self.inner.counters.mi_timeouts.fetch_add(1, Ordering::Relaxed);
                let detail = format!(
                    "OpenSIPS at {} did not answer {} within {:?}: check that it runs and that mi_datagram listens there",
                    self.inner.mi_addr, w.command, self.inner.timeout
                );
                self.warn_away(&detail);
                let reply = MiBusReply::bridge_error(BridgeErrorKind::Timeout, detail);
                self.respond(w.responder, &w.command, Some(w.started), reply).await;
            }
            self.pump().await;
        }
        // Shutting down: whoever still waits gets an answer, not a hang.
        let left: Vec<Waiting> = {
            let mut pending = self.pending();
            pending.order.clear();
            pending.queue.clear();
            pending.on_wire = 0;
            pending.by_id.drain().map(|(_, w)| w).collect()
        };
        for w in left {
            let reply = MiBusReply::bridge_error(BridgeErrorKind::Unavailable, "the bridge is shutting down");
            self.respond(w.responder, &w.command, None, reply).await;
        }
    }
}

/// Turns a NATS request body into MI params: empty means none; a JSON object or array is kept.
pub(crate) fn params_from_body(body: &[u8]) -> Result<Option<MiParams>, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(value @ (Value::Object(_) | Value::Array(_))) => params_from_value(value),
        Ok(other) => Err(format!(
            "the body must be a JSON object of named params (or an array, or empty), not {}",
            callbus_schemas::mi::json_type(&other)
        )),
        Err(e) => Err(format!("the body is not JSON: {e}")),
    }
}

/// MI params from a JSON value: an object (named), an array (positional), or null (none).
pub(crate) fn params_from_value(value: Value) -> Result<Option<MiParams>, String> {
    match value {
        Value::Null => Ok(None),
        Value::Object(map) => Ok(Some(MiParams::Named(map))),
        Value::Array(list) => Ok(Some(MiParams::Positional(list))),
        other => Err(format!(
            "the params must be a JSON object of named params (or an array, or null), not {}",
            callbus_schemas::mi::json_type(&other)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::params_from_body;

    #[test]
    fn bodies_become_params_or_clear_errors() {
        assert_eq!(params_from_body(b""), Ok(None));
        assert_eq!(params_from_body(b"  \n"), Ok(None));
        assert!(matches!(params_from_body(br#"{"callid":"x"}"#), Ok(Some(_))));
        assert!(matches!(params_from_body(b"[1]"), Ok(Some(_))));
        assert!(params_from_body(b"\"x\"").unwrap_err().contains("a string"));
        assert!(params_from_body(b"{").unwrap_err().contains("not JSON"));
        assert!(params_from_body(b"\xff").is_err());
    }
}
