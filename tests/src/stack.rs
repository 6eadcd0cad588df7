//! A whole callbus on loopback for end-to-end tests: nats-server, the simulator as OpenSIPS,
//! the bridge, and the engine with its log in a temporary directory.

use std::time::{Duration, Instant};

use bytes::Bytes;
use callbus_bridge::{Bridge, BridgeConfig};
use callbus_engine::machines::Timeouts;
use callbus_engine::{Engine, EngineConfig};
use callbus_schemas::command::{CallNotification, CommandReply};
use futures::StreamExt;
use opensips_sim::{CallScript, Sim, SimConfig};
use serde_json::Value;

use crate::NatsServer;

/// The node name the stack uses.
pub const NODE: &str = "n1";

/// Short timeouts, so tests of timeouts run fast.
pub fn timeouts() -> Timeouts {
    Timeouts {
        reinvite_ms: 3_000,
        refer_ms: 600,
        transfer_answer_ms: 3_000,
        end_ms: 3_000,
        ring_ms: 5_000,
        offer_ms: 800,
        ack_ms: 1_000,
        reply_ms: 2_000,
    }
}

/// The call and command ids of an accepted command; panics otherwise.
pub fn accepted(reply: &CommandReply) -> (String, String) {
    match reply {
        CommandReply::Accepted { call_id, cmd_id, accepted: true } => (call_id.clone(), cmd_id.clone()),
        other => panic!("not accepted: {other:?}"),
    }
}

/// The error code of a refused command; panics otherwise.
pub fn refused(reply: &CommandReply) -> callbus_schemas::command::CommandErrorCode {
    match reply {
        CommandReply::Refused { error, .. } => error.code,
        other => panic!("not refused: {other:?}"),
    }
}

/// The `cmd_id` of every command in the log in `data`, in log order (a stopped engine's log).
pub fn logged_cmd_ids(data: &std::path::Path) -> Vec<String> {
    let log = callbus_engine::log::SledLog::open(data).expect("the log opens");
    callbus_engine::log::EventLog::records_from(&log, 1)
        .filter_map(Result::ok)
        .filter_map(|r| match r.input {
            callbus_engine::machines::Input::Command { cmd_id, .. } => Some(cmd_id),
            _ => None,
        })
        .collect()
}

/// Checks that every notification in the log in `data` is documented (`schemas::catalog`) and
/// that every record re-runs to the same state and effects
/// through today's machines, one record at a time (the engine's [`Replayer`]) and through
/// `callbus replay check` (chunks of a few records, so calls span chunks); returns how many
/// records there are.
///
/// [`Replayer`]: callbus_replay::Replayer
pub fn assert_log_replays(data: &std::path::Path) -> usize {
    let reader = callbus_replay::LogReader::open(data).expect("open log");
    let mut n = 0;
    let mut replayer = callbus_replay::Replayer::new(timeouts());
    let mut undocumented = Vec::new();
    for record in callbus_engine::log::EventLog::records_from(reader.log(), 1) {
        let record = record.expect("readable");
        undocumented.extend(undocumented_notifications(&record));
        let (after, effects) = replayer.recheck(&record);
        assert_eq!((&after, &effects), (&record.after, &record.effects), "record {} diverges", record.seq);
        n += 1;
    }
    assert!(undocumented.is_empty(), "notifications docs/subjects.md does not list: {undocumented:#?}");
    let options = callbus_replay::CheckOptions { timeouts: timeouts(), chunk: 7, ..Default::default() };
    let report = callbus_replay::check(&reader, &options, &|state, input, ctx| state.step(input, ctx));
    assert!(report.divergences.is_empty(), "replay check: {:#?}", report.divergences);
    assert!(report.unreadable.is_empty(), "replay check: {:?}", report.unreadable);
    assert_eq!(report.records, n as u64, "replay check sees every record");
    n
}

/// The notifications of `record` that docs/subjects.md does not list, or sends with fields it
/// does not list (`schemas::catalog`), in words.
pub fn undocumented_notifications(record: &callbus_engine::log::Record) -> Vec<String> {
    record
        .effects
        .iter()
        .filter_map(|effect| match effect {
            callbus_engine::machines::Effect::Notify { event, data, .. } => {
                callbus_schemas::catalog::check_notification(record.after.kind(), event, data)
                    .err()
                    .map(|e| format!("record {}: {e}", record.seq))
            }
            _ => None,
        })
        .collect()
}

/// `callbus up`'s wiring of an engine to `bridge` (started with the tap whose receiving end is
/// `events`): the bridge's events and MI, in-process.
pub fn local_node(bridge: &Bridge, events: tokio::sync::mpsc::Receiver<(u64, Bytes)>) -> callbus_engine::LocalNode {
    let mi = bridge.local_mi();
    let mi = callbus_engine::LocalMi::new(bridge.node(), move |command, params| {
        let mi = mi.clone();
        async move { mi.call(&command, params).await }
    });
    callbus_engine::LocalNode::new(events, mi)
}

/// The running parts.
pub struct Stack {
    /// The NATS server.
    pub nats: NatsServer,
    /// The simulated OpenSIPS.
    pub sim: Sim,
    /// The bridge.
    pub bridge: Option<Bridge>,
    /// The engine.
    pub engine: Option<Engine>,
    /// A NATS client for the test.
    pub client: async_nats::Client,
    /// Every call notification.
    pub notes: async_nats::Subscriber,
    /// The engine's data dir.
    pub data: tempfile::TempDir,
    /// `callbus up`'s wiring: the bridge hands its events and MI to the engine in-process.
    pub local: Option<callbus_engine::LocalNode>,
}

impl Stack {
    /// Starts everything and waits for the bridge's subscriptions.
    pub async fn start() -> Stack {
        Stack::start_with(SimConfig::default()).await
    }

    /// Starts everything with the simulator set up so (its `step` is always 3 ms); the bridge
    /// and the engine talk over NATS, as separate processes do.
    pub async fn start_with(sim_config: SimConfig) -> Stack {
        Stack::start_as(sim_config, false).await
    }

    /// Starts everything as `callbus up` runs it: the engine takes the bridge's events and MI
    /// in-process (apps still see the events on NATS).
    pub async fn start_up(sim_config: SimConfig) -> Stack {
        Stack::start_as(sim_config, true).await
    }

    async fn start_as(sim_config: SimConfig, up: bool) -> Stack {
        // Logs of the parts when a test is run with RUST_LOG set.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let nats = NatsServer::start();
        let client = async_nats::connect(nats.url()).await.expect("connect");
        let notes = client.subscribe("callbus.call.>").await.expect("sub");
        let sim = Sim::start(SimConfig { step: Duration::from_millis(3), ..sim_config }).await.expect("sim");
        let bridge_config = BridgeConfig {
            node: NODE.into(),
            mi: sim.mi_addr(),
            events_listen: "127.0.0.1:0".parse().expect("addr"),
            health_interval: Duration::from_millis(200),
            ..BridgeConfig::default()
        };
        let (tap, events) = tokio::sync::mpsc::channel(100_000);
        let bridge = Bridge::start_with_tap(bridge_config, client.clone(), up.then_some(tap)).await.expect("bridge");
        let local = up.then(|| local_node(&bridge, events));
        let data = tempfile::tempdir().expect("tmp");
        let mut stack = Stack { nats, sim, bridge: Some(bridge), engine: None, client, notes, data, local };
        stack.start_engine().await;
        let deadline = Instant::now() + Duration::from_secs(5);
        while stack.sim.live_subscriptions().len() < 4 {
            assert!(Instant::now() < deadline, "the bridge subscribes");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stack
    }

    /// Starts (or restarts) the engine on the same data dir.
    pub async fn start_engine(&mut self) {
        self.start_engine_with(|_| {}).await;
    }

    /// Starts (or restarts) the engine on the same data dir, its configuration changed by `tweak`.
    pub async fn start_engine_with(&mut self, tweak: impl FnOnce(&mut EngineConfig)) {
        if let Some(engine) = self.engine.take() {
            engine.shutdown().await;
        }
        let mut config = EngineConfig {
            data_dir: self.data.path().to_owned(),
            timeouts: timeouts(),
            nodes: vec![NODE.into()],
            mi_timeout: Duration::from_secs(3),
            // Many stacks run at once: each holds a small reserve (tests/tests/disk.rs tests it).
            disk_reserve: 8 << 20,
            ..EngineConfig::default()
        };
        tweak(&mut config);
        // An engine aborted a moment ago (a simulated crash) releases the log's file lock
        // when its task is dropped, as a killed process's lock goes with the process.
        let deadline = Instant::now() + Duration::from_secs(5);
        let engine = loop {
            match Engine::start_with_local(config.clone(), self.client.clone(), self.local.clone()).await {
                Ok(engine) => break engine,
                Err(e) if e.to_string().contains("in use") && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("engine: {e}"),
            }
        };
        self.engine = Some(engine);
        self.client.flush().await.expect("flush");
    }

    /// Sends a command and returns the engine's reply (the client every app uses; 5 s).
    pub async fn cmd(&self, verb: &str, body: Value) -> CommandReply {
        callbus_client::Client::new(self.client.clone())
            .with_timeout(Duration::from_secs(5))
            .request(verb, &body)
            .await
            .unwrap_or_else(|e| panic!("{verb}: {e}"))
    }

    /// Notifications until one matches `until` (included), or panics after 10 s.
    pub async fn notes_until(&mut self, until: impl Fn(&CallNotification) -> bool) -> Vec<CallNotification> {
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let msg = tokio::time::timeout(left, self.notes.next())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "notification not seen; got {:#?}",
                        out.iter().map(|n: &CallNotification| (&n.event, &n.call_id)).collect::<Vec<_>>()
                    )
                })
                .expect("open");
            let note: CallNotification = serde_json::from_slice(&msg.payload).expect("CallNotification");
            assert_eq!(msg.subject.as_str(), format!("callbus.call.{}.{}", note.call_id, note.event));
            let done = until(&note);
            out.push(note);
            if done {
                return out;
            }
        }
    }

    /// Places a proxied call and waits until it is confirmed: (call_id, sip_call_id).
    pub async fn confirmed_call(&mut self, script: CallScript) -> (String, String) {
        let sip = self.sim.proxied_call(script);
        let notes =
            self.notes_until(|n| n.event == "confirmed" && n.sip_call_id.as_deref() == Some(sip.as_str())).await;
        (notes.last().expect("note").call_id.clone(), sip)
    }

    /// Stops engine and bridge cleanly.
    pub async fn shutdown(&mut self) {
        if let Some(engine) = self.engine.take() {
            engine.shutdown().await;
        }
        if let Some(bridge) = self.bridge.take() {
            bridge.shutdown().await;
        }
    }
}
