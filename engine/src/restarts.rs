//! Noticing that an OpenSIPS node restarted (or came back after being unreachable) from its
//! bridge's status (`opensips.<node>.status`).
//!
//! OpenSIPS forgets its dialogs, UA sessions and event subscriptions when it restarts, and
//! raises no event for the calls it dropped. The bridge notices ("Up since" changed, or the
//! subscriptions had to be made again after a gap) and says so in its status; the engine then
//! reconciles that node's calls at once instead of at the next periodic reconciliation (5 min by
//! default), so a call OpenSIPS lost is ended within seconds of OpenSIPS coming back.

use std::collections::HashMap;

use callbus_schemas::bus::BridgeStatus;

/// The last restart marks seen per node: OpenSIPS's "Up since" and the bridge's count of
/// restarts (which also counts "reachable again after a gap").
#[derive(Debug, Default)]
pub struct RestartWatch {
    seen: HashMap<String, (Option<String>, u64)>,
}

impl RestartWatch {
    /// Takes one bridge status; true when its node restarted or came back since the last status
    /// of that node. The first status of a node counts as a restart when its bridge has counted
    /// any: the restart may have come before this engine heard of the node, and reconciling once
    /// more costs only a `dlg_list`.
    pub fn restarted(&mut self, status: &BridgeStatus) -> bool {
        let mark = (status.opensips_up_since.clone(), status.counters.opensips_restarts);
        match self.seen.insert(status.node.clone(), mark.clone()) {
            None => mark.1 > 0,
            // "Up since" unknown (OpenSIPS unreachable) is not a restart by itself: the count
            // moves when it comes back.
            Some((before_up, before_count)) => {
                let up_changed = before_up.is_some() && mark.0.is_some() && before_up != mark.0;
                up_changed || before_count != mark.1
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(node: &str, up_since: Option<&str>, restarts: u64) -> BridgeStatus {
        let mut s: BridgeStatus = serde_json::from_value(serde_json::json!({
            "node": node, "time_unix_ms": 0, "mi": "127.0.0.1:8080", "events_listen": "127.0.0.1:8090",
            "opensips_reachable": up_since.is_some(), "opensips_up_since": up_since, "subscriptions": [],
            "counters": callbus_schemas::bus::BridgeCounters::default(), "buffered": 0, "buffer_capacity": 0, "last_datagram_unix_ms": null
        }))
        .expect("a status");
        s.counters.opensips_restarts = restarts;
        s
    }

    #[test]
    fn a_changed_up_since_or_restart_count_is_a_restart_of_that_node_only() {
        let mut w = RestartWatch::default();
        // Given the first status of each node: a restart only if its bridge counted one.
        assert!(!w.restarted(&status("a", Some("Sun Dec  6 00:25:09 2026"), 0)));
        assert!(w.restarted(&status("b", Some("Sun Dec  6 00:20:00 2026"), 3)));
        // The same again: nothing.
        assert!(!w.restarted(&status("a", Some("Sun Dec  6 00:25:09 2026"), 0)));
        // Unreachable: not yet.
        assert!(!w.restarted(&status("a", None, 0)));
        // Back, the bridge counted it: a restart.
        assert!(w.restarted(&status("a", Some("Sun Dec  6 00:31:00 2026"), 1)));
        // "Up since" changed between two statuses (the count not yet): a restart.
        assert!(w.restarted(&status("a", Some("Sun Dec  6 00:40:00 2026"), 1)));
        // Node b is untouched by a's restarts; a restarted bridge (count back to 0) counts.
        assert!(!w.restarted(&status("b", Some("Sun Dec  6 00:20:00 2026"), 3)));
        assert!(w.restarted(&status("b", Some("Sun Dec  6 00:20:00 2026"), 0)));
    }
}
