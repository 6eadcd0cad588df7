//! When retention runs and where its scan goes: the single engine's `engine.retention` (by
//! age) and `engine.retention_bytes` (by size) as a plan with time as input; the owner carries
//! out the steps it asks for (`SledLog::prune`, `SledLog::prune_to_free`).
//!
//! A pass scans the log from its oldest record, a step (at most a budget of records) per
//! second, until it reaches records that may not go yet. An age pass starts at most every
//! [`PRUNE_EVERY`] (or every retention, when shorter); a size pass whenever the records take
//! more than the limit. A size pass that ends still over it (every call left was live, in
//! memory or after the checkpoint: usually for a moment, until calls leave memory and the next
//! checkpoint covers them) makes the next wait as long as the log has been stuck so, from a
//! second up to [`PRUNE_EVERY`], so a log that cannot shrink is not scanned again between every
//! batch; stuck for [`PRUNE_EVERY`], it is said once.
//! A pass starts where the last one kept its first record, not at sequence 1: sled does not
//! merge the leaves that removals empty, and walking them again would grow with the log's age.

use std::time::{Duration, Instant};

use crate::log::Pruned;

/// A retention pass starts at most this often (or every retention, when shorter); a size pass
/// waits at most this long after one that could not free enough, and a log stuck over its
/// limit this long is said.
pub(super) const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// What the next step removes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum StepKind {
    /// The oldest calls that may go, until this many stored bytes are freed.
    Free(u64),
    /// The calls whose whole history is older than `engine.retention`.
    Age,
}

/// A step to take: from which sequence, and what it removes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Step {
    pub from: u64,
    pub kind: StepKind,
}

/// The records have been over the limit for [`PRUNE_EVERY`] and no call may go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct StillOver {
    pub stored_bytes: u64,
    pub limit: u64,
}

/// The retention plan of one owner.
#[derive(Debug)]
pub(super) struct RetentionPlan {
    age: Option<Duration>,
    limit: u64,
    /// Where the scan goes on.
    from: u64,
    in_pass: bool,
    /// Where the next pass starts: every record below it is gone.
    floor: u64,
    /// The same, for the pass under way.
    pass_floor: u64,
    last_pass: Instant,
    /// Since when size passes end still over the limit, and whether that was said.
    stuck_since: Option<Instant>,
    said: bool,
    size_wait_until: Option<Instant>,
}

impl RetentionPlan {
    /// A plan for `engine.retention` (`age`; None or zero: off) and `engine.retention_bytes`
    /// (`limit`; zero: off), starting at `now` (the first age pass is one period away).
    pub fn new(age: Option<Duration>, limit: u64, now: Instant) -> Self {
        RetentionPlan {
            age: age.filter(|a| !a.is_zero()),
            limit,
            from: 1,
            in_pass: false,
            floor: 1,
            pass_floor: 1,
            last_pass: now,
            stuck_since: None,
            said: false,
            size_wait_until: None,
        }
    }

    /// The age pass's cutoff for records stamped against `now_ms`, when there is one.
    pub fn cutoff_ms(&self, now_ms: u64) -> Option<u64> {
        let age = u64::try_from(self.age?.as_millis()).unwrap_or(u64::MAX);
        Some(now_ms.saturating_sub(age))
    }

    /// The step to take now, if any, given the records' stored bytes.
    pub fn next(&mut self, stored_bytes: u64, now: Instant) -> Option<Step> {
        if stored_bytes <= self.limit {
            (self.stuck_since, self.said, self.size_wait_until) = (None, false, None);
        }
        let over = match self.limit {
            0 => 0,
            _ if self.size_wait_until.is_some_and(|until| now < until) => 0,
            limit => stored_bytes.saturating_sub(limit),
        };
        let age_due = self
            .age
            .is_some_and(|age| self.in_pass || now.saturating_duration_since(self.last_pass) >= age.min(PRUNE_EVERY));
        let kind = match (over, age_due) {
            (0, false) => return None,
            (0, true) => StepKind::Age,
            (over, _) => StepKind::Free(over),
        };
        if !self.in_pass {
            (self.in_pass, self.from, self.pass_floor) = (true, self.floor, self.floor);
        }
        Some(Step { from: self.from, kind })
    }

    /// Takes what a step did; `stored_bytes` is after it. Says, once, when size passes have
    /// ended still over the limit for [`PRUNE_EVERY`].
    pub fn done(&mut self, step: Step, did: &Pruned, stored_bytes: u64, now: Instant) -> Option<StillOver> {
        // Nothing kept so far in this pass: everything up to this step's floor is gone.
        if self.pass_floor == step.from {
            self.pass_floor = did.floor.max(step.from);
        }
        if let Some(next) = did.next {
            self.from = next;
            return None;
        }
        (self.in_pass, self.floor, self.last_pass) = (false, self.pass_floor, now);
        if !matches!(step.kind, StepKind::Free(_)) || stored_bytes <= self.limit {
            return None;
        }
        let since = *self.stuck_since.get_or_insert(now);
        let stuck = now.saturating_duration_since(since);
        self.size_wait_until = Some(now + stuck.clamp(Duration::from_secs(1), PRUNE_EVERY));
        let say = stuck >= PRUNE_EVERY && !self.said;
        self.said |= say;
        say.then_some(StillOver { stored_bytes, limit: self.limit })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pruned(next: Option<u64>, floor: u64) -> Pruned {
        Pruned { next, floor, ..Default::default() }
    }

    #[test]
    fn an_age_pass_starts_every_period_and_goes_on_step_by_step_until_it_ends() {
        let t0 = Instant::now();
        let mut plan = RetentionPlan::new(Some(Duration::from_secs(30)), 0, t0);
        assert_eq!(plan.next(0, t0 + Duration::from_secs(29)), None, "not before the retention");
        let step = plan.next(0, t0 + Duration::from_secs(30)).expect("due");
        assert_eq!(step, Step { from: 1, kind: StepKind::Age });
        assert_eq!(plan.done(step, &pruned(Some(500), 500), 0, t0 + Duration::from_secs(30)), None);
        let step = plan.next(0, t0 + Duration::from_secs(31)).expect("the pass goes on");
        assert_eq!(step.from, 500);
        plan.done(step, &pruned(None, 700), 0, t0 + Duration::from_secs(31));
        assert_eq!(plan.next(0, t0 + Duration::from_secs(60)), None, "the next pass is one period after");
        assert_eq!(plan.next(0, t0 + Duration::from_secs(61)).map(|s| s.from), Some(700));
    }

    #[test]
    fn the_next_pass_starts_at_the_first_record_the_last_one_kept() {
        let t0 = Instant::now();
        let mut plan = RetentionPlan::new(Some(Duration::from_secs(1)), 0, t0);
        let t = t0 + Duration::from_secs(1);
        // First step removes everything it saw (floor = where it stopped), the second keeps
        // sequence 1 200 first, the third keeps more: the pass's floor is 1 200.
        for (from, next, floor) in [(1, Some(1_000), 1_000), (1_000, Some(2_000), 1_200), (2_000, None, 2_100)] {
            let step = plan.next(0, t).expect("due");
            assert_eq!(step.from, from);
            plan.done(step, &pruned(next, floor), 0, t);
        }
        let step = plan.next(0, t + Duration::from_secs(1)).expect("due");
        assert_eq!(step.from, 1_200);
        // A pass that keeps its very first record leaves the floor there.
        plan.done(step, &pruned(None, 1_200), 0, t + Duration::from_secs(1));
        assert_eq!(plan.next(0, t + Duration::from_secs(2)).map(|s| s.from), Some(1_200));
    }

    #[test]
    fn size_passes_that_cannot_free_enough_wait_longer_each_time_and_are_said_once() {
        let t0 = Instant::now();
        let secs = |s: u64| t0 + Duration::from_secs(s);
        let mut plan = RetentionPlan::new(None, 1_000, t0);
        assert_eq!(plan.next(1_000, t0), None, "at the limit, nothing to do");
        let step = plan.next(5_000, t0).expect("over");
        assert_eq!(step, Step { from: 1, kind: StepKind::Free(4_000) });
        // The scan reaches the checkpoint having freed 1 000 bytes only: the next waits a second.
        assert_eq!(plan.done(step, &pruned(None, 1), 4_000, t0), None, "a moment over is not said");
        assert_eq!(plan.next(4_000, t0), None, "waits");
        // Each time still over, the wait is as long as the log has been stuck: 1, 2, 4... s.
        let mut at = 1;
        let mut waits = Vec::new();
        let said = loop {
            let step = plan.next(4_000, secs(at)).expect("due");
            assert_eq!(step.kind, StepKind::Free(3_000));
            if let Some(over) = plan.done(step, &pruned(None, 1), 4_000, secs(at)) {
                break over;
            }
            let wait = (at..).find(|s| plan.next(4_000, secs(*s)).is_some()).expect("a wait ends") - at;
            // `next` started a pass at the end of the wait: end it as the scan would.
            plan.in_pass = false;
            waits.push(wait);
            at += wait;
        };
        assert_eq!(waits, [1, 2, 4, 8, 16, 32], "doubling");
        assert_eq!(said, StillOver { stored_bytes: 4_000, limit: 1_000 });
        assert!(at >= PRUNE_EVERY.as_secs(), "said after a minute stuck, at {at} s");
        let step = plan.next(4_000, secs(at + 60)).expect("at most a minute apart");
        assert_eq!(plan.done(step, &pruned(None, 1), 4_000, secs(at + 60)), None, "said once");
        // Under the limit again: the next time over is a new story, with no wait.
        assert_eq!(plan.next(900, secs(at + 61)), None);
        assert!(plan.next(1_500, secs(at + 61)).is_some());
    }

    #[test]
    fn with_neither_limit_nothing_runs() {
        let t0 = Instant::now();
        let mut plan = RetentionPlan::new(Some(Duration::ZERO), 0, t0);
        assert_eq!(plan.next(u64::MAX, t0 + Duration::from_secs(3_600)), None);
        assert_eq!(plan.cutoff_ms(5_000), None);
        let plan = RetentionPlan::new(Some(Duration::from_secs(2)), 0, t0);
        assert_eq!(plan.cutoff_ms(5_000), Some(3_000));
        assert_eq!(plan.cutoff_ms(1_000), Some(0));
    }
}
