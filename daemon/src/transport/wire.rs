//! The scheduler's typed replies in the wire schema (`fieldllm.v1`): what MQTT and framed
//! serial send. Only the edges encode; the console writes text instead.

use crate::docs::ground::Source;
use crate::proto::v1::{self, response::Kind};
use crate::proto::{ErrorCode, Response};
use crate::request::Rejection;
use crate::scheduler::{Chunk, Code, Done, Failure, Finish, Reply, TokenLogprobs};

/// The wire's error code.
pub fn code(c: Code) -> ErrorCode {
    match c {
        Code::BadRequest => ErrorCode::BadRequest,
        Code::TooLarge => ErrorCode::TooLarge,
        Code::Busy => ErrorCode::Busy,
        Code::Overheated => ErrorCode::Overheated,
        Code::ModelError => ErrorCode::ModelError,
        Code::Internal => ErrorCode::Internal,
        Code::NotCovered => ErrorCode::NotCovered,
    }
}

/// The wire's finish reason.
pub fn finish(f: Finish) -> v1::FinishReason {
    match f {
        Finish::Stop => v1::FinishReason::Stop,
        Finish::Length => v1::FinishReason::Length,
        Finish::Cancelled => v1::FinishReason::Cancelled,
        Finish::Deadline => v1::FinishReason::Deadline,
        Finish::Thermal => v1::FinishReason::Thermal,
    }
}

fn logprobs(t: TokenLogprobs) -> v1::TokenLogprobs {
    v1::TokenLogprobs {
        token_id: t.token_id,
        token: t.token,
        logprob: t.logprob,
        top: t
            .top
            .into_iter()
            .map(|c| v1::Candidate {
                token_id: c.id,
                token: c.token,
                logprob: c.logprob,
            })
            .collect(),
    }
}

/// A chunk message.
pub fn chunk(c: Chunk) -> v1::Chunk {
    v1::Chunk {
        id: c.id,
        seq: c.seq,
        text: c.text,
        logprobs: c.logprobs.into_iter().map(logprobs).collect(),
    }
}

/// A done message.
pub fn done(d: Done) -> v1::Done {
    let t = d.timings;
    v1::Done {
        id: d.id,
        seq: d.seq,
        finish_reason: finish(d.finish) as i32,
        usage: Some(v1::Usage {
            prompt_tokens: d.usage.prompt_tokens,
            completion_tokens: d.usage.completion_tokens,
        }),
        timings: Some(v1::Timings {
            queue_ms: t.queue_ms,
            prompt_ms: t.prompt_ms,
            first_token_ms: t.first_token_ms,
            total_ms: t.total_ms,
            prompt_tok_s: t.prompt_tok_s,
            decode_tok_s: t.decode_tok_s,
        }),
        sources: d
            .citations
            .as_ref()
            .map(|c| c.sources.iter().map(source).collect())
            .unwrap_or_default(),
        quote: d
            .citations
            .map(|c| c.key_sentence.clone())
            .unwrap_or_default(),
    }
}

/// A source message: where the passage is, not its text (a frame holds 4 KiB; the quote
/// carries the sentence that matters).
pub fn source(s: &Source) -> v1::Source {
    v1::Source {
        doc: s.doc.clone(),
        section: s.section.clone(),
        page: s.page,
        score: s.score,
        similarity: s.similarity,
    }
}

/// An error message.
pub fn failure(f: Failure) -> v1::Error {
    v1::Error {
        id: f.id,
        code: code(f.code) as i32,
        message: f.message,
        retry_after_ms: f.retry_after_ms,
        queue_depth: f.queue_depth,
    }
}

/// An error message for a request refused at the door (`id` "" when it could not be read).
pub fn refusal(id: &str, r: Rejection) -> v1::Error {
    failure(Failure::new(id, r.code, r.message))
}

/// A reply as one wire response.
pub fn response(r: Reply) -> Response {
    Response {
        kind: Some(match r {
            Reply::Chunk(c) => Kind::Chunk(chunk(c)),
            Reply::Done(d) => Kind::Done(done(d)),
            Reply::Failed(f) => Kind::Error(failure(f)),
        }),
    }
}

/// An error response.
pub fn error_response(e: v1::Error) -> Response {
    Response {
        kind: Some(Kind::Error(e)),
    }
}
