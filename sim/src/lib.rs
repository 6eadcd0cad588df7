//! `opensips-sim`: an OpenSIPS 3.4 stand-in at the MI-datagram and event-datagram level.
//!
//! It answers MI datagrams as `mi_datagram` does (ids echoed verbatim, no reply without an id,
//! the same error codes and texts, named params where OpenSIPS insists, oversized requests
//! dropped, oversized replies turned into `500 Internal error`) and raises event datagrams as
//! `event_datagram` does: only to live subscribers, from one UDP source port per simulated
//! process, with subscriptions that lapse when not renewed. Calls happen as they do on a real
//! OpenSIPS with SIP peers: a test starts a scripted peer ([`CallScript`], [`UaPeer`],
//! [`UasScript`]) and the sim emits the same events, with the same params, in the same order
//! as the captures in `fixtures/opensips/` show, quirks included. Steps are spaced by
//! [`SimConfig::step`] so tests run fast.
//!
//! Used by the tests (as a library) and by `callbus sim` / `callbus demo`.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod mi;
mod scenario;
pub mod sip;

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{SocketAddr, UdpSocket as StdUdpSocket};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use callbus_schemas::event::{DlgState, Event};
use callbus_schemas::MAX_UDP_PAYLOAD;
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

pub use scenario::{CallScript, Outcome, RemoteRequest, UaPeer, UasScript};

/// The version string the sim reports, as OpenSIPS 3.4.18 does.
pub const SERVER_VERSION: &str = "OpenSIPS (3.4.18 (x86_64/linux))";

/// How the sim is set up.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Where the MI socket listens (`127.0.0.1:0` picks a free port).
    pub mi_listen: SocketAddr,
    /// Simulated SIP worker processes; each sends its events from its own UDP port.
    pub sip_workers: usize,
    /// Delay between two steps of a simulated SIP exchange (a reply, an ACK...).
    pub step: Duration,
    /// How long before an unanswered UA client INVITE gives 408 "Timeout".
    pub ua_timeout: Duration,
    /// Seed for ids, tags and keys (0: derived from the clock).
    pub seed: u64,
    /// Raise a UA client's first event before the MI reply carrying its key, as OpenSIPS
    /// sometimes does (fixture `events/E_UA_SESSION.1.burst_event_before_reply.json`).
    pub uac_event_before_reply: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            mi_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            sip_workers: 4,
            step: Duration::from_millis(2),
            ua_timeout: Duration::from_millis(200),
            seed: 0,
            uac_event_before_reply: false,
        }
    }
}

/// Counters of what the sim did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimStats {
    /// MI datagrams received.
    pub mi_requests: u64,
    /// MI datagrams dropped (oversized, or the sim was made silent).
    pub mi_dropped: u64,
    /// Event datagrams sent (one per subscriber).
    pub events_sent: u64,
    /// Events that could not be sent (too large for a datagram, send error).
    pub events_failed: u64,
}

/// Errors of the sim's control API.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// No UA session with that key.
    #[error("no UA session with key {0:?}")]
    UnknownSession(String),
    /// The request does not fit the session's state.
    #[error("UA session {key:?}: {reason}")]
    BadState {
        /// The session key.
        key: String,
        /// Why.
        reason: String,
    },
}

/// One `event_subscribe` entry.
#[derive(Clone, Debug)]
pub(crate) struct Subscription {
    pub event: String,
    pub socket: String,
    pub addr: SocketAddr,
    pub expire_secs: u64,
    pub since: Instant,
}

impl Subscription {
    /// Alive for `expire` seconds (OpenSIPS's 1-second granularity lets it live up to one more).
    pub fn is_live(&self, now: Instant) -> bool {
        self.expire_secs > 0 && now.duration_since(self.since) < Duration::from_secs(self.expire_secs)
    }

    pub fn ttl_secs(&self, now: Instant) -> u64 {
        self.expire_secs.saturating_sub(now.duration_since(self.since).as_secs())
    }
}

/// Which simulated process raises an event (each has its own source port).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Source {
    /// The MI worker (hold `start`, events raised inside an MI command).
    Mi,
    /// A SIP worker, picked round-robin (replies, requests from peers).
    Sip,
}

/// A proxied call as the `dialog` module keeps it.
#[derive(Clone, Debug)]
pub(crate) struct Dialog {
    pub id: String,
    pub db_id: String,
    pub callid: String,
    pub from_tag: String,
    pub to_tag: Option<String>,
    pub from_uri: String,
    pub to_uri: String,
    pub state: DlgState,
    pub timestart: u64,
    pub caller_sdp: String,
    pub callee_sdp: String,
    pub held_caller: bool,
    pub held_callee: bool,
    /// callops' `call_transfer_leg`: None never transferred, Some("") a transfer ended
    /// (every later `call_transfer` answers 491), Some(leg) a transfer is pending.
    pub transfer_leg: Option<String>,
    pub script: CallScript,
}

/// A b2b_entities UA session.
#[derive(Clone, Debug)]
pub(crate) struct UaSession {
    pub key: String,
    pub uac: bool,
    pub flags: scenario::UaFlags,
    /// b2b state: 1 new, 3 early, 4 confirmed (2xx not ACKed), 5 established, 7 terminated.
    pub b2b_state: u8,
    pub callid: String,
    pub from_display: String,
    pub from_uri: String,
    pub from_tag: String,
    pub to_display: String,
    pub to_uri: String,
    pub to_tag: String,
    pub local_index: u64,
    pub cseq_local: u32,
    pub cseq_remote: u32,
    pub remote_contact: String,
    pub remote_sdp: String,
    /// Methods of requests from the remote side still waiting for our reply.
    pub pending_remote: Vec<String>,
    pub last_method: u32,
    pub last_reply_code: Option<i64>,
}

/// Everything the simulated OpenSIPS remembers; lost on [`Sim::restart`], as OpenSIPS
/// forgets subscriptions, dialogs and sessions when it restarts.
pub(crate) struct State {
    pub started_unix: u64,
    pub generation: u64,
    pub ids: sip::Ids,
    pub subscriptions: Vec<Subscription>,
    pub dialogs: HashMap<String, Dialog>,
    pub dialog_order: BTreeMap<u64, String>,
    pub sessions: HashMap<String, UaSession>,
    pub session_order: BTreeMap<u64, String>,
    pub ua_peers: HashMap<String, UaPeer>,
    pub processed_dialogs: u64,
    pub failed_dialogs: u64,
    pub mi_silent: bool,
    /// The kind of the last failed MI param lookup, which OpenSIPS keeps per process and reports
    /// when a handler rejects a value it did find (`mi::ParamErr`).
    pub mi_param_err: crate::mi::ParamErr,
    order_seq: u64,
}

impl State {
    fn new(seed: u64) -> Self {
        State {
            started_unix: sip::unix_now(),
            generation: 0,
            ids: sip::Ids::new(seed),
            subscriptions: Vec::new(),
            dialogs: HashMap::new(),
            dialog_order: BTreeMap::new(),
            sessions: HashMap::new(),
            session_order: BTreeMap::new(),
            ua_peers: HashMap::new(),
            processed_dialogs: 0,
            failed_dialogs: 0,
            mi_silent: false,
            mi_param_err: crate::mi::ParamErr::BadType,
            order_seq: 0,
        }
    }

    pub fn insert_dialog(&mut self, dialog: Dialog) {
        self.order_seq += 1;
        self.dialog_order.insert(self.order_seq, dialog.callid.clone());
        self.dialogs.insert(dialog.callid.clone(), dialog);
    }

    pub fn remove_dialog(&mut self, callid: &str) {
        if self.dialogs.remove(callid).is_some() {
            self.dialog_order.retain(|_, c| c != callid);
        }
    }

    pub fn insert_session(&mut self, session: UaSession) {
        self.order_seq += 1;
        self.session_order.insert(self.order_seq, session.key.clone());
        self.sessions.insert(session.key.clone(), session);
    }

    pub fn remove_session(&mut self, key: &str) {
        if self.sessions.remove(key).is_some() {
            self.session_order.retain(|_, k| k != key);
        }
    }

    /// Dialogs in creation order.
    pub fn dialogs_in_order(&self) -> impl Iterator<Item = &Dialog> {
        self.dialog_order.values().filter_map(|c| self.dialogs.get(c))
    }

    /// Finds a dialog by its `hex.hex` ID first, then by Call-ID, as `dlg_end_dlg` does.
    pub fn find_dialog_key(&self, dialog_id: &str) -> Option<String> {
        self.dialogs
            .values()
            .find(|d| d.id == dialog_id)
            .map(|d| d.callid.clone())
            .or_else(|| self.dialogs.contains_key(dialog_id).then(|| dialog_id.to_owned()))
    }
}

/// Something the sim saw or did, with when: for benchmarks that time callbus from the
/// OpenSIPS side (e.g. from an event raised to the MI request it causes).
#[derive(Clone, Debug)]
pub enum Traced {
    /// An MI request was received (before it was handled).
    Mi {
        /// The MI command.
        command: String,
        /// Its params.
        params: serde_json::Value,
    },
    /// An event was raised (before its datagrams were sent).
    Event(Event),
}

/// Shared between the MI task, scenario tasks and the [`Sim`] handle.
pub(crate) struct Inner {
    pub config: SimConfig,
    /// What was seen and done, when tracing is on.
    pub trace: Mutex<Option<Vec<(Instant, Traced)>>>,
    /// Event datagrams are lost on the way (sent, never delivered), as UDP may.
    events_lost: std::sync::atomic::AtomicBool,
    state: Mutex<State>,
    event_sockets: Vec<StdUdpSocket>,
    next_worker: AtomicUsize,
    pub mi_requests: AtomicU64,
    pub mi_dropped: AtomicU64,
    events_sent: AtomicU64,
    events_failed: AtomicU64,
}

impl Inner {
    /// Records `what` at `at` when tracing is on.
    pub fn traced(&self, at: Instant, what: impl FnOnce() -> Traced) {
        let mut trace = self.trace.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = trace.as_mut() {
            t.push((at, what()));
        }
    }

    /// Locks the state; a poisoned lock (a panicked task) still yields the data.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Raises an event: sends it to every live subscriber of its name from the socket of the
    /// raising process, as `event_datagram` does (non-blocking `sendto`, loss is silent).
    /// Returns false when the datagram could not be sent at all (e.g. larger than UDP allows).
    pub fn raise(&self, state: &mut State, source: Source, event: &Event) -> bool {
        let now = Instant::now();
        self.traced(now, || Traced::Event(event.clone()));
        let name = event.name();
        // Dead subscribers are purged lazily, at the next raise of their event.
        state.subscriptions.retain(|s| s.event != name || s.is_live(now));
        let bytes = event.to_bytes();
        let socket = match source {
            Source::Mi => &self.event_sockets[0],
            Source::Sip => {
                let workers = self.event_sockets.len() - 1;
                let n = self.next_worker.fetch_add(1, Ordering::Relaxed) % workers;
                &self.event_sockets[1 + n]
            }
        };
        if self.events_lost.load(Ordering::Relaxed) {
            // Gone on the wire: OpenSIPS believes it sent them.
            self.events_failed.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        let mut ok = true;
        for sub in state.subscriptions.iter().filter(|s| s.event == name) {
            if bytes.len() > MAX_UDP_PAYLOAD {
                tracing::warn!(event = name, size = bytes.len(), "Cannot raise datagram event: Message too long");
                self.events_failed.fetch_add(1, Ordering::Relaxed);
                ok = false;
                continue;
            }
            match socket.send_to(&bytes, sub.addr) {
                Ok(_) => {
                    self.events_sent.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::debug!(event = name, to = %sub.addr, error = %e, "event datagram not sent");
                    self.events_failed.fetch_add(1, Ordering::Relaxed);
                    ok = bytes.len() <= MAX_UDP_PAYLOAD && ok;
                }
            }
        }
        ok
    }
}

/// A running simulated OpenSIPS. Dropping it stops the MI socket.
pub struct Sim {
    inner: Arc<Inner>,
    mi_addr: SocketAddr,
    mi_task: JoinHandle<()>,
}

impl Sim {
    /// Binds the MI socket and the per-process event sockets and starts serving.
    pub async fn start(config: SimConfig) -> io::Result<Sim> {
        let mi_socket = UdpSocket::bind(config.mi_listen).await?;
        let mi_addr = mi_socket.local_addr()?;
        let workers = config.sip_workers.max(1);
        let mut event_sockets = Vec::with_capacity(workers + 1);
        for _ in 0..=workers {
            let s = StdUdpSocket::bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
            s.set_nonblocking(true)?;
            event_sockets.push(s);
        }
        let seed = if config.seed == 0 { sip::unix_now() ^ u64::from(std::process::id()) << 20 } else { config.seed };
        let inner = Arc::new(Inner {
            config,
            trace: Mutex::new(None),
            events_lost: std::sync::atomic::AtomicBool::new(false),
            state: Mutex::new(State::new(seed)),
            event_sockets,
            next_worker: AtomicUsize::new(0),
            mi_requests: AtomicU64::new(0),
            mi_dropped: AtomicU64::new(0),
            events_sent: AtomicU64::new(0),
            events_failed: AtomicU64::new(0),
        });
        let mi_task = tokio::spawn(mi::serve(Arc::clone(&inner), mi_socket));
        tracing::info!(%mi_addr, "OpenSIPS simulator listening for MI datagrams");
        Ok(Sim { inner, mi_addr, mi_task })
    }

    /// The MI socket's address.
    pub fn mi_addr(&self) -> SocketAddr {
        self.mi_addr
    }

    /// The source addresses events are sent from (index 0: the MI process).
    pub fn event_source_addrs(&self) -> Vec<SocketAddr> {
        self.inner.event_sockets.iter().filter_map(|s| s.local_addr().ok()).collect()
    }

    /// Starts a proxied call (a SIP caller through OpenSIPS to a SIP callee) that behaves as
    /// `script` says. Returns its SIP Call-ID at once; events follow.
    pub fn proxied_call(&self, script: CallScript) -> String {
        scenario::start_proxied(&self.inner, script)
    }

    /// An INVITE arrives for a UA server session (`ua_session_server_init`). Returns the key,
    /// or None when the NEW event could not be raised (too large: OpenSIPS deletes the
    /// session and the caller gets 408).
    pub fn incoming_ua_call(&self, script: UasScript) -> Option<String> {
        scenario::start_uas(&self.inner, script)
    }

    /// The remote side of a UA session sends an in-dialog request (re-INVITE, INFO, BYE, CANCEL).
    pub fn ua_remote_request(&self, key: &str, request: RemoteRequest) -> Result<(), SimError> {
        scenario::remote_request(&self.inner, key, request)
    }

    /// How the SIP peer at `ruri` answers INVITEs from UA client sessions. Without an entry the
    /// user part decides: `busy` → [`UaPeer::Busy`], `nobody` → [`UaPeer::Unreachable`],
    /// `noanswer` → [`UaPeer::RingNoAnswer`], anything else → [`UaPeer::Answer`].
    pub fn set_ua_peer(&self, ruri: &str, peer: UaPeer) {
        self.inner.lock().ua_peers.insert(ruri.to_owned(), peer);
    }

    /// When silent, MI requests are read and dropped without a reply (an OpenSIPS that hangs).
    pub fn set_mi_silent(&self, silent: bool) {
        self.inner.lock().mi_silent = silent;
    }

    /// Simulates an OpenSIPS restart: subscriptions, dialogs and sessions are forgotten, and
    /// `uptime` starts again. Scripted calls of the old run stop.
    pub fn restart(&self) {
        let mut state = self.inner.lock();
        let generation = state.generation + 1;
        let ids = state.ids.clone();
        let peers = std::mem::take(&mut state.ua_peers);
        *state = State::new(0);
        state.ids = ids;
        state.generation = generation;
        state.ua_peers = peers;
        tracing::info!(generation, "OpenSIPS simulator restarted: subscriptions and calls forgotten");
    }

    /// Live subscriptions: (event, socket, seconds left).
    pub fn live_subscriptions(&self) -> Vec<(String, String, u64)> {
        let now = Instant::now();
        self.inner
            .lock()
            .subscriptions
            .iter()
            .filter(|s| s.is_live(now))
            .map(|s| (s.event.clone(), s.socket.clone(), s.ttl_secs(now)))
            .collect()
    }

    /// The state of the proxied call with this Call-ID, while OpenSIPS still has it.
    pub fn dialog_state(&self, callid: &str) -> Option<DlgState> {
        self.inner.lock().dialogs.get(callid).map(|d| d.state)
    }

    /// Whether a UA session with this key exists.
    pub fn has_ua_session(&self, key: &str) -> bool {
        self.inner.lock().sessions.contains_key(key)
    }

    /// Loses every event datagram from now on (`true`) or delivers them again (`false`), as
    /// a lossy network would: OpenSIPS goes on as if they were sent.
    pub fn set_events_lost(&self, lost: bool) {
        self.inner.events_lost.store(lost, Ordering::Relaxed);
    }

    /// Starts recording every MI request and raised event with its time (see [`Traced`]).
    pub fn start_trace(&self) {
        *self.inner.trace.lock().unwrap_or_else(|p| p.into_inner()) = Some(Vec::new());
    }

    /// What was recorded since [`Sim::start_trace`] (or the last take); recording goes on.
    pub fn take_trace(&self) -> Vec<(Instant, Traced)> {
        let mut trace = self.inner.trace.lock().unwrap_or_else(|p| p.into_inner());
        trace.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Counters.
    pub fn stats(&self) -> SimStats {
        SimStats {
            mi_requests: self.inner.mi_requests.load(Ordering::Relaxed),
            mi_dropped: self.inner.mi_dropped.load(Ordering::Relaxed),
            events_sent: self.inner.events_sent.load(Ordering::Relaxed),
            events_failed: self.inner.events_failed.load(Ordering::Relaxed),
        }
    }

    /// Stops serving MI (the socket is closed) and stops scripted calls.
    pub async fn stop(self) {
        self.mi_task.abort();
        while !self.mi_task.is_finished() {
            tokio::task::yield_now().await;
        }
        let mut state = self.inner.lock();
        state.generation += 1;
        state.subscriptions.clear();
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.mi_task.abort();
    }
}
