//! Accelerator telemetry and power/thermal policy for fieldllm (DESIGN.md section 6).
//!
//! `Sensors::probe` finds what a sysfs root offers (generic thermal/hwmon/devfreq, Jetson's
//! INA3221 rails and over-current counters, RK3588's NPU devfreq); `Sensors::sample` reads it
//! without allocating; the `Governor` turns the hottest reading into a `ThermalState` and
//! `Limits` for the scheduler; `Controls` writes the devfreq and power-mode settings the
//! configuration names; `Monitor` ties them into one tick. Nothing here knows of MQTT, serial or the engine.

pub mod controls;
pub mod governor;
pub mod monitor;
pub mod nvpmodel;
pub mod read;
pub mod sensors;

pub use controls::{ControlError, Controls, DevfreqPlan, NvpmodelPlan, PerState, Plan};
pub use governor::{Governor, Limits, Policy, ThermalState, Thresholds};
pub use monitor::{Monitor, MonitorError, Tick, Watch};
pub use nvpmodel::PowerMode;
pub use read::{Reading, Why};
pub use sensors::{Board, Sensors, Telemetry};
