//! Where calls and partitions live: a call's partition by a stable hash of its key, and a
//! partition's worker by rendezvous hashing over the live workers. Used by the core (call ids
//! name their partition; a dialog is adopted only by its partition) and by the cluster.

/// A partition and how many the cluster has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    /// This partition.
    pub partition: u16,
    /// How many partitions the cluster has.
    pub partitions: u16,
}

/// The partition of a key: FNV-1a (32 bits) modulo `partitions`; stable across versions.
pub fn partition_of(key: &str, partitions: u16) -> u16 {
    let mut h: u32 = 0x811c_9dc5;
    for b in key.as_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h % u32::from(partitions.max(1))) as u16
}

/// A call id with its partition appended (`…p<hex>`).
pub fn call_id_in(id: &str, partition: u16) -> String {
    format!("{id}p{partition:x}")
}

/// The partition of a call id: the one it names (`c<18 hex>p<hex>`), else its hash.
pub fn partition_of_call_id(id: &str, partitions: u16) -> u16 {
    let named = id
        .strip_prefix('c')
        .filter(|rest| rest.len() > 19 && rest.as_bytes()[18] == b'p')
        .and_then(|rest| u16::from_str_radix(&rest[19..], 16).ok())
        .filter(|p| *p < partitions);
    named.unwrap_or_else(|| partition_of(id, partitions))
}

/// Which worker a partition belongs on: rendezvous hashing over the live workers.
pub fn placement(partition: u16, workers: &[String]) -> Option<&str> {
    workers
        .iter()
        .max_by_key(|w| {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for b in w.as_bytes().iter().chain(partition.to_be_bytes().iter()) {
                h ^= u64::from(*b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
            // FNV's low bits mix poorly: finish with a multiply-xorshift.
            h ^= h >> 33;
            h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
            h ^ (h >> 33)
        })
        .map(String::as_str)
}
