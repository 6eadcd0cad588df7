//! The owner's inputs from NATS: OpenSIPS events, which the owner reads from their
//! subscription itself, and commands, forwarded to the owner's queue (bounded: a full queue
//! refuses commands as "overloaded").

use std::sync::Arc;
use std::time::Instant;

use async_nats::HeaderName;
use bytes::Bytes;
use callbus_schemas::bus::HEADER_SEQ;
use callbus_schemas::command::{CommandError, CommandErrorCode, CommandReply};
use callbus_schemas::subjects::{self, Verb};
use futures::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Work;

/// Counts a command answered (refused when `refused` has its code) in the `callbus` service's
/// stats (`nats micro stats callbus`).
pub(crate) fn record_service(
    service: Option<&callbus_service::Service>,
    verb: Verb,
    received: Instant,
    refused: Option<CommandErrorCode>,
) {
    if let Some(service) = service {
        service.record(verb.as_str(), received.elapsed(), refused.map(|code| (service_code(code), code.as_str())));
    }
}

/// The HTTP-like code the micro protocol reports a refusal with.
fn service_code(code: CommandErrorCode) -> u16 {
    match code {
        CommandErrorCode::BadRequest
        | CommandErrorCode::MissingField
        | CommandErrorCode::WrongType
        | CommandErrorCode::BadValue => 400,
        CommandErrorCode::UnknownCall => 404,
        CommandErrorCode::WrongState => 409,
        CommandErrorCode::Unsupported => 501,
        CommandErrorCode::Unavailable => 503,
    }
}

/// The bridge's sequence header, named once (a name given as text is copied per look-up).
const SEQ_HEADER: HeaderName = HeaderName::from_static(HEADER_SEQ);

/// OpenSIPS events from NATS, read by the owner itself (a task between the subscription and
/// the owner cost a task switch and a queue per event): every node's but `local`'s, the node
/// whose bridge hands its datagrams over in this process. Events the owner has not taken yet
/// wait in the subscription (async-nats holds 64 Ki messages per subscription; beyond that
/// the server counts the engine a slow consumer and drops them, as with any subscriber).
pub(crate) struct EventFeed {
    sub: async_nats::Subscriber,
    local: Option<String>,
    /// The node of the last event, shared with the next of the same node.
    last_node: Option<Arc<str>>,
}

impl EventFeed {
    /// The feed of `sub` (subscribed to every node's events), without `local`'s.
    pub(crate) fn new(sub: async_nats::Subscriber, local: Option<String>) -> EventFeed {
        EventFeed { sub, local, last_node: None }
    }

    /// An event message as work; None for a subject that is not another node's event.
    fn work(&mut self, msg: async_nats::Message) -> Option<Work> {
        let node = subjects::event_node(msg.subject.as_str())?;
        if self.local.as_deref() == Some(node) {
            return None;
        }
        let node = match &self.last_node {
            Some(last) if **last == *node => Arc::clone(last),
            _ => Arc::clone(self.last_node.insert(Arc::from(node))),
        };
        let bridge_seq = msg.headers.as_ref().and_then(|h| h.get(SEQ_HEADER)).and_then(|v| v.as_str().parse().ok());
        Some(Work::Event { node, bridge_seq, payload: msg.payload, stream_seq: None })
    }

    /// The next event; None when the subscription ended (the connection closed).
    pub(crate) async fn next(&mut self) -> Option<Work> {
        loop {
            let msg = self.sub.next().await?;
            if let Some(work) = self.work(msg) {
                return Some(work);
            }
        }
    }

    /// An event already waiting, if any (outside the task's cooperative budget: a batch takes
    /// up to [`super::MAX_BATCH`] at once).
    pub(crate) fn try_next(&mut self) -> Option<Work> {
        loop {
            let msg = tokio::task::unconstrained(self.sub.next()).now_or_never().flatten()?;
            if let Some(work) = self.work(msg) {
                return Some(work);
            }
        }
    }

    /// Forwards the feed's events to the owner's queue until cancelled: for an engine with a
    /// bridge in its process, whose node's events come twice (handed over, and on NATS for
    /// the apps), so that the copies are dropped off the owner's task.
    pub(crate) async fn forward(mut self, tx: mpsc::Sender<Work>, cancel: CancellationToken) {
        loop {
            let work = tokio::select! {
                w = self.next() => w,
                _ = cancel.cancelled() => break,
            };
            let Some(work) = work else { break };
            if tx.send(work).await.is_err() {
                break;
            }
        }
        let _ = self.sub.unsubscribe().await;
    }
}

/// The next event of `feed`; None when there is no feed or its subscription ended.
pub(crate) async fn next_event(feed: &mut Option<EventFeed>) -> Option<Work> {
    feed.as_mut()?.next().await
}

/// Forwards commands from NATS to the owner; refuses them when it is overloaded.
pub(crate) async fn forward_commands(
    sub: async_nats::Subscriber,
    tx: mpsc::Sender<Work>,
    client: async_nats::Client,
    cancel: CancellationToken,
    service: Option<callbus_service::Service>,
) {
    forward_commands_from(sub, subjects::CMD_PREFIX.into(), tx, client, cancel, service).await
}

/// Forwards commands whose subjects are `prefix` + verb to the owner; refuses them when it is
/// overloaded.
pub(crate) async fn forward_commands_from(
    mut sub: async_nats::Subscriber,
    prefix: String,
    tx: mpsc::Sender<Work>,
    client: async_nats::Client,
    cancel: CancellationToken,
    service: Option<callbus_service::Service>,
) {
    loop {
        let msg = tokio::select! {
            m = sub.next() => m,
            _ = cancel.cancelled() => break,
        };
        let Some(msg) = msg else { break };
        let verb = match msg.subject.as_str().strip_prefix(prefix.as_str()).and_then(Verb::from_name) {
            Some(verb) => verb,
            None => {
                if let Some(reply) = msg.reply {
                    let error = CommandError::new(
                        CommandErrorCode::Unsupported,
                        format!("{} is not a command subject", msg.subject),
                    );
                    let _ = client
                        .publish(reply, Bytes::from(CommandReply::Refused { cmd_id: None, error }.to_bytes()))
                        .await;
                }
                continue;
            }
        };
        let reply = msg.reply.clone();
        let received = Instant::now();
        if let Err(mpsc::error::TrySendError::Full(_)) =
            tx.try_send(Work::Command { verb, payload: msg.payload, reply, received })
        {
            record_service(service.as_ref(), verb, received, Some(CommandErrorCode::Unavailable));
            if let Some(reply) = msg.reply {
                let error = CommandError::new(CommandErrorCode::Unavailable, "the engine is overloaded: retry later");
                let _ =
                    client.publish(reply, Bytes::from(CommandReply::Refused { cmd_id: None, error }.to_bytes())).await;
            }
        }
    }
    let _ = sub.unsubscribe().await;
}
