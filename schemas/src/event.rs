//! OpenSIPS event datagrams (module `event_datagram`).
//!
//! Each event is one datagram, a JSON-RPC 2.0 notification without id and without a trailing
//! newline: `{"jsonrpc":"2.0","method":"<EVENT>","params":{...}}`. The four events callbus
//! acts on are typed ([`DlgStateChanged`], [`UaSession`], [`CallHold`], [`CallTransfer`]);
//! every other event is kept intact as [`Event::Other`]. Params keep OpenSIPS's member order,
//! its nulls (e.g. `to_tag` before any reply, `reason` on requests, `body`/`headers` without
//! flags `b`/`h`) and any member a newer OpenSIPS adds (`extra`), so a parsed event serializes
//! back to the same JSON.

use std::borrow::Cow;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::mi::JSONRPC_VERSION;
use crate::MAX_UDP_PAYLOAD;

/// `E_DLG_STATE_CHANGED`: a proxied dialog changed state (module `dialog`).
pub const E_DLG_STATE_CHANGED: &str = "E_DLG_STATE_CHANGED";
/// `E_UA_SESSION`: something happened on a user-agent session (module `b2b_entities`, 3.4+).
pub const E_UA_SESSION: &str = "E_UA_SESSION";
/// `E_CALL_HOLD`: a leg of a proxied call is being put on hold or resumed (module `callops`).
pub const E_CALL_HOLD: &str = "E_CALL_HOLD";
/// `E_CALL_TRANSFER`: progress of a transfer of a proxied call (module `callops`).
pub const E_CALL_TRANSFER: &str = "E_CALL_TRANSFER";

/// The events callbus subscribes to by default.
pub const DEFAULT_EVENTS: [&str; 4] = [E_DLG_STATE_CHANGED, E_UA_SESSION, E_CALL_HOLD, E_CALL_TRANSFER];

/// A dialog state as numbered by the OpenSIPS `dialog` module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DlgState {
    /// 1: created, no reply yet (only ever seen as `old_state`).
    Unconfirmed,
    /// 2: a provisional (1xx) reply was relayed.
    Early,
    /// 3: a 2xx was relayed, no ACK seen yet.
    Answered,
    /// 4: the ACK was seen; the call is up.
    Confirmed,
    /// 5: the dialog ended.
    Deleted,
    /// Any other number, kept as received.
    Unknown(i64),
}

impl DlgState {
    /// The number OpenSIPS uses.
    pub fn code(self) -> i64 {
        match self {
            DlgState::Unconfirmed => 1,
            DlgState::Early => 2,
            DlgState::Answered => 3,
            DlgState::Confirmed => 4,
            DlgState::Deleted => 5,
            DlgState::Unknown(n) => n,
        }
    }

    /// The lower-case name callbus uses for the state.
    pub fn name(self) -> &'static str {
        match self {
            DlgState::Unconfirmed => "unconfirmed",
            DlgState::Early => "early",
            DlgState::Answered => "answered",
            DlgState::Confirmed => "confirmed",
            DlgState::Deleted => "deleted",
            DlgState::Unknown(_) => "unknown",
        }
    }
}

impl From<i64> for DlgState {
    fn from(n: i64) -> Self {
        match n {
            1 => DlgState::Unconfirmed,
            2 => DlgState::Early,
            3 => DlgState::Answered,
            4 => DlgState::Confirmed,
            5 => DlgState::Deleted,
            other => DlgState::Unknown(other),
        }
    }
}

impl Serialize for DlgState {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_i64(self.code())
    }
}

impl<'de> Deserialize<'de> for DlgState {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        i64::deserialize(deserializer).map(DlgState::from)
    }
}

impl JsonSchema for DlgState {
    fn schema_name() -> Cow<'static, str> {
        "DlgState".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "integer",
            "description": "Dialog state: 1 unconfirmed, 2 early, 3 answered (2xx, no ACK yet), 4 confirmed, 5 deleted; other numbers are kept as received.",
            "examples": [1, 2, 3, 4, 5]
        })
    }
}

string_enum! {
    /// `E_UA_SESSION` `event_type`.
    UaEventType {
        /// An incoming initial INVITE created a UA server session.
        New = "NEW",
        /// A provisional (1xx) reply to a request we sent.
        Early = "EARLY",
        /// A 2xx reply to a request we sent (initial INVITE, re-INVITE, INFO, OPTIONS, BYE...).
        Answered = "ANSWERED",
        /// A 3xx-6xx reply to a request we sent, or a local timeout (408 "Timeout").
        Rejected = "REJECTED",
        /// An in-dialog request from the remote side (re-INVITE, INFO, ACK with flag `a`...).
        Updated = "UPDATED",
        /// BYE or CANCEL from the remote side.
        Terminated = "TERMINATED",
    }
}

string_enum! {
    /// `E_UA_SESSION` `entity_type`: which side of the session OpenSIPS plays.
    UaEntity {
        /// User agent server: the session was created by an incoming INVITE.
        Uas = "UAS",
        /// User agent client: the session was started by `ua_session_client_start`.
        Uac = "UAC",
    }
}

string_enum! {
    /// A leg of a proxied call (callops `leg`).
    Leg {
        /// The calling party (the dialog's From side).
        Caller = "caller",
        /// The called party (the dialog's To side).
        Callee = "callee",
    }
}

string_enum! {
    /// `E_CALL_HOLD` `action`.
    HoldAction {
        /// Putting the leg on hold.
        Hold = "hold",
        /// Resuming the leg.
        Unhold = "unhold",
    }
}

string_enum! {
    /// `E_CALL_HOLD` `state`.
    HoldState {
        /// The re-INVITE for the leg is about to be sent.
        Start = "start",
        /// The leg answered the re-INVITE with 2xx.
        Ok = "ok",
        /// The leg refused the re-INVITE (3xx-6xx), timed out, or it could not be sent.
        Fail = "fail",
    }
}

string_enum! {
    /// `E_CALL_TRANSFER` `state`.
    TransferState {
        /// The transferee's new INVITE arrived and was linked to the call.
        Start = "start",
        /// A NOTIFY with the new call's progress (`status` holds its status line).
        Notify = "notify",
        /// The new call was answered.
        Ok = "ok",
        /// The new call failed.
        Fail = "fail",
    }
}

/// Params of `E_DLG_STATE_CHANGED`, in OpenSIPS's order.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
pub struct DlgStateChanged {
    /// Dialog ID `<h_entry>.<h_id>` in hex, e.g. `"ed8.f137d1f"` (accepted by `dlg_end_dlg`).
    pub id: String,
    /// The same identity as a decimal string.
    pub db_id: String,
    /// The SIP Call-ID.
    pub callid: String,
    /// The caller's tag.
    pub from_tag: String,
    /// The callee's tag; `null` when no reply ever came.
    pub to_tag: Option<String>,
    /// The state before.
    pub old_state: DlgState,
    /// The state after.
    pub new_state: DlgState,
    /// Members a newer OpenSIPS adds, kept as received.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Params of `E_UA_SESSION`, in OpenSIPS's order.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
pub struct UaSession {
    /// The session key, e.g. `"B2B.34.7688516.1795417967.294181658"`.
    pub key: String,
    /// What happened.
    pub event_type: UaEventType,
    /// Which side OpenSIPS plays in the session.
    pub entity_type: UaEntity,
    /// The reply's status code; 0 for requests.
    pub status: i64,
    /// The reply's reason phrase; `null` for requests.
    pub reason: Option<String>,
    /// The request method, or for a reply the CSeq method it answers.
    pub method: String,
    /// The message body; `null` without flag `b` (or without Content-Length), `""` when empty.
    pub body: Option<String>,
    /// All header lines, CRLF-terminated; `null` without flag `h`.
    pub headers: Option<String>,
    /// Members a newer OpenSIPS adds (3.6 adds `extra_params`), kept as received.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Params of `E_CALL_HOLD`, in OpenSIPS's order.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
pub struct CallHold {
    /// The SIP Call-ID of the proxied call.
    pub callid: String,
    /// The leg being re-INVITEd.
    pub leg: Leg,
    /// Hold or unhold (3.4 sends the literal `"action"` on one failure path: kept as unknown).
    pub action: HoldAction,
    /// Progress of that leg's re-INVITE.
    pub state: HoldState,
    /// Members a newer OpenSIPS adds, kept as received.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Params of `E_CALL_TRANSFER`, in OpenSIPS's order.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
pub struct CallTransfer {
    /// The SIP Call-ID of the call being transferred.
    pub callid: String,
    /// The leg that received the REFER. Empty on `notify`; OpenSIPS 3.4.18 puts the new
    /// call's Call-ID here on a blind transfer's `start` (fixture
    /// `events/E_CALL_TRANSFER.1.call_transfer_blind.json`): such values arrive as unknown.
    pub leg: Leg,
    /// The Call-ID of the transferee's new call.
    pub transfer_callid: String,
    /// Where the transferee was sent; empty on `notify`.
    pub destination: String,
    /// Progress of the transfer.
    pub state: TransferState,
    /// Status line of the new call, e.g. `"200 OK"`; empty on `start`.
    pub status: String,
    /// Members a newer OpenSIPS adds, kept as received.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// An event datagram on the wire: `{"jsonrpc":"2.0","method":M,"params":P}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Notification<P> {
    /// Always `"2.0"`.
    pub jsonrpc: String,
    /// The event name, e.g. `E_DLG_STATE_CHANGED`.
    pub method: String,
    /// The event's params.
    pub params: P,
}

/// An OpenSIPS event, typed where callbus knows it.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// `E_DLG_STATE_CHANGED`.
    DlgStateChanged(DlgStateChanged),
    /// `E_UA_SESSION`.
    UaSession(UaSession),
    /// `E_CALL_HOLD`.
    CallHold(CallHold),
    /// `E_CALL_TRANSFER`.
    CallTransfer(CallTransfer),
    /// Any other event, kept intact.
    Other {
        /// The event name.
        method: String,
        /// Its params as received (`None` when the datagram had no `params`).
        params: Option<Value>,
    },
}

/// Why a datagram is not a usable event notification.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum EventError {
    /// Larger than any UDP datagram.
    #[error("event datagram of {size} bytes exceeds the {limit}-byte datagram limit")]
    Oversized {
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Not JSON, not UTF-8, or not a JSON-RPC 2.0 notification.
    #[error("not a JSON-RPC notification: {reason}")]
    NotNotification {
        /// What was wrong.
        reason: String,
    },
    /// A known event whose params do not have the fields and types OpenSIPS sends.
    #[error("{event} params do not match OpenSIPS's format: {reason}")]
    BadParams {
        /// The event name.
        event: String,
        /// What was wrong.
        reason: String,
    },
}

/// `Deserialize` for a typed params struct in one pass: known members into their fields,
/// every other member into `extra` (what `#[serde(flatten)]` does, without buffering the
/// whole object first, which made parsing three times slower). Optional fields may be absent.
macro_rules! params_deserialize {
    ($ty:ident { $($field:ident),* } optional { $($opt:ident),* }) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct Visit;
                impl<'de> serde::de::Visitor<'de> for Visit {
                    type Value = $ty;
                    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                        f.write_str(concat!("the params of ", stringify!($ty), " (an object)"))
                    }
                    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<$ty, A::Error> {
                        $(let mut $field = None;)*
                        $(let mut $opt = None;)*
                        let mut extra = Map::new();
                        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                            match key.as_ref() {
                                $(stringify!($field) => {
                                    if $field.is_some() {
                                        return Err(serde::de::Error::duplicate_field(stringify!($field)));
                                    }
                                    $field = Some(map.next_value()?);
                                })*
                                $(stringify!($opt) => {
                                    if $opt.is_some() {
                                        return Err(serde::de::Error::duplicate_field(stringify!($opt)));
                                    }
                                    $opt = Some(map.next_value()?);
                                })*
                                _ => {
                                    extra.insert(key.into_owned(), map.next_value()?);
                                }
                            }
                        }
                        Ok($ty {
                            $($field: $field.ok_or_else(|| serde::de::Error::missing_field(stringify!($field)))?,)*
                            $($opt: $opt.flatten(),)*
                            extra,
                        })
                    }
                }
                d.deserialize_map(Visit)
            }
        }
    };
}

params_deserialize!(DlgStateChanged { id, db_id, callid, from_tag, old_state, new_state } optional { to_tag });
params_deserialize!(UaSession { key, event_type, entity_type, status, method } optional { reason, body, headers });
params_deserialize!(CallHold { callid, leg, action, state } optional {});
params_deserialize!(CallTransfer { callid, leg, transfer_callid, destination, state, status } optional {});

/// The envelope, borrowed: only the event name is decoded, the params stay raw.
#[derive(Deserialize)]
struct Envelope<'a> {
    jsonrpc: Option<Cow<'a, str>>,
    #[serde(borrow)]
    method: Option<Cow<'a, str>>,
    #[serde(borrow)]
    params: Option<&'a RawValue>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
}

fn envelope(bytes: &[u8]) -> Result<Envelope<'_>, EventError> {
    if bytes.len() > MAX_UDP_PAYLOAD {
        return Err(EventError::Oversized { size: bytes.len(), limit: MAX_UDP_PAYLOAD });
    }
    let env: Envelope<'_> =
        serde_json::from_slice(bytes).map_err(|e| EventError::NotNotification { reason: e.to_string() })?;
    let not = |reason: &str| Err(EventError::NotNotification { reason: reason.to_owned() });
    match env.jsonrpc.as_deref() {
        Some(JSONRPC_VERSION) => {}
        Some(_) => return not("\"jsonrpc\" is not \"2.0\""),
        None => return not("the \"jsonrpc\" member is missing"),
    }
    if env.id.is_some() {
        return not("it has an \"id\": a notification has none");
    }
    match env.method.as_deref() {
        None => not("the \"method\" member (the event name) is missing"),
        Some("") => not("the event name is empty"),
        Some(_) => Ok(env),
    }
}

/// Reads only the event name of a datagram, checking that it is a JSON-RPC notification.
/// This is the bridge's fast path: the params are skipped, not decoded.
pub fn event_name(bytes: &[u8]) -> Result<String, EventError> {
    let env = envelope(bytes)?;
    Ok(env.method.map(Cow::into_owned).unwrap_or_default())
}

impl Event {
    /// Parses an event datagram.
    pub fn parse(bytes: &[u8]) -> Result<Event, EventError> {
        let env = envelope(bytes)?;
        let method = env.method.map(Cow::into_owned).unwrap_or_default();
        fn typed<'a, P: Deserialize<'a>>(method: &str, params: Option<&'a RawValue>) -> Result<P, EventError> {
            let raw = params.ok_or_else(|| EventError::BadParams {
                event: method.to_owned(),
                reason: "the \"params\" member is missing".into(),
            })?;
            serde_json::from_str(raw.get())
                .map_err(|e| EventError::BadParams { event: method.to_owned(), reason: e.to_string() })
        }
        Ok(match method.as_str() {
            E_DLG_STATE_CHANGED => Event::DlgStateChanged(typed(&method, env.params)?),
            E_UA_SESSION => Event::UaSession(typed(&method, env.params)?),
            E_CALL_HOLD => Event::CallHold(typed(&method, env.params)?),
            E_CALL_TRANSFER => Event::CallTransfer(typed(&method, env.params)?),
            _ => {
                let params = match env.params {
                    Some(raw) => Some(
                        serde_json::from_str(raw.get())
                            .map_err(|e| EventError::NotNotification { reason: e.to_string() })?,
                    ),
                    None => None,
                };
                Event::Other { method, params }
            }
        })
    }

    /// The event name (the notification's `method`).
    pub fn name(&self) -> &str {
        match self {
            Event::DlgStateChanged(_) => E_DLG_STATE_CHANGED,
            Event::UaSession(_) => E_UA_SESSION,
            Event::CallHold(_) => E_CALL_HOLD,
            Event::CallTransfer(_) => E_CALL_TRANSFER,
            Event::Other { method, .. } => method,
        }
    }

    /// The params as JSON.
    pub fn params(&self) -> Value {
        let value = match self {
            Event::DlgStateChanged(p) => serde_json::to_value(p),
            Event::UaSession(p) => serde_json::to_value(p),
            Event::CallHold(p) => serde_json::to_value(p),
            Event::CallTransfer(p) => serde_json::to_value(p),
            Event::Other { params, .. } => Ok(params.clone().unwrap_or(Value::Null)),
        };
        value.unwrap_or(Value::Null)
    }

    /// The datagram bytes as OpenSIPS writes them: compact, members in OpenSIPS's order,
    /// no trailing newline.
    pub fn to_bytes(&self) -> Vec<u8> {
        fn wire<P: Serialize>(method: &str, params: &P) -> Vec<u8> {
            let n = Notification { jsonrpc: JSONRPC_VERSION.to_owned(), method: method.to_owned(), params };
            serde_json::to_vec(&n).unwrap_or_default()
        }
        match self {
            Event::DlgStateChanged(p) => wire(E_DLG_STATE_CHANGED, p),
            Event::UaSession(p) => wire(E_UA_SESSION, p),
            Event::CallHold(p) => wire(E_CALL_HOLD, p),
            Event::CallTransfer(p) => wire(E_CALL_TRANSFER, p),
            Event::Other { method, params: Some(p) } => wire(method, p),
            Event::Other { method, params: None } => {
                #[derive(Serialize)]
                struct Bare<'a> {
                    jsonrpc: &'a str,
                    method: &'a str,
                }
                serde_json::to_vec(&Bare { jsonrpc: JSONRPC_VERSION, method }).unwrap_or_default()
            }
        }
    }
}
