//! Reconciliation with OpenSIPS: which calls to close because OpenSIPS no longer has them, and
//! which of its dialogs to adopt because no call knows them.

use std::collections::{HashMap, HashSet};

use super::{Core, Now, Outputs, Parked, Reconciled};
use crate::log::LogError;
use crate::machines::{CallState, DialogState, Input};

impl Core {
    pub(super) fn on_reconciled(
        &mut self,
        r: Reconciled,
        now: Now,
        out: &mut Outputs,
        released: &mut Vec<Parked>,
    ) -> Result<(), LogError> {
        let Reconciled { node, dialogs, ua_keys, candidates, periodic } = r;
        let node = node.as_str();
        let candidates: HashSet<&String> = candidates.iter().collect();
        if let Some(keys) = ua_keys {
            let keys: HashSet<String> = keys.into_iter().collect();
            let mut ua_calls: Vec<(String, bool)> = self
                .calls
                .iter()
                .filter(|(id, e)| candidates.contains(id) && !e.state.is_ended() && e.state.node() == node)
                .filter(|(_, e)| !matches!(e.state, CallState::Dialog(_)))
                .map(|(id, e)| (id.clone(), e.state.keys().iter().all(|k| keys.contains(*k))))
                .collect();
            // In the order of the call ids (time-ordered), so the log is the same on every run.
            ua_calls.sort();
            let mut closed = 0;
            for (call_id, present) in ua_calls {
                if present && periodic {
                    continue;
                }
                let opensips_state = if present { Some(0) } else { None };
                if !present {
                    closed += 1;
                }
                self.apply(&call_id, None, Input::Reconcile { opensips_state }, now, out, released)?;
            }
            tracing::info!(node, closed, "reconciled UA sessions with OpenSIPS");
        }
        let present: HashMap<String, i64> = dialogs.iter().cloned().collect();
        let mut live: Vec<(String, String)> = self
            .calls
            .iter()
            .filter(|(id, e)| candidates.contains(id) && !e.state.is_ended() && e.state.node() == node)
            .filter(|(_, e)| matches!(e.state, CallState::Dialog(_)))
            .filter_map(|(id, e)| e.state.sip_call_id().map(|s| (id.clone(), s.to_owned())))
            .collect();
        live.sort();
        let mut closed = 0;
        for (call_id, sip) in &live {
            let state = present.get(sip).copied();
            if state.is_some() && periodic {
                continue;
            }
            if state.is_none() {
                closed += 1;
            }
            self.apply(call_id, None, Input::Reconcile { opensips_state: state }, now, out, released)?;
        }
        let mut adopted = 0;
        // In OpenSIPS's order, deduplicated.
        let mut seen = HashSet::new();
        for (sip, state) in dialogs {
            if !seen.insert(sip.clone()) {
                continue;
            }
            // In a cluster, a dialog nobody knows is adopted by the partition its events go to.
            let elsewhere = self
                .config
                .placement
                .is_some_and(|p| crate::placement::partition_of(&sip, p.partitions) != p.partition);
            if !elsewhere && !self.by_sip.contains_key(&sip) {
                adopted += 1;
                let call_id = self.new_call_id(now);
                let fresh = CallState::Dialog(DialogState::new(node, &sip));
                let input = Input::Reconcile { opensips_state: Some(state) };
                self.apply(&call_id, Some(fresh), input, now, out, released)?;
            }
        }
        if !periodic || closed > 0 || adopted > 0 {
            tracing::info!(node, checked = live.len(), closed, adopted, periodic, "reconciled calls with OpenSIPS");
        }
        Ok(())
    }
}
