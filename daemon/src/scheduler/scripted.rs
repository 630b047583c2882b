//! A scripted [`Engine`]: a test double whose answers are a plain function of the prompt and
//! whose pace the caller holds in its hand ([`Gate`]), so the scheduler's rules and the
//! transports are tested without waiting on a real model's timing. Not a model: nothing here
//! is used by the daemon.
//!
//! A prompt is tokenized one id per word, each message framed by role and end ids, then an
//! assistant header. The answer is `w0 w1 w2 ...` (one word per token), ending after
//! `answer_words` tokens (`stop`) or at `max_tokens` (`length`). Each step — the prompt's
//! prefill, then each token — first passes the gate; a raised cancel flag ends the wait.
//! A message with the word `PANIC` makes generation panic; one with `<|im_end|>` is refused as
//! special-token text.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use fieldllm_engine::chat::Message;
use fieldllm_engine::generate::{Candidate, Timings};
use fieldllm_engine::session::reusable_prefix;
use fieldllm_engine::{EngineError, Event, FinishReason, GenerateParams, Outcome};

use super::engine::{Engine, EngineSession};

/// The special-token text the scripted engine refuses in a message.
pub const SPECIAL: &str = "<|im_end|>";
/// A word that makes generation panic.
pub const PANIC: &str = "PANIC";

/// The token that opens a system turn.
pub const ROLE_SYSTEM: u32 = 1;
const ROLE_USER: u32 = 2;
const ROLE_ASSISTANT: u32 = 3;
/// The token that ends a turn.
pub const END: u32 = 4;
const PANIC_ID: u32 = 5;
/// Word ids start here.
const WORDS: u32 = 100;

#[derive(Debug, Default)]
struct GateState {
    open: bool,
    permits: u64,
    waiting: usize,
}

/// Holds every scripted session's steps until the test lets them pass.
#[derive(Debug, Clone, Default)]
pub struct Gate(Arc<(Mutex<GateState>, Condvar)>);

impl Gate {
    /// A gate that lets everything through.
    pub fn open() -> Gate {
        let g = Gate::default();
        g.open_all();
        g
    }

    /// A gate that holds every step until [`Gate::allow`] or [`Gate::open_all`].
    pub fn closed() -> Gate {
        Gate::default()
    }

    /// Lets `n` more steps through.
    pub fn allow(&self, n: u64) {
        let (m, cv) = &*self.0;
        m.lock().unwrap_or_else(PoisonError::into_inner).permits += n;
        cv.notify_all();
    }

    /// Lets everything through from now on.
    pub fn open_all(&self) {
        let (m, cv) = &*self.0;
        m.lock().unwrap_or_else(PoisonError::into_inner).open = true;
        cv.notify_all();
    }

    /// Holds every step again.
    pub fn close(&self) {
        let (m, _) = &*self.0;
        let mut g = m.lock().unwrap_or_else(PoisonError::into_inner);
        g.open = false;
        g.permits = 0;
    }

    /// Waits until `n` steps are held at the gate (sessions blocked on it); false if that did
    /// not happen within `timeout`.
    pub fn wait_held(&self, n: usize, timeout: Duration) -> bool {
        let (m, cv) = &*self.0;
        let g = m.lock().unwrap_or_else(PoisonError::into_inner);
        let (g, _) = cv
            .wait_timeout_while(g, timeout, |g| g.waiting < n)
            .unwrap_or_else(PoisonError::into_inner);
        g.waiting >= n
    }

    /// Passes one step: waits for a permit; false if `cancel` was raised first.
    fn pass(&self, cancel: &AtomicBool) -> bool {
        let (m, cv) = &*self.0;
        let mut g = m.lock().unwrap_or_else(PoisonError::into_inner);
        g.waiting += 1;
        cv.notify_all();
        let passed = loop {
            if cancel.load(Ordering::Acquire) {
                break false;
            }
            if g.open {
                break true;
            }
            if g.permits > 0 {
                g.permits -= 1;
                break true;
            }
            // the cancel flag has no condvar of its own: look at it every millisecond
            g = cv
                .wait_timeout(g, Duration::from_millis(1))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        };
        g.waiting -= 1;
        cv.notify_all();
        passed
    }
}

/// The scripted engine.
#[derive(Debug, Clone)]
pub struct ScriptedEngine {
    /// Tokens the "model" holds.
    pub context: usize,
    /// Tokens an answer has before it stops by itself (`None`: until `max_tokens`).
    pub answer_words: Option<usize>,
    /// The pace.
    pub gate: Gate,
}

impl ScriptedEngine {
    /// An engine with a 2048-token context whose answers run to `max_tokens`, paced by `gate`.
    pub fn new(gate: Gate) -> ScriptedEngine {
        ScriptedEngine {
            context: 2048,
            answer_words: None,
            gate,
        }
    }
}

fn word_id(word: &str) -> u32 {
    if word == PANIC {
        return PANIC_ID;
    }
    // FNV-1a, folded into a vocabulary of 30 000 words
    let h = word.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    WORDS + h % 30_000
}

impl Engine for ScriptedEngine {
    fn prompt(&self, messages: &[Message]) -> Result<Vec<u32>, EngineError> {
        let mut ids = Vec::new();
        for m in messages {
            if m.content.contains(SPECIAL) {
                return Err(EngineError::InvalidParam(format!(
                    "{} message contains the special token text {SPECIAL:?}",
                    m.role
                )));
            }
            ids.push(match m.role.as_str() {
                "system" => ROLE_SYSTEM,
                "assistant" => ROLE_ASSISTANT,
                _ => ROLE_USER,
            });
            ids.extend(m.content.split_whitespace().map(word_id));
            ids.push(END);
        }
        ids.push(ROLE_ASSISTANT);
        Ok(ids)
    }

    fn context_length(&self) -> usize {
        self.context
    }

    fn session(&self) -> Result<Box<dyn EngineSession>, EngineError> {
        Ok(Box::new(ScriptedSession {
            engine: self.clone(),
            tokens: Vec::new(),
        }))
    }
}

/// One conversation of the scripted engine: the tokens it "holds".
struct ScriptedSession {
    engine: ScriptedEngine,
    tokens: Vec<u32>,
}

impl EngineSession for ScriptedSession {
    fn generate(
        &mut self,
        prompt: &[u32],
        params: &GenerateParams,
        cancel: &AtomicBool,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<Outcome, EngineError> {
        params.validate()?;
        // what the real session does: keep the shared prefix, feed the rest
        let common = reusable_prefix(&self.tokens, prompt);
        self.tokens.truncate(common);
        let new = &prompt[common..];
        if new.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if self.tokens.len() + new.len() >= self.engine.context {
            return Err(EngineError::PromptTooLong {
                tokens: self.tokens.len() + new.len(),
                context: self.engine.context,
            });
        }
        let start = Instant::now();
        let mut out = Outcome {
            finish: FinishReason::Cancelled,
            text: String::new(),
            tokens: Vec::new(),
            prompt_tokens: new.len(),
            timings: Timings::default(),
        };
        if !self.engine.gate.pass(cancel) {
            return Ok(out);
        }
        self.tokens.extend_from_slice(new);
        assert!(!new.contains(&PANIC_ID), "scripted panic");
        out.timings.prompt_ms = start.elapsed().as_secs_f64() * 1e3;
        let mut first_token_at = None;
        out.finish = loop {
            let i = out.tokens.len();
            if self.engine.answer_words.is_some_and(|n| i >= n) {
                break FinishReason::Stop;
            }
            if i >= params.max_tokens || self.tokens.len() + 1 >= self.engine.context {
                break FinishReason::Length;
            }
            if !self.engine.gate.pass(cancel) {
                break FinishReason::Cancelled;
            }
            let text = if i == 0 {
                format!("w{i}")
            } else {
                format!(" w{i}")
            };
            let id = word_id(&format!("w{i}"));
            first_token_at.get_or_insert_with(Instant::now);
            out.tokens.push(id);
            self.tokens.push(id);
            out.text.push_str(&text);
            let logprobs = (params.logprobs > 0).then(|| {
                let cand = |id, logprob| Candidate {
                    id,
                    token: format!("w{i}"),
                    logprob,
                };
                (
                    cand(id, -0.1),
                    (0..params.logprobs)
                        .map(|k| cand(id + k as u32, -0.1 * (k + 1) as f32))
                        .collect(),
                )
            });
            on_event(Event::Token {
                id,
                text: &text,
                logprobs,
            });
        };
        // as the real loop measures them: decode speed over the tokens after the first
        if let Some(first) = first_token_at {
            out.timings.first_token_ms = (first - start).as_secs_f64() * 1e3;
            let decode = first.elapsed().as_secs_f64();
            out.timings.decode_ms = decode * 1e3;
            if decode > 0.0 {
                out.timings.decode_tok_s = out.tokens.len().saturating_sub(1) as f64 / decode;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_gate_holds_until_allowed_and_cancel_ends_the_wait() {
        let gate = Gate::closed();
        let never = AtomicBool::new(false);
        let g = gate.clone();
        let t = std::thread::spawn(move || g.pass(&AtomicBool::new(false)));
        assert!(gate.wait_held(1, Duration::from_secs(10)));
        gate.allow(1);
        assert!(t.join().unwrap());
        let cancel = AtomicBool::new(true);
        assert!(!gate.pass(&cancel));
        gate.open_all();
        assert!(gate.pass(&never));
    }

    #[test]
    fn a_session_feeds_only_what_it_does_not_hold() {
        let e = ScriptedEngine::new(Gate::open());
        let mut s = e.session().unwrap();
        let never = AtomicBool::new(false);
        let params = GenerateParams {
            max_tokens: 3,
            ..GenerateParams::default()
        };
        let p1 = e.prompt(&[Message::new("user", "a b c")]).unwrap();
        let o1 = s.generate(&p1, &params, &never, &mut |_| {}).unwrap();
        assert_eq!((o1.prompt_tokens, o1.tokens.len()), (p1.len(), 3));
        assert_eq!(o1.text, "w0 w1 w2");
        let p2 = e
            .prompt(&[
                Message::new("user", "a b c"),
                Message::new("assistant", &o1.text),
                Message::new("user", "d"),
            ])
            .unwrap();
        let o2 = s.generate(&p2, &params, &never, &mut |_| {}).unwrap();
        assert!(
            o2.prompt_tokens < p2.len() / 2,
            "{} of {}",
            o2.prompt_tokens,
            p2.len()
        );
    }
}
