//! The bridge between one OpenSIPS node and NATS. It knows OpenSIPS's wire formats and
//! nothing of calls.
//!
//! - Events out ([`events`]): event datagrams received on a UDP socket are published byte for
//!   byte on `opensips.<node>.event.<EVENT>` with headers for the node, the receive time and a
//!   per-bridge sequence (also the `Nats-Msg-Id`); anything else goes to `opensips.<node>.invalid`.
//! - MI in ([`mi`]): `opensips.<node>.mi.<command>` is served as NATS request/reply over one
//!   UDP socket with many requests in flight, allow-listed ([`allow`]).
//! - Subscriptions ([`subscriptions`]): kept alive in OpenSIPS, renewed, redone after a restart.
//! - Status: published on `opensips.<node>.status` every few seconds.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod allow;
pub mod events;
pub mod mi;
pub mod subscriptions;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::Subject;
use bytes::Bytes;
use callbus_schemas::bus::{BridgeCounters, BridgeErrorKind, BridgeStatus, MiBusReply};
use callbus_schemas::event::DEFAULT_EVENTS;
use callbus_schemas::subjects;
use futures::StreamExt;
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use allow::AllowList;
pub use mi::MiClient;

/// How the bridge is set up.
#[derive(Clone, Debug)]
pub struct BridgeConfig {
    /// The OpenSIPS node's name, a subject token.
    pub node: String,
    /// OpenSIPS's MI datagram socket.
    pub mi: SocketAddr,
    /// Where to receive event datagrams.
    pub events_listen: SocketAddr,
    /// The address OpenSIPS should send events to, when it differs from `events_listen`.
    pub events_advertise: Option<SocketAddr>,
    /// How long to wait for an MI reply.
    pub mi_timeout: Duration,
    /// Which MI commands the bus may run.
    pub mi_allow: AllowList,
    /// The events to subscribe to.
    pub events: Vec<String>,
    /// The expiry asked for each subscription (renewed at a third of it).
    pub subscribe_expire: Duration,
    /// How often OpenSIPS's uptime is checked (restart detection).
    pub health_interval: Duration,
    /// How often the status is published.
    pub status_interval: Duration,
    /// The most event datagrams kept while NATS is slow or down.
    pub buffer_capacity: usize,
    /// The most MI requests waiting for OpenSIPS at once.
    pub max_mi_in_flight: usize,
    /// How long a shutdown may spend publishing what is still buffered.
    pub drain_timeout: Duration,
    /// Also append each batch of events, in order, to `callbus.input.<node>` in JetStream and
    /// keep it until JetStream stored it: the input of the engines of a cluster (`engine
    /// --cluster`), which nothing is lost from while a stream changes leader.
    pub events_acked: bool,
}

impl Default for BridgeConfig {
    fn default() -> Self {
        BridgeConfig {
            node: "default".into(),
            mi: SocketAddr::from(([127, 0, 0, 1], 8080)),
            events_listen: SocketAddr::from(([127, 0, 0, 1], 8090)),
            events_advertise: None,
            mi_timeout: Duration::from_secs(5),
            mi_allow: AllowList::default(),
            events: DEFAULT_EVENTS.iter().map(|e| (*e).to_owned()).collect(),
            subscribe_expire: Duration::from_secs(60),
            health_interval: Duration::from_secs(1),
            status_interval: Duration::from_secs(5),
            buffer_capacity: 100_000,
            max_mi_in_flight: 4096,
            drain_timeout: Duration::from_secs(5),
            events_acked: false,
        }
    }
}

/// Why the bridge could not start.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// The node name or an event name cannot be used in a subject.
    #[error("bad bridge configuration: {0}")]
    Config(String),
    /// A socket could not be bound.
    #[error("cannot bind {what} at {addr}: {}", bind_reason(.error))]
    Bind {
        /// Which socket.
        what: &'static str,
        /// Where.
        addr: SocketAddr,
        /// The OS error (said in the message, not chained: it would be said twice).
        error: std::io::Error,
    },
    /// NATS refused the bridge's subscriptions.
    #[error("NATS: {0}")]
    Nats(String),
}

/// Why a socket could not be bound, in words, with what to do.
fn bind_reason(error: &std::io::Error) -> String {
    match error.kind() {
        std::io::ErrorKind::AddrInUse => {
            "the address is in use (another callbus, or another program, listens there): stop it or choose another address".into()
        }
        std::io::ErrorKind::AddrNotAvailable => "no interface of this machine has that address".into(),
        std::io::ErrorKind::PermissionDenied => "permission denied (ports below 1024 need privileges)".into(),
        _ => error.to_string(),
    }
}

/// Counters shared by the bridge's tasks.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub datagrams_in: AtomicU64,
    pub published: AtomicU64,
    pub invalid: AtomicU64,
    pub overflowed: AtomicU64,
    pub mi_requests: AtomicU64,
    pub mi_errors: AtomicU64,
    pub mi_timeouts: AtomicU64,
    pub mi_refused: AtomicU64,
    pub opensips_restarts: AtomicU64,
    pub batches: AtomicU64,
    pub last_datagram_us: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> BridgeCounters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BridgeCounters {
            datagrams_in: get(&self.datagrams_in),
            published: get(&self.published),
            invalid: get(&self.invalid),
            overflowed: get(&self.overflowed),
            mi_requests: get(&self.mi_requests),
            mi_errors: get(&self.mi_errors),
            mi_timeouts: get(&self.mi_timeouts),
            mi_refused: get(&self.mi_refused),
            opensips_restarts: get(&self.opensips_restarts),
            batches: get(&self.batches),
        }
    }
}

/// A running bridge.
pub struct Bridge {
    config: BridgeConfig,
    events_addr: SocketAddr,
    socket_name: String,
    mi: MiClient,
    counters: Arc<Counters>,
    buffer: Arc<events::Buffer>,
    health: Arc<Mutex<subscriptions::Health>>,
    cancel: CancellationToken,
    intake_cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    publisher: Option<JoinHandle<()>>,
    manager: Option<JoinHandle<()>>,
    /// The `callbus-bridge` NATS service.
    service: Option<callbus_service::Service>,
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Bridge {
    /// Binds the sockets, subscribes to NATS and starts every task.
    pub async fn start(config: BridgeConfig, client: async_nats::Client) -> Result<Bridge, BridgeError> {
        Bridge::start_with_tap(config, client, None).await
    }

    /// [`Bridge::start`], also handing every valid event datagram, as it arrives, to `tap`
    /// (an engine in this process): its sequence number and its bytes. A full tap drops the
    /// datagram for the tap only (counted, logged); NATS still gets it.
    pub async fn start_with_tap(
        config: BridgeConfig,
        client: async_nats::Client,
        tap: Option<tokio::sync::mpsc::Sender<(u64, Bytes)>>,
    ) -> Result<Bridge, BridgeError> {
        subjects::validate_token("node", &config.node).map_err(|e| BridgeError::Config(e.to_string()))?;
        for event in &config.events {
            subjects::validate_token("event name", event).map_err(|e| BridgeError::Config(e.to_string()))?;
        }
        let cancel = CancellationToken::new();
        let intake_cancel = cancel.child_token();
        let counters = Arc::new(Counters::default());
        let socket = events::bind(config.events_listen).map_err(|error| BridgeError::Bind {
            what: "the event listener",
            addr: config.events_listen,
            error,
        })?;
        let events_addr = socket.local_addr().map_err(|error| BridgeError::Bind {
            what: "the event listener",
            addr: config.events_listen,
            error,
        })?;
        let advertised = config.events_advertise.unwrap_or(events_addr);
        if advertised.ip().is_unspecified() {
            return Err(BridgeError::Config(format!(
                "events are received on {events_addr}, which OpenSIPS cannot send to: set --events-advertise to an address it can reach"
            )));
        }
        let socket_name = format!("udp:{advertised}");
        let mi = MiClient::start(
            config.mi,
            config.mi_timeout,
            config.max_mi_in_flight,
            client.clone(),
            Arc::clone(&counters),
            cancel.clone(),
        )
        .await
        .map_err(|error| BridgeError::Bind { what: "the MI client socket", addr: config.mi, error })?;

        let buffer = Arc::new(events::Buffer::new(config.buffer_capacity));
        let run_id = format!("{:x}", unix_ms());
        let stamp = events::Stamp {
            node: config.node.clone(),
            invalid_subject: Subject::from(
                subjects::invalid(&config.node).map_err(|e| BridgeError::Config(e.to_string()))?,
            ),
        };
        let mut tasks = Vec::new();
        tasks.push(tokio::spawn(events::receive(
            socket,
            stamp,
            Arc::clone(&buffer),
            tap,
            Arc::clone(&counters),
            intake_cancel.clone(),
        )));
        let publisher = tokio::spawn(events::publish(
            client.clone(),
            events::MsgIds { node: config.node.clone(), prefix: format!("{}.{run_id}.", config.node) },
            events::Publishing {
                barrier_subject: format!("_CALLBUS.bridge.{}.{run_id}.barrier", config.node),
                drain_for: config.drain_timeout,
                acked: config.events_acked,
            },
            Arc::clone(&buffer),
            Arc::clone(&counters),
            cancel.clone(),
        ));

        let mi_subject = subjects::all_mi(&config.node).map_err(|e| BridgeError::Config(e.to_string()))?;
        let requests = client
            .queue_subscribe(mi_subject.clone(), format!("callbus-bridge-{}", config.node))
            .await
            .map_err(|e| BridgeError::Nats(format!("cannot subscribe to {mi_subject}: {e}")))?;
        tasks.push(tokio::spawn(serve_mi(requests, mi.clone(), config.mi_allow.clone(), intake_cancel.clone())));

        let health = Arc::new(Mutex::new(subscriptions::Health::default()));
        let manager = subscriptions::Manager {
            mi: mi.clone(),
            socket: socket_name.clone(),
            expire: config.subscribe_expire,
            health_interval: config.health_interval,
            health: Arc::clone(&health),
            counters: Arc::clone(&counters),
        };
        let manager = tokio::spawn(manager.run(config.events.clone(), intake_cancel.clone()));

        let mut bridge = Bridge {
            config,
            events_addr,
            socket_name,
            mi,
            counters,
            buffer,
            health,
            cancel,
            intake_cancel,
            tasks,
            publisher: Some(publisher),
            manager: Some(manager),
            service: None,
        };
        let source = bridge.status_source();
        let data: callbus_service::StatsData = Arc::new(move |endpoint: &str| {
            (endpoint == "mi").then(|| serde_json::to_value(source.status()).ok()).flatten()
        });
        let service = callbus_service::Service::start_with_data(
            &client,
            bridge_service(&bridge.config.node, &mi_subject),
            Some(data),
        )
        .await
        .map_err(BridgeError::Nats)?;
        bridge.mi.count_in(service.clone());
        bridge.service = Some(service);
        let status_subject = subjects::status(&bridge.config.node).map_err(|e| BridgeError::Config(e.to_string()))?;
        let status_task =
            tokio::spawn(publish_status(bridge.status_source(), client, status_subject, bridge.cancel.clone()));
        bridge.tasks.push(status_task);
        tracing::info!(
            node = %bridge.config.node,
            mi = %bridge.config.mi,
            events = %bridge.events_addr,
            advertised = %bridge.socket_name,
            allow = %bridge.config.mi_allow,
            "bridge started"
        );
        Ok(bridge)
    }

    /// Where event datagrams are received.
    pub fn events_addr(&self) -> SocketAddr {
        self.events_addr
    }

    /// The OpenSIPS node this bridge serves.
    pub fn node(&self) -> &str {
        &self.config.node
    }

    /// The MI client (for in-process callers).
    pub fn mi(&self) -> &MiClient {
        &self.mi
    }

    /// MI for an engine in this process: the same allow-list, parameter checks and answers as
    /// `opensips.<node>.mi.<command>` on NATS, without the NATS hops.
    pub fn local_mi(&self) -> LocalMi {
        LocalMi { mi: self.mi.clone(), allow: self.config.mi_allow.clone() }
    }

    fn status_source(&self) -> StatusSource {
        StatusSource {
            node: self.config.node.clone(),
            mi: self.config.mi.to_string(),
            events_listen: self.events_addr.to_string(),
            socket_name: self.socket_name.clone(),
            expire: self.config.subscribe_expire,
            interval: self.config.status_interval,
            counters: Arc::clone(&self.counters),
            buffer: Arc::clone(&self.buffer),
            health: Arc::clone(&self.health),
        }
    }

    /// The bridge's status now.
    pub fn status(&self) -> BridgeStatus {
        self.status_source().status()
    }

    /// Stops taking new work, unsubscribes from OpenSIPS events, publishes what is buffered
    /// (for at most the drain timeout) and stops.
    pub async fn shutdown(mut self) {
        tracing::info!(node = %self.config.node, "bridge shutting down");
        if let Some(service) = self.service.take() {
            service.stop();
        }
        self.intake_cancel.cancel();
        if let Some(manager) = self.manager.take() {
            let _ = manager.await;
        }
        self.cancel.cancel();
        if let Some(publisher) = self.publisher.take() {
            let _ = publisher.await;
        }
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        tracing::info!(node = %self.config.node, "bridge stopped");
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Everything the status is made of.
struct StatusSource {
    node: String,
    mi: String,
    events_listen: String,
    socket_name: String,
    expire: Duration,
    interval: Duration,
    counters: Arc<Counters>,
    buffer: Arc<events::Buffer>,
    health: Arc<Mutex<subscriptions::Health>>,
}

impl StatusSource {
    fn status(&self) -> BridgeStatus {
        let health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let last = self.counters.last_datagram_us.load(Ordering::Relaxed);
        BridgeStatus {
            node: self.node.clone(),
            time_unix_ms: unix_ms(),
            mi: self.mi.clone(),
            events_listen: self.events_listen.clone(),
            opensips_reachable: health.reachable,
            opensips_up_since: health.up_since.clone(),
            subscriptions: health.subscriptions(&self.socket_name, self.expire),
            counters: self.counters.snapshot(),
            buffered: self.buffer.len() as u64,
            buffer_capacity: self.buffer.capacity() as u64,
            last_datagram_unix_ms: (last > 0).then_some(last / 1000),
        }
    }
}

async fn publish_status(source: StatusSource, client: async_nats::Client, subject: String, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(source.interval.max(Duration::from_millis(100)));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let body = serde_json::to_vec(&source.status()).unwrap_or_default();
        if let Err(e) = client.publish(subject.clone(), Bytes::from(body)).await {
            tracing::debug!(error = %e, "status not published");
        }
    }
}

/// A bridge's MI as an in-process engine uses it (see [`Bridge::local_mi`]).
#[derive(Clone)]
pub struct LocalMi {
    mi: MiClient,
    allow: AllowList,
}

impl LocalMi {
    /// Runs `command` with `params` (a JSON object or array; null for none) and answers as the
    /// bridge answers on NATS.
    pub async fn call(&self, command: &str, params: Value) -> MiBusReply {
        if !self.allow.allows(command) {
            let detail = format!(
                "{command} is not on this bridge's MI allow-list ({}); an operator can add it with --mi-allow=+{command}",
                self.allow
            );
            return MiBusReply::bridge_error(BridgeErrorKind::NotAllowed, detail);
        }
        match mi::params_from_value(params) {
            Ok(params) => self.mi.call(command, params).await,
            Err(reason) => MiBusReply::bridge_error(BridgeErrorKind::BadBody, format!("{command}: {reason}")),
        }
    }
}

/// The `callbus-bridge` NATS service of `node`: its MI endpoint (STATS `data`: the bridge's
/// status, as published on `opensips.<node>.status`).
fn bridge_service(node: &str, mi_subject: &str) -> callbus_service::Spec {
    let reply_schema = callbus_schemas::json_schema::all()
        .into_iter()
        .find(|(name, _)| *name == "bus_mi_reply")
        .map(|(_, schema)| serde_json::to_string(&schema).unwrap_or_default())
        .unwrap_or_default();
    callbus_service::Spec {
        name: "callbus-bridge".to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        description: "OpenSIPS MI over NATS, and its events on opensips.<node>.event.<name> (docs/bridge.md)"
            .to_owned(),
        metadata: [("node".to_owned(), node.to_owned())].into(),
        endpoints: vec![callbus_service::Endpoint {
            name: "mi".to_owned(),
            subject: mi_subject.to_owned(),
            queue_group: format!("callbus-bridge-{node}"),
            metadata: [
                (
                    "request".to_owned(),
                    "the params of the MI command the subject's last token names, as a JSON object, or an empty body"
                        .to_owned(),
                ),
                ("response_schema".to_owned(), reply_schema),
            ]
            .into(),
        }],
    }
}

/// Serves `opensips.<node>.mi.*` until cancelled.
async fn serve_mi(mut requests: async_nats::Subscriber, mi: MiClient, allow: AllowList, cancel: CancellationToken) {
    loop {
        let message = tokio::select! {
            _ = cancel.cancelled() => break,
            m = requests.next() => m,
        };
        let Some(message) = message else { break };
        let Some(reply) = message.reply.clone() else {
            tracing::warn!(subject = %message.subject, "MI request without a reply subject: use request/reply; ignored");
            continue;
        };
        let command = message.subject.rsplit('.').next().unwrap_or_default().to_owned();
        let responder = mi::Responder::Nats(reply, std::time::Instant::now());
        if !allow.allows(&command) {
            let detail = format!(
                "{command} is not on this bridge's MI allow-list ({allow}); an operator can add it with --mi-allow=+{command}"
            );
            mi.refuse(responder, &command, BridgeErrorKind::NotAllowed, detail).await;
            continue;
        }
        match mi::params_from_body(&message.payload) {
            Ok(params) => mi.send(&command, params, responder).await,
            Err(reason) => {
                mi.refuse(responder, &command, BridgeErrorKind::BadBody, format!("{command}: {reason}")).await
            }
        }
    }
    let _ = requests.unsubscribe().await;
}
