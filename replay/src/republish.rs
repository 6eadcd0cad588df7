//! `replay republish`: the recorded OpenSIPS events, published again under a prefix with their
//! original spacing (divided by the speed), so a consumer under test sees the same traffic.

use std::time::Duration;

use bytes::Bytes;
use callbus_engine::machines::Input;

use crate::{LogReader, ReplayError};

/// How fast to republish.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Speed {
    /// The original spacing divided by this factor.
    Times(f64),
    /// As fast as possible.
    Max,
}

/// Publishes every recorded event (of one call, if given) on
/// `<prefix>.opensips.<node>.event.<EVENT>`; returns how many.
pub async fn republish(
    reader: &LogReader,
    client: &async_nats::Client,
    prefix: &str,
    speed: Speed,
    call: Option<&str>,
) -> Result<u64, ReplayError> {
    let call_id = call.map(|c| reader.find_call(c)).transpose()?;
    let mut previous_ms: Option<u64> = None;
    let mut published = 0u64;
    for record in reader.records(1, u64::MAX) {
        let Ok(record) = record else { continue };
        if call_id.as_ref().is_some_and(|c| *c != record.call_id) {
            continue;
        }
        let Input::Event { node, datagram, .. } = &record.input else { continue };
        let Ok(name) = callbus_schemas::event::event_name(datagram.as_bytes()) else { continue };
        if let (Speed::Times(factor), Some(prev)) = (speed, previous_ms) {
            let gap = record.time_ms.saturating_sub(prev) as f64 / factor.max(1e-6);
            if gap >= 1.0 {
                tokio::time::sleep(Duration::from_micros((gap * 1000.0) as u64)).await;
            }
        }
        previous_ms = Some(record.time_ms);
        let subject = format!("{prefix}.opensips.{node}.event.{name}");
        client
            .publish(subject, Bytes::copy_from_slice(datagram.as_bytes()))
            .await
            .map_err(|e| ReplayError::Nats(e.to_string()))?;
        published += 1;
    }
    client.flush().await.map_err(|e| ReplayError::Nats(e.to_string()))?;
    Ok(published)
}
