//! `callbus cluster status`: workers, leases and each partition's log position.

use super::*;
use callbus_schemas::cluster::{Heartbeat, Lease};

/// One partition as `callbus cluster status` shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PartitionStatus {
    /// The partition.
    pub partition: u16,
    /// The worker holding its lease, if any.
    pub owner: Option<String>,
    /// Milliseconds since the lease was last renewed.
    pub lease_age_ms: Option<u64>,
    /// The last sequence of its log subject (0: never written).
    pub log_seq: u64,
    /// Input-stream events not yet consumed past its logged position (an upper bound: the
    /// events of every partition count).
    pub lag: u64,
    /// Where placement puts it among the live workers; differs from `owner` while the partition
    /// moves (a worker joined or left: the owner hands it over, a few at a time).
    pub placed_on: Option<String>,
}

impl PartitionStatus {
    /// Whether the partition is moving: owned, but placed on another live worker, or placed and
    /// not owned yet.
    pub fn moving(&self) -> bool {
        self.placed_on.is_some() && self.owner != self.placed_on
    }
}

/// The cluster as `callbus cluster status` shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ClusterStatus {
    /// Live workers and how many partitions each says it holds.
    pub workers: Vec<(String, u64)>,
    /// Every partition.
    pub partitions: Vec<PartitionStatus>,
    /// The input stream's last sequence.
    pub input_last_seq: u64,
    /// How many partitions are moving (see [`PartitionStatus::moving`]).
    pub moving: usize,
}

/// Reads the workers, the leases and each partition's log position.
pub async fn status(client: &async_nats::Client, partitions: u16) -> Result<ClusterStatus, String> {
    let js = jetstream::new(client.clone());
    let kv = js
        .get_key_value(LEASES_BUCKET)
        .await
        .map_err(|e| format!("KV bucket {LEASES_BUCKET}: {e} (has a cluster engine run on this NATS?)"))?;
    let now_ns =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as i128).unwrap_or(0);
    let mut workers = Vec::new();
    let mut keys = kv.keys().await.map_err(|e| format!("listing {LEASES_BUCKET}: {e}"))?;
    while let Some(Ok(key)) = keys.next().await {
        if let Some(name) = key.strip_prefix("w.") {
            if let Ok(Some(entry)) = kv.entry(&key).await {
                let held = serde_json::from_slice::<Heartbeat>(&entry.value).map_or(0, |h| h.partitions as u64);
                if entry.operation == jetstream::kv::Operation::Put {
                    workers.push((name.to_owned(), held));
                }
            }
        }
    }
    workers.sort();
    let log = js.get_stream(LOG_STREAM).await.map_err(|e| format!("stream {LOG_STREAM}: {e}"))?;
    let mut events = js.get_stream(EVENTS_STREAM).await.map_err(|e| format!("stream {EVENTS_STREAM}: {e}"))?;
    let input_last_seq = events.info().await.map(|i| i.state.last_sequence).unwrap_or(0);
    let mut out = Vec::new();
    for p in 0..partitions {
        let (owner, lease_age_ms) = match kv.entry(lease_key(p)).await {
            Ok(Some(e)) if e.operation == jetstream::kv::Operation::Put => {
                let owner = serde_json::from_slice::<Lease>(&e.value).ok().map(|v| v.worker);
                let age = ((now_ns - e.created.unix_timestamp_nanos()).max(0) / 1_000_000) as u64;
                (owner, Some(age))
            }
            _ => (None, None),
        };
        let (log_seq, position) = match log.get_last_raw_message_by_subject(&log_subject(p)).await {
            Ok(m) => {
                let position = m.headers.get(HEADER_INPUT_SEQ).and_then(|v| v.as_str().parse().ok()).unwrap_or(0);
                (m.sequence, position)
            }
            Err(_) => (0, 0),
        };
        let names: Vec<String> = workers.iter().map(|(w, _)| w.clone()).collect();
        out.push(PartitionStatus {
            partition: p,
            owner,
            lease_age_ms,
            log_seq,
            lag: input_last_seq.saturating_sub(position >> 16),
            placed_on: placement(p, &names).map(str::to_owned),
        });
    }
    let moving = out.iter().filter(|p| p.moving()).count();
    Ok(ClusterStatus { workers, partitions: out, input_last_seq, moving })
}
