//! App commands on `callbus.cmd.<verb>`, their replies, and call notifications on
//! `callbus.call.<call_id>.<event>`.
//!
//! A command body is a JSON object. It names its call by callbus's `call_id` or by the SIP
//! Call-ID (`sip_call_id`), and may carry the client's `cmd_id` (a repeated `cmd_id` is answered
//! with the first answer and acted on once). [`CommandRequest::parse`] checks every field and
//! says precisely what is wrong: the field, what was expected, what came.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::mi::json_type;
use crate::subjects::Verb;

/// Largest command body accepted.
pub const MAX_COMMAND_BYTES: usize = 64 * 1024;

/// How a command names its call.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CallTarget {
    /// callbus's own call id.
    CallId(String),
    /// The SIP Call-ID of a proxied call.
    SipCallId(String),
    /// The b2b key of a UA session (of either leg of a click-to-dial call).
    Key(String),
}

impl std::fmt::Display for CallTarget {
    /// The target in words, as errors show it: `call_id "c…"`, `SIP Call-ID "…"`, `key "B2B…"`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallTarget::CallId(id) => write!(f, "call_id {id:?}"),
            CallTarget::SipCallId(sip) => write!(f, "SIP Call-ID {sip:?}"),
            CallTarget::Key(key) => write!(f, "UA session key {key:?}"),
        }
    }
}

/// A leg of a proxied call, as commands name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LegName {
    /// The calling party.
    Caller,
    /// The called party.
    Callee,
}

impl LegName {
    /// The name OpenSIPS uses.
    pub fn as_str(self) -> &'static str {
        match self {
            LegName::Caller => "caller",
            LegName::Callee => "callee",
        }
    }
}

/// An extra SIP header line an app asks for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Header {
    /// The header's name, e.g. `X-Account`.
    pub name: String,
    /// Its value (one line).
    pub value: String,
}

/// A body an app gives for a SIP message, with its media type.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Body {
    /// The media type, e.g. `application/sdp` (the default) or `application/dtmf-relay`.
    pub content_type: String,
    /// The body text.
    pub text: String,
}

/// What an app puts in a SIP message besides the method: body and extra headers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Payload {
    /// The body, if any.
    pub body: Option<Body>,
    /// Extra header lines, in order.
    pub headers: Vec<Header>,
}

/// The largest body (JSON-escaped, in bytes) callbus sends in a UA message. OpenSIPS raises
/// events as single datagrams and cannot raise one over ~62 kB (docs/opensips.md §2): a bigger SDP
/// would come back in an event that is never delivered, so it is refused up front.
pub const MAX_UA_BODY_BYTES: usize = 48 * 1024;

/// Methods `ua.update` may send (BYE and CANCEL are `ua.terminate`'s).
pub const UA_UPDATE_METHODS: [&str; 8] = ["INVITE", "UPDATE", "INFO", "OPTIONS", "MESSAGE", "NOTIFY", "PRACK", "ACK"];

/// A command, validated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// `call.end`: hang the call up.
    End {
        /// The call.
        target: CallTarget,
    },
    /// `call.hold`: put both legs on hold.
    Hold {
        /// The call.
        target: CallTarget,
    },
    /// `call.unhold`: resume the held legs.
    Unhold {
        /// The call.
        target: CallTarget,
    },
    /// `call.transfer.blind`: send `leg` to `destination` (REFER).
    TransferBlind {
        /// The call.
        target: CallTarget,
        /// The leg that receives the REFER and stays (the transferee).
        leg: LegName,
        /// A SIP URI, e.g. `sip:alice@example.com`.
        destination: String,
    },
    /// `call.transfer.attended`: connect `leg` of this call with `transfer_leg` of another.
    TransferAttended {
        /// The call whose leg receives the REFER.
        target: CallTarget,
        /// That leg.
        leg: LegName,
        /// The other call, whose leg is replaced.
        transfer_target: CallTarget,
        /// The leg of the other call.
        transfer_leg: LegName,
    },
    /// `call.get`: the call's state and a summary of its history.
    Get {
        /// The call.
        target: CallTarget,
        /// Whether to read the call's history from the log (`"history": false` answers with the
        /// state alone, from memory: what a client that only needs the `call_id` asks).
        #[serde(default = "default_true")]
        history: bool,
    },
    /// `call.list`: live calls.
    List {
        /// Only calls in this state.
        state: Option<String>,
        /// Only calls on this OpenSIPS node.
        node: Option<String>,
    },
    /// `call.start`: click-to-dial; call `caller`, then connect it with `callee`.
    Start {
        /// The first party's SIP URI.
        caller: String,
        /// The second party's SIP URI.
        callee: String,
        /// The From both legs show (`Display,uri` or a URI); defaults to the other party.
        from: Option<String>,
        /// The OpenSIPS node; the engine's default when absent.
        node: Option<String>,
        /// Longest call, in seconds.
        max_duration_s: Option<u64>,
    },
    /// `ua.start`: OpenSIPS calls out as a user agent.
    UaStart {
        /// The To (`Display,uri` or a URI).
        to: String,
        /// The From (`Display,uri` or a URI).
        from: String,
        /// The request URI; the To's URI when absent.
        ruri: Option<String>,
        /// An outbound proxy URI.
        proxy: Option<String>,
        /// Body (the SDP offer) and extra headers of the INVITE.
        payload: Payload,
        /// The app sends the ACK itself (`ua.update` method ACK), e.g. with an SDP answer.
        manual_ack: bool,
        /// Longest call, in seconds.
        max_duration_s: Option<u64>,
        /// The OpenSIPS node; the engine's default when absent.
        node: Option<String>,
    },
    /// `ua.answer`: reply to the remote side's INVITE (any code) or in-dialog request.
    UaAnswer {
        /// The call.
        target: CallTarget,
        /// The status code, 100–699.
        code: u16,
        /// The reason phrase; the usual one for the code when absent.
        reason: String,
        /// The request answered; the oldest one waiting when absent.
        method: Option<String>,
        /// Body and extra headers of the reply.
        payload: Payload,
    },
    /// `ua.update`: an in-dialog request (re-INVITE, UPDATE, INFO, OPTIONS, MESSAGE, ACK…).
    UaUpdate {
        /// The call.
        target: CallTarget,
        /// The method.
        method: String,
        /// Body and extra headers.
        payload: Payload,
    },
    /// `ua.terminate`: hang up (BYE), cancel (CANCEL) or decline (603) a UA call.
    UaTerminate {
        /// The call.
        target: CallTarget,
    },
}

impl Command {
    /// The call it names, for commands on an existing call.
    pub fn target(&self) -> Option<&CallTarget> {
        match self {
            Command::End { target }
            | Command::Hold { target }
            | Command::Unhold { target }
            | Command::TransferBlind { target, .. }
            | Command::TransferAttended { target, .. }
            | Command::Get { target, .. }
            | Command::UaAnswer { target, .. }
            | Command::UaUpdate { target, .. }
            | Command::UaTerminate { target } => Some(target),
            Command::List { .. } | Command::Start { .. } | Command::UaStart { .. } => None,
        }
    }

    /// The verb, as on the subject.
    pub fn verb(&self) -> Verb {
        match self {
            Command::End { .. } => Verb::CallEnd,
            Command::Hold { .. } => Verb::CallHold,
            Command::Unhold { .. } => Verb::CallUnhold,
            Command::TransferBlind { .. } => Verb::CallTransferBlind,
            Command::TransferAttended { .. } => Verb::CallTransferAttended,
            Command::Get { .. } => Verb::CallGet,
            Command::List { .. } => Verb::CallList,
            Command::Start { .. } => Verb::CallStart,
            Command::UaStart { .. } => Verb::UaStart,
            Command::UaAnswer { .. } => Verb::UaAnswer,
            Command::UaUpdate { .. } => Verb::UaUpdate,
            Command::UaTerminate { .. } => Verb::UaTerminate,
        }
    }
}

/// The usual reason phrase of a SIP status code.
pub fn reason_phrase(code: u16) -> &'static str {
    const KNOWN: [(u16, &str); 27] = [
        (100, "Trying"),
        (180, "Ringing"),
        (181, "Call Is Being Forwarded"),
        (182, "Queued"),
        (183, "Session Progress"),
        (200, "OK"),
        (202, "Accepted"),
        (400, "Bad Request"),
        (403, "Forbidden"),
        (404, "Not Found"),
        (408, "Request Timeout"),
        (415, "Unsupported Media Type"),
        (480, "Temporarily Unavailable"),
        (481, "Call/Transaction Does Not Exist"),
        (486, "Busy Here"),
        (487, "Request Terminated"),
        (488, "Not Acceptable Here"),
        (491, "Request Pending"),
        (500, "Server Internal Error"),
        (501, "Not Implemented"),
        (503, "Service Unavailable"),
        (504, "Server Time-out"),
        (600, "Busy Everywhere"),
        (603, "Decline"),
        (604, "Does Not Exist Anywhere"),
        (606, "Not Acceptable"),
        (302, "Moved Temporarily"),
    ];
    if let Some((_, reason)) = KNOWN.iter().find(|(c, _)| *c == code) {
        return reason;
    }
    match code / 100 {
        1 => "Progress",
        2 => "OK",
        3 => "Redirect",
        4 => "Client Error",
        5 => "Server Error",
        _ => "Global Failure",
    }
}

/// A command and the client's id for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct CommandRequest {
    /// The client's id; generated when absent.
    pub cmd_id: Option<String>,
    /// The command.
    pub command: Command,
}

/// What went wrong with a command, for the app to match on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CommandErrorCode {
    /// The body is not a JSON object (or too large).
    BadRequest,
    /// A required field is missing.
    MissingField,
    /// A field has the wrong JSON type.
    WrongType,
    /// A field's value is not acceptable.
    BadValue,
    /// No such call.
    UnknownCall,
    /// The command does not fit the call's state.
    WrongState,
    /// This verb is not served by this engine version.
    Unsupported,
    /// The engine cannot take work now (shutting down, log unavailable).
    Unavailable,
}

impl CommandErrorCode {
    /// Every code.
    pub const ALL: [CommandErrorCode; 8] = [
        CommandErrorCode::BadRequest,
        CommandErrorCode::MissingField,
        CommandErrorCode::WrongType,
        CommandErrorCode::BadValue,
        CommandErrorCode::UnknownCall,
        CommandErrorCode::WrongState,
        CommandErrorCode::Unsupported,
        CommandErrorCode::Unavailable,
    ];

    /// The code as it is on the wire (`unknown_call`).
    pub fn as_str(self) -> &'static str {
        match self {
            CommandErrorCode::BadRequest => "bad_request",
            CommandErrorCode::MissingField => "missing_field",
            CommandErrorCode::WrongType => "wrong_type",
            CommandErrorCode::BadValue => "bad_value",
            CommandErrorCode::UnknownCall => "unknown_call",
            CommandErrorCode::WrongState => "wrong_state",
            CommandErrorCode::Unsupported => "unsupported",
            CommandErrorCode::Unavailable => "unavailable",
        }
    }
}

impl std::fmt::Display for CommandErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema, thiserror::Error)]
#[error("{message}")]
pub struct CommandError {
    /// What kind of problem.
    pub code: CommandErrorCode,
    /// A sentence for people: what failed, on what, what to do.
    pub message: String,
    /// The field at fault, if one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The call's state, for `wrong_state`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
}

impl CommandError {
    /// An error without field or state.
    pub fn new(code: CommandErrorCode, message: impl Into<String>) -> Self {
        CommandError { code, message: message.into(), field: None, state: None }
    }

    fn field(code: CommandErrorCode, field: &str, message: String) -> Self {
        CommandError { code, message, field: Some(field.to_owned()), state: None }
    }
}

/// The immediate answer to a command.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum CommandReply {
    /// Accepted and logged; outcomes follow as notifications carrying `cmd_id`.
    Accepted {
        /// The call.
        call_id: String,
        /// The command's id.
        cmd_id: String,
        /// Always true.
        accepted: bool,
    },
    /// Answered with data (`call.get`, `call.list`).
    Data {
        /// The command's id.
        cmd_id: String,
        /// The data.
        result: Value,
    },
    /// Refused; nothing was changed.
    Refused {
        /// The command's id, when one was given or made.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cmd_id: Option<String>,
        /// Why.
        error: CommandError,
    },
}

impl CommandReply {
    /// The JSON body.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// A notification about one call, on `callbus.call.<call_id>.<event>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CallNotification {
    /// The log sequence of the record that caused it; per call, notifications are ordered by it.
    pub seq: u64,
    /// When, milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// callbus's call id.
    pub call_id: String,
    /// The SIP Call-ID, when the call has one.
    pub sip_call_id: Option<String>,
    /// The command that caused it, if one did.
    pub cmd_id: Option<String>,
    /// What happened (also the last subject token), e.g. `answered`, `held`, `transfer_failed`.
    pub event: String,
    /// The call's state after it.
    pub state: String,
    /// Details.
    pub data: Value,
}

/// A [`CallNotification`] to send, borrowing its parts (the engine writes one per machine
/// note without copying the call's ids and names): the same JSON, field for field.
#[derive(Debug, Serialize)]
pub struct CallNotificationRef<'a> {
    /// As in [`CallNotification`].
    pub seq: u64,
    /// As in [`CallNotification`].
    pub time_ms: u64,
    /// As in [`CallNotification`].
    pub call_id: &'a str,
    /// As in [`CallNotification`].
    pub sip_call_id: Option<&'a str>,
    /// As in [`CallNotification`].
    pub cmd_id: Option<&'a str>,
    /// As in [`CallNotification`].
    pub event: &'a str,
    /// As in [`CallNotification`].
    pub state: &'a str,
    /// As in [`CallNotification`].
    pub data: &'a Value,
}

fn get_str(body: &Map<String, Value>, field: &str) -> Result<Option<String>, CommandError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => {
            Err(CommandError::field(CommandErrorCode::BadValue, field, format!("\"{field}\" is empty")))
        }
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(CommandError::field(
            CommandErrorCode::WrongType,
            field,
            format!("\"{field}\" must be a string, not {}", json_type(other)),
        )),
    }
}

fn require_str(body: &Map<String, Value>, field: &str) -> Result<String, CommandError> {
    get_str(body, field)?
        .ok_or_else(|| CommandError::field(CommandErrorCode::MissingField, field, format!("\"{field}\" is required")))
}

fn target(body: &Map<String, Value>, call_id: &str, sip_call_id: &str) -> Result<CallTarget, CommandError> {
    match (get_str(body, call_id)?, get_str(body, sip_call_id)?) {
        (Some(id), None) => Ok(CallTarget::CallId(id)),
        (None, Some(sip)) => Ok(CallTarget::SipCallId(sip)),
        (Some(_), Some(_)) => Err(CommandError::field(
            CommandErrorCode::BadValue,
            call_id,
            format!("give \"{call_id}\" or \"{sip_call_id}\", not both"),
        )),
        (None, None) => Err(CommandError::field(
            CommandErrorCode::MissingField,
            call_id,
            format!("\"{call_id}\" (callbus's id) or \"{sip_call_id}\" (the SIP Call-ID) is required"),
        )),
    }
}

/// The call a command names: `call_id`, `sip_call_id` or `key` (a UA session's b2b key).
fn any_target(body: &Map<String, Value>) -> Result<CallTarget, CommandError> {
    match get_str(body, "key")? {
        None => target(body, "call_id", "sip_call_id"),
        Some(key) if body.get("call_id").is_none() && body.get("sip_call_id").is_none() => Ok(CallTarget::Key(key)),
        Some(_) => Err(CommandError::field(
            CommandErrorCode::BadValue,
            "key",
            "give one of \"call_id\", \"sip_call_id\" or \"key\", not several".into(),
        )),
    }
}

/// A SIP URI (or `Display,uri` when `display` is allowed).
fn uri(body: &Map<String, Value>, field: &str, required: bool, display: bool) -> Result<Option<String>, CommandError> {
    let Some(value) = get_str(body, field)? else {
        return if required {
            Err(CommandError::field(CommandErrorCode::MissingField, field, format!("\"{field}\" is required")))
        } else {
            Ok(None)
        };
    };
    let uri_part = if display { value.rsplit(',').next().unwrap_or_default().trim() } else { value.as_str() };
    let scheme_ok = ["sip:", "sips:", "tel:"].iter().any(|s| uri_part.starts_with(s));
    if !scheme_ok || value.chars().any(|c| c.is_control() || c == ' ' && !display) {
        let shape = if display { " (optionally \"Display,sip:user@host\")" } else { "" };
        return Err(CommandError::field(
            CommandErrorCode::BadValue,
            field,
            format!("\"{field}\" must be a SIP URI like sip:user@host{shape}, not {value:?}"),
        ));
    }
    Ok(Some(value))
}

fn get_u64(body: &Map<String, Value>, field: &str) -> Result<Option<u64>, CommandError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n.as_u64().map(Some).ok_or_else(|| {
            CommandError::field(
                CommandErrorCode::BadValue,
                field,
                format!("\"{field}\" must be a whole number ≥ 0, not {n}"),
            )
        }),
        Some(other) => Err(CommandError::field(
            CommandErrorCode::WrongType,
            field,
            format!("\"{field}\" must be a number, not {}", json_type(other)),
        )),
    }
}

/// `max_duration_s`: whole seconds, at least 1 (0 would end the call as soon as it starts).
fn max_duration(body: &Map<String, Value>) -> Result<Option<u64>, CommandError> {
    match get_u64(body, "max_duration_s")? {
        Some(0) => Err(CommandError::field(
            CommandErrorCode::BadValue,
            "max_duration_s",
            "\"max_duration_s\" must be at least 1 (seconds); leave it out for no limit".into(),
        )),
        other => Ok(other),
    }
}

fn default_true() -> bool {
    true
}

fn get_bool(body: &Map<String, Value>, field: &str) -> Result<bool, CommandError> {
    get_bool_or(body, field, false)
}

fn get_bool_or(body: &Map<String, Value>, field: &str, absent: bool) -> Result<bool, CommandError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(absent),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(CommandError::field(
            CommandErrorCode::WrongType,
            field,
            format!("\"{field}\" must be true or false, not {}", json_type(other)),
        )),
    }
}

fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b))
}

/// `body`, `content_type` and `headers` of a UA command.
fn payload(body: &Map<String, Value>) -> Result<Payload, CommandError> {
    let text = match body.get("body") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => {
            return Err(CommandError::field(
                CommandErrorCode::WrongType,
                "body",
                format!("\"body\" must be a string, not {}", json_type(other)),
            ))
        }
    };
    let content_type = get_str(body, "content_type")?;
    if let Some(ct) = &content_type {
        let ok = ct.split_once('/').is_some_and(|(t, s)| is_token(t) && !s.is_empty())
            && !ct.chars().any(|c| c.is_control());
        if !ok {
            return Err(CommandError::field(
                CommandErrorCode::BadValue,
                "content_type",
                format!("\"content_type\" must be a media type like application/sdp, not {ct:?} (callbus writes the Content-Type header itself)"),
            ));
        }
        if text.is_none() {
            return Err(CommandError::field(
                CommandErrorCode::MissingField,
                "body",
                "\"content_type\" was given without a \"body\"".into(),
            ));
        }
    }
    if let Some(t) = &text {
        let escaped = serde_json::to_string(t).map(|s| s.len()).unwrap_or(usize::MAX);
        if escaped > MAX_UA_BODY_BYTES {
            return Err(CommandError::field(
                CommandErrorCode::BadValue,
                "body",
                format!(
                    "the body is {escaped} bytes as JSON; the limit is {MAX_UA_BODY_BYTES}: OpenSIPS raises events as single datagrams (~62 kB at most), so a larger body would be lost in the events of this call"
                ),
            ));
        }
    }
    let headers = match body.get("headers") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Object(map)) => {
            let mut out = Vec::with_capacity(map.len());
            for (name, value) in map {
                let Value::String(value) = value else {
                    return Err(CommandError::field(
                        CommandErrorCode::WrongType,
                        "headers",
                        format!("header {name:?} must have a string value, not {}", json_type(value)),
                    ));
                };
                if !is_token(name) || value.chars().any(|c| c == '\r' || c == '\n') {
                    return Err(CommandError::field(
                        CommandErrorCode::BadValue,
                        "headers",
                        format!("header {name:?}: {value:?} is not one valid header line (name a token, value without line breaks)"),
                    ));
                }
                let lower = name.to_ascii_lowercase();
                if ["content-type", "content-length", "call-id", "cseq", "via", "from", "to", "contact"]
                    .contains(&lower.as_str())
                {
                    return Err(CommandError::field(
                        CommandErrorCode::BadValue,
                        "headers",
                        format!("header {name:?} is OpenSIPS's to write; use \"content_type\" for the body's type"),
                    ));
                }
                out.push(Header { name: name.clone(), value: value.clone() });
            }
            out
        }
        Some(other) => {
            return Err(CommandError::field(
                CommandErrorCode::WrongType,
                "headers",
                format!("\"headers\" must be an object of header names to values, not {}", json_type(other)),
            ))
        }
    };
    let body = text.map(|text| Body { content_type: content_type.unwrap_or_else(|| "application/sdp".into()), text });
    Ok(Payload { body, headers })
}

fn sip_method(body: &Map<String, Value>, field: &str, allowed: &[&str]) -> Result<Option<String>, CommandError> {
    let Some(method) = get_str(body, field)? else { return Ok(None) };
    let upper = method.to_ascii_uppercase();
    if !allowed.contains(&upper.as_str()) {
        return Err(CommandError::field(
            CommandErrorCode::BadValue,
            field,
            format!("\"{field}\" must be one of {}, not {method:?}", allowed.join(", ")),
        ));
    }
    Ok(Some(upper))
}

fn leg(body: &Map<String, Value>, field: &str) -> Result<LegName, CommandError> {
    match require_str(body, field)?.as_str() {
        "caller" => Ok(LegName::Caller),
        "callee" => Ok(LegName::Callee),
        other => Err(CommandError::field(
            CommandErrorCode::BadValue,
            field,
            format!("\"{field}\" must be \"caller\" or \"callee\", not {other:?}"),
        )),
    }
}

impl CommandRequest {
    /// The `cmd_id` a body carries, read best-effort (for answering a body that does not
    /// validate with the client's own id): None when it is not a JSON object within the size
    /// limit with a string `cmd_id`.
    pub fn cmd_id_of(bytes: &[u8]) -> Option<String> {
        if bytes.len() > MAX_COMMAND_BYTES {
            return None;
        }
        match serde_json::from_slice::<Value>(bytes).ok()? {
            Value::Object(mut body) => match body.remove("cmd_id")? {
                Value::String(id) => Some(id),
                _ => None,
            },
            _ => None,
        }
    }

    /// Validates a command body for `verb`.
    pub fn parse(verb: Verb, bytes: &[u8]) -> Result<CommandRequest, CommandError> {
        if bytes.len() > MAX_COMMAND_BYTES {
            return Err(CommandError::new(
                CommandErrorCode::BadRequest,
                format!("the command is {} bytes; the limit is {MAX_COMMAND_BYTES}", bytes.len()),
            ));
        }
        let body = match serde_json::from_slice::<Value>(bytes) {
            Ok(Value::Object(map)) => map,
            Ok(other) => {
                return Err(CommandError::new(
                    CommandErrorCode::BadRequest,
                    format!("a command is a JSON object, not {}", json_type(&other)),
                ))
            }
            Err(e) => {
                return Err(CommandError::new(CommandErrorCode::BadRequest, format!("the body is not JSON: {e}")))
            }
        };
        let cmd_id = get_str(&body, "cmd_id")?;
        let command = match verb {
            Verb::CallEnd => Command::End { target: any_target(&body)? },
            Verb::CallHold => Command::Hold { target: any_target(&body)? },
            Verb::CallUnhold => Command::Unhold { target: any_target(&body)? },
            Verb::CallTransferBlind => {
                let destination = require_str(&body, "destination")?;
                if !destination.starts_with("sip:") && !destination.starts_with("sips:") {
                    return Err(CommandError::field(
                        CommandErrorCode::BadValue,
                        "destination",
                        format!("\"destination\" must be a bare SIP URI (sip:user@host), not {destination:?}"),
                    ));
                }
                Command::TransferBlind { target: any_target(&body)?, leg: leg(&body, "leg")?, destination }
            }
            Verb::CallTransferAttended => Command::TransferAttended {
                target: target(&body, "call_id", "sip_call_id")?,
                leg: leg(&body, "leg")?,
                transfer_target: target(&body, "transfer_call_id", "transfer_sip_call_id")?,
                transfer_leg: leg(&body, "transfer_leg")?,
            },
            Verb::CallGet => Command::Get { target: any_target(&body)?, history: get_bool_or(&body, "history", true)? },
            Verb::CallList => Command::List { state: get_str(&body, "state")?, node: get_str(&body, "node")? },
            Verb::CallStart => Command::Start {
                caller: uri(&body, "caller", true, false)?.unwrap_or_default(),
                callee: uri(&body, "callee", true, false)?.unwrap_or_default(),
                from: uri(&body, "from", false, true)?,
                node: get_str(&body, "node")?,
                max_duration_s: max_duration(&body)?,
            },
            Verb::UaStart => Command::UaStart {
                to: uri(&body, "to", true, true)?.unwrap_or_default(),
                from: uri(&body, "from", true, true)?.unwrap_or_default(),
                ruri: uri(&body, "ruri", false, false)?,
                proxy: uri(&body, "proxy", false, false)?,
                payload: payload(&body)?,
                manual_ack: get_bool(&body, "manual_ack")?,
                max_duration_s: max_duration(&body)?,
                node: get_str(&body, "node")?,
            },
            Verb::UaAnswer => {
                let code = get_u64(&body, "code")?.ok_or_else(|| {
                    CommandError::field(
                        CommandErrorCode::MissingField,
                        "code",
                        "\"code\" (the status code) is required".into(),
                    )
                })?;
                if !(100..=699).contains(&code) {
                    return Err(CommandError::field(
                        CommandErrorCode::BadValue,
                        "code",
                        format!("\"code\" must be a SIP status code (100–699), not {code}"),
                    ));
                }
                let code = code as u16;
                let reason = get_str(&body, "reason")?.unwrap_or_else(|| reason_phrase(code).to_owned());
                if reason.chars().any(char::is_control) {
                    return Err(CommandError::field(
                        CommandErrorCode::BadValue,
                        "reason",
                        "\"reason\" must be one line of text".into(),
                    ));
                }
                let method = sip_method(&body, "method", &UA_UPDATE_METHODS[..7])?;
                Command::UaAnswer { target: any_target(&body)?, code, reason, method, payload: payload(&body)? }
            }
            Verb::UaUpdate => {
                let method = sip_method(&body, "method", &UA_UPDATE_METHODS)?.ok_or_else(|| {
                    CommandError::field(
                        CommandErrorCode::MissingField,
                        "method",
                        format!("\"method\" is required: one of {}", UA_UPDATE_METHODS.join(", ")),
                    )
                })?;
                Command::UaUpdate { target: any_target(&body)?, method, payload: payload(&body)? }
            }
            Verb::UaTerminate => Command::UaTerminate { target: any_target(&body)? },
        };
        Ok(CommandRequest { cmd_id, command })
    }
}

#[cfg(test)]
#[path = "command_tests.rs"]
mod tests;
