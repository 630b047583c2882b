//! Sentence embeddings for document search: a BERT-family encoder package (what
//! `models/fieldllm_convert embedder` writes from all-MiniLM-L6-v2) run by tract, mean-pooled
//! over the tokens and L2-normalized, so a dot product is the cosine similarity.
//!
//! Its package follows the LLM's rules (`manifest.toml`, sha256 of every file, verified before
//! load) with a manifest of its own: an encoder has no chat template, KV cache or EOS.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tract_core::internal::*;
use tract_core::runtime::RunOptions;
use tract_linalg::multithread::Executor;
use tract_onnx::prelude::InferenceModelExt;

use super::EngineError;
use super::package::{GraphFormat, MANIFEST, WeightFormat, read_manifest, verify_files};

/// Texts run through the network at once: enough to fill the products, few enough that a
/// batch's padding (to its longest text) stays small.
pub const BATCH: usize = 16;

/// `manifest.toml` of an embedding package.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbedManifest {
    /// Layout version of this file.
    pub format_version: u32,
    /// What the model is.
    pub model: EmbedModelInfo,
    /// Where the weights came from.
    #[serde(default)]
    pub source: BTreeMap<String, String>,
    /// The network file.
    pub graph: EmbedGraph,
    /// sha256 of every file, by relative path.
    pub files: BTreeMap<String, String>,
}

/// `[model]` of an embedding package.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbedModelInfo {
    /// Package name, e.g. `all-minilm-l6-v2`: what a document index records it was made with.
    pub name: String,
    /// Architecture family (`bert`).
    pub family: String,
    /// Number of weights.
    pub parameters: u64,
    /// Longest text in tokens; the tokenizer truncates there.
    pub max_tokens: usize,
    /// Length of an embedding.
    pub dimensions: usize,
    /// How token states become one vector (`mean` over the attention mask).
    pub pooling: String,
    /// Whether the vector is scaled to length 1.
    pub normalize: bool,
    /// License name.
    pub license: String,
}

/// `[graph]` of an embedding package.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbedGraph {
    /// Container: ONNX (inputs `input_ids`, `attention_mask` [B, S]; output [B, S, dimensions]).
    pub format: GraphFormat,
    /// File name inside the package.
    pub file: String,
    /// Weight format (f32).
    pub weights: WeightFormat,
}

type Plan = Arc<TypedSimplePlan>;

/// A loaded embedding model.
pub struct Embedder {
    dir: PathBuf,
    manifest: EmbedManifest,
    tokenizer: tokenizers::Tokenizer,
    plan: Plan,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder")
            .field("dir", &self.dir)
            .field("model", &self.manifest.model.name)
            .finish()
    }
}

impl Embedder {
    /// Loads the package in `dir`, checking every file's sha256 first.
    pub fn load(dir: &Path, threads: usize) -> Result<Embedder, EngineError> {
        let start = Instant::now();
        let manifest = open_manifest(dir)?;
        verify_files(dir, &manifest.files)?;
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", tok_path.display())))?;
        let path = dir.join(&manifest.graph.file);
        let graph = |e: TractError| EngineError::Graph(format!("{}: {e:#}", path.display()));
        let typed = tract_onnx::onnx()
            .model_for_path(&path)
            .and_then(|m| m.into_typed())
            .map_err(graph)?;
        let optimized = typed.into_optimized().map_err(graph)?;
        let out = optimized.output_fact(0).map_err(graph)?;
        let width = out.shape.last().and_then(|d| d.to_usize().ok());
        if out.rank() != 3 || width != Some(manifest.model.dimensions) {
            return Err(EngineError::Graph(format!(
                "{}: output is {out:?}, the manifest says [B, S, {}]",
                path.display(),
                manifest.model.dimensions
            )));
        }
        let executor = if threads > 1 {
            Executor::multithread(threads)
        } else {
            Executor::SingleThread
        };
        let options = RunOptions {
            executor: Some(executor),
            ..RunOptions::default()
        };
        let plan = SimplePlan::new_with_options(optimized, &options).map_err(graph)?;
        tracing::info!(
            model = %manifest.model.name,
            threads,
            load_ms = start.elapsed().as_millis() as u64,
            "embedding model loaded"
        );
        Ok(Embedder {
            dir: dir.to_path_buf(),
            manifest,
            tokenizer,
            plan,
        })
    }

    /// The package's manifest.
    pub fn manifest(&self) -> &EmbedManifest {
        &self.manifest
    }

    /// Length of an embedding.
    pub fn dimensions(&self) -> usize {
        self.manifest.model.dimensions
    }

    /// Token ids of `text` as the network sees it (with its special tokens, truncated at
    /// `max_tokens`).
    pub fn token_ids(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        let mut ids = enc.get_ids().to_vec();
        ids.truncate(self.manifest.model.max_tokens);
        Ok(ids)
    }

    /// One unit-length vector per text, in order. Texts run [`BATCH`] at a time, grouped by
    /// length so a batch pads little.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EngineError> {
        let ids: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| self.token_ids(t))
            .collect::<Result<_, _>>()?;
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| ids[i].len());
        let mut out = vec![Vec::new(); texts.len()];
        for group in order.chunks(BATCH) {
            let batch: Vec<&[u32]> = group.iter().map(|&i| ids[i].as_slice()).collect();
            for (&i, v) in group.iter().zip(self.run(&batch)?) {
                out[i] = v;
            }
        }
        Ok(out)
    }

    fn run(&self, batch: &[&[u32]]) -> Result<Vec<Vec<f32>>, EngineError> {
        let b = batch.len();
        let s = batch.iter().map(|t| t.len()).max().unwrap_or(0).max(1);
        let mut ids = vec![0i64; b * s];
        let mut mask = vec![0i64; b * s];
        for (row, t) in batch.iter().enumerate() {
            for (col, &id) in t.iter().enumerate() {
                ids[row * s + col] = i64::from(id);
                mask[row * s + col] = 1;
            }
        }
        let ids = tract_ndarray::Array2::from_shape_vec((b, s), ids).map_err(EngineError::graph)?;
        let mask_arr = tract_ndarray::Array2::from_shape_vec((b, s), mask.clone())
            .map_err(EngineError::graph)?;
        let outputs = self
            .plan
            .run(tvec!(
                Tensor::from(ids).into_tvalue(),
                Tensor::from(mask_arr).into_tvalue()
            ))
            .map_err(EngineError::graph)?;
        let hidden = outputs[0]
            .to_plain_array_view::<f32>()
            .map_err(EngineError::graph)?;
        let d = self.dimensions();
        let mut vectors = Vec::with_capacity(b);
        for row in 0..b {
            let mut v = vec![0f32; d];
            let mut n = 0f32;
            for col in 0..s {
                if mask[row * s + col] == 1 {
                    n += 1.0;
                    for (acc, x) in v
                        .iter_mut()
                        .zip(hidden.slice(tract_ndarray::s![row, col, ..]))
                    {
                        *acc += *x;
                    }
                }
            }
            v.iter_mut().for_each(|x| *x /= n.max(1.0));
            if self.manifest.model.normalize {
                normalize(&mut v);
            }
            vectors.push(v);
        }
        Ok(vectors)
    }
}

/// Scales `v` to length 1 (a zero vector stays zero).
pub fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 1e-12 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

/// Reads and checks `DIR/manifest.toml` of an embedding package (no hashing).
pub fn open_manifest(dir: &Path) -> Result<EmbedManifest, EngineError> {
    let m: EmbedManifest = read_manifest(dir)?;
    let bad = |message: String| EngineError::Manifest {
        path: dir.join(MANIFEST),
        message,
    };
    if m.model.pooling != "mean" {
        return Err(bad(format!(
            "pooling {:?} is not supported (mean is)",
            m.model.pooling
        )));
    }
    if m.graph.format != GraphFormat::Onnx || m.graph.weights != WeightFormat::F32 {
        return Err(bad(
            "an embedding package holds an ONNX graph with f32 weights".into(),
        ));
    }
    if m.model.dimensions == 0 || m.model.max_tokens == 0 {
        return Err(bad("dimensions and max_tokens must be positive".into()));
    }
    for name in [&m.graph.file, &"tokenizer.json".to_string()] {
        if !m.files.contains_key(name) {
            return Err(bad(format!("[files] has no hash for {name:?}")));
        }
    }
    Ok(m)
}
