//! The engine's I/O around the core (`crate::core`): one owner task takes inputs from NATS
//! (OpenSIPS events, commands), from the MI requests it made and from the core's timeout,
//! hands each to the core, stages the records it makes, and after a whole batch commits the
//! store once (group commit) and only then carries out the rest: command replies,
//! notifications, MI requests. Nothing is acknowledged before it is durable.
//!
//! One task owns the core, so inputs are processed in one order, the order of the log.
//! Batches take whatever is waiting, up to [`MAX_BATCH`]: one commit (~0.1–0.3 ms here) then
//! covers hundreds of inputs under load and one input when idle.
//!
//! Tasks and queues: the owner reads OpenSIPS events from their NATS subscription itself
//! (events it has not taken yet wait there; with a bridge in the process, a task forwards them
//! instead, dropping the NATS copies of that bridge's events); commands come through the
//! owner's queue, bounded by `engine.input_queue` (a full queue refuses them as
//! "overloaded"); MI requests, reconciliations and snapshot saves run in one `JoinSet` the
//! owner reaps between batches and aborts and awaits when it stops (a few MI requests per
//! machine step, so bounded by the live calls); their answers come back on a queue of
//! [`ANSWERS`]; timers are the core's, one deadline ([`Core::poll_timeout`]) slept on in the
//! owner's loop.

mod forward;
mod mi;
mod retention;
mod supervise;

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::Subject;
use bytes::Bytes;
use callbus_schemas::bus::MiBusReply;
use callbus_schemas::command::{CommandError, CommandErrorCode, CommandReply};
use callbus_schemas::subjects::Verb;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::core::{Core, CoreInput, Now, Outputs, Reconciled, Restored};
use crate::log::disk::DiskGuard;
use crate::log::{EventLog, LogError};
use crate::store::Store;
use crate::EngineConfig;
use retention::{RetentionPlan, StepKind};

use forward::next_event;
pub(crate) use forward::{forward_commands, forward_commands_from, record_service, EventFeed};
pub(crate) use mi::{mi_request, reconcile_nodes, MiRoute};
pub(crate) use supervise::supervise;

/// How long a stop waits for NATS to take what was published (NATS may be gone: a stop must
/// still end).
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(2);
/// The most inputs handled before one commit.
pub const MAX_BATCH: usize = 1024;
/// How often the snapshots of the calls touched since are written.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// Answers from the owner's tasks waiting for it, at most.
const ANSWERS: usize = 4096;
/// Records a retention step looks at, at most (a few milliseconds of the owner's time).
const PRUNE_BUDGET: usize = 20_000;

/// Work for the owner task.
#[derive(Clone, Debug)]
pub(crate) enum Work {
    Event {
        /// The OpenSIPS node (shared: the events of one node name it alike).
        node: Arc<str>,
        bridge_seq: Option<u64>,
        payload: Bytes,
        /// Its sequence in the cluster's input stream (cluster mode).
        stream_seq: Option<u64>,
    },
    /// Cluster mode: every input-stream event up to this sequence that belongs to this
    /// partition has been handed over already (lets an idle partition's resume point advance).
    Position {
        stream_seq: u64,
    },
    Command {
        verb: Verb,
        payload: Bytes,
        reply: Option<Subject>,
        /// When the engine took it off NATS.
        received: Instant,
    },
    MiReply {
        request: String,
        reply: MiBusReply,
    },
    Reconciled(Reconciled),
    /// The core's timeout is due (made by the owner's loop, never queued).
    Timeout,
}

/// The engine's metric handles (looked up once; each update is an atomic operation).
struct EngineMetrics {
    inputs_event: metrics::Counter,
    inputs_command: metrics::Counter,
    inputs_mi_reply: metrics::Counter,
    log_appends: metrics::Counter,
    log_failures: metrics::Counter,
    flush_seconds: metrics::Histogram,
    batch_size: metrics::Histogram,
    /// The (kind, state) pairs of the last live-calls gauge update, to zero the ones gone.
    live_labels: HashSet<(&'static str, &'static str)>,
}

impl EngineMetrics {
    fn new() -> EngineMetrics {
        let input = |kind: &'static str| metrics::counter!("callbus_engine_inputs_total", "input" => kind);
        EngineMetrics {
            inputs_event: input("event"),
            inputs_command: input("command"),
            inputs_mi_reply: input("mi_reply"),
            log_appends: metrics::counter!("callbus_engine_log_appends_total"),
            log_failures: metrics::counter!("callbus_engine_log_failures_total"),
            flush_seconds: metrics::histogram!("callbus_engine_log_flush_duration_seconds"),
            batch_size: metrics::histogram!("callbus_engine_batch_size"),
            live_labels: Default::default(),
        }
    }
}

/// The owner task's state: the core, its store, and the I/O it carries out.
pub(crate) struct Owner<S: Store> {
    config: EngineConfig,
    core: Core,
    store: S,
    client: async_nats::Client,
    /// MI requests, reconciliations and snapshot saves in flight, owned here: reaped between
    /// batches, aborted and awaited when the owner stops.
    tasks: JoinSet<()>,
    /// What those tasks give back (MI answers, OpenSIPS's lists), for the next batch. Bounded
    /// by [`ANSWERS`]: a task whose answer finds the queue full waits for the owner to take some.
    answer_tx: mpsc::Sender<Work>,
    answers: mpsc::Receiver<Work>,
    last_checkpoint: Instant,
    /// When retention runs and where its scan goes.
    retention: RetentionPlan,
    metrics: EngineMetrics,
    /// Inputs to handle before the queue: a failed batch's, after the log works again.
    pending: VecDeque<Work>,
    /// Reconcile with OpenSIPS when the loop starts (the single engine's start).
    reconcile_at_start: bool,
    /// Where retention puts calls before removing them (`engine.archive_dir`).
    archive: Option<crate::log::archive::Archive>,
    /// Single engine: the free space of the data dir against the reserve (`log::disk`).
    pub(crate) disk: Option<DiskGuard>,
    /// The `callbus` NATS service whose stats count the commands answered here.
    pub(crate) service: Option<callbus_service::Service>,
    /// Single engine: OpenSIPS events from NATS, read here (not through the queue).
    pub(crate) events: Option<EventFeed>,
    /// The last batch's vector, empty, kept for the next (up to [`MAX_BATCH`] inputs: it is
    /// not grown from one again for every batch).
    batch_room: Vec<Work>,
}

/// Why the owner stopped before it was told to: the log failed. The inputs of the failed
/// batch that no one was answered for (events, MI replies), and the queue.
pub(crate) struct Stopped {
    pub error: LogError,
    pub pending: Vec<Work>,
    pub rx: mpsc::Receiver<Work>,
    /// The event feed, to read on while the log is down and to hand to the next owner.
    pub events: Option<EventFeed>,
}

/// The time now, on both of the engine's clocks.
fn now(config: &EngineConfig) -> Now {
    Now { at: Instant::now(), wall_ms: config.clock.now_ms() }
}

/// Rebuilds the core from `store`'s log: snapshots, kept `cmd_id`s and the tail.
pub(crate) fn recover<S: Store>(config: &EngineConfig, store: &S) -> Result<(Core, Restored), LogError> {
    let log = store.log();
    let from = log.checkpoint()? + 1;
    let (commands, snapshots) = (log.commands()?, log.snapshots()?);
    let core_config = config.core(store.placement());
    // A partition rebuilt from a snapshot alone has no record yet: its sequence goes on after
    // the checkpoint.
    let next_seq = log.next_seq().max(from);
    Ok(Core::restore(core_config, now(config), next_seq, commands, snapshots, log.records_from(from)))
}

impl<S: Store> Owner<S> {
    /// The owner of `core`, writing to `store`; with `reconcile_at_start`, it lists OpenSIPS's
    /// calls before anything else.
    pub(crate) fn new(
        config: EngineConfig,
        core: Core,
        store: S,
        client: async_nats::Client,
        reconcile_at_start: bool,
    ) -> Owner<S> {
        let archive = config.archive_dir.as_deref().and_then(|dir| match crate::log::archive::Archive::open(dir) {
            Ok(a) => Some(a),
            Err(e) => {
                tracing::error!(error = %e, "no archive: calls past the retention stay in the log until it works");
                None
            }
        });
        let (answer_tx, answers) = mpsc::channel(ANSWERS);
        let retention = RetentionPlan::new(config.retention, config.retention_bytes, Instant::now());
        Owner {
            retention,
            config,
            core,
            store,
            client,
            tasks: JoinSet::new(),
            answer_tx,
            answers,
            last_checkpoint: Instant::now(),
            metrics: EngineMetrics::new(),
            pending: VecDeque::new(),
            reconcile_at_start,
            archive,
            disk: None,
            service: None,
            events: None,
            batch_room: Vec::new(),
        }
    }

    /// The core (read-only: what recovery found).
    pub(crate) fn core(&self) -> &Core {
        &self.core
    }

    /// Lists OpenSIPS's calls on every node of interest, in the background; the core may close
    /// only the calls live now.
    fn reconcile(&mut self, periodic: bool) {
        let nodes = self.core.reconcile_nodes();
        if nodes.is_empty() {
            return;
        }
        let candidates = self.core.live_call_ids();
        tracing::debug!(nodes = nodes.len(), calls = candidates.len(), periodic, "reconciliation with OpenSIPS");
        let route = MiRoute::new(self.client.clone(), &self.config);
        let timeout = self.config.mi_timeout;
        let tx = self.answer_tx.clone();
        self.tasks.spawn(async move {
            for list in reconcile_nodes(route, nodes, candidates, timeout, periodic).await {
                let _ = tx.send(Work::Reconciled(list)).await;
            }
        });
    }

    /// Hands one input to the core (the input itself is kept until its batch is durable).
    fn handle(&mut self, work: &Work, out: &mut Outputs) -> Result<(), LogError> {
        let now = now(&self.config);
        let input = match work {
            Work::Event { node, bridge_seq, payload, stream_seq } => {
                self.metrics.inputs_event.increment(1);
                if let Some(s) = stream_seq {
                    self.store.consumed(*s);
                }
                CoreInput::Event { node: node.to_string(), bridge_seq: *bridge_seq, payload: payload.clone() }
            }
            Work::Position { stream_seq } => {
                self.store.consumed(*stream_seq);
                return Ok(());
            }
            Work::Command { verb, payload, reply, received } => {
                self.metrics.inputs_command.increment(1);
                CoreInput::Command {
                    verb: *verb,
                    payload: payload.clone(),
                    reply: reply.as_ref().map(|s| s.to_string()),
                    received: *received,
                }
            }
            Work::MiReply { request, reply } => {
                self.metrics.inputs_mi_reply.increment(1);
                CoreInput::MiReply { request: request.clone(), reply: reply.clone() }
            }
            Work::Reconciled(r) => CoreInput::Reconciled(r.clone()),
            Work::Timeout => return self.core.handle_timeout(now, out),
        };
        self.core.handle(input, now, out)
    }

    /// Stages what the core made of the inputs so far (records, learned keys).
    fn stage(&mut self, out: &mut Outputs, staged: &mut usize) -> Result<(), LogError> {
        for record in &mut out.records[*staged..] {
            self.store.stage(record)?;
            // The store has its own copy: freed now, the block is the next record's (a batch's
            // worth of them held to its end went through glibc's slow path every batch).
            record.bytes = Vec::new();
        }
        *staged = out.records.len();
        if !out.keys_learned.is_empty() || !out.keys_forgotten.is_empty() {
            self.store.keys(&out.keys_learned, &out.keys_forgotten);
            out.keys_learned.clear();
            out.keys_forgotten.clear();
        }
        Ok(())
    }

    /// Carries out a committed batch.
    async fn carry_out(&mut self, out: Outputs) {
        // OpenSIPS first: its requests are on the path of every call set-up step. Yielding once
        // lets them leave (their tasks run on this thread next) before the replies and
        // notifications are published.
        let to_opensips = !out.mi.is_empty();
        for request in out.mi {
            let route = MiRoute::new(self.client.clone(), &self.config);
            let timeout = self.config.mi_timeout;
            let tx = self.answer_tx.clone();
            self.tasks.spawn(async move {
                let reply = mi_request(&route, &request.node, &request.command, request.params, timeout).await;
                let _ = tx.send(Work::MiReply { request: request.request, reply }).await;
            });
        }
        if to_opensips {
            tokio::task::yield_now().await;
        }
        for (subject, body) in out.replies {
            if let Err(e) = self.client.publish(subject, body).await {
                tracing::warn!(error = %e, "command reply not published");
            }
        }
        for query in out.histories {
            let answer = match self.store.log().records_of_call(&query.call_id) {
                Ok(records) => {
                    let history: Vec<Value> = records
                        .iter()
                        .map(|r| json!({"seq": r.seq, "time_ms": r.time_ms, "input": r.input.label(), "state": r.after.name()}))
                        .collect();
                    CommandReply::Data {
                        cmd_id: query.cmd_id,
                        result: json!({"call": query.summary, "history": history}),
                    }
                }
                Err(e) => CommandReply::Refused {
                    cmd_id: Some(query.cmd_id),
                    error: CommandError::new(
                        CommandErrorCode::Unavailable,
                        format!("the call's history could not be read from the log: {e}"),
                    ),
                },
            };
            if let Err(e) = self.client.publish(query.reply, Bytes::from(answer.to_bytes())).await {
                tracing::warn!(error = %e, "command reply not published");
            }
        }
        for a in out.answered {
            metrics::counter!("callbus_engine_commands_total", "verb" => a.verb.as_str(), "outcome" => a.outcome)
                .increment(1);
            metrics::histogram!("callbus_engine_command_duration_seconds", "verb" => a.verb.as_str())
                .record(a.received.elapsed().as_secs_f64());
            record_service(self.service.as_ref(), a.verb, a.received, a.refused);
        }
        for (subject, body) in out.notifications {
            if let Err(e) = self.client.publish(subject, body).await {
                tracing::warn!(error = %e, "notification not published");
            }
        }
    }

    /// Stages a checkpoint if anything changed since the last one.
    fn checkpoint(&mut self) -> Result<bool, LogError> {
        if !self.core.checkpoint_due() {
            return Ok(false);
        }
        let checkpoint = self.core.checkpoint();
        self.store.stage_checkpoint(&checkpoint)?;
        self.last_checkpoint = Instant::now();
        Ok(true)
    }

    /// Sets the live-calls gauge: calls by kind and state (states no call is in read 0).
    fn gauge_live_calls(&mut self) {
        let counts = self.core.live_counts();
        for gone in self.metrics.live_labels.iter().filter(|l| !counts.contains_key(l)) {
            metrics::gauge!("callbus_engine_live_calls", "kind" => gone.0, "state" => gone.1).set(0.0);
        }
        for ((kind, state), n) in &counts {
            metrics::gauge!("callbus_engine_live_calls", "kind" => *kind, "state" => *state).set(*n as f64);
        }
        self.metrics.live_labels = counts.into_keys().collect();
    }

    /// The second's upkeep between batches: gauges, the disk reserve, retention, the
    /// checkpoint, an idle partition's position.
    async fn upkeep(&mut self) -> Result<(), (LogError, &'static str)> {
        self.gauge_live_calls();
        if self.store.commit_due() {
            if let Err(e) = self.store.commit().await {
                tracing::warn!(error = %e, "the partition's position was not logged");
                if matches!(e, LogError::Fenced { .. }) {
                    return Err((e, "the partition belongs to another worker now"));
                }
            }
        }
        // Nothing is staged under the disk reserve, a checkpoint neither.
        if let Err(low) = self.disk_check() {
            return Err((LogError::DiskLow(low), "the disk is under the reserve"));
        }
        // Retention: a step of at most PRUNE_BUDGET records, between batches.
        self.prune_step().await.map_err(|e| (e, "removing old calls from the log failed"))?;
        // Checkpoints are written between batches, so no input waits for one.
        if self.last_checkpoint.elapsed() >= CHECKPOINT_EVERY {
            let staged = self.checkpoint().map_err(|e| (e, "a checkpoint could not be staged"))?;
            if staged {
                self.store.commit().await.map_err(|e| (e, "a checkpoint was not committed"))?;
            }
        }
        // A partition's snapshot: everything logged so far is committed, so the core's state is
        // the log's; it is encoded and saved in the background.
        if self.store.snapshot_due(false) {
            if let Some(work) = self.store.snapshot(self.core.whole()) {
                self.tasks.spawn(work);
            }
        }
        Ok(())
    }

    /// Processes inputs until cancelled and the queue is empty.
    pub(crate) async fn run(mut self, mut rx: mpsc::Receiver<Work>, cancel: CancellationToken) -> Option<Stopped> {
        let mut events = self.events.take();
        let stopped = self.run_loop(&mut rx, &mut events, &cancel).await;
        // Every task is owned: MI requests and reconciliations in flight end here.
        self.tasks.shutdown().await;
        let _ = tokio::time::timeout(SHUTDOWN_FLUSH, self.client.flush()).await;
        stopped.map(|(error, mut pending)| {
            // Answers already in go to the owner that takes over from the log.
            while let Ok(answer) = self.answers.try_recv() {
                pending.push(answer);
            }
            Stopped { error, pending, rx, events }
        })
    }

    async fn run_loop(
        &mut self,
        rx: &mut mpsc::Receiver<Work>,
        events: &mut Option<EventFeed>,
        cancel: &CancellationToken,
    ) -> Option<(LogError, Vec<Work>)> {
        let mut upkeep = tokio::time::interval(Duration::from_secs(1));
        let every = self.config.reconcile_every.filter(|_| self.config.reconcile);
        let mut reconcile = tokio::time::interval(every.unwrap_or(Duration::from_secs(3600)));
        reconcile.tick().await; // the start-up reconciliation is the first
        if std::mem::take(&mut self.reconcile_at_start) && self.config.reconcile {
            self.reconcile(false);
        }
        // A node whose OpenSIPS restarted is reconciled at once (docs/engine.md, Reconciliation).
        let mut restarts = crate::restarts::RestartWatch::default();
        let mut statuses = match self.config.reconcile {
            true => self.client.subscribe(callbus_schemas::subjects::ALL_NODES_STATUS).await.ok(),
            false => None,
        };
        // The bridge in this process hands its node's events straight to this loop (to one
        // owner at a time: a restarted owner waits for the previous one to let go).
        let mut local: Option<LocalTap> = match self.config.local.as_ref() {
            Some(l) => tokio::select! {
                events = Arc::clone(&l.events).lock_owned() => Some((Arc::from(l.mi.node.as_str()), events)),
                _ = cancel.cancelled() => None,
            },
            None => None,
        };
        let timer = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(timer);
        loop {
            // Tasks that ended are reaped (their answers came through `answers`).
            while let Some(finished) = self.tasks.try_join_next() {
                if let Err(e) = finished {
                    if e.is_panic() {
                        tracing::error!(error = %e, "a task of the owner panicked");
                    }
                }
            }
            // One timer for the core's next deadline, reset only when that moves: a new timer
            // each time round would register anew (and wake the time driver) for every batch.
            let deadline = self.core.poll_timeout().unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            if timer.deadline() != deadline.into() {
                timer.as_mut().reset(deadline.into());
            }
            let first = if let Some(w) = self.pending.pop_front() {
                Some(w)
            } else {
                tokio::select! {
                    w = rx.recv() => w,
                    w = next_local(&mut local), if local.is_some() && !cancel.is_cancelled() => match w {
                        Some(w) => Some(w),
                        None => {
                            local = None; // the bridge stopped
                            continue;
                        }
                    },
                    w = next_event(events), if events.is_some() && !cancel.is_cancelled() => match w {
                        Some(w) => Some(w),
                        None => {
                            *events = None; // the connection closed for good
                            continue;
                        }
                    },
                    Some(answer) = self.answers.recv() => Some(answer),
                    _ = timer.as_mut() => Some(Work::Timeout),
                    _ = reconcile.tick(), if every.is_some() => {
                        self.reconcile(true);
                        continue;
                    }
                    status = next_status(&mut statuses), if statuses.is_some() => {
                        match status.map(|m| serde_json::from_slice::<callbus_schemas::bus::BridgeStatus>(&m.payload)) {
                            Some(Ok(status)) if restarts.restarted(&status) => {
                                tracing::warn!(node = %status.node, "OpenSIPS restarted or is back after a gap: reconciling live calls now");
                                self.reconcile(false);
                            }
                            Some(_) => {}
                            None => statuses = None,
                        }
                        continue;
                    }
                    _ = upkeep.tick() => {
                        if let Err((e, what)) = self.upkeep().await {
                            if let LogError::DiskLow(low) = e {
                                return Some(self.stop_for_disk(low, Vec::new()).await);
                            }
                            return Some(self.stop_between_batches(e, what));
                        }
                        continue;
                    }
                    _ = cancel.cancelled() => rx.try_recv().ok(),
                }
            };
            let Some(first) = first else { break };
            let mut batch = std::mem::take(&mut self.batch_room);
            batch.push(first);
            while batch.len() < MAX_BATCH {
                if let Some(w) = self.pending.pop_front() {
                    batch.push(w);
                    continue;
                }
                if let Ok(answer) = self.answers.try_recv() {
                    batch.push(answer);
                    continue;
                }
                match rx.try_recv() {
                    Ok(w) => batch.push(w),
                    // Once told to stop, no more events are taken (they wait in NATS).
                    Err(_) => match try_next_local(&mut local)
                        .or_else(|| events.as_mut().filter(|_| !cancel.is_cancelled())?.try_next())
                    {
                        Some(w) => batch.push(w),
                        None => break,
                    },
                }
            }
            if let Some(stopped) = self.batch(batch).await {
                return Some(stopped);
            }
        }
        // A clean stop leaves snapshots up to date, so the next start reads no tail (not
        // under the disk reserve: the tail is read instead).
        if let Err(low) = self.disk_check() {
            tracing::warn!(%low, "no final checkpoint: the next start reads the log's tail");
            return None;
        }
        match self.checkpoint() {
            Ok(_) => match self.store.commit().await {
                // A partition handed over leaves a snapshot, so its next owner reads no tail.
                Ok(()) if self.store.snapshot_due(true) => {
                    if let Some(work) = self.store.snapshot(self.core.whole()) {
                        work.await;
                    }
                }
                Ok(()) => {}
                Err(e) => tracing::warn!(error = %e, "final checkpoint not committed"),
            },
            Err(e) => tracing::warn!(error = %e, "final checkpoint not written"),
        }
        None
    }

    /// Handles a batch, commits it, and carries it out; `Some` when the log failed.
    async fn batch(&mut self, mut batch: Vec<Work>) -> Option<(LogError, Vec<Work>)> {
        // Under the disk reserve nothing is staged: sled must never meet a full disk.
        if let Err(low) = self.disk_check() {
            return Some(self.stop_for_disk(low, batch).await);
        }
        let mut out = Outputs::default();
        out.records.reserve(batch.len());
        out.notifications.reserve(batch.len());
        let mut staged = 0;
        let mut failed = None;
        let batch_len = batch.len();
        // The inputs stay in `batch` until it is durable: if the log fails, they are handled
        // again once it works (see the failure below).
        let mut handled = 0;
        while handled < batch.len() {
            let result = self.handle(&batch[handled], &mut out).and_then(|()| self.stage(&mut out, &mut staged));
            handled += 1;
            if let Err(e) = result {
                failed = Some(e);
                break;
            }
            // Cluster mode: a batch is one message of the replicated log; the rest waits.
            if self.store.full() {
                break;
            }
        }
        if failed.is_none() {
            for work in batch.drain(handled..).rev() {
                self.pending.push_front(work);
            }
        }
        // Under a load that never leaves the queue empty, a checkpoint rides along a batch.
        let mut with_checkpoint = false;
        if failed.is_none() && self.last_checkpoint.elapsed() >= 2 * CHECKPOINT_EVERY {
            match self.checkpoint() {
                Ok(staged) => with_checkpoint = staged,
                Err(e) => failed = Some(e),
            }
        }
        self.metrics.batch_size.record(batch_len as f64);
        let flush_started = Instant::now();
        let committed = match failed {
            None if out.records.is_empty() && !with_checkpoint => Ok(()),
            None => {
                let r = self.store.commit().await;
                self.metrics.flush_seconds.record(flush_started.elapsed().as_secs_f64());
                self.metrics.log_appends.increment(out.records.len() as u64);
                r
            }
            Some(e) => Err(e),
        };
        match committed {
            Ok(()) => {
                // Its room is kept for the next batch.
                batch.clear();
                self.batch_room = batch;
                self.carry_out(out).await;
                None
            }
            Err(e) => {
                self.metrics.log_failures.increment(1);
                // A full disk despite the reserve (another program filled it): releasing the
                // reserve file gives sled room for what it flushes when the log closes.
                let _ = self.disk_check();
                // Nothing of this batch is acknowledged: commands get an error, effects are not
                // carried out, and the apps can retry. The core went ahead of the log: the
                // engine stops here and starts again from the log.
                tracing::error!(error = %e, "the event log failed: this batch is not acknowledged");
                let error = CommandError::new(
                    CommandErrorCode::Unavailable,
                    format!("the engine could not log the command: {e}"),
                );
                // A fenced owner says nothing: the partition's new owner answers.
                let fenced = matches!(e, LogError::Fenced { .. });
                let answers = out.replies.into_iter().map(|(s, _)| s).chain(out.histories.into_iter().map(|h| h.reply));
                for subject in answers.filter(|_| !fenced) {
                    let body = CommandReply::Refused { cmd_id: None, error: error.clone() }.to_bytes();
                    let _ = self.client.publish(subject, Bytes::from(body)).await;
                }
                // The batch's inputs are handled again once the log works, before the rest;
                // commands were answered "unavailable" instead (the app retries them), and a
                // timeout is not kept (the core rebuilt from the log arms its timers again).
                let mut pending: Vec<Work> =
                    batch.drain(..).filter(|w| !matches!(w, Work::Command { .. } | Work::Timeout)).collect();
                pending.extend(self.pending.drain(..));
                Some((e, pending))
            }
        }
    }

    /// One step of retention (`engine.retention`, `engine.retention_bytes`; single engine),
    /// when the plan asks for one (see `retention`), then a commit.
    async fn prune_step(&mut self) -> Result<(), LogError> {
        if !self.store.local_upkeep() {
            return Ok(());
        }
        // An archive asked for and not there: nothing goes (it was said at start).
        if self.config.archive_dir.is_some() && self.archive.is_none() {
            return Ok(());
        }
        let Some(step) = self.retention.next(self.store.log().stored_bytes(), Instant::now()) else {
            return Ok(());
        };
        let (core, archive, log) = (&self.core, self.archive.as_ref(), self.store.log());
        let keep = |id: &str| core.knows(id);
        let did = match step.kind {
            StepKind::Free(over) => log.prune_to_free(step.from, over, keep, PRUNE_BUDGET, archive)?,
            StepKind::Age => {
                let cutoff = self.retention.cutoff_ms(self.config.clock.now_ms()).unwrap_or(0);
                log.prune(step.from, cutoff, keep, PRUNE_BUDGET, archive)?
            }
        };
        if let Some(over) = self.retention.done(step, &did, log.stored_bytes(), Instant::now()) {
            tracing::warn!(
                stored_bytes = over.stored_bytes,
                retention_bytes = over.limit,
                "the event log's records are over engine.retention_bytes and no other call in it may go yet: \
                 each is live, still in memory (engine.ended_retention) or after the last checkpoint; retention \
                 looks again in a minute. If this lasts, raise engine.retention_bytes"
            );
        }
        if did.records > 0 {
            self.store.commit().await?;
            metrics::counter!("callbus_engine_retention_removed_records_total").increment(did.records as u64);
            let why = match step.kind {
                StepKind::Free(_) => "the log is over engine.retention_bytes",
                StepKind::Age => "older than engine.retention",
            };
            tracing::info!(calls = did.calls, records = did.records, why, "calls removed from the log");
        }
        Ok(())
    }

    /// Stops after a write between batches (a checkpoint, retention) failed: it was rolled
    /// back, but the core went ahead of the log, so the engine starts again from the log, as
    /// after a failed batch; the queue is kept.
    fn stop_between_batches(&mut self, error: LogError, what: &str) -> (LogError, Vec<Work>) {
        self.metrics.log_failures.increment(1);
        tracing::error!(%error, "{what}");
        // A full disk despite the reserve: the reserve file is released for sled's last flush.
        let _ = self.disk_check();
        (error, self.pending.drain(..).collect())
    }

    /// Whether the single engine may stage writes now (see `log::disk`).
    fn disk_check(&self) -> Result<(), crate::log::disk::DiskLow> {
        match (&self.disk, self.store.local_upkeep()) {
            (Some(disk), true) => disk.check(),
            _ => Ok(()),
        }
    }

    /// Stops before staging anything because the disk is under the reserve: the commands of
    /// `batch` are refused (the apps retry them), its other inputs are kept with the queue.
    async fn stop_for_disk(&mut self, low: crate::log::disk::DiskLow, batch: Vec<Work>) -> (LogError, Vec<Work>) {
        let error = LogError::DiskLow(low);
        let refusal = supervise::log_down_refusal(&error);
        let mut pending = Vec::with_capacity(batch.len() + self.pending.len());
        for work in batch {
            match work {
                Work::Command { verb, payload, reply, received } => {
                    supervise::refuse(&self.client, self.service.as_ref(), &refusal, verb, &payload, reply, received)
                        .await
                }
                Work::Timeout => {}
                other => pending.push(other),
            }
        }
        pending.extend(self.pending.drain(..));
        (error, pending)
    }
}

/// The node of the bridge in this process, and its tap.
type LocalTap = (Arc<str>, tokio::sync::OwnedMutexGuard<mpsc::Receiver<(u64, Bytes)>>);

fn local_work(node: &Arc<str>, (seq, payload): (u64, Bytes)) -> Work {
    Work::Event { node: Arc::clone(node), bridge_seq: Some(seq), payload, stream_seq: None }
}

/// The next bridge status; None when the subscription ended.
async fn next_status(statuses: &mut Option<async_nats::Subscriber>) -> Option<async_nats::Message> {
    futures::StreamExt::next(statuses.as_mut()?).await
}

/// The next datagram from the tap as work; None when the bridge is gone.
async fn next_local(local: &mut Option<LocalTap>) -> Option<Work> {
    let (node, events) = local.as_mut()?;
    events.recv().await.map(|d| local_work(node, d))
}

/// A datagram already waiting in the tap, as work.
fn try_next_local(local: &mut Option<LocalTap>) -> Option<Work> {
    let (node, events) = local.as_mut()?;
    events.try_recv().ok().map(|d| local_work(node, d))
}
