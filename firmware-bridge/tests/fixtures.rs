//! Every backend reads its fixture tree (laid out as on the board) correctly, and sampling
//! allocates nothing.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion
#![allow(unsafe_code)] // the counting allocator below: GlobalAlloc is an unsafe trait

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::PathBuf;

use firmware_bridge::{
    Board, Controls, Monitor, Policy, Reading, Sensors, Telemetry, Thresholds, Watch, Why,
};

struct Counting;
thread_local! {
    // per thread: the tests of this file run in parallel
    static ALLOCS: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator; only counts
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as the caller's
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as the caller's
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static A: Counting = Counting;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

#[test]
fn jetson_orin_nano() {
    let s = Sensors::probe(&fixture("jetson-orin-nano"));
    assert_eq!(s.board, Board::Jetson);
    let names: Vec<&str> = s.zones.iter().map(|z| z.name.as_str()).collect();
    assert!(
        names.contains(&"cpu-thermal")
            && names.contains(&"gpu-thermal")
            && names.contains(&"soc0-thermal")
    );
    let rails: Vec<&str> = s.rails.iter().map(|r| r.label.as_str()).collect();
    assert_eq!(
        rails,
        ["VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"],
        "the sum channel is skipped"
    );
    assert_eq!(s.devfreq[0].name, "17000000.gpu");
    assert_eq!(s.devfreq[0].available.last(), Some(&624_750_000));
    let mut t = Telemetry::default();
    s.sample(&mut t);
    assert_eq!(t.hottest_mc(), Some(48_250));
    assert_eq!(t.rails[0].mw(), Some(5072 * 1416 / 1000), "VDD_IN: mV x mA");
    assert_eq!(t.power_mw(), Some(7181));
    assert_eq!(t.freqs[0], Reading::Value(624_750_000));
    assert_eq!(t.fans[0], Reading::Value(2734));
    let oc: Vec<_> = t.throttle.iter().map(|r| r.value().unwrap()).collect();
    assert_eq!(oc, [0, 3, 0]);
    assert_eq!(t.throttle_events(), 3);
    assert_eq!(s.cooling[0].name, "pwm-fan");
    assert_eq!(
        (t.cooling[0], s.cooling[0].max_state),
        (Reading::Value(2), 10)
    );
    let th = Thresholds::from_trips(&s.zones);
    assert_eq!((th.hot_mc, th.critical_mc), (95_500, 100_000));
}

#[test]
fn rk3588() {
    let s = Sensors::probe(&fixture("rk3588"));
    assert_eq!(s.board, Board::Rk3588);
    let npu = s
        .devfreq
        .iter()
        .position(|d| d.name == "fdab0000.npu")
        .unwrap();
    assert_eq!(s.devfreq[npu].available.len(), 8);
    let mut t = Telemetry::default();
    s.sample(&mut t);
    assert_eq!(t.freqs[npu], Reading::Value(1_000_000_000));
    assert_eq!(t.hottest_mc(), Some(42_592));
    assert!(t.rails.is_empty());
    assert_eq!(s.cooling[0].name, "pwm-fan");
    assert_eq!(t.cooling[0], Reading::Value(0));
    let th = Thresholds::from_trips(&s.zones);
    assert_eq!(
        (th.warm_mc, th.hot_mc, th.critical_mc),
        (65_000, 75_000, 110_000)
    );
}

#[test]
fn plain_x86_with_coretemp() {
    let s = Sensors::probe(&fixture("x86-coretemp"));
    assert_eq!(s.board, Board::Generic);
    assert!(s.hwmon_temps.iter().any(|c| c.label == "Package id 0"));
    // the 0 °C trip of x86_pkg_temp is not a threshold
    assert!(
        s.zones
            .iter()
            .all(|z| z.trips.iter().all(|t| t.temp_mc > 0))
    );
    let mut t = Telemetry::default();
    s.sample(&mut t);
    assert_eq!(t.hottest_mc(), Some(52_000));
    assert_eq!(t.fans.len(), 1);
    assert_eq!(
        (s.cooling[0].name.as_str(), s.cooling[0].max_state),
        ("Processor", 3)
    );
    assert!(s.describe().contains("x86_pkg_temp"));
}

#[test]
fn a_vanished_or_garbage_file_is_unavailable_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let z = dir.path().join("sys/class/thermal/thermal_zone0");
    std::fs::create_dir_all(&z).unwrap();
    std::fs::write(z.join("type"), "soc-thermal\n").unwrap();
    std::fs::write(z.join("temp"), "51000\n").unwrap();
    let s = Sensors::probe(dir.path());
    let mut t = Telemetry::default();
    s.sample(&mut t);
    assert_eq!(t.zones[0], Reading::Value(51_000));
    std::fs::write(z.join("temp"), "").unwrap();
    s.sample(&mut t);
    assert_eq!(t.zones[0], Reading::Unavailable(Why::Empty));
    std::fs::write(z.join("temp"), "n/a").unwrap();
    s.sample(&mut t);
    assert_eq!(t.zones[0], Reading::Unavailable(Why::Garbage));
    std::fs::remove_dir_all(&z).unwrap();
    s.sample(&mut t);
    assert_eq!(t.zones[0], Reading::Unavailable(Why::Missing));
    assert_eq!(t.hottest_mc(), None);
}

#[test]
fn sampling_allocates_nothing() {
    let s = Sensors::probe(&fixture("jetson-orin-nano"));
    let mut t = Telemetry::default();
    s.sample(&mut t);
    let before = ALLOCS.with(Cell::get);
    for _ in 0..100 {
        s.sample(&mut t);
    }
    let after = ALLOCS.with(Cell::get);
    assert_eq!(after - before, 0, "allocations in 100 samples");
    // the whole tick, governor and history included, while the state holds
    let th = Thresholds::from_trips(&s.zones);
    let t0 = std::time::Instant::now();
    let mut m = Monitor::new(
        s,
        Controls::default(),
        th,
        Policy::default(),
        &Watch::All,
        None,
        t0,
    )
    .unwrap();
    m.tick(t0);
    let before = ALLOCS.with(Cell::get);
    for i in 0..200u64 {
        m.tick(t0 + std::time::Duration::from_millis(i));
    }
    let after = ALLOCS.with(Cell::get);
    assert_eq!(after - before, 0, "allocations in 200 ticks");
}
