//! GGUF files imported in Rust (`import::import_gguf`): SmolLM2's artifact made straight from
//! its GGUF computes the same logits, bit for bit, as the one the Python converter's ONNX
//! package makes (`models/setup.sh`), and a file that cannot be built is refused by name
//! before any model work.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

mod common;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use common::*;
use fieldllm_engine::import::import_gguf;
use fieldllm_engine::{LoadOptions, Model, Package, Session};

const ARTIFACT: &str = "smollm2-135m-instruct.gguf";

fn smollm2_gguf() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../models/cache/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "{} is missing: run models/setup.sh",
        p.display()
    );
    p
}

fn logits_of(model: &std::sync::Arc<Model>, steps: &[Vec<u32>]) -> Vec<Vec<f32>> {
    let mut s = Session::new(model).unwrap();
    let never = AtomicBool::new(false);
    steps
        .iter()
        .map(|ids| s.feed(ids, &never).unwrap())
        .collect()
}

#[test]
fn smollm2_imported_in_rust_gives_the_onnx_artifacts_logits_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("smollm2");
    let m = import_gguf(&smollm2_gguf(), &out, Some("smollm2-135m-instruct")).unwrap();
    let onnx_made = Package::open(&model_dir(ARTIFACT)).unwrap().manifest;
    assert_eq!(m.model.vocab_size, onnx_made.model.vocab_size);
    assert_eq!(m.model.context_length, onnx_made.model.context_length);
    assert_eq!(m.tokens.bos, onnx_made.tokens.bos);
    assert_eq!(m.tokens.eos, onnx_made.tokens.eos);
    assert_eq!(m.model.parameters, onnx_made.model.parameters);
    assert_eq!(m.architecture.rms_eps, onnx_made.architecture.rms_eps);
    // the rotary tables: the same f64 arithmetic rounded once
    for table in ["rope_cos", "rope_sin"] {
        let ours = std::fs::read(out.join(format!("model.nnef/{table}.dat"))).unwrap();
        let theirs =
            std::fs::read(model_dir(ARTIFACT).join(format!("model.nnef/{table}.0.dat"))).unwrap();
        assert!(ours == theirs, "{table} differs from the ONNX artifact's");
    }
    let opts = LoadOptions {
        verify: true,
        threads: 1,
    };
    let ours = Model::load(&out, &opts).unwrap();
    let theirs = Model::load(&model_dir(ARTIFACT), &opts).unwrap();
    // same tokenizer and template: the chat prompt encodes the same
    let msgs = [fieldllm_engine::chat::Message::new(
        "user",
        "What is the capital of France?",
    )];
    let prompt = ours.chat_prompt(&msgs).unwrap();
    assert_eq!(prompt, theirs.chat_prompt(&msgs).unwrap());
    // a prefill, then 8 decode steps on the greedy tokens
    let mut steps = vec![prompt];
    let first = logits_of(&theirs, &steps);
    let mut next = fieldllm_engine::sampler::argmax(&first[0]);
    for _ in 0..8 {
        steps.push(vec![next]);
        let l = logits_of(&theirs, &steps);
        next = fieldllm_engine::sampler::argmax(l.last().unwrap());
    }
    let (a, b) = (logits_of(&ours, &steps), logits_of(&theirs, &steps));
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let same = x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits());
        assert!(
            same,
            "step {i}: logits differ (max rel {})",
            max_rel_diff(x, y)
        );
    }
}
