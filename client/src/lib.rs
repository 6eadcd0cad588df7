//! A client of callbus over NATS: send a command (with a `cmd_id`), get the engine's answer,
//! follow a call's notifications, and wait for the command's outcome. The CLI, `callbus demo`,
//! the Call API door and the tests use it, so the one easy mistake — subscribing to the
//! notifications after the command, and missing the first ones — cannot be made:
//! [`Client::track`] subscribes before it sends.
//!
//! ```no_run
//! # async fn example() -> Result<(), callbus_client::ClientError> {
//! let nats = async_nats::connect("nats://127.0.0.1:4222").await.expect("NATS");
//! let client = callbus_client::Client::new(nats);
//! let body = serde_json::json!({"caller": "sip:alice@example.com", "callee": "sip:bob@example.com"});
//! let mut call = client.track("call.start", body).await?;
//! let outcome = call.notes.outcome(&call.cmd_id, std::time::Duration::from_secs(60), |note| {
//!     println!("{} {}", note.event, note.data);
//! }).await?;
//! # Ok(()) }
//! ```

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use callbus_schemas::command::{CallNotification, CommandError, CommandReply};
use callbus_schemas::subjects;
use futures::StreamExt;
use serde_json::Value;

/// What went wrong, in words that say what to check.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No engine answered in time.
    #[error("no answer on {subject} within {within:?}: is an engine running (callbus up / callbus engine)?")]
    NoAnswer {
        /// The command's subject.
        subject: String,
        /// How long the client waited.
        within: Duration,
    },
    /// NATS did not take the request or the subscription.
    #[error("{what} failed: {reason}")]
    Nats {
        /// What was tried.
        what: String,
        /// NATS's error.
        reason: String,
    },
    /// The answer is not a command reply.
    #[error("unexpected answer on {subject}: {reason}")]
    BadReply {
        /// The command's subject.
        subject: String,
        /// Why it could not be read.
        reason: String,
    },
    /// The engine refused the command: nothing changed.
    #[error("{verb} refused ({}): {}", error.code, error.message)]
    Refused {
        /// The verb.
        verb: String,
        /// The engine's error.
        error: CommandError,
    },
    /// The command's outcome did not come in time.
    #[error("no outcome of {cmd_id} within {within:?} (see `callbus events --call {call_id}`)")]
    NoOutcome {
        /// The command.
        cmd_id: String,
        /// Its call.
        call_id: String,
        /// How long the client waited.
        within: Duration,
    },
    /// The call id cannot be used in a subject.
    #[error("cannot follow call {call_id:?}: {reason}")]
    BadCall {
        /// The call id given.
        call_id: String,
        /// Why.
        reason: String,
    },
}

/// The engine's answer to a command it took.
#[derive(Clone, Debug, PartialEq)]
pub enum Answer {
    /// Accepted and logged; its outcome is notified.
    Accepted {
        /// The call.
        call_id: String,
        /// The command's id.
        cmd_id: String,
    },
    /// A query's result.
    Data {
        /// The command's id.
        cmd_id: String,
        /// The result.
        result: Value,
    },
}

/// How a command ended, as notified.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// `command_succeeded`: its `detail`.
    Succeeded(Value),
    /// `command_failed`: its `reason`.
    Failed(String),
}

/// A command sent with its call's notifications followed from before it went.
#[derive(Debug)]
pub struct Tracked {
    /// The call.
    pub call_id: String,
    /// The command's id.
    pub cmd_id: String,
    /// The call's notifications.
    pub notes: Notes,
}

/// A stream of call notifications, of one call or of all.
#[derive(Debug)]
pub struct Notes {
    sub: async_nats::Subscriber,
    call_id: Option<String>,
}

impl Notes {
    /// Keeps only the notifications of `call_id` from now on.
    pub fn only(mut self, call_id: &str) -> Notes {
        self.call_id = Some(call_id.to_owned());
        self
    }

    /// The next notification (of the followed call, when one is); None when the stream ended.
    /// Messages that are not notifications are skipped.
    pub async fn next(&mut self) -> Option<CallNotification> {
        while let Some(msg) = self.sub.next().await {
            let Ok(note) = serde_json::from_slice::<CallNotification>(&msg.payload) else { continue };
            if self.call_id.as_ref().is_none_or(|id| *id == note.call_id) {
                return Some(note);
            }
        }
        None
    }

    /// Reads notifications until the outcome of `cmd_id` (each one seen is given to `each`,
    /// the outcome too), for at most `within`.
    pub async fn outcome(
        &mut self,
        cmd_id: &str,
        within: Duration,
        mut each: impl FnMut(&CallNotification),
    ) -> Result<Outcome, ClientError> {
        let call_id = self.call_id.clone().unwrap_or_default();
        let waited = tokio::time::timeout(within, async {
            while let Some(note) = self.next().await {
                each(&note);
                if note.cmd_id.as_deref() != Some(cmd_id) {
                    continue;
                }
                match note.event.as_str() {
                    "command_succeeded" => return Some(Outcome::Succeeded(note.data["detail"].clone())),
                    "command_failed" => {
                        let reason = note.data["reason"].as_str().unwrap_or("failed").to_owned();
                        return Some(Outcome::Failed(reason));
                    }
                    _ => {}
                }
            }
            None
        })
        .await;
        match waited {
            Ok(Some(outcome)) => Ok(outcome),
            _ => Err(ClientError::NoOutcome { cmd_id: cmd_id.to_owned(), call_id, within }),
        }
    }
}

/// A callbus client on a NATS connection.
#[derive(Clone, Debug)]
pub struct Client {
    nats: async_nats::Client,
    timeout: Duration,
    prefix: &'static str,
}

impl Client {
    /// A client that waits 10 s for the engine's answers.
    pub fn new(nats: async_nats::Client) -> Client {
        Client { nats, timeout: Duration::from_secs(10), prefix: "cli" }
    }

    /// The same client, waiting `timeout` for answers.
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    /// The same client, making `cmd_id`s that start with `prefix` (`cli`, `callapi`, ...).
    pub fn with_cmd_prefix(mut self, prefix: &'static str) -> Client {
        self.prefix = prefix;
        self
    }

    /// The NATS connection.
    pub fn nats(&self) -> &async_nats::Client {
        &self.nats
    }

    /// A new `cmd_id`, unique in this process: the prefix, the clock and a counter.
    pub fn new_cmd_id(&self) -> String {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("{}-{nanos:x}-{n:x}", self.prefix)
    }

    /// Sends `body` as command `verb` and returns the engine's reply as it is: accepted, data
    /// or refused.
    pub async fn request(&self, verb: &str, body: &Value) -> Result<CommandReply, ClientError> {
        let subject = format!("{}{verb}", subjects::CMD_PREFIX);
        let ask = self.nats.request(subject.clone(), Bytes::from(body.to_string()));
        let reply = tokio::time::timeout(self.timeout, ask)
            .await
            .map_err(|_| ClientError::NoAnswer { subject: subject.clone(), within: self.timeout })?
            .map_err(|e| match e.kind() {
                async_nats::RequestErrorKind::TimedOut | async_nats::RequestErrorKind::NoResponders => {
                    ClientError::NoAnswer { subject: subject.clone(), within: self.timeout }
                }
                _ => ClientError::Nats { what: format!("the request on {subject}"), reason: e.to_string() },
            })?;
        serde_json::from_slice(&reply.payload).map_err(|e| ClientError::BadReply { subject, reason: e.to_string() })
    }

    /// Sends a command (a `cmd_id` is added when `body` has none); a refusal is an error.
    pub async fn send(&self, verb: &str, mut body: Value) -> Result<Answer, ClientError> {
        self.ensure_cmd_id(&mut body);
        match self.request(verb, &body).await? {
            CommandReply::Accepted { call_id, cmd_id, .. } => Ok(Answer::Accepted { call_id, cmd_id }),
            CommandReply::Data { cmd_id, result } => Ok(Answer::Data { cmd_id, result }),
            CommandReply::Refused { error, .. } => Err(ClientError::Refused { verb: verb.to_owned(), error }),
        }
    }

    /// Every call's notifications, subscribed when this returns.
    pub async fn follow_all(&self) -> Result<Notes, ClientError> {
        let sub = self.nats.subscribe(subjects::ALL_CALL_NOTIFICATIONS).await.map_err(|e| ClientError::Nats {
            what: format!("subscribing to {}", subjects::ALL_CALL_NOTIFICATIONS),
            reason: e.to_string(),
        })?;
        Ok(Notes { sub, call_id: None })
    }

    /// One call's notifications, subscribed when this returns (NATS orders a connection's
    /// subscriptions and publishes, so a command sent after this has its notifications seen).
    pub async fn follow(&self, call_id: &str) -> Result<Notes, ClientError> {
        let subject = subjects::all_call_notifications(call_id)
            .map_err(|e| ClientError::BadCall { call_id: call_id.to_owned(), reason: e.to_string() })?;
        let sub = self
            .nats
            .subscribe(subject.clone())
            .await
            .map_err(|e| ClientError::Nats { what: format!("subscribing to {subject}"), reason: e.to_string() })?;
        Ok(Notes { sub, call_id: Some(call_id.to_owned()) })
    }

    /// Sends a command that names or makes a call, with every notification followed from
    /// before it went, and returns the call, the `cmd_id` and the call's notifications (the
    /// first ones included). A refusal is an error; a query's data is [`ClientError::BadReply`].
    pub async fn track(&self, verb: &str, mut body: Value) -> Result<Tracked, ClientError> {
        self.ensure_cmd_id(&mut body);
        let notes = self.follow_all().await?;
        match self.send(verb, body).await? {
            Answer::Accepted { call_id, cmd_id } => Ok(Tracked { notes: notes.only(&call_id), call_id, cmd_id }),
            Answer::Data { .. } => Err(ClientError::BadReply {
                subject: format!("{}{verb}", subjects::CMD_PREFIX),
                reason: "a query's data, not an accepted command".into(),
            }),
        }
    }

    fn ensure_cmd_id(&self, body: &mut Value) {
        if let Value::Object(map) = body {
            if !map.contains_key("cmd_id") {
                map.insert("cmd_id".into(), Value::String(self.new_cmd_id()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_say_what_to_check() {
        let e = ClientError::NoAnswer { subject: "callbus.cmd.call.list".into(), within: Duration::from_secs(2) };
        assert!(e.to_string().contains("is an engine running"), "{e}");
        let error = CommandError::new(callbus_schemas::command::CommandErrorCode::UnknownCall, "no live call");
        let e = ClientError::Refused { verb: "call.hold".into(), error };
        assert_eq!(e.to_string(), "call.hold refused (unknown_call): no live call");
    }
}
