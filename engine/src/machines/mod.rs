//! Per-call state machines: pure `(state, input, ctx) -> (state, effects)`, no clock, I/O or
//! randomness inside; time and ids arrive in [`Ctx`]. One file per kind of call.
//!
//! Replaying a log through the same code gives the same states and effects; through new code
//! it shows where behaviour changed.

pub mod bridged;
pub mod dialog;
pub mod sdp;
pub mod ua;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use callbus_schemas::bus::MiBusReply;
use callbus_schemas::command::Command;
use callbus_schemas::event::Event;
use callbus_schemas::notes::{Detail, Outcome};

/// The event of a datagram: `parsed` when the engine parsed it already, else parsed here (None
/// when it is not an event).
pub(crate) fn parsed_or_parse<'a>(parsed: Option<&'a Event>, datagram: &str) -> Option<std::borrow::Cow<'a, Event>> {
    match parsed {
        Some(event) => Some(std::borrow::Cow::Borrowed(event)),
        None => Event::parse(datagram.as_bytes()).ok().map(std::borrow::Cow::Owned),
    }
}

/// Adds a notification of the call: `note` is its event and its data.
pub(crate) fn notify(effects: &mut Vec<Effect>, cmd_id: Option<&str>, note: impl callbus_schemas::notes::Note) {
    let (event, data) = note.parts();
    effects.push(Effect::Notify { event, cmd_id: cmd_id.map(str::to_owned), data });
}

/// Adds the success of the command `cmd_id` (`verb`), with what it gave.
pub(crate) fn succeeded(effects: &mut Vec<Effect>, cmd_id: Option<&str>, verb: &str, detail: Detail) {
    if cmd_id.is_some() {
        notify(effects, cmd_id, Outcome::CommandSucceeded { verb: verb.to_owned(), detail: Box::new(detail) });
    }
}

/// Adds the failure of the command `cmd_id` (`verb`), with why.
pub(crate) fn failed(effects: &mut Vec<Effect>, cmd_id: Option<&str>, verb: &str, reason: &str) {
    if cmd_id.is_some() {
        notify(effects, cmd_id, Outcome::CommandFailed { verb: verb.to_owned(), reason: reason.to_owned() });
    }
}

pub use bridged::BridgedState;
pub use dialog::DialogState;
pub use ua::{UaRole, UaState};

/// An input to a call's machine, exactly as it is logged.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Input {
    /// An OpenSIPS event datagram as the bridge published it.
    Event {
        /// The OpenSIPS node.
        node: String,
        /// The bridge's sequence number for it, when known.
        bridge_seq: Option<u64>,
        /// The datagram (JSON text).
        datagram: String,
    },
    /// An app command (already validated; other calls it names are resolved to SIP Call-IDs).
    Command {
        /// The command's id.
        cmd_id: String,
        /// The command.
        command: Command,
    },
    /// The answer to an MI request the machine asked for.
    MiReply {
        /// The request's id (from [`Effect::Mi`]).
        request: String,
        /// OpenSIPS's (or the bridge's) answer.
        reply: MiBusReply,
    },
    /// A timer the machine started has fired.
    Timer {
        /// Its name (from [`Effect::StartTimer`]).
        name: String,
    },
    /// What OpenSIPS said of the call when the engine reconciled after a restart.
    Reconcile {
        /// The state OpenSIPS reports (dialog state number), or None when it no longer has the call.
        opensips_state: Option<i64>,
    },
}

impl Input {
    /// A short name for timelines and metrics.
    pub fn label(&self) -> String {
        match self {
            Input::Event { datagram, .. } => {
                callbus_schemas::event::event_name(datagram.as_bytes()).unwrap_or_default()
            }
            Input::Command { command, .. } => format!("cmd {}", command_verb(command)),
            Input::MiReply { request, .. } => format!("mi reply {request}"),
            Input::Timer { name } => format!("timer {name}"),
            Input::Reconcile { .. } => "reconcile".into(),
        }
    }
}

/// The verb of a command, as on the subject.
pub fn command_verb(command: &Command) -> &'static str {
    command.verb().as_str()
}

/// What a machine asks the engine to do.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    /// Run an MI command through the node's bridge; its answer comes back as [`Input::MiReply`].
    Mi {
        /// The request's id (unique, derived from the record's sequence).
        request: String,
        /// The OpenSIPS node.
        node: String,
        /// The MI command.
        command: String,
        /// Its named params.
        params: Value,
    },
    /// Publish a notification on `callbus.call.<call_id>.<event>`.
    Notify {
        /// The event (a subject token).
        event: String,
        /// The command it concerns, if any.
        cmd_id: Option<String>,
        /// Details.
        data: Value,
    },
    /// Start (or restart) a timer; it comes back as [`Input::Timer`].
    StartTimer {
        /// Its name, unique within the call (a machine's constant, borrowed, or made per call).
        name: std::borrow::Cow<'static, str>,
        /// After how long.
        after_ms: u64,
    },
    /// Stop a timer.
    CancelTimer {
        /// Its name.
        name: std::borrow::Cow<'static, str>,
    },
}

impl Effect {
    /// The effect that runs `call` on `node`.
    pub fn mi(request: String, node: String, call: callbus_schemas::mi_call::MiCall) -> Effect {
        Effect::Mi { request, node, command: call.command().to_owned(), params: call.params() }
    }
}

/// A call's state, by kind.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallState {
    /// A proxied call (OpenSIPS dialog + callops).
    Dialog(DialogState),
    /// A UA session, client or server (b2b_entities).
    Ua(UaState),
    /// A click-to-dial call over two UA client sessions (boxed: it is the largest state, and
    /// proxied calls should not pay its size).
    Bridged(Box<BridgedState>),
}

impl CallState {
    /// The state's name, as notifications and `call.list` show it.
    pub fn name(&self) -> &'static str {
        match self {
            CallState::Dialog(d) => d.state_name(),
            CallState::Ua(u) => u.state_name(),
            CallState::Bridged(b) => b.state_name(),
        }
    }

    /// Whether the call is over.
    pub fn is_ended(&self) -> bool {
        match self {
            CallState::Dialog(d) => d.is_ended(),
            CallState::Ua(u) => u.is_ended(),
            CallState::Bridged(b) => b.is_ended(),
        }
    }

    /// The kind's name.
    pub fn kind(&self) -> &'static str {
        match self {
            CallState::Dialog(_) => "dialog",
            CallState::Ua(u) => u.kind(),
            CallState::Bridged(_) => "bridged",
        }
    }

    /// The OpenSIPS node.
    pub fn node(&self) -> &str {
        match self {
            CallState::Dialog(d) => &d.node,
            CallState::Ua(u) => &u.node,
            CallState::Bridged(b) => &b.node,
        }
    }

    /// The SIP Call-ID, when there is one.
    pub fn sip_call_id(&self) -> Option<&str> {
        match self {
            CallState::Dialog(d) => Some(&d.sip_call_id),
            CallState::Ua(u) => u.sip_call_id.as_deref(),
            CallState::Bridged(_) => None,
        }
    }

    /// The b2b keys of its UA sessions (none for a proxied call).
    pub fn keys(&self) -> Vec<&str> {
        match self {
            CallState::Dialog(_) => Vec::new(),
            CallState::Ua(u) => u.key.as_deref().into_iter().collect(),
            CallState::Bridged(b) => b.keys().collect(),
        }
    }

    /// Feeds one input through the call's machine.
    pub fn step(&self, input: &Input, ctx: &Ctx) -> (CallState, Vec<Effect>) {
        self.step_parsed(input, None, ctx)
    }

    /// As [`CallState::step`], with the event of an [`Input::Event`] already parsed from its
    /// datagram (`parsed`; None: the machine parses it), so the engine parses a datagram once.
    pub fn step_parsed(&self, input: &Input, parsed: Option<&Event>, ctx: &Ctx) -> (CallState, Vec<Effect>) {
        match self {
            CallState::Dialog(d) => {
                let (next, effects) = d.step(input, parsed, ctx);
                (CallState::Dialog(next), effects)
            }
            CallState::Ua(u) => {
                let (next, effects) = u.step(input, parsed, ctx);
                (CallState::Ua(next), effects)
            }
            CallState::Bridged(b) => {
                let (next, effects) = b.step(input, parsed, ctx);
                (CallState::Bridged(Box::new(next)), effects)
            }
        }
    }

    /// Checks a command against the state without changing anything.
    pub fn check(&self, command: &Command) -> Result<(), callbus_schemas::command::CommandError> {
        match self {
            CallState::Dialog(d) => d.check(command),
            CallState::Ua(u) => u.check(command),
            CallState::Bridged(b) => b.check(command),
        }
    }
}

/// How long the machines wait for OpenSIPS, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Timeouts {
    /// A re-INVITE of hold/unhold (Timer B 32 s + margin).
    pub reinvite_ms: u64,
    /// A REFER: OpenSIPS raises nothing when it is declined.
    pub refer_ms: u64,
    /// The transferee's new call to be answered.
    pub transfer_answer_ms: u64,
    /// The dialog to end after `dlg_end_dlg`.
    pub end_ms: u64,
    /// A UA client INVITE to be answered (OpenSIPS's `fr_inv_timeout` 120 s + margin).
    pub ring_ms: u64,
    /// An incoming UA INVITE to be answered by an app before it is declined (480).
    pub offer_ms: u64,
    /// An app's ACK (`manual_ack`) before the engine sends it (the peer gives up after 32 s).
    pub ack_ms: u64,
    /// An app's answer to the remote side's in-dialog request before the engine answers 500.
    pub reply_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            reinvite_ms: 35_000,
            refer_ms: 32_000,
            transfer_answer_ms: 130_000,
            end_ms: 35_000,
            ring_ms: 130_000,
            offer_ms: 30_000,
            ack_ms: 10_000,
            reply_ms: 25_000,
        }
    }
}

/// What a step may know besides state and input.
#[derive(Clone, Debug)]
pub struct Ctx<'a> {
    /// callbus's id of the call.
    pub call_id: &'a str,
    /// The record's sequence (ids derived from it are the same on replay).
    pub seq: u64,
    /// The time of the input.
    pub now_ms: u64,
    /// Timeouts.
    pub timeouts: Timeouts,
}

impl Ctx<'_> {
    /// The id of the `n`-th MI request made while handling this input.
    pub fn request_id(&self, n: usize) -> String {
        format!("{}-{}-{n}", self.call_id, self.seq)
    }
}

/// The call id in an MI request id made by [`Ctx::request_id`].
pub fn call_of_request(request: &str) -> Option<&str> {
    let mut parts = request.rsplitn(3, '-');
    let (_n, _seq, call) = (parts.next()?, parts.next()?, parts.next()?);
    Some(call)
}

/// The state a call starts in before its first record (what `before: None` stands for).
pub fn initial_state(after: &CallState) -> CallState {
    match after {
        CallState::Dialog(d) => CallState::Dialog(DialogState::new(&d.node, &d.sip_call_id)),
        CallState::Ua(u) => CallState::Ua(match (u.role, &u.key) {
            (UaRole::Server, Some(key)) => UaState::server(&u.node, key),
            _ => UaState::client(&u.node),
        }),
        CallState::Bridged(b) => CallState::Bridged(Box::new(BridgedState::new(&b.node))),
    }
}
