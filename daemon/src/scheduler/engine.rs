//! The engine as the scheduler sees it: a small trait its workers call, so the scheduler's
//! rules (queue, priorities, cancel, deadlines, thermal limits, conversations) are tested
//! against a scripted engine whose timing the test controls, and the real model is one
//! implementation among others ([`ModelEngine`]).

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use fieldllm_engine::batch::Presence;
use fieldllm_engine::chat::Message;
use fieldllm_engine::{
    Batcher, EngineError, Event, GenerateParams, Model, Outcome, Session, generate,
};

/// What the scheduler and the request checks need of a model.
pub trait Engine: Send + Sync + 'static {
    /// The token ids of a conversation's prompt, chat template applied; refuses what the model
    /// cannot take (special tokens in the text, an empty result).
    fn prompt(&self, messages: &[Message]) -> Result<Vec<u32>, EngineError>;

    /// Tokens the model holds: a prompt must leave room for one generated token.
    fn context_length(&self) -> usize;

    /// A fresh session (an empty KV cache).
    fn session(&self) -> Result<Box<dyn EngineSession>, EngineError>;

    /// Bytes of KV cache one token of a conversation takes (0: not counted): what the
    /// scheduler's KV budget reserves per token of a running answer.
    fn kv_bytes_per_token(&self) -> u64 {
        0
    }
}

/// One conversation's state in an [`Engine`].
pub trait EngineSession: Send {
    /// Answers `prompt`, the whole conversation so far, feeding only what the session does not
    /// already hold; reports every token through `on_event` and returns when the answer ends
    /// (`cancel` raised: [`fieldllm_engine::FinishReason::Cancelled`]).
    fn generate(
        &mut self,
        prompt: &[u32],
        params: &GenerateParams,
        cancel: &AtomicBool,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<Outcome, EngineError>;

    /// How an answer steps out of the answers decoded with it while its worker paces it (the
    /// others' steps then do not wait for it); of an engine that batches nothing, nothing.
    fn presence(&self) -> Presence {
        Presence::default()
    }
}

/// The real model. Its sessions share one batcher when the model's rows are open (answers
/// running at once are decoded together, [`fieldllm_engine::batch`]), else each has a state of
/// its own.
#[derive(Debug, Clone)]
pub struct ModelEngine {
    model: Arc<Model>,
    batch: Option<Arc<Batcher>>,
}

impl ModelEngine {
    /// The engine of `model`: answers decoded together when `batched` and the model allows it.
    pub fn new(model: Arc<Model>, batched: bool) -> Result<ModelEngine, EngineError> {
        let batch = if batched && model.rows {
            Some(Batcher::new(&model)?)
        } else {
            None
        };
        if batched && batch.is_none() {
            tracing::info!("this model's graph runs one answer at a time: answers are not batched");
        }
        Ok(ModelEngine { model, batch })
    }

    /// The batcher, when answers are decoded together.
    pub fn batcher(&self) -> Option<&Arc<Batcher>> {
        self.batch.as_ref()
    }
}

impl Engine for ModelEngine {
    fn prompt(&self, messages: &[Message]) -> Result<Vec<u32>, EngineError> {
        self.model.chat_prompt(messages)
    }

    fn context_length(&self) -> usize {
        self.model.context_length
    }

    fn session(&self) -> Result<Box<dyn EngineSession>, EngineError> {
        Ok(Box::new(match &self.batch {
            Some(b) => b.session()?,
            None => Session::new(&self.model)?,
        }))
    }

    fn kv_bytes_per_token(&self) -> u64 {
        fieldllm_engine::graph::kv_bytes(
            &self.model.manifest().architecture,
            1,
            self.model.kv_cache,
        )
    }
}

impl EngineSession for Session {
    fn generate(
        &mut self,
        prompt: &[u32],
        params: &GenerateParams,
        cancel: &AtomicBool,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<Outcome, EngineError> {
        let kept = self.tokens().len();
        let new = self.continue_with(prompt)?;
        if kept > 0 {
            tracing::debug!(
                reused = self.tokens().len(),
                dropped = kept - self.tokens().len(),
                new = new.len(),
                "conversation cache reused"
            );
        }
        generate(self, new, params, cancel, on_event)
    }

    fn presence(&self) -> Presence {
        Session::presence(self)
    }
}
