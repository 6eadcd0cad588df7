//! Scripted SIP peers and the call flows they drive, step by step, as a real OpenSIPS 3.4.18
//! with sipp peers did when the fixtures were captured (docs/opensips.md §3-§5, fixtures README).
//!
//! Each flow is a task that sleeps [`crate::SimConfig::step`] between SIP steps and raises
//! the events OpenSIPS raises at each, in the captured order. A flow stops as soon as the
//! sim restarts (its generation changes) or the call is gone.

use std::sync::Arc;
use std::time::Duration;

use callbus_schemas::event::{
    CallHold, CallTransfer, DlgState, DlgStateChanged, Event, HoldAction, HoldState, Leg, TransferState, UaEntity,
    UaEventType, UaSession as UaSessionEvent,
};
use serde_json::Map;

use crate::sip::{self, HeaderBlock};
use crate::{Dialog, Inner, SimError, Source, State, UaSession};

mod ua;
pub(crate) use ua::*;

/// How a proxied call's callee behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// 180, then 200, then the caller ACKs: 1→2, 2→3, 3→4.
    Answered,
    /// 180, then 486 Busy Here: 1→2, 2→5.
    Rejected,
    /// 180, then the caller CANCELs: 1→2, 2→5.
    Cancelled,
    /// Nobody answers the INVITE (no UAS listening): 408 from tm, 1→5 with `to_tag` null.
    NoAnswer,
}

/// A scripted proxied call.
#[derive(Clone, Debug)]
pub struct CallScript {
    /// The caller's URI (From).
    pub from_uri: String,
    /// The callee's URI (To).
    pub to_uri: String,
    /// What the callee does with the INVITE.
    pub outcome: Outcome,
    /// When answered: the caller hangs up (BYE) after this long; None keeps the call up.
    pub hangup_after: Option<Duration>,
    /// The callee answers every re-INVITE with 488 (hold/unhold fail on its leg).
    pub callee_rejects_reinvite: bool,
    /// The leg receiving a REFER declines it with 603 (no transfer event at all).
    pub declines_refer: bool,
    /// A call made by a transferee for this call is hung up after this long.
    pub new_call_hangup_after: Option<Duration>,
}

impl Default for CallScript {
    fn default() -> Self {
        CallScript {
            from_uri: "sip:sipp@127.0.0.1:5070".into(),
            to_uri: "sip:bob@127.0.0.1:5060".into(),
            outcome: Outcome::Answered,
            hangup_after: None,
            callee_rejects_reinvite: false,
            declines_refer: false,
            new_call_hangup_after: None,
        }
    }
}

/// How the SIP peer reached by a UA client session behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UaPeer {
    /// 180 Ringing, then 200 OK with an SDP answer.
    Answer,
    /// 180 Ringing, then 486 Busy Here.
    Busy,
    /// Nothing listens: 408 "Timeout" after [`crate::SimConfig::ua_timeout`].
    Unreachable,
    /// 180 Ringing, then nothing: 408 "Timeout" after [`crate::SimConfig::ua_timeout`].
    RingNoAnswer,
}

/// An incoming INVITE handled by `ua_session_server_init`.
#[derive(Clone, Debug)]
pub struct UasScript {
    /// The flags given to `ua_session_server_init` (`a`, `r`, `h`, `b`, `n`, `d`, `t<secs>`).
    pub flags: String,
    /// The caller's URI.
    pub from_uri: String,
    /// The URI called.
    pub to_uri: String,
    /// The INVITE's body (the caller's SDP offer); None for an INVITE without body.
    pub body: Option<String>,
    /// An optional `Subject:` header.
    pub subject: Option<String>,
}

impl Default for UasScript {
    fn default() -> Self {
        UasScript {
            flags: "arhb".into(),
            from_uri: "sip:sipp@127.0.0.1:5072".into(),
            to_uri: "sip:ua@127.0.0.1:5060".into(),
            body: Some(sip::sdp("uac", 20288, Some("sendrecv"))),
            subject: None,
        }
    }
}

/// An in-dialog request sent by the remote side of a UA session.
#[derive(Clone, Debug)]
pub enum RemoteRequest {
    /// A re-INVITE with this SDP (answer it with `ua_session_reply`).
    ReInvite(String),
    /// An INFO with this body (answer it with `ua_session_reply`).
    Info(String),
    /// A BYE: OpenSIPS answers 200 itself and deletes the session.
    Bye,
    /// A CANCEL of the unanswered initial INVITE (UA server sessions only).
    Cancel,
}

/// The flags of a UA session (b2b_entities).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct UaFlags {
    pub report_ack: bool,
    pub no_auto_ack: bool,
    pub headers: bool,
    pub body: bool,
    pub no_new: bool,
}

impl UaFlags {
    /// Parses a flags string; unknown letters are ignored, as OpenSIPS logs and ignores them.
    pub fn parse(flags: &str) -> UaFlags {
        UaFlags {
            report_ack: flags.contains('a'),
            no_auto_ack: flags.contains('d'),
            headers: flags.contains('h'),
            body: flags.contains('b'),
            no_new: flags.contains('n'),
        }
    }
}

/// METHOD_* bits as `ua_session_list` reports `last_method`.
pub(crate) fn method_bit(method: &str) -> u32 {
    match method {
        "INVITE" => 1,
        "CANCEL" => 2,
        "ACK" => 4,
        "BYE" => 8,
        "INFO" => 16,
        "OPTIONS" => 32,
        "UPDATE" => 64,
        "MESSAGE" => 256,
        "NOTIFY" => 1024,
        "PRACK" => 2048,
        "REFER" => 4096,
        _ => 0,
    }
}

async fn step(inner: &Inner) {
    tokio::time::sleep(inner.config.step).await;
}

/// Runs `f` on the state if the sim has not restarted since `generation`.
fn with_state<T>(inner: &Inner, generation: u64, f: impl FnOnce(&mut State) -> Option<T>) -> Option<T> {
    let mut state = inner.lock();
    if state.generation != generation {
        return None;
    }
    f(&mut state)
}

/// Runs `f` on the state if the sim has not restarted since `generation`.
fn if_current(inner: &Inner, generation: u64, f: impl FnOnce(&mut State)) {
    let mut state = inner.lock();
    if state.generation == generation {
        f(&mut state);
    }
}

/// Creates a dialog in state 1 (no event: OpenSIPS raises none for creation).
pub(crate) fn new_dialog(state: &mut State, from_uri: &str, to_uri: &str, script: CallScript) -> String {
    let n = state.ids.next_counter();
    let pid = 16_000 + (state.ids.next_u64() % 9_000);
    let callid = format!("{n}-{pid}@127.0.0.1");
    let h_entry = (state.ids.next_u64() % 4096) as u32;
    let h_id = state.ids.next_u64() as u32;
    let (id, db_id) = sip::dialog_ids(h_entry, h_id);
    let dialog = Dialog {
        id,
        db_id,
        callid: callid.clone(),
        from_tag: format!("{pid}SIPpTag00{n}"),
        to_tag: None,
        from_uri: from_uri.to_owned(),
        to_uri: to_uri.to_owned(),
        state: DlgState::Unconfirmed,
        timestart: sip::unix_now(),
        caller_sdp: sip::sdp("uac", 20280, Some("sendrecv")),
        callee_sdp: sip::sdp("uas", 20320, Some("sendrecv")),
        held_caller: false,
        held_callee: false,
        transfer_leg: None,
        script,
    };
    state.processed_dialogs += 1;
    state.insert_dialog(dialog);
    callid
}

/// Moves a dialog to `new_state` and raises `E_DLG_STATE_CHANGED`. False when the dialog is
/// gone, already there, or the sim restarted.
pub(crate) fn transition(inner: &Inner, generation: u64, callid: &str, new_state: DlgState) -> bool {
    with_state(inner, generation, |state| {
        let dialog = state.dialogs.get_mut(callid)?;
        if dialog.state == new_state || dialog.state == DlgState::Deleted {
            return None;
        }
        let old_state = dialog.state;
        dialog.state = new_state;
        if new_state != DlgState::Deleted && dialog.to_tag.is_none() {
            let pid = 16_000 + (state.ids.next_u64() % 9_000);
            if let Some(d) = state.dialogs.get_mut(callid) {
                d.to_tag = Some(format!("{pid}SIPpTag011"));
            }
        }
        let dialog = state.dialogs.get(callid)?;
        let event = Event::DlgStateChanged(DlgStateChanged {
            id: dialog.id.clone(),
            db_id: dialog.db_id.clone(),
            callid: dialog.callid.clone(),
            from_tag: dialog.from_tag.clone(),
            to_tag: dialog.to_tag.clone(),
            old_state,
            new_state,
            extra: Map::new(),
        });
        inner.raise(state, Source::Sip, &event);
        if new_state == DlgState::Deleted {
            if old_state != DlgState::Confirmed && old_state != DlgState::Answered {
                state.failed_dialogs += 1;
            }
            state.remove_dialog(callid);
        }
        Some(())
    })
    .is_some()
}

/// Starts a proxied call; see [`crate::Sim::proxied_call`].
pub(crate) fn start_proxied(inner: &Arc<Inner>, script: CallScript) -> String {
    let (generation, callid) = {
        let mut state = inner.lock();
        let callid = new_dialog(&mut state, &script.from_uri.clone(), &script.to_uri.clone(), script.clone());
        (state.generation, callid)
    };
    let task_inner = Arc::clone(inner);
    let id = callid.clone();
    tokio::spawn(async move { run_proxied(task_inner, generation, id, script).await });
    callid
}

async fn run_proxied(inner: Arc<Inner>, generation: u64, callid: String, script: CallScript) {
    let inner = &*inner;
    if script.outcome == Outcome::NoAnswer {
        tokio::time::sleep(inner.config.ua_timeout).await;
        transition(inner, generation, &callid, DlgState::Deleted);
        return;
    }
    step(inner).await;
    if !transition(inner, generation, &callid, DlgState::Early) {
        return;
    }
    step(inner).await;
    if script.outcome != Outcome::Answered {
        transition(inner, generation, &callid, DlgState::Deleted);
        return;
    }
    if !transition(inner, generation, &callid, DlgState::Answered) {
        return;
    }
    step(inner).await;
    if !transition(inner, generation, &callid, DlgState::Confirmed) {
        return;
    }
    if let Some(after) = script.hangup_after {
        tokio::time::sleep(after).await;
        transition(inner, generation, &callid, DlgState::Deleted);
    }
}

/// `dlg_end_dlg` accepted: BYE (or CANCEL if not answered) goes out; the dialog ends a step later.
pub(crate) fn end_dialog_later(inner: &Arc<Inner>, generation: u64, callid: String) {
    let inner = Arc::clone(inner);
    tokio::spawn(async move {
        step(&inner).await;
        transition(&inner, generation, &callid, DlgState::Deleted);
    });
}

fn hold_event(callid: &str, leg: Leg, hold: bool, state: HoldState) -> Event {
    Event::CallHold(CallHold {
        callid: callid.to_owned(),
        leg,
        action: if hold { HoldAction::Hold } else { HoldAction::Unhold },
        state,
        extra: Map::new(),
    })
}

/// `call_hold`/`call_unhold` accepted: raises `start` per leg now (in the MI process, before
/// the reply), then `ok`/`fail` per leg when the re-INVITE replies arrive. Hold goes caller
/// then callee, unhold callee then caller (fixtures `E_CALL_HOLD.*.call_hold|call_unhold`).
/// Legs already in the wanted state are skipped without events. Returns false when no leg
/// needs a re-INVITE (the caller answers 480).
pub(crate) fn hold(inner: &Arc<Inner>, state: &mut State, callid: &str, hold: bool) -> bool {
    let Some(dialog) = state.dialogs.get_mut(callid) else {
        return false;
    };
    let legs: Vec<Leg> = if hold {
        [(Leg::Caller, dialog.held_caller), (Leg::Callee, dialog.held_callee)]
            .into_iter()
            .filter(|(_, held)| !held)
            .map(|(leg, _)| leg)
            .collect()
    } else {
        [(Leg::Callee, dialog.held_callee), (Leg::Caller, dialog.held_caller)]
            .into_iter()
            .filter(|(_, held)| *held)
            .map(|(leg, _)| leg)
            .collect()
    };
    if legs.is_empty() {
        return false;
    }
    // 3.4 writes the hold mark when the re-INVITE is sent, so a leg that answers 488 still
    // counts as held (fixture mi/call_unhold.after_partial_hold re-INVITEs both legs).
    for leg in &legs {
        match leg {
            Leg::Caller => dialog.held_caller = hold,
            _ => dialog.held_callee = hold,
        }
    }
    let rejects = dialog.script.callee_rejects_reinvite;
    let generation = state.generation;
    for leg in &legs {
        inner.raise(state, Source::Mi, &hold_event(callid, leg.clone(), hold, HoldState::Start));
    }
    let task_inner = Arc::clone(inner);
    let callid = callid.to_owned();
    tokio::spawn(async move {
        step(&task_inner).await;
        for leg in legs {
            let outcome = if rejects && leg == Leg::Callee { HoldState::Fail } else { HoldState::Ok };
            let raised = with_state(&task_inner, generation, |state| {
                state.dialogs.contains_key(&callid).then_some(())?;
                task_inner.raise(state, Source::Sip, &hold_event(&callid, leg.clone(), hold, outcome));
                Some(())
            });
            if raised.is_none() {
                return;
            }
        }
    });
    true
}

fn transfer_event(callid: &str, leg: Leg, new_call: &str, destination: &str, st: TransferState, status: &str) -> Event {
    Event::CallTransfer(CallTransfer {
        callid: callid.to_owned(),
        leg,
        transfer_callid: new_call.to_owned(),
        destination: destination.to_owned(),
        state: st,
        status: status.to_owned(),
        extra: Map::new(),
    })
}

/// What a transfer links: the call whose leg got the REFER and, for an attended transfer, the
/// call being replaced.
pub(crate) struct Transfer {
    pub callid: String,
    pub leg: Leg,
    pub destination: String,
    pub replaces: Option<(String, Leg)>,
}

/// `call_transfer` accepted (the REFER is sent). If the leg declines the REFER, nothing is
/// raised and the transfer never clears (fixture mi/call_transfer.refer_declined). Otherwise
/// the transferee's new call arrives and the captured orders follow: blind `start, ok,
/// notify`; attended `start(A), start(B), ok(B), ok(A), notify(A)`.
pub(crate) fn transfer(inner: &Arc<Inner>, state: &mut State, t: Transfer) {
    let generation = state.generation;
    for callid in std::iter::once(&t.callid).chain(t.replaces.as_ref().map(|(c, _)| c)) {
        if let Some(d) = state.dialogs.get_mut(callid) {
            d.transfer_leg = Some(t.leg.to_string());
        }
    }
    let Some(dialog) = state.dialogs.get(&t.callid) else {
        return;
    };
    let declines = dialog.script.declines_refer;
    let new_call_script = CallScript {
        hangup_after: dialog.script.new_call_hangup_after,
        new_call_hangup_after: None,
        ..CallScript::default()
    };
    let transferee_uri = match t.leg {
        Leg::Caller => dialog.from_uri.clone(),
        _ => dialog.to_uri.clone(),
    };
    let inner = Arc::clone(inner);
    tokio::spawn(async move {
        let inner = &*inner;
        step(inner).await;
        let finish = |state: &mut State| {
            for callid in std::iter::once(&t.callid).chain(t.replaces.as_ref().map(|(c, _)| c)) {
                if let Some(d) = state.dialogs.get_mut(callid) {
                    d.transfer_leg = Some(String::new());
                }
            }
        };
        if declines {
            if_current(inner, generation, |state| finish(state));
            return;
        }
        let new_call = with_state(inner, generation, |state| {
            let new_call = new_dialog(state, &transferee_uri, &t.destination, new_call_script.clone());
            // OpenSIPS 3.4.18 puts the new call's Call-ID in `leg` of a blind transfer's start
            // (fixture events/E_CALL_TRANSFER.1.call_transfer_blind.json); attended is right.
            let start_leg = if t.replaces.is_some() { t.leg.clone() } else { Leg::Unknown(new_call.clone()) };
            let start = transfer_event(&t.callid, start_leg, &new_call, &t.destination, TransferState::Start, "");
            inner.raise(state, Source::Sip, &start);
            if let Some((b, b_leg)) = &t.replaces {
                let start_b = transfer_event(b, b_leg.clone(), &new_call, &t.destination, TransferState::Start, "");
                inner.raise(state, Source::Sip, &start_b);
            }
            Some(new_call)
        });
        let Some(new_call) = new_call else { return };
        step(inner).await;
        transition(inner, generation, &new_call, DlgState::Early);
        step(inner).await;
        transition(inner, generation, &new_call, DlgState::Answered);
        with_state(inner, generation, |state| {
            if let Some((b, b_leg)) = &t.replaces {
                let ok_b = transfer_event(b, b_leg.clone(), &new_call, &t.destination, TransferState::Ok, "200 OK");
                inner.raise(state, Source::Sip, &ok_b);
            }
            let ok = transfer_event(&t.callid, t.leg.clone(), &new_call, &t.destination, TransferState::Ok, "200 OK");
            inner.raise(state, Source::Sip, &ok);
            finish(state);
            Some(())
        });
        step(inner).await;
        transition(inner, generation, &new_call, DlgState::Confirmed);
        step(inner).await;
        with_state(inner, generation, |state| {
            let notify =
                transfer_event(&t.callid, Leg::Unknown(String::new()), &new_call, "", TransferState::Notify, "200 OK");
            inner.raise(state, Source::Sip, &notify);
            Some(())
        });
        if let Some(after) = new_call_script.hangup_after {
            tokio::time::sleep(after).await;
            transition(inner, generation, &new_call, DlgState::Deleted);
        }
    });
}

// ---------------------------------------------------------------------------------------
// UA sessions (b2b_entities)
// ---------------------------------------------------------------------------------------
