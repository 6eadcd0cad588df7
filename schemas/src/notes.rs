//! What a notification's `data` holds, event by event, for each kind of call: the machines
//! build these types and nothing else, and a test holds them to `docs/subjects.md`'s tables
//! ([`crate::catalog`]) both ways: every variant's event and fields are listed for its kind, and
//! every listed field is sent by some variant.
//!
//! A variant is an event (its name in snake case is the last subject token); its fields are
//! `data`'s. Where one event has two shapes (a UA `answered` as client or as server), two
//! variants carry the same name. An `Option` field is sent as `null` when empty unless it says
//! it is left out.

use serde::Serialize;
use serde_json::Value;

use crate::catalog::Table;
use crate::command::LegName;

/// A notification of a call: its event and its `data`.
pub trait Note: Serialize {
    /// The table of `docs/subjects.md` that lists it.
    const TABLE: Table;

    /// The event and the data, as sent.
    fn parts(&self) -> (String, Value) {
        match serde_json::to_value(self) {
            Ok(Value::Object(map)) => match map.into_iter().next() {
                Some((event, data)) => (event, data),
                None => (String::new(), Value::Null),
            },
            Ok(Value::String(event)) => (event, Value::Object(Default::default())),
            Ok(other) => (String::new(), other),
            Err(e) => (String::new(), Value::String(e.to_string())),
        }
    }
}

fn is_none<T>(value: &Option<T>) -> bool {
    value.is_none()
}

/// The outcome of a command, for every kind of call.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The command `cmd_id` did what it asked.
    CommandSucceeded {
        /// The command's verb, as on its subject.
        verb: String,
        /// What it gave.
        detail: Box<Detail>,
    },
    /// The command `cmd_id` could not be done.
    CommandFailed {
        /// The command's verb.
        verb: String,
        /// Why, in words.
        reason: String,
    },
}

impl Note for Outcome {
    const TABLE: Table = Table::Every;
}

/// What a succeeded command gave: the fields its verb fills, the others left out.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Detail {
    /// `call.end`, `ua.terminate`: why the call ended.
    #[serde(skip_serializing_if = "is_none")]
    pub reason: Option<String>,
    /// `call.hold`/`call.unhold` of a proxied call: each leg's hold state; `call.start`: the
    /// caller's URI.
    #[serde(skip_serializing_if = "is_none")]
    pub caller: Option<String>,
    /// As `caller`, for the callee.
    #[serde(skip_serializing_if = "is_none")]
    pub callee: Option<String>,
    /// `call.start`: the caller's UA session key.
    #[serde(skip_serializing_if = "is_none")]
    pub caller_key: Option<String>,
    /// `call.start`: the callee's UA session key.
    #[serde(skip_serializing_if = "is_none")]
    pub callee_key: Option<String>,
    /// A proxied call's transfer: the new call's SIP Call-ID.
    #[serde(skip_serializing_if = "is_none")]
    pub new_sip_call_id: Option<String>,
    /// A click-to-dial call's transfer: who was called.
    #[serde(skip_serializing_if = "is_none")]
    pub destination: Option<String>,
    /// A remark on how it went.
    #[serde(skip_serializing_if = "is_none")]
    pub note: Option<String>,
    /// `ua.update`, `ua.answer`: the request's method.
    #[serde(skip_serializing_if = "is_none")]
    pub method: Option<String>,
    /// `ua.answer`: the status code sent.
    #[serde(skip_serializing_if = "is_none")]
    pub code: Option<u16>,
    /// `ua.start`, `ua.update`: the remote side's final status.
    #[serde(skip_serializing_if = "is_none")]
    pub status: Option<i64>,
}

/// The moves of a proxied call's dialog: OpenSIPS's state codes, or how a reconciliation
/// found it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Moved {
    /// OpenSIPS's dialog state code before.
    #[serde(skip_serializing_if = "is_none")]
    pub old_state: Option<i64>,
    /// After.
    #[serde(skip_serializing_if = "is_none")]
    pub new_state: Option<i64>,
    /// `reconcile`: found by a reconciliation, not an event (left out otherwise).
    #[serde(skip_serializing_if = "is_none")]
    pub source: Option<String>,
}

impl Moved {
    /// A move OpenSIPS reported.
    pub fn states(old: i64, new: i64) -> Moved {
        Moved { old_state: Some(old), new_state: Some(new), source: None }
    }

    /// A move a reconciliation found.
    pub fn reconciled() -> Moved {
        Moved { old_state: None, new_state: None, source: Some("reconcile".into()) }
    }
}

/// A notification of a proxied call (`dialog`).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DialogNote {
    /// A 1xx.
    Early(Moved),
    /// A 2xx.
    Answered(Moved),
    /// The ACK.
    Confirmed(Moved),
    /// The call is over.
    Ended {
        /// `hung_up`, `not_answered`, `no_answer`, `ended_by_command`, `transferred`, `gone`, ...
        reason: String,
    },
    /// OpenSIPS accepted `dlg_end_dlg`.
    Ending {},
    /// OpenSIPS accepted `call_hold`.
    HoldRequested {},
    /// OpenSIPS accepted `call_unhold`.
    UnholdRequested {},
    /// A leg's hold re-INVITE went out.
    HoldStarted {
        /// `caller` or `callee`.
        leg: String,
    },
    /// A leg is held.
    Held {
        /// The leg.
        leg: String,
    },
    /// A leg refused the hold.
    HoldFailed {
        /// The leg.
        leg: String,
    },
    /// A leg's resume re-INVITE went out.
    UnholdStarted {
        /// The leg.
        leg: String,
    },
    /// A leg talks again.
    Resumed {
        /// The leg.
        leg: String,
    },
    /// A leg refused the resume.
    UnholdFailed {
        /// The leg.
        leg: String,
    },
    /// OpenSIPS sent the REFER.
    TransferRequested {
        /// The transfer asked.
        kind: TransferKind,
    },
    /// The transferee's new call arrived.
    TransferStarted {
        /// Its SIP Call-ID.
        new_sip_call_id: String,
        /// Where it goes.
        destination: String,
    },
    /// A NOTIFY.
    TransferProgress {
        /// As OpenSIPS gives it, e.g. `"200 OK"`.
        status: String,
    },
    /// The new call was answered.
    Transferred {
        /// Its SIP Call-ID.
        new_sip_call_id: String,
        /// Its status line.
        status: String,
    },
    /// The transfer did not happen.
    TransferFailed {
        /// Why, in words (left out when the target's status says it).
        #[serde(skip_serializing_if = "is_none")]
        reason: Option<String>,
        /// The target's status line (left out when there is none).
        #[serde(skip_serializing_if = "is_none")]
        status: Option<String>,
    },
}

impl Note for DialogNote {
    const TABLE: Table = Table::Dialog;
}

/// A proxied call's transfer, as asked: `{"blind": {"leg", "destination"}}` or
/// `{"attended": {"leg", "other", "other_leg"}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransferKind {
    /// `leg` is sent to `destination`.
    Blind {
        /// The leg that stays.
        leg: LegName,
        /// Where it goes.
        destination: String,
    },
    /// `leg` is connected with `other_leg` of call `other`.
    Attended {
        /// The leg that gets the REFER.
        leg: LegName,
        /// The other call's SIP Call-ID.
        other: String,
        /// Its leg.
        other_leg: LegName,
    },
}

/// A notification of a UA session (`ua_client`, `ua_server`).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UaNote {
    /// `ua.start` logged.
    Starting {
        /// To, as given.
        to: String,
        /// From, as given.
        from: String,
        /// The request URI.
        ruri: String,
    },
    /// OpenSIPS started the session.
    Calling {
        /// Its key.
        key: String,
    },
    /// A 1xx to our INVITE.
    Early {
        /// The status code.
        status: i64,
        /// The reason phrase.
        reason: Option<String>,
        /// Early media SDP.
        body: Option<String>,
        /// The reply's headers.
        headers: Option<String>,
    },
    /// Another provisional answer.
    Progress {
        /// The request it answers.
        method: String,
        /// The status code.
        status: i64,
        /// The reason phrase.
        reason: Option<String>,
        /// Its body.
        body: Option<String>,
    },
    /// A server's 2xx was sent.
    Answered {
        /// The code sent.
        status: u16,
    },
    /// A 2xx to a client's INVITE.
    #[serde(rename = "answered")]
    AnsweredClient {
        /// The status code.
        status: i64,
        /// The reason phrase.
        reason: Option<String>,
        /// The answer's SDP.
        body: Option<String>,
        /// The reply's headers.
        headers: Option<String>,
        /// `manual_ack`: the app sends the ACK.
        ack_due: bool,
    },
    /// The caller's ACK (server).
    Confirmed {
        /// Its body.
        body: Option<String>,
    },
    /// Our ACK went out (client with `manual_ack`).
    #[serde(rename = "confirmed")]
    ConfirmedByUs {},
    /// A later ACK from the remote side.
    Ack {
        /// Its body.
        body: Option<String>,
    },
    /// `manual_ack`: the app did not ACK in time, so callbus did.
    AckSentByEngine {
        /// After how long.
        after_ms: u64,
    },
    /// A final ≥ 300 to our INVITE.
    Rejected {
        /// The status code.
        status: i64,
        /// The reason phrase.
        reason: Option<String>,
        /// `busy`, `no_answer`, `declined`, `not_found`, `cancelled`, `rejected`.
        cause: String,
        /// The reply's headers.
        headers: Option<String>,
    },
    /// An incoming INVITE to answer.
    Incoming {
        /// The session key.
        key: String,
        /// From, as sent.
        from: Option<String>,
        /// To, as sent.
        to: Option<String>,
        /// From's URI.
        caller: Option<String>,
        /// To's URI.
        callee: Option<String>,
        /// The offer.
        body: Option<String>,
        /// Its Content-Type.
        content_type: Option<String>,
        /// The request's headers.
        headers: Option<String>,
    },
    /// Nobody answered the incoming call in time: declined with 480.
    OfferExpired {
        /// After how long.
        after_ms: u64,
    },
    /// The remote side's in-dialog request.
    Request {
        /// Its method.
        method: String,
        /// Its body.
        body: Option<String>,
        /// Its headers.
        headers: Option<String>,
        /// Its Content-Type.
        content_type: Option<String>,
    },
    /// Nobody answered the remote side's request in time: callbus answered 500.
    RequestExpired {
        /// Its method.
        method: String,
        /// The code sent.
        answered: u16,
    },
    /// Our answer went out.
    Replied {
        /// The request answered.
        method: String,
        /// The code sent.
        status: u16,
    },
    /// Our in-dialog request went out.
    UpdateSent {
        /// Its method.
        method: String,
    },
    /// Our in-dialog request was answered.
    UpdateAnswered {
        /// Its method.
        method: String,
        /// The status code.
        status: i64,
        /// The reason phrase.
        reason: Option<String>,
        /// The answer's body.
        body: Option<String>,
        /// Its headers.
        headers: Option<String>,
    },
    /// Our in-dialog request was refused.
    UpdateRejected {
        /// Its method.
        method: String,
        /// The status code.
        status: i64,
        /// The reason phrase.
        reason: Option<String>,
        /// Its headers.
        headers: Option<String>,
    },
    /// Our in-dialog request had no answer in time.
    UpdateTimeout {
        /// Its method.
        method: String,
    },
    /// `ua.terminate` / `call.end` logged.
    Ending {
        /// Who ends it.
        by: String,
    },
    /// The session is over.
    Ended {
        /// `local`, `remote`, `engine`, `opensips`.
        by: String,
        /// `hung_up`, `cancelled`, `declined`, ...
        reason: String,
        /// The final status, if there was one.
        status: Option<i64>,
    },
}

impl Note for UaNote {
    const TABLE: Table = Table::Ua;
}

/// A notification of a click-to-dial call (`bridged`).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BridgedNote {
    /// A leg is being called.
    Dialing {
        /// `caller`, `callee` or `transfer_target`.
        leg: String,
        /// Its URI.
        uri: String,
    },
    /// OpenSIPS started a leg's session.
    Calling(LegSession),
    /// A leg rings.
    Ringing(Ringing),
    /// The transfer target rings.
    TransferRinging(Ringing),
    /// A leg answered.
    Answered(LegSession),
    /// The two parties talk.
    Connected(Connected),
    /// A leg could not be reached or kept: the other is ended.
    Failed {
        /// The leg.
        leg: String,
        /// Why, as a word.
        cause: String,
        /// Its status, if it answered.
        status: Option<i64>,
        /// Why, in words.
        detail: String,
    },
    /// The hold was asked.
    HoldRequested {},
    /// Both legs are held.
    Held {},
    /// The resume was asked.
    UnholdRequested {},
    /// Both legs talk again.
    Resumed {},
    /// One leg answered its hold re-INVITE.
    LegHeld(LegReply),
    /// One leg answered its resume re-INVITE.
    LegResumed(LegReply),
    /// One leg refused its hold re-INVITE.
    LegHoldFailed(LegReply),
    /// One leg refused its resume re-INVITE.
    LegUnholdFailed(LegReply),
    /// One leg did not answer its re-INVITE.
    LegHoldTimeout {
        /// The leg.
        leg: String,
    },
    /// `call.end` logged.
    Ending {
        /// Who ends it.
        by: String,
    },
    /// A phone sent callbus an in-dialog request.
    Request {
        /// The leg.
        leg: String,
        /// Its method.
        method: String,
        /// Its body.
        body: Option<String>,
    },
    /// A blind transfer: the new party is being called.
    TransferRequested {
        /// The leg that stays.
        staying: String,
        /// The leg replaced.
        replaced: String,
        /// Who is called.
        destination: String,
    },
    /// The new party answered.
    TransferAnswered {
        /// Who.
        destination: String,
        /// Its UA session key.
        key: Option<String>,
    },
    /// The new party replaced the other leg.
    Transferred {
        /// Who.
        destination: String,
        /// The leg that stayed.
        staying: String,
    },
    /// The new party could not be reached.
    TransferFailed {
        /// Who.
        destination: String,
        /// Why, as a word.
        cause: String,
        /// Its status, if it answered.
        status: Option<i64>,
    },
    /// The call is over.
    Ended {
        /// `caller`, `callee`, `local`, `engine`, `remote`.
        by: String,
        /// `hung_up`, `caller_busy`, ...
        reason: String,
        /// The final status, if there was one.
        status: Option<i64>,
    },
}

impl Note for BridgedNote {
    const TABLE: Table = Table::Bridged;
}

/// A click-to-dial leg's session, with the parties.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LegSession {
    /// The leg.
    pub leg: String,
    /// Its UA session key.
    pub key: Option<String>,
    /// The caller's URI.
    pub caller: String,
    /// The callee's URI.
    pub callee: String,
}

/// A click-to-dial leg ringing.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Ringing {
    /// The leg.
    pub leg: String,
    /// Its UA session key.
    pub key: Option<String>,
    /// The status code.
    pub status: i64,
    /// The reason phrase.
    pub reason: Option<String>,
    /// The caller's URI.
    pub caller: String,
    /// The callee's URI.
    pub callee: String,
}

/// The parties of a connected click-to-dial call.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Connected {
    /// The caller's URI.
    pub caller: String,
    /// The callee's URI.
    pub callee: String,
    /// The caller's UA session key.
    pub caller_key: Option<String>,
    /// The callee's UA session key.
    pub callee_key: Option<String>,
}

/// One click-to-dial leg's answer to a re-INVITE.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LegReply {
    /// The leg.
    pub leg: String,
    /// The status code.
    pub status: i64,
}

#[cfg(test)]
#[path = "notes_tests.rs"]
mod tests;
