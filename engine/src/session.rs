//! A conversation's state: the KV cache (inside tract's state) and the tokens it holds.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tract_core::internal::*;
use tract_transformers::ops::dyn_kv_cache::DynKeyValueCacheState;

use super::attention::KvAttentionState;
use super::{EngineError, Model};

/// Prefill is run in chunks of this many tokens so a cancel is seen between chunks and the
/// activations of a long prompt stay small.
pub const PREFILL_CHUNK: usize = 128;

/// Why [`Session::feed`] returned without logits.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    /// The cancel flag was raised; the tokens fed before it stay in the cache.
    #[error("cancelled")]
    Cancelled,
    /// The engine failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// Whether tract's flash attention spreads its heads over rayon's global pool (all cores,
/// whatever `threads` says). Worth it for a prefill chunk; for one token the wake-ups cost more
/// than 9 tiny heads gain, and rayon's idle workers spin on `sched_yield` over the cores our own
/// split needs: single-threaded heads measured decode +30% at 1 thread, +5% at 2
/// (docs/performance.md). The knob is process-wide: sessions switching it concurrently only
/// change how the heads are scheduled, never a result (each head is computed the same way).
fn heads_in_parallel(on: bool) {
    use tract_transformers::ops::flash_sdpa::TRACT_FLASH_SDPA_ST;
    static CURRENT: std::sync::Mutex<Option<bool>> = std::sync::Mutex::new(None);
    let mut current = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
    if *current != Some(on) {
        TRACT_FLASH_SDPA_ST.set(!on);
        *current = Some(on);
    }
}

/// Wall time spent in each kind of op over profiled runs ([`Session::feed_profiled`]).
#[derive(Debug, Default)]
pub struct OpProfile {
    /// Op name -> (nodes evaluated, total time).
    pub ops: std::collections::BTreeMap<String, (u64, std::time::Duration)>,
}

/// One conversation. Owns its KV cache; sessions of one model are independent.
#[derive(Debug)]
pub struct Session {
    model: Arc<Model>,
    state: TypedSimpleState,
    tokens: Vec<u32>,
}

impl Session {
    /// A fresh, empty session.
    pub fn new(model: &Arc<Model>) -> Result<Session, EngineError> {
        let state = SimpleState::new(&model.plan).map_err(EngineError::graph)?;
        Ok(Session {
            model: model.clone(),
            state,
            tokens: Vec::new(),
        })
    }

    /// The model.
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Tokens already in the KV cache.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Room left in the context window.
    pub fn remaining(&self) -> usize {
        self.model.context_length.saturating_sub(self.tokens.len())
    }

    /// Runs `tokens` through the model (in chunks), appending them to the cache; returns the
    /// logits after the last one. Checks `cancel` between chunks.
    pub fn feed(&mut self, tokens: &[u32], cancel: &AtomicBool) -> Result<Vec<f32>, FeedError> {
        self.check(tokens)?;
        let mut logits = None;
        for chunk in tokens.chunks(PREFILL_CHUNK) {
            if cancel.load(Ordering::Relaxed) {
                return Err(FeedError::Cancelled);
            }
            logits = Some(self.run(chunk, None)?);
        }
        logits.ok_or(FeedError::Engine(EngineError::EmptyPrompt))
    }

    /// What [`Session::feed`] refuses: nothing to feed, more than the context holds, ids
    /// outside the vocabulary.
    fn check(&self, tokens: &[u32]) -> Result<(), EngineError> {
        if tokens.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if tokens.len() > self.remaining() {
            return Err(EngineError::PromptTooLong {
                tokens: self.tokens.len() + tokens.len(),
                context: self.model.context_length,
            });
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.model.vocab) {
            return Err(EngineError::InvalidParam(format!(
                "token id {bad} is outside the vocabulary"
            )));
        }
        Ok(())
    }

    /// As [`Session::feed`] for one chunk (at most [`PREFILL_CHUNK`] tokens, no cancel),
    /// timing every node of the graph into `profile`: where a token's time goes, by op.
    pub fn feed_profiled(
        &mut self,
        tokens: &[u32],
        profile: &mut OpProfile,
    ) -> Result<Vec<f32>, EngineError> {
        self.check(tokens)?;
        if tokens.len() > PREFILL_CHUNK {
            return Err(EngineError::InvalidParam(format!(
                "a profiled run takes at most {PREFILL_CHUNK} tokens"
            )));
        }
        self.run(tokens, Some(profile))
    }

    fn run(
        &mut self,
        chunk: &[u32],
        profile: Option<&mut OpProfile>,
    ) -> Result<Vec<f32>, EngineError> {
        heads_in_parallel(self.model.threads > 1 && chunk.len() > 1);
        let ids: Vec<i64> = chunk.iter().map(|&t| t as i64).collect();
        let input = Tensor::from_shape(&[1, ids.len()], &ids).map_err(EngineError::graph)?;
        let input = tvec![input.into_tvalue()];
        let out = match profile {
            None => self.state.run(input),
            Some(p) => self
                .state
                .run_plan_with_eval(input, |ctx, state, node, inputs| {
                    let start = std::time::Instant::now();
                    let out = tract_core::plan::eval(ctx, state, node, inputs);
                    let entry = p.ops.entry(node.op.name().to_string()).or_default();
                    entry.0 += 1;
                    entry.1 += start.elapsed();
                    out
                }),
        }
        .map_err(EngineError::graph)?;
        self.tokens.extend_from_slice(chunk);
        let logits = out[0].cast_to::<f32>().map_err(EngineError::graph)?;
        let view = logits.try_as_plain_ram().map_err(EngineError::graph)?;
        let slice = view.as_slice::<f32>().map_err(EngineError::graph)?;
        if slice.len() != self.model.vocab {
            return Err(EngineError::Graph(format!(
                "logits have {} values, expected {}",
                slice.len(),
                self.model.vocab
            )));
        }
        Ok(slice.to_vec())
    }

    /// Forgets everything after the first `len` tokens (a conversation that diverged, or a
    /// stop string cut the answer). Falls back to a fresh state if the graph has no
    /// truncatable cache.
    pub fn truncate(&mut self, len: usize) -> Result<(), EngineError> {
        if len >= self.tokens.len() {
            return Ok(());
        }
        if len == 0 {
            return self.reset();
        }
        let mut found = 0;
        for op in self.state.op_states.iter_mut().flatten() {
            if let Some(kv) = op.downcast_mut::<DynKeyValueCacheState>() {
                kv.truncate(len).map_err(EngineError::graph)?;
                found += 1;
            } else if let Some(kv) = op.downcast_mut::<KvAttentionState>() {
                kv.truncate(len);
                found += 1;
            }
        }
        if found == 0 {
            let keep = self.tokens[..len].to_vec();
            self.reset()?;
            let never = AtomicBool::new(false);
            self.feed(&keep, &never).map_err(|e| match e {
                FeedError::Engine(e) => e,
                FeedError::Cancelled => EngineError::Graph("cancelled while re-feeding".into()),
            })?;
            return Ok(());
        }
        self.tokens.truncate(len);
        Ok(())
    }

    /// Prepares this session to answer `prompt`, the whole conversation so far: keeps the
    /// longest cached prefix the prompt shares (at most all but its last token, so there are
    /// logits to sample from), rolls the cache back to it, and returns the part of `prompt`
    /// still to feed. A cache that cannot be rolled back is emptied (everything is fed again).
    pub fn continue_with<'p>(&mut self, prompt: &'p [u32]) -> Result<&'p [u32], EngineError> {
        let common = reusable_prefix(&self.tokens, prompt);
        if common < self.tokens.len()
            && let Err(e) = self.truncate(common)
        {
            tracing::warn!(error = %e, "could not roll the conversation's cache back: starting afresh");
            self.reset()?;
        }
        Ok(&prompt[self.tokens.len()..])
    }

    /// Empties the cache.
    pub fn reset(&mut self) -> Result<(), EngineError> {
        self.state = SimpleState::new(&self.model.plan).map_err(EngineError::graph)?;
        self.tokens.clear();
        Ok(())
    }
}

/// How many of `held`'s tokens a session answering `prompt` keeps: the longest prefix the two
/// share, but never all of `prompt` (its last token is fed again, so there are logits to sample
/// from). [`Session::continue_with`]'s rule, for whoever keeps a cache of their own.
pub fn reusable_prefix(held: &[u32], prompt: &[u32]) -> usize {
    held.iter()
        .zip(prompt)
        .take_while(|(a, b)| a == b)
        .count()
        .min(prompt.len().saturating_sub(1))
}
