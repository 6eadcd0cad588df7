//! The calls' timers: one ordered set, so the next deadline is one look-up and a due timer is
//! taken off in order (no task per timer).

use std::collections::BTreeMap;
use std::time::Instant;

use super::HashMap;

/// Armed timers by call (each call's few by name), and the same ordered by deadline. A
/// look-up by call and name allocates nothing: a call's end cancels every timer its machine
/// may have armed, armed or not, on every ended call.
#[derive(Default)]
pub(crate) struct Timers {
    /// Per call: each armed timer's name, deadline and number (its place in `by_deadline`).
    by_call: HashMap<String, Vec<(String, Instant, u64)>>,
    /// By deadline, then number (arming order): the call and the name.
    by_deadline: BTreeMap<(Instant, u64), (String, String)>,
    /// The next timer's number.
    next_number: u64,
}

impl Timers {
    /// Arms (or re-arms) `call_id`'s timer `name` for `at`.
    pub(crate) fn arm(&mut self, call_id: &str, name: &str, at: Instant) {
        self.cancel(call_id, name);
        let number = self.next_number;
        self.next_number += 1;
        match self.by_call.get_mut(call_id) {
            Some(timers) => timers.push((name.to_owned(), at, number)),
            None => {
                self.by_call.insert(call_id.to_owned(), vec![(name.to_owned(), at, number)]);
            }
        }
        self.by_deadline.insert((at, number), (call_id.to_owned(), name.to_owned()));
    }

    /// Disarms `call_id`'s timer `name` (nothing when it is not armed).
    pub(crate) fn cancel(&mut self, call_id: &str, name: &str) {
        let Some(timers) = self.by_call.get_mut(call_id) else { return };
        let Some(i) = timers.iter().position(|(n, _, _)| n == name) else { return };
        let (_, at, number) = timers.swap_remove(i);
        if timers.is_empty() {
            self.by_call.remove(call_id);
        }
        self.by_deadline.remove(&(at, number));
    }

    /// The earliest deadline.
    pub(crate) fn next(&self) -> Option<Instant> {
        self.by_deadline.first_key_value().map(|((at, _), _)| *at)
    }

    /// Takes the earliest timer due at `now`: its call and name.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<(String, String)> {
        if self.next()? > now {
            return None;
        }
        let (_, (call_id, name)) = self.by_deadline.first_key_value()?;
        let (call_id, name) = (call_id.clone(), name.clone());
        self.cancel(&call_id, &name);
        Some((call_id, name))
    }

    /// How many are armed.
    pub(crate) fn len(&self) -> usize {
        self.by_deadline.len()
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
        assert_eq!(timers.len(), 0);
    }

    #[test]
    fn one_call_s_timers_are_apart_from_another_s_and_equal_deadlines_keep_their_order() {
        let t0 = Instant::now();
        let at = t0 + Duration::from_secs(1);
        let mut timers = Timers::default();
        timers.arm("a", "ring", at);
        timers.arm("a", "hold", at);
        timers.arm("b", "ring", at);
        timers.cancel("b", "hold"); // not armed: nothing
        timers.cancel("z", "ring"); // no such call: nothing
        timers.cancel("a", "ring");
        assert_eq!(timers.len(), 2);
        assert_eq!(timers.pop_due(at), Some(("a".into(), "hold".into())));
        assert_eq!(timers.pop_due(at), Some(("b".into(), "ring".into())));
        assert_eq!(timers.pop_due(at), None);
        assert_eq!(timers.next(), None);
    }
}
