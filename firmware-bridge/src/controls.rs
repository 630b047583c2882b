//! The controls the bridge may write, and only those the configuration names: a devfreq
//! device's `governor` and `max_freq`, and the Jetson power mode. A thermal zone's `mode` is
//! never touched (disabling a zone would take the kernel's own protection away). Every write
//! is logged; the values found at start are put back when the state returns to nominal and
//! when the controls are dropped.

use std::path::{Path, PathBuf};

use crate::governor::ThermalState;
use crate::nvpmodel::{self, PowerMode};
use crate::read;
use crate::sensors::Sensors;

/// A value per thermal state above nominal; a state without one takes the nearest cooler
/// state's, and nominal always means "as found at start".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PerState<T> {
    /// When warm.
    pub warm: Option<T>,
    /// When hot.
    pub hot: Option<T>,
    /// When critical.
    pub critical: Option<T>,
}

impl<T: Copy> PerState<T> {
    /// The value for `state` (`None`: the value found at start).
    pub fn at(&self, state: ThermalState) -> Option<T> {
        match state {
            ThermalState::Nominal => None,
            ThermalState::Warm => self.warm,
            ThermalState::Hot => self.hot.or(self.warm),
            ThermalState::Critical => self.critical.or(self.hot).or(self.warm),
        }
    }

    fn values(&self) -> impl Iterator<Item = T> {
        [self.warm, self.hot, self.critical].into_iter().flatten()
    }

    /// Whether any state has a value.
    pub fn is_empty(&self) -> bool {
        self.values().next().is_none()
    }
}

/// What to do with one devfreq device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DevfreqPlan {
    /// Its directory name under `/sys/class/devfreq` (`17000000.gpu`, `fdab0000.npu`).
    pub device: String,
    /// Governor written at start (and the old one put back at the end).
    pub governor: Option<String>,
    /// `max_freq` per state, Hz.
    pub max_hz: PerState<i64>,
}

/// Jetson power modes per state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NvpmodelPlan {
    /// The `nvpmodel` binary.
    pub bin: PathBuf,
    /// Mode number per state.
    pub modes: PerState<u32>,
}

/// Every control the configuration names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Devfreq devices.
    pub devfreq: Vec<DevfreqPlan>,
    /// The power mode.
    pub nvpmodel: Option<NvpmodelPlan>,
}

/// Why the controls cannot be bound.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The named devfreq device is not there.
    #[error("devfreq device {device:?} not found (found: {found})")]
    NoDevice {
        /// The name asked for.
        device: String,
        /// Those there are.
        found: String,
    },
    /// A frequency the device does not offer.
    #[error("{device}: {hz} Hz is not one of its available frequencies ({available})")]
    BadFrequency {
        /// The device.
        device: String,
        /// The frequency asked for.
        hz: i64,
        /// Those it offers.
        available: String,
    },
    /// `nvpmodel -q` did not answer.
    #[error("{0}: cannot query the power mode (is nvpmodel installed?)")]
    NoNvpmodel(PathBuf),
}

#[derive(Debug)]
struct BoundDevfreq {
    plan: DevfreqPlan,
    dir: PathBuf,
    found_max: Option<i64>,
    found_governor: Option<String>,
    max: Option<i64>,
}

#[derive(Debug)]
struct BoundNvpmodel {
    bin: PathBuf,
    modes: PerState<u32>,
    found: PowerMode,
    current: PowerMode,
}

/// The bound controls.
#[derive(Debug, Default)]
pub struct Controls {
    devfreq: Vec<BoundDevfreq>,
    nvpmodel: Option<BoundNvpmodel>,
}

fn write(path: &Path, value: &str, why: &str) -> bool {
    let old = read::text(path).map(|s| s.to_string()).unwrap_or_default();
    match std::fs::write(path, value) {
        Ok(()) => {
            tracing::info!(path = %path.display(), %old, new = value, why, "control written");
            true
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), %old, new = value, why, error = %e, "control write failed");
            false
        }
    }
}

impl Controls {
    /// Checks `plan` against what `sensors` found and remembers the values there now.
    pub fn bind(sensors: &Sensors, plan: &Plan) -> Result<Controls, ControlError> {
        let mut devfreq = Vec::new();
        for p in &plan.devfreq {
            let Some(d) = sensors.devfreq.iter().find(|d| d.name == p.device) else {
                return Err(ControlError::NoDevice {
                    device: p.device.clone(),
                    found: sensors
                        .devfreq
                        .iter()
                        .map(|d| d.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            };
            if !d.available.is_empty()
                && let Some(hz) = p.max_hz.values().find(|hz| !d.available.contains(hz))
            {
                return Err(ControlError::BadFrequency {
                    device: p.device.clone(),
                    hz,
                    available: d
                        .available
                        .iter()
                        .map(i64::to_string)
                        .collect::<Vec<_>>()
                        .join(" "),
                });
            }
            let found_max = read::int(&d.dir.join("max_freq")).value();
            devfreq.push(BoundDevfreq {
                plan: p.clone(),
                dir: d.dir.clone(),
                found_max,
                found_governor: read::text(&d.dir.join("governor"))
                    .ok()
                    .map(|s| s.to_string()),
                max: found_max,
            });
        }
        let nvpmodel = match &plan.nvpmodel {
            Some(p) => {
                let found = nvpmodel::query(&p.bin)
                    .ok_or_else(|| ControlError::NoNvpmodel(p.bin.clone()))?;
                Some(BoundNvpmodel {
                    bin: p.bin.clone(),
                    modes: p.modes,
                    current: found.clone(),
                    found,
                })
            }
            None => None,
        };
        Ok(Controls { devfreq, nvpmodel })
    }

    /// Whether there is anything to write.
    pub fn is_empty(&self) -> bool {
        self.devfreq.is_empty() && self.nvpmodel.is_none()
    }

    /// Writes the configured governors (once, at start).
    pub fn start(&mut self) {
        for d in &self.devfreq {
            if let Some(g) = &d.plan.governor {
                write(&d.dir.join("governor"), g, "configured governor");
            }
        }
    }

    /// Writes what `state` asks for, where it differs from what was last written.
    pub fn apply(&mut self, state: ThermalState) {
        let why = state.as_str();
        for d in &mut self.devfreq {
            let want = d.plan.max_hz.at(state).or(d.found_max);
            if let Some(hz) = want
                && d.max != Some(hz)
                && write(&d.dir.join("max_freq"), &hz.to_string(), why)
            {
                d.max = Some(hz);
            }
        }
        if let Some(n) = &mut self.nvpmodel {
            let want = n.modes.at(state).unwrap_or(n.found.id);
            if want != n.current.id {
                match nvpmodel::set(&n.bin, want) {
                    Ok(()) => {
                        // asked back once, for its name; not per tick (a process spawn)
                        let now = nvpmodel::query(&n.bin).unwrap_or(PowerMode {
                            name: format!("mode {want}"),
                            id: want,
                        });
                        tracing::info!(bin = %n.bin.display(), old = %n.current.name, new = %now.name, why, "power mode set");
                        n.current = now;
                    }
                    Err(e) => tracing::warn!(error = %e, why, "power mode not set"),
                }
            }
        }
    }

    /// Puts back what was found at start.
    pub fn restore(&mut self) {
        self.apply(ThermalState::Nominal);
        for d in &mut self.devfreq {
            if let (Some(_), Some(old)) = (&d.plan.governor, d.found_governor.take()) {
                write(&d.dir.join("governor"), &old, "restoring");
            }
        }
    }

    /// The power mode last set or found (`None` without an nvpmodel control).
    pub fn power_mode(&self) -> Option<&PowerMode> {
        self.nvpmodel.as_ref().map(|n| &n.current)
    }
}

impl Drop for Controls {
    fn drop(&mut self) {
        self.restore();
    }
}
