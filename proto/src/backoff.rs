//! Reconnect policy for agents: exponential backoff with jitter, following
//! gRPC's connection-backoff document (1 s initial, x1.6, +-20 % jitter,
//! 120 s cap).
//!
//! ```no_run
//! use unitsync_proto::backoff::Backoff;
//! let mut backoff = Backoff::default();
//! let first = backoff.next_delay(); // ~1 s
//! let second = backoff.next_delay(); // ~1.6 s
//! backoff.reset();
//! ```

use std::time::Duration;

use rand::Rng;

/// Parameters of the reconnect policy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BackoffPolicy {
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
        initial: Duration::from_secs(1),
        multiplier: 1.6,
        jitter: 0.2,
        max: Duration::from_secs(120),
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
        }
    }

    /// The delay before the next attempt; grows the following one.
    pub fn next_delay(&mut self) -> Duration {
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
        let mut base = 1.0_f64;
        for _ in 0..30 {
            let d = b.next_delay().as_secs_f64();
            assert!(
                d >= base * 0.8 - 1e-9 && d <= base * 1.2 + 1e-9,
                "{d} vs base {base}"
            );
            base = (base * 1.6).min(120.0);
        }
        // After enough attempts the base is pinned at the cap.
        assert!((base - 120.0).abs() < 1e-9);
    }

    #[test]
    fn reset_returns_to_initial() {
        let mut b = Backoff::default();
        for _ in 0..5 {
            b.next_delay();
        }
        b.reset();
        let d = b.next_delay().as_secs_f64();
        assert!((0.8..=1.2).contains(&d));
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
