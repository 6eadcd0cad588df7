//! The single engine's supervision: when its log fails, commands are refused and other inputs
//! kept while the log is reopened every second; once it can be written again the core is
//! rebuilt from it and the owner goes on with what was kept.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::Subject;
use bytes::Bytes;
use callbus_schemas::command::{CommandError, CommandErrorCode, CommandReply, CommandRequest};
use callbus_schemas::subjects::Verb;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{next_event, record_service, recover, Owner, Stopped, Work};
use crate::log::disk::DiskGuard;
use crate::log::{EventLog, LogError, SledLog};
use crate::store::SledStore;
use crate::EngineConfig;

/// Most inputs kept while the log cannot be written (events, MI replies).
const KEPT_WHILE_DOWN: usize = 200_000;

/// The answer to a command while the log cannot be written.
pub(super) fn log_down_refusal(error: &LogError) -> CommandError {
    CommandError::new(CommandErrorCode::Unavailable, format!("the engine cannot write its log ({error}): retry later"))
}

/// Refuses a command with `refusal` (and counts it in the service's stats).
pub(super) async fn refuse(
    client: &async_nats::Client,
    service: Option<&callbus_service::Service>,
    refusal: &CommandError,
    verb: Verb,
    payload: &[u8],
    reply: Option<Subject>,
    received: Instant,
) {
    record_service(service, verb, received, Some(refusal.code));
    if let Some(reply) = reply {
        let cmd_id = CommandRequest::cmd_id_of(payload);
        let body = CommandReply::Refused { cmd_id, error: refusal.clone() }.to_bytes();
        let _ = client.publish(reply, Bytes::from(body)).await;
    }
}

/// Runs the owner; when the log fails, refuses commands, keeps the other inputs, reopens the
/// log every second, and once it can be written again rebuilds the calls from it and goes on.
pub(crate) async fn supervise(
    mut owner: Owner<SledStore>,
    mut rx: mpsc::Receiver<Work>,
    cancel: CancellationToken,
    config: EngineConfig,
    client: async_nats::Client,
) {
    let service = owner.service.clone();
    loop {
        let Some(Stopped { error, mut pending, rx: back, mut events }) = owner.run(rx, cancel.clone()).await else {
            return;
        };
        rx = back;
        let down = metrics::gauge!("callbus_engine_log_down");
        down.set(1.0);
        tracing::error!(
            %error,
            data_dir = %config.data_dir.display(),
            "the event log cannot be written: commands are refused until it can (free space or fix the disk); OpenSIPS events are kept meanwhile"
        );
        let refusal = log_down_refusal(&error);
        let disk = DiskGuard::new(&config.data_dir, config.disk_reserve);
        let mut retry = tokio::time::interval(Duration::from_secs(1));
        let reopened = loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                w = rx.recv() => match w {
                    None => return,
                    Some(Work::Command { verb, reply, payload, received }) => {
                        refuse(&client, service.as_ref(), &refusal, verb, &payload, reply, received).await;
                    }
                    Some(other) if pending.len() < KEPT_WHILE_DOWN => pending.push(other),
                    Some(_) => metrics::counter!("callbus_engine_inputs_dropped_total").increment(1),
                },
                // Events are kept up to the same bound; past it they wait in NATS.
                w = next_event(&mut events), if events.is_some() && pending.len() < KEPT_WHILE_DOWN => match w {
                    Some(w) => pending.push(w),
                    None => events = None,
                },
                _ = retry.tick() => {
                    // Not reopened (which writes) before the disk has room again.
                    if disk.resume().is_err() {
                        continue;
                    }
                    match SledLog::open_with(&config.data_dir, config.cache_bytes, config.sync_data) {
                        Ok(log) => {
                            // Writable again? A real write and flush says so.
                            let probe = log.stage_timeouts(&config.timeouts);
                            if probe.is_ok() && log.commit().await.is_ok() {
                                break log;
                            }
                        }
                        Err(e) => tracing::debug!(error = %e, "the event log does not open yet"),
                    }
                }
            }
        };
        let store = SledStore::new(Arc::new(reopened), config.commit_faults.clone());
        let core = match recover(&config, &store) {
            Ok((core, restored)) => {
                tracing::info!(
                    live = restored.live,
                    kept = pending.len(),
                    "the event log works again: calls rebuilt from it; going on"
                );
                core
            }
            Err(e) => {
                tracing::error!(error = %e, "the event log reopened but cannot be read: the engine stops");
                return;
            }
        };
        down.set(0.0);
        let mut next = Owner::new(config.clone(), core, store, client.clone(), false);
        next.disk = Some(disk);
        next.service = service.clone();
        next.pending = pending.into();
        next.events = events;
        owner = next;
    }
}
