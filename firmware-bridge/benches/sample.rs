//! Cost of one sampling tick (`Monitor::tick`: every sensor of a fixture tree read once, plus
//! the governor update), and what that is as a share of one core at a poll period.
//!
//!     cargo bench -p firmware-bridge --bench sample [-- POLL_MS]

use std::path::PathBuf;
use std::time::Instant;

use firmware_bridge::{Controls, Monitor, Policy, Sensors, Thresholds, Watch};

fn main() {
    let poll_ms: f64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1000.0);
    println!(
        "| fixture | sensors | µs per tick (median of 9 × 2000) | share of one core at {poll_ms} ms |"
    );
    println!("|---|--:|--:|--:|");
    for name in ["jetson-orin-nano", "rk3588", "x86-coretemp"] {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name);
        let s = Sensors::probe(&root);
        let count = s.zones.len()
            + s.hwmon_temps.len()
            + 2 * s.rails.len()
            + s.fans.len()
            + s.devfreq.len()
            + s.throttle.len()
            + s.cooling.len();
        let th = Thresholds::from_trips(&s.zones);
        let mut m = Monitor::new(
            s,
            Controls::default(),
            th,
            Policy::default(),
            &Watch::All,
            None,
            Instant::now(),
        )
        .expect("monitor");
        let mut runs: Vec<f64> = (0..9)
            .map(|_| {
                let n = 2000;
                let start = Instant::now();
                for _ in 0..n {
                    std::hint::black_box(m.tick(Instant::now()));
                }
                start.elapsed().as_secs_f64() * 1e6 / f64::from(n)
            })
            .collect();
        runs.sort_by(f64::total_cmp);
        let us = runs[4];
        let share = us / (poll_ms * 1e3) * 100.0;
        println!("| {name} | {count} | {us:.1} | {share:.4} % |");
    }
}
