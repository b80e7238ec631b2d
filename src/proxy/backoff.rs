//! Fail-fast for a secondary that refuses connections.
//!
//! Without it, a dead secondary costs one connection attempt per copy, which
//! at thousands of copies per second takes CPU from the primary path. After a
//! failed connection attempt, copies are shed without trying until a backoff
//! passes. The backoff doubles on each further failure up to a cap, and the
//! first copy after it expires probes the secondary again.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// Backoff after the first failed connection attempt.
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// Upper bound, so a recovered secondary gets copies again within seconds.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
pub struct ConnectBackoff {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// No connection attempts before this instant.
    retry_at: Option<Instant>,
    /// The backoff applied after the next failure.
    next: Duration,
}

impl ConnectBackoff {
    /// True while copies should be shed without a connection attempt.
    pub fn is_backing_off(&self, now: Instant) -> bool {
        let state = self.state.lock().expect("backoff lock is never poisoned");
        state.retry_at.is_some_and(|at| now < at)
    }

    /// Records a failed connection attempt and extends the backoff.
    /// Returns true when this failure starts an outage, so callers can log
    /// the change once instead of once per copy.
    pub fn record_failure(&self, now: Instant) -> bool {
        let mut state = self.state.lock().expect("backoff lock is never poisoned");
        if state.retry_at.is_some_and(|at| now < at) {
            // Copies that were already in flight fail together; one outage
            // extends the backoff once.
            return false;
        }
        let started = state.retry_at.is_none();
        let backoff = state.next.max(INITIAL_BACKOFF);
        state.retry_at = Some(now + backoff);
        state.next = (backoff * 2).min(MAX_BACKOFF);
        started
    }

    /// Records a successful connection and clears the backoff. Returns true
    /// when this ends an outage.
    pub fn record_success(&self) -> bool {
        let mut state = self.state.lock().expect("backoff lock is never poisoned");
        let recovered = state.retry_at.is_some();
        if recovered {
            *state = State::default();
        }
        recovered
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_cap() {
        let backoff = ConnectBackoff::default();
        let start = Instant::now();
        assert!(!backoff.is_backing_off(start), "no failure yet");

        assert!(
            backoff.record_failure(start),
            "the first failure starts an outage"
        );
        assert!(backoff.is_backing_off(start + Duration::from_millis(99)));
        assert!(!backoff.is_backing_off(start + Duration::from_millis(100)));

        let second = start + Duration::from_millis(100);
        assert!(!backoff.record_failure(second), "the outage goes on");
        assert!(backoff.is_backing_off(second + Duration::from_millis(199)));
        assert!(!backoff.is_backing_off(second + Duration::from_millis(200)));

        let mut now = second + Duration::from_millis(200);
        for _ in 0..10 {
            backoff.record_failure(now);
            now += MAX_BACKOFF;
        }
        assert!(
            !backoff.is_backing_off(now),
            "backoff never exceeds the cap"
        );
    }

    #[test]
    fn failures_during_backoff_extend_once() {
        let backoff = ConnectBackoff::default();
        let start = Instant::now();
        backoff.record_failure(start);
        backoff.record_failure(start + Duration::from_millis(10));
        assert!(!backoff.is_backing_off(start + Duration::from_millis(100)));
    }

    #[test]
    fn success_clears_backoff() {
        let backoff = ConnectBackoff::default();
        let start = Instant::now();
        backoff.record_failure(start);
        assert!(backoff.record_success(), "a success ends the outage");
        assert!(!backoff.is_backing_off(start));
        assert!(!backoff.record_success(), "no outage to end");
    }
}
