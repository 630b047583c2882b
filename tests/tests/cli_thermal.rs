//! `fieldllmd thermal`: the tegrastats-like table over each fixture board, and a clear error
//! where there is nothing to read.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use fieldllm_tests::{assert_clean_failure, repo_root, run, texts};

fn fixture(name: &str) -> String {
    repo_root()
        .join("firmware-bridge/tests/fixtures")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

#[test]
fn the_table_shows_each_board_sensor_by_sensor() {
    let root = fixture("jetson-orin-nano");
    let o = run(&[
        "thermal",
        "--sysfs-root",
        &root,
        "--count",
        "3",
        "--interval-ms",
        "20",
    ]);
    let (out, err) = texts(&o);
    assert!(o.status.success(), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].contains("board Jetson"), "{out}");
    assert!(
        lines[1].contains("hot 95.5 °C"),
        "thresholds from trip points: {out}"
    );
    let head = lines.iter().position(|l| l.starts_with("time")).unwrap();
    for col in [
        "cpu°C",
        "gpu°C",
        "tj°C",
        "VDD_IN(W)",
        "gpu(MHz)",
        "fan(rpm)",
        "oc",
    ] {
        assert!(lines[head].contains(col), "{col} not in {:?}", lines[head]);
    }
    let rows = &lines[head + 1..];
    assert_eq!(rows.len(), 3, "{out}");
    let cells: Vec<&str> = rows[0].split_whitespace().collect();
    // time, state, judged °C, then cpu gpu cv0 cv1 cv2 soc0 soc1 soc2 tj, 3 rails, clock, fan, oc
    assert_eq!(
        &cells[1..],
        [
            "nominal", "48.2", "48.2", "47.6", "46.9", "47.0", "46.7", "47.5", "46.3", "46.9",
            "48.2", "7.18", "1.99", "2.67", "624", "2734", "3"
        ]
    );

    let o = run(&[
        "thermal",
        "--sysfs-root",
        &fixture("rk3588"),
        "--count",
        "1",
    ]);
    let (out, _) = texts(&o);
    assert!(o.status.success());
    assert!(
        out.contains("npu(MHz)") && out.contains("board Rk3588"),
        "{out}"
    );
}

#[test]
fn no_sensors_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let o = run(&[
        "thermal",
        "--sysfs-root",
        &dir.path().to_string_lossy(),
        "--count",
        "1",
    ]);
    assert_clean_failure(&o, &["no temperature sensors", "--sysfs-root"]);
}

#[test]
fn serve_refuses_controls_the_board_does_not_have() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("fieldllmd.toml");
    for (extra, needles) in [
        (
            "[[bridge.devfreq]]\ndevice = \"fdab0000.npu\"\nwarm_max_hz = 600000000\n",
            &["devfreq device \"fdab0000.npu\" not found", "17000000.gpu"][..],
        ),
        (
            "[[bridge.devfreq]]\ndevice = \"17000000.gpu\"\nwarm_max_hz = 500000000\n",
            &[
                "500000000 Hz is not one of its available frequencies",
                "510000000",
            ][..],
        ),
        (
            "zones = [\"npu-thermal\"]\n",
            &["thermal zone \"npu-thermal\" not found", "tj-thermal"][..],
        ),
        (
            "hot_c = 120\n",
            &["thresholds must rise", "critical 100.0 °C"][..],
        ),
    ] {
        std::fs::write(
            &conf,
            format!(
                "[model]\npath = {:?}\n\n[mqtt]\nembedded_listen = \"127.0.0.1:{}\"\n\n[bridge]\nsysfs_root = {:?}\n{extra}",
                fieldllm_tests::model_dir("tiny-llama"),
                fieldllm_tests::free_port(),
                fixture("jetson-orin-nano")
            ),
        )
        .unwrap();
        let o = run(&["serve", "--no-console", "--config", &conf.to_string_lossy()]);
        assert_clean_failure(&o, needles);
    }
}
