//! The owner's inputs from NATS: OpenSIPS events and commands, each forwarded to the owner's
//! queue (bounded: a full queue refuses commands as "overloaded", and events wait in NATS).

use std::time::Instant;

use bytes::Bytes;
use callbus_schemas::bus::HEADER_SEQ;
use callbus_schemas::command::{CommandError, CommandErrorCode, CommandReply};
use callbus_schemas::subjects::{self, Subject as BusSubject, Verb};
use futures::StreamExt;
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

/// Forwards OpenSIPS events from NATS to the owner, except those of `local`, the node whose
/// bridge hands its datagrams over in this process.
pub(crate) async fn forward_events(
    mut sub: async_nats::Subscriber,
    local: Option<String>,
    tx: mpsc::Sender<Work>,
    cancel: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            m = sub.next() => m,
            _ = cancel.cancelled() => break,
        };
        let Some(msg) = msg else { break };
        let node = match BusSubject::parse(msg.subject.as_str()) {
            Ok(BusSubject::Event { node, .. }) if local.as_deref() != Some(node.as_str()) => node,
            _ => continue,
        };
        let bridge_seq = msg.headers.as_ref().and_then(|h| h.get(HEADER_SEQ)).and_then(|v| v.as_str().parse().ok());
        if tx.send(Work::Event { node, bridge_seq, payload: msg.payload, stream_seq: None }).await.is_err() {
            break;
        }
    }
    let _ = sub.unsubscribe().await;
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
