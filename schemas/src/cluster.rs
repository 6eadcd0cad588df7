//! What cluster workers keep in the leases bucket (`callbus_leases`): a partition's lease
//! (`p.<partition>`) and a worker's heartbeat (`w.<worker>`). `callbus cluster status` reads
//! both; operators may too (`nats kv get callbus_leases p.3`).

use serde::{Deserialize, Serialize};

/// The value of a partition's lease: who owns it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The owning worker's name.
    pub worker: String,
}

/// The value of a worker's heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The worker's name.
    pub worker: String,
    /// How many partitions it owns.
    #[serde(default)]
    pub partitions: usize,
    /// How long it has run, in ms.
    #[serde(default)]
    pub up_ms: u64,
    /// Partitions it is taking or handing over now (a rebalancing in progress).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub moving: Vec<u16>,
}

/// The key of a partition's lease.
pub fn lease_key(partition: u16) -> String {
    format!("p.{partition}")
}

/// The key of a worker's heartbeat.
pub fn heartbeat_key(worker: &str) -> String {
    format!("w.{worker}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_read_back_and_old_heartbeats_still_read() {
        let lease = Lease { worker: "w1".into() };
        let bytes = serde_json::to_vec(&lease).unwrap();
        assert_eq!(serde_json::from_slice::<Lease>(&bytes).unwrap(), lease);
        let old: Heartbeat = serde_json::from_str(r#"{"worker":"w1"}"#).unwrap();
        assert_eq!(old.partitions, 0);
        assert!(serde_json::from_str::<Lease>(r#"{"owner":"w1"}"#).is_err());
        assert_eq!(lease_key(7), "p.7");
        assert_eq!(heartbeat_key("a"), "w.a");
    }
}
