//! What the bridge puts on NATS besides raw event datagrams: MI replies on
//! `opensips.<node>.mi.<command>`, its own errors, headers, and its status on
//! `opensips.<node>.status`.
//!
//! An MI reply over NATS is OpenSIPS's JSON-RPC reply without `jsonrpc` and `id`: either
//! `{"result": R}` or `{"error": {"code", "message", "data"?}}`. Failures of the bridge itself
//! (timeout, refused command, bad body...) use the same `error` shape with codes in
//! [`BridgeErrorKind`]'s range (-33099..=-33001), which no OpenSIPS error uses.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::mi::MiError;

/// NATS header: the OpenSIPS node a message came from.
pub const HEADER_NODE: &str = "Callbus-Node";
/// NATS header: when the bridge received the datagram, in microseconds since the Unix epoch.
pub const HEADER_RECEIVED_US: &str = "Callbus-Received-Us";
/// NATS header: the bridge's sequence number for the datagram (1, 2, 3... per bridge run).
pub const HEADER_SEQ: &str = "Callbus-Seq";
/// NATS header: why a datagram was published on `opensips.<node>.invalid`.
pub const HEADER_INVALID_REASON: &str = "Callbus-Invalid-Reason";
/// NATS header used by JetStream to drop duplicates: `<node>.<bridge run id>.<seq>`.
pub const HEADER_MSG_ID: &str = "Nats-Msg-Id";

/// The reply to an MI request made over NATS.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum MiBusReply {
    /// OpenSIPS answered with a result.
    Result {
        /// The command's result, as OpenSIPS sent it.
        result: Value,
    },
    /// OpenSIPS answered with an error, or the bridge could not get an answer.
    Error {
        /// The error; codes -33099..=-33001 are the bridge's own ([`BridgeErrorKind`]).
        error: MiError,
    },
}

impl MiBusReply {
    /// The JSON body.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// A bridge failure as a reply.
    pub fn bridge_error(kind: BridgeErrorKind, detail: impl Into<String>) -> MiBusReply {
        MiBusReply::Error {
            error: MiError {
                code: kind.code(),
                message: kind.message().to_owned(),
                data: Some(Value::String(detail.into())),
            },
        }
    }
}

/// Failures of the bridge itself, each with its own code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BridgeErrorKind {
    /// OpenSIPS did not answer within the MI timeout.
    Timeout,
    /// The command is not on the bridge's MI allow-list.
    NotAllowed,
    /// The request body is not JSON, or not an object or array of params.
    BadBody,
    /// The request would not fit in one MI datagram.
    TooLarge,
    /// The MI datagram could not be delivered (nothing listens at the MI address).
    Unreachable,
    /// OpenSIPS answered with a plain-text error instead of JSON.
    PlainTextReply,
    /// The bridge is shutting down or has too many requests in flight.
    Unavailable,
}

impl BridgeErrorKind {
    /// Every kind.
    pub const ALL: [BridgeErrorKind; 7] = [
        BridgeErrorKind::Timeout,
        BridgeErrorKind::NotAllowed,
        BridgeErrorKind::BadBody,
        BridgeErrorKind::TooLarge,
        BridgeErrorKind::Unreachable,
        BridgeErrorKind::PlainTextReply,
        BridgeErrorKind::Unavailable,
    ];

    /// The error code.
    pub fn code(self) -> i64 {
        match self {
            BridgeErrorKind::Timeout => -33001,
            BridgeErrorKind::NotAllowed => -33002,
            BridgeErrorKind::BadBody => -33003,
            BridgeErrorKind::TooLarge => -33004,
            BridgeErrorKind::Unreachable => -33005,
            BridgeErrorKind::PlainTextReply => -33006,
            BridgeErrorKind::Unavailable => -33007,
        }
    }

    /// The error message.
    pub fn message(self) -> &'static str {
        match self {
            BridgeErrorKind::Timeout => "OpenSIPS did not answer in time",
            BridgeErrorKind::NotAllowed => "MI command not allowed by the bridge",
            BridgeErrorKind::BadBody => "Request body is not MI params",
            BridgeErrorKind::TooLarge => "Request too large for an MI datagram",
            BridgeErrorKind::Unreachable => "OpenSIPS MI unreachable",
            BridgeErrorKind::PlainTextReply => "OpenSIPS answered with a plain-text error",
            BridgeErrorKind::Unavailable => "Bridge unavailable",
        }
    }

    /// A short label for metrics and logs, e.g. `timeout`.
    pub fn label(self) -> &'static str {
        match self {
            BridgeErrorKind::Timeout => "timeout",
            BridgeErrorKind::NotAllowed => "not_allowed",
            BridgeErrorKind::BadBody => "bad_body",
            BridgeErrorKind::TooLarge => "too_large",
            BridgeErrorKind::Unreachable => "unreachable",
            BridgeErrorKind::PlainTextReply => "plain_text_reply",
            BridgeErrorKind::Unavailable => "unavailable",
        }
    }

    /// The kind with this code, if it is one of the bridge's.
    pub fn from_code(code: i64) -> Option<BridgeErrorKind> {
        BridgeErrorKind::ALL.into_iter().find(|k| k.code() == code)
    }
}

/// One event subscription as the bridge keeps it alive.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SubscriptionStatus {
    /// The event name.
    pub event: String,
    /// The socket OpenSIPS sends to, e.g. `udp:127.0.0.1:8090`.
    pub socket: String,
    /// The expiry asked for, in seconds.
    pub expire_secs: u64,
    /// Seconds until it lapses unless renewed; null when it is not in place.
    pub expires_in_secs: Option<u64>,
    /// The last failure to subscribe, if the last attempt failed.
    pub last_error: Option<String>,
}

/// The bridge's counters since it started.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct BridgeCounters {
    /// Event datagrams received.
    pub datagrams_in: u64,
    /// Event datagrams published on NATS (valid and invalid).
    pub published: u64,
    /// Datagrams that were not event notifications.
    pub invalid: u64,
    /// Datagrams dropped because the buffer towards NATS was full.
    pub overflowed: u64,
    /// MI requests received over NATS (and made by the bridge itself).
    pub mi_requests: u64,
    /// MI requests OpenSIPS answered with an error.
    pub mi_errors: u64,
    /// MI requests OpenSIPS did not answer in time.
    pub mi_timeouts: u64,
    /// MI requests the bridge refused or could not deliver (allow-list, bad body, too large, unreachable).
    pub mi_refused: u64,
    /// Times OpenSIPS was seen to restart (or come back after being unreachable).
    pub opensips_restarts: u64,
    /// Batches of events NATS confirmed (`published / batches` is the mean batch size).
    pub batches: u64,
}

/// Published on `opensips.<node>.status` every few seconds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct BridgeStatus {
    /// The OpenSIPS node.
    pub node: String,
    /// When this status was made, milliseconds since the Unix epoch.
    pub time_unix_ms: u64,
    /// The OpenSIPS MI address.
    pub mi: String,
    /// Where event datagrams are received.
    pub events_listen: String,
    /// Whether OpenSIPS answered its last health check.
    pub opensips_reachable: bool,
    /// OpenSIPS's `uptime` "Up since", when known.
    pub opensips_up_since: Option<String>,
    /// The event subscriptions.
    pub subscriptions: Vec<SubscriptionStatus>,
    /// Counters.
    pub counters: BridgeCounters,
    /// Datagrams waiting to be published (NATS slow or down).
    pub buffered: u64,
    /// The most datagrams that may wait.
    pub buffer_capacity: u64,
    /// When the last event datagram arrived, milliseconds since the Unix epoch.
    pub last_datagram_unix_ms: Option<u64>,
}
