//! `fieldllmd model info FILE.gguf` on the files users bring: what they hold, and bad files
//! refused with a message that names the problem, before any model work.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use fieldllm_tests::{assert_clean_failure, repo_root, run, texts};

fn smollm2() -> String {
    let p = repo_root().join("models/cache/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "{}: run models/setup.sh", p.display());
    p.to_string_lossy().into_owned()
}

#[test]
fn a_gguf_is_described_from_its_header() {
    let o = run(&["model", "info", &smollm2()]);
    let (out, err) = texts(&o);
    assert!(o.status.success(), "{err}");
    for want in [
        "architecture    llama",
        "30 layers, hidden 576, ffn 1536, 9 heads / 3 kv heads",
        "context length  8192",
        "tensors Q4_1    210",
        "tensors Q8_0    1",
        "gpt2 (pre-tokenizer smollm), 49152 tokens: imports",
        "chat template   yes",
    ] {
        assert!(out.contains(want), "{want:?} not in\n{out}");
    }
    let o = run(&["model", "info", "--json", &smollm2()]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["tensors"]["Q4_1"]["count"], 210);
    assert_eq!(v["parameters"], 134_515_008);
    assert_eq!(v["tokenizer"], "imports");
}

#[test]
fn bad_ggufs_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let whole = std::fs::read(smollm2()).unwrap();
    let cut = |n: usize, name: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, &whole[..n]).unwrap();
        p.to_string_lossy().into_owned()
    };
    // inside the header: the part named
    let o = run(&["model", "info", &cut(1_000_000, "header.gguf")]);
    assert_clean_failure(&o, &["header.gguf", "truncated", "tokenizer.ggml.merges"]);
    // the header whole, the weights cut: the first tensor that does not fit is named
    let o = run(&["model", "info", &cut(50_000_000, "weights.gguf")]);
    assert_clean_failure(&o, &["weights.gguf", "run past the end of the file"]);
    let p = dir.path().join("zip.gguf");
    std::fs::write(&p, b"PK\x03\x04 not a model").unwrap();
    let o = run(&["model", "info", &p.to_string_lossy()]);
    assert_clean_failure(&o, &["zip.gguf", "not a GGUF file"]);
    let o = run(&["model", "info", &cut(0, "empty.gguf")]);
    assert_clean_failure(&o, &["empty.gguf", "not a GGUF file"]);
}

fn tiny(name: &str) -> String {
    let p = repo_root().join("models/build/tiny-gguf").join(name);
    assert!(p.exists(), "{}: run models/setup.sh", p.display());
    p.to_string_lossy().into_owned()
}

fn run_cached(cache: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(fieldllm_tests::fieldllmd())
        .args(args)
        .env("FIELDLLM_CACHE", cache)
        .env("RUST_LOG", "info")
        .output()
        .unwrap()
}

/// `--model FILE.gguf`: imported into the cache on first use, the cached artifact used after
/// (not imported again), and its answer the same both times.
#[test]
fn a_gguf_file_runs_straight_from_the_file() {
    let cache = tempfile::tempdir().unwrap();
    let args = [
        "ask",
        "--model",
        &tiny("tiny-blocks.gguf"),
        "--max-tokens",
        "8",
        "--seed",
        "1",
        "hello",
    ];
    let first = run_cached(cache.path(), &args);
    let (out1, err1) = texts(&first);
    assert!(first.status.success(), "{err1}");
    assert!(err1.contains("importing the GGUF"), "{err1}");
    let made: Vec<_> = std::fs::read_dir(cache.path().join("models"))
        .unwrap()
        .collect();
    assert_eq!(made.len(), 1, "one artifact, no partial directory left");
    let second = run_cached(cache.path(), &args);
    let (out2, err2) = texts(&second);
    assert!(second.status.success(), "{err2}");
    assert!(
        !err2.contains("importing the GGUF"),
        "imported again: {err2}"
    );
    assert_eq!(out1, out2);
    // model import writes a verifiable artifact; info says it builds and what contexts cost
    let out = cache.path().join("imported");
    let o = run(&[
        "model",
        "import",
        &tiny("tiny-llama3.gguf"),
        &out.to_string_lossy(),
    ]);
    assert!(o.status.success(), "{}", texts(&o).1);
    let o = run(&["model", "verify", &out.to_string_lossy()]);
    assert!(o.status.success(), "{}", texts(&o).1);
    let o = run(&[
        "model",
        "info",
        &tiny("tiny-llama3.gguf"),
        "--context",
        "100",
    ]);
    let (text, _) = texts(&o);
    assert!(text.contains("graph           builds"), "{text}");
    // 2 layers x 2 kv heads x 8 wide x keys and values x 2 bytes (f16) x 100 tokens
    assert!(
        text.contains("KV cache        0.0 MB at 100 tokens"),
        "{text}"
    );
    let o = run(&["model", "info", "--json", &smollm2()]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    // 30 layers x 3 kv heads x 64 wide x 2 x 2 bytes (the default f16 cache) x 8192 tokens
    assert_eq!(v["kv_cache_type"], "f16");
    assert_eq!(v["kv_cache_bytes"]["8192"], 30 * 3 * 64 * 2 * 2 * 8192);
    assert_eq!(v["builds"], true);
}

/// A file that cannot be built is refused by name at first use, and leaves nothing in the
/// cache; a context larger than the model's is refused at load.
#[test]
fn a_bad_gguf_is_refused_at_first_use_and_caches_nothing() {
    let cache = tempfile::tempdir().unwrap();
    let o = run_cached(
        cache.path(),
        &["ask", "--model", &tiny("bad-tensor-type.gguf"), "hi"],
    );
    assert_clean_failure(&o, &["bad-tensor-type.gguf", "blk.0.ffn_up.weight", "F64"]);
    let left: Vec<_> = std::fs::read_dir(cache.path().join("models"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "the cache kept {left:?}");
    let o = run(&["model", "info", &tiny("bad-vocabulary.gguf")]);
    let (text, _) = texts(&o);
    assert!(
        text.contains("does not build") && text.contains("322 tokens"),
        "{text}"
    );
}
