//! Controls and the monitor on a copy of the Jetson fixture: what is written, when, and what
//! is never touched.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use firmware_bridge::{
    ControlError, Controls, DevfreqPlan, Monitor, NvpmodelPlan, PerState, Plan, Policy, Sensors,
    ThermalState, Thresholds, Watch,
};

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

fn jetson() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    copy_tree(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jetson-orin-nano"),
        &root,
    );
    (dir, root)
}

fn gpu(root: &Path, file: &str) -> String {
    std::fs::read_to_string(root.join("sys/class/devfreq/17000000.gpu").join(file))
        .unwrap()
        .trim()
        .to_string()
}

fn set_temps(root: &Path, mc: i64) {
    for i in 0..9 {
        let p = root.join(format!("sys/class/thermal/thermal_zone{i}/temp"));
        std::fs::write(p, format!("{mc}\n")).unwrap();
    }
}

fn thresholds() -> Thresholds {
    Thresholds {
        warm_mc: 70_000,
        hot_mc: 80_000,
        critical_mc: 90_000,
        hysteresis_mc: 3_000,
        dwell: Duration::from_secs(2),
    }
}

fn gpu_plan() -> Plan {
    Plan {
        devfreq: vec![DevfreqPlan {
            device: "17000000.gpu".into(),
            governor: Some("userspace".into()),
            max_hz: PerState {
                warm: Some(510_000_000),
                hot: Some(306_000_000),
                critical: None,
            },
        }],
        nvpmodel: None,
    }
}

#[test]
fn devfreq_caps_follow_the_state_and_are_put_back() {
    let (_d, root) = jetson();
    let sensors = Sensors::probe(&root);
    let modes_before: Vec<String> = (0..9)
        .map(|i| {
            std::fs::read_to_string(root.join(format!("sys/class/thermal/thermal_zone{i}/mode")))
                .unwrap()
        })
        .collect();
    let controls = Controls::bind(&sensors, &gpu_plan()).unwrap();
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let mut m = Monitor::new(
        sensors,
        controls,
        thresholds(),
        Policy::default(),
        &Watch::All,
        None,
        t0,
    )
    .unwrap();
    assert_eq!(gpu(&root, "governor"), "userspace", "written at start");
    set_temps(&root, 50_000);
    assert_eq!(m.tick(at(0)).state, ThermalState::Nominal);
    assert_eq!(gpu(&root, "max_freq"), "624750000");
    set_temps(&root, 72_000);
    let t = m.tick(at(100));
    assert_eq!((t.state, t.changed), (ThermalState::Warm, true));
    assert_eq!(gpu(&root, "max_freq"), "510000000");
    set_temps(&root, 95_000);
    assert_eq!(m.tick(at(200)).state, ThermalState::Critical);
    assert_eq!(
        gpu(&root, "max_freq"),
        "306000000",
        "critical takes hot's cap"
    );
    assert!(!m.limits().accept && m.limits().stop_running);
    // cooling: one step per dwell
    set_temps(&root, 40_000);
    assert_eq!(m.tick(at(1000)).state, ThermalState::Critical);
    assert_eq!(m.tick(at(2300)).state, ThermalState::Hot);
    assert_eq!(m.tick(at(4400)).state, ThermalState::Warm);
    assert_eq!(gpu(&root, "max_freq"), "510000000");
    assert_eq!(m.tick(at(6500)).state, ThermalState::Nominal);
    assert_eq!(
        gpu(&root, "max_freq"),
        "624750000",
        "back to the value found"
    );
    set_temps(&root, 72_000);
    m.tick(at(6600));
    drop(m);
    assert_eq!(gpu(&root, "max_freq"), "624750000", "put back on drop");
    assert_eq!(gpu(&root, "governor"), "nvhost_podgov");
    let modes_after: Vec<String> = (0..9)
        .map(|i| {
            std::fs::read_to_string(root.join(format!("sys/class/thermal/thermal_zone{i}/mode")))
                .unwrap()
        })
        .collect();
    assert_eq!(modes_before, modes_after, "a zone's mode is never written");
}

#[test]
fn a_plan_the_board_cannot_follow_is_refused_at_bind() {
    let (_d, root) = jetson();
    let sensors = Sensors::probe(&root);
    let mut plan = gpu_plan();
    plan.devfreq[0].max_hz.warm = Some(500_000_000);
    let e = Controls::bind(&sensors, &plan).unwrap_err();
    assert!(matches!(e, ControlError::BadFrequency { .. }), "{e}");
    assert!(e.to_string().contains("306000000 408000000"), "{e}");
    plan.devfreq[0].device = "fdab0000.npu".into();
    let e = Controls::bind(&sensors, &plan).unwrap_err();
    assert!(e.to_string().contains("found: 17000000.gpu"), "{e}");
    let plan = Plan {
        devfreq: vec![],
        nvpmodel: Some(NvpmodelPlan {
            bin: root.join("no-such-nvpmodel"),
            modes: PerState::default(),
        }),
    };
    assert!(matches!(
        Controls::bind(&sensors, &plan),
        Err(ControlError::NoNvpmodel(_))
    ));
}

#[test]
fn watching_named_zones_ignores_the_others() {
    let (_d, root) = jetson();
    let sensors = Sensors::probe(&root);
    let t0 = Instant::now();
    let watch = Watch::Zones(vec!["gpu-thermal".into()]);
    let mut m = Monitor::new(
        sensors.clone(),
        Controls::default(),
        thresholds(),
        Policy::default(),
        &watch,
        None,
        t0,
    )
    .unwrap();
    set_temps(&root, 50_000);
    // the CPU zone alone is hot: not watched
    std::fs::write(root.join("sys/class/thermal/thermal_zone0/temp"), "85000").unwrap();
    let t = m.tick(t0);
    assert_eq!(
        (t.state, t.watched_mc),
        (ThermalState::Nominal, Some(50_000))
    );
    let bad = Watch::Zones(vec!["npu-thermal".into()]);
    let e = Monitor::new(
        sensors,
        Controls::default(),
        thresholds(),
        Policy::default(),
        &bad,
        None,
        t0,
    )
    .unwrap_err();
    assert!(e.to_string().contains("gpu-thermal"), "{e}");
}

/// nvpmodel exists only on Jetson images; a stand-in script with its query format and a mode
/// file records what the bridge asked for.
#[test]
fn power_modes_follow_the_state_through_nvpmodel() {
    use std::os::unix::fs::PermissionsExt;
    let (d, root) = jetson();
    let bin = d.path().join("nvpmodel");
    let state = d.path().join("mode");
    std::fs::write(&state, "0").unwrap();
    std::fs::write(
        &bin,
        format!(
            "#!/bin/sh\nf={}\ncase \"$1\" in\n-q) m=$(cat $f); n=15W; [ \"$m\" = 1 ] && n=7W; printf 'NV Power Mode: %s\\n%s\\n' $n $m;;\n-m) echo \"$2\" > $f; echo \"$2\" >> $f.log;;\n*) exit 2;;\nesac\n",
            state.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let sensors = Sensors::probe(&root);
    let plan = Plan {
        devfreq: vec![],
        nvpmodel: Some(NvpmodelPlan {
            bin: bin.clone(),
            modes: PerState {
                warm: None,
                hot: Some(1),
                critical: None,
            },
        }),
    };
    let t0 = Instant::now();
    let controls = Controls::bind(&sensors, &plan).unwrap();
    let mut m = Monitor::new(
        sensors,
        controls,
        thresholds(),
        Policy::default(),
        &Watch::All,
        None,
        t0,
    )
    .unwrap();
    assert_eq!(m.power_mode().unwrap().name, "15W");
    set_temps(&root, 72_000);
    m.tick(t0);
    assert_eq!(
        m.power_mode().unwrap().name,
        "15W",
        "warm has no mode of its own"
    );
    set_temps(&root, 85_000);
    m.tick(t0 + Duration::from_millis(10));
    assert_eq!(m.power_mode().unwrap().name, "7W");
    set_temps(&root, 95_000);
    m.tick(t0 + Duration::from_millis(20));
    drop(m);
    let log = std::fs::read_to_string(d.path().join("mode.log")).unwrap();
    assert_eq!(
        log, "1\n0\n",
        "set once for hot (critical inherits it), put back once"
    );
}
