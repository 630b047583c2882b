//! `fieldllmd bench --perplexity`: llama-perplexity's measure on the gguf artifact, with the KL
//! divergence from the f32 model of the same GGUF; and clear errors for impossible requests.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use fieldllm_tests::{assert_clean_failure, model_dir, repo_root, run, texts};

fn passage() -> String {
    repo_root()
        .join("models/passage.txt")
        .to_string_lossy()
        .into_owned()
}

#[test]
fn perplexity_and_kl_divergence_of_the_gguf_blocks() {
    let gguf = model_dir("smollm2-135m-instruct.gguf");
    let f32 = model_dir("smollm2-135m-instruct");
    let o = run(&[
        "bench",
        "--model",
        gguf.to_str().unwrap(),
        "--perplexity",
        &passage(),
        "--ctx",
        "64",
        "--chunks",
        "1",
        "--kl-divergence",
        f32.to_str().unwrap(),
        "--json",
    ]);
    let (out, err) = texts(&o);
    assert!(o.status.success(), "{err}");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    eprintln!("{r}");
    assert_eq!(r["weights"], "gguf");
    assert_eq!(r["chunks"], 1);
    // the second half of a 64-token chunk, each token predicting the next
    assert_eq!(r["scored_tokens"], 31);
    let ppl = r["perplexity"].as_f64().unwrap();
    let reference = &r["reference"];
    assert_eq!(reference["weights"], "f32");
    let ppl32 = reference["perplexity"].as_f64().unwrap();
    assert!(ppl > 1.0 && ppl.is_finite(), "{ppl}");
    assert!(
        (ppl / ppl32 - 1.0).abs() < 0.03,
        "gguf {ppl} vs f32 {ppl32}: more than 3% apart"
    );
    let kld = reference["mean_kld"].as_f64().unwrap();
    assert!(kld > 0.0 && kld < 0.05, "mean KLD {kld}");
    let top1 = reference["same_top1_pct"].as_f64().unwrap();
    assert!(top1 >= 85.0, "same top-1 {top1}%");
}

#[test]
fn impossible_requests_are_refused_clearly() {
    let gguf = model_dir("smollm2-135m-instruct.gguf");
    let m = gguf.to_str().unwrap();
    let p = passage();
    let o = run(&["bench", "--model", m, "--perplexity", &p, "--ctx", "2"]);
    assert_clean_failure(&o, &["--ctx must be at least 4"]);
    let o = run(&["bench", "--model", m, "--perplexity", &p, "--ctx", "100000"]);
    assert_clean_failure(&o, &["larger than the model's context"]);
    let o = run(&["bench", "--model", m, "--perplexity", &p, "--ctx", "4096"]);
    assert_clean_failure(&o, &["fewer than one chunk"]);
    let o = run(&["bench", "--model", m, "--perplexity", "/nonexistent/text"]);
    assert_clean_failure(&o, &["/nonexistent/text"]);
}
