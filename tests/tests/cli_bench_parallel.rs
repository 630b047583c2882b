//! `fieldllmd bench --parallel N`: answers started together through the daemon's scheduler,
//! their aggregate and per-answer speed and time to first token; and clear errors.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use fieldllm_tests::{assert_clean_failure, model_dir, run, texts};

#[test]
fn answers_started_together_are_all_counted() {
    let tiny = model_dir("tiny-llama");
    let o = run(&[
        "bench",
        "--model",
        tiny.to_str().unwrap(),
        "--parallel",
        "1",
        "--parallel",
        "3",
        "--gen",
        "8",
        "--threads",
        "1",
        "--json",
    ]);
    let (out, err) = texts(&o);
    assert!(o.status.success(), "{err}");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    eprintln!("{r}");
    let rows = r["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for (row, n) in rows.iter().zip([1u64, 3]) {
        assert_eq!(row["answers"], n);
        // every answer gives at least one token and at most what it asked for
        let tokens = row["tokens"].as_u64().unwrap();
        assert!((n..=8 * n).contains(&tokens), "{row}");
        let agg = row["aggregate_tok_s"].as_f64().unwrap();
        let wall = row["wall_s"].as_f64().unwrap();
        assert!((agg * wall - tokens as f64).abs() < 0.5, "{row}");
        let (p50, max) = (
            row["ttft_p50_ms"].as_f64().unwrap(),
            row["ttft_max_ms"].as_f64().unwrap(),
        );
        assert!(p50 > 0.0 && p50 <= max && max <= wall * 1e3, "{row}");
    }
}

#[test]
fn impossible_parallel_requests_are_refused_clearly() {
    let tiny = model_dir("tiny-llama");
    let m = tiny.to_str().unwrap();
    let o = run(&["bench", "--model", m, "--parallel", "0"]);
    assert_clean_failure(&o, &["--parallel and --gen must be positive"]);
    let o = run(&["bench", "--model", m, "--parallel", "2", "--gen", "0"]);
    assert_clean_failure(&o, &["--parallel and --gen must be positive"]);
}
