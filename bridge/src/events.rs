//! Event datagrams out: UDP in, NATS out, byte for byte, in order, nothing lost silently.
//!
//! The receiver task reads datagrams and appends them to a bounded buffer; the publisher task
//! publishes them in batches and only drops a batch from the buffer once NATS has confirmed
//! it. async-nats's `flush` only means "written to the socket", so the confirmation is a
//! barrier: a message to the bridge's own subscription, published after the batch. NATS keeps
//! one connection's messages in order, so when the barrier comes back the server has
//! processed the whole batch. If it does not come back (NATS down), the batch stays and is
//! published again once NATS is back, with the same `Nats-Msg-Id` so JetStream drops
//! duplicates. While NATS is down the receiver keeps reading into the buffer; when the buffer
//! is full new datagrams are counted as overflowed and logged, never dropped silently.
//!
//! Batching amortizes the barrier's round trip (~130 µs here): under load a batch holds
//! whatever arrived meanwhile, up to [`MAX_BATCH`].

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::connection::State as NatsState;
use async_nats::header::HeaderName;
use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use callbus_schemas::bus::{HEADER_INVALID_REASON, HEADER_MSG_ID, HEADER_NODE, HEADER_RECEIVED_US, HEADER_SEQ};
use callbus_schemas::event::event_name;
use callbus_schemas::subjects;
use futures::StreamExt;
use tokio::net::UdpSocket;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::Counters;

/// The most datagrams published before one barrier.
pub const MAX_BATCH: usize = 2048;
/// How long a barrier may take before the batch counts as not delivered.
const BARRIER_TIMEOUT: Duration = Duration::from_secs(2);
/// Kernel receive buffer asked for the event socket: bursts from several OpenSIPS processes
/// must not overflow the default ~200 kB while the bridge is busy publishing.
const SOCKET_RCVBUF: usize = 8 << 20;

/// One datagram waiting to be published. Headers are built when it is published (not
/// kept as a `HeaderMap`, which would have to be cloned for every attempt).
#[derive(Clone)]
struct Outgoing {
    subject: Subject,
    seq: u64,
    received_us: u64,
    invalid_reason: Option<Arc<str>>,
    payload: Bytes,
}

const NODE_HEADER: HeaderName = HeaderName::from_static(HEADER_NODE);
const RECEIVED_HEADER: HeaderName = HeaderName::from_static(HEADER_RECEIVED_US);
const SEQ_HEADER: HeaderName = HeaderName::from_static(HEADER_SEQ);
const MSG_ID_HEADER: HeaderName = HeaderName::from_static(HEADER_MSG_ID);
const INVALID_HEADER: HeaderName = HeaderName::from_static(HEADER_INVALID_REASON);

/// Names the bridge run in `Nats-Msg-Id` values.
pub(crate) struct MsgIds {
    pub node: String,
    /// `<node>.<run id>.`, the prefix of every `Nats-Msg-Id`.
    pub prefix: String,
}

impl Outgoing {
    fn headers(&self, ids: &MsgIds) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(NODE_HEADER, ids.node.as_str());
        headers.insert(RECEIVED_HEADER, self.received_us.to_string().as_str());
        let seq = self.seq.to_string();
        headers.insert(MSG_ID_HEADER, format!("{}{seq}", ids.prefix).as_str());
        headers.insert(SEQ_HEADER, seq.as_str());
        if let Some(reason) = &self.invalid_reason {
            headers.insert(INVALID_HEADER, &**reason);
        }
        headers
    }
}

/// The bounded buffer between the UDP receiver and the NATS publisher.
pub(crate) struct Buffer {
    queue: Mutex<VecDeque<Outgoing>>,
    capacity: usize,
    ready: Notify,
}

impl Buffer {
    pub fn new(capacity: usize) -> Buffer {
        Buffer { queue: Mutex::new(VecDeque::new()), capacity: capacity.max(1), ready: Notify::new() }
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<Outgoing>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// Binds the event socket with a large receive buffer.
pub(crate) fn bind(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let domain = if addr.is_ipv4() { socket2::Domain::IPV4 } else { socket2::Domain::IPV6 };
    let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    if let Err(e) = socket.set_recv_buffer_size(SOCKET_RCVBUF) {
        tracing::warn!(error = %e, "could not enlarge the event socket's receive buffer");
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// What the receiver needs to name datagrams.
pub(crate) struct Stamp {
    pub node: String,
    pub invalid_subject: Subject,
}

/// Reads event datagrams until cancelled.
pub(crate) async fn receive(
    socket: UdpSocket,
    stamp: Stamp,
    buffer: Arc<Buffer>,
    mut tap: Option<tokio::sync::mpsc::Sender<(u64, Bytes)>>,
    counters: Arc<Counters>,
    cancel: CancellationToken,
) {
    let mut buf = vec![0u8; 65_536];
    let tap_dropped = metrics::counter!("callbus_bridge_tap_dropped_total", "node" => stamp.node.clone());
    let mut tap_logged_at: Option<std::time::Instant> = None;
    let mut seq: u64 = 0;
    // Per event name: its subject and its counter (looked up once, then a single atomic add).
    let mut subjects_by_event: std::collections::HashMap<String, (Subject, metrics::Counter)> = Default::default();
    let datagrams = metrics::counter!("callbus_bridge_datagrams_total", "node" => stamp.node.clone());
    let invalid = metrics::counter!("callbus_bridge_invalid_datagrams_total", "node" => stamp.node.clone());
    let overflowed = metrics::counter!("callbus_bridge_dropped_datagrams_total", "node" => stamp.node.clone());
    let mut overflow_logged_at: Option<std::time::Instant> = None;
    loop {
        let received = tokio::select! {
            _ = cancel.cancelled() => return,
            r = socket.recv_from(&mut buf) => r,
        };
        let (len, from) = match received {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "receiving event datagrams failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        counters.datagrams_in.fetch_add(1, Ordering::Relaxed);
        counters.last_datagram_us.store(now_us(), Ordering::Relaxed);
        seq += 1;
        let bytes = &buf[..len];
        let received_us = now_us();
        let mut invalid_reason = None;
        datagrams.increment(1);
        let subject = match event_name(bytes) {
            Ok(name) => match subjects_by_event.get(&name) {
                Some((s, counter)) => {
                    counter.increment(1);
                    Ok(s.clone())
                }
                None => match subjects::event(&stamp.node, &name) {
                    Ok(s) => {
                        let s = Subject::from(s);
                        let labels = [("node", stamp.node.clone()), ("event", name.clone())];
                        let counter = metrics::counter!("callbus_bridge_events_total", &labels);
                        counter.increment(1);
                        subjects_by_event.insert(name, (s.clone(), counter));
                        Ok(s)
                    }
                    Err(e) => Err(format!("the event name cannot be a subject token: {e}")),
                },
            },
            Err(e) => Err(e.to_string()),
        };
        let subject = match subject {
            Ok(s) => s,
            Err(reason) => {
                counters.invalid.fetch_add(1, Ordering::Relaxed);
                invalid.increment(1);
                tracing::warn!(%from, size = len, %reason, "invalid event datagram: published raw on {}", stamp.invalid_subject);
                let mut short: String = reason.chars().filter(|c| !c.is_control()).take(200).collect();
                if short.is_empty() {
                    short.push('?');
                }
                invalid_reason = Some(Arc::from(short));
                stamp.invalid_subject.clone()
            }
        };
        let out = Outgoing { subject, seq, received_us, invalid_reason, payload: Bytes::copy_from_slice(bytes) };
        if let (Some(to), None) = (tap.as_ref(), out.invalid_reason.as_ref()) {
            match to.try_send((seq, out.payload.clone())) {
                Ok(()) => {}
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => tap = None,
                Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                    tap_dropped.increment(1);
                    let now = std::time::Instant::now();
                    if tap_logged_at.is_none_or(|t| now.duration_since(t) > Duration::from_secs(1)) {
                        tap_logged_at = Some(now);
                        tracing::error!(
                            seq,
                            "the engine in this process is too far behind: an event datagram was not handed to it (it is still published on NATS; the engine's reconciliation with OpenSIPS repairs the calls)"
                        );
                    }
                }
            }
        }
        let accepted = {
            let mut queue = buffer.lock();
            if queue.len() >= buffer.capacity {
                false
            } else {
                queue.push_back(out);
                true
            }
        };
        if accepted {
            buffer.ready.notify_one();
        } else {
            counters.overflowed.fetch_add(1, Ordering::Relaxed);
            overflowed.increment(1);
            let now = std::time::Instant::now();
            if overflow_logged_at.is_none_or(|t| now.duration_since(t) > Duration::from_secs(1)) {
                overflow_logged_at = Some(now);
                tracing::error!(
                    capacity = buffer.capacity,
                    overflowed = counters.overflowed.load(Ordering::Relaxed),
                    "event buffer full (NATS down or too slow): datagrams are being dropped; raise --buffer or fix NATS"
                );
            }
        }
    }
}

/// How the publisher confirms what it published.
pub(crate) struct Publishing {
    /// The bridge's own subject for barriers.
    pub barrier_subject: String,
    /// How long a shutdown may spend publishing what is still buffered.
    pub drain_for: Duration,
    /// Also append each batch to `callbus.input.<node>` for the engines of a cluster.
    pub acked: bool,
}

/// Publishes buffered datagrams in order until cancelled and the buffer is empty (or
/// `drain_for` has passed after cancellation).
pub(crate) async fn publish(
    client: async_nats::Client,
    ids: MsgIds,
    how: Publishing,
    buffer: Arc<Buffer>,
    counters: Arc<Counters>,
    cancel: CancellationToken,
) {
    let Publishing { barrier_subject, drain_for, acked } = how;
    let mut input = match (acked, callbus_schemas::input::subject(&ids.node)) {
        (true, Ok(subject)) => Some(Input {
            js: async_nats::jetstream::ContextBuilder::new().timeout(Duration::from_secs(2)).build(client.clone()),
            subject,
            run: ids.prefix.clone(),
            last: None,
        }),
        _ => None,
    };
    let mut barrier = match client.subscribe(barrier_subject.clone()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot subscribe to the bridge's barrier subject: events will not be published");
            return;
        }
    };
    let mut barrier_seq: u64 = 0;
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    let published = metrics::counter!("callbus_bridge_events_published_total", "node" => ids.node.clone());
    let batch_size = metrics::histogram!("callbus_bridge_publish_batch_size", "node" => ids.node.clone());
    let buffered = metrics::gauge!("callbus_bridge_buffered_events", "node" => ids.node.clone());
    loop {
        if cancel.is_cancelled() && drain_deadline.is_none() {
            drain_deadline = Some(tokio::time::Instant::now() + drain_for);
        }
        if drain_deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            let left = buffer.len();
            if left > 0 {
                tracing::error!(left, "shutting down with event datagrams not published (NATS unreachable)");
            }
            return;
        }
        let batch: Vec<Outgoing> = {
            let queue = buffer.lock();
            buffered.set(queue.len() as f64);
            // At most MAX_BATCH datagrams, and (for the cluster's input batch) about 512 KiB.
            let mut bytes = 0usize;
            queue
                .iter()
                .take(MAX_BATCH)
                .take_while(|o| {
                    let first = bytes == 0;
                    bytes += o.payload.len() + 12;
                    first || bytes <= callbus_schemas::input::MAX_BATCH_BYTES
                })
                .cloned()
                .collect()
        };
        if batch.is_empty() {
            if drain_deadline.is_some() {
                return;
            }
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = buffer.ready.notified() => {}
            }
            continue;
        }
        if client.connection_state() != NatsState::Connected {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        let n = batch.len();
        // Apps: each event on its subject, confirmed by a barrier.
        let mut sent = true;
        for out in &batch {
            let headers = out.headers(&ids);
            if let Err(e) = client.publish_with_headers(out.subject.clone(), headers, out.payload.clone()).await {
                tracing::warn!(error = %e, "publishing an event failed; the batch will be retried");
                sent = false;
                break;
            }
        }
        barrier_seq += 1;
        let mut confirmed = sent && confirm(&client, &barrier_subject, &mut barrier, barrier_seq).await;
        // Engines of a cluster: the batch appended to the node's input, after the previous one.
        if let (true, Some(input)) = (confirmed, input.as_mut()) {
            let stored = input.append(&batch).await;
            if stored < n {
                if stored > 0 {
                    buffer.lock().drain(..stored);
                    counters.published.fetch_add(stored as u64, Ordering::Relaxed);
                    published.increment(stored as u64);
                    continue;
                }
                confirmed = false;
            }
        }
        if confirmed {
            buffer.lock().drain(..n);
            counters.published.fetch_add(n as u64, Ordering::Relaxed);
            counters.batches.fetch_add(1, Ordering::Relaxed);
            published.increment(n as u64);
            batch_size.record(n as f64);
        } else {
            tracing::warn!(
                batch = n,
                "NATS did not confirm a batch of events; it stays buffered and is published again when NATS is back"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A node's input for the engines of a cluster: batches appended to `callbus.input.<node>`,
/// each chained to the previous one with `Nats-Expected-Last-Subject-Sequence`.
struct Input {
    js: async_nats::jetstream::Context,
    subject: String,
    run: String,
    /// The subject's last sequence, when known.
    last: Option<u64>,
}

impl Input {
    /// Appends the batch; returns how many of its first datagrams are now stored (all of them,
    /// or as many as the stream says it holds after a lost answer).
    async fn append(&mut self, batch: &[Outgoing]) -> usize {
        let Some(last_seq) = batch.last().map(|o| o.seq) else { return 0 };
        let valid = batch.iter().filter(|o| o.invalid_reason.is_none());
        if valid.clone().next().is_none() {
            return batch.len(); // nothing the engines read
        }
        let last = match self.last {
            Some(l) => l,
            None => match self.resync(batch).await {
                Some(0) => match self.last {
                    Some(l) => l,
                    None => return 0,
                },
                Some(stored) => return stored,
                None => return 0,
            },
        };
        let payload = Bytes::from(callbus_schemas::input::encode(valid.map(|o| (o.seq, &o.payload[..]))));
        let message = async_nats::jetstream::message::PublishMessage::build()
            .payload(payload)
            .expected_last_subject_sequence(last)
            .header(callbus_schemas::input::HEADER_INPUT_RUN, self.run.as_str())
            .header(callbus_schemas::input::HEADER_INPUT_LAST, last_seq.to_string().as_str());
        let acked = match self.js.send_publish(self.subject.clone(), message).await {
            Ok(ack) => tokio::time::timeout(BARRIER_TIMEOUT, std::future::IntoFuture::into_future(ack))
                .await
                .map_err(|_| "no ack in time".to_owned())
                .and_then(|r| r.map_err(|e| e.to_string())),
            Err(e) => Err(e.to_string()),
        };
        match acked {
            Ok(ack) => {
                self.last = Some(ack.sequence);
                batch.len()
            }
            Err(e) => {
                tracing::warn!(subject = %self.subject, error = %e, "the input batch was not acknowledged: asking the stream what it holds");
                self.resync(batch).await.unwrap_or(0)
            }
        }
    }

    /// Reads the subject's last message: its sequence, and how many of `batch` it says are
    /// stored (when this run wrote it). None when the stream does not answer.
    async fn resync(&mut self, batch: &[Outgoing]) -> Option<usize> {
        let stream = self.js.get_stream(callbus_schemas::input::STREAM).await.ok()?;
        match stream.get_last_raw_message_by_subject(&self.subject).await {
            Ok(m) => {
                self.last = Some(m.sequence);
                let header = |name: &str| m.headers.get(name).map(|v| v.as_str().to_owned());
                let ours = header(callbus_schemas::input::HEADER_INPUT_RUN).as_deref() == Some(self.run.as_str());
                let stored_last: u64 =
                    header(callbus_schemas::input::HEADER_INPUT_LAST).and_then(|v| v.parse().ok()).unwrap_or(0);
                Some(if ours { batch.iter().take_while(|o| o.seq <= stored_last).count() } else { 0 })
            }
            Err(e) if e.kind() == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
                self.last = Some(0);
                Some(0)
            }
            Err(e) => {
                tracing::warn!(subject = %self.subject, error = %e, "the input stream does not answer yet");
                None
            }
        }
    }
}

/// Publishes barrier `seq` to our own subscription and waits until it comes back.
async fn confirm(client: &async_nats::Client, subject: &str, sub: &mut async_nats::Subscriber, seq: u64) -> bool {
    let marker = Bytes::from(seq.to_string());
    if client.publish(subject.to_owned(), marker.clone()).await.is_err() {
        return false;
    }
    let wait = async {
        while let Some(msg) = sub.next().await {
            if msg.payload == marker {
                return true;
            }
        }
        false
    };
    tokio::time::timeout(BARRIER_TIMEOUT, wait).await.unwrap_or(false)
}
