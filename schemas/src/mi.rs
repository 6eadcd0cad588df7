//! OpenSIPS MI over datagrams (module `mi_datagram`): JSON-RPC 2.0 requests and replies.
//!
//! A request is one datagram `{"jsonrpc":"2.0","method":M,"id":ID,"params":{...}}`. A reply is
//! a success (`result`, any JSON), an error (`error` with `code`, `message`, optional `data`),
//! or one of two plain-text datagrams real OpenSIPS sends instead of JSON: `400 Parse_error`
//! for unparseable JSON and `500 Internal error` for a reply too big for its buffer
//! (fixtures `mi/invalid_json.parse_error`, `mi/dlg_list.too_large_120_calls`).
//! [`MiReply::classify`] never fails: whatever arrives is sorted into one of these, or into
//! [`MiReply::Unrecognized`] with the reason.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use crate::MAX_UDP_PAYLOAD;

/// The only JSON-RPC version OpenSIPS speaks.
pub const JSONRPC_VERSION: &str = "2.0";

/// JSON-RPC framework error codes OpenSIPS uses (command errors use positive SIP-like codes).
pub mod codes {
    /// The request is not a valid JSON-RPC request (no method, no `"jsonrpc"`, bad types).
    pub const INVALID_REQUEST: i64 = -32600;
    /// No such MI command.
    pub const METHOD_NOT_FOUND: i64 = -32601;
    /// The params do not match any of the command's parameter sets.
    pub const INVALID_PARAMS: i64 = -32602;
    /// The command handler failed (`data` says how).
    pub const SERVER_ERROR: i64 = -32000;
}

/// A JSON-RPC id as OpenSIPS echoes it: a number, a string or null.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum MiId {
    /// A numeric id (OpenSIPS echoes it through a C `int`: keep ids small).
    Number(serde_json::Number),
    /// A string id, echoed verbatim.
    String(String),
    /// An explicit `null` id (still answered, unlike an absent id).
    Null,
}

impl From<u64> for MiId {
    fn from(n: u64) -> Self {
        MiId::Number(n.into())
    }
}

impl From<&str> for MiId {
    fn from(s: &str) -> Self {
        MiId::String(s.to_owned())
    }
}

impl fmt::Display for MiId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MiId::Number(n) => write!(f, "{n}"),
            MiId::String(s) => write!(f, "{s:?}"),
            MiId::Null => f.write_str("null"),
        }
    }
}

/// MI params: named (a JSON object, what almost every command wants) or positional (an array).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum MiParams {
    /// Named params, `{"callid": "..."}`.
    Named(Map<String, Value>),
    /// Positional params, `["..."]` (refused by commands that only take named params).
    Positional(Vec<Value>),
}

impl MiParams {
    /// The number of params; OpenSIPS treats an empty object or array as no params at all.
    pub fn len(&self) -> usize {
        match self {
            MiParams::Named(map) => map.len(),
            MiParams::Positional(list) => list.len(),
        }
    }

    /// True when there are no params.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Deserializes a present field (even `null`) as `Some`, so an absent id and `"id":null` differ.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// An MI request datagram.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MiRequest {
    /// Always `"2.0"`.
    pub jsonrpc: String,
    /// The MI command, e.g. `call_hold`.
    pub method: String,
    /// The id the reply will echo. Absent: OpenSIPS sends no reply at all.
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub id: Option<MiId>,
    /// The command's params; absent when it takes none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<MiParams>,
}

/// Why a datagram is not an MI request OpenSIPS would run, and what OpenSIPS answers.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum MiRequestError {
    /// Not JSON at all (or not UTF-8): OpenSIPS answers the plain text `400 Parse_error`.
    #[error("MI request is not valid JSON: {reason}")]
    NotJson {
        /// What the JSON parser said.
        reason: String,
    },
    /// JSON, but not a valid JSON-RPC request: OpenSIPS answers -32600 Invalid Request.
    #[error("MI request is not a valid JSON-RPC request: {reason}")]
    InvalidRequest {
        /// The id to answer with (`null` when none could be read).
        id: MiId,
        /// Which rule it broke.
        reason: String,
    },
    /// An `id` that is not a number, a string or null: OpenSIPS 3.4 fails building any reply and
    /// answers the plain text `500 Internal error` (checked against a running 3.4.18 by the
    /// real-OpenSIPS tier's MI differential).
    #[error("MI request has an id of the wrong type: {found} (a number, a string or null)")]
    BadId {
        /// The JSON type found.
        found: String,
    },
    /// Larger than one UDP datagram can carry.
    #[error("MI request of {size} bytes exceeds the {limit}-byte datagram limit")]
    Oversized {
        /// The request's size in bytes.
        size: usize,
        /// The limit it exceeded.
        limit: usize,
    },
}

impl MiRequest {
    /// A request with named params (the form every OpenSIPS command accepts).
    pub fn named(method: impl Into<String>, id: impl Into<MiId>, params: Map<String, Value>) -> Self {
        MiRequest {
            jsonrpc: JSONRPC_VERSION.to_owned(),
            method: method.into(),
            id: Some(id.into()),
            params: if params.is_empty() { None } else { Some(MiParams::Named(params)) },
        }
    }

    /// The datagram bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serializing plain strings, maps and numbers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses a request datagram by OpenSIPS's rules (`mi/mi.c:parse_mi_request`): `jsonrpc`
    /// must be `"2.0"`, `method` a string, `id` absent, a number, a string or null, `params`
    /// absent, an object or an array. Bytes after the JSON value are ignored, as OpenSIPS does.
    pub fn parse(bytes: &[u8]) -> Result<MiRequest, MiRequestError> {
        if bytes.len() > MAX_UDP_PAYLOAD {
            return Err(MiRequestError::Oversized { size: bytes.len(), limit: MAX_UDP_PAYLOAD });
        }
        let value = first_json_value(bytes).map_err(|reason| MiRequestError::NotJson { reason })?;
        let Value::Object(mut object) = value else {
            return Err(MiRequestError::InvalidRequest {
                id: MiId::Null,
                reason: "the request is not a JSON object".into(),
            });
        };
        let id = match object.remove("id") {
            None => None,
            Some(Value::Null) => Some(MiId::Null),
            Some(Value::Number(n)) => Some(MiId::Number(n)),
            Some(Value::String(s)) => Some(MiId::String(s)),
            Some(other) => return Err(MiRequestError::BadId { found: json_type(&other).to_owned() }),
        };
        let invalid = |reason: String| MiRequestError::InvalidRequest { id: id.clone().unwrap_or(MiId::Null), reason };
        match object.remove("jsonrpc") {
            Some(Value::String(v)) if v == JSONRPC_VERSION => {}
            Some(other) => return Err(invalid(format!("\"jsonrpc\" must be \"2.0\", not {other}"))),
            None => return Err(invalid("the \"jsonrpc\" member is missing".into())),
        }
        let method = match object.remove("method") {
            Some(Value::String(m)) => m,
            Some(other) => return Err(invalid(format!("\"method\" must be a string, not {}", json_type(&other)))),
            None => return Err(invalid("the \"method\" member is missing".into())),
        };
        let params = match object.remove("params") {
            None => None,
            Some(Value::Object(map)) => Some(MiParams::Named(map)),
            Some(Value::Array(list)) => Some(MiParams::Positional(list)),
            Some(other) => {
                return Err(invalid(format!("\"params\" must be an object or an array, not {}", json_type(&other))))
            }
        };
        Ok(MiRequest { jsonrpc: JSONRPC_VERSION.to_owned(), method, id, params })
    }
}

/// Reads the first JSON value of `bytes`, ignoring whatever follows it.
fn first_json_value(bytes: &[u8]) -> Result<Value, String> {
    let mut stream = serde_json::Deserializer::from_slice(bytes).into_iter::<Value>();
    match stream.next() {
        Some(Ok(value)) => Ok(value),
        Some(Err(e)) => Err(e.to_string()),
        None => Err("empty datagram".into()),
    }
}

/// The JSON type name of a value, for error messages.
pub fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A successful MI reply: `{"jsonrpc":"2.0","result":R,"id":ID}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MiSuccess {
    /// Always `"2.0"`.
    pub jsonrpc: String,
    /// The command's result: `"OK"`, another string, an object or an array, by command.
    pub result: Value,
    /// The request's id, echoed.
    pub id: MiId,
}

/// The `error` member of an MI error reply.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MiError {
    /// Negative JSON-RPC codes for framework errors ([`codes`]), positive SIP-like codes
    /// (400, 404, 410, 480, 491, 500) for command errors.
    pub code: i64,
    /// OpenSIPS's message, e.g. `"Dialog not found"`.
    pub message: String,
    /// Detail for some framework errors, e.g. `"Too few or too many parameters"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

impl fmt::Display for MiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.message)?;
        match &self.data {
            Some(Value::String(data)) => write!(f, " ({data})"),
            Some(other) => write!(f, " ({other})"),
            None => Ok(()),
        }
    }
}

/// An MI error reply: `{"jsonrpc":"2.0","error":{...},"id":ID}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MiErrorReply {
    /// Always `"2.0"`.
    pub jsonrpc: String,
    /// What went wrong.
    pub error: MiError,
    /// The request's id, echoed (`null` for an invalid request whose id could not be read).
    pub id: MiId,
}

/// The plain-text (non-JSON) replies OpenSIPS's `mi_datagram` sends. They carry no id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MiPlainText {
    /// `400 Parse_error`: the request was not parseable JSON.
    ParseError,
    /// `500 Internal error`: the reply did not fit the 65457-byte buffer (or could not be built).
    InternalError,
    /// Another `<code> <text>` line, kept as received.
    Other {
        /// The leading status code.
        code: u16,
        /// The text after it.
        text: String,
    },
}

impl MiPlainText {
    /// The datagram text.
    pub fn as_text(&self) -> String {
        match self {
            MiPlainText::ParseError => "400 Parse_error".into(),
            MiPlainText::InternalError => "500 Internal error".into(),
            MiPlainText::Other { code, text } => format!("{code} {text}"),
        }
    }
}

/// Any datagram that arrives on an MI client socket, classified.
#[derive(Clone, Debug, PartialEq)]
pub enum MiReply {
    /// A JSON-RPC success.
    Success(MiSuccess),
    /// A JSON-RPC error.
    Error(MiErrorReply),
    /// A plain-text reply (no id: it cannot be matched to a request by id).
    PlainText(MiPlainText),
    /// Neither: kept so the caller can log and count it.
    Unrecognized {
        /// Why it could not be classified.
        reason: String,
    },
}

impl MiReply {
    /// Sorts a datagram into one of the reply kinds. Never fails and never panics.
    pub fn classify(bytes: &[u8]) -> MiReply {
        if bytes.len() > MAX_UDP_PAYLOAD {
            return MiReply::Unrecognized { reason: format!("{} bytes is larger than any datagram", bytes.len()) };
        }
        if let Some(plain) = parse_plain_text(bytes) {
            return MiReply::PlainText(plain);
        }
        let value: Value = match serde_json::from_slice(bytes) {
            Ok(v) => v,
            Err(e) => return MiReply::Unrecognized { reason: format!("not JSON and not a plain-text reply: {e}") },
        };
        let Value::Object(object) = &value else {
            return MiReply::Unrecognized {
                reason: format!("a reply must be a JSON object, not {}", json_type(&value)),
            };
        };
        if object.get("jsonrpc").and_then(Value::as_str) != Some(JSONRPC_VERSION) {
            return MiReply::Unrecognized { reason: "the \"jsonrpc\" member is missing or not \"2.0\"".into() };
        }
        if !object.contains_key("id") {
            return MiReply::Unrecognized { reason: "the reply has no \"id\"".into() };
        }
        match (object.contains_key("result"), object.contains_key("error")) {
            (true, false) => match serde_json::from_value(value) {
                Ok(success) => MiReply::Success(success),
                Err(e) => MiReply::Unrecognized { reason: format!("malformed success reply: {e}") },
            },
            (false, true) => match serde_json::from_value(value) {
                Ok(error) => MiReply::Error(error),
                Err(e) => MiReply::Unrecognized { reason: format!("malformed error reply: {e}") },
            },
            (true, true) => MiReply::Unrecognized { reason: "the reply has both \"result\" and \"error\"".into() },
            (false, false) => MiReply::Unrecognized { reason: "the reply has neither \"result\" nor \"error\"".into() },
        }
    }

    /// The id the reply answers, when it has one.
    pub fn id(&self) -> Option<&MiId> {
        match self {
            MiReply::Success(s) => Some(&s.id),
            MiReply::Error(e) => Some(&e.id),
            _ => None,
        }
    }
}

/// Recognizes `<3-digit code> <text>` datagrams that are not JSON.
fn parse_plain_text(bytes: &[u8]) -> Option<MiPlainText> {
    let text = std::str::from_utf8(bytes).ok()?.trim_end_matches(['\r', '\n']);
    let (code, rest) = text.split_once(' ')?;
    if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) || rest.starts_with(['{', '[']) {
        return None;
    }
    let code: u16 = code.parse().ok()?;
    Some(match (code, rest) {
        (400, "Parse_error") => MiPlainText::ParseError,
        (500, "Internal error") => MiPlainText::InternalError,
        _ => MiPlainText::Other { code, text: rest.to_owned() },
    })
}

impl MiSuccess {
    /// A success reply for `id`.
    pub fn new(result: Value, id: MiId) -> Self {
        MiSuccess { jsonrpc: JSONRPC_VERSION.to_owned(), result, id }
    }

    /// The datagram bytes, member order as OpenSIPS writes them (jsonrpc, result, id).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

impl MiErrorReply {
    /// An error reply for `id`.
    pub fn new(code: i64, message: impl Into<String>, data: Option<&str>, id: MiId) -> Self {
        MiErrorReply {
            jsonrpc: JSONRPC_VERSION.to_owned(),
            error: MiError { code, message: message.into(), data: data.map(|d| Value::String(d.to_owned())) },
            id,
        }
    }

    /// The datagram bytes, member order as OpenSIPS writes them (jsonrpc, error, id).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// One dialog in a `dlg_list` result (the fields callbus reads; the rest is ignored).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DlgListEntry {
    /// Dialog ID, `hex.hex`.
    #[serde(rename = "ID")]
    pub id: String,
    /// Dialog state number (1..5).
    pub state: i64,
    /// The SIP Call-ID.
    pub callid: String,
    /// The caller's URI.
    #[serde(default)]
    pub from_uri: Option<String>,
    /// The callee's URI.
    #[serde(default)]
    pub to_uri: Option<String>,
}

/// A `dlg_list` result: paged (`index`+`counter`: with `count`) or not.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DlgListPage {
    /// Total dialogs (paged requests only).
    #[serde(default)]
    pub count: Option<u64>,
    /// The dialogs of this page.
    #[serde(rename = "Dialogs")]
    pub dialogs: Vec<DlgListEntry>,
}
