//! The governor: temperatures in, a thermal state and the limits that go with it out.
//! I/O-free and allocation-free, so it is tested with made-up temperatures and clocks.
//!
//! Up is immediate (heat is the danger); down needs the temperature to fall below the
//! threshold by the hysteresis and the state to have lasted the minimum dwell, so a
//! temperature oscillating around a threshold does not flap.

use std::time::{Duration, Instant};

use crate::sensors::{Trip, TripKind, Zone};

/// How hot the accelerator is, in the scheduler's terms.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThermalState {
    /// Full speed.
    #[default]
    Nominal,
    /// Decode rate capped.
    Warm,
    /// No new work; running answers finish.
    Hot,
    /// Running answers end now.
    Critical,
}

impl ThermalState {
    /// Lowercase name, as on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ThermalState::Nominal => "nominal",
            ThermalState::Warm => "warm",
            ThermalState::Hot => "hot",
            ThermalState::Critical => "critical",
        }
    }
}

/// Where the states begin, m°C.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    /// Warm from here.
    pub warm_mc: i64,
    /// Hot from here.
    pub hot_mc: i64,
    /// Critical from here.
    pub critical_mc: i64,
    /// How far below a threshold the temperature must fall to leave its state.
    pub hysteresis_mc: i64,
    /// Least time in a state before stepping down.
    pub dwell: Duration,
}

impl Thresholds {
    /// Defaults from the zones' own trip points: hot at the lowest passive trip (where the
    /// kernel would start throttling on its own), warm 10 °C below it, critical 5 °C below the
    /// lowest critical trip (where the kernel shuts down); 85/95/105 °C without trips.
    pub fn from_trips(zones: &[Zone]) -> Thresholds {
        let lowest = |kind: TripKind| {
            zones
                .iter()
                .flat_map(|z| z.trips.iter())
                .filter(|t: &&Trip| t.kind == kind)
                .map(|t| t.temp_mc)
                .min()
        };
        let critical = lowest(TripKind::Critical).map_or(105_000, |c| c - 5_000);
        let hot = lowest(TripKind::Passive)
            .or(lowest(TripKind::Hot))
            .map_or(95_000, |p| p)
            .min(critical - 1_000);
        Thresholds {
            warm_mc: hot - 10_000,
            hot_mc: hot,
            critical_mc: critical,
            hysteresis_mc: 3_000,
            dwell: Duration::from_secs(10),
        }
    }

    fn entry(&self, s: ThermalState) -> i64 {
        match s {
            ThermalState::Nominal => i64::MIN,
            ThermalState::Warm => self.warm_mc,
            ThermalState::Hot => self.hot_mc,
            ThermalState::Critical => self.critical_mc,
        }
    }

    /// The state a temperature falls in, ignoring history.
    pub fn classify(&self, mc: i64) -> ThermalState {
        if mc >= self.critical_mc {
            ThermalState::Critical
        } else if mc >= self.hot_mc {
            ThermalState::Hot
        } else if mc >= self.warm_mc {
            ThermalState::Warm
        } else {
            ThermalState::Nominal
        }
    }
}

/// What the scheduler may do in a state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Most decode tokens per second per answer (`None`: no cap).
    pub decode_tok_s: Option<f32>,
    /// Most answers generated at once.
    pub max_running: usize,
    /// New requests are taken.
    pub accept: bool,
    /// Running answers are ended now.
    pub stop_running: bool,
}

/// Per-state limits, from config.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// Decode cap when warm.
    pub warm_decode_tok_s: f32,
    /// Answers at once when warm.
    pub warm_max_running: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            warm_decode_tok_s: 10.0,
            warm_max_running: 1,
        }
    }
}

impl Policy {
    /// The limits of `state`.
    pub fn limits(&self, state: ThermalState) -> Limits {
        match state {
            ThermalState::Nominal => Limits {
                decode_tok_s: None,
                max_running: usize::MAX,
                accept: true,
                stop_running: false,
            },
            ThermalState::Warm => Limits {
                decode_tok_s: Some(self.warm_decode_tok_s),
                max_running: self.warm_max_running,
                accept: true,
                stop_running: false,
            },
            ThermalState::Hot => Limits {
                decode_tok_s: Some(self.warm_decode_tok_s),
                max_running: self.warm_max_running,
                accept: false,
                stop_running: false,
            },
            ThermalState::Critical => Limits {
                decode_tok_s: Some(0.0),
                max_running: 0,
                accept: false,
                stop_running: true,
            },
        }
    }
}

/// Samples kept for the record (telemetry, `fieldllmd thermal`).
pub const HISTORY: usize = 64;

/// The state machine.
#[derive(Debug, Clone)]
pub struct Governor {
    thresholds: Thresholds,
    state: ThermalState,
    since: Instant,
    history: heapless::Deque<i64, HISTORY>,
}

impl Governor {
    /// Starts nominal at `now`.
    pub fn new(thresholds: Thresholds, now: Instant) -> Governor {
        Governor {
            thresholds,
            state: ThermalState::Nominal,
            since: now,
            history: heapless::Deque::new(),
        }
    }

    /// The thresholds in use.
    pub fn thresholds(&self) -> &Thresholds {
        &self.thresholds
    }

    /// The current state.
    pub fn state(&self) -> ThermalState {
        self.state
    }

    /// Recent hottest temperatures, oldest first, m°C.
    pub fn history(&self) -> impl Iterator<Item = &i64> {
        self.history.iter()
    }

    /// Takes one sample's hottest temperature (`None`: nothing could be read, the state
    /// holds); returns the state, and whether it changed.
    pub fn update(&mut self, hottest_mc: Option<i64>, now: Instant) -> (ThermalState, bool) {
        let Some(mc) = hottest_mc else {
            return (self.state, false);
        };
        if self.history.is_full() {
            self.history.pop_front();
        }
        let _ = self.history.push_back(mc);
        let th = &self.thresholds;
        let target = th.classify(mc);
        let next = if target > self.state {
            target
        } else if target < self.state
            && now.duration_since(self.since) >= th.dwell
            && mc < th.entry(self.state) - th.hysteresis_mc
        {
            // one step down at a time, each with its own dwell
            match self.state {
                ThermalState::Critical => ThermalState::Hot,
                ThermalState::Hot => ThermalState::Warm,
                _ => ThermalState::Nominal,
            }
            .max(target)
        } else {
            self.state
        };
        let changed = next != self.state;
        if changed {
            self.state = next;
            self.since = now;
        }
        (self.state, changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn th() -> Thresholds {
        Thresholds {
            warm_mc: 70_000,
            hot_mc: 80_000,
            critical_mc: 90_000,
            hysteresis_mc: 3_000,
            dwell: Duration::from_secs(5),
        }
    }

    #[test]
    fn heat_goes_up_at_once_and_down_step_by_step_after_dwell() {
        let t0 = Instant::now();
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        let mut g = Governor::new(th(), t0);
        assert_eq!(g.update(Some(50_000), s(0)), (ThermalState::Nominal, false));
        assert_eq!(g.update(Some(95_000), s(1)), (ThermalState::Critical, true));
        // cool at once: still critical until the dwell has passed
        assert_eq!(g.update(Some(40_000), s(2)).0, ThermalState::Critical);
        assert_eq!(g.update(Some(40_000), s(6)), (ThermalState::Hot, true));
        assert_eq!(g.update(Some(40_000), s(8)).0, ThermalState::Hot);
        assert_eq!(g.update(Some(40_000), s(11)), (ThermalState::Warm, true));
        assert_eq!(g.update(Some(40_000), s(16)), (ThermalState::Nominal, true));
        // a failed read holds the state
        assert_eq!(g.update(None, s(30)), (ThermalState::Nominal, false));
    }

    #[test]
    fn a_temperature_oscillating_around_a_threshold_does_not_flap() {
        let t0 = Instant::now();
        let mut g = Governor::new(th(), t0);
        let mut changes = 0;
        for i in 0..600u64 {
            // 78.5 to 81.5 °C around the 80 °C hot threshold, one sample a second
            let mc = 80_000 + if i % 2 == 0 { 1_500 } else { -1_500 };
            if g.update(Some(mc), t0 + Duration::from_secs(i)).1 {
                changes += 1;
            }
        }
        assert_eq!(
            changes, 1,
            "entered hot once and stayed: within the hysteresis"
        );
        assert_eq!(g.state(), ThermalState::Hot);
        assert_eq!(g.history().count(), HISTORY);
    }

    #[test]
    fn thresholds_default_from_trip_points() {
        let zone = |trips: Vec<Trip>| Zone::for_tests("z", trips);
        let t = Thresholds::from_trips(&[zone(vec![
            Trip {
                kind: TripKind::Passive,
                temp_mc: 85_000,
                hyst_mc: 2_000,
            },
            Trip {
                kind: TripKind::Critical,
                temp_mc: 115_000,
                hyst_mc: 2_000,
            },
        ])]);
        assert_eq!(
            (t.warm_mc, t.hot_mc, t.critical_mc),
            (75_000, 85_000, 110_000)
        );
        let t = Thresholds::from_trips(&[]);
        assert_eq!(
            (t.warm_mc, t.hot_mc, t.critical_mc),
            (85_000, 95_000, 105_000)
        );
    }

    #[test]
    fn limits_per_state() {
        let p = Policy::default();
        assert!(p.limits(ThermalState::Nominal).accept);
        assert_eq!(p.limits(ThermalState::Warm).decode_tok_s, Some(10.0));
        assert!(!p.limits(ThermalState::Hot).accept && !p.limits(ThermalState::Hot).stop_running);
        assert!(p.limits(ThermalState::Critical).stop_running);
    }
}
