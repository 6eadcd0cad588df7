//! Every type that crosses a process boundary in callbus, and nothing else.
//!
//! - [`mi`]: OpenSIPS Management Interface datagrams (JSON-RPC 2.0 requests and the replies
//!   real OpenSIPS 3.4 sends, including its two plain-text replies).
//! - [`event`]: OpenSIPS event datagrams (`event_datagram` JSON-RPC notifications), typed for
//!   the events callbus uses and kept intact for every other one.
//! - [`mi_call`]: the MI commands callbus sends, with typed params.
//! - [`bus`]: what the bridge publishes besides raw events: MI replies, its errors, its status.
//! - [`callapi`]: the OpenSIPS Call API's own protocol, for the compatibility door.
//! - [`command`]: app commands, their replies, and per-call notifications.
//! - [`subjects`]: building and parsing every NATS subject of the public contract.
//! - [`json_schema`]: the JSON Schemas of the public message types, as checked into `schemas/json/`.
//!
//! Parsers here never panic on input: malformed, truncated, oversized, wrong-typed or
//! non-UTF-8 bytes come back as typed errors (or, for MI replies, as a classified
//! [`mi::MiReply::Unrecognized`]).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

#[macro_use]
mod string_enum;
pub mod bus;
pub mod callapi;
pub mod catalog;
pub mod clock;
pub mod cluster;
pub mod command;
pub mod event;
pub mod input;
pub mod json_schema;
pub mod mi;
pub mod mi_call;
pub mod notes;
pub mod subjects;

/// The largest UDP payload (IPv4): nothing bigger can arrive as one datagram.
pub const MAX_UDP_PAYLOAD: usize = 65_507;

/// The size of OpenSIPS `mi_datagram`'s receive buffer: a request up to this size is read,
/// a longer one is dropped without a reply, and a reply longer than this becomes the plain
/// text `500 Internal error` (fixtures `mi/oversize_request.*`, `mi/dlg_list.too_large_120_calls`).
pub const MI_DATAGRAM_BUFFER: usize = 65_457;
