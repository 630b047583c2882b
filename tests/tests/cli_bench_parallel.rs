//! `fieldllmd bench --parallel N`: answers started together through the daemon's scheduler,
//! their aggregate and per-answer speed and time to first token; and clear errors.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use fieldllm_tests::{assert_clean_failure, model_dir, run, texts};

/// `fieldllmd bench` on the tiny model at one thread with `args` after it; its stdout, once it
/// exited 0.
fn tiny_bench(args: &[&str]) -> String {
    let tiny = model_dir("tiny-llama");
    let mut all = vec!["bench", "--model", tiny.to_str().unwrap(), "--threads", "1"];
    all.extend_from_slice(args);
    let o = run(&all);
    let (out, err) = texts(&o);
    assert!(o.status.success(), "{err}");
    out
}

#[test]
fn answers_started_together_are_all_counted() {
    // 64 tokens an answer: the tiny model answers 8 in about a millisecond, which a loaded
    // machine can let one answer finish before the next one's thread has started (CI saw three
    // answers run one after another, one a run)
    let out = tiny_bench(&[
        "--parallel",
        "1",
        "--parallel",
        "3",
        "--gen",
        "64",
        "--json",
    ]);
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    eprintln!("{r}");
    let rows = r["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for (row, n) in rows.iter().zip([1u64, 3]) {
        assert_eq!(row["answers"], n);
        // every answer gives at least one token and at most what it asked for
        let tokens = row["tokens"].as_u64().unwrap();
        assert!((n..=64 * n).contains(&tokens), "{row}");
        let agg = row["aggregate_tok_s"].as_f64().unwrap();
        let wall = row["wall_s"].as_f64().unwrap();
        assert!((agg * wall - tokens as f64).abs() < 0.5, "{row}");
        let (p50, max) = (
            row["ttft_p50_ms"].as_f64().unwrap(),
            row["ttft_max_ms"].as_f64().unwrap(),
        );
        assert!(p50 > 0.0 && p50 <= max && max <= wall * 1e3, "{row}");
    }
    // the three answers were decoded together: runs carried more than one of them
    assert_eq!(r["batched"], true, "{r}");
    let per_run = rows[1]["answers_per_run"].as_f64().unwrap();
    assert!(per_run > 1.0 && per_run <= 3.0, "{r}");
    assert!(rows[1]["rss_mb"].as_f64().unwrap() > 0.0, "{r}");
}

#[test]
fn shared_runs_are_timed_by_op() {
    let out = tiny_bench(&[
        "--parallel",
        "1",
        "--parallel",
        "2",
        "--gen",
        "4",
        "--profile",
    ]);
    // one table per level, each with the attention of the shared runs and their total
    for n in [1, 2] {
        let at = out
            .find(&format!("shared runs with {n} answers started"))
            .unwrap_or_else(|| panic!("no profile of level {n}:\n{out}"));
        let table = &out[at..];
        let end = table.find("| total |").expect("a total row");
        assert!(table[..end].contains("| KvAttention |"), "{out}");
    }
}

#[test]
fn separate_answers_run_on_states_of_their_own() {
    let out = tiny_bench(&["--parallel", "2", "--gen", "4", "--separate", "--json"]);
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["batched"], false, "{r}");
    assert_eq!(r["rows"][0]["answers_per_run"], 0.0, "{r}");
    assert_eq!(r["stall"], serde_json::json!([]), "{r}");
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
