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
    // the rotary tables: the same f64 arithmetic rounded once (ours hold each position's
    // values twice, for tract's ApplyRope)
    for table in ["rope_cos", "rope_sin"] {
        let ours = std::fs::read(out.join(format!("model.nnef/{table}.dat"))).unwrap();
        let theirs =
            std::fs::read(model_dir(ARTIFACT).join(format!("model.nnef/{table}.0.dat"))).unwrap();
        // NNEF's .dat: a 128-byte header, then the values
        let (ours, theirs) = (&ours[128..], &theirs[128..]);
        let half = 4 * 32; // head_dim 64: 32 f32 per position
        assert_eq!(ours.len(), 2 * theirs.len(), "{table}'s size");
        for (p, row) in theirs.chunks(half).enumerate() {
            let twice = &ours[p * 2 * half..(p + 1) * 2 * half];
            assert!(
                twice[..half] == *row && twice[half..] == *row,
                "{table} differs from the ONNX artifact's at position {p}"
            );
        }
    }
    let opts = LoadOptions {
        verify: true,
        threads: 1,
        context: None,
        // the marks of the products that take 15-bit activations must match too
        activations: Activations::Precise,
        kv_cache: KvCache::default(),
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

fn tiny_dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/build/tiny-gguf");
    assert!(
        d.join("variants.json").exists(),
        "{} is missing: run models/setup.sh (tests/run.sh does)",
        d.display()
    );
    d
}

/// Each tiny GGUF (grouped-query attention 2:1 and 4:1 and 4:1 with one key/value head, tied
/// and untied heads, Llama 3.1's rotary factors, F32 / F16 / BF16 / Q8_0 / Q4_1 tensors)
/// imported in Rust and run by tract, against the NumPy forward pass of the same file: a
/// prefill and 8 greedy decode steps.
#[test]
fn tiny_ggufs_match_numpy_for_a_prefill_and_8_decode_steps() {
    let dir = tiny_dir();
    let variants: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("variants.json")).unwrap()).unwrap();
    assert!(variants.len() >= 3);
    for v in variants {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join(&v);
        import_gguf(&dir.join(format!("{v}.gguf")), &out, None).unwrap();
        let steps = reference_at(&dir.join(format!("{v}.reference.json")));
        assert_eq!(steps.len(), 9, "{v}: a prefill and 8 decode steps");
        // block-quantized products take 8-bit activations (with `precise`, 15-bit in attention
        // and the head): NumPy's are f32, so those files agree to the activations' rounding
        let floats_only = ["tiny-gqa-f32", "tiny-llama3"].contains(&v.as_str());
        for (activations, bound) in [(Activations::Precise, 2e-2), (Activations::Bits8, 5e-2)] {
            let bound = if floats_only { 1e-5 } else { bound };
            let model = Model::load(
                &out,
                &LoadOptions {
                    verify: true,
                    threads: 2,
                    context: None,
                    activations,
                    // f32 files against NumPy to 1e-5: keys and values kept as NumPy keeps them
                    kv_cache: if floats_only {
                        KvCache::F32
                    } else {
                        KvCache::default()
                    },
                },
            )
            .unwrap();
            assert!(model.rows, "{v}: the imported graph's rows open");
            let mut s = Session::new(&model).unwrap();
            let never = AtomicBool::new(false);
            for (i, step) in steps.iter().enumerate() {
                let (fed, want) = (&step.fed, &step.logits);
                let got = s.feed(fed, &never).unwrap();
                let d = max_rel_diff(&got, want);
                eprintln!("{v} {activations} step {i}: max rel diff {d:.2e}");
                assert!(
                    d <= bound,
                    "{v} {activations} step {i}: logits differ from NumPy by {d} (bound {bound})"
                );
            }
        }
    }
}

/// Files that cannot be built are refused before any model work, with a message naming what is
/// wrong, and leave no artifact behind.
#[test]
fn bad_ggufs_are_refused_by_name() {
    let dir = tiny_dir();
    let cases = [
        ("architecture", vec!["architecture \"qwen3\"", "llama"]),
        (
            "tensor-type",
            vec!["blk.0.ffn_up.weight", "F64", "Q4_0, Q4_1"],
        ),
        (
            "vocabulary",
            vec!["322 tokens", "token_embd.weight has 323 rows"],
        ),
        (
            "tensor-shape",
            vec!["blk.0.attn_q.weight", "[32, 64]", "[64, 64]"],
        ),
        ("missing-key", vec!["llama.attention.head_count", "missing"]),
        ("key-type", vec!["llama.block_count", "integer"]),
    ];
    for (bad, words) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let path = dir.join(format!("bad-{bad}.gguf"));
        let err = import_gguf(&path, &out, None).unwrap_err().to_string();
        assert!(err.contains(&*path.to_string_lossy()), "{bad}: {err}");
        for w in words {
            assert!(err.contains(w), "{bad}: {err:?} does not say {w:?}");
        }
        assert!(!out.exists(), "{bad}: an artifact was left behind");
    }
    // not a GGUF at all, and a truncated one
    let tmp = tempfile::tempdir().unwrap();
    let junk = tmp.path().join("junk.gguf");
    std::fs::write(&junk, b"GGML this is not it").unwrap();
    let err = import_gguf(&junk, &tmp.path().join("o"), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a GGUF file"), "{err}");
    let whole = std::fs::read(dir.join("tiny-blocks.gguf")).unwrap();
    let cut = tmp.path().join("cut.gguf");
    std::fs::write(&cut, &whole[..whole.len() - 100]).unwrap();
    let err = import_gguf(&cut, &tmp.path().join("o"), None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("output_norm.weight"),
        "a cut file names the tensor past its end: {err}"
    );
    assert!(!tmp.path().join("o").exists());
}

/// `LoadOptions::context`: the context a session holds, never more than the model's own.
#[test]
fn the_context_is_a_setting_bounded_by_the_models() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m");
    import_gguf(&tiny_dir().join("tiny-gqa-f32.gguf"), &out, None).unwrap();
    let load = |context| {
        Model::load(
            &out,
            &LoadOptions {
                verify: false,
                threads: 1,
                context,
                activations: Default::default(),
                kv_cache: KvCache::default(),
            },
        )
    };
    assert_eq!(load(None).unwrap().context_length, 256, "the model's own");
    let m = load(Some(16)).unwrap();
    assert_eq!(m.context_length, 16);
    let mut s = Session::new(&m).unwrap();
    let never = AtomicBool::new(false);
    let err = s.feed(&[5; 17], &never).unwrap_err();
    assert!(format!("{err:?}").contains("16"), "{err:?}");
    let err = load(Some(257)).unwrap_err().to_string();
    assert!(err.contains("257") && err.contains("256"), "{err}");
}

/// Every block-quantized tensor of the tiny files (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K,
/// Q6_K) in its run-time form dequantizes, planes and packed alike, to exactly what the `gguf`
/// package's dequantization gives.
#[test]
fn every_block_type_dequantizes_as_gguf_does_bit_for_bit() {
    use fieldllm_engine::ggml::{convert, packed};
    use std::io::{Read, Seek, SeekFrom};
    let dir = tiny_dir();
    let mut seen = std::collections::BTreeSet::new();
    for v in ["tiny-blocks", "tiny-legacy", "tiny-kquants"] {
        let path = dir.join(format!("{v}.gguf"));
        let g = fieldllm_engine::import::gguf::read(&path).unwrap();
        let want: Vec<f32> = std::fs::read(dir.join(format!("{v}.dequant.f32")))
            .unwrap()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let mut file = std::fs::File::open(&path).unwrap();
        let mut at = 0;
        for t in g
            .tensors
            .iter()
            .filter(|t| convert::form_of(t.ty).is_some())
        {
            let (k, n) = (t.dims[0] as usize, t.dims[1] as usize);
            let mut bytes = vec![0u8; t.bytes as usize];
            file.seek(SeekFrom::Start(t.offset)).unwrap();
            file.read_exact(&mut bytes).unwrap();
            let w = convert::from_gguf(t.ty, n, k, &bytes).unwrap();
            let p = packed::pack(&w);
            let p = packed::Packed::new(w.kind, n, k, &p).unwrap();
            let (mut a, mut b) = (vec![0f32; k], vec![0f32; k]);
            for r in 0..n {
                w.view().dequantize_row(r, &mut a);
                p.dequantize_row(r, &mut b);
                let e = &want[at + r * k..at + (r + 1) * k];
                // bit for bit, but for the sign of a zero: Q4_0's `d * q - 8 d` is +0.0 where
                // ggml's `d * (q - 8)` is -0.0 (a negative scale times 0)
                let same = |x: &[f32]| {
                    x.iter()
                        .zip(e)
                        .all(|(p, q)| p.to_bits() == q.to_bits() || (*p == 0.0 && *q == 0.0))
                };
                assert!(
                    same(&a),
                    "{v} {} ({}) row {r}: planes differ from gguf's",
                    t.name,
                    t.ty
                );
                assert!(
                    same(&b),
                    "{v} {} ({}) row {r}: packed differs from gguf's",
                    t.name,
                    t.ty
                );
            }
            at += n * k;
            seen.insert(t.ty.name());
        }
        assert_eq!(at, want.len(), "{v}: every quantized tensor compared");
    }
    let all = [
        "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0",
    ];
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), all);
}
