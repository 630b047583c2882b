//! `fieldllmd bench --perplexity FILE [--ctx N] [--kl-divergence F32_MODEL]`: the model's
//! quality on a text, computed the way llama.cpp's `llama-perplexity` does, so the two engines
//! can be compared on anyone's own text.
//!
//! The text is tokenized whole (no BOS: SmolLM2's GGUF says `add_bos_token = false`, and
//! llama-perplexity follows that) and scored by `fieldllm_engine::quality`; with
//! `--kl-divergence`, against a second model (the f32 package of the same GGUF).

use std::path::PathBuf;

use anyhow::Context;
use fieldllm_engine::ggml::Activations;
use fieldllm_engine::quality;

use super::bench::load_model;
use fieldllm_engine::attention::KvCache;
use serde::Serialize;

/// What `--perplexity` measures.
#[derive(Debug)]
pub struct QualityBench {
    /// The model under test.
    pub model: PathBuf,
    /// The text.
    pub text: PathBuf,
    /// Tokens per chunk.
    pub ctx: usize,
    /// At most this many chunks (0: all).
    pub chunks: usize,
    /// Reference model for the KL divergence.
    pub reference: Option<PathBuf>,
    /// Threads for each model.
    pub threads: usize,
    /// What the products quantize activations to (both models).
    pub activations: Activations,
    /// What the model's KV caches keep keys and values as (the f32 reference's: f32).
    pub kv_cache: KvCache,
}

#[derive(Debug, Serialize)]
struct Report {
    model: String,
    weights: String,
    activations: String,
    kv_cache: String,
    text: String,
    ctx: usize,
    chunks: usize,
    scored_tokens: usize,
    perplexity: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    reference: Option<RefReport>,
}

#[derive(Debug, Serialize)]
struct RefReport {
    model: String,
    weights: String,
    perplexity: f64,
    mean_kld: f64,
    same_top1_pct: f64,
}

/// Runs the measurement and prints a table or JSON.
pub fn run(b: QualityBench, json: bool) -> anyhow::Result<()> {
    anyhow::ensure!(b.ctx >= 4, "--ctx must be at least 4 tokens");
    let text = std::fs::read_to_string(&b.text)
        .with_context(|| format!("reading {}", b.text.display()))?;
    let model = load_model(&b.model, b.threads, b.activations, b.kv_cache)?;
    anyhow::ensure!(
        b.ctx <= model.context_length,
        "--ctx {} is larger than the model's context ({})",
        b.ctx,
        model.context_length
    );
    let tokens = model.tokenizer.encode(&text)?;
    let reference = b
        .reference
        .as_deref()
        .map(|d| load_model(d, b.threads, b.activations, KvCache::F32))
        .transpose()?;
    let q = quality::measure(
        &model,
        &tokens,
        b.ctx,
        b.chunks,
        reference.as_ref(),
        |done, of, so_far| {
            if !json {
                eprintln!("[{done}/{of}] perplexity so far {so_far:.4}");
            }
        },
    )
    .with_context(|| format!("{}", b.text.display()))?;
    let m = model.manifest();
    let report = Report {
        model: m.model.name.clone(),
        weights: m.graph.weights.to_string(),
        activations: b.activations.to_string(),
        kv_cache: b.kv_cache.to_string(),
        text: b.text.display().to_string(),
        ctx: b.ctx,
        chunks: q.chunks,
        scored_tokens: q.scored_tokens,
        perplexity: q.perplexity,
        reference: reference.zip(q.reference).map(|(r, q)| RefReport {
            model: r.manifest().model.name.clone(),
            weights: r.manifest().graph.weights.to_string(),
            perplexity: q.perplexity,
            mean_kld: q.mean_kld,
            same_top1_pct: q.same_top1_pct,
        }),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{} ({} weights, {} activations, {} KV cache) on {}: {} chunks of {} tokens, {} scored",
            report.model,
            report.weights,
            report.activations,
            report.kv_cache,
            report.text,
            report.chunks,
            report.ctx,
            report.scored_tokens
        );
        println!("perplexity {:.4}", report.perplexity);
        if let Some(r) = &report.reference {
            println!(
                "reference {} ({} weights): perplexity {:.4}; mean KLD {:.6}; same top-1 {:.2}%",
                r.model, r.weights, r.perplexity, r.mean_kld, r.same_top1_pct
            );
        }
    }
    Ok(())
}
