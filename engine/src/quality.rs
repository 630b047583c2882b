//! A model's quality on a text, computed the way llama.cpp's `llama-perplexity` does, so two
//! engines (or two instruction sets of ours) can be compared on anyone's own text.
//!
//! The tokens are cut into chunks of `ctx`, and in each chunk only the second half is scored:
//! the negative log-likelihood of each next token given everything before it in the chunk. Our
//! graph returns the last position's logits, so a chunk's first half is fed at once and the
//! scored half one token at a time.
//!
//! With a reference model (the f32 package of the same GGUF), it reads the same tokens and each
//! scored position compares the two distributions: mean KL(reference || model) and how often
//! both pick the same top token.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use crate::sampler::argmax;
use crate::session::FeedError;
use crate::{EngineError, Model, Session};

/// What [`measure`] found.
#[derive(Debug, Clone, PartialEq)]
pub struct Quality {
    /// Chunks scored.
    pub chunks: usize,
    /// Positions scored (half of each chunk).
    pub scored_tokens: usize,
    /// exp(mean negative log-likelihood).
    pub perplexity: f64,
    /// Against the reference model, when one was given.
    pub reference: Option<AgainstReference>,
}

/// The model against a reference on the same positions.
#[derive(Debug, Clone, PartialEq)]
pub struct AgainstReference {
    /// The reference's own perplexity.
    pub perplexity: f64,
    /// Mean KL(reference || model), nats.
    pub mean_kld: f64,
    /// Positions where both rank the same token first, percent.
    pub same_top1_pct: f64,
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
) -> Result<(), EngineError> {
    let never = AtomicBool::new(false);
    let feed = |s: &mut Session, tokens: &[u32]| {
        s.feed(tokens, &never).map_err(|e| match e {
            FeedError::Engine(e) => e,
            // nothing raises `never`
            FeedError::Cancelled => EngineError::Graph("cancelled".into()),
        })
    };
    let first = chunk.len() / 2;
    let mut s = Session::new(model)?;
    let mut logits = feed(&mut s, &chunk[..=first])?;
    for pos in first..chunk.len() - 1 {
        score(pos, &logits);
        if pos + 1 < chunk.len() - 1 {
            logits = feed(&mut s, &chunk[pos + 1..pos + 2])?;
        }
    }
    Ok(())
}

/// Scores `tokens` in chunks of `ctx` (at most `max_chunks`, 0: all), calling
/// `progress(done, of, perplexity so far)` after each chunk.
pub fn measure(
    model: &Arc<Model>,
    tokens: &[u32],
    ctx: usize,
    max_chunks: usize,
    reference: Option<&Arc<Model>>,
    mut progress: impl FnMut(usize, usize, f64),
) -> Result<Quality, EngineError> {
    if ctx < 4 {
        return Err(EngineError::InvalidParam(
            "a chunk must be at least 4 tokens".into(),
        ));
    }
    if ctx > model.context_length {
        return Err(EngineError::InvalidParam(format!(
            "a chunk of {ctx} tokens is larger than the model's context ({})",
            model.context_length
        )));
    }
    let mut n_chunks = tokens.len() / ctx;
    if max_chunks > 0 {
        n_chunks = n_chunks.min(max_chunks);
    }
    if n_chunks == 0 {
        return Err(EngineError::InvalidParam(format!(
            "{} tokens, fewer than one chunk of {ctx}",
            tokens.len()
        )));
    }
    let (mut nll, mut nll_ref, mut kld, mut same, mut count) = (0f64, 0f64, 0f64, 0usize, 0usize);
    for c in 0..n_chunks {
        let chunk = &tokens[c * ctx..(c + 1) * ctx];
        let mut ours = Vec::new();
        run_chunk(model, chunk, |pos, logits| {
            let lp = log_softmax(logits);
            nll -= lp[chunk[pos + 1] as usize];
            count += 1;
            if reference.is_some() {
                ours.push((lp, argmax(logits)));
            }
        })?;
        if let Some(r) = reference {
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
        progress(c + 1, n_chunks, (nll / count as f64).exp());
    }
    Ok(Quality {
        chunks: n_chunks,
        scored_tokens: count,
        perplexity: (nll / count as f64).exp(),
        reference: reference.map(|_| AgainstReference {
            perplexity: (nll_ref / count as f64).exp(),
            mean_kld: kld / count as f64,
            same_top1_pct: 100.0 * same as f64 / count as f64,
        }),
    })
}
