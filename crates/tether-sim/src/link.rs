//! Link impairments.

use std::time::Duration;

use rand::Rng;

/// How a link loses datagrams.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Loss {
    /// Nothing is lost.
    None,
    /// Each datagram is lost independently with this probability.
    Random(f64),
    /// Gilbert–Elliott bursts: a two-state chain (good, bad) with a loss rate in each.
    Bursty {
        /// Probability per datagram of moving from good to bad.
        enter_bad: f64,
        /// Probability per datagram of moving from bad to good.
        leave_bad: f64,
        /// Loss rate in the good state.
        loss_good: f64,
        /// Loss rate in the bad state.
        loss_bad: f64,
    },
}

impl Loss {
    /// A bursty profile losing about `average` of datagrams in bursts of about
    /// `mean_burst` datagrams.
    pub fn bursty(average: f64, mean_burst: f64) -> Self {
        let leave_bad = 1.0 / mean_burst.max(1.0);
        // Stationary share of the bad state = enter / (enter + leave) = average.
        let enter_bad = average * leave_bad / (1.0 - average).max(f64::EPSILON);
        Loss::Bursty { enter_bad, leave_bad, loss_good: 0.0, loss_bad: 1.0 }
    }

    /// A short label for tables.
    pub fn label(&self) -> String {
        match self {
            Loss::None => "0%".into(),
            Loss::Random(p) => format!("{:.0}%", p * 100.0),
            Loss::Bursty { enter_bad, leave_bad, loss_bad, .. } => {
                let share = enter_bad / (enter_bad + leave_bad) * loss_bad;
                format!("bursty ~{:.0}% (bursts of ~{:.0})", share * 100.0, 1.0 / leave_bad)
            }
        }
    }
}

/// The impairments of one direction of a link.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkConfig {
    /// One-way delay. Default 10 ms.
    pub latency: Duration,
    /// Extra delay drawn uniformly from 0..jitter. Default 0.
    pub jitter: Duration,
    /// Loss model. Default none.
    pub loss: Loss,
    /// Probability a datagram is delivered twice. Default 0.
    pub duplicate: f64,
    /// Probability a datagram is held back by `reorder_delay`, so later ones overtake it.
    pub reorder: f64,
    /// How long a reordered datagram is held back. Default 30 ms.
    pub reorder_delay: Duration,
    /// Datagrams larger than this are dropped. Default 1500.
    pub mtu: usize,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self {
            latency: Duration::from_millis(10),
            jitter: Duration::ZERO,
            loss: Loss::None,
            duplicate: 0.0,
            reorder: 0.0,
            reorder_delay: Duration::from_millis(30),
            mtu: 1500,
        }
    }
}

impl LinkConfig {
    /// Sets the loss model.
    pub fn loss(mut self, loss: Loss) -> Self {
        self.loss = loss;
        self
    }

    /// Sets the latency and jitter.
    pub fn latency(mut self, latency: Duration, jitter: Duration) -> Self {
        self.latency = latency;
        self.jitter = jitter;
        self
    }

    /// Sets duplication and reordering probabilities.
    pub fn chaos(mut self, duplicate: f64, reorder: f64) -> Self {
        self.duplicate = duplicate;
        self.reorder = reorder;
        self
    }

    /// Sets the MTU.
    pub fn mtu(mut self, mtu: usize) -> Self {
        self.mtu = mtu;
        self
    }
}

/// A link direction's configuration and burst state.
#[derive(Debug, Clone)]
pub(crate) struct Link {
    pub(crate) config: LinkConfig,
    bad: bool,
}

/// What happens to one datagram.
pub(crate) enum Fate {
    Lost,
    TooBig,
    Delivered { delays: Vec<Duration>, reordered: bool },
}

impl Link {
    pub(crate) fn new(config: LinkConfig) -> Self {
        Self { config, bad: false }
    }

    pub(crate) fn fate(&mut self, len: usize, rng: &mut impl Rng) -> Fate {
        if len > self.config.mtu {
            return Fate::TooBig;
        }
        let lost = match self.config.loss {
            Loss::None => false,
            Loss::Random(p) => rng.gen_bool(p.clamp(0.0, 1.0)),
            Loss::Bursty { enter_bad, leave_bad, loss_good, loss_bad } => {
                let flip = if self.bad { leave_bad } else { enter_bad };
                if rng.gen_bool(flip.clamp(0.0, 1.0)) {
                    self.bad = !self.bad;
                }
                rng.gen_bool(if self.bad { loss_bad } else { loss_good }.clamp(0.0, 1.0))
            }
        };
        if lost {
            return Fate::Lost;
        }
        let copies = if rng.gen_bool(self.config.duplicate.clamp(0.0, 1.0)) { 2 } else { 1 };
        let mut reordered = false;
        let delays = (0..copies)
            .map(|_| {
                let mut delay = self.config.latency;
                if !self.config.jitter.is_zero() {
                    delay += self.config.jitter.mul_f64(rng.gen::<f64>());
                }
                if rng.gen_bool(self.config.reorder.clamp(0.0, 1.0)) {
                    delay += self.config.reorder_delay;
                    reordered = true;
                }
                delay
            })
            .collect();
        Fate::Delivered { delays, reordered }
    }
}
