//! Every NATS subject of callbus's public contract (docs/architecture.md), built and parsed in one place.
//!
//! | subject | kind |
//! |---|---|
//! | `opensips.<node>.event.<EVENT>` | raw OpenSIPS event datagrams |
//! | `opensips.<node>.invalid` | datagrams that were not event notifications |
//! | `opensips.<node>.mi.<command>` | MI request/reply through the bridge |
//! | `opensips.<node>.status` | bridge health |
//! | `callbus.cmd.<verb>` | app commands (verbs may contain dots: `call.transfer.blind`) |
//! | `callbus.call.<call_id>.<event>` | per-call notifications |
//!
//! A token (node, event, command, call id, notification event) may not be empty and may not
//! contain `.`, `*`, `>` or whitespace: NATS would read those as separators or wildcards. SIP
//! Call-IDs can contain them, which is why subjects carry callbus's own `call_id`.

use std::fmt;

/// First token of every subject that concerns an OpenSIPS node.
pub const OPENSIPS: &str = "opensips";
/// First token of every subject that concerns callbus's own API.
pub const CALLBUS: &str = "callbus";

/// A subject or token that cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    /// A token is empty.
    #[error("the {what} is empty")]
    EmptyToken {
        /// Which token.
        what: &'static str,
    },
    /// A token contains a character NATS reserves.
    #[error("the {what} {token:?} contains {found:?}, which a NATS subject token cannot hold (no '.', '*', '>' or whitespace)")]
    BadToken {
        /// Which token.
        what: &'static str,
        /// The token.
        token: String,
        /// The offending character.
        found: char,
    },
    /// A subject that is not one of callbus's.
    #[error("{subject:?} is not a callbus subject: {reason}")]
    Unknown {
        /// The subject.
        subject: String,
        /// Why.
        reason: String,
    },
}

/// Checks one subject token.
pub fn validate_token(what: &'static str, token: &str) -> Result<(), SubjectError> {
    if token.is_empty() {
        return Err(SubjectError::EmptyToken { what });
    }
    // Byte by byte first (every token the engine builds is ASCII); by character only when a
    // byte says there may be something to find.
    let suspect = |b: &u8| matches!(b, b'.' | b'*' | b'>') || *b <= b' ' || !b.is_ascii();
    if !token.as_bytes().iter().any(suspect) {
        return Ok(());
    }
    if let Some(found) = token.chars().find(|c| matches!(c, '.' | '*' | '>') || c.is_whitespace()) {
        return Err(SubjectError::BadToken { what, token: token.to_owned(), found });
    }
    Ok(())
}

/// The command verbs served on `callbus.cmd.<verb>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verb {
    /// `call.start`: click-to-dial.
    CallStart,
    /// `call.end`.
    CallEnd,
    /// `call.hold`.
    CallHold,
    /// `call.unhold`.
    CallUnhold,
    /// `call.transfer.blind`.
    CallTransferBlind,
    /// `call.transfer.attended`.
    CallTransferAttended,
    /// `call.get`.
    CallGet,
    /// `call.list`.
    CallList,
    /// `ua.start`.
    UaStart,
    /// `ua.answer`.
    UaAnswer,
    /// `ua.update`.
    UaUpdate,
    /// `ua.terminate`.
    UaTerminate,
}

impl Verb {
    /// Every verb.
    pub const ALL: [Verb; 12] = [
        Verb::CallStart,
        Verb::CallEnd,
        Verb::CallHold,
        Verb::CallUnhold,
        Verb::CallTransferBlind,
        Verb::CallTransferAttended,
        Verb::CallGet,
        Verb::CallList,
        Verb::UaStart,
        Verb::UaAnswer,
        Verb::UaUpdate,
        Verb::UaTerminate,
    ];

    /// The verb as it appears in the subject.
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::CallStart => "call.start",
            Verb::CallEnd => "call.end",
            Verb::CallHold => "call.hold",
            Verb::CallUnhold => "call.unhold",
            Verb::CallTransferBlind => "call.transfer.blind",
            Verb::CallTransferAttended => "call.transfer.attended",
            Verb::CallGet => "call.get",
            Verb::CallList => "call.list",
            Verb::UaStart => "ua.start",
            Verb::UaAnswer => "ua.answer",
            Verb::UaUpdate => "ua.update",
            Verb::UaTerminate => "ua.terminate",
        }
    }

    /// The verb named by `text`, if any.
    pub fn from_name(text: &str) -> Option<Verb> {
        Verb::ALL.into_iter().find(|v| v.as_str() == text)
    }
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A parsed callbus subject.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    /// `opensips.<node>.event.<EVENT>`.
    Event {
        /// The OpenSIPS node.
        node: String,
        /// The event name.
        event: String,
    },
    /// `opensips.<node>.invalid`.
    Invalid {
        /// The OpenSIPS node.
        node: String,
    },
    /// `opensips.<node>.mi.<command>`.
    Mi {
        /// The OpenSIPS node.
        node: String,
        /// The MI command.
        command: String,
    },
    /// `opensips.<node>.status`.
    Status {
        /// The OpenSIPS node.
        node: String,
    },
    /// `callbus.cmd.<verb>`.
    Cmd {
        /// The verb.
        verb: Verb,
    },
    /// `callbus.call.<call_id>.<event>`.
    CallNotification {
        /// callbus's call id.
        call_id: String,
        /// The notification's event.
        event: String,
    },
}

impl Subject {
    /// Checks every token of the subject.
    pub fn validate(&self) -> Result<(), SubjectError> {
        match self {
            Subject::Event { node, event } => {
                validate_token("node", node)?;
                validate_token("event name", event)
            }
            Subject::Invalid { node } | Subject::Status { node } => validate_token("node", node),
            Subject::Mi { node, command } => {
                validate_token("node", node)?;
                validate_token("MI command", command)
            }
            Subject::Cmd { .. } => Ok(()),
            Subject::CallNotification { call_id, event } => {
                validate_token("call id", call_id)?;
                validate_token("notification event", event)
            }
        }
    }

    /// Parses a concrete (wildcard-free) subject.
    pub fn parse(subject: &str) -> Result<Subject, SubjectError> {
        let unknown = |reason: &str| SubjectError::Unknown { subject: subject.to_owned(), reason: reason.to_owned() };
        let tokens: Vec<&str> = subject.split('.').collect();
        let parsed = match tokens.as_slice() {
            [OPENSIPS, node, "event", event] => Subject::Event { node: (*node).into(), event: (*event).into() },
            [OPENSIPS, node, "invalid"] => Subject::Invalid { node: (*node).into() },
            [OPENSIPS, node, "mi", command] => Subject::Mi { node: (*node).into(), command: (*command).into() },
            [OPENSIPS, node, "status"] => Subject::Status { node: (*node).into() },
            [CALLBUS, "cmd", rest @ ..] if !rest.is_empty() => {
                let verb = Verb::from_name(&rest.join(".")).ok_or_else(|| unknown("no such command verb"))?;
                Subject::Cmd { verb }
            }
            [CALLBUS, "call", call_id, event] => {
                Subject::CallNotification { call_id: (*call_id).into(), event: (*event).into() }
            }
            [OPENSIPS, ..] => return Err(unknown("expected opensips.<node>.event|invalid|mi|status...")),
            [CALLBUS, ..] => return Err(unknown("expected callbus.cmd.<verb> or callbus.call.<call_id>.<event>")),
            _ => return Err(unknown("it starts with neither \"opensips\" nor \"callbus\"")),
        };
        parsed.validate()?;
        Ok(parsed)
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Event { node, event } => write!(f, "{OPENSIPS}.{node}.event.{event}"),
            Subject::Invalid { node } => write!(f, "{OPENSIPS}.{node}.invalid"),
            Subject::Mi { node, command } => write!(f, "{OPENSIPS}.{node}.mi.{command}"),
            Subject::Status { node } => write!(f, "{OPENSIPS}.{node}.status"),
            Subject::Cmd { verb } => write!(f, "{CALLBUS}.cmd.{verb}"),
            Subject::CallNotification { call_id, event } => {
                write!(f, "{CALLBUS}.call.{call_id}.{event}")
            }
        }
    }
}

/// The node of an OpenSIPS event's subject (`opensips.<node>.event.<event>`), borrowed from
/// it; None for any other subject. What [`Subject::parse`] gives as `Subject::Event`, without
/// allocating (the engine reads one per event).
pub fn event_node(subject: &str) -> Option<&str> {
    let mut tokens = subject.split('.');
    let (Some(OPENSIPS), Some(node), Some("event"), Some(event), None) =
        (tokens.next(), tokens.next(), tokens.next(), tokens.next(), tokens.next())
    else {
        return None;
    };
    (validate_token("node", node).is_ok() && validate_token("event name", event).is_ok()).then_some(node)
}

/// `opensips.<node>.event.<event>`.
pub fn event(node: &str, event: &str) -> Result<String, SubjectError> {
    build(Subject::Event { node: node.into(), event: event.into() })
}

/// `opensips.<node>.invalid`.
pub fn invalid(node: &str) -> Result<String, SubjectError> {
    build(Subject::Invalid { node: node.into() })
}

/// `opensips.<node>.mi.<command>`.
pub fn mi(node: &str, command: &str) -> Result<String, SubjectError> {
    build(Subject::Mi { node: node.into(), command: command.into() })
}

/// `opensips.<node>.status`.
pub fn status(node: &str) -> Result<String, SubjectError> {
    build(Subject::Status { node: node.into() })
}

/// `callbus.cmd.<verb>`.
pub fn cmd(verb: Verb) -> String {
    Subject::Cmd { verb }.to_string()
}

/// `callbus.call.<call_id>.<event>`.
pub fn call_notification(call_id: &str, event: &str) -> Result<String, SubjectError> {
    // One per notification: built straight, as `Subject::CallNotification` prints it.
    validate_token("call id", call_id)?;
    validate_token("notification event", event)?;
    let mut subject = String::with_capacity(CALLBUS.len() + 7 + call_id.len() + event.len());
    for part in [CALLBUS, ".call.", call_id, ".", event] {
        subject.push_str(part);
    }
    Ok(subject)
}

/// `opensips.<node>.event.>`: every event of one node.
pub fn all_events(node: &str) -> Result<String, SubjectError> {
    validate_token("node", node)?;
    Ok(format!("{OPENSIPS}.{node}.event.>"))
}

/// `opensips.<node>.mi.*`: every MI command of one node (what a bridge serves).
pub fn all_mi(node: &str) -> Result<String, SubjectError> {
    validate_token("node", node)?;
    Ok(format!("{OPENSIPS}.{node}.mi.*"))
}

/// `opensips.*.event.>`: every event of every node.
pub const ALL_NODES_EVENTS: &str = "opensips.*.event.>";

/// `opensips.*.status`: every node's bridge status.
pub const ALL_NODES_STATUS: &str = "opensips.*.status";

/// `callbus.call.<call_id>.>`: every notification of one call.
pub fn all_call_notifications(call_id: &str) -> Result<String, SubjectError> {
    validate_token("call id", call_id)?;
    Ok(format!("{CALLBUS}.call.{call_id}.>"))
}

/// `callbus.cmd.`: what every command subject starts with (the verb follows).
pub const CMD_PREFIX: &str = "callbus.cmd.";

/// `callbus.cmd.>`: every command (what the engines subscribe to).
pub const ALL_COMMANDS: &str = "callbus.cmd.>";

/// The queue group the engines share for commands: each command is taken by one of them.
pub const ENGINE_QUEUE: &str = "callbus-engine";

/// `callbus.cmd.<verb>` for a verb given by its name (as the Call API door and the CLI take
/// it); None when it is not a verb.
pub fn cmd_named(verb: &str) -> Option<String> {
    Verb::from_name(verb).map(cmd)
}

/// `callbus.call.>`: every notification of every call.
pub const ALL_CALL_NOTIFICATIONS: &str = "callbus.call.>";

/// `callbus.input.>`: every node's input batches (cluster mode, `callbus_schemas::input`).
pub const ALL_INPUTS: &str = "callbus.input.>";

/// `callbus.input.`: what every input subject starts with (the node follows).
pub const INPUT_PREFIX: &str = "callbus.input.";

/// `callbus.log.<partition>`: a cluster partition's replicated log.
pub fn partition_log(partition: u16) -> String {
    format!("{CALLBUS}.log.{partition}")
}

/// `callbus.log.>`: every partition's log (the subjects of the log stream).
pub const ALL_PARTITION_LOGS: &str = "callbus.log.>";

/// `callbus.part.<partition>.cmd.`: where a cluster worker forwards a command to the owner of
/// its call's partition (the verb follows).
pub fn partition_cmd_prefix(partition: u16) -> String {
    format!("{CALLBUS}.part.{partition}.cmd.")
}

fn build(subject: Subject) -> Result<String, SubjectError> {
    subject.validate()?;
    Ok(subject.to_string())
}
