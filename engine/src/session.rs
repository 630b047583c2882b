//! A conversation's state: the KV cache (inside tract's state) and the tokens it holds.
//!
//! A session either owns its tract state ([`Session::new`]) or is one slot of a state several
//! sessions share ([`crate::batch::Batcher::session`]), whose runs carry the rows of every
//! session that has tokens to feed at that moment.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tract_core::internal::*;
use tract_transformers::ops::dyn_kv_cache::DynKeyValueCacheState;

use super::attention::KvAttentionState;
use super::batch::Batcher;
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

/// Wall time spent in each kind of op over profiled runs ([`Session::feed_profiled`],
/// [`crate::batch::Batcher::start_profile`]).
#[derive(Debug, Default)]
pub struct OpProfile {
    /// Op name -> (nodes evaluated, total time).
    pub ops: std::collections::BTreeMap<String, (u64, std::time::Duration)>,
}

impl OpProfile {
    /// Counts one evaluation of an op named `op` that took `time`.
    pub fn add(&mut self, op: &str, time: std::time::Duration) {
        if let Some(e) = self.ops.get_mut(op) {
            e.0 += 1;
            e.1 += time;
        } else {
            self.ops.insert(op.to_string(), (1, time));
        }
    }
}

/// One conversation: its KV cache and the tokens in it. Sessions of one model are independent,
/// whether they own their state or share one.
#[derive(Debug)]
pub struct Session {
    model: Arc<Model>,
    exec: Exec,
    tokens: Vec<u32>,
}

/// Where a session's KV cache lives.
#[derive(Debug)]
enum Exec {
    /// In a tract state of its own.
    Own(Box<TypedSimpleState>),
    /// In slot `slot` of a batcher's state.
    Shared { batch: Arc<Batcher>, slot: usize },
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Exec::Shared { batch, slot } = &self.exec {
            batch.release(*slot);
        }
    }
}

impl Session {
    /// A fresh, empty session with a state of its own.
    pub fn new(model: &Arc<Model>) -> Result<Session, EngineError> {
        let state = SimpleState::new(&model.plan).map_err(EngineError::graph)?;
        Ok(Session {
            model: model.clone(),
            exec: Exec::Own(Box::new(state)),
            tokens: Vec::new(),
        })
    }

    /// A fresh, empty session in slot `slot` of `batch` (see [`Batcher::session`]).
    pub(crate) fn shared(batch: &Arc<Batcher>, slot: usize) -> Session {
        Session {
            model: batch.model().clone(),
            exec: Exec::Shared {
                batch: batch.clone(),
                slot,
            },
            tokens: Vec::new(),
        }
    }

    /// While the returned guard lives, this session counts as answering: a shared state's
    /// runs wait a moment for its next tokens rather than leave it for the next run.
    pub fn answering(&self) -> Option<impl Drop + use<>> {
        match &self.exec {
            Exec::Own(_) => None,
            Exec::Shared { batch, .. } => Some(batch.member()),
        }
    }

    /// This session's way to step out of its shared state's gathering while its caller waits
    /// between tokens ([`crate::batch::Presence`]).
    pub fn presence(&self) -> crate::batch::Presence {
        crate::batch::Presence(match &self.exec {
            Exec::Own(_) => None,
            Exec::Shared { batch, .. } => Some(batch.clone()),
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
        let mut rest = tokens;
        while !rest.is_empty() {
            if cancel.load(Ordering::Relaxed) {
                return Err(FeedError::Cancelled);
            }
            let size = match &self.exec {
                Exec::Own(_) => PREFILL_CHUNK,
                Exec::Shared { batch, .. } => batch.chunk_size(),
            };
            let (chunk, tail) = rest.split_at(size.min(rest.len()));
            logits = Some(self.run(chunk, None)?);
            rest = tail;
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
        let past = self.tokens.len();
        let logits = match &mut self.exec {
            Exec::Shared { batch, slot } => {
                if profile.is_some() {
                    return Err(EngineError::InvalidParam(
                        "a session sharing its state cannot be profiled".into(),
                    ));
                }
                batch.run(*slot, past, chunk)?
            }
            Exec::Own(state) => {
                heads_in_parallel(self.model.threads > 1 && chunk.len() > 1);
                let input = self.model.step_inputs(&[(0, past, chunk)])?;
                let out = match profile {
                    None => state.run(input),
                    Some(p) => state.run_plan_with_eval(input, |ctx, state, node, inputs| {
                        let start = std::time::Instant::now();
                        let out = tract_core::plan::eval(ctx, state, node, inputs);
                        p.add(node.op.name().as_ref(), start.elapsed());
                        out
                    }),
                }
                .map_err(EngineError::graph)?;
                self.model.step_logits(&out, 1)?.remove(0)
            }
        };
        self.tokens.extend_from_slice(chunk);
        Ok(logits)
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
        let state = match &mut self.exec {
            Exec::Own(state) => state,
            Exec::Shared { batch, slot } => {
                batch.truncate(*slot, len)?;
                self.tokens.truncate(len);
                return Ok(());
            }
        };
        let mut found = 0;
        for op in state.op_states.iter_mut().flatten() {
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
        match &mut self.exec {
            Exec::Own(state) => {
                **state = SimpleState::new(&self.model.plan).map_err(EngineError::graph)?
            }
            Exec::Shared { batch, slot } => batch.truncate(*slot, 0)?,
        }
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
