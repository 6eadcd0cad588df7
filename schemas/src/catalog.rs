//! What the command and notification tables of `docs/subjects.md` say, as data: the tables
//! there are generated from it (`schemas/tests/subjects_doc.rs` fails when they differ, and
//! rewrites them with `CALLBUS_BLESS=1`), and [`check_notification`] holds every notification the
//! engine sends to it (the end-to-end tests check every record of their logs), so the doc and
//! the code cannot drift apart.

use serde_json::Value;

use crate::command::CommandErrorCode;
use crate::subjects::Verb;

/// One command verb as documented.
#[derive(Clone, Copy, Debug)]
pub struct CommandDoc {
    /// The verb.
    pub verb: Verb,
    /// Its body, in words.
    pub body: &'static str,
    /// What it does.
    pub does: &'static str,
}

/// The command table, one row per verb.
pub const COMMANDS: &[CommandDoc] = &[
    CommandDoc {
        verb: Verb::CallEnd,
        body: "`call_id` or `sip_call_id`",
        does: "`dlg_end_dlg` (BYE both legs, or CANCEL if not answered)",
    },
    CommandDoc { verb: Verb::CallHold, body: "`call_id` or `sip_call_id`", does: "`call_hold`: re-INVITE both legs on hold" },
    CommandDoc { verb: Verb::CallUnhold, body: "`call_id` or `sip_call_id`", does: "`call_unhold`" },
    CommandDoc {
        verb: Verb::CallTransferBlind,
        body: "call, `leg` (`caller`/`callee`: who stays), `destination` (bare `sip:` URI)",
        does: "REFER `leg` to `destination`; on success the transferor's side is ended",
    },
    CommandDoc {
        verb: Verb::CallTransferAttended,
        body: "call, `leg`, `transfer_call_id` or `transfer_sip_call_id`, `transfer_leg`",
        does: "REFER with Replaces: connects `leg` with the other call's `transfer_leg`",
    },
    CommandDoc {
        verb: Verb::CallGet,
        body: "call; optional `history` (default `true`)",
        does: "the call and its history (one line per logged input, read from the log); `\"history\": false` answers with the call alone, from memory. A call is known while live and for `engine.ended_retention` (60 s) after it ended; older calls: `callbus replay timeline --call <call_id or Call-ID>`",
    },
    CommandDoc { verb: Verb::CallList, body: "optional `state`, `node`", does: "live calls" },
    CommandDoc {
        verb: Verb::CallStart,
        body: "`caller`, `callee` (SIP URIs); optional `from` (`Display,sip:…`, shown to both parties; the other party by default), `node`, `max_duration_s`",
        does: "click-to-dial (kind `bridged`): call the caller, then the callee, and connect them (RFC 3725, see `docs/engine.md`); `command_succeeded` once connected",
    },
    CommandDoc {
        verb: Verb::UaStart,
        body: "`to`, `from` (`Display,sip:…` or a URI); optional `ruri`, `proxy`, `body`, `content_type`, `headers`, `manual_ack`, `max_duration_s`, `node`",
        does: "OpenSIPS calls out as a user agent (kind `ua_client`); `command_succeeded` once answered",
    },
    CommandDoc {
        verb: Verb::UaAnswer,
        body: "call, `code` (100–699); optional `reason`, `method` (the request answered; the oldest waiting by default), `body`, `content_type`, `headers`",
        does: "reply to an incoming call (`incoming` notification) or to the remote side's in-dialog request (`request` notification)",
    },
    CommandDoc {
        verb: Verb::UaUpdate,
        body: "call, `method` (`INVITE`, `UPDATE`, `INFO`, `OPTIONS`, `MESSAGE`, `NOTIFY`, `PRACK`, `ACK`); optional `body`, `content_type`, `headers`",
        does: "an in-dialog request; `ACK` only after an answer to a `manual_ack` call",
    },
    CommandDoc {
        verb: Verb::UaTerminate,
        body: "call",
        does: "BYE (CANCEL before the answer; a 603 for an incoming call not yet answered)",
    },
];

/// One error code as documented.
#[derive(Clone, Copy, Debug)]
pub struct ErrorDoc {
    /// The code.
    pub code: CommandErrorCode,
    /// When it is given.
    pub when: &'static str,
}

/// The error table, one row per code.
pub const ERRORS: &[ErrorDoc] = &[
    ErrorDoc { code: CommandErrorCode::BadRequest, when: "not a JSON object, not JSON, or over 64 KiB" },
    ErrorDoc { code: CommandErrorCode::MissingField, when: "a required field is absent (`field` names it)" },
    ErrorDoc { code: CommandErrorCode::WrongType, when: "a field has the wrong JSON type" },
    ErrorDoc {
        code: CommandErrorCode::BadValue,
        when: "a field's value is not acceptable (`leg: \"both\"`, `destination: \"<sip:…>\"`, `call_id` and `sip_call_id` together, `code: 99`, `max_duration_s: 0`, a `Via` header, an oversized body)",
    },
    ErrorDoc { code: CommandErrorCode::UnknownCall, when: "no such call" },
    ErrorDoc {
        code: CommandErrorCode::WrongState,
        when: "the command does not fit the call's state (`state` names it): hold of an unanswered call, a second transfer (OpenSIPS 3.4 allows one per call and answers 491 for ever after), ...",
    },
    ErrorDoc { code: CommandErrorCode::Unsupported, when: "a subject that is not a command" },
    ErrorDoc {
        code: CommandErrorCode::Unavailable,
        when: "the engine is overloaded, its log failed, or its disk is under `engine.disk_reserve`: retry",
    },
];

/// A field of a notification's `data`, with what its values are (empty: nothing to add).
pub type Field = (&'static str, &'static str);

/// One row of a notification table: events that share their data.
#[derive(Clone, Copy, Debug)]
pub struct NotificationDoc {
    /// The events (the last part of the subject).
    pub events: &'static [&'static str],
    /// The fields `data` may have; no others are sent.
    pub data: &'static [Field],
    /// When it is sent.
    pub when: &'static str,
}

/// The kinds of call, as `call.list` names them, and the table that documents each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    /// Every kind: the outcome of commands.
    Every,
    /// `dialog`: a proxied call.
    Dialog,
    /// `ua_client` and `ua_server`: UA sessions.
    Ua,
    /// `bridged`: click-to-dial.
    Bridged,
}

impl Table {
    /// Every table, in the doc's order.
    pub const ALL: [Table; 4] = [Table::Every, Table::Dialog, Table::Ua, Table::Bridged];

    /// The table of a call kind (`dialog`, `ua_client`, `ua_server`, `bridged`).
    pub fn of_kind(kind: &str) -> Option<Table> {
        match kind {
            "dialog" => Some(Table::Dialog),
            "ua_client" | "ua_server" => Some(Table::Ua),
            "bridged" => Some(Table::Bridged),
            _ => None,
        }
    }

    /// The name of its generated section in `docs/subjects.md`.
    pub fn section(self) -> &'static str {
        match self {
            Table::Every => "notifications-every",
            Table::Dialog => "notifications-dialog",
            Table::Ua => "notifications-ua",
            Table::Bridged => "notifications-bridged",
        }
    }

    /// Its rows.
    pub fn rows(self) -> &'static [NotificationDoc] {
        match self {
            Table::Every => EVERY,
            Table::Dialog => DIALOG,
            Table::Ua => UA,
            Table::Bridged => BRIDGED,
        }
    }
}

const EVERY: &[NotificationDoc] = &[NotificationDoc {
    events: &["command_succeeded", "command_failed"],
    data: &[
        ("verb", "the command's verb, as on its subject"),
        ("detail", "succeeded: what it gave"),
        ("reason", "failed: why, in words"),
    ],
    when: "the outcome of the command `cmd_id`",
}];

const DIALOG: &[NotificationDoc] = &[
    NotificationDoc {
        events: &["early", "answered", "confirmed"],
        data: &[
            ("old_state", "OpenSIPS's dialog state codes"),
            ("new_state", ""),
            ("source", "`reconcile` when found by a reconciliation instead of an event"),
        ],
        when: "the dialog moved (1xx, 2xx, ACK)",
    },
    NotificationDoc {
        events: &["ended"],
        data: &[(
            "reason",
            "`hung_up`, `not_answered`, `no_answer`, `ended_by_command`, `transferred`, `gone`, `ended_while_engine_away`",
        )],
        when: "the call is over",
    },
    NotificationDoc { events: &["ending"], data: &[], when: "OpenSIPS accepted `dlg_end_dlg`" },
    NotificationDoc {
        events: &["hold_requested", "unhold_requested"],
        data: &[],
        when: "OpenSIPS accepted `call_hold`/`call_unhold`: the re-INVITEs go out",
    },
    NotificationDoc {
        events: &["hold_started", "held", "hold_failed"],
        data: &[("leg", "`caller` or `callee`")],
        when: "per leg, from `E_CALL_HOLD`",
    },
    NotificationDoc { events: &["unhold_started", "resumed", "unhold_failed"], data: &[("leg", "")], when: "per leg" },
    NotificationDoc {
        events: &["transfer_requested"],
        data: &[("kind", "the transfer asked: `{\"blind\": {leg, destination}}` or `{\"attended\": {leg, other, other_leg}}`")],
        when: "OpenSIPS sent the REFER",
    },
    NotificationDoc {
        events: &["transfer_started"],
        data: &[("new_sip_call_id", ""), ("destination", "")],
        when: "the transferee's new call arrived",
    },
    NotificationDoc {
        events: &["transfer_progress"],
        data: &[("status", "e.g. `\"200 OK\"`")],
        when: "a NOTIFY",
    },
    NotificationDoc {
        events: &["transferred"],
        data: &[("new_sip_call_id", ""), ("status", "")],
        when: "the new call was answered",
    },
    NotificationDoc {
        events: &["transfer_failed"],
        data: &[("reason", ""), ("status", "")],
        when: "refused (491), REFER declined or lost (no event within 32 s), target failed",
    },
];

const UA: &[NotificationDoc] = &[
    NotificationDoc {
        events: &["starting"],
        data: &[("to", ""), ("from", ""), ("ruri", "")],
        when: "`ua.start` logged; `ua_session_client_start` goes out",
    },
    NotificationDoc { events: &["calling"], data: &[("key", "")], when: "OpenSIPS started the session: its key" },
    NotificationDoc {
        events: &["early"],
        data: &[("status", ""), ("reason", ""), ("body", "early media SDP"), ("headers", "")],
        when: "a 1xx to our INVITE",
    },
    NotificationDoc {
        events: &["progress"],
        data: &[("method", ""), ("status", ""), ("reason", ""), ("body", "")],
        when: "another provisional answer (to a later request of ours, or a 1xx after the first)",
    },
    NotificationDoc {
        events: &["answered"],
        data: &[
            ("status", ""),
            ("reason", "client only"),
            ("body", "client only"),
            ("headers", "client only"),
            ("ack_due", "client only"),
        ],
        when: "a 2xx to our INVITE (client), or our 2xx was sent (server)",
    },
    NotificationDoc {
        events: &["confirmed"],
        data: &[("body", "")],
        when: "the ACK (server: the caller's; client with `manual_ack`: ours)",
    },
    NotificationDoc {
        events: &["ack"],
        data: &[("body", "")],
        when: "a later ACK from the remote side (of a re-INVITE it answered)",
    },
    NotificationDoc {
        events: &["ack_sent_by_engine"],
        data: &[("after_ms", "")],
        when: "`manual_ack`: the app did not ACK in time, so callbus did (the peer drops an un-ACKed call after 32 s)",
    },
    NotificationDoc {
        events: &["rejected"],
        data: &[
            ("status", ""),
            ("reason", ""),
            ("headers", ""),
            ("cause", "`busy`, `no_answer`, `declined`, `not_found`, `cancelled`, `rejected`"),
        ],
        when: "a final ≥ 300 to our INVITE",
    },
    NotificationDoc {
        events: &["incoming"],
        data: &[
            ("key", ""),
            ("from", ""),
            ("to", ""),
            ("caller", ""),
            ("callee", ""),
            ("body", ""),
            ("content_type", ""),
            ("headers", ""),
        ],
        when: "an INVITE handed to `ua_session_server_init`: answer it with `ua.answer`",
    },
    NotificationDoc {
        events: &["offer_expired"],
        data: &[("after_ms", "")],
        when: "nobody answered the incoming call in time: declined with 480",
    },
    NotificationDoc {
        events: &["request"],
        data: &[("method", ""), ("body", ""), ("headers", ""), ("content_type", "")],
        when: "the remote side's in-dialog request: answer it with `ua.answer` (500 after 25 s otherwise: `request_expired`)",
    },
    NotificationDoc {
        events: &["request_expired"],
        data: &[("method", ""), ("answered", "500")],
        when: "nobody answered the remote side's request in time: callbus answered 500",
    },
    NotificationDoc { events: &["replied"], data: &[("method", ""), ("status", "")], when: "our answer went out" },
    NotificationDoc {
        events: &["update_sent", "update_answered", "update_rejected", "update_timeout"],
        data: &[("method", ""), ("status", ""), ("reason", ""), ("body", ""), ("headers", "")],
        when: "our in-dialog request and its answer",
    },
    NotificationDoc { events: &["ending"], data: &[("by", "")], when: "`ua.terminate` / `call.end` logged" },
    NotificationDoc {
        events: &["ended"],
        data: &[
            ("by", "`local`, `remote`, `engine`, `opensips`"),
            (
                "reason",
                "`hung_up`, `cancelled`, `declined`, `rejected`, `busy`, `no_answer`, `not_answered`, `max_duration`, `gone_while_away`, …",
            ),
            ("status", ""),
        ],
        when: "the session is over",
    },
];

const BRIDGED: &[NotificationDoc] = &[
    NotificationDoc { events: &["dialing"], data: &[("leg", ""), ("uri", "")], when: "a leg is being called" },
    NotificationDoc {
        events: &["calling"],
        data: &[("leg", ""), ("key", "its UA session"), ("caller", ""), ("callee", "")],
        when: "OpenSIPS started a leg's session",
    },
    NotificationDoc {
        events: &["ringing", "transfer_ringing"],
        data: &[("leg", ""), ("key", ""), ("status", ""), ("reason", ""), ("caller", ""), ("callee", "")],
        when: "a leg (the transfer target: `transfer_ringing`) rings",
    },
    NotificationDoc {
        events: &["answered"],
        data: &[("leg", ""), ("key", ""), ("caller", ""), ("callee", "")],
        when: "a leg answered",
    },
    NotificationDoc {
        events: &["connected"],
        data: &[("caller", ""), ("callee", ""), ("caller_key", ""), ("callee_key", "")],
        when: "the two parties talk (`call.start` succeeds)",
    },
    NotificationDoc {
        events: &["failed"],
        data: &[("leg", ""), ("cause", ""), ("status", ""), ("detail", "")],
        when: "a leg could not be reached or kept: the other is ended",
    },
    NotificationDoc {
        events: &["hold_requested", "held"],
        data: &[],
        when: "the hold was asked / both legs are held (`inactive`)",
    },
    NotificationDoc {
        events: &["unhold_requested", "resumed"],
        data: &[],
        when: "the resume was asked / both legs talk again (`sendrecv`)",
    },
    NotificationDoc {
        events: &["leg_held", "leg_resumed"],
        data: &[("leg", ""), ("status", "")],
        when: "one leg answered its hold / resume re-INVITE",
    },
    NotificationDoc {
        events: &["leg_hold_failed", "leg_unhold_failed", "leg_hold_timeout"],
        data: &[("leg", ""), ("status", "not with a timeout")],
        when: "a leg refused or did not answer",
    },
    NotificationDoc { events: &["ending"], data: &[("by", "")], when: "`call.end` logged: both legs are being ended" },
    NotificationDoc {
        events: &["request"],
        data: &[("leg", ""), ("method", ""), ("body", "")],
        when: "a phone sent callbus an in-dialog request (not expected: the phones talk to each other)",
    },
    NotificationDoc {
        events: &["transfer_requested"],
        data: &[("staying", ""), ("replaced", ""), ("destination", "")],
        when: "a blind transfer: the new party is being called",
    },
    NotificationDoc {
        events: &["transfer_answered"],
        data: &[("destination", ""), ("key", "")],
        when: "the new party answered",
    },
    NotificationDoc {
        events: &["transferred"],
        data: &[("destination", ""), ("staying", "")],
        when: "the new party replaced the other leg",
    },
    NotificationDoc {
        events: &["transfer_failed"],
        data: &[("destination", ""), ("cause", ""), ("status", "")],
        when: "the new party could not be reached: the call goes on as it was",
    },
    NotificationDoc {
        events: &["ended"],
        data: &[
            ("by", "`caller`, `callee`, `local`, `engine`, `remote`"),
            ("reason", "`hung_up`, `caller_busy`, `callee_no_answer`, …"),
            ("status", ""),
        ],
        when: "the call is over; every leg was ended",
    },
];

/// Whether a notification of a call of `kind` is what the doc says: its event is listed for
/// the kind (or for every kind), and `data` is an object with no field the row does not list.
pub fn check_notification(kind: &str, event: &str, data: &Value) -> Result<(), String> {
    let table = Table::of_kind(kind).ok_or_else(|| format!("unknown call kind {kind:?}"))?;
    let row = [Table::Every, table]
        .iter()
        .flat_map(|t| t.rows())
        .find(|r| r.events.contains(&event))
        .ok_or_else(|| format!("{kind}: event {event:?} is not in docs/subjects.md's tables"))?;
    let fields = match data {
        Value::Object(m) => m,
        Value::Null => return Ok(()),
        other => return Err(format!("{kind}: {event}'s data is not an object: {other}")),
    };
    let unlisted: Vec<&str> =
        fields.keys().map(String::as_str).filter(|k| !row.data.iter().any(|(name, _)| name == k)).collect();
    match unlisted.is_empty() {
        true => Ok(()),
        false => Err(format!("{kind}: {event} sends data fields the doc does not list: {unlisted:?}")),
    }
}

fn cell(text: &str) -> String {
    text.replace('|', "\\|")
}

/// The command table, as markdown.
pub fn commands_table() -> String {
    let mut out = String::from("| verb | body | does |\n|---|---|---|\n");
    for c in COMMANDS {
        out.push_str(&format!("| `{}` | {} | {} |\n", c.verb.as_str(), cell(c.body), cell(c.does)));
    }
    out
}

/// The error code table, as markdown.
pub fn errors_table() -> String {
    let mut out = String::from("| error code | when |\n|---|---|\n");
    for e in ERRORS {
        out.push_str(&format!("| `{}` | {} |\n", e.code.as_str(), cell(e.when)));
    }
    out
}

/// A notification table, as markdown.
pub fn notifications_table(table: Table) -> String {
    let mut out = String::from("| event | data | when |\n|---|---|---|\n");
    for r in table.rows() {
        let events = r.events.iter().map(|e| format!("`{e}`")).collect::<Vec<_>>().join(" / ");
        let data = r
            .data
            .iter()
            .map(|(name, note)| match note.is_empty() {
                true => format!("`{name}`"),
                false => format!("`{name}` ({note})"),
            })
            .collect::<Vec<_>>()
            .join(", ");
        out.push_str(&format!("| {events} | {} | {} |\n", cell(&data), cell(r.when)));
    }
    out
}

/// Every generated section of `docs/subjects.md`: its name and its text.
pub fn sections() -> Vec<(&'static str, String)> {
    let mut out = vec![("commands", commands_table()), ("errors", errors_table())];
    out.extend(Table::ALL.iter().map(|t| (t.section(), notifications_table(*t))));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_verb_and_error_code_has_one_row() {
        for verb in Verb::ALL {
            assert_eq!(COMMANDS.iter().filter(|c| c.verb == verb).count(), 1, "{verb:?}");
        }
        assert_eq!(COMMANDS.len(), Verb::ALL.len());
        for code in CommandErrorCode::ALL {
            assert_eq!(ERRORS.iter().filter(|e| e.code == code).count(), 1, "{code:?}");
        }
        assert_eq!(ERRORS.len(), CommandErrorCode::ALL.len());
    }

    #[test]
    fn an_event_is_listed_once_per_table() {
        for t in Table::ALL {
            let mut seen = std::collections::HashSet::new();
            for e in t.rows().iter().flat_map(|r| r.events) {
                assert!(seen.insert(e), "{t:?}: {e} twice");
                assert!(!EVERY.iter().any(|r| r.events.contains(e)) || t == Table::Every, "{t:?}: {e} is common");
            }
        }
    }

    #[test]
    fn notifications_are_checked_against_the_rows() {
        assert_eq!(check_notification("dialog", "held", &json!({"leg": "caller"})), Ok(()));
        assert_eq!(check_notification("bridged", "held", &json!({})), Ok(()));
        assert_eq!(check_notification("ua_server", "command_succeeded", &json!({"verb": "ua.answer"})), Ok(()));
        let e = check_notification("bridged", "held", &json!({"leg": "caller"})).expect_err("not listed");
        assert!(e.contains("leg"), "{e}");
        let e = check_notification("dialog", "incoming", &json!({})).expect_err("not a dialog event");
        assert!(e.contains("incoming"), "{e}");
        assert!(check_notification("dialog", "held", &json!("leg")).is_err());
        assert!(check_notification("fax", "held", &json!({})).is_err());
    }
}
