//! The document-search embedding model (all-MiniLM-L6-v2 package) run by tract, against the
//! NumPy forward pass of the same weights (models/fieldllm_convert/embedder.py).

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

mod common;

use std::path::PathBuf;

use common::model_dir;
use fieldllm_engine::EngineError;
use fieldllm_engine::embed::Embedder;

struct Reference {
    texts: Vec<String>,
    ids: Vec<Vec<u32>>,
    embeddings: Vec<Vec<f32>>,
}

fn reference() -> Reference {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../models/build/all-minilm-l6-v2.reference.json");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    let rows = |v: &serde_json::Value, f: &dyn Fn(&serde_json::Value) -> f64| -> Vec<Vec<f64>> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_array().unwrap().iter().map(f).collect())
            .collect()
    };
    Reference {
        texts: strings(&doc["texts"]),
        ids: rows(&doc["ids"], &|x| x.as_u64().unwrap() as f64)
            .into_iter()
            .map(|r| r.into_iter().map(|x| x as u32).collect())
            .collect(),
        embeddings: rows(&doc["embeddings"], &|x| x.as_f64().unwrap())
            .into_iter()
            .map(|r| r.into_iter().map(|x| x as f32).collect())
            .collect(),
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[test]
fn embeddings_match_numpy_alone_and_in_a_batch() {
    let r = reference();
    let e = Embedder::load(&model_dir("all-minilm-l6-v2"), 2).unwrap();
    assert_eq!(e.dimensions(), 384);
    // the tokenizer gives HF tokenizers' ids (Python, same tokenizer.json), truncated at 128
    for (t, ids) in r.texts.iter().zip(&r.ids) {
        assert_eq!(&e.token_ids(t).unwrap(), ids, "{t}");
    }
    assert_eq!(
        r.ids.last().unwrap().len(),
        128,
        "the long text is truncated"
    );

    let texts: Vec<&str> = r.texts.iter().map(String::as_str).collect();
    let batched = e.embed(&texts).unwrap();
    for (i, (got, want)) in batched.iter().zip(&r.embeddings).enumerate() {
        let worst = got
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 2e-4, "text {i}: largest difference {worst}");
        assert!(
            dot(got, want) > 0.99999,
            "text {i}: cosine {}",
            dot(got, want)
        );
        assert!((dot(got, got) - 1.0).abs() < 1e-5, "unit length");
        // padding to the batch's longest text changes nothing
        let alone = e.embed(&texts[i..=i]).unwrap().remove(0);
        let d = alone
            .iter()
            .zip(got)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(d < 1e-5, "text {i}: alone vs batched {d}");
    }
    // and what it is for: the question is nearer its answer than the other passages
    let q = &batched[0];
    assert!(dot(q, &batched[1]) > dot(q, &batched[2]) + 0.3);
    assert!(dot(q, &batched[1]) > dot(q, &batched[4]) + 0.3);
}

#[test]
fn a_damaged_embedding_package_is_refused_by_name() {
    let src = model_dir("all-minilm-l6-v2");
    let dir = tempfile::tempdir().unwrap();
    for f in ["manifest.toml", "tokenizer.json", "model.onnx"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let tok = dir.path().join("tokenizer.json");
    let mut bytes = std::fs::read(&tok).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&tok, bytes).unwrap();
    let e = Embedder::load(dir.path(), 1).unwrap_err();
    assert!(
        matches!(e, EngineError::HashMismatch { ref path, .. } if path.ends_with("tokenizer.json")),
        "{e}"
    );

    // an LLM package is not an embedding package
    let e = Embedder::load(&model_dir("tiny-llama"), 1).unwrap_err();
    assert!(matches!(e, EngineError::Manifest { .. }), "{e}");
}
