//! The engine as the scheduler sees it: a small trait its workers call, so the scheduler's
//! rules (queue, priorities, cancel, deadlines, thermal limits, conversations) are tested
//! against a scripted engine whose timing the test controls, and the real model is one
//! implementation among others ([`ModelEngine`]).

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use fieldllm_engine::chat::Message;
use fieldllm_engine::{EngineError, Event, GenerateParams, Model, Outcome, Session, generate};

/// What the scheduler and the request checks need of a model.
pub trait Engine: Send + Sync + 'static {
    /// The token ids of a conversation's prompt, chat template applied; refuses what the model
    /// cannot take (special tokens in the text, an empty result).
    fn prompt(&self, messages: &[Message]) -> Result<Vec<u32>, EngineError>;

    /// Tokens the model holds: a prompt must leave room for one generated token.
    fn context_length(&self) -> usize;

    /// A fresh session (an empty KV cache).
    fn session(&self) -> Result<Box<dyn EngineSession>, EngineError>;
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
}

/// The real model.
#[derive(Debug, Clone)]
pub struct ModelEngine(pub Arc<Model>);

impl Engine for ModelEngine {
    fn prompt(&self, messages: &[Message]) -> Result<Vec<u32>, EngineError> {
        self.0.chat_prompt(messages)
    }

    fn context_length(&self) -> usize {
        self.0.context_length
    }

    fn session(&self) -> Result<Box<dyn EngineSession>, EngineError> {
        Ok(Box::new(Session::new(&self.0)?))
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
}
