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
