//! An engine worker thread: takes the next job, runs it on a session (the conversation's kept
//! one, or a fresh one), sends its chunks and then exactly one final event, whatever happens
//! (cancel, deadline, thermal stop, engine error, engine panic).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fieldllm_engine::{EngineError, Event, FinishReason};

use super::control::{Pacer, StopReason, deadline_alarm};
use super::event::{Code, Done, Failure, Finish, Reply, TokenLogprobs, Usage};
use super::queue::Waiting;
use super::stream::ChunkStream;
use super::{Engine, ReplySink, Shared};

/// A job's reply channel that passes chunks on and keeps the final event for the worker to
/// send once the job is counted.
struct HoldFinal {
    tx: ReplySink,
    last: Option<Reply>,
}

impl HoldFinal {
    fn send(&mut self, r: Reply) {
        if r.is_final() {
            self.last = Some(r);
        } else {
            // a receiver that went away (a client gone) is not the engine's problem
            let _ = self.tx.send(r);
        }
    }
}

pub(super) fn run(shared: Arc<Shared>, engine: Arc<dyn Engine>, n: usize) {
    loop {
        let job = {
            let mut st = shared.lock();
            loop {
                if let Some(job) = st.next_job() {
                    shared.beat(n);
                    break job;
                }
                if st.stopping {
                    return;
                }
                st = shared.wake.wait(st).unwrap_or_else(|p| p.into_inner());
            }
        };
        let id = job.job.id.clone();
        let transport = job.job.transport.as_str();
        let mut out = HoldFinal {
            tx: job.sink.clone(),
            last: None,
        };
        let span = tracing::info_span!("job", request_id = %id, transport);
        // a panic in the engine must not lose the answer or the worker
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            span.in_scope(|| run_job(engine.as_ref(), job, &mut out, &shared, n))
        }));
        let decode = result.unwrap_or_else(|_| {
            tracing::error!(request_id = %id, transport, "engine panicked");
            out.last = Some(Reply::Failed(Failure::new(
                &id,
                Code::Internal,
                "the engine failed on this request",
            )));
            0.0
        });
        shared.beats[n].store(0, Ordering::Release);
        let mut st = shared.lock();
        st.finished(&id, decode);
        // a slot under the thermal limit is free again
        shared.wake.notify_one();
        // counted first, so whoever receives the final sees the job in `stats()`; sent before
        // the idle wake-up, so a returned `shutdown` has every final in its channel
        if let Some(last) = out.last.take() {
            let _ = out.tx.send(last);
        }
        if st.idle() {
            shared.idle.notify_all();
        }
    }
}

pub(super) fn ms(d: Duration) -> f32 {
    (d.as_secs_f64() * 1e3) as f32
}

/// Answers a job stopped before it started: cancelled, past its deadline, or dropped from the
/// queue by the heat (the same refusal as at the door).
/// `retry_after_ms`: the queue's, for the `overheated` refusal.
pub(super) fn never_started(w: &Waiting, retry_after_ms: u32, queue_ms: f32) -> Reply {
    let id = &w.job.id;
    let finish = match w.control.reason() {
        StopReason::Deadline => Finish::Deadline,
        StopReason::Thermal | StopReason::Overheated => {
            tracing::info!(request_id = %id, "overheated: dropped from the queue");
            return Reply::Failed(Failure {
                id: id.clone(),
                code: Code::Overheated,
                message: format!(
                    "the accelerator got hot before this request started; try again in {} s",
                    retry_after_ms.div_ceil(1000)
                ),
                queue_depth: 0,
                retry_after_ms,
            });
        }
        StopReason::Cancelled | StopReason::None => Finish::Cancelled,
    };
    Reply::Done(Done {
        id: id.clone(),
        seq: 0,
        finish,
        usage: Usage::default(),
        timings: super::event::Timings {
            queue_ms,
            ..Default::default()
        },
        // no answer was made from them
        citations: None,
    })
}

/// The wire's view of an engine failure.
fn failure(id: &str, e: &EngineError) -> Failure {
    let code = match e {
        EngineError::PromptTooLong { .. } => Code::TooLarge,
        EngineError::InvalidParam(_) | EngineError::EmptyPrompt => Code::BadRequest,
        _ => Code::ModelError,
    };
    Failure::new(id, code, e.to_string())
}

/// Runs one job to its final event; returns its decode speed (0 if none).
fn run_job(
    engine: &dyn Engine,
    w: Waiting,
    sink: &mut HoldFinal,
    shared: &Shared,
    n: usize,
) -> f32 {
    let started = Instant::now();
    let queue_ms = ms(started - w.job.received);
    if let Some(deadline) = w.job.deadline
        && started >= deadline
    {
        w.control.stop(StopReason::Deadline);
    }
    if w.control.stopped() {
        let retry_after_ms = shared.lock().retry_after_ms;
        sink.send(never_started(&w, retry_after_ms, queue_ms));
        return 0.0;
    }
    let Waiting { job, control, .. } = w;
    let id = job.id.as_str();
    let kept = job.conversation.as_ref().and_then(|c| c.take());
    let mut session = match kept.map_or_else(|| engine.session(), Ok) {
        Ok(s) => s,
        Err(e) => {
            sink.send(Reply::Failed(failure(id, &e)));
            return 0.0;
        }
    };
    tracing::debug!(request_id = %id, prompt_tokens = job.prompt.len(), queue_ms, "generating");
    let mut chunks = ChunkStream::new(id, job.stream);
    let deadline = job.deadline;
    let _alarm = deadline.map(|d| deadline_alarm(control.clone(), d));
    let mut pacer = Pacer {
        cap: &shared.decode_cap,
        next: None,
    };
    let presence = session.presence();
    let result = session.generate(&job.prompt, &job.params, &control.flag, &mut |ev| {
        if let Event::Token { .. } = ev {
            shared.beat(n);
            pacer.wait(&control.flag, &presence);
        }
        if let Some(d) = deadline
            && Instant::now() >= d
        {
            control.stop(StopReason::Deadline);
        }
        let chunk = match ev {
            Event::Token {
                id: token_id,
                text,
                logprobs,
            } => {
                let lp = logprobs.map(|(chosen, top)| TokenLogprobs {
                    token_id,
                    token: chosen.token,
                    logprob: chosen.logprob,
                    top,
                });
                chunks.push(text, lp)
            }
            Event::Tail(text) => chunks.push(text, None),
        };
        if let Some(c) = chunk {
            sink.send(Reply::Chunk(c));
        }
    });
    if let Some(c) = chunks.flush() {
        sink.send(Reply::Chunk(c));
    }
    if let Some(c) = &job.conversation
        && result.is_ok()
    {
        c.put(session);
    }
    match result {
        Ok(out) => {
            let finish = match (out.finish, control.reason()) {
                (FinishReason::Cancelled, StopReason::Deadline) => Finish::Deadline,
                (FinishReason::Cancelled, StopReason::Thermal | StopReason::Overheated) => {
                    Finish::Thermal
                }
                (FinishReason::Cancelled, _) => Finish::Cancelled,
                (FinishReason::Stop, _) => Finish::Stop,
                (FinishReason::Length, _) => Finish::Length,
            };
            let t = &out.timings;
            tracing::info!(request_id = %id, transport = job.transport.as_str(), finish = ?finish, tokens = out.tokens.len(), decode_tok_s = t.decode_tok_s, "answered");
            sink.send(Reply::Done(Done {
                id: id.to_string(),
                seq: chunks.seq(),
                finish,
                usage: Usage {
                    prompt_tokens: out.prompt_tokens as u32,
                    completion_tokens: out.tokens.len() as u32,
                },
                timings: super::event::Timings {
                    queue_ms,
                    prompt_ms: t.prompt_ms as f32,
                    first_token_ms: t.first_token_ms as f32,
                    total_ms: ms(job.received.elapsed()),
                    prompt_tok_s: t.prompt_tok_s as f32,
                    decode_tok_s: t.decode_tok_s as f32,
                },
                citations: job.citations.clone(),
            }));
            t.decode_tok_s as f32
        }
        Err(e) => {
            tracing::warn!(request_id = %id, transport = job.transport.as_str(), error = %e, "request failed");
            sink.send(Reply::Failed(failure(id, &e)));
            0.0
        }
    }
}
