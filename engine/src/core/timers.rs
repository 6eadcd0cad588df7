//! The calls' timers: one ordered set, so the next deadline is one look-up and a due timer is
//! taken off in order (no task per timer).

use std::collections::BTreeSet;
use std::time::Instant;

use super::HashMap;

/// Armed timers by call and name, and the same ordered by deadline.
#[derive(Default)]
pub(crate) struct Timers {
    by_name: HashMap<(String, String), Instant>,
    by_deadline: BTreeSet<(Instant, String, String)>,
}

impl Timers {
    /// Arms (or re-arms) `call_id`'s timer `name` for `at`.
    pub(crate) fn arm(&mut self, call_id: &str, name: &str, at: Instant) {
        self.cancel(call_id, name);
        self.by_name.insert((call_id.to_owned(), name.to_owned()), at);
        self.by_deadline.insert((at, call_id.to_owned(), name.to_owned()));
    }

    /// Disarms `call_id`'s timer `name` (nothing when it is not armed).
    pub(crate) fn cancel(&mut self, call_id: &str, name: &str) {
        if let Some(at) = self.by_name.remove(&(call_id.to_owned(), name.to_owned())) {
            self.by_deadline.remove(&(at, call_id.to_owned(), name.to_owned()));
        }
    }

    /// The earliest deadline.
    pub(crate) fn next(&self) -> Option<Instant> {
        self.by_deadline.first().map(|(at, _, _)| *at)
    }

    /// Takes the earliest timer due at `now`: its call and name.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<(String, String)> {
        if self.next()? > now {
            return None;
        }
        let (_, call_id, name) = self.by_deadline.pop_first()?;
        self.by_name.remove(&(call_id.clone(), name.clone()));
        Some((call_id, name))
    }

    /// How many are armed.
    pub(crate) fn len(&self) -> usize {
        self.by_name.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn due_timers_come_in_deadline_order_and_a_rearm_replaces() {
        let t0 = Instant::now();
        let mut timers = Timers::default();
        timers.arm("a", "ring", t0 + Duration::from_secs(3));
        timers.arm("b", "ring", t0 + Duration::from_secs(1));
        timers.arm("a", "ring", t0 + Duration::from_secs(2));
        timers.arm("c", "x", t0 + Duration::from_secs(5));
        timers.cancel("c", "x");
        assert_eq!(timers.len(), 2);
        assert_eq!(timers.next(), Some(t0 + Duration::from_secs(1)));
        assert_eq!(timers.pop_due(t0), None);
        let now = t0 + Duration::from_secs(10);
        assert_eq!(timers.pop_due(now), Some(("b".into(), "ring".into())));
        assert_eq!(timers.pop_due(now), Some(("a".into(), "ring".into())));
        assert_eq!(timers.pop_due(now), None);
    }
}
