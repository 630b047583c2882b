//! `fieldllmd bench --perplexity FILE [--ctx N] [--kl-divergence F32_MODEL]`: the model's
//! quality on a text, computed the way llama.cpp's `llama-perplexity` does, so the two engines
//! can be compared on anyone's own text.
//!
//! The text is tokenized whole (no BOS: SmolLM2's GGUF says `add_bos_token = false`, and
//! llama-perplexity follows that), cut into chunks of `ctx` tokens, and in each chunk only the
//! second half is scored: the negative log-likelihood of each next token given everything
//! before it in the chunk. Our graph returns the last position's logits, so a chunk's first
//! half is fed at once and the scored half one token at a time.
//!
//! With `--kl-divergence`, a second model (the f32 package of the same GGUF) reads the same
//! tokens and each scored position compares the two distributions: mean KL(f32 || this) and
//! how often both pick the same top token.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context;
use fieldllm_engine::sampler::argmax;
use fieldllm_engine::{LoadOptions, Model, Session};
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
}

#[derive(Debug, Serialize)]
struct Report {
    model: String,
    weights: String,
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

fn load(dir: &Path, threads: usize) -> anyhow::Result<Arc<Model>> {
    Model::load(
        dir,
        &LoadOptions {
            verify: false,
            threads,
        },
    )
    .with_context(|| format!("loading {}", dir.display()))
}

fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let sum: f64 = logits.iter().map(|&v| (v as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    logits.iter().map(|&v| v as f64 - lse).collect()
}

/// Feeds one chunk and calls `score(position, logits)` for each scored position, whose next
/// token is `chunk[position + 1]`.
fn run_chunk(
    model: &Arc<Model>,
    chunk: &[u32],
    mut score: impl FnMut(usize, &[f32]),
) -> anyhow::Result<()> {
    let never = AtomicBool::new(false);
    let first = chunk.len() / 2;
    let mut s = Session::new(model)?;
    let mut logits = s.feed(&chunk[..=first], &never)?;
    for pos in first..chunk.len() - 1 {
        score(pos, &logits);
        if pos + 1 < chunk.len() - 1 {
            logits = s.feed(&chunk[pos + 1..pos + 2], &never)?;
        }
    }
    Ok(())
}

/// Runs the measurement and prints a table or JSON.
pub fn run(b: QualityBench, json: bool) -> anyhow::Result<()> {
    anyhow::ensure!(b.ctx >= 4, "--ctx must be at least 4 tokens");
    let text = std::fs::read_to_string(&b.text)
        .with_context(|| format!("reading {}", b.text.display()))?;
    let model = load(&b.model, b.threads)?;
    anyhow::ensure!(
        b.ctx <= model.context_length,
        "--ctx {} is larger than the model's context ({})",
        b.ctx,
        model.context_length
    );
    let tokens = model.tokenizer.encode(&text)?;
    let mut n_chunks = tokens.len() / b.ctx;
    if b.chunks > 0 {
        n_chunks = n_chunks.min(b.chunks);
    }
    anyhow::ensure!(
        n_chunks > 0,
        "{}: {} tokens, fewer than one chunk of --ctx {}",
        b.text.display(),
        tokens.len(),
        b.ctx
    );
    let reference = b
        .reference
        .as_deref()
        .map(|d| load(d, b.threads))
        .transpose()?;
    let (mut nll, mut nll_ref, mut kld, mut same, mut count) = (0f64, 0f64, 0f64, 0usize, 0usize);
    for c in 0..n_chunks {
        let chunk = &tokens[c * b.ctx..(c + 1) * b.ctx];
        let mut ours = Vec::new();
        run_chunk(&model, chunk, |pos, logits| {
            let lp = log_softmax(logits);
            nll -= lp[chunk[pos + 1] as usize];
            count += 1;
            if reference.is_some() {
                ours.push((lp, argmax(logits)));
            }
        })?;
        if let Some(r) = &reference {
            let mut i = 0;
            run_chunk(r, chunk, |pos, logits| {
                let lr = log_softmax(logits);
                nll_ref -= lr[chunk[pos + 1] as usize];
                let (lp, top) = &ours[i];
                kld += lr
                    .iter()
                    .zip(lp)
                    .map(|(a, b)| a.exp() * (a - b))
                    .sum::<f64>();
                same += usize::from(argmax(logits) == *top);
                i += 1;
            })?;
        }
        if !json {
            eprintln!(
                "[{}/{}] perplexity so far {:.4}",
                c + 1,
                n_chunks,
                (nll / count as f64).exp()
            );
        }
    }
    let m = model.manifest();
    let report = Report {
        model: m.model.name.clone(),
        weights: m.graph.weights.to_string(),
        text: b.text.display().to_string(),
        ctx: b.ctx,
        chunks: n_chunks,
        scored_tokens: count,
        perplexity: (nll / count as f64).exp(),
        reference: reference.map(|r| RefReport {
            model: r.manifest().model.name.clone(),
            weights: r.manifest().graph.weights.to_string(),
            perplexity: (nll_ref / count as f64).exp(),
            mean_kld: kld / count as f64,
            same_top1_pct: 100.0 * same as f64 / count as f64,
        }),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{} ({} weights) on {}: {} chunks of {} tokens, {} scored",
            report.model, report.weights, report.text, report.chunks, report.ctx, count
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
