//! Accelerator telemetry and power/thermal policy for fieldllm (DESIGN.md section 6).
//!
//! `Sensors::probe` finds what a sysfs root offers (generic thermal/hwmon/devfreq, Jetson's
//! INA3221 rails and over-current counters, RK3588's NPU devfreq); `Sensors::sample` reads it
//! without allocating; the `Governor` turns the hottest reading into a `ThermalState` and
//! `Limits` for the scheduler. Nothing here knows of MQTT, serial or the engine.

pub mod governor;
pub mod read;
pub mod sensors;

pub use governor::{Governor, Limits, Policy, ThermalState, Thresholds};
pub use read::{Reading, Why};
pub use sensors::{Board, Sensors, Telemetry};
