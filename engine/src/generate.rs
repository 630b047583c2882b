//! The generation loop: prefill, then sample / detokenize / stop-check / feed, one token at a time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::EngineError;
use super::sampler::{Sampler, SamplingParams, logprob_of, top_logprobs};
use super::session::{FeedError, Session};
use super::stop::StopMatcher;

/// Most candidates a request may ask for per token.
pub const MAX_LOGPROBS: usize = 20;

/// Everything a request sets about one answer.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    /// Sampling.
    pub sampling: SamplingParams,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Strings that end the answer (not included in it).
    pub stop: Vec<String>,
    /// Top-K candidates with log-probabilities per token (0 = none).
    pub logprobs: usize,
}

/// Most tokens an answer has unless asked otherwise (also the daemon's `[limits] max_tokens`).
pub const DEFAULT_MAX_TOKENS: usize = 512;

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            sampling: SamplingParams::default(),
            max_tokens: DEFAULT_MAX_TOKENS,
            stop: Vec::new(),
            logprobs: 0,
        }
    }
}

impl GenerateParams {
    /// Checks every parameter; the error names the first bad one.
    pub fn validate(&self) -> Result<(), EngineError> {
        self.sampling.validate()?;
        if self.max_tokens == 0 {
            return Err(EngineError::InvalidParam(
                "max_tokens must be at least 1".into(),
            ));
        }
        if self.logprobs > MAX_LOGPROBS {
            return Err(EngineError::InvalidParam(format!(
                "logprobs must be at most {MAX_LOGPROBS}, got {}",
                self.logprobs
            )));
        }
        Ok(())
    }
}

/// Why an answer ended (DESIGN.md section 3's finish reasons the engine can give).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// End-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` reached or the context window is full.
    Length,
    /// The cancel flag was raised.
    Cancelled,
}

/// One candidate token with its log-probability.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Candidate {
    /// Token id.
    pub id: u32,
    /// Token text (lossy for a partial character).
    pub token: String,
    /// Natural log of its probability.
    pub logprob: f32,
}

/// What the loop reports as it goes.
#[derive(Debug)]
pub enum Event<'a> {
    /// One generated token. `text` is what became safe to show (may be empty while a character
    /// or a possible stop string is incomplete).
    Token {
        /// Token id.
        id: u32,
        /// Text released by this token.
        text: &'a str,
        /// The chosen token and the top candidates, when asked for.
        logprobs: Option<(Candidate, Vec<Candidate>)>,
    },
    /// Text released at the end (held-back text once no stop string can match).
    Tail(&'a str),
}

/// Per-answer timings.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    /// Prefill time.
    pub prompt_ms: f64,
    /// From the call to the first generated token.
    pub first_token_ms: f64,
    /// Time spent generating after the first token.
    pub decode_ms: f64,
    /// Prompt tokens per second.
    pub prompt_tok_s: f64,
    /// Generated tokens per second (after the first).
    pub decode_tok_s: f64,
}

/// How an answer ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Why it ended.
    pub finish: FinishReason,
    /// The answer as shown.
    pub text: String,
    /// Generated ids.
    pub tokens: Vec<u32>,
    /// Prompt tokens run this call (not counting a reused cache).
    pub prompt_tokens: usize,
    /// Timings.
    pub timings: Timings,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn per_s(n: usize, d: Duration) -> f64 {
    if d.is_zero() {
        0.0
    } else {
        n as f64 / d.as_secs_f64()
    }
}

/// Feeds `prompt` (the new tokens of this turn) to `session` and generates an answer, calling
/// `on_event` for each token. Validates parameters and the context before any work.
pub fn generate(
    session: &mut Session,
    prompt: &[u32],
    params: &GenerateParams,
    cancel: &AtomicBool,
    on_event: &mut dyn FnMut(Event<'_>),
) -> Result<Outcome, EngineError> {
    params.validate()?;
    if prompt.is_empty() {
        return Err(EngineError::EmptyPrompt);
    }
    let context = session.model().context_length;
    // the prompt must leave room for at least one generated token
    if session.tokens().len() + prompt.len() >= context {
        return Err(EngineError::PromptTooLong {
            tokens: session.tokens().len() + prompt.len(),
            context,
        });
    }
    let model = session.model().clone();
    // a shared state's runs wait for this answer's tokens while it lasts
    let _answering = session.answering();
    let start = Instant::now();
    let mut outcome = Outcome {
        finish: FinishReason::Cancelled,
        text: String::new(),
        tokens: Vec::new(),
        prompt_tokens: prompt.len(),
        timings: Timings::default(),
    };
    let mut logits = match session.feed(prompt, cancel) {
        Ok(l) => l,
        Err(FeedError::Cancelled) => return Ok(outcome),
        Err(FeedError::Engine(e)) => return Err(e),
    };
    let prompt_time = start.elapsed();
    outcome.timings.prompt_ms = ms(prompt_time);
    outcome.timings.prompt_tok_s = per_s(prompt.len(), prompt_time);

    let mut sampler = Sampler::new(params.sampling.clone());
    let mut utf8 = model.tokenizer.answer_stream();
    let mut stops = StopMatcher::new(&params.stop);
    let mut history: Vec<u32> = session.tokens().to_vec();
    let mut first_token_at = None;
    let mut matched_stop = false;
    let eos = model.eos();
    let finish = loop {
        let lp = (params.logprobs > 0).then(|| {
            let top = top_logprobs(&logits, params.logprobs);
            (logits.clone(), top)
        });
        let id = sampler.sample(&mut logits, &history);
        first_token_at.get_or_insert_with(Instant::now);
        if eos.contains(&id) {
            break FinishReason::Stop;
        }
        outcome.tokens.push(id);
        history.push(id);
        let step = stops.push(&utf8.push(model.tokenizer.token_bytes(id)));
        outcome.text.push_str(&step.emit);
        let logprobs = lp.map(|(raw, top)| {
            let cand = |(i, l): (u32, f32)| Candidate {
                id: i,
                token: model.tokenizer.token_display(i),
                logprob: l,
            };
            (
                cand((id, logprob_of(&raw, id))),
                top.into_iter().map(cand).collect(),
            )
        });
        on_event(Event::Token {
            id,
            text: &step.emit,
            logprobs,
        });
        if step.stopped {
            matched_stop = true;
            break FinishReason::Stop;
        }
        // continuing needs two free positions: one to feed this token, one for the next
        if outcome.tokens.len() >= params.max_tokens || session.remaining() <= 1 {
            break FinishReason::Length;
        }
        if cancel.load(Ordering::Relaxed) {
            break FinishReason::Cancelled;
        }
        logits = match session.feed(&[id], cancel) {
            Ok(l) => l,
            Err(FeedError::Cancelled) => break FinishReason::Cancelled,
            Err(FeedError::Engine(e)) => return Err(e),
        };
    };
    if !matched_stop {
        // the answer ended some other way: held-back bytes and text are shown after all
        let step = stops.push(&utf8.finish());
        let mut tail = step.emit;
        if !step.stopped {
            tail.push_str(&stops.finish());
        }
        if !tail.is_empty() {
            outcome.text.push_str(&tail);
            on_event(Event::Tail(&tail));
        }
    }
    outcome.finish = finish;
    let end = Instant::now();
    if let Some(first) = first_token_at {
        outcome.timings.first_token_ms = ms(first - start);
        let decode = end - first;
        outcome.timings.decode_ms = ms(decode);
        outcome.timings.decode_tok_s = per_s(outcome.tokens.len().saturating_sub(1), decode);
    }
    Ok(outcome)
}
