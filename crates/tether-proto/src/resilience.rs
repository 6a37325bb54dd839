//! Resilience policy, sans-IO: exponential backoff with jitter, and a circuit breaker.
//!
//! Both take time and randomness as inputs (`now`, a seed); the tokio crate sleeps and
//! connects. Semantics: ../shared/DESIGN.md ("Resilience semantics").

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use rand::Rng;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// How retry delays are randomised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Jitter {
    /// The exact formula.
    #[default]
    None,
    /// Uniform in `0..=delay` (AWS "full jitter").
    Full,
    /// `delay/2` plus uniform in `0..=delay/2`.
    Equal,
    /// Uniform in `initial..=previous×3`, capped ("decorrelated jitter").
    Decorrelated,
}

/// Backoff settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackoffConfig {
    /// Delay after the first failed attempt. Default 1 s.
    pub initial: Duration,
    /// Largest delay. Default 30 s.
    pub cap: Duration,
    /// Attempts in all, the first included. Default 3; 0 is refused.
    pub max_attempts: u32,
    /// Randomisation. Default none.
    pub jitter: Jitter,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self { initial: Duration::from_secs(1), cap: Duration::from_secs(30), max_attempts: 3, jitter: Jitter::None }
    }
}

impl BackoffConfig {
    /// Sets the first delay and the cap.
    pub fn delays(mut self, initial: Duration, cap: Duration) -> Self {
        self.initial = initial;
        self.cap = cap;
        self
    }

    /// Sets the number of attempts.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts;
        self
    }

    /// Sets the jitter.
    pub fn jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), ResilienceConfigError> {
        if self.max_attempts == 0 {
            return Err(ResilienceConfigError("max_attempts must be at least 1 (zero attempts would never try)"));
        }
        if self.initial.is_zero() {
            return Err(ResilienceConfigError("backoff initial delay must be positive"));
        }
        if self.cap < self.initial {
            return Err(ResilienceConfigError("backoff cap must not be below the initial delay"));
        }
        Ok(())
    }
}

/// A resilience setting is out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid resilience configuration: {0}")]
pub struct ResilienceConfigError(pub &'static str);

/// Exponential backoff: after failed attempt `n` (1-based), wait
/// `min(initial × 2^(n−1), cap)` (randomised by the jitter) before attempt `n+1`; after the
/// last attempt there is no delay.
#[derive(Debug, Clone)]
pub struct Backoff {
    config: BackoffConfig,
    rng: ChaCha8Rng,
    previous: Duration,
}

impl Backoff {
    /// A backoff whose jitter draws from a generator seeded with `seed`.
    pub fn new(config: BackoffConfig, seed: u64) -> Result<Self, ResilienceConfigError> {
        config.validate()?;
        let previous = config.initial;
        Ok(Self { config, rng: ChaCha8Rng::seed_from_u64(seed), previous })
    }

    /// The settings.
    pub fn config(&self) -> &BackoffConfig {
        &self.config
    }

    /// Attempts in all.
    pub fn max_attempts(&self) -> u32 {
        self.config.max_attempts
    }

    /// The formula's delay after failed attempt `attempt`, without jitter; `None` after the
    /// last attempt (or for attempt 0). Saturates: no overflow at any attempt number.
    pub fn base_delay(&self, attempt: u32) -> Option<Duration> {
        if attempt == 0 || attempt >= self.config.max_attempts {
            return None;
        }
        Some(exponential(self.config.initial, self.config.cap, attempt))
    }

    /// The delay after failed attempt `attempt`, with jitter; `None` after the last attempt.
    pub fn delay(&mut self, attempt: u32) -> Option<Duration> {
        let base = self.base_delay(attempt)?;
        let delay = match self.config.jitter {
            Jitter::None => base,
            Jitter::Full => base.mul_f64(self.rng.gen::<f64>()),
            Jitter::Equal => base / 2 + (base / 2).mul_f64(self.rng.gen::<f64>()),
            Jitter::Decorrelated => {
                let high = self.previous.saturating_mul(3).min(self.config.cap).max(self.config.initial);
                let span = high - self.config.initial;
                (self.config.initial + span.mul_f64(self.rng.gen::<f64>())).min(self.config.cap)
            }
        };
        self.previous = delay.max(self.config.initial);
        Some(delay)
    }

    /// Starts a new sequence of attempts (decorrelated jitter forgets its history).
    pub fn reset(&mut self) {
        self.previous = self.config.initial;
    }
}

/// `min(initial × 2^(attempt−1), cap)` without overflow.
pub fn exponential(initial: Duration, cap: Duration, attempt: u32) -> Duration {
    let factor = 1u32.checked_shl(attempt.saturating_sub(1)).unwrap_or(u32::MAX);
    initial.saturating_mul(factor).min(cap)
}

/// Circuit breaker settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Failures within `window` that open the circuit. Default 5.
    pub failure_threshold: u32,
    /// The sliding window failures are counted in. Default 60 s.
    pub window: Duration,
    /// How long the circuit stays open before probes are let through. Default 30 s.
    pub open_timeout: Duration,
    /// Probes allowed at once while half-open. Default 3.
    pub half_open_probes: u32,
    /// Successful probes that close the circuit. Default 2.
    pub success_threshold: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            window: Duration::from_secs(60),
            open_timeout: Duration::from_secs(30),
            half_open_probes: 3,
            success_threshold: 2,
        }
    }
}

impl BreakerConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<(), ResilienceConfigError> {
        if self.failure_threshold == 0 || self.half_open_probes == 0 || self.success_threshold == 0 {
            return Err(ResilienceConfigError("breaker thresholds and probe count must be at least 1"));
        }
        if self.success_threshold > self.half_open_probes {
            return Err(ResilienceConfigError("success_threshold cannot exceed half_open_probes"));
        }
        if self.window.is_zero() || self.open_timeout.is_zero() {
            return Err(ResilienceConfigError("breaker window and open_timeout must be positive"));
        }
        Ok(())
    }
}

/// The breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CircuitState {
    /// Calls go through; failures are counted.
    Closed,
    /// Calls are refused until `open_timeout` has passed.
    Open,
    /// A bounded number of probe calls go through.
    HalfOpen,
}

impl fmt::Display for CircuitState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half-open",
        })
    }
}

/// How a permitted call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It worked.
    Success,
    /// It failed in a way that says something about the remote side.
    Failure,
    /// Neither: cancelled, or the caller's own mistake. Only frees the permit.
    Ignored,
}

/// The breaker refused a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("circuit {state}: retry after {retry_after:?}")]
pub struct CircuitOpen {
    /// Open, or half-open with every probe slot taken.
    pub state: CircuitState,
    /// When a call may be let through again.
    pub retry_after: Duration,
}

/// Permission for one call. Report its outcome with [`CircuitBreaker::record`]; a permit
/// never reported expires after `open_timeout` and frees its slot then.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Permit {
    id: u64,
    epoch: u64,
}

/// A state change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// From.
    pub from: CircuitState,
    /// To.
    pub to: CircuitState,
    /// When.
    pub at: Instant,
}

/// A circuit breaker, sans-IO.
///
/// Drive it like the other state machines: [`acquire`](Self::acquire) before a call,
/// [`record`](Self::record) its outcome, [`handle_timeout`](Self::handle_timeout) at
/// [`poll_timeout`](Self::poll_timeout), and drain [`poll_event`](Self::poll_event) for
/// transitions. Outcomes of permits granted in an earlier state (a slow call that returns
/// after the circuit opened) only free their slot.
#[derive(Debug)]
pub struct CircuitBreaker {
    config: BreakerConfig,
    state: CircuitState,
    /// Bumped on every transition; permits from older epochs count for nothing.
    epoch: u64,
    failures: VecDeque<Instant>,
    opened_at: Instant,
    probes: HashMap<u64, Instant>,
    probe_successes: u32,
    next_permit: u64,
    events: VecDeque<Transition>,
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig, now: Instant) -> Result<Self, ResilienceConfigError> {
        config.validate()?;
        Ok(Self {
            config,
            state: CircuitState::Closed,
            epoch: 0,
            failures: VecDeque::new(),
            opened_at: now,
            probes: HashMap::new(),
            probe_successes: 0,
            next_permit: 0,
            events: VecDeque::new(),
        })
    }

    /// The current state (as of the last input).
    pub fn state(&self) -> CircuitState {
        self.state
    }

    /// Failures counted in the current window.
    pub fn recent_failures(&self) -> usize {
        self.failures.len()
    }

    /// Probes outstanding while half-open.
    pub fn probes_in_flight(&self) -> usize {
        self.probes.len()
    }

    /// Asks to make a call.
    pub fn acquire(&mut self, now: Instant) -> Result<Permit, CircuitOpen> {
        self.handle_timeout(now);
        match self.state {
            CircuitState::Closed => Ok(self.permit()),
            CircuitState::Open => Err(CircuitOpen {
                state: CircuitState::Open,
                retry_after: (self.opened_at + self.config.open_timeout).saturating_duration_since(now),
            }),
            CircuitState::HalfOpen => {
                if self.probes.len() >= self.config.half_open_probes as usize {
                    let first_free = self.probes.values().min().map_or(now, |at| *at + self.config.open_timeout);
                    return Err(CircuitOpen {
                        state: CircuitState::HalfOpen,
                        retry_after: first_free.saturating_duration_since(now),
                    });
                }
                let permit = self.permit();
                self.probes.insert(permit.id, now);
                Ok(permit)
            }
        }
    }

    /// Reports how a permitted call ended.
    pub fn record(&mut self, now: Instant, permit: Permit, outcome: Outcome) {
        let was_probe = self.probes.remove(&permit.id).is_some();
        if permit.epoch != self.epoch || outcome == Outcome::Ignored {
            return;
        }
        match (self.state, outcome) {
            (CircuitState::Closed, Outcome::Failure) => {
                self.failures.push_back(now);
                self.forget_old_failures(now);
                if self.failures.len() >= self.config.failure_threshold as usize {
                    self.transition(now, CircuitState::Open);
                }
            }
            (CircuitState::HalfOpen, Outcome::Failure) if was_probe => self.transition(now, CircuitState::Open),
            (CircuitState::HalfOpen, Outcome::Success) if was_probe => {
                self.probe_successes += 1;
                if self.probe_successes >= self.config.success_threshold {
                    self.transition(now, CircuitState::Closed);
                }
            }
            _ => {}
        }
    }

    /// Opens after the open timeout into half-open, and expires unreported probes.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.state == CircuitState::Open && now >= self.opened_at + self.config.open_timeout {
            self.transition(now, CircuitState::HalfOpen);
        }
        let timeout = self.config.open_timeout;
        self.probes.retain(|_, at| now < *at + timeout);
        self.forget_old_failures(now);
    }

    /// When `handle_timeout` has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let reopen = (self.state == CircuitState::Open).then(|| self.opened_at + self.config.open_timeout);
        let probe = self.probes.values().min().map(|at| *at + self.config.open_timeout);
        [reopen, probe].into_iter().flatten().min()
    }

    /// The next state change.
    pub fn poll_event(&mut self) -> Option<Transition> {
        self.events.pop_front()
    }

    fn permit(&mut self) -> Permit {
        self.next_permit += 1;
        Permit { id: self.next_permit, epoch: self.epoch }
    }

    fn forget_old_failures(&mut self, now: Instant) {
        while self.failures.front().is_some_and(|at| now.saturating_duration_since(*at) >= self.config.window) {
            self.failures.pop_front();
        }
    }

    fn transition(&mut self, now: Instant, to: CircuitState) {
        let from = self.state;
        self.state = to;
        self.epoch += 1;
        self.failures.clear();
        self.probes.clear();
        self.probe_successes = 0;
        if to == CircuitState::Open {
            self.opened_at = now;
        }
        self.events.push_back(Transition { from, to, at: now });
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods, reason = "tests pick their starting instant")]
mod tests {
    use super::*;

    fn secs(d: Option<Duration>) -> Option<u64> {
        d.map(|d| d.as_secs())
    }

    #[test]
    fn backoff_tables_match_the_formula() {
        let b = Backoff::new(BackoffConfig::default().max_attempts(9), 0).unwrap();
        let table: Vec<_> = (1..=9).map(|n| secs(b.base_delay(n))).collect();
        assert_eq!(table, [Some(1), Some(2), Some(4), Some(8), Some(16), Some(30), Some(30), Some(30), None]);
        let b = Backoff::new(
            BackoffConfig::default().delays(Duration::from_secs(2), Duration::from_secs(30)).max_attempts(6),
            0,
        )
        .unwrap();
        let table: Vec<_> = (1..=6).map(|n| secs(b.base_delay(n))).collect();
        assert_eq!(table, [Some(2), Some(4), Some(8), Some(16), Some(30), None]);
    }

    #[test]
    fn no_delay_after_the_last_attempt() {
        let mut b = Backoff::new(BackoffConfig::default(), 0).unwrap(); // 3 attempts
        assert_eq!(secs(b.delay(1)), Some(1));
        assert_eq!(secs(b.delay(2)), Some(2));
        assert_eq!(b.delay(3), None, "attempt 3 is the last");
        let mut one = Backoff::new(BackoffConfig::default().max_attempts(1), 0).unwrap();
        assert_eq!(one.delay(1), None);
    }

    #[test]
    fn huge_attempt_numbers_saturate() {
        let b = Backoff::new(BackoffConfig::default().max_attempts(u32::MAX), 0).unwrap();
        for n in [31, 32, 33, 63, 64, 65, 1000, u32::MAX - 1] {
            assert_eq!(b.base_delay(n), Some(Duration::from_secs(30)), "attempt {n}");
        }
        let huge = Duration::from_secs(u64::MAX / 2);
        assert_eq!(exponential(huge, Duration::MAX, 64), Duration::MAX);
    }

    #[test]
    fn zero_attempts_is_a_configuration_error() {
        let err = Backoff::new(BackoffConfig::default().max_attempts(0), 0).unwrap_err();
        assert!(err.to_string().contains("max_attempts"), "{err}");
    }

    #[test]
    fn jitter_stays_in_its_bounds_and_is_seeded() {
        for jitter in [Jitter::Full, Jitter::Equal, Jitter::Decorrelated] {
            let config = BackoffConfig::default().max_attempts(20).jitter(jitter);
            let mut a = Backoff::new(config.clone(), 7).unwrap();
            let mut b = Backoff::new(config, 7).unwrap();
            for n in 1..20 {
                let (da, db) = (a.delay(n).unwrap(), b.delay(n).unwrap());
                assert_eq!(da, db, "same seed, same delays");
                let base = a.base_delay(n).unwrap();
                match jitter {
                    Jitter::Full => assert!(da <= base),
                    Jitter::Equal => assert!(da >= base / 2 && da <= base),
                    _ => assert!(da >= Duration::from_secs(1) && da <= Duration::from_secs(30)),
                }
            }
        }
    }

    /// 10,000 clients lose their server at t=0; it is back at t=20 s. Each retries with
    /// backoff (1 s doubling to 30 s) and reconnects at its first attempt after 20 s. Returns
    /// the share of the fleet reconnecting in the busiest second.
    fn busiest_second(jitter: Jitter) -> f64 {
        const CLIENTS: u64 = 10_000;
        let mut per_second: HashMap<u64, u64> = HashMap::new();
        for client in 0..CLIENTS {
            let config = BackoffConfig::default().max_attempts(20).jitter(jitter);
            let mut backoff = Backoff::new(config, client).unwrap();
            let mut t = Duration::ZERO;
            for attempt in 1.. {
                if t >= Duration::from_secs(20) {
                    *per_second.entry(t.as_secs()).or_default() += 1;
                    break;
                }
                t += backoff.delay(attempt).unwrap();
            }
        }
        *per_second.values().max().unwrap() as f64 / CLIENTS as f64
    }

    #[test]
    fn full_jitter_spreads_a_fleet() {
        let none = busiest_second(Jitter::None);
        let full = busiest_second(Jitter::Full);
        println!("busiest second of reconnections: no jitter {:.1}%, full jitter {:.1}%", none * 100.0, full * 100.0);
        assert_eq!(none, 1.0, "without jitter every client retries in the same second");
        assert!(full < 0.15, "busiest second holds {:.1}% of the fleet", full * 100.0);
    }

    fn breaker(now: Instant) -> CircuitBreaker {
        CircuitBreaker::new(BreakerConfig::default(), now).unwrap()
    }

    fn fail(b: &mut CircuitBreaker, now: Instant) {
        let p = b.acquire(now).unwrap();
        b.record(now, p, Outcome::Failure);
    }

    #[test]
    fn opens_at_the_threshold_within_the_window_only() {
        let t0 = Instant::now();
        let mut b = breaker(t0);
        // Four failures, then a fifth just outside the window of the first: still closed.
        for i in 0..4 {
            fail(&mut b, t0 + Duration::from_secs(i * 10));
        }
        fail(&mut b, t0 + Duration::from_secs(60));
        assert_eq!(b.state(), CircuitState::Closed, "the first failure left the window");
        fail(&mut b, t0 + Duration::from_secs(61));
        assert_eq!(b.state(), CircuitState::Open, "five within 60 s");
        assert_eq!(
            b.poll_event(),
            Some(Transition { from: CircuitState::Closed, to: CircuitState::Open, at: t0 + Duration::from_secs(61) })
        );
        let err = b.acquire(t0 + Duration::from_secs(71)).unwrap_err();
        assert_eq!(err, CircuitOpen { state: CircuitState::Open, retry_after: Duration::from_secs(20) });
    }

    #[test]
    fn half_open_after_the_timeout_with_a_bounded_number_of_probes() {
        let t0 = Instant::now();
        let mut b = breaker(t0);
        for _ in 0..5 {
            fail(&mut b, t0);
        }
        assert_eq!(b.poll_timeout(), Some(t0 + Duration::from_secs(30)));
        b.handle_timeout(t0 + Duration::from_secs(30));
        assert_eq!(b.state(), CircuitState::HalfOpen);
        let t = t0 + Duration::from_secs(30);
        let probes: Vec<_> = (0..3).map(|_| b.acquire(t).unwrap()).collect();
        let refused = b.acquire(t).unwrap_err();
        assert_eq!(refused.state, CircuitState::HalfOpen);
        // A cancelled probe frees its slot.
        b.record(t, probes[0], Outcome::Ignored);
        let again = b.acquire(t).unwrap();
        assert_eq!(b.probes_in_flight(), 3);
        // Two successes close it.
        b.record(t, probes[1], Outcome::Success);
        assert_eq!(b.state(), CircuitState::HalfOpen);
        b.record(t, probes[2], Outcome::Success);
        assert_eq!(b.state(), CircuitState::Closed);
        // The last probe's late failure belongs to the half-open episode: it counts for nothing.
        b.record(t, again, Outcome::Failure);
        assert_eq!((b.state(), b.recent_failures()), (CircuitState::Closed, 0));
    }

    #[test]
    fn a_failure_in_half_open_reopens() {
        let t0 = Instant::now();
        let mut b = breaker(t0);
        for _ in 0..5 {
            fail(&mut b, t0);
        }
        let t = t0 + Duration::from_secs(30);
        let p = b.acquire(t).unwrap();
        assert_eq!(b.state(), CircuitState::HalfOpen);
        b.record(t, p, Outcome::Failure);
        assert_eq!(b.state(), CircuitState::Open);
        assert_eq!(b.acquire(t).unwrap_err().retry_after, Duration::from_secs(30));
        let changes: Vec<_> = std::iter::from_fn(|| b.poll_event()).map(|t| (t.from, t.to)).collect();
        assert_eq!(
            changes,
            [
                (CircuitState::Closed, CircuitState::Open),
                (CircuitState::Open, CircuitState::HalfOpen),
                (CircuitState::HalfOpen, CircuitState::Open)
            ]
        );
    }

    #[test]
    fn an_abandoned_probe_cannot_hold_its_slot_forever() {
        let t0 = Instant::now();
        let mut b = breaker(t0);
        for _ in 0..5 {
            fail(&mut b, t0);
        }
        let t = t0 + Duration::from_secs(30);
        for _ in 0..3 {
            let _leaked = b.acquire(t).unwrap(); // never reported
        }
        assert!(b.acquire(t).is_err());
        assert_eq!(b.poll_timeout(), Some(t + Duration::from_secs(30)));
        b.handle_timeout(t + Duration::from_secs(30));
        assert!(b.acquire(t + Duration::from_secs(30)).is_ok(), "expired probes freed their slots");
    }

    #[test]
    fn ignored_outcomes_never_count() {
        let t0 = Instant::now();
        let mut b = breaker(t0);
        for _ in 0..100 {
            let p = b.acquire(t0).unwrap();
            b.record(t0, p, Outcome::Ignored);
        }
        assert_eq!((b.state(), b.recent_failures()), (CircuitState::Closed, 0));
    }
}
