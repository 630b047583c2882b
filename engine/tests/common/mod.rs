//! Shared helpers for the engine's integration tests: model paths and reference logits.
#![allow(dead_code, missing_docs)]
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::path::PathBuf;
use std::sync::Arc;

pub use fieldllm_engine::attention::KvCache;
pub use fieldllm_engine::ggml::Activations;
use fieldllm_engine::{LoadOptions, Model};

/// `models/build/NAME` of this checkout; fails with the fix when `models/setup.sh` has not run.
pub fn model_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../models/build")
        .join(name);
    assert!(
        dir.join("manifest.toml").exists(),
        "{} is missing: run `models/setup.sh target/debug/fieldllmd` (tests/run.sh does)",
        dir.display()
    );
    dir
}

pub fn load(name: &str) -> Arc<Model> {
    load_with(name, Activations::default())
}

/// [`load`] with the products' activations as `activations` says.
#[allow(dead_code)] // not every test binary asks
pub fn load_with(name: &str, activations: Activations) -> Arc<Model> {
    load_options(name, activations, KvCache::default())
}

/// [`load`] with keys and values kept in f32, as the NumPy references keep them: what the
/// tight bounds against those references need.
#[allow(dead_code)] // not every test binary asks
pub fn load_exact(name: &str) -> Arc<Model> {
    load_options(name, Activations::default(), KvCache::F32)
}

fn load_options(name: &str, activations: Activations, kv_cache: KvCache) -> Arc<Model> {
    Model::load(
        &model_dir(name),
        &LoadOptions {
            verify: true,
            threads: 1,
            context: None,
            activations,
            kv_cache,
        },
    )
    .expect("model loads")
}

/// One step of the NumPy reference: tokens fed, logits after the last one.
pub struct RefStep {
    pub fed: Vec<u32>,
    pub logits: Vec<f32>,
}

pub fn reference(name: &str) -> Vec<RefStep> {
    reference_at(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../models/build")
            .join(format!("{name}.reference.json")),
    )
}

/// The NumPy reference steps in the JSON file `path`.
pub fn reference_at(path: &std::path::Path) -> Vec<RefStep> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let doc: serde_json::Value = serde_json::from_str(&text).expect("reference JSON");
    doc["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| RefStep {
            fed: s["fed"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect(),
            logits: s["logits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect(),
        })
        .collect()
}

/// Largest |a - b| relative to the largest |b| (the logits' own scale).
pub fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "logit vectors differ in length");
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// Copies a package directory into a temporary one (to damage it safely).
pub fn copy_package(name: &str) -> tempfile::TempDir {
    let src = model_dir(name);
    let dst = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dst.path().join(entry.file_name())).unwrap();
    }
    dst
}
