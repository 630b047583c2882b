//! `fieldllmd bench --service`: devices on their own MQTT connections asking a running daemon
//! at once, through a real mosquitto; every request answered once, and clear errors.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use fieldllm_tests::mqtt::{Client, daemon_config};
use fieldllm_tests::{Daemon, Mosquitto, assert_clean_failure, free_port, model_dir, run, texts};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_asking_at_once_are_each_answered_once() {
    let broker = Mosquitto::start("allow_anonymous true");
    // the default 4 slots: the three devices' answers decoded together
    let d = Daemon::start(&daemon_config(broker.port, "svc", "tiny-llama", ""));
    let mut c = Client::connect(broker.port, "t-svc").await;
    c.wait_status("svc", "ready").await;
    let url = format!("mqtt://127.0.0.1:{}", broker.port);
    let tiny = model_dir("tiny-llama");
    let o = tokio::task::spawn_blocking(move || {
        run(&[
            "bench",
            "--model",
            tiny.to_str().unwrap(),
            "--service",
            &url,
            "--node",
            "svc",
            "--mqtt-only",
            "--concurrency",
            "3",
            "--requests",
            "7",
            "--max-tokens",
            "4",
            "--json",
        ])
    })
    .await
    .unwrap();
    let (out, err) = texts(&o);
    assert!(o.status.success(), "{err}");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rows = r["rows"].as_array().unwrap();
    // only the broker's row: no in-process one
    assert_eq!(rows.len(), 1, "{r}");
    let row = &rows[0];
    assert_eq!(
        (row["concurrency"].as_u64(), row["requests"].as_u64()),
        (Some(3), Some(7))
    );
    let (p50, p99) = (
        row["p50_ms"].as_f64().unwrap(),
        row["p99_ms"].as_f64().unwrap(),
    );
    assert!(0.0 < p50 && p50 <= p99, "{row}");
    assert!(row["rps"].as_f64().unwrap() > 0.0, "{row}");
    // 5 warm-up requests and the 7 measured, each answered once by the daemon
    // (its log line may follow the final message out by a moment)
    let answered = || d.log().lines().filter(|l| l.contains(" answered ")).count();
    for _ in 0..100 {
        if answered() >= 12 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(answered(), 12, "{}", d.log());
}

#[test]
fn a_broker_that_is_not_there_is_a_clear_error() {
    let tiny = model_dir("tiny-llama");
    let url = format!("mqtt://127.0.0.1:{}", free_port());
    let o = run(&[
        "bench",
        "--model",
        tiny.to_str().unwrap(),
        "--service",
        &url,
        "--mqtt-only",
        "--concurrency",
        "2",
        "--requests",
        "2",
    ]);
    assert_clean_failure(&o, &[&url]);
}
