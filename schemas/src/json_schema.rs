//! The JSON Schemas of callbus's public message types, generated from the Rust types.
//!
//! `schemas/json/<name>.json` holds the checked-in copy of each; the test
//! `schemas/tests/json_schema_drift.rs` fails when they differ from what the code generates, and
//! `CALLBUS_UPDATE_SCHEMAS=1 cargo test -p callbus-schemas --test json_schema_drift` rewrites them.

use schemars::{schema_for, Schema};

use crate::bus::{BridgeStatus, MiBusReply};
use crate::command::{CallNotification, CommandError, CommandReply};
use crate::event::{CallHold, CallTransfer, DlgStateChanged, Notification, UaSession};
use crate::mi::{MiErrorReply, MiRequest, MiSuccess};

/// Every public message type: its file name (without `.json`) and its schema.
pub fn all() -> Vec<(&'static str, Schema)> {
    vec![
        ("mi_request", schema_for!(MiRequest)),
        ("mi_success", schema_for!(MiSuccess)),
        ("mi_error_reply", schema_for!(MiErrorReply)),
        ("event_dlg_state_changed", schema_for!(Notification<DlgStateChanged>)),
        ("event_ua_session", schema_for!(Notification<UaSession>)),
        ("event_call_hold", schema_for!(Notification<CallHold>)),
        ("event_call_transfer", schema_for!(Notification<CallTransfer>)),
        ("bus_mi_reply", schema_for!(MiBusReply)),
        ("bus_bridge_status", schema_for!(BridgeStatus)),
        ("command_reply", schema_for!(CommandReply)),
        ("command_error", schema_for!(CommandError)),
        ("call_notification", schema_for!(CallNotification)),
    ]
}

/// A schema as it is written to its file: pretty JSON with a trailing newline.
pub fn render(schema: &Schema) -> String {
    let mut text = serde_json::to_string_pretty(schema).unwrap_or_default();
    text.push('\n');
    text
}
