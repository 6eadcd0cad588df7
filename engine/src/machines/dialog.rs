//! Kind `Dialog`: a proxied call as OpenSIPS's `dialog` and `callops` modules show it.
//!
//! Main states follow `E_DLG_STATE_CHANGED` (docs/opensips.md §3): unconfirmed → early → answered
//! (2xx, no ACK) → confirmed → ended; a 2xx after a failure resurrects the call (5→3). Each leg
//! has its own hold region and the call one transfer region (docs/opensips.md §4). OpenSIPS 3.4's
//! quirks handled here:
//! - events arrive in any order (several OpenSIPS processes): states only move forward, and a
//!   hold `ok` before its MI reply still completes the command;
//! - a blind transfer's `start` carries the new call's Call-ID in `leg`: `leg` is ignored;
//! - a declined REFER raises nothing: the transfer times out and is reported failed;
//! - one transfer attempt per call: OpenSIPS answers 491 for ever after, so a second one is
//!   refused here, with the reason;
//! - a leg that refused the hold re-INVITE still counts as held in OpenSIPS (so `unhold`
//!   re-INVITEs it too).

use callbus_schemas::mi_call::{CallTransfer, DialogCallId, DlgEndDlg, MiCall};
use serde::{Deserialize, Serialize};

use callbus_schemas::bus::MiBusReply;
use callbus_schemas::command::{CallTarget, Command, CommandError, CommandErrorCode, LegName};
use callbus_schemas::event::{DlgState, Event, HoldAction, HoldState, Leg, TransferState};

use super::{command_verb, notify, Ctx, Effect, Input};
use callbus_schemas::notes::{Detail, DialogNote, Moved};

/// The call's main state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Created, nothing heard yet.
    Unconfirmed,
    /// Ringing (1xx).
    Early,
    /// 2xx relayed, ACK not yet seen.
    Answered,
    /// Up.
    Confirmed,
    /// Over.
    Ended,
}

/// One leg's hold region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LegHold {
    /// Media flowing.
    Resumed,
    /// Hold re-INVITE sent.
    Holding,
    /// On hold.
    Held,
    /// Unhold re-INVITE sent.
    Resuming,
    /// The leg refused the hold re-INVITE (OpenSIPS counts it held anyway).
    HoldFailed,
    /// The leg refused the unhold re-INVITE.
    ResumeFailed,
}

impl LegHold {
    /// Its name, as serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            LegHold::Resumed => "resumed",
            LegHold::Holding => "holding",
            LegHold::Held => "held",
            LegHold::Resuming => "resuming",
            LegHold::HoldFailed => "hold_failed",
            LegHold::ResumeFailed => "resume_failed",
        }
    }
}

/// A hold or unhold in progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldOp {
    /// The command.
    pub cmd_id: String,
    /// Hold (true) or unhold.
    pub hold: bool,
    /// The MI request.
    pub request: String,
    /// OpenSIPS answered the MI request "OK".
    pub accepted: bool,
}

pub use callbus_schemas::notes::TransferKind;

/// The transfer region.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transfer {
    /// None attempted.
    None,
    /// `call_transfer` sent.
    Requested {
        /// The command.
        cmd_id: String,
        /// What was asked.
        kind: TransferKind,
        /// The MI request.
        request: String,
    },
    /// OpenSIPS sent the REFER.
    ReferSent {
        /// The command.
        cmd_id: String,
        /// What was asked.
        kind: TransferKind,
    },
    /// The transferee's new call arrived.
    Running {
        /// The command (none when this call is the one being replaced).
        cmd_id: Option<String>,
        /// The new call's SIP Call-ID.
        new_call: String,
        /// The command's verb (`call.transfer.blind` / `.attended`; absent in older logs).
        #[serde(default)]
        verb: Option<String>,
    },
    /// The new call was answered.
    Done {
        /// The new call's SIP Call-ID.
        new_call: String,
    },
    /// It failed; OpenSIPS allows no other attempt on this call.
    Failed {
        /// Why.
        reason: String,
    },
}

/// A `call.end` in progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndOp {
    /// The command, or None when the engine ends the call itself (after a transfer).
    pub cmd_id: Option<String>,
    /// The MI request.
    pub request: String,
    /// Why it is being ended.
    pub reason: String,
}

/// A proxied call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DialogState {
    /// The SIP Call-ID.
    pub sip_call_id: String,
    /// The OpenSIPS node.
    pub node: String,
    /// OpenSIPS's dialog ID (`hex.hex`), once seen.
    pub dialog_id: Option<String>,
    /// The main state.
    pub phase: Phase,
    /// Why it ended.
    pub end_reason: Option<String>,
    /// The caller leg's hold region.
    pub caller: LegHold,
    /// The callee leg's hold region.
    pub callee: LegHold,
    /// A hold or unhold in progress.
    pub hold_op: Option<HoldOp>,
    /// The transfer region.
    pub transfer: Transfer,
    /// An end in progress.
    pub end_op: Option<EndOp>,
}

const HOLD_TIMER: &str = "hold";
/// After OpenSIPS answers `call_hold`/`call_unhold`, how long a leg that has raised nothing yet
/// may still do so before it counts as skipped. callops raises nothing for a leg it skips (already
/// in that state, or no SDP change), but the MI reply can also overtake the `start` of a leg it
/// did re-INVITE: the reply and the events travel on different sockets (seen on a real OpenSIPS
/// 3.4.18: an unhold declared done one leg early).
const HOLD_SETTLE_TIMER: &str = "hold.settle";
const HOLD_SETTLE_MS: u64 = 500;
const TRANSFER_TIMER: &str = "transfer";
const END_TIMER: &str = "end";

fn succeeded(effects: &mut Vec<Effect>, cmd_id: &str, verb: &str, detail: Detail) {
    super::succeeded(effects, Some(cmd_id), verb, detail);
}

fn failed(effects: &mut Vec<Effect>, cmd_id: &str, verb: &str, reason: &str) {
    super::failed(effects, Some(cmd_id), verb, reason);
}

fn mi_error_text(reply: &MiBusReply) -> String {
    match reply {
        MiBusReply::Error { error } => error.to_string(),
        MiBusReply::Result { result } => result.to_string(),
    }
}

fn wrong_state(state: &str, message: String) -> CommandError {
    CommandError { code: CommandErrorCode::WrongState, message, field: None, state: Some(state.to_owned()) }
}

impl DialogState {
    /// A call first seen on `node` with this SIP Call-ID.
    pub fn new(node: &str, sip_call_id: &str) -> DialogState {
        DialogState {
            sip_call_id: sip_call_id.to_owned(),
            node: node.to_owned(),
            dialog_id: None,
            phase: Phase::Unconfirmed,
            end_reason: None,
            caller: LegHold::Resumed,
            callee: LegHold::Resumed,
            hold_op: None,
            transfer: Transfer::None,
            end_op: None,
        }
    }

    /// The state's name.
    pub fn state_name(&self) -> &'static str {
        match self.phase {
            Phase::Ended => "ended",
            _ if self.end_op.is_some() => "ending",
            Phase::Unconfirmed => "unconfirmed",
            Phase::Early => "early",
            Phase::Answered => "answered",
            Phase::Confirmed => "confirmed",
        }
    }

    /// Whether the call is over.
    pub fn is_ended(&self) -> bool {
        self.phase == Phase::Ended
    }

    fn leg_mut(&mut self, leg: LegName) -> &mut LegHold {
        match leg {
            LegName::Caller => &mut self.caller,
            LegName::Callee => &mut self.callee,
        }
    }

    /// Checks a command against the state; nothing changes.
    pub fn check(&self, command: &Command) -> Result<(), CommandError> {
        let state = self.state_name();
        if self.phase == Phase::Ended {
            return Err(wrong_state(
                state,
                format!("the call has ended ({})", self.end_reason.as_deref().unwrap_or("ended")),
            ));
        }
        let confirmed = || {
            if self.phase == Phase::Confirmed {
                Ok(())
            } else {
                Err(wrong_state(state, format!("the call is {state}: OpenSIPS acts on confirmed calls only")))
            }
        };
        match command {
            Command::End { .. } if self.end_op.is_some() => {
                Err(wrong_state(state, "the call is already being ended".into()))
            }
            Command::End { .. } | Command::Get { .. } | Command::List { .. } => Ok(()),
            Command::Start { .. }
            | Command::UaStart { .. }
            | Command::UaAnswer { .. }
            | Command::UaUpdate { .. }
            | Command::UaTerminate { .. } => Err(wrong_state(
                state,
                format!("{} applies to UA sessions, not to a proxied call", command_verb(command)),
            )),
            Command::Hold { .. } => {
                confirmed()?;
                if self.hold_op.is_some() {
                    return Err(wrong_state(state, "a hold or unhold is in progress".into()));
                }
                if self.caller == LegHold::Held && self.callee == LegHold::Held {
                    return Err(wrong_state(state, "both legs are already on hold".into()));
                }
                Ok(())
            }
            Command::Unhold { .. } => {
                confirmed()?;
                if self.hold_op.is_some() {
                    return Err(wrong_state(state, "a hold or unhold is in progress".into()));
                }
                let held = |l: LegHold| matches!(l, LegHold::Held | LegHold::HoldFailed | LegHold::ResumeFailed);
                if !held(self.caller) && !held(self.callee) {
                    return Err(wrong_state(state, "no leg is on hold".into()));
                }
                Ok(())
            }
            Command::TransferBlind { .. } | Command::TransferAttended { .. } => {
                confirmed()?;
                if self.transfer != Transfer::None {
                    return Err(wrong_state(
                        state,
                        "a transfer was already attempted on this call; OpenSIPS 3.4 refuses any other on the same call (491)"
                            .into(),
                    ));
                }
                Ok(())
            }
        }
    }

    /// One step: the next state and the effects; an event input's datagram parsed as `parsed`
    /// when given (see [`super::CallState::step_parsed`]).
    pub fn step(&self, input: &Input, parsed: Option<&Event>, ctx: &Ctx) -> (DialogState, Vec<Effect>) {
        let mut next = self.clone();
        let mut effects = Vec::new();
        match input {
            Input::Event { datagram, .. } => match super::parsed_or_parse(parsed, datagram).as_deref() {
                Some(Event::DlgStateChanged(d)) => next.on_dialog_state(d, ctx, &mut effects),
                Some(Event::CallHold(h)) => next.on_hold_event(h, &mut effects),
                Some(Event::CallTransfer(t)) => next.on_transfer_event(t, ctx, &mut effects),
                _ => {}
            },
            Input::Command { cmd_id, command } => next.on_command(cmd_id, command, ctx, &mut effects),
            Input::MiReply { request, reply } => next.on_mi_reply(request, reply, ctx, &mut effects),
            Input::Timer { name } => next.on_timer(name, ctx, &mut effects),
            Input::Reconcile { opensips_state } => next.on_reconcile(*opensips_state, &mut effects),
        }
        (next, effects)
    }

    fn on_dialog_state(&mut self, d: &callbus_schemas::event::DlgStateChanged, ctx: &Ctx, effects: &mut Vec<Effect>) {
        if self.dialog_id.is_none() {
            self.dialog_id = Some(d.id.clone());
        }
        let data = Moved::states(d.old_state.code(), d.new_state.code());
        match d.new_state {
            DlgState::Early if self.phase == Phase::Unconfirmed => {
                self.phase = Phase::Early;
                notify(effects, None, DialogNote::Early(data));
            }
            DlgState::Answered
                if matches!(self.phase, Phase::Unconfirmed | Phase::Early)
                    || (self.phase == Phase::Ended && d.old_state == DlgState::Deleted) =>
            {
                self.phase = Phase::Answered;
                self.end_reason = None;
                notify(effects, None, DialogNote::Answered(data));
            }
            DlgState::Confirmed if matches!(self.phase, Phase::Unconfirmed | Phase::Early | Phase::Answered) => {
                self.phase = Phase::Confirmed;
                notify(effects, None, DialogNote::Confirmed(data));
            }
            DlgState::Deleted if self.phase != Phase::Ended => {
                let reason = match (&self.end_op, d.old_state) {
                    (Some(op), _) => op.reason.clone(),
                    (None, DlgState::Unconfirmed | DlgState::Early) if d.to_tag.is_none() => "no_answer".to_owned(),
                    (None, DlgState::Unconfirmed | DlgState::Early) => "not_answered".to_owned(),
                    (None, _) => "hung_up".to_owned(),
                };
                self.end(&reason, ctx, effects);
            }
            _ => {}
        }
    }

    fn end(&mut self, reason: &str, _ctx: &Ctx, effects: &mut Vec<Effect>) {
        self.phase = Phase::Ended;
        self.end_reason = Some(reason.to_owned());
        // The four cancels and the `ended` note in one allocation (the vector would grow twice).
        effects.reserve(5);
        for timer in [HOLD_TIMER, HOLD_SETTLE_TIMER, TRANSFER_TIMER, END_TIMER] {
            effects.push(Effect::CancelTimer { name: timer.into() });
        }
        notify(effects, None, DialogNote::Ended { reason: reason.to_owned() });
        if let Some(op) = self.end_op.take() {
            if let Some(cmd_id) = op.cmd_id {
                succeeded(
                    effects,
                    &cmd_id,
                    "call.end",
                    Detail { reason: Some(reason.to_owned()), ..Detail::default() },
                );
            }
        }
        if let Some(op) = self.hold_op.take() {
            failed(effects, &op.cmd_id, if op.hold { "call.hold" } else { "call.unhold" }, "the call ended");
        }
        match std::mem::replace(&mut self.transfer, Transfer::None) {
            Transfer::Requested { cmd_id, kind, .. } | Transfer::ReferSent { cmd_id, kind } => {
                failed(effects, &cmd_id, transfer_verb(&kind), "the call ended before the transfer started");
                self.transfer = Transfer::Failed { reason: "the call ended".into() };
            }
            other => self.transfer = other,
        }
    }

    fn on_hold_event(&mut self, h: &callbus_schemas::event::CallHold, effects: &mut Vec<Effect>) {
        let leg = match h.leg {
            Leg::Caller => LegName::Caller,
            Leg::Callee => LegName::Callee,
            Leg::Unknown(_) => return,
        };
        let hold = match h.action {
            HoldAction::Hold => true,
            HoldAction::Unhold => false,
            // 3.4 sends literal "action"/"state" on one failure path: nothing to learn from it.
            HoldAction::Unknown(_) => return,
        };
        let cmd_id = self.hold_op.as_ref().map(|op| op.cmd_id.clone());
        let leg_name = leg.as_str().to_owned();
        let (region, event) = match (&h.state, hold) {
            (HoldState::Start, true) => (LegHold::Holding, DialogNote::HoldStarted { leg: leg_name }),
            (HoldState::Start, false) => (LegHold::Resuming, DialogNote::UnholdStarted { leg: leg_name }),
            (HoldState::Ok, true) => (LegHold::Held, DialogNote::Held { leg: leg_name }),
            (HoldState::Ok, false) => (LegHold::Resumed, DialogNote::Resumed { leg: leg_name }),
            (HoldState::Fail, true) => (LegHold::HoldFailed, DialogNote::HoldFailed { leg: leg_name }),
            (HoldState::Fail, false) => (LegHold::ResumeFailed, DialogNote::UnholdFailed { leg: leg_name }),
            (HoldState::Unknown(_), _) => return,
        };
        let current = *self.leg_mut(leg);
        // A `start` that trails its own `ok`/`fail` (another OpenSIPS process) changes nothing.
        let final_for_action = if hold {
            matches!(current, LegHold::Held | LegHold::HoldFailed)
        } else {
            matches!(current, LegHold::Resumed | LegHold::ResumeFailed)
        };
        let final_already = final_for_action
            && matches!(region, LegHold::Holding | LegHold::Resuming)
            && self.hold_op.as_ref().is_some_and(|op| op.hold == hold);
        if !final_already {
            *self.leg_mut(leg) = region;
        }
        notify(effects, cmd_id.as_deref(), event);
        self.complete_hold(false, effects);
    }

    /// Completes the hold/unhold once OpenSIPS accepted it and no leg is in flight. A leg still
    /// in the state the command changes (held, for an unhold) has raised nothing yet: it is
    /// waited for until `settled` (the settle timer fired), then counted as skipped.
    fn complete_hold(&mut self, settled: bool, effects: &mut Vec<Effect>) {
        let Some(op) = &self.hold_op else { return };
        let in_flight = |l: LegHold| matches!(l, LegHold::Holding | LegHold::Resuming);
        if !op.accepted || in_flight(self.caller) || in_flight(self.callee) {
            return;
        }
        let ok_state = if op.hold { LegHold::Held } else { LegHold::Resumed };
        // A refused hold still counts as held in OpenSIPS 3.4, so an unhold re-INVITEs it too.
        let untouched = |l: LegHold| {
            if op.hold {
                matches!(l, LegHold::Resumed | LegHold::ResumeFailed)
            } else {
                matches!(l, LegHold::Held | LegHold::HoldFailed)
            }
        };
        if !settled && (untouched(self.caller) || untouched(self.callee)) {
            return;
        }
        let touched_ok = self.caller == ok_state || self.callee == ok_state;
        let refused: Vec<&str> = [(LegName::Caller, self.caller), (LegName::Callee, self.callee)]
            .iter()
            .filter(|(_, l)| matches!(l, LegHold::HoldFailed | LegHold::ResumeFailed))
            .map(|(n, _)| n.as_str())
            .collect();
        // Completion needs at least one leg to have reached a final state for this action.
        if !touched_ok && refused.is_empty() {
            return;
        }
        let verb = if op.hold { "call.hold" } else { "call.unhold" };
        let cmd_id = op.cmd_id.clone();
        if refused.is_empty() {
            let detail = Detail {
                caller: Some(self.caller.as_str().to_owned()),
                callee: Some(self.callee.as_str().to_owned()),
                ..Detail::default()
            };
            succeeded(effects, &cmd_id, verb, detail);
        } else {
            failed(effects, &cmd_id, verb, &format!("the {} leg refused the re-INVITE", refused.join(" and ")));
        }
        effects.push(Effect::CancelTimer { name: HOLD_TIMER.into() });
        effects.push(Effect::CancelTimer { name: HOLD_SETTLE_TIMER.into() });
        self.hold_op = None;
    }

    fn on_transfer_event(&mut self, t: &callbus_schemas::event::CallTransfer, ctx: &Ctx, effects: &mut Vec<Effect>) {
        let cmd_id = match &self.transfer {
            Transfer::Requested { cmd_id, .. } | Transfer::ReferSent { cmd_id, .. } => Some(cmd_id.clone()),
            Transfer::Running { cmd_id, .. } => cmd_id.clone(),
            _ => None,
        };
        let verb = match &self.transfer {
            Transfer::Requested { kind, .. } | Transfer::ReferSent { kind, .. } => transfer_verb(kind).to_owned(),
            Transfer::Running { verb: Some(verb), .. } => verb.clone(),
            _ => "call.transfer".to_owned(),
        };
        let verb = verb.as_str();
        match t.state {
            TransferState::Start => {
                // `leg` is not trusted: 3.4.18 puts the new call's Call-ID there on blind transfers.
                if !matches!(self.transfer, Transfer::Done { .. } | Transfer::Failed { .. }) {
                    let verb = cmd_id.as_ref().map(|_| verb.to_owned());
                    self.transfer =
                        Transfer::Running { cmd_id: cmd_id.clone(), new_call: t.transfer_callid.clone(), verb };
                    effects.push(Effect::StartTimer {
                        name: TRANSFER_TIMER.into(),
                        after_ms: ctx.timeouts.transfer_answer_ms,
                    });
                }
                let note = DialogNote::TransferStarted {
                    new_sip_call_id: t.transfer_callid.clone(),
                    destination: t.destination.clone(),
                };
                notify(effects, cmd_id.as_deref(), note);
            }
            TransferState::Notify => {
                notify(effects, cmd_id.as_deref(), DialogNote::TransferProgress { status: t.status.clone() });
            }
            TransferState::Ok => {
                if matches!(self.transfer, Transfer::Done { .. }) {
                    return;
                }
                self.transfer = Transfer::Done { new_call: t.transfer_callid.clone() };
                effects.push(Effect::CancelTimer { name: TRANSFER_TIMER.into() });
                let note =
                    DialogNote::Transferred { new_sip_call_id: t.transfer_callid.clone(), status: t.status.clone() };
                notify(effects, cmd_id.as_deref(), note);
                if let Some(cmd_id) = &cmd_id {
                    let detail = Detail { new_sip_call_id: Some(t.transfer_callid.clone()), ..Detail::default() };
                    succeeded(effects, cmd_id, verb, detail);
                    // The transferor's side is not hung up by OpenSIPS: end it (Call API does too).
                    if self.phase != Phase::Ended && self.end_op.is_none() {
                        let request = ctx.request_id(0);
                        effects.push(self.end_request(&request));
                        self.end_op = Some(EndOp { cmd_id: None, request, reason: "transferred".into() });
                        effects.push(Effect::StartTimer { name: END_TIMER.into(), after_ms: ctx.timeouts.end_ms });
                    }
                }
            }
            TransferState::Fail => {
                self.transfer = Transfer::Failed { reason: format!("the new call failed: {}", t.status) };
                effects.push(Effect::CancelTimer { name: TRANSFER_TIMER.into() });
                let note = DialogNote::TransferFailed { reason: None, status: Some(t.status.clone()) };
                notify(effects, cmd_id.as_deref(), note);
                if let Some(cmd_id) = &cmd_id {
                    failed(effects, cmd_id, verb, &format!("the transfer target answered {}", t.status));
                }
            }
            TransferState::Unknown(_) => {}
        }
    }

    fn end_request(&self, request: &str) -> Effect {
        Effect::mi(
            request.to_owned(),
            self.node.clone(),
            MiCall::DlgEndDlg(DlgEndDlg { dialog_id: self.sip_call_id.clone() }),
        )
    }

    fn on_command(&mut self, cmd_id: &str, command: &Command, ctx: &Ctx, effects: &mut Vec<Effect>) {
        if let Err(e) = self.check(command) {
            failed(effects, cmd_id, command_verb(command), &e.message);
            return;
        }
        let request = ctx.request_id(0);
        let mi = |call: MiCall| Effect::mi(request.clone(), self.node.clone(), call);
        let callid = self.sip_call_id.clone();
        match command {
            Command::End { .. } => {
                effects.push(self.end_request(&request));
                effects.push(Effect::StartTimer { name: END_TIMER.into(), after_ms: ctx.timeouts.end_ms });
                self.end_op =
                    Some(EndOp { cmd_id: Some(cmd_id.to_owned()), request, reason: "ended_by_command".into() });
            }
            Command::Hold { .. } | Command::Unhold { .. } => {
                let hold = matches!(command, Command::Hold { .. });
                let on = DialogCallId { callid };
                effects.push(mi(if hold { MiCall::CallHold(on) } else { MiCall::CallUnhold(on) }));
                effects.push(Effect::StartTimer { name: HOLD_TIMER.into(), after_ms: ctx.timeouts.reinvite_ms });
                self.hold_op = Some(HoldOp { cmd_id: cmd_id.to_owned(), hold, request, accepted: false });
            }
            Command::TransferBlind { leg, destination, .. } => {
                effects.push(mi(MiCall::CallTransfer(CallTransfer {
                    callid,
                    leg: leg.as_str().into(),
                    destination: Some(destination.clone()),
                    transfer_callid: None,
                    transfer_leg: None,
                })));
                let kind = TransferKind::Blind { leg: *leg, destination: destination.clone() };
                self.transfer = Transfer::Requested { cmd_id: cmd_id.to_owned(), kind, request };
            }
            Command::TransferAttended { leg, transfer_target, transfer_leg, .. } => {
                let CallTarget::SipCallId(other) = transfer_target else {
                    failed(effects, cmd_id, command_verb(command), "the other call has no SIP Call-ID");
                    return;
                };
                effects.push(mi(MiCall::CallTransfer(CallTransfer {
                    callid,
                    leg: leg.as_str().into(),
                    destination: None,
                    transfer_callid: Some(other.clone()),
                    transfer_leg: Some(transfer_leg.as_str().into()),
                })));
                let kind = TransferKind::Attended { leg: *leg, other: other.clone(), other_leg: *transfer_leg };
                self.transfer = Transfer::Requested { cmd_id: cmd_id.to_owned(), kind, request };
            }
            _ => {}
        }
    }

    fn on_mi_reply(&mut self, request: &str, reply: &MiBusReply, ctx: &Ctx, effects: &mut Vec<Effect>) {
        let ok = matches!(reply, MiBusReply::Result { .. });
        let code = match reply {
            MiBusReply::Error { error } => Some(error.code),
            MiBusReply::Result { .. } => None,
        };
        if self.end_op.as_ref().is_some_and(|op| op.request == request) {
            if ok {
                let cmd_id = self.end_op.as_ref().and_then(|op| op.cmd_id.clone());
                notify(effects, cmd_id.as_deref(), DialogNote::Ending {});
            } else if code == Some(404) {
                // OpenSIPS no longer has the dialog: it ended without us seeing the event.
                self.end("gone", ctx, effects);
            } else if let Some(op) = self.end_op.take() {
                effects.push(Effect::CancelTimer { name: END_TIMER.into() });
                if let Some(cmd_id) = op.cmd_id {
                    failed(
                        effects,
                        &cmd_id,
                        "call.end",
                        &format!("OpenSIPS refused to end the call: {}", mi_error_text(reply)),
                    );
                }
            }
            return;
        }
        if let Some(op) = self.hold_op.as_mut().filter(|op| op.request == request) {
            let (hold, cmd_id) = (op.hold, op.cmd_id.clone());
            let verb = if hold { "call.hold" } else { "call.unhold" };
            if ok {
                op.accepted = true;
                let note = if hold { DialogNote::HoldRequested {} } else { DialogNote::UnholdRequested {} };
                notify(effects, Some(&cmd_id), note);
                effects.push(Effect::StartTimer { name: HOLD_SETTLE_TIMER.into(), after_ms: HOLD_SETTLE_MS });
                self.complete_hold(false, effects);
            } else if code == Some(480) {
                // 480: "Both dialog legs are on hold" / "No dialog legs on hold": already so.
                let state = if hold { LegHold::Held } else { LegHold::Resumed };
                self.caller = state;
                self.callee = state;
                self.hold_op = None;
                effects.push(Effect::CancelTimer { name: HOLD_TIMER.into() });
                let note = Some("OpenSIPS reports the legs were already in that state".to_owned());
                succeeded(effects, &cmd_id, verb, Detail { note, ..Detail::default() });
            } else {
                self.hold_op = None;
                effects.push(Effect::CancelTimer { name: HOLD_TIMER.into() });
                failed(effects, &cmd_id, verb, &format!("OpenSIPS refused: {}", mi_error_text(reply)));
            }
            return;
        }
        if let Transfer::Requested { cmd_id, kind, request: req } = &self.transfer {
            if req != request {
                return;
            }
            let (cmd_id, kind) = (cmd_id.clone(), kind.clone());
            if ok {
                notify(effects, Some(&cmd_id), DialogNote::TransferRequested { kind: kind.clone() });
                effects.push(Effect::StartTimer { name: TRANSFER_TIMER.into(), after_ms: ctx.timeouts.refer_ms });
                self.transfer = Transfer::ReferSent { cmd_id, kind };
            } else {
                let reason = if code == Some(491) {
                    "OpenSIPS refuses (491): a transfer was already attempted on this call".to_owned()
                } else {
                    format!("OpenSIPS refused: {}", mi_error_text(reply))
                };
                notify(
                    effects,
                    Some(&cmd_id),
                    DialogNote::TransferFailed { reason: Some(reason.clone()), status: None },
                );
                failed(effects, &cmd_id, transfer_verb(&kind), &reason);
                self.transfer = Transfer::Failed { reason };
            }
        }
    }

    fn on_timer(&mut self, name: &str, ctx: &Ctx, effects: &mut Vec<Effect>) {
        match name {
            HOLD_SETTLE_TIMER => self.complete_hold(true, effects),
            HOLD_TIMER => {
                if let Some(op) = self.hold_op.take() {
                    for leg in [&mut self.caller, &mut self.callee] {
                        *leg = match *leg {
                            LegHold::Holding => LegHold::HoldFailed,
                            LegHold::Resuming => LegHold::ResumeFailed,
                            other => other,
                        };
                    }
                    let reason = format!("no answer to the re-INVITE within {} s", ctx.timeouts.reinvite_ms / 1000);
                    failed(effects, &op.cmd_id, if op.hold { "call.hold" } else { "call.unhold" }, &reason);
                }
            }
            TRANSFER_TIMER => {
                let (cmd_id, verb, reason) = match &self.transfer {
                    Transfer::ReferSent { cmd_id, kind } => (
                        Some(cmd_id.clone()),
                        transfer_verb(kind),
                        format!(
                            "the REFER was declined or lost: OpenSIPS raised no transfer event within {} s",
                            ctx.timeouts.refer_ms / 1000
                        ),
                    ),
                    Transfer::Running { cmd_id, verb, .. } => (
                        cmd_id.clone(),
                        verb.as_deref().unwrap_or("call.transfer"),
                        format!(
                            "the transfer target did not answer within {} s",
                            ctx.timeouts.transfer_answer_ms / 1000
                        ),
                    ),
                    _ => return,
                };
                notify(
                    effects,
                    cmd_id.as_deref(),
                    DialogNote::TransferFailed { reason: Some(reason.clone()), status: None },
                );
                if let Some(cmd_id) = &cmd_id {
                    failed(effects, cmd_id, verb, &reason);
                }
                self.transfer = Transfer::Failed { reason };
            }
            END_TIMER => {
                if let Some(op) = self.end_op.take() {
                    if let Some(cmd_id) = op.cmd_id {
                        let reason = format!("the call did not end within {} s", ctx.timeouts.end_ms / 1000);
                        failed(effects, &cmd_id, "call.end", &reason);
                    }
                }
            }
            _ => {}
        }
    }

    fn on_reconcile(&mut self, opensips_state: Option<i64>, effects: &mut Vec<Effect>) {
        match opensips_state.map(DlgState::from) {
            None | Some(DlgState::Deleted) if self.phase != Phase::Ended => {
                let dummy = Ctx { call_id: "", seq: 0, now_ms: 0, timeouts: Default::default() };
                self.end("ended_while_engine_away", &dummy, effects);
            }
            Some(DlgState::Confirmed) if self.phase != Phase::Confirmed && self.phase != Phase::Ended => {
                self.phase = Phase::Confirmed;
                notify(effects, None, DialogNote::Confirmed(Moved::reconciled()));
            }
            Some(DlgState::Answered) if matches!(self.phase, Phase::Unconfirmed | Phase::Early) => {
                self.phase = Phase::Answered;
                notify(effects, None, DialogNote::Answered(Moved::reconciled()));
            }
            Some(DlgState::Early) if self.phase == Phase::Unconfirmed => {
                self.phase = Phase::Early;
                notify(effects, None, DialogNote::Early(Moved::reconciled()));
            }
            _ => {}
        }
    }
}

fn transfer_verb(kind: &TransferKind) -> &'static str {
    match kind {
        TransferKind::Blind { .. } => "call.transfer.blind",
        TransferKind::Attended { .. } => "call.transfer.attended",
    }
}
