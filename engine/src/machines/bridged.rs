//! Kind `Bridged`: click-to-dial by third-party call control (RFC 3725) over two UA client
//! sessions. callbus calls the caller, then the callee, and hands each phone the other's SDP;
//! the phones then talk directly.
//!
//! The flow (RFC 3725 §5, flow III), every leg started with flag `d` so that callbus, not
//! OpenSIPS, sends each ACK and can put an SDP in it:
//! 1. INVITE the caller without SDP; its 200 carries its offer O1;
//! 2. ACK the caller at once with a placeholder answer to O1 (same streams, connection
//!    0.0.0.0, `inactive`): the caller now waits in silence, for as long as the callee rings;
//! 3. INVITE the callee without SDP; its 200 carries its offer O2 (the ACK is owed);
//! 4. re-INVITE the caller with O2; its 200 carries the answer A2;
//! 5. ACK the caller, and ACK the callee with A2. Media flows directly.
//!
//! Why not RFC 3725 flow I (INVITE the callee with O1, ACK the caller with its answer)? That
//! holds the caller's 200 un-ACKed while the callee rings; the caller's phone gives up after
//! 64·T1 = 32 s and hangs up, and people let phones ring longer than that. Flow III costs one
//! re-INVITE of the caller, which phones answer at once.
//!
//! Every SDP callbus sends a leg carries callbus's own origin (`o=`) towards that leg with
//! its version raised each time (RFC 3264 §8), whichever phone the media description came from.
//! Hold and unhold re-INVITE both legs with the other's SDP set to `inactive` or `sendrecv`.
//! A blind transfer calls the destination the same way, and once it answers, drops the leg it
//! replaces and reconnects the staying leg with it (steps 3–5). A failure on one leg ends the
//! other cleanly; every step, failure and who hung up is notified.

use callbus_schemas::mi_call::{ClientStart, MiCall, SessionKey, SessionUpdate, SipPayload};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use callbus_schemas::bus::MiBusReply;
use callbus_schemas::command::{Command, CommandError, LegName};
use callbus_schemas::event::{Event, UaEventType, UaSession};

use super::sdp::{self, Origin};
use super::ua::{failed, failure_cause, mi_error_text, notify, succeeded, ua_event, wrong_state, UaEnd};
use super::{command_verb, Ctx, Effect, Input};
use callbus_schemas::notes::{BridgedNote, Connected, Detail, LegReply, LegSession, Ringing};

/// Where one leg is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LegStatus {
    /// Not called yet.
    Idle,
    /// `ua_session_client_start` sent.
    Dialing,
    /// INVITE sent (key known).
    Calling,
    /// 1xx received.
    Ringing,
    /// 2xx received, our ACK owed.
    Answered,
    /// ACKed.
    Up,
    /// Over.
    Gone,
}

/// What a re-INVITE of a leg is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reinvite {
    /// Giving it the new peer's offer (set-up or transfer).
    Connect,
    /// Hold (`inactive`).
    Hold,
    /// Unhold (`sendrecv`).
    Unhold,
}

/// One UA client session of the call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BLeg {
    /// The party's URI.
    pub uri: String,
    /// The b2b key, once known.
    pub key: Option<String>,
    /// Where it is.
    pub status: LegStatus,
    /// The last SDP it sent.
    pub remote_sdp: Option<String>,
    /// callbus's origin towards it.
    pub origin: Origin,
    /// A re-INVITE in flight.
    pub reinvite: Option<Reinvite>,
    /// Its hold re-INVITE was refused.
    pub hold_failed: bool,
}

impl BLeg {
    fn new(uri: &str, session: u64) -> BLeg {
        BLeg {
            uri: uri.to_owned(),
            key: None,
            status: LegStatus::Idle,
            remote_sdp: None,
            origin: Origin { session, version: 0 },
            reinvite: None,
            hold_failed: false,
        }
    }

    fn live(&self) -> bool {
        !matches!(self.status, LegStatus::Idle | LegStatus::Gone)
    }
}

/// Which leg: the caller's slot, the callee's slot, or a transfer's new leg.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Slot {
    /// Legs\[0\].
    Caller,
    /// Legs\[1\].
    Callee,
    /// The transfer destination, while it rings.
    New,
}

impl Slot {
    fn name(self) -> &'static str {
        match self {
            Slot::Caller => "caller",
            Slot::Callee => "callee",
            Slot::New => "transfer_target",
        }
    }

    fn other(self) -> Slot {
        match self {
            Slot::Caller => Slot::Callee,
            _ => Slot::Caller,
        }
    }
}

/// What an MI request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BRequest {
    /// `ua_session_client_start`.
    Start,
    /// `ua_session_update` ACK.
    Ack,
    /// `ua_session_update` INVITE.
    Reinvite,
    /// `ua_session_terminate`.
    Terminate,
}

/// An MI request in flight.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BPending {
    /// Its id.
    pub request: String,
    /// For which leg.
    pub slot: Slot,
    /// What it does.
    pub what: BRequest,
}

/// The call's main state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BPhase {
    /// Reaching the caller.
    CallingCaller,
    /// The caller waits (silent); reaching the callee.
    CallingCallee,
    /// The callee answered; the caller is being re-INVITEd with its offer.
    Connecting,
    /// The two talk.
    Connected,
    /// Over.
    Ended,
}

/// A hold or unhold in progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BHoldOp {
    /// The command.
    pub cmd_id: String,
    /// Hold (true) or unhold.
    pub hold: bool,
}

/// A blind transfer in progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BTransfer {
    /// The command.
    pub cmd_id: String,
    /// The leg that stays.
    pub staying: Slot,
    /// The new party.
    pub destination: String,
}

/// A click-to-dial call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BridgedState {
    /// The OpenSIPS node.
    pub node: String,
    /// The From the legs show, if the app chose one.
    pub from: Option<String>,
    /// Caller's and callee's legs.
    pub legs: [BLeg; 2],
    /// A transfer's new leg, while it rings.
    pub new_leg: Option<BLeg>,
    /// The main state.
    pub phase: BPhase,
    /// The `call.start` command, until the two are connected.
    pub start_cmd: Option<String>,
    /// MI requests in flight.
    pub requests: Vec<BPending>,
    /// Both legs are on hold.
    pub held: bool,
    /// A hold or unhold in progress.
    pub hold_op: Option<BHoldOp>,
    /// A transfer in progress.
    pub transfer: Option<BTransfer>,
    /// An end command in progress.
    pub ending_cmd: Option<String>,
    /// How it ended.
    pub end: Option<UaEnd>,
}

const FLAGS: &str = "rhbad";

fn ring_timer(slot: Slot) -> String {
    format!("ring.{}", slot.name())
}

fn reinvite_timer(slot: Slot) -> String {
    format!("reinvite.{}", slot.name())
}

impl BridgedState {
    /// A click-to-dial call about to start on `node`.
    pub fn new(node: &str) -> BridgedState {
        BridgedState {
            node: node.to_owned(),
            from: None,
            legs: [BLeg::new("", 0), BLeg::new("", 0)],
            new_leg: None,
            phase: BPhase::CallingCaller,
            start_cmd: None,
            requests: Vec::new(),
            held: false,
            hold_op: None,
            transfer: None,
            ending_cmd: None,
            end: None,
        }
    }

    /// The state's name.
    pub fn state_name(&self) -> &'static str {
        match self.phase {
            BPhase::Ended => "ended",
            _ if self.ending_cmd.is_some() => "ending",
            BPhase::CallingCaller => "calling_caller",
            BPhase::CallingCallee => "calling_callee",
            BPhase::Connecting => "connecting",
            BPhase::Connected if self.held => "held",
            BPhase::Connected => "connected",
        }
    }

    /// Whether the call is over.
    pub fn is_ended(&self) -> bool {
        self.phase == BPhase::Ended
    }

    /// The b2b keys of its legs (for finding the call from `E_UA_SESSION`).
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.legs.iter().chain(self.new_leg.iter()).filter_map(|l| l.key.as_deref())
    }

    /// What `call.get` shows besides the common fields.
    pub fn summary(&self) -> Value {
        let leg = |l: &BLeg| json!({"uri": l.uri, "key": l.key, "status": l.status});
        json!({
            "caller": leg(&self.legs[0]), "callee": leg(&self.legs[1]),
            "transfer_target": self.new_leg.as_ref().map(leg),
            "held": self.held, "end": self.end,
        })
    }

    fn leg(&self, slot: Slot) -> Option<&BLeg> {
        match slot {
            Slot::Caller => Some(&self.legs[0]),
            Slot::Callee => Some(&self.legs[1]),
            Slot::New => self.new_leg.as_ref(),
        }
    }

    fn leg_mut(&mut self, slot: Slot) -> Option<&mut BLeg> {
        match slot {
            Slot::Caller => Some(&mut self.legs[0]),
            Slot::Callee => Some(&mut self.legs[1]),
            Slot::New => self.new_leg.as_mut(),
        }
    }

    fn slot_of_key(&self, key: &str) -> Option<Slot> {
        [Slot::Caller, Slot::Callee, Slot::New]
            .into_iter()
            .find(|s| self.leg(*s).is_some_and(|l| l.key.as_deref() == Some(key)))
    }

    /// Checks a command against the state; nothing changes.
    pub fn check(&self, command: &Command) -> Result<(), CommandError> {
        let state = self.state_name();
        if self.phase == BPhase::Ended {
            let why = self.end.as_ref().map(|e| e.reason.as_str()).unwrap_or("ended");
            return Err(wrong_state(state, format!("the call has ended ({why})")));
        }
        let connected = || {
            if self.phase == BPhase::Connected && self.ending_cmd.is_none() {
                Ok(())
            } else {
                Err(wrong_state(state, format!("the call is {state}: the two parties are not connected")))
            }
        };
        let busy = || {
            if self.hold_op.is_some() || self.transfer.is_some() {
                Err(wrong_state(state, "a hold, unhold or transfer is in progress"))
            } else {
                Ok(())
            }
        };
        match command {
            Command::Start { .. } | Command::Get { .. } | Command::List { .. } => Ok(()),
            Command::End { .. } | Command::UaTerminate { .. } if self.ending_cmd.is_some() => {
                Err(wrong_state(state, "the call is already being ended"))
            }
            Command::End { .. } | Command::UaTerminate { .. } => Ok(()),
            Command::Hold { .. } => {
                connected()?;
                busy()?;
                if self.held {
                    return Err(wrong_state(state, "the call is already on hold"));
                }
                Ok(())
            }
            Command::Unhold { .. } => {
                connected()?;
                busy()?;
                if !self.held {
                    return Err(wrong_state(state, "the call is not on hold"));
                }
                Ok(())
            }
            Command::TransferBlind { .. } => {
                connected()?;
                busy()?;
                if self.held {
                    return Err(wrong_state(state, "take the call off hold before transferring it"));
                }
                Ok(())
            }
            other => Err(wrong_state(state, format!("{} does not apply to a click-to-dial call", command_verb(other)))),
        }
    }

    /// One step: the next state and the effects; an event input's datagram parsed as `parsed`
    /// when given (see [`super::CallState::step_parsed`]).
    pub fn step(&self, input: &Input, parsed: Option<&Event>, ctx: &Ctx) -> (BridgedState, Vec<Effect>) {
        let mut next = self.clone();
        let mut effects = Vec::new();
        let mut n = 0;
        match input {
            Input::Event { .. } => {
                if let Some(e) = ua_event(input, parsed) {
                    next.on_event(&e, ctx, &mut n, &mut effects);
                }
            }
            Input::Command { cmd_id, command } => next.on_command(cmd_id, command, ctx, &mut n, &mut effects),
            Input::MiReply { request, reply } => next.on_mi_reply(request, reply, ctx, &mut n, &mut effects),
            Input::Timer { name } => next.on_timer(name, ctx, &mut n, &mut effects),
            Input::Reconcile { opensips_state } => {
                if opensips_state.is_none() && next.phase != BPhase::Ended {
                    next.fail("opensips", "gone_while_away", None, ctx, &mut n, &mut effects);
                }
            }
        }
        (next, effects)
    }

    #[allow(clippy::too_many_arguments)]
    fn mi(&mut self, ctx: &Ctx, n: &mut usize, slot: Slot, what: BRequest, call: MiCall, effects: &mut Vec<Effect>) {
        let request = ctx.request_id(*n);
        *n += 1;
        effects.push(Effect::mi(request.clone(), self.node.clone(), call));
        self.requests.push(BPending { request, slot, what });
    }

    fn key_of(&self, slot: Slot) -> Option<String> {
        self.leg(slot).and_then(|l| l.key.clone())
    }

    fn terminate_call(&self, slot: Slot) -> MiCall {
        MiCall::UaSessionTerminate(SessionKey { key: self.key_of(slot) })
    }

    /// Calls `slot`'s party (its leg must be set).
    fn dial(&mut self, slot: Slot, from: &str, ctx: &Ctx, n: &mut usize, effects: &mut Vec<Effect>) {
        let Some(leg) = self.leg_mut(slot) else { return };
        leg.status = LegStatus::Dialing;
        let uri = leg.uri.clone();
        let call = MiCall::UaSessionClientStart(ClientStart {
            ruri: uri.clone(),
            to: uri.clone(),
            from: from.to_owned(),
            proxy: None,
            payload: SipPayload::default(),
            flags: FLAGS.to_owned(),
        });
        self.mi(ctx, n, slot, BRequest::Start, call, effects);
        effects.push(Effect::StartTimer { name: ring_timer(slot).into(), after_ms: ctx.timeouts.ring_ms });
        let note = BridgedNote::Dialing { leg: slot.name().to_owned(), uri: uri.to_owned() };
        notify(effects, self.start_or_transfer_cmd(slot), note);
    }

    fn start_or_transfer_cmd(&self, slot: Slot) -> Option<&str> {
        match slot {
            Slot::New => self.transfer.as_ref().map(|t| t.cmd_id.as_str()),
            _ => self.start_cmd.as_deref(),
        }
    }

    fn update(
        &mut self,
        slot: Slot,
        what: BRequest,
        body: Option<String>,
        ctx: &Ctx,
        n: &mut usize,
        effects: &mut Vec<Effect>,
    ) {
        let payload = match body {
            Some(body) => SipPayload {
                body: Some(body),
                content_type: Some("Content-Type: application/sdp\r\n".into()),
                extra_headers: None,
            },
            None => SipPayload::default(),
        };
        let method = if what == BRequest::Ack { "ACK" } else { "INVITE" };
        let call = MiCall::UaSessionUpdate(SessionUpdate { key: self.key_of(slot), method: method.into(), payload });
        self.mi(ctx, n, slot, what, call, effects);
    }

    fn terminate_leg(&mut self, slot: Slot, ctx: &Ctx, n: &mut usize, effects: &mut Vec<Effect>) {
        let Some(leg) = self.leg_mut(slot) else { return };
        if !leg.live() {
            return;
        }
        let had_key = leg.key.is_some();
        leg.status = LegStatus::Gone;
        effects.push(Effect::CancelTimer { name: ring_timer(slot).into() });
        effects.push(Effect::CancelTimer { name: reinvite_timer(slot).into() });
        if had_key {
            let call = self.terminate_call(slot);
            self.mi(ctx, n, slot, BRequest::Terminate, call, effects);
        }
        // Without a key the start reply is still to come: it is terminated when it does.
    }

    /// Ends the call: terminates what still lives, reports, fails what was pending.
    fn fail(
        &mut self,
        by: &str,
        reason: &str,
        status: Option<i64>,
        ctx: &Ctx,
        n: &mut usize,
        effects: &mut Vec<Effect>,
    ) {
        for slot in [Slot::Caller, Slot::Callee, Slot::New] {
            self.terminate_leg(slot, ctx, n, effects);
        }
        self.finish(by, reason, status, effects);
    }

    fn finish(&mut self, by: &str, reason: &str, status: Option<i64>, effects: &mut Vec<Effect>) {
        self.phase = BPhase::Ended;
        for slot in [Slot::Caller, Slot::Callee, Slot::New] {
            effects.push(Effect::CancelTimer { name: ring_timer(slot).into() });
            effects.push(Effect::CancelTimer { name: reinvite_timer(slot).into() });
        }
        effects.push(Effect::CancelTimer { name: super::ua::MAX_TIMER.into() });
        notify(effects, None, BridgedNote::Ended { by: by.to_owned(), reason: reason.to_owned(), status });
        if let Some(cmd) = self.start_cmd.take() {
            failed(effects, Some(&cmd), "call.start", reason);
        }
        if let Some(op) = self.hold_op.take() {
            failed(effects, Some(&op.cmd_id), if op.hold { "call.hold" } else { "call.unhold" }, "the call ended");
        }
        if let Some(t) = self.transfer.take() {
            failed(effects, Some(&t.cmd_id), "call.transfer.blind", "the call ended");
        }
        if let Some(cmd) = self.ending_cmd.take() {
            succeeded(effects, Some(&cmd), "call.end", Detail { reason: Some(reason.to_owned()), ..Detail::default() });
        }
        self.end = Some(UaEnd { by: by.into(), reason: reason.into(), status });
    }

    fn on_command(&mut self, cmd_id: &str, command: &Command, ctx: &Ctx, n: &mut usize, effects: &mut Vec<Effect>) {
        if self.check(command).is_err() {
            return;
        }
        match command {
            Command::Start { caller, callee, from, max_duration_s, .. } => {
                if self.start_cmd.is_some() || self.legs[0].status != LegStatus::Idle {
                    return;
                }
                // The session id of callbus's SDP origin: the start time, the same on replay.
                self.legs = [BLeg::new(caller, ctx.now_ms), BLeg::new(callee, ctx.now_ms + 1)];
                self.from = from.clone();
                self.start_cmd = Some(cmd_id.to_owned());
                if let Some(max) = max_duration_s {
                    effects.push(Effect::StartTimer { name: super::ua::MAX_TIMER.into(), after_ms: max * 1000 });
                }
                let shown = from.clone().unwrap_or_else(|| callee.clone());
                self.dial(Slot::Caller, &shown, ctx, n, effects);
            }
            Command::End { .. } | Command::UaTerminate { .. } => {
                self.ending_cmd = Some(cmd_id.to_owned());
                notify(effects, Some(cmd_id), BridgedNote::Ending { by: "local".to_owned() });
                for slot in [Slot::Caller, Slot::Callee, Slot::New] {
                    self.terminate_leg(slot, ctx, n, effects);
                }
                self.maybe_finished_ending(effects);
            }
            Command::Hold { .. } | Command::Unhold { .. } => {
                let hold = matches!(command, Command::Hold { .. });
                self.hold_op = Some(BHoldOp { cmd_id: cmd_id.to_owned(), hold });
                let direction = if hold { "inactive" } else { "sendrecv" };
                for slot in [Slot::Caller, Slot::Callee] {
                    let peer_sdp = self.leg(slot.other()).and_then(|l| l.remote_sdp.clone()).unwrap_or_default();
                    let Some(leg) = self.leg_mut(slot) else { continue };
                    let origin = leg.origin.bump();
                    leg.reinvite = Some(if hold { Reinvite::Hold } else { Reinvite::Unhold });
                    leg.hold_failed = false;
                    let body = sdp::with_direction(&sdp::with_origin(&peer_sdp, origin), direction);
                    self.update(slot, BRequest::Reinvite, Some(body), ctx, n, effects);
                    effects.push(Effect::StartTimer {
                        name: reinvite_timer(slot).into(),
                        after_ms: ctx.timeouts.reinvite_ms,
                    });
                }
                let note = if hold { BridgedNote::HoldRequested {} } else { BridgedNote::UnholdRequested {} };
                notify(effects, Some(cmd_id), note);
            }
            Command::TransferBlind { leg, destination, .. } => {
                let staying = if *leg == LegName::Caller { Slot::Caller } else { Slot::Callee };
                self.transfer =
                    Some(BTransfer { cmd_id: cmd_id.to_owned(), staying, destination: destination.clone() });
                self.new_leg = Some(BLeg::new(destination, ctx.now_ms));
                let note = BridgedNote::TransferRequested {
                    staying: staying.name().to_owned(),
                    replaced: staying.other().name().to_owned(),
                    destination: destination.clone(),
                };
                notify(effects, Some(cmd_id), note);
                let shown = self.legs[if staying == Slot::Caller { 0 } else { 1 }].uri.clone();
                self.dial(Slot::New, &shown, ctx, n, effects);
            }
            _ => {}
        }
    }

    fn maybe_finished_ending(&mut self, effects: &mut Vec<Effect>) {
        let terminating = self.requests.iter().any(|r| r.what == BRequest::Terminate);
        let unkeyed = self.requests.iter().any(|r| r.what == BRequest::Start);
        if self.ending_cmd.is_some() && !terminating && !unkeyed && self.phase != BPhase::Ended {
            self.finish("local", "hung_up", None, effects);
        }
    }

    fn on_mi_reply(&mut self, request: &str, reply: &MiBusReply, ctx: &Ctx, n: &mut usize, effects: &mut Vec<Effect>) {
        let Some(pos) = self.requests.iter().position(|r| r.request == request) else { return };
        let BPending { slot, what, .. } = self.requests.remove(pos);
        let error = mi_error_text(reply);
        match what {
            BRequest::Start => {
                let key = match (&error, reply) {
                    (None, MiBusReply::Result { result: Value::String(key) }) => Some(key.clone()),
                    _ => None,
                };
                let gone = self.leg(slot).is_none_or(|l| l.status == LegStatus::Gone) || self.phase == BPhase::Ended;
                match key {
                    Some(key) if gone => {
                        // Ended meanwhile: the session OpenSIPS made must not linger.
                        if let Some(leg) = self.leg_mut(slot) {
                            leg.key = Some(key);
                        }
                        let call = self.terminate_call(slot);
                        self.mi(ctx, n, slot, BRequest::Terminate, call, effects);
                    }
                    Some(key) => {
                        if let Some(leg) = self.leg_mut(slot) {
                            leg.key = Some(key.clone());
                            if leg.status == LegStatus::Dialing {
                                leg.status = LegStatus::Calling;
                            }
                        }
                        let data = self.leg_session(slot, Some(key.clone()));
                        notify(effects, self.start_or_transfer_cmd(slot), BridgedNote::Calling(data));
                    }
                    None if gone => {}
                    None => {
                        let why = error.unwrap_or_else(|| format!("unexpected answer {reply:?}"));
                        self.leg_failed(
                            slot,
                            &format!("OpenSIPS did not call the {}: {why}", slot.name()),
                            "start_failed",
                            None,
                            ctx,
                            n,
                            effects,
                        );
                    }
                }
                self.maybe_finished_ending(effects);
            }
            BRequest::Terminate => self.maybe_finished_ending(effects),
            BRequest::Ack | BRequest::Reinvite => {
                if let Some(why) = error {
                    if self.phase != BPhase::Ended {
                        let text = format!(
                            "OpenSIPS did not send the {} to the {}: {why}",
                            if what == BRequest::Ack { "ACK" } else { "re-INVITE" },
                            slot.name()
                        );
                        self.leg_failed(slot, &text, "mi_failed", None, ctx, n, effects);
                    }
                }
            }
        }
    }

    /// A leg could not be reached or kept: during set-up or on a live leg the call ends; a
    /// transfer's new leg only fails the transfer.
    #[allow(clippy::too_many_arguments)]
    fn leg_failed(
        &mut self,
        slot: Slot,
        text: &str,
        cause: &str,
        status: Option<i64>,
        ctx: &Ctx,
        n: &mut usize,
        effects: &mut Vec<Effect>,
    ) {
        if slot == Slot::New {
            self.terminate_leg(Slot::New, ctx, n, effects);
            self.new_leg = None;
            if let Some(t) = self.transfer.take() {
                let note =
                    BridgedNote::TransferFailed { destination: t.destination.clone(), cause: cause.to_owned(), status };
                notify(effects, Some(&t.cmd_id), note);
                failed(effects, Some(&t.cmd_id), "call.transfer.blind", text);
            }
            return;
        }
        if let Some(leg) = self.leg_mut(slot) {
            leg.status = LegStatus::Gone;
        }
        let note = BridgedNote::Failed {
            leg: slot.name().to_owned(),
            cause: cause.to_owned(),
            status,
            detail: text.to_owned(),
        };
        notify(effects, self.start_cmd.as_deref(), note);
        let reason = format!("{}_{cause}", slot.name());
        self.fail("remote", &reason, status, ctx, n, effects);
    }

    fn on_event(&mut self, e: &UaSession, ctx: &Ctx, n: &mut usize, effects: &mut Vec<Effect>) {
        if self.phase == BPhase::Ended {
            return;
        }
        let Some(slot) = self.slot_of_key(&e.key) else { return };
        let Some(status) = self.leg(slot).map(|l| l.status) else { return };
        let setting_up = matches!(status, LegStatus::Dialing | LegStatus::Calling | LegStatus::Ringing);
        match &e.event_type {
            UaEventType::Early if setting_up && e.method == "INVITE" => {
                if let Some(leg) = self.leg_mut(slot) {
                    leg.status = LegStatus::Ringing;
                }
                let key = self.leg(slot).and_then(|l| l.key.clone());
                let data = Ringing {
                    leg: slot.name().to_owned(),
                    key,
                    status: e.status,
                    reason: e.reason.clone(),
                    caller: self.legs[0].uri.clone(),
                    callee: self.legs[1].uri.clone(),
                };
                let note =
                    if slot == Slot::New { BridgedNote::TransferRinging(data) } else { BridgedNote::Ringing(data) };
                notify(effects, self.start_or_transfer_cmd(slot), note);
            }
            UaEventType::Rejected if setting_up && e.method == "INVITE" => {
                effects.push(Effect::CancelTimer { name: ring_timer(slot).into() });
                if let Some(leg) = self.leg_mut(slot) {
                    leg.status = LegStatus::Gone; // OpenSIPS deleted the session
                }
                let cause = failure_cause(e.status);
                let text = format!("the {} answered {} {}", slot.name(), e.status, e.reason.as_deref().unwrap_or(""));
                self.leg_failed(slot, &text, cause, Some(e.status), ctx, n, effects);
            }
            UaEventType::Answered if setting_up && e.method == "INVITE" => {
                effects.push(Effect::CancelTimer { name: ring_timer(slot).into() });
                let offer = e.body.clone().filter(|b| sdp::looks_like_sdp(b));
                if let Some(leg) = self.leg_mut(slot) {
                    leg.status = LegStatus::Answered;
                    leg.remote_sdp = offer.clone();
                }
                let Some(offer) = offer else {
                    let text = format!("the {}'s 200 OK carried no SDP offer", slot.name());
                    self.leg_failed(slot, &text, "no_sdp", Some(e.status), ctx, n, effects);
                    return;
                };
                match slot {
                    Slot::Caller => {
                        // Flow III step 2: park the caller on a silent answer while the callee rings.
                        let origin = self.legs[0].origin.bump();
                        self.update(
                            Slot::Caller,
                            BRequest::Ack,
                            Some(sdp::black_hole_answer(&offer, origin)),
                            ctx,
                            n,
                            effects,
                        );
                        self.legs[0].status = LegStatus::Up;
                        let data = self.leg_session(Slot::Caller, self.legs[0].key.clone());
                        notify(effects, self.start_cmd.as_deref(), BridgedNote::Answered(data));
                        self.phase = BPhase::CallingCallee;
                        let shown = self.from.clone().unwrap_or_else(|| self.legs[0].uri.clone());
                        self.dial(Slot::Callee, &shown, ctx, n, effects);
                    }
                    Slot::Callee => {
                        let data = self.leg_session(Slot::Callee, self.legs[1].key.clone());
                        notify(effects, self.start_cmd.as_deref(), BridgedNote::Answered(data));
                        self.connect(Slot::Caller, &offer, ctx, n, effects);
                    }
                    Slot::New => {
                        let Some(t) = self.transfer.clone() else { return };
                        let replaced = t.staying.other();
                        let key = self.new_leg.as_ref().and_then(|l| l.key.clone());
                        let note = BridgedNote::TransferAnswered { destination: t.destination.clone(), key };
                        notify(effects, Some(&t.cmd_id), note);
                        self.terminate_leg(replaced, ctx, n, effects);
                        if let Some(new) = self.new_leg.take() {
                            match replaced {
                                Slot::Caller => self.legs[0] = new,
                                _ => self.legs[1] = new,
                            }
                        }
                        self.connect(t.staying, &offer, ctx, n, effects);
                    }
                }
            }
            UaEventType::Answered if e.method == "INVITE" => self.reinvite_done(slot, e, true, ctx, n, effects),
            UaEventType::Rejected if e.method == "INVITE" => self.reinvite_done(slot, e, false, ctx, n, effects),
            UaEventType::Updated if e.method != "ACK" => {
                // The phones talk to each other; in-dialog requests to callbus are not expected.
                let note = BridgedNote::Request {
                    leg: slot.name().to_owned(),
                    method: e.method.clone(),
                    body: e.body.clone(),
                };
                notify(effects, None, note);
            }
            UaEventType::Terminated => {
                if let Some(leg) = self.leg_mut(slot) {
                    leg.status = LegStatus::Gone; // OpenSIPS answered the BYE and deleted the session
                }
                if slot == Slot::New {
                    self.leg_failed(Slot::New, "the transfer target hung up", "hung_up", None, ctx, n, effects);
                } else if self.ending_cmd.is_none() {
                    let reason = if self.phase == BPhase::Connected { "hung_up" } else { "gave_up" };
                    self.fail(slot.name(), reason, None, ctx, n, effects);
                }
            }
            _ => {}
        }
    }

    /// Steps 4–5: re-INVITE `staying` with the new peer's `offer`; the ACKs follow its answer.
    fn connect(&mut self, staying: Slot, offer: &str, ctx: &Ctx, n: &mut usize, effects: &mut Vec<Effect>) {
        self.phase = BPhase::Connecting;
        let Some(leg) = self.leg_mut(staying) else { return };
        let origin = leg.origin.bump();
        leg.reinvite = Some(Reinvite::Connect);
        let body = sdp::with_origin(offer, origin);
        self.update(staying, BRequest::Reinvite, Some(body), ctx, n, effects);
        effects.push(Effect::StartTimer { name: reinvite_timer(staying).into(), after_ms: ctx.timeouts.reinvite_ms });
    }

    fn reinvite_done(
        &mut self,
        slot: Slot,
        e: &UaSession,
        ok: bool,
        ctx: &Ctx,
        n: &mut usize,
        effects: &mut Vec<Effect>,
    ) {
        let Some(purpose) = self.leg_mut(slot).and_then(|l| l.reinvite.take()) else { return };
        effects.push(Effect::CancelTimer { name: reinvite_timer(slot).into() });
        let answer = e.body.clone().filter(|b| sdp::looks_like_sdp(b));
        if ok {
            // Legs run with flag `d`: every 2xx to an INVITE waits for callbus's ACK.
            self.update(slot, BRequest::Ack, None, ctx, n, effects);
            if let (Some(a), Some(leg)) = (&answer, self.leg_mut(slot)) {
                leg.remote_sdp = Some(a.clone());
            }
        }
        match purpose {
            Reinvite::Connect => {
                let peer = slot.other();
                match (ok, answer) {
                    (true, Some(a)) => {
                        let Some(peer_leg) = self.leg_mut(peer) else { return };
                        let origin = peer_leg.origin.bump();
                        peer_leg.status = LegStatus::Up;
                        self.update(peer, BRequest::Ack, Some(sdp::with_origin(&a, origin)), ctx, n, effects);
                        self.phase = BPhase::Connected;
                        let data = Connected {
                            caller: self.legs[0].uri.clone(),
                            callee: self.legs[1].uri.clone(),
                            caller_key: self.legs[0].key.clone(),
                            callee_key: self.legs[1].key.clone(),
                        };
                        if let Some(t) = self.transfer.take() {
                            let note = BridgedNote::Transferred {
                                destination: t.destination.clone(),
                                staying: t.staying.name().to_owned(),
                            };
                            notify(effects, Some(&t.cmd_id), note);
                            let detail = Detail { destination: Some(t.destination.clone()), ..Detail::default() };
                            succeeded(effects, Some(&t.cmd_id), "call.transfer.blind", detail);
                        } else {
                            let cmd = self.start_cmd.take();
                            let detail = Detail {
                                caller: Some(data.caller.clone()),
                                callee: Some(data.callee.clone()),
                                caller_key: data.caller_key.clone(),
                                callee_key: data.callee_key.clone(),
                                ..Detail::default()
                            };
                            notify(effects, cmd.as_deref(), BridgedNote::Connected(data));
                            succeeded(effects, cmd.as_deref(), "call.start", detail);
                        }
                    }
                    (_, _) => {
                        let status = if ok { None } else { Some(e.status) };
                        let text = format!(
                            "the {} refused the other party's media ({} {})",
                            slot.name(),
                            e.status,
                            e.reason.as_deref().unwrap_or("")
                        );
                        self.leg_failed(slot, &text, "media_refused", status, ctx, n, effects);
                    }
                }
            }
            Reinvite::Hold | Reinvite::Unhold => {
                let hold = purpose == Reinvite::Hold;
                let cmd = self.hold_op.as_ref().map(|o| o.cmd_id.clone());
                let reply = LegReply { leg: slot.name().to_owned(), status: e.status };
                let note = match (hold, ok) {
                    (true, true) => BridgedNote::LegHeld(reply),
                    (true, false) => BridgedNote::LegHoldFailed(reply),
                    (false, true) => BridgedNote::LegResumed(reply),
                    (false, false) => BridgedNote::LegUnholdFailed(reply),
                };
                if let Some(leg) = self.leg_mut(slot) {
                    leg.hold_failed = !ok;
                }
                notify(effects, cmd.as_deref(), note);
                self.hold_progress(effects);
            }
        }
    }

    fn hold_progress(&mut self, effects: &mut Vec<Effect>) {
        if self.legs.iter().any(|l| l.reinvite.is_some()) {
            return;
        }
        let Some(op) = self.hold_op.take() else { return };
        let verb = if op.hold { "call.hold" } else { "call.unhold" };
        if self.legs.iter().any(|l| l.hold_failed) {
            let which: Vec<&str> = [Slot::Caller, Slot::Callee]
                .into_iter()
                .filter(|s| self.leg(*s).is_some_and(|l| l.hold_failed))
                .map(Slot::name)
                .collect();
            failed(effects, Some(&op.cmd_id), verb, &format!("refused by the {}", which.join(" and ")));
            return;
        }
        self.held = op.hold;
        notify(effects, Some(&op.cmd_id), if op.hold { BridgedNote::Held {} } else { BridgedNote::Resumed {} });
        succeeded(effects, Some(&op.cmd_id), verb, Detail::default());
    }

    /// A leg's session, with the parties, for `calling` and `answered`.
    fn leg_session(&self, slot: Slot, key: Option<String>) -> LegSession {
        LegSession {
            leg: slot.name().to_owned(),
            key,
            caller: self.legs[0].uri.clone(),
            callee: self.legs[1].uri.clone(),
        }
    }

    fn on_timer(&mut self, name: &str, ctx: &Ctx, n: &mut usize, effects: &mut Vec<Effect>) {
        if self.phase == BPhase::Ended {
            return;
        }
        if name == super::ua::MAX_TIMER {
            self.fail("engine", "max_duration", None, ctx, n, effects);
            return;
        }
        for slot in [Slot::Caller, Slot::Callee, Slot::New] {
            if name == ring_timer(slot) {
                let ringing = self
                    .leg(slot)
                    .is_some_and(|l| matches!(l.status, LegStatus::Dialing | LegStatus::Calling | LegStatus::Ringing));
                if ringing {
                    let text = format!("the {} did not answer in time", slot.name());
                    self.leg_failed(slot, &text, "no_answer", None, ctx, n, effects);
                }
            } else if name == reinvite_timer(slot) {
                let Some(purpose) = self.leg_mut(slot).and_then(|l| l.reinvite.take()) else { continue };
                if purpose == Reinvite::Connect {
                    let text = format!("the {} did not answer the re-INVITE in time", slot.name());
                    self.leg_failed(slot, &text, "reinvite_timeout", None, ctx, n, effects);
                } else {
                    if let Some(leg) = self.leg_mut(slot) {
                        leg.hold_failed = true;
                    }
                    let cmd = self.hold_op.as_ref().map(|o| o.cmd_id.clone());
                    notify(effects, cmd.as_deref(), BridgedNote::LegHoldTimeout { leg: slot.name().to_owned() });
                    self.hold_progress(effects);
                }
            }
        }
    }

    /// Checks the call's legs against OpenSIPS's sessions; a missing live leg ends the call.
    pub fn missing_legs(&self, present: &dyn Fn(&str) -> bool) -> bool {
        self.legs.iter().filter(|l| l.live()).filter_map(|l| l.key.as_deref()).any(|k| !present(k))
    }
}
