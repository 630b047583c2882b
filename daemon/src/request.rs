//! Requests from any transport, checked and turned into what the scheduler runs.
//!
//! Every rule a request can break is here, so MQTT, the console and framed serial refuse the
//! same things with the same codes.

use std::time::{Duration, Instant};

use crate::proto::{ErrorCode, Request, v1};
use fieldllm_engine::chat::Message;
use fieldllm_engine::generate::MAX_LOGPROBS;
use fieldllm_engine::{GenerateParams, SamplingParams};

/// Longest request id, in bytes.
pub const MAX_ID_BYTES: usize = 64;

/// Limits from the `[limits]` config section.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most bytes of prompt text (all messages together).
    pub max_prompt_bytes: usize,
    /// Most tokens an answer may ask for; also the default.
    pub max_tokens: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_prompt_bytes: 8192,
            max_tokens: 512,
        }
    }
}

/// Scheduling priority; higher runs first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Priority {
    /// Background work.
    Low = 1,
    /// The default.
    Normal = 2,
    /// A person waiting (the console).
    High = 3,
}

/// A checked request.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// Client's id.
    pub id: String,
    /// The conversation to answer (a plain prompt becomes one user message).
    pub messages: Vec<Message>,
    /// Generation parameters, validated.
    pub params: GenerateParams,
    /// Priority.
    pub priority: Priority,
    /// Latest time the answer may still be running.
    pub deadline: Option<Instant>,
    /// Stream chunks as they come (true) or send the whole text in one chunk.
    pub stream: bool,
    /// When the request arrived (queue time is measured from here).
    pub received: Instant,
    /// A conversation whose KV cache carries over between turns (the console's); `None`: a
    /// fresh session for this request alone.
    pub conversation: Option<crate::scheduler::Conversation>,
    /// Which transport it came by (`mqtt`, `console`, `framed`), for the log.
    pub transport: &'static str,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Wire error code.
    pub code: ErrorCode,
    /// What is wrong, for a person.
    pub message: String,
}

fn bad(message: impl Into<String>) -> Rejection {
    Rejection {
        code: ErrorCode::BadRequest,
        message: message.into(),
    }
}

/// Checks an id alone (transports need it to address an error before anything else).
pub fn check_id(id: &str) -> Result<(), Rejection> {
    if id.is_empty() {
        return Err(bad("id is empty"));
    }
    if id.len() > MAX_ID_BYTES {
        return Err(bad(format!(
            "id is {} bytes, at most {MAX_ID_BYTES}",
            id.len()
        )));
    }
    // ids become MQTT topic levels: no wildcards, separators or control characters
    if let Some(c) = id
        .chars()
        .find(|c| matches!(c, '/' | '+' | '#') || c.is_control() || c.is_whitespace())
    {
        return Err(bad(format!("id contains {c:?}")));
    }
    Ok(())
}

/// Validates a wire request against the limits.
pub fn validate(req: Request, limits: &Limits, received: Instant) -> Result<JobSpec, Rejection> {
    check_id(&req.id)?;
    let messages = match (req.prompt.is_empty(), req.messages.is_empty()) {
        (false, true) => vec![Message::new("user", req.prompt)],
        (true, false) => req
            .messages
            .into_iter()
            .map(|m| Message {
                role: m.role,
                content: m.content,
            })
            .collect(),
        (true, true) => return Err(bad("prompt is empty (set prompt or messages)")),
        (false, false) => return Err(bad("set prompt or messages, not both")),
    };
    for m in &messages {
        if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
            return Err(bad(format!("unknown message role {:?}", m.role)));
        }
    }
    if messages.last().map(|m| m.role.as_str()) != Some("user") {
        return Err(bad("the last message must be the user's"));
    }
    if messages.iter().all(|m| m.content.trim().is_empty()) {
        return Err(bad("prompt is empty"));
    }
    let bytes: usize = messages.iter().map(|m| m.content.len()).sum();
    if bytes > limits.max_prompt_bytes {
        return Err(Rejection {
            code: ErrorCode::TooLarge,
            message: format!(
                "prompt is {bytes} bytes, at most {}",
                limits.max_prompt_bytes
            ),
        });
    }
    let max_tokens = req.max_tokens.unwrap_or(limits.max_tokens);
    if max_tokens == 0 || max_tokens > limits.max_tokens {
        return Err(bad(format!(
            "max_tokens must be in 1..={}, got {max_tokens}",
            limits.max_tokens
        )));
    }
    if req.logprobs as usize > MAX_LOGPROBS {
        return Err(bad(format!(
            "logprobs must be at most {MAX_LOGPROBS}, got {}",
            req.logprobs
        )));
    }
    let d = SamplingParams::default();
    let params = GenerateParams {
        sampling: SamplingParams {
            temperature: req.temperature.unwrap_or(d.temperature),
            top_k: req.top_k.map(|k| k as usize).unwrap_or(d.top_k),
            top_p: req.top_p.unwrap_or(d.top_p),
            min_p: req.min_p.unwrap_or(d.min_p),
            seed: req.seed.unwrap_or(d.seed),
            ..d
        },
        max_tokens: max_tokens as usize,
        stop: req.stop,
        logprobs: req.logprobs as usize,
    };
    params.validate().map_err(|e| bad(e.to_string()))?;
    let priority = match v1::Priority::try_from(req.priority) {
        Ok(v1::Priority::Low) => Priority::Low,
        Ok(v1::Priority::High) => Priority::High,
        Ok(v1::Priority::Normal | v1::Priority::Unspecified) => Priority::Normal,
        Err(_) => return Err(bad(format!("unknown priority {}", req.priority))),
    };
    Ok(JobSpec {
        id: req.id,
        messages,
        params,
        priority,
        deadline: (req.deadline_ms > 0)
            .then(|| received + Duration::from_millis(req.deadline_ms.into())),
        stream: req.stream.unwrap_or(true),
        received,
        conversation: None,
        transport: "",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(id: &str, prompt: &str) -> Request {
        Request {
            id: id.into(),
            prompt: prompt.into(),
            ..Request::default()
        }
    }

    fn code(r: Request) -> ErrorCode {
        validate(r, &Limits::default(), Instant::now())
            .unwrap_err()
            .code
    }

    #[test]
    fn ids_are_checked() {
        assert_eq!(code(req("", "q")), ErrorCode::BadRequest);
        assert_eq!(code(req(&"x".repeat(65), "q")), ErrorCode::BadRequest);
        assert!(
            validate(
                req(&"x".repeat(64), "q"),
                &Limits::default(),
                Instant::now()
            )
            .is_ok()
        );
        for id in ["a/b", "a+", "#", "a b", "a\u{0}"] {
            assert_eq!(code(req(id, "q")), ErrorCode::BadRequest, "{id:?}");
        }
    }

    #[test]
    fn prompts_are_checked() {
        assert_eq!(code(req("1", "")), ErrorCode::BadRequest);
        assert_eq!(code(req("1", &"a".repeat(8193))), ErrorCode::TooLarge);
        let mut both = req("1", "q");
        both.messages.push(v1::Message {
            role: "user".into(),
            content: "q".into(),
        });
        assert_eq!(code(both), ErrorCode::BadRequest);
        let mut r = req("1", "");
        r.messages.push(v1::Message {
            role: "wizard".into(),
            content: "q".into(),
        });
        assert_eq!(code(r), ErrorCode::BadRequest);
    }

    #[test]
    fn parameters_are_checked() {
        for (t, ok) in [(f32::NAN, false), (-0.1, false), (0.7, true)] {
            let r = Request {
                temperature: Some(t),
                ..req("1", "q")
            };
            assert_eq!(
                validate(r, &Limits::default(), Instant::now()).is_ok(),
                ok,
                "{t}"
            );
        }
        assert_eq!(
            code(Request {
                max_tokens: Some(0),
                ..req("1", "q")
            }),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(Request {
                max_tokens: Some(513),
                ..req("1", "q")
            }),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(Request {
                top_p: Some(f32::NAN),
                ..req("1", "q")
            }),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(Request {
                logprobs: 21,
                ..req("1", "q")
            }),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(Request {
                priority: 9,
                ..req("1", "q")
            }),
            ErrorCode::BadRequest
        );
        let ok = validate(
            Request {
                deadline_ms: 10,
                ..req("1", "q")
            },
            &Limits::default(),
            Instant::now(),
        )
        .unwrap();
        assert!(ok.deadline.is_some() && ok.stream && ok.params.max_tokens == 512);
    }
}
