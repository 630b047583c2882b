//! What the scheduler sends back for a job: typed events that each transport encodes at its
//! own edge (MQTT messages, frames, terminal text). Every job gets chunks, then exactly one
//! final event: [`Reply::Done`] or [`Reply::Failed`].

use std::sync::Arc;

use fieldllm_engine::generate::Candidate;

use crate::docs::ground::Citations;

/// One event of a job's answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// Text as it is generated.
    Chunk(Chunk),
    /// The answer ended (final).
    Done(Done),
    /// The job was refused or failed (final).
    Failed(Failure),
}

impl Reply {
    /// The request id it answers.
    pub fn id(&self) -> &str {
        match self {
            Reply::Chunk(c) => &c.id,
            Reply::Done(d) => &d.id,
            Reply::Failed(f) => &f.id,
        }
    }

    /// Whether nothing follows it for this id.
    pub fn is_final(&self) -> bool {
        !matches!(self, Reply::Chunk(_))
    }
}

/// A piece of the answer's text.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    /// Request id.
    pub id: String,
    /// 0, 1, 2, ... per request.
    pub seq: u32,
    /// The text.
    pub text: String,
    /// The top candidates of each token in it, when the request asked for them.
    pub logprobs: Vec<TokenLogprobs>,
}

/// One generated token's log-probability and its top alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// The chosen token's id.
    pub token_id: u32,
    /// Its text.
    pub token: String,
    /// Its log-probability.
    pub logprob: f32,
    /// The most likely candidates, best first.
    pub top: Vec<Candidate>,
}

/// Why an answer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// End of sequence or a stop string.
    Stop,
    /// `max_tokens` or the context filled.
    Length,
    /// Cancelled by the client, a vanished port, or shutdown.
    Cancelled,
    /// Its deadline passed.
    Deadline,
    /// The accelerator reached its critical temperature.
    Thermal,
}

/// Tokens read and written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Prompt tokens fed (a conversation's kept cache is not fed again).
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
}

/// Where the time went, milliseconds and tokens per second.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Timings {
    /// Waiting in the queue.
    pub queue_ms: f32,
    /// Feeding the prompt.
    pub prompt_ms: f32,
    /// From the start of the prompt to the first token.
    pub first_token_ms: f32,
    /// From arrival to the end.
    pub total_ms: f32,
    /// Prompt speed.
    pub prompt_tok_s: f32,
    /// Generation speed.
    pub decode_tok_s: f32,
}

/// The final event of an answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Done {
    /// Request id.
    pub id: String,
    /// The number of chunks sent before it.
    pub seq: u32,
    /// Why it ended.
    pub finish: Finish,
    /// Tokens.
    pub usage: Usage,
    /// Timings.
    pub timings: Timings,
    /// What a grounded answer cites (its job's).
    pub citations: Option<Arc<Citations>>,
}

/// Why a request got no answer (or an incomplete one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// It breaks a rule (id, parameters, prompt).
    BadRequest,
    /// It is larger than allowed (payload, prompt bytes, context).
    TooLarge,
    /// The queue is full.
    Busy,
    /// The accelerator is too hot to take work.
    Overheated,
    /// The model failed.
    ModelError,
    /// The daemon failed, or is stopping.
    Internal,
    /// A request for an answer from the documents that no passage is relevant to.
    NotCovered,
}

/// A refusal or failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Request id ("" when it could not be read).
    pub id: String,
    /// What kind.
    pub code: Code,
    /// What is wrong, for a person.
    pub message: String,
    /// Jobs waiting when it was refused (0 when not about the queue).
    pub queue_depth: u32,
    /// When to try again, for `busy` and `overheated` (0: not applicable).
    pub retry_after_ms: u32,
}

impl Failure {
    /// A failure of `code` with nothing about the queue.
    pub fn new(id: &str, code: Code, message: impl Into<String>) -> Failure {
        Failure {
            id: id.to_string(),
            code,
            message: message.into(),
            queue_depth: 0,
            retry_after_ms: 0,
        }
    }
}
