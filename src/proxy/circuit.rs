//! Circuit breaker per fanout secondary.
//!
//! Closed, it counts failed attempts in a row. At `consecutive_failures`
//! it opens: no attempt goes out for `open_for`. Then it is half-open and
//! lets exactly one probe attempt through. A successful probe closes it,
//! a failed one opens it again. Any successful attempt closes it.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use prometheus::IntGauge;
use tokio::time::Instant;

use crate::config::CircuitBreakerConfig;

/// Values of the `tandem_circuit_state` gauge.
pub const CLOSED: i64 = 0;
pub const HALF_OPEN: i64 = 1;
pub const OPEN: i64 = 2;

pub struct CircuitBreaker {
    state: Mutex<State>,
    threshold: u32,
    open_for: Duration,
    gauge: IntGauge,
    route: String,
    secondary: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

/// Leave to send one attempt. Settle it with [`CircuitPermit::success`] or
/// [`CircuitPermit::failure`]; a probe dropped unsettled lets the next
/// attempt probe instead.
pub struct CircuitPermit {
    breaker: Arc<CircuitBreaker>,
    probe: bool,
    settled: bool,
}

impl CircuitBreaker {
    /// Builds a closed breaker; `route` and `secondary` name it in logs.
    pub fn new(
        config: &CircuitBreakerConfig,
        gauge: IntGauge,
        route: &str,
        secondary: &str,
    ) -> Self {
        gauge.set(CLOSED);
        Self {
            state: Mutex::new(State::Closed { failures: 0 }),
            threshold: config.consecutive_failures,
            open_for: config.open_for,
            gauge,
            route: route.to_string(),
            secondary: secondary.to_string(),
        }
    }

    /// Returns a permit for one attempt, or `None` while the circuit is
    /// open or its half-open probe is in flight.
    pub fn admit(self: &Arc<Self>) -> Option<CircuitPermit> {
        let mut state = self.lock();
        let probe = match *state {
            State::Closed { .. } => false,
            State::Open { until } if Instant::now() < until => return None,
            State::Open { .. } | State::HalfOpen { probing: false } => {
                self.set(&mut state, State::HalfOpen { probing: true });
                true
            }
            State::HalfOpen { probing: true } => return None,
        };
        Some(CircuitPermit {
            breaker: Arc::clone(self),
            probe,
            settled: false,
        })
    }

    /// True when [`CircuitBreaker::admit`] would refuse an attempt now.
    pub fn is_open(&self) -> bool {
        match *self.lock() {
            State::Closed { .. } | State::HalfOpen { probing: false } => false,
            State::Open { until } => Instant::now() < until,
            State::HalfOpen { probing: true } => true,
        }
    }

    fn record(&self, probe: bool, success: bool) {
        let mut state = self.lock();
        let next = match (*state, success) {
            (_, true) => State::Closed { failures: 0 },
            (State::Closed { failures }, false) if failures + 1 < self.threshold => State::Closed {
                failures: failures + 1,
            },
            (State::Closed { .. }, false) => self.opened(),
            (State::HalfOpen { .. }, false) if probe => self.opened(),
            // A non-probe attempt sent before the circuit opened failed
            // late; the open period already counts from the earlier failure.
            (current, false) => current,
        };
        self.set(&mut state, next);
    }

    fn cancel_probe(&self) {
        let mut state = self.lock();
        if *state == (State::HalfOpen { probing: true }) {
            self.set(&mut state, State::HalfOpen { probing: false });
        }
    }

    fn opened(&self) -> State {
        State::Open {
            until: Instant::now() + self.open_for,
        }
    }

    fn set(&self, state: &mut State, next: State) {
        if *state != next {
            if matches!(next, State::Open { .. }) && !matches!(*state, State::Open { .. }) {
                tracing::warn!(
                    route = %self.route,
                    secondary = %self.secondary,
                    open_for = ?self.open_for,
                    "circuit opened"
                );
            }
            if matches!(next, State::Closed { .. }) && !matches!(*state, State::Closed { .. }) {
                tracing::info!(route = %self.route, secondary = %self.secondary, "circuit closed");
            }
        }
        *state = next;
        self.gauge.set(match next {
            State::Closed { .. } => CLOSED,
            State::HalfOpen { .. } => HALF_OPEN,
            State::Open { .. } => OPEN,
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("circuit lock is never poisoned")
    }
}

impl CircuitPermit {
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    pub fn success(mut self) {
        self.settled = true;
        self.breaker.record(self.probe, true);
    }

    pub fn failure(mut self) {
        self.settled = true;
        self.breaker.record(self.probe, false);
    }
}

impl Drop for CircuitPermit {
    fn drop(&mut self) {
        if !self.settled && self.probe {
            self.breaker.cancel_probe();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(threshold: u32, open_for: Duration) -> Arc<CircuitBreaker> {
        let config = CircuitBreakerConfig {
            consecutive_failures: threshold,
            open_for,
        };
        Arc::new(CircuitBreaker::new(
            &config,
            IntGauge::new("circuit_state", "test gauge").unwrap(),
            "audit",
            "http://127.0.0.1:9191",
        ))
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures() {
        let breaker = breaker(3, Duration::from_secs(10));
        for _ in 0..2 {
            breaker.admit().expect("closed circuit admits").failure();
        }
        assert_eq!(
            breaker.gauge.get(),
            CLOSED,
            "2 of 3 failures keep it closed"
        );
        breaker.admit().expect("closed circuit admits").success();
        for _ in 0..2 {
            breaker.admit().expect("success reset the count").failure();
        }
        assert_eq!(breaker.gauge.get(), CLOSED);
        breaker.admit().expect("closed circuit admits").failure();
        assert_eq!(breaker.gauge.get(), OPEN);
        assert!(breaker.is_open());
        assert!(breaker.admit().is_none(), "open circuit refuses attempts");
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_lets_one_probe_through() {
        let breaker = breaker(1, Duration::from_secs(10));
        breaker.admit().unwrap().failure();
        tokio::time::advance(Duration::from_millis(9_999)).await;
        assert!(
            breaker.admit().is_none(),
            "still open before open_for passed"
        );

        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(!breaker.is_open(), "open_for passed");
        let probe = breaker
            .admit()
            .expect("first attempt after open_for probes");
        assert!(probe.is_probe());
        assert_eq!(breaker.gauge.get(), HALF_OPEN);
        assert!(breaker.admit().is_none(), "only one probe at a time");

        probe.failure();
        assert_eq!(breaker.gauge.get(), OPEN, "failed probe opens again");
        tokio::time::advance(Duration::from_secs(10)).await;
        breaker.admit().expect("second probe").success();
        assert_eq!(breaker.gauge.get(), CLOSED, "successful probe closes");
        assert!(!breaker.admit().unwrap().is_probe());
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_probe_frees_the_slot() {
        let breaker = breaker(1, Duration::from_secs(1));
        breaker.admit().unwrap().failure();
        tokio::time::advance(Duration::from_secs(1)).await;
        drop(breaker.admit().expect("probe"));
        assert!(breaker.admit().expect("next probe").is_probe());
    }
}
