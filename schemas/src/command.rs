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
    },
    /// `call.list`: live calls.
    List {
        /// Only calls in this state.
        state: Option<String>,
        /// Only calls on this OpenSIPS node.
        node: Option<String>,
    },
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
            Verb::CallEnd => Command::End { target: target(&body, "call_id", "sip_call_id")? },
            Verb::CallHold => Command::Hold { target: target(&body, "call_id", "sip_call_id")? },
            Verb::CallUnhold => Command::Unhold { target: target(&body, "call_id", "sip_call_id")? },
            Verb::CallTransferBlind => {
                let destination = require_str(&body, "destination")?;
                if !destination.starts_with("sip:") && !destination.starts_with("sips:") {
                    return Err(CommandError::field(
                        CommandErrorCode::BadValue,
                        "destination",
                        format!("\"destination\" must be a bare SIP URI (sip:user@host), not {destination:?}"),
                    ));
                }
                Command::TransferBlind {
                    target: target(&body, "call_id", "sip_call_id")?,
                    leg: leg(&body, "leg")?,
                    destination,
                }
            }
            Verb::CallTransferAttended => Command::TransferAttended {
                target: target(&body, "call_id", "sip_call_id")?,
                leg: leg(&body, "leg")?,
                transfer_target: target(&body, "transfer_call_id", "transfer_sip_call_id")?,
                transfer_leg: leg(&body, "transfer_leg")?,
            },
            Verb::CallGet => Command::Get { target: target(&body, "call_id", "sip_call_id")? },
            Verb::CallList => Command::List { state: get_str(&body, "state")?, node: get_str(&body, "node")? },
            other => {
                return Err(CommandError::new(
                    CommandErrorCode::Unsupported,
                    format!("{other} is not served by this engine version yet"),
                ))
            }
        };
        Ok(CommandRequest { cmd_id, command })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(verb: Verb, body: &str) -> CommandError {
        CommandRequest::parse(verb, body.as_bytes()).expect_err(body)
    }

    #[test]
    fn valid_commands_parse() {
        let r = CommandRequest::parse(Verb::CallHold, br#"{"call_id":"c1","cmd_id":"x"}"#).expect("valid");
        assert_eq!(
            r,
            CommandRequest {
                cmd_id: Some("x".into()),
                command: Command::Hold { target: CallTarget::CallId("c1".into()) }
            }
        );
        let r = CommandRequest::parse(
            Verb::CallTransferBlind,
            br#"{"sip_call_id":"1@h","leg":"callee","destination":"sip:a@b"}"#,
        )
        .expect("valid");
        assert!(matches!(r.command, Command::TransferBlind { leg: LegName::Callee, .. }));
        assert!(CommandRequest::parse(Verb::CallList, b"{}").is_ok());
    }

    #[test]
    fn errors_name_the_field_and_the_problem() {
        let e = err(Verb::CallHold, "{}");
        assert_eq!((e.code, e.field.as_deref()), (CommandErrorCode::MissingField, Some("call_id")));
        let e = err(Verb::CallHold, r#"{"call_id":7}"#);
        assert_eq!(e.code, CommandErrorCode::WrongType);
        assert!(e.message.contains("a number"));
        let e = err(Verb::CallHold, r#"{"call_id":"a","sip_call_id":"b"}"#);
        assert_eq!(e.code, CommandErrorCode::BadValue);
        let e = err(Verb::CallTransferBlind, r#"{"call_id":"a","leg":"both","destination":"sip:x@y"}"#);
        assert_eq!((e.code, e.field.as_deref()), (CommandErrorCode::BadValue, Some("leg")));
        let e = err(Verb::CallTransferBlind, r#"{"call_id":"a","leg":"callee","destination":"<sip:x@y>"}"#);
        assert_eq!(e.field.as_deref(), Some("destination"));
        let e = err(Verb::CallTransferAttended, r#"{"call_id":"a","leg":"caller","transfer_leg":"callee"}"#);
        assert_eq!(e.field.as_deref(), Some("transfer_call_id"));
        assert_eq!(err(Verb::CallEnd, "[1]").code, CommandErrorCode::BadRequest);
        assert_eq!(err(Verb::CallEnd, "{").code, CommandErrorCode::BadRequest);
        assert_eq!(err(Verb::CallEnd, "\u{0}").code, CommandErrorCode::BadRequest);
        assert_eq!(err(Verb::CallEnd, r#"{"call_id":""}"#).code, CommandErrorCode::BadValue);
        assert_eq!(err(Verb::CallEnd, r#"{"call_id":"a","cmd_id":{}}"#).field.as_deref(), Some("cmd_id"));
        assert_eq!(err(Verb::UaStart, "{}").code, CommandErrorCode::Unsupported);
        let big = format!(r#"{{"call_id":"{}"}}"#, "x".repeat(MAX_COMMAND_BYTES));
        assert_eq!(err(Verb::CallEnd, &big).code, CommandErrorCode::BadRequest);
    }
}
