//! Reconnect policy for agents: exponential backoff with jitter, shaped
//! after gRPC's connection-backoff document (x1.6, +-20 % jitter) with two
//! changes for a hub that restarts in milliseconds: the first retry after a
//! healthy session is drawn uniformly from a short window (so a restarted
//! hub sees its agents back at once, spread rather than in lockstep), and
//! the cap is 15 s (so an agent retries promptly once a long partition
//! heals; 10,000 agents at the cap are ~700 attempts per second).
//!
//! ```no_run
//! use unitsync_proto::backoff::Backoff;
//! let mut backoff = Backoff::default();
//! let first = backoff.next_delay(); // uniform in 0..500 ms
//! let second = backoff.next_delay(); // ~1 s
//! let third = backoff.next_delay(); // ~1.6 s
//! backoff.reset();
//! ```

use std::time::Duration;

use rand::Rng;

/// Parameters of the reconnect policy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BackoffPolicy {
    /// The first delay after a reset is uniform in `[0, first_window)`
    /// (zero: start at `initial` directly).
    pub first_window: Duration,
    pub initial: Duration,
    pub multiplier: f64,
    /// Relative jitter: each delay is scaled by a uniform factor in
    /// `[1 - jitter, 1 + jitter]`.
    pub jitter: f64,
    pub max: Duration,
}

impl BackoffPolicy {
    /// The policy every unitsync agent uses.
    pub const STANDARD: BackoffPolicy = BackoffPolicy {
        first_window: Duration::from_millis(500),
        initial: Duration::from_secs(1),
        multiplier: 1.6,
        jitter: 0.2,
        max: Duration::from_secs(15),
    };
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        Self::STANDARD
    }
}

/// The state of one reconnect loop.
#[derive(Clone, Debug)]
pub struct Backoff {
    policy: BackoffPolicy,
    /// The un-jittered delay the next call starts from.
    current: Duration,
    /// No delay was drawn since the last reset.
    fresh: bool,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(BackoffPolicy::STANDARD)
    }
}

impl Backoff {
    pub fn new(policy: BackoffPolicy) -> Self {
        Self {
            policy,
            current: policy.initial,
            fresh: true,
        }
    }

    /// The delay before the next attempt; grows the following one.
    pub fn next_delay(&mut self) -> Duration {
        if std::mem::take(&mut self.fresh) && !self.policy.first_window.is_zero() {
            return Duration::from_secs_f64(
                rand::rng().random_range(0.0..self.policy.first_window.as_secs_f64()),
            );
        }
        let base = self.current;
        let grown = base.as_secs_f64() * self.policy.multiplier;
        self.current = Duration::from_secs_f64(grown.min(self.policy.max.as_secs_f64()));
        let j = self.policy.jitter;
        let factor = if j > 0.0 {
            rand::rng().random_range(1.0 - j..=1.0 + j)
        } else {
            1.0
        };
        Duration::from_secs_f64(base.as_secs_f64() * factor)
    }

    /// Starts over from the initial delay (after a connection stayed healthy).
    pub fn reset(&mut self) {
        self.current = self.policy.initial;
        self.fresh = true;
    }

    pub fn policy(&self) -> &BackoffPolicy {
        &self.policy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_by_the_multiplier_within_jitter_and_cap() {
        let mut b = Backoff::default();
        let first = b.next_delay().as_secs_f64();
        assert!((0.0..0.5).contains(&first), "first retry {first}");
        let mut base = 1.0_f64;
        for _ in 0..30 {
            let d = b.next_delay().as_secs_f64();
            assert!(
                d >= base * 0.8 - 1e-9 && d <= base * 1.2 + 1e-9,
                "{d} vs base {base}"
            );
            base = (base * 1.6).min(15.0);
        }
        // After enough attempts the base is pinned at the cap.
        assert!((base - 15.0).abs() < 1e-9);
    }

    #[test]
    fn reset_returns_to_the_first_window() {
        let mut b = Backoff::default();
        for _ in 0..5 {
            b.next_delay();
        }
        b.reset();
        let d = b.next_delay().as_secs_f64();
        assert!((0.0..0.5).contains(&d), "{d}");
        let d = b.next_delay().as_secs_f64();
        assert!((0.8..=1.2).contains(&d), "{d}");
    }

    #[test]
    fn without_a_first_window_the_first_delay_is_the_initial_one() {
        let mut b = Backoff::new(BackoffPolicy {
            first_window: Duration::ZERO,
            ..BackoffPolicy::STANDARD
        });
        let d = b.next_delay().as_secs_f64();
        assert!((0.8..=1.2).contains(&d), "{d}");
    }

    #[test]
    fn simultaneous_loops_disperse() {
        let delays: Vec<f64> = (0..50)
            .map(|_| Backoff::default().next_delay().as_secs_f64())
            .collect();
        let min = delays.iter().copied().fold(f64::MAX, f64::min);
        let max = delays.iter().copied().fold(f64::MIN, f64::max);
        assert!(
            max - min > 0.05,
            "50 loops started together must not retry in lockstep"
        );
    }
}
