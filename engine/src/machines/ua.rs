//! Kinds `UaClient` and `UaServer`: OpenSIPS acting as a SIP user agent (b2b_entities UA
//! sessions, OpenSIPS 3.4+), driven by MI and observed through `E_UA_SESSION`.
//!
//! Both kinds are one machine with a [`UaRole`]: they differ only in how the call starts (a
//! `ua.start` that becomes `ua_session_client_start`, or an `E_UA_SESSION` NEW for an INVITE
//! the script handed to `ua_session_server_init`); once set up, a SIP dialog is symmetric.
//!
//! Client: starting (MI sent) → calling (key known) → early (1xx) → confirmed (2xx; or
//! answered until the app's ACK with `manual_ack`) → ended; rejected/no answer end it too.
//! Server: offered (NEW) → answered (our 2xx) → confirmed (the caller's ACK) → ended; the app
//! answers with `ua.answer` (any code) or the offer times out and is declined.
//!
//! OpenSIPS 3.4 facts this machine relies on (docs/opensips.md §5, §7):
//! - the client session's key is only known from the MI reply, and its first events may come
//!   earlier: the engine parks them until the key is bound;
//! - our own `ua_session_terminate` raises no event: the end is recorded when OpenSIPS answers
//!   the MI request;
//! - a server session we rejected stays listed until terminated, and a cancelled one gets no
//!   487 from OpenSIPS: the machine replies 487 and terminates itself;
//! - `content_type` is raw header text, and extra headers without a body are sent as garbage:
//!   callbus writes the full `Content-Type:` line and always sends a body with headers.

use callbus_schemas::mi_call::{ClientStart, MiCall, SessionKey, SessionReply, SessionUpdate, SipPayload};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use callbus_schemas::bus::MiBusReply;
use callbus_schemas::command::{Command, CommandError, Payload};
use callbus_schemas::event::{Event, UaEventType, UaSession};

use super::{command_verb, Ctx, Effect, Input};
pub(crate) use super::{failed, notify, succeeded};
use callbus_schemas::notes::{Detail, UaNote};

/// Which side OpenSIPS plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UaRole {
    /// We called out (`ua.start`).
    Client,
    /// We were called (`ua_session_server_init` in the OpenSIPS script).
    Server,
}

/// The call's main state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UaPhase {
    /// Client: `ua_session_client_start` sent, key not yet known.
    Starting,
    /// Client: INVITE sent.
    Calling,
    /// Client: a 1xx came.
    Early,
    /// Server: an INVITE waits for the app's answer.
    Offered,
    /// A 2xx to the initial INVITE, its ACK not yet seen (server) or not yet sent (client, `manual_ack`).
    Answered,
    /// Up.
    Confirmed,
    /// Over.
    Ended,
}

/// What MI request is in flight, and for what.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UaRequest {
    /// `ua_session_client_start`.
    Start,
    /// `ua_session_update` with this method.
    Update {
        /// The method.
        method: String,
    },
    /// `ua_session_reply` to this method with this code.
    Reply {
        /// The method answered.
        method: String,
        /// The code sent.
        code: u16,
    },
    /// `ua_session_terminate`.
    Terminate,
}

/// An MI request in flight.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingMi {
    /// Its id.
    pub request: String,
    /// What it does.
    pub what: UaRequest,
    /// The command behind it.
    pub cmd_id: Option<String>,
    /// An in-dialog request the remote side already answered (finally) before OpenSIPS
    /// answered the MI request that sent it: its MI reply settles nothing more.
    #[serde(default)]
    pub answered: bool,
}

/// A request we sent in the dialog, waiting for the remote side's final answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalTxn {
    /// The method.
    pub method: String,
    /// The command behind it.
    pub cmd_id: Option<String>,
}

/// How and why the call ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UaEnd {
    /// Who ended it: `local` (an app command), `remote` (the other party), `engine` (a
    /// timeout), `opensips` (gone from OpenSIPS).
    pub by: String,
    /// Why, as a token: `hung_up`, `rejected`, `busy`, `no_answer`, `cancelled`, …
    pub reason: String,
    /// The SIP status, when a reply ended it.
    pub status: Option<i64>,
}

/// A UA session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UaState {
    /// The OpenSIPS node.
    pub node: String,
    /// Client or server.
    pub role: UaRole,
    /// The b2b key, once known.
    pub key: Option<String>,
    /// The SIP Call-ID, once known (a client's is its key).
    pub sip_call_id: Option<String>,
    /// The main state.
    pub phase: UaPhase,
    /// The From, as given or seen.
    pub from: Option<String>,
    /// The To, as given or seen.
    pub to: Option<String>,
    /// The app sends ACKs itself (client, flag `d`).
    pub manual_ack: bool,
    /// The command that started the call (client).
    pub start_cmd: Option<String>,
    /// MI requests in flight.
    pub requests: Vec<PendingMi>,
    /// Our in-dialog requests waiting for an answer.
    pub local: Vec<LocalTxn>,
    /// The remote side's requests waiting for our answer (methods, oldest first).
    pub remote: Vec<String>,
    /// An end command in progress.
    pub ending_cmd: Option<String>,
    /// How it ended.
    pub end: Option<UaEnd>,
    /// `ua_session_terminate` was sent after a negative answer to the incoming INVITE
    /// (OpenSIPS keeps such a session listed otherwise).
    #[serde(default)]
    pub freed: bool,
}

pub(crate) const RING_TIMER: &str = "ring";
const OFFER_TIMER: &str = "offer";
const ACK_TIMER: &str = "ack";
pub(crate) const MAX_TIMER: &str = "max";
const REPLY_TIMER: &str = "reply";
const TXN_TIMER: &str = "txn";

pub(crate) fn mi_error_text(reply: &MiBusReply) -> Option<String> {
    match reply {
        MiBusReply::Error { error } => Some(error.to_string()),
        MiBusReply::Result { .. } => None,
    }
}

pub(crate) fn wrong_state(state: &str, message: impl Into<String>) -> CommandError {
    CommandError {
        code: callbus_schemas::command::CommandErrorCode::WrongState,
        message: message.into(),
        field: None,
        state: Some(state.to_owned()),
    }
}

/// Body, `content_type` and `extra_headers` params for a UA MI command, worked around
/// OpenSIPS 3.4's header bugs: `content_type` is a whole header line, and extra headers always
/// travel with a body (empty if need be).
pub(crate) fn sip_payload(payload: &Payload) -> SipPayload {
    let headers: String = payload.headers.iter().map(|h| format!("{}: {}\r\n", h.name, h.value)).collect();
    let (body, content_type) = match &payload.body {
        Some(body) => (Some(body.text.clone()), Some(format!("Content-Type: {}\r\n", body.content_type))),
        None if !headers.is_empty() => (Some(String::new()), Some(String::new())),
        None => (None, None),
    };
    SipPayload { body, content_type, extra_headers: (!headers.is_empty()).then_some(headers) }
}

/// A header's value in a CRLF-separated header block (case-insensitive, compact forms too).
pub fn header<'a>(headers: &'a str, name: &str) -> Option<&'a str> {
    let compact = match name.to_ascii_lowercase().as_str() {
        "from" => Some("f"),
        "to" => Some("t"),
        "call-id" => Some("i"),
        "content-type" => Some("c"),
        _ => None,
    };
    headers.split('\n').find_map(|line| {
        let (n, v) = line.split_once(':')?;
        let n = n.trim();
        (n.eq_ignore_ascii_case(name) || compact.is_some_and(|c| n.eq_ignore_ascii_case(c))).then(|| v.trim())
    })
}

/// The URI in a From/To value (`"Bob" <sip:bob@h>;tag=x` → `sip:bob@h`).
pub fn uri_of(value: &str) -> &str {
    match (value.find('<'), value.find('>')) {
        (Some(a), Some(b)) if a < b => &value[a + 1..b],
        _ => value.split(';').next().unwrap_or(value).trim(),
    }
}

/// An `E_UA_SESSION` in an input, if it is one (`parsed`: its datagram already parsed).
pub(crate) fn ua_event<'a>(input: &Input, parsed: Option<&'a Event>) -> Option<std::borrow::Cow<'a, UaSession>> {
    use std::borrow::Cow;
    let Input::Event { datagram, .. } = input else { return None };
    match super::parsed_or_parse(parsed, datagram)? {
        Cow::Borrowed(Event::UaSession(u)) => Some(Cow::Borrowed(u)),
        Cow::Owned(Event::UaSession(u)) => Some(Cow::Owned(u)),
        _ => None,
    }
}

/// The cause of a failed INVITE, as a token.
pub(crate) fn failure_cause(status: i64) -> &'static str {
    match status {
        408 | 480 => "no_answer",
        486 | 600 => "busy",
        487 => "cancelled",
        603 => "declined",
        404 | 604 => "not_found",
        _ => "rejected",
    }
}

impl UaState {
    /// A client session about to be started on `node`.
    pub fn client(node: &str) -> UaState {
        UaState::new(node, UaRole::Client, None)
    }

    /// A server session OpenSIPS created with `key`.
    pub fn server(node: &str, key: &str) -> UaState {
        UaState::new(node, UaRole::Server, Some(key.to_owned()))
    }

    fn new(node: &str, role: UaRole, key: Option<String>) -> UaState {
        UaState {
            node: node.to_owned(),
            role,
            key,
            sip_call_id: None,
            phase: if role == UaRole::Client { UaPhase::Starting } else { UaPhase::Offered },
            from: None,
            to: None,
            manual_ack: false,
            start_cmd: None,
            requests: Vec::new(),
            local: Vec::new(),
            remote: Vec::new(),
            ending_cmd: None,
            end: None,
            freed: false,
        }
    }

    /// The state's name.
    pub fn state_name(&self) -> &'static str {
        match self.phase {
            UaPhase::Ended => "ended",
            _ if self.ending_cmd.is_some() => "ending",
            UaPhase::Starting => "starting",
            UaPhase::Calling => "calling",
            UaPhase::Early => "early",
            UaPhase::Offered => "offered",
            UaPhase::Answered => "answered",
            UaPhase::Confirmed => "confirmed",
        }
    }

    /// The kind's name.
    pub fn kind(&self) -> &'static str {
        match self.role {
            UaRole::Client => "ua_client",
            UaRole::Server => "ua_server",
        }
    }

    /// Whether the call is over.
    pub fn is_ended(&self) -> bool {
        self.phase == UaPhase::Ended
    }

    /// What `call.get` shows besides the common fields.
    pub fn summary(&self) -> Value {
        json!({
            "key": self.key, "role": self.role, "from": self.from, "to": self.to,
            "pending_remote_requests": self.remote,
            "pending_local_requests": self.local.iter().map(|t| &t.method).collect::<Vec<_>>(),
            "end": self.end,
        })
    }

    /// Checks a command against the state; nothing changes.
    pub fn check(&self, command: &Command) -> Result<(), CommandError> {
        let state = self.state_name();
        if self.phase == UaPhase::Ended {
            let why = self.end.as_ref().map(|e| e.reason.as_str()).unwrap_or("ended");
            return Err(wrong_state(state, format!("the call has ended ({why})")));
        }
        match command {
            Command::UaStart { .. } | Command::Get { .. } | Command::List { .. } => Ok(()),
            Command::End { .. } | Command::UaTerminate { .. } if self.ending_cmd.is_some() => {
                Err(wrong_state(state, "the call is already being ended"))
            }
            Command::End { .. } | Command::UaTerminate { .. } if self.key.is_none() => {
                Err(wrong_state(state, "OpenSIPS has not yet told the session's key; retry in a moment"))
            }
            Command::End { .. } | Command::UaTerminate { .. } => Ok(()),
            Command::UaAnswer { code, method, .. } => {
                // The request answered: the one named, else the oldest waiting.
                let answered = match method {
                    Some(m) => self.remote.iter().find(|r| *r == m),
                    None => self.remote.first(),
                };
                let Some(answered) = answered else {
                    let what = method.as_deref().unwrap_or("request");
                    return Err(wrong_state(state, format!("no {what} from the remote side waits for an answer")));
                };
                if answered == "INVITE" && self.phase == UaPhase::Offered && *code == 100 {
                    return Err(wrong_state(state, "100 Trying is sent by OpenSIPS itself"));
                }
                let final_on_its_way = self
                    .requests
                    .iter()
                    .any(|r| matches!(&r.what, UaRequest::Reply { method: m, code } if *code >= 200 && m == answered));
                if final_on_its_way {
                    return Err(wrong_state(state, "a final answer to that request is already on its way"));
                }
                Ok(())
            }
            Command::UaUpdate { method, .. } => {
                if method == "ACK" {
                    if self.role == UaRole::Client && self.manual_ack && self.phase == UaPhase::Answered {
                        return Ok(());
                    }
                    return Err(wrong_state(
                        state,
                        "no ACK is owed: ACK is only for a call started with manual_ack, once it is answered",
                    ));
                }
                let early_ok = matches!(method.as_str(), "UPDATE" | "PRACK");
                // A server may not see the caller's ACK (no flag `a`): answered counts as up.
                let up = self.phase == UaPhase::Confirmed
                    || (self.phase == UaPhase::Answered && self.role == UaRole::Server);
                if !(up || early_ok && matches!(self.phase, UaPhase::Early | UaPhase::Offered)) {
                    return Err(wrong_state(state, format!("{method} needs an established call; the call is {state}")));
                }
                if self.local.iter().any(|t| t.method == *method)
                    || self
                        .requests
                        .iter()
                        .any(|r| !r.answered && r.what == UaRequest::Update { method: method.clone() })
                {
                    return Err(wrong_state(state, format!("a {method} is already waiting for its answer")));
                }
                Ok(())
            }
            other => Err(wrong_state(
                state,
                format!(
                    "{} does not apply to a UA session (use ua.update, ua.answer or ua.terminate)",
                    command_verb(other)
                ),
            )),
        }
    }

    /// One step: the next state and the effects; an event input's datagram parsed as `parsed`
    /// when given (see [`super::CallState::step_parsed`]).
    pub fn step(&self, input: &Input, parsed: Option<&Event>, ctx: &Ctx) -> (UaState, Vec<Effect>) {
        let mut next = self.clone();
        let mut effects = Vec::new();
        match input {
            Input::Event { .. } => {
                if let Some(event) = ua_event(input, parsed) {
                    next.on_event(&event, ctx, &mut effects);
                }
            }
            Input::Command { cmd_id, command } => next.on_command(cmd_id, command, ctx, &mut effects),
            Input::MiReply { request, reply } => next.on_mi_reply(request, reply, ctx, &mut effects),
            Input::Timer { name } => next.on_timer(name, ctx, &mut effects),
            Input::Reconcile { opensips_state } => {
                if opensips_state.is_none() && self.phase != UaPhase::Ended {
                    next.end("opensips", "gone_while_away", None, &mut effects);
                }
            }
        }
        (next, effects)
    }

    #[allow(clippy::too_many_arguments)]
    fn mi(
        &mut self,
        ctx: &Ctx,
        n: &mut usize,
        what: UaRequest,
        cmd_id: Option<&str>,
        call: MiCall,
        effects: &mut Vec<Effect>,
    ) {
        let request = ctx.request_id(*n);
        *n += 1;
        effects.push(Effect::mi(request.clone(), self.node.clone(), call));
        self.requests.push(PendingMi { request, what, cmd_id: cmd_id.map(str::to_owned), answered: false });
    }

    fn terminate_call(&self) -> MiCall {
        MiCall::UaSessionTerminate(SessionKey { key: self.key.clone() })
    }

    fn reply_call(&self, method: &str, code: u16, reason: &str, payload: SipPayload) -> MiCall {
        MiCall::UaSessionReply(SessionReply {
            key: self.key.clone(),
            method: method.into(),
            code,
            reason: reason.into(),
            payload,
        })
    }

    fn end(&mut self, by: &str, reason: &str, status: Option<i64>, effects: &mut Vec<Effect>) {
        self.phase = UaPhase::Ended;
        for t in [RING_TIMER, OFFER_TIMER, ACK_TIMER, MAX_TIMER] {
            effects.push(Effect::CancelTimer { name: t.into() });
        }
        for t in std::mem::take(&mut self.local) {
            effects.push(Effect::CancelTimer { name: format!("{TXN_TIMER}.{}", t.method).into() });
            failed(effects, t.cmd_id.as_deref(), "ua.update", "the call ended before the answer came");
        }
        for m in std::mem::take(&mut self.remote) {
            effects.push(Effect::CancelTimer { name: format!("{REPLY_TIMER}.{m}").into() });
        }
        let end = UaEnd { by: by.into(), reason: reason.into(), status };
        notify(effects, None, UaNote::Ended { by: by.to_owned(), reason: reason.to_owned(), status });
        if let Some(cmd) = self.start_cmd.take() {
            if by != "local" {
                failed(effects, Some(&cmd), "ua.start", reason);
            }
        }
        if let Some(cmd) = self.ending_cmd.take() {
            succeeded(
                effects,
                Some(&cmd),
                "ua.terminate",
                Detail { reason: Some(reason.to_owned()), ..Detail::default() },
            );
        }
        self.end = Some(end);
    }

    fn terminate(&mut self, ctx: &Ctx, n: &mut usize, cmd_id: Option<&str>, effects: &mut Vec<Effect>) {
        if self.role == UaRole::Server && self.phase == UaPhase::Offered {
            // BYE is not allowed before the answer: decline the INVITE; the entity is freed
            // once OpenSIPS has sent the 603.
            self.reply_invite(ctx, n, 603, "Decline", effects);
            return;
        }
        let call = self.terminate_call();
        self.mi(ctx, n, UaRequest::Terminate, cmd_id, call, effects);
    }

    fn reply_invite(&mut self, ctx: &Ctx, n: &mut usize, code: u16, reason: &str, effects: &mut Vec<Effect>) {
        let call = self.reply_call("INVITE", code, reason, SipPayload::default());
        self.mi(ctx, n, UaRequest::Reply { method: "INVITE".into(), code }, None, call, effects);
    }

    fn on_command(&mut self, cmd_id: &str, command: &Command, ctx: &Ctx, effects: &mut Vec<Effect>) {
        if self.check(command).is_err() {
            return;
        }
        let mut n = 0;
        match command {
            Command::UaStart { to, from, ruri, proxy, payload, manual_ack, max_duration_s, .. } => {
                if self.phase != UaPhase::Starting || self.start_cmd.is_some() || !self.requests.is_empty() {
                    return;
                }
                self.from = Some(from.clone());
                self.to = Some(to.clone());
                self.manual_ack = *manual_ack;
                self.start_cmd = Some(cmd_id.to_owned());
                let mut flags = String::from("rhba");
                if *manual_ack {
                    flags.push('d');
                }
                if let Some(max) = max_duration_s {
                    // OpenSIPS's own expiry is silent: ours fires first and ends the call visibly.
                    flags.push_str(&format!("t{}", max + 10));
                    effects.push(Effect::StartTimer { name: MAX_TIMER.into(), after_ms: max * 1000 });
                }
                let ruri = ruri.clone().unwrap_or_else(|| uri_of(to.rsplit(',').next().unwrap_or(to)).to_owned());
                let call = MiCall::UaSessionClientStart(ClientStart {
                    ruri: ruri.clone(),
                    to: to.clone(),
                    from: from.clone(),
                    proxy: proxy.clone(),
                    payload: sip_payload(payload),
                    flags,
                });
                self.mi(ctx, &mut n, UaRequest::Start, Some(cmd_id), call, effects);
                effects.push(Effect::StartTimer { name: RING_TIMER.into(), after_ms: ctx.timeouts.ring_ms });
                notify(effects, Some(cmd_id), UaNote::Starting { to: to.clone(), from: from.clone(), ruri });
            }
            Command::UaAnswer { code, reason, method, payload, .. } => {
                let method = method.clone().unwrap_or_else(|| self.remote[0].clone());
                let call = self.reply_call(&method, *code, reason, sip_payload(payload));
                self.mi(ctx, &mut n, UaRequest::Reply { method, code: *code }, Some(cmd_id), call, effects);
            }
            Command::UaUpdate { method, payload, .. } => {
                let call = MiCall::UaSessionUpdate(SessionUpdate {
                    key: self.key.clone(),
                    method: method.clone(),
                    payload: sip_payload(payload),
                });
                self.mi(ctx, &mut n, UaRequest::Update { method: method.clone() }, Some(cmd_id), call, effects);
            }
            Command::End { .. } | Command::UaTerminate { .. } => {
                self.ending_cmd = Some(cmd_id.to_owned());
                self.terminate(ctx, &mut n, Some(cmd_id), effects);
                notify(effects, Some(cmd_id), UaNote::Ending { by: "local".to_owned() });
            }
            _ => {}
        }
    }

    fn on_mi_reply(&mut self, request: &str, reply: &MiBusReply, ctx: &Ctx, effects: &mut Vec<Effect>) {
        let Some(pos) = self.requests.iter().position(|r| r.request == request) else { return };
        let PendingMi { what, cmd_id, answered, .. } = self.requests.remove(pos);
        let mut n = 0;
        let declined = matches!(&what, UaRequest::Reply { method, code } if method == "INVITE" && *code >= 300);
        if declined && self.role == UaRole::Server && !self.freed {
            // Sequenced after the reply: OpenSIPS refuses to terminate an unanswered session.
            self.freed = true;
            let call = self.terminate_call();
            let by_command = self.ending_cmd.clone();
            self.mi(ctx, &mut n, UaRequest::Terminate, by_command.as_deref(), call, effects);
        }
        if self.phase == UaPhase::Ended && what != UaRequest::Start {
            return; // clean-up after the end (487, terminate): nothing left to report
        }
        let cmd = cmd_id.as_deref();
        let error = mi_error_text(reply);
        match what {
            UaRequest::Start => match (error, reply) {
                (None, MiBusReply::Result { result: Value::String(key) }) => {
                    if self.phase == UaPhase::Ended {
                        // Ended meanwhile (a timer): the session OpenSIPS made must not linger.
                        self.key = Some(key.clone());
                        let call = self.terminate_call();
                        self.mi(ctx, &mut n, UaRequest::Terminate, None, call, effects);
                        return;
                    }
                    self.key = Some(key.clone());
                    self.sip_call_id = Some(key.clone());
                    if self.phase == UaPhase::Starting {
                        self.phase = UaPhase::Calling;
                    }
                    notify(effects, cmd, UaNote::Calling { key: key.clone() });
                }
                (error, _) => {
                    let why = error.unwrap_or_else(|| format!("unexpected answer {reply:?}"));
                    failed(effects, cmd, "ua.start", &format!("OpenSIPS did not start the session: {why}"));
                    self.start_cmd = None;
                    if self.phase != UaPhase::Ended {
                        self.end("opensips", "start_failed", None, effects);
                    }
                }
            },
            UaRequest::Update { method } => match error {
                // Already settled by the remote side's answer (see `settle_local`).
                _ if answered => {}
                None if method == "ACK" => {
                    if self.phase == UaPhase::Answered {
                        self.phase = UaPhase::Confirmed;
                        effects.push(Effect::CancelTimer { name: ACK_TIMER.into() });
                        notify(effects, cmd, UaNote::ConfirmedByUs {});
                    }
                    succeeded(effects, cmd, "ua.update", Detail { method: Some(method.clone()), ..Detail::default() });
                }
                None => {
                    if self.phase != UaPhase::Ended {
                        effects.push(Effect::StartTimer {
                            name: format!("{TXN_TIMER}.{method}").into(),
                            after_ms: ctx.timeouts.reinvite_ms,
                        });
                        notify(effects, cmd, UaNote::UpdateSent { method: method.clone() });
                        self.local.push(LocalTxn { method, cmd_id });
                    }
                }
                Some(why) => failed(effects, cmd, "ua.update", &format!("OpenSIPS did not send the {method}: {why}")),
            },
            UaRequest::Reply { method, code } => match error {
                // Already settled by the caller's ACK (see `settle_answer`).
                _ if answered => {}
                None => {
                    if code >= 200 {
                        if let Some(i) = self.remote.iter().position(|m| *m == method) {
                            self.remote.remove(i);
                            effects.push(Effect::CancelTimer { name: format!("{REPLY_TIMER}.{method}").into() });
                        }
                    }
                    let initial = method == "INVITE" && self.phase == UaPhase::Offered;
                    if initial && (200..300).contains(&code) {
                        self.phase = UaPhase::Answered;
                        effects.push(Effect::CancelTimer { name: OFFER_TIMER.into() });
                        notify(effects, cmd, UaNote::Answered { status: code });
                    } else if initial && code >= 300 {
                        succeeded(
                            effects,
                            cmd,
                            "ua.answer",
                            Detail { method: Some(method.clone()), code: Some(code), ..Detail::default() },
                        );
                        if self.ending_cmd.is_none() {
                            let reason = if cmd.is_some() { "rejected" } else { "not_answered" };
                            let by = if cmd.is_some() { "local" } else { "engine" };
                            self.end(by, reason, Some(i64::from(code)), effects);
                        }
                        return;
                    } else {
                        notify(effects, cmd, UaNote::Replied { method: method.clone(), status: code });
                    }
                    succeeded(
                        effects,
                        cmd,
                        "ua.answer",
                        Detail { method: Some(method.clone()), code: Some(code), ..Detail::default() },
                    );
                }
                Some(why) => {
                    failed(effects, cmd, "ua.answer", &format!("OpenSIPS did not send the {code} to {method}: {why}"))
                }
            },
            UaRequest::Terminate => {
                if self.phase != UaPhase::Ended {
                    let reason = match (&error, self.phase) {
                        (Some(_), _) => "gone",
                        (None, UaPhase::Starting | UaPhase::Calling | UaPhase::Early) => "cancelled",
                        (None, UaPhase::Offered) => "declined",
                        (None, _) => "hung_up",
                    };
                    let by = if self.ending_cmd.is_some() { "local" } else { "engine" };
                    self.end(by, reason, None, effects);
                }
            }
        }
    }

    /// The command of our in-dialog request `method` that a final answer settles: one sent and
    /// waiting (its timer cancelled), or one whose MI reply has not come yet. The remote side can
    /// answer before OpenSIPS answers `ua_session_update` (a real OpenSIPS 3.4.18 raised the 200's
    /// ANSWERED before its MI reply when the phone answered within 0.1 ms): then `update_sent` is
    /// said now, and the MI reply settles nothing more. None when no request of ours waits.
    fn settle_local(&mut self, method: &str, effects: &mut Vec<Effect>) -> Option<Option<String>> {
        if let Some(i) = self.local.iter().position(|t| t.method == method) {
            let t = self.local.remove(i);
            effects.push(Effect::CancelTimer { name: format!("{TXN_TIMER}.{method}").into() });
            return Some(t.cmd_id);
        }
        let update = UaRequest::Update { method: method.to_owned() };
        let early = self.requests.iter_mut().find(|r| !r.answered && r.what == update)?;
        early.answered = true;
        let cmd_id = early.cmd_id.clone();
        notify(effects, cmd_id.as_deref(), UaNote::UpdateSent { method: method.to_owned() });
        Some(cmd_id)
    }

    /// Settles our 2xx to the incoming INVITE when the caller's ACK arrives before OpenSIPS
    /// answered `ua_session_reply` (a real OpenSIPS 3.4.18 raised the ACK's UPDATED before its MI
    /// reply when the phone acknowledged at once): the ACK proves the 2xx was sent, so `answered`
    /// is said now and the MI reply settles nothing more. Nothing happens when no 2xx waits.
    fn settle_answer(&mut self, effects: &mut Vec<Effect>) {
        let early = self.requests.iter_mut().find(|r| {
            !r.answered && matches!(&r.what, UaRequest::Reply { method, code } if method == "INVITE" && (200..300).contains(code))
        });
        let Some(early) = early else { return };
        early.answered = true;
        let cmd_id = early.cmd_id.clone();
        let code = match early.what {
            UaRequest::Reply { code, .. } => code,
            _ => 200,
        };
        if let Some(i) = self.remote.iter().position(|m| m == "INVITE") {
            self.remote.remove(i);
            effects.push(Effect::CancelTimer { name: format!("{REPLY_TIMER}.INVITE").into() });
        }
        self.phase = UaPhase::Answered;
        effects.push(Effect::CancelTimer { name: OFFER_TIMER.into() });
        notify(effects, cmd_id.as_deref(), UaNote::Answered { status: code });
        let detail = Detail { method: Some("INVITE".to_owned()), code: Some(code), ..Detail::default() };
        succeeded(effects, cmd_id.as_deref(), "ua.answer", detail);
    }

    fn on_event(&mut self, e: &UaSession, ctx: &Ctx, effects: &mut Vec<Effect>) {
        let body = &e.body;
        let headers = &e.headers;
        let mut n = 0;
        match &e.event_type {
            UaEventType::New => {
                if self.phase != UaPhase::Offered || !self.remote.is_empty() {
                    return;
                }
                let h = headers.as_deref().unwrap_or_default();
                self.from = header(h, "From").map(str::to_owned);
                self.to = header(h, "To").map(str::to_owned);
                self.sip_call_id = header(h, "Call-ID").map(str::to_owned);
                self.remote.push("INVITE".into());
                effects.push(Effect::StartTimer { name: OFFER_TIMER.into(), after_ms: ctx.timeouts.offer_ms });
                let note = UaNote::Incoming {
                    key: e.key.clone(),
                    from: self.from.clone(),
                    to: self.to.clone(),
                    caller: self.from.as_deref().map(|f| uri_of(f).to_owned()),
                    callee: self.to.as_deref().map(|t| uri_of(t).to_owned()),
                    body: body.clone(),
                    content_type: header(h, "Content-Type").map(str::to_owned),
                    headers: headers.clone(),
                };
                notify(effects, None, note);
            }
            UaEventType::Early => {
                if matches!(self.phase, UaPhase::Starting | UaPhase::Calling) && e.method == "INVITE" {
                    self.phase = UaPhase::Early;
                    let note = UaNote::Early {
                        status: e.status,
                        reason: e.reason.clone(),
                        body: body.clone(),
                        headers: headers.clone(),
                    };
                    notify(effects, self.start_cmd.as_deref(), note);
                } else {
                    let note = UaNote::Progress {
                        method: e.method.clone(),
                        status: e.status,
                        reason: e.reason.clone(),
                        body: body.clone(),
                    };
                    notify(effects, None, note);
                }
            }
            UaEventType::Answered => {
                let initial =
                    e.method == "INVITE" && matches!(self.phase, UaPhase::Starting | UaPhase::Calling | UaPhase::Early);
                if initial {
                    effects.push(Effect::CancelTimer { name: RING_TIMER.into() });
                    let cmd = self.start_cmd.take();
                    if self.manual_ack {
                        self.phase = UaPhase::Answered;
                        effects.push(Effect::StartTimer { name: ACK_TIMER.into(), after_ms: ctx.timeouts.ack_ms });
                    } else {
                        self.phase = UaPhase::Confirmed;
                    }
                    let note = UaNote::AnsweredClient {
                        status: e.status,
                        reason: e.reason.clone(),
                        body: body.clone(),
                        headers: headers.clone(),
                        ack_due: self.manual_ack,
                    };
                    notify(effects, cmd.as_deref(), note);
                    succeeded(
                        effects,
                        cmd.as_deref(),
                        "ua.start",
                        Detail { status: Some(e.status), ..Detail::default() },
                    );
                } else if let Some(cmd_id) = self.settle_local(&e.method, effects) {
                    if e.method == "INVITE" && self.manual_ack {
                        self.phase = UaPhase::Answered;
                        effects.push(Effect::StartTimer { name: ACK_TIMER.into(), after_ms: ctx.timeouts.ack_ms });
                    }
                    let note = UaNote::UpdateAnswered {
                        method: e.method.clone(),
                        status: e.status,
                        reason: e.reason.clone(),
                        body: body.clone(),
                        headers: headers.clone(),
                    };
                    notify(effects, cmd_id.as_deref(), note);
                    let detail = Detail { method: Some(e.method.clone()), status: Some(e.status), ..Detail::default() };
                    succeeded(effects, cmd_id.as_deref(), "ua.update", detail);
                }
            }
            UaEventType::Rejected => {
                let initial =
                    e.method == "INVITE" && matches!(self.phase, UaPhase::Starting | UaPhase::Calling | UaPhase::Early);
                if initial {
                    let cause = failure_cause(e.status);
                    let note = UaNote::Rejected {
                        status: e.status,
                        reason: e.reason.clone(),
                        cause: cause.to_owned(),
                        headers: headers.clone(),
                    };
                    notify(effects, self.start_cmd.as_deref(), note);
                    self.end("remote", cause, Some(e.status), effects);
                } else if let Some(cmd_id) = self.settle_local(&e.method, effects) {
                    let note = UaNote::UpdateRejected {
                        method: e.method.clone(),
                        status: e.status,
                        reason: e.reason.clone(),
                        headers: headers.clone(),
                    };
                    notify(effects, cmd_id.as_deref(), note);
                    failed(
                        effects,
                        cmd_id.as_deref(),
                        "ua.update",
                        &format!("the remote side answered {} {}", e.status, e.reason.as_deref().unwrap_or("")),
                    );
                }
            }
            UaEventType::Updated => {
                if self.phase == UaPhase::Ended {
                    return; // e.g. the ACK of our own negative answer
                }
                if e.method == "ACK" {
                    if self.phase == UaPhase::Offered {
                        self.settle_answer(effects);
                    }
                    if self.phase == UaPhase::Answered {
                        self.phase = UaPhase::Confirmed;
                        notify(effects, None, UaNote::Confirmed { body: body.clone() });
                    } else {
                        notify(effects, None, UaNote::Ack { body: body.clone() });
                    }
                    return;
                }
                self.remote.push(e.method.clone());
                effects.push(Effect::StartTimer {
                    name: format!("{REPLY_TIMER}.{}", e.method).into(),
                    after_ms: ctx.timeouts.reply_ms,
                });
                let note = UaNote::Request {
                    method: e.method.clone(),
                    body: body.clone(),
                    headers: headers.clone(),
                    content_type: headers.as_deref().and_then(|h| header(h, "Content-Type")).map(str::to_owned),
                };
                notify(effects, None, note);
            }
            UaEventType::Terminated => {
                if self.phase == UaPhase::Ended {
                    return;
                }
                if e.method == "CANCEL" && self.phase == UaPhase::Offered {
                    // OpenSIPS answers the CANCEL but not the INVITE, and keeps the session.
                    self.reply_invite(ctx, &mut n, 487, "Request Terminated", effects);
                    self.end("remote", "cancelled", None, effects);
                } else {
                    self.end("remote", "hung_up", None, effects);
                }
            }
            UaEventType::Unknown(_) => {}
        }
    }

    fn on_timer(&mut self, name: &str, ctx: &Ctx, effects: &mut Vec<Effect>) {
        if self.phase == UaPhase::Ended {
            return;
        }
        let mut n = 0;
        match name {
            RING_TIMER if matches!(self.phase, UaPhase::Starting | UaPhase::Calling | UaPhase::Early) => {
                if self.key.is_some() {
                    let call = self.terminate_call();
                    self.mi(ctx, &mut n, UaRequest::Terminate, None, call, effects);
                }
                self.end("engine", "no_answer", None, effects);
            }
            OFFER_TIMER if self.phase == UaPhase::Offered => {
                self.reply_invite(ctx, &mut n, 480, "Temporarily Unavailable", effects);
                notify(effects, None, UaNote::OfferExpired { after_ms: ctx.timeouts.offer_ms });
            }
            ACK_TIMER if self.phase == UaPhase::Answered => {
                let call = MiCall::UaSessionUpdate(SessionUpdate {
                    key: self.key.clone(),
                    method: "ACK".into(),
                    payload: SipPayload::default(),
                });
                self.mi(ctx, &mut n, UaRequest::Update { method: "ACK".into() }, None, call, effects);
                notify(effects, None, UaNote::AckSentByEngine { after_ms: ctx.timeouts.ack_ms });
            }
            MAX_TIMER => {
                if self.key.is_some() && self.ending_cmd.is_none() {
                    self.terminate(ctx, &mut n, None, effects);
                }
                self.end("engine", "max_duration", None, effects);
            }
            _ => {
                if let Some(method) = name.strip_prefix(&format!("{REPLY_TIMER}.")) {
                    if self.remote.iter().any(|m| m == method) {
                        let call = self.reply_call(method, 500, "Server Internal Error", SipPayload::default());
                        let what = UaRequest::Reply { method: method.to_owned(), code: 500 };
                        self.mi(ctx, &mut n, what, None, call, effects);
                        notify(effects, None, UaNote::RequestExpired { method: method.to_owned(), answered: 500 });
                    }
                } else if let Some(method) = name.strip_prefix(&format!("{TXN_TIMER}.")) {
                    if let Some(i) = self.local.iter().position(|t| t.method == method) {
                        let t = self.local.remove(i);
                        notify(effects, t.cmd_id.as_deref(), UaNote::UpdateTimeout { method: method.to_owned() });
                        failed(effects, t.cmd_id.as_deref(), "ua.update", "no answer from the remote side in time");
                    }
                }
            }
        }
    }
}
