//! One sampling tick: read every sensor, update the governor, write the controls when the
//! state changed. Steady-state ticks allocate nothing; a state change logs and writes.

use std::path::PathBuf;
use std::time::Instant;

use crate::controls::Controls;
use crate::governor::{Governor, Limits, Policy, ThermalState, Thresholds};
use crate::nvpmodel::{self, PowerMode};
use crate::sensors::{Board, Sensors, Telemetry};

/// Which temperatures the governor watches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Watch {
    /// The hottest of every zone and hwmon temperature.
    #[default]
    All,
    /// Only these zones (by `type`), for boards with a hot sensor that is not the accelerator's.
    Zones(Vec<String>),
}

/// Why a `Monitor` cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    /// A zone named in `Watch::Zones` is not there.
    #[error("thermal zone {zone:?} not found (found: {found})")]
    NoZone {
        /// The name asked for.
        zone: String,
        /// Those there are.
        found: String,
    },
}

/// The result of one tick.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tick {
    /// The state after this tick.
    pub state: ThermalState,
    /// Whether this tick changed it.
    pub changed: bool,
    /// The temperature the governor judged, m°C.
    pub watched_mc: Option<i64>,
}

/// Sensors, governor and controls together.
#[derive(Debug)]
pub struct Monitor {
    sensors: Sensors,
    controls: Controls,
    governor: Governor,
    policy: Policy,
    telemetry: Telemetry,
    watched: Option<Vec<usize>>,
    /// The mode `nvpmodel -q` gave at start, when no nvpmodel control keeps it current.
    queried_mode: Option<PowerMode>,
}

impl Monitor {
    /// Builds it; on a Jetson without an nvpmodel control, asks `nvpmodel_bin` for the power
    /// mode once (when it is installed).
    pub fn new(
        sensors: Sensors,
        mut controls: Controls,
        thresholds: Thresholds,
        policy: Policy,
        watch: &Watch,
        nvpmodel_bin: Option<PathBuf>,
        now: Instant,
    ) -> Result<Monitor, MonitorError> {
        let watched = match watch {
            Watch::All => None,
            Watch::Zones(names) => Some(
                names
                    .iter()
                    .map(|n| {
                        sensors
                            .zones
                            .iter()
                            .position(|z| &z.name == n)
                            .ok_or_else(|| MonitorError::NoZone {
                                zone: n.clone(),
                                found: sensors
                                    .zones
                                    .iter()
                                    .map(|z| z.name.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", "),
                            })
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        let queried_mode = match controls.power_mode() {
            None if sensors.board == Board::Jetson => {
                nvpmodel_bin.and_then(|b| nvpmodel::query(&b))
            }
            _ => None,
        };
        controls.start();
        Ok(Monitor {
            sensors,
            controls,
            governor: Governor::new(thresholds, now),
            policy,
            telemetry: Telemetry::default(),
            watched,
            queried_mode,
        })
    }

    /// Samples, judges, and writes the controls on a change.
    pub fn tick(&mut self, now: Instant) -> Tick {
        self.sensors.sample(&mut self.telemetry);
        let watched_mc = match &self.watched {
            None => self.telemetry.hottest_mc(),
            Some(ix) => ix
                .iter()
                .filter_map(|&i| self.telemetry.zones.get(i).and_then(|r| r.value()))
                .max(),
        };
        let (state, changed) = self.governor.update(watched_mc, now);
        if changed {
            self.controls.apply(state);
        }
        Tick {
            state,
            changed,
            watched_mc,
        }
    }

    /// What was found.
    pub fn sensors(&self) -> &Sensors {
        &self.sensors
    }

    /// The last sample.
    pub fn telemetry(&self) -> &Telemetry {
        &self.telemetry
    }

    /// The governor (state, thresholds, history).
    pub fn governor(&self) -> &Governor {
        &self.governor
    }

    /// The limits of the current state.
    pub fn limits(&self) -> Limits {
        self.policy.limits(self.governor.state())
    }

    /// The Jetson power mode, when known.
    pub fn power_mode(&self) -> Option<&PowerMode> {
        self.controls.power_mode().or(self.queried_mode.as_ref())
    }

    /// Puts the controls back as found (also done on drop).
    pub fn restore(&mut self) {
        self.controls.restore();
    }
}
