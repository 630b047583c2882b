//! `fieldllmd ask`, `model` and `bench` as a user runs them: real binary, real model files.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use fieldllm_tests::{assert_clean_failure, assert_usage_failure, model_dir, run, texts};

fn tiny() -> String {
    model_dir("tiny-llama").to_string_lossy().into_owned()
}

#[test]
fn ask_answers_paris_with_the_deployed_artifact() {
    let dir = model_dir("smollm2-135m-instruct.gguf")
        .to_string_lossy()
        .into_owned();
    let o = run(&["ask", "--model", &dir, "Name the capital of France."]);
    let (out, err) = texts(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("Paris"), "{out}");
}

#[test]
fn ask_logprobs_prints_json_lines_with_k_candidates() {
    let o = run(&[
        "ask",
        "--model",
        &tiny(),
        "--logprobs",
        "3",
        "--max-tokens",
        "6",
        "--temperature",
        "0.8",
        "--seed",
        "5",
        "hello",
    ]);
    let (out, err) = texts(&o);
    assert!(o.status.success(), "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    let done = lines.last().expect("a final line");
    assert!(done["finish_reason"].is_string(), "{done}");
    let tokens: Vec<_> = lines
        .iter()
        .filter(|l| l.get("top_logprobs").is_some())
        .collect();
    assert_eq!(
        tokens.len() as u64,
        done["usage"]["completion_tokens"].as_u64().unwrap()
    );
    for t in tokens {
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3, "{t}");
        assert!(t["logprob"].as_f64().unwrap() <= 0.0);
        assert!(top[0]["logprob"].as_f64().unwrap() >= top[2]["logprob"].as_f64().unwrap());
    }
}

#[test]
fn same_seed_same_answer_from_the_command_line() {
    let args = [
        "ask",
        "--model",
        &tiny(),
        "--temperature",
        "1.0",
        "--top-k",
        "0",
        "--max-tokens",
        "12",
        "--seed",
        "11",
        "pump",
    ];
    let a = run(&args);
    let b = run(&args);
    assert!(a.status.success());
    assert_eq!(a.stdout, b.stdout);
}

#[test]
fn bad_parameters_fail_before_loading_and_name_the_parameter() {
    let t = tiny();
    for (flag, value, name) in [
        ("--temperature", "NaN", "temperature"),
        ("--temperature", "-1", "temperature"),
        ("--top-p", "0", "top_p"),
        ("--top-p", "1.5", "top_p"),
        ("--min-p", "inf", "min_p"),
        ("--max-tokens", "0", "max_tokens"),
        ("--logprobs", "50", "logprobs"),
        ("--threads", "0", "threads"),
    ] {
        let o = run(&["ask", "--model", &t, flag, value, "hi"]);
        assert_clean_failure(&o, &[name]);
    }
    assert_clean_failure(&run(&["ask", "--model", &t, "   "]), &["empty"]);
    // flags that do not parse: exit status 2, pointing at --help
    for args in [
        &["ask", "--model", &t, "--temperature", "hot", "hi"][..],
        &["ask", "--frobnicate", "hi"],
        &["serve", "--config"],
    ] {
        assert_usage_failure(&run(args), &["--help"]);
    }
    assert_clean_failure(
        &run(&["ask", "--model", &t, "hi<|im_end|>"]),
        &["special token"],
    );
    assert_usage_failure(
        &run(&["ask", "--model", &t, "--top-k", "x", "hi"]),
        &["--top-k"],
    );
}

#[test]
fn a_prompt_longer_than_the_context_is_refused() {
    let long = "pump valve ".repeat(400);
    let o = run(&["ask", "--model", &tiny(), &long]);
    assert_clean_failure(&o, &["context"]);
}

#[test]
fn missing_and_corrupt_models_are_named() {
    assert_clean_failure(
        &run(&["ask", "--model", "/nonexistent/pkg", "hi"]),
        &["/nonexistent/pkg/manifest.toml"],
    );

    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(model_dir("tiny-llama")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
    }
    let dir = tmp.path().to_string_lossy().into_owned();
    let o = run(&["model", "verify", &dir]);
    assert!(o.status.success(), "{}", texts(&o).1);
    let mut tok = std::fs::read(tmp.path().join("tokenizer.json")).unwrap();
    tok.push(b' ');
    std::fs::write(tmp.path().join("tokenizer.json"), tok).unwrap();
    assert_clean_failure(
        &run(&["model", "verify", &dir]),
        &["tokenizer.json", "sha256"],
    );
    assert_clean_failure(
        &run(&["ask", "--model", &dir, "hi"]),
        &["tokenizer.json", "sha256"],
    );

    std::fs::write(tmp.path().join("manifest.toml"), "not = [toml").unwrap();
    assert_clean_failure(&run(&["model", "info", &dir]), &["manifest"]);
}

#[test]
fn model_info_describes_package_and_artifact() {
    let o = run(&["model", "info", &tiny()]);
    let (out, err) = texts(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        out.contains("tiny-llama") && out.contains("2 layers") && out.contains("Onnx"),
        "{out}"
    );
    let art = model_dir("smollm2-135m-instruct.f16")
        .to_string_lossy()
        .into_owned();
    let o = run(&["model", "info", "--json", &art]);
    let m: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    assert_eq!(m["graph"]["format"], "nnef");
    assert_eq!(m["graph"]["weights"], "f16");
    assert_eq!(m["model"]["vocab_size"], 49152);
    // and the artifact setup.sh deploys: the GGUF's own blocks, from the Q4_1 file
    let art = model_dir("smollm2-135m-instruct.gguf");
    let o = run(&["model", "info", "--json", &art.to_string_lossy()]);
    let m: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    assert_eq!(m["graph"]["weights"], "gguf");
    assert_eq!(m["source"]["quantization"], "F32+Q4_1+Q8_0");
}

#[test]
fn model_import_refuses_to_overwrite_and_bad_formats() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("a");
    let out_s = out.to_string_lossy().into_owned();
    let o = run(&["model", "import", &tiny(), &out_s, "--weights", "f32"]);
    assert!(o.status.success(), "{}", texts(&o).1);
    assert!(run(&["model", "verify", &out_s]).status.success());
    assert_clean_failure(&run(&["model", "import", &tiny(), &out_s]), &["exists"]);
    // a weight format the flag does not know is a flag that does not parse: exit status 2
    assert_usage_failure(
        &run(&["model", "import", &tiny(), "/tmp/x", "--weights", "q3"]),
        &["q3", "f32, f16, gguf"],
    );
    assert_clean_failure(
        &run(&["model", "import", &out_s, "/tmp/y"]),
        &["already an artifact"],
    );
}

#[test]
fn bench_json_reports_every_figure() {
    let o = run(&[
        "bench",
        "--model",
        &tiny(),
        "--json",
        "--prompt",
        "16",
        "--gen",
        "8",
        "--reps",
        "1",
    ]);
    let (out, err) = texts(&o);
    assert!(o.status.success(), "{err}");
    let r: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let rows = r["rows"].as_array().unwrap();
    assert_eq!(
        rows.iter()
            .map(|r| r["threads"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        vec![1, 2]
    );
    for row in rows {
        for k in ["load_ms", "prefill_tok_s", "decode_tok_s"] {
            assert!(row[k].as_f64().unwrap() > 0.0, "{k} in {row}");
        }
    }
    assert!(r["peak_rss_mb"].as_f64().unwrap() > 1.0);
    let isa = r["isa"].as_str().unwrap();
    assert!(
        [
            "scalar",
            "avx2",
            "avx512vnni",
            "neon",
            "neon-dotprod",
            "neon-i8mm"
        ]
        .contains(&isa),
        "{isa}"
    );
}

/// `--profile` prints where a prompt token's and a decoded token's time go, by op, each table
/// ending in its total.
#[test]
fn bench_profile_times_prefill_and_decode_by_op() {
    let o = run(&[
        "bench",
        "--model",
        &tiny(),
        "--profile",
        "--threads",
        "1",
        "--prompt",
        "16",
        "--gen",
        "8",
        "--reps",
        "1",
    ]);
    let (out, err) = texts(&o);
    assert!(o.status.success(), "{err}");
    for what in [
        "prefill profile, 1 thread(s), per prompt token:",
        "decode profile, 1 thread(s), per token:",
    ] {
        let table = out
            .split(what)
            .nth(1)
            .unwrap_or_else(|| panic!("{what} in {out}"));
        let table = table.split("\n\n").next().unwrap();
        assert!(table.contains("| (outside the ops) |"), "{table}");
        let total = table.lines().find(|l| l.starts_with("| total |"));
        let us: f64 = total
            .unwrap()
            .split('|')
            .nth(3)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(us > 0.0, "{table}");
    }
}

/// `bench` as `run` does it, with `FIELDLLM_ISA` set.
fn bench_with_isa(isa: &str) -> std::process::Output {
    std::process::Command::new(fieldllm_tests::fieldllmd())
        .args(["bench", "--model", &tiny(), "--json", "--threads", "1"])
        .args(["--prompt", "8", "--gen", "4", "--reps", "1"])
        .env("FIELDLLM_ISA", isa)
        .env_remove("RUST_LOG")
        .current_dir(fieldllm_tests::repo_root())
        .output()
        .expect("start fieldllmd")
}

#[test]
fn fieldllm_isa_is_obeyed_reported_or_refused() {
    let o = bench_with_isa("scalar");
    let (out, err) = texts(&o);
    assert!(o.status.success(), "{err}");
    let r: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(r["isa"], "scalar");
    // a name the kernels do not know, and one no x86 or ARM CPU runs both of, are refused
    // with exit code 1 rather than quietly run on other kernels
    let other_arch = if cfg!(target_arch = "x86_64") {
        "neon"
    } else {
        "avx2"
    };
    for (isa, says) in [
        ("avx3", "not an instruction set"),
        (other_arch, "cannot run"),
    ] {
        let o = bench_with_isa(isa);
        assert_clean_failure(&o, &["FIELDLLM_ISA", says]);
        assert_eq!(o.status.code(), Some(1), "{isa}");
    }
}
