//! The scheduler: a bounded priority queue in front of engine worker threads.
//!
//! Transports hand it validated [`JobSpec`]s with a reply channel; it answers every accepted
//! job with exactly one final `Done` or `Error` (also across cancel, deadline and shutdown) and
//! refuses at once with `busy` when the queue is full. It knows nothing of MQTT or serial.

use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use crate::engine::generate::{Candidate, Event};
use crate::engine::{EngineError, FinishReason, Model, Session, generate};
use crate::proto::v1::{self, response::Kind};
use crate::proto::{self as wire, ErrorCode, Response};
use crate::request::JobSpec;

/// Where a job's responses go. Sending never blocks the worker thread.
pub type ReplySink = UnboundedSender<Response>;

/// Scheduler settings (`[limits]` and `[model]` of the config).
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Jobs waiting beyond the running ones before new ones get `busy`.
    pub queue: usize,
    /// Engine worker threads (answers generated at once).
    pub slots: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            queue: 16,
            slots: 1,
        }
    }
}

/// A conversation's session, kept between its turns so a follow-up question only feeds its
/// new tokens. Turns of one conversation run one at a time (the slot is taken while a turn
/// runs; a turn that finds it taken starts from a fresh session).
#[derive(Debug, Clone, Default)]
pub struct Conversation(Arc<Mutex<Option<Session>>>);

impl Conversation {
    /// A new, empty conversation.
    pub fn new() -> Conversation {
        Conversation::default()
    }

    /// Forgets the KV cache (`/reset`).
    pub fn reset(&self) {
        if let Ok(mut s) = self.0.lock() {
            *s = None;
        }
    }

    fn take(&self) -> Option<Session> {
        self.0.lock().ok().and_then(|mut s| s.take())
    }

    fn put(&self, session: Session) {
        if let Ok(mut s) = self.0.lock() {
            *s = Some(session);
        }
    }
}

/// Why a running job is being stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum StopReason {
    None = 0,
    Cancelled = 1,
    Deadline = 2,
}

/// The cancel flag the engine checks, plus why it was raised.
#[derive(Debug, Default)]
struct Control {
    flag: AtomicBool,
    reason: AtomicU8,
}

impl Control {
    fn stop(&self, why: StopReason) {
        // the first reason wins: a deadline that passes during a cancel stays a cancel
        let _ = self.reason.compare_exchange(
            StopReason::None as u8,
            why as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        self.flag.store(true, Ordering::Release);
    }

    fn reason(&self) -> StopReason {
        match self.reason.load(Ordering::Acquire) {
            1 => StopReason::Cancelled,
            2 => StopReason::Deadline,
            _ => StopReason::None,
        }
    }
}

/// Raises `control` with `Deadline` at `at`, unless the returned guard is dropped first.
/// A sleeping thread per job that has a deadline: no polling, gone when the job ends.
fn deadline_alarm(control: Arc<Control>, at: Instant) -> Option<std::sync::mpsc::Sender<()>> {
    let (guard, done) = std::sync::mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("deadline".into())
        .spawn(move || {
            let wait = at.saturating_duration_since(Instant::now());
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = done.recv_timeout(wait) {
                control.stop(StopReason::Deadline);
            }
        })
        .ok()
        .map(|_| guard)
}

struct Queued {
    spec: JobSpec,
    sink: ReplySink,
    control: Arc<Control>,
    order: u64,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        self.order == other.order
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Queued {
    // max-heap: higher priority first, then earlier arrival
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.spec
            .priority
            .cmp(&other.spec.priority)
            .then(other.order.cmp(&self.order))
    }
}

#[derive(Default)]
struct State {
    queue: BinaryHeap<Queued>,
    /// Every accepted job not yet finished (queued or running), by id.
    active: HashMap<String, Arc<Control>>,
    running: usize,
    accepting: bool,
    stopping: bool,
    order: u64,
    answered: u64,
    last_decode_tok_s: f32,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    idle: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // a poisoned lock means a worker panicked mid-update; the state itself stays usable
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A cloneable handle on the scheduler.
#[derive(Clone)]
pub struct Scheduler {
    shared: Arc<Shared>,
    config: SchedulerConfig,
    workers: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

/// Counters for status messages.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stats {
    /// Jobs waiting.
    pub queued: usize,
    /// Jobs being generated.
    pub running: usize,
    /// Jobs finished since start.
    pub answered: u64,
    /// Decode speed of the last finished answer.
    pub last_decode_tok_s: f32,
}

impl Scheduler {
    /// Starts `config.slots` worker threads on `model`.
    pub fn start(model: Arc<Model>, config: SchedulerConfig) -> Result<Scheduler, EngineError> {
        if config.slots == 0 {
            return Err(EngineError::InvalidParam("slots must be at least 1".into()));
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                accepting: true,
                ..State::default()
            }),
            wake: Condvar::new(),
            idle: Condvar::new(),
        });
        let mut workers = Vec::new();
        for n in 0..config.slots {
            let (shared, model) = (shared.clone(), model.clone());
            let handle = std::thread::Builder::new()
                .name(format!("engine-{n}"))
                .spawn(move || worker(shared, model))
                .map_err(|e| EngineError::Graph(format!("cannot start engine thread: {e}")))?;
            workers.push(handle);
        }
        Ok(Scheduler {
            shared,
            config,
            workers: Arc::new(Mutex::new(workers)),
        })
    }

    /// Accepts a job, or answers at once on `sink` with `busy` (queue full), `bad_request`
    /// (an answer with this id is in flight) or `internal` (shutting down). Returns whether
    /// the job was accepted.
    pub fn submit(&self, spec: JobSpec, sink: ReplySink) -> bool {
        let mut st = self.shared.lock();
        let refuse = |code: ErrorCode, msg: String, depth: usize| {
            let mut r = wire::error(&spec.id, code, msg);
            if let Some(Kind::Error(e)) = &mut r.kind {
                e.queue_depth = depth as u32;
                if code == ErrorCode::Busy {
                    e.retry_after_ms = 1000;
                }
            }
            let _ = sink.send(r);
            false
        };
        if !st.accepting {
            return refuse(ErrorCode::Internal, "shutting down".into(), st.queue.len());
        }
        if st.active.contains_key(&spec.id) {
            return refuse(
                ErrorCode::BadRequest,
                format!("an answer to id {:?} is already in progress", spec.id),
                st.queue.len(),
            );
        }
        if st.queue.len() >= self.config.queue {
            let depth = st.queue.len();
            tracing::info!(request_id = %spec.id, depth, "queue full: busy");
            return refuse(
                ErrorCode::Busy,
                format!("queue full ({depth} waiting)"),
                depth,
            );
        }
        let control = Arc::new(Control::default());
        st.active.insert(spec.id.clone(), control.clone());
        st.order += 1;
        let order = st.order;
        tracing::debug!(request_id = %spec.id, priority = ?spec.priority, "queued");
        st.queue.push(Queued {
            spec,
            sink,
            control,
            order,
        });
        drop(st);
        self.shared.wake.notify_one();
        true
    }

    /// Cancels a queued or running job; its answer ends with `cancelled`. False if unknown.
    pub fn cancel(&self, id: &str) -> bool {
        let st = self.shared.lock();
        match st.active.get(id) {
            Some(c) => {
                c.stop(StopReason::Cancelled);
                drop(st);
                // a queued job is answered by the next free worker; wake one
                self.shared.wake.notify_all();
                true
            }
            None => false,
        }
    }

    /// Current counters.
    pub fn stats(&self) -> Stats {
        let st = self.shared.lock();
        Stats {
            queued: st.queue.len(),
            running: st.running,
            answered: st.answered,
            last_decode_tok_s: st.last_decode_tok_s,
        }
    }

    /// Stops intake, lets accepted jobs finish for up to `grace`, then cancels the rest and
    /// waits for the workers. Every accepted job has had its final message when this returns.
    /// Blocking: call it from a plain thread or `spawn_blocking`.
    pub fn shutdown(&self, grace: Duration) {
        let deadline = Instant::now() + grace;
        let mut st = self.shared.lock();
        st.accepting = false;
        while !st.active.is_empty() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            st = self
                .shared
                .idle
                .wait_timeout(st, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        for c in st.active.values() {
            c.stop(StopReason::Cancelled);
        }
        st.stopping = true;
        drop(st);
        self.shared.wake.notify_all();
        let workers = std::mem::take(&mut *self.workers.lock().unwrap_or_else(|p| p.into_inner()));
        for w in workers {
            let _ = w.join();
        }
    }
}

/// A job's reply channel that passes chunks on and keeps the final message for the worker to
/// send once the job is counted.
struct HoldFinal {
    tx: ReplySink,
    last: Option<Response>,
}

impl HoldFinal {
    fn send(&mut self, r: Response) -> Result<(), ()> {
        if r.is_final() {
            self.last = Some(r);
            Ok(())
        } else {
            self.tx.send(r).map_err(|_| ())
        }
    }
}

fn worker(shared: Arc<Shared>, model: Arc<Model>) {
    loop {
        let job = {
            let mut st = shared.lock();
            loop {
                if let Some(job) = st.queue.pop() {
                    st.running += 1;
                    break job;
                }
                if st.stopping {
                    return;
                }
                st = shared.wake.wait(st).unwrap_or_else(|p| p.into_inner());
            }
        };
        let id = job.spec.id.clone();
        let mut out = HoldFinal {
            tx: job.sink.clone(),
            last: None,
        };
        // a panic in the engine must not lose the answer or the worker
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_job(&model, job, &mut out)
        }));
        let decode = match result {
            Ok(rate) => rate,
            Err(_) => {
                tracing::error!(request_id = %id, "engine panicked");
                out.last = Some(wire::error(
                    &id,
                    ErrorCode::Internal,
                    "the engine failed on this request",
                ));
                0.0
            }
        };
        let mut st = shared.lock();
        st.running -= 1;
        st.active.remove(&id);
        st.answered += 1;
        if decode > 0.0 {
            st.last_decode_tok_s = decode;
        }
        // counted first, so whoever receives the final sees the job in `stats()`; sent before
        // the idle wake-up, so a returned `shutdown` has every final in its channel
        if let Some(last) = out.last.take() {
            let _ = out.tx.send(last);
        }
        if st.active.is_empty() {
            shared.idle.notify_all();
        }
    }
}

fn ms(d: Duration) -> f32 {
    (d.as_secs_f64() * 1e3) as f32
}

fn candidate(c: Candidate) -> v1::Candidate {
    v1::Candidate {
        token_id: c.id,
        token: c.token,
        logprob: c.logprob,
    }
}

/// Runs one job to its final message; returns its decode speed (0 if none).
fn run_job(model: &Arc<Model>, job: Queued, sink: &mut HoldFinal) -> f32 {
    let Queued { spec, control, .. } = job;
    let id = spec.id.as_str();
    let started = Instant::now();
    let queue_ms = ms(started - spec.received);
    let done =
        |seq: u32, finish: v1::FinishReason, prompt: u32, completion: u32, t: v1::Timings| {
            Response {
                kind: Some(Kind::Done(v1::Done {
                    id: id.to_string(),
                    seq,
                    finish_reason: finish as i32,
                    usage: Some(v1::Usage {
                        prompt_tokens: prompt,
                        completion_tokens: completion,
                    }),
                    timings: Some(t),
                })),
            }
        };
    let base = v1::Timings {
        queue_ms,
        ..v1::Timings::default()
    };
    if let Some(deadline) = spec.deadline
        && started >= deadline
    {
        control.stop(StopReason::Deadline);
    }
    if control.flag.load(Ordering::Acquire) {
        let finish = match control.reason() {
            StopReason::Deadline => v1::FinishReason::Deadline,
            _ => v1::FinishReason::Cancelled,
        };
        let _ = sink.send(done(0, finish, 0, 0, base));
        return 0.0;
    }
    let ids = match model.chat_prompt(&spec.messages) {
        Ok(ids) => ids,
        Err(e) => {
            let _ = sink.send(wire::error(id, ErrorCode::BadRequest, e.to_string()));
            return 0.0;
        }
    };
    let kept = spec.conversation.as_ref().and_then(Conversation::take);
    let mut session = match kept.map_or_else(|| Session::new(model), Ok) {
        Ok(s) => s,
        Err(e) => {
            let _ = sink.send(wire::error(id, ErrorCode::ModelError, e.to_string()));
            return 0.0;
        }
    };
    // keep the longest cached prefix of this turn's full prompt; feed only the rest (at least
    // one token, so there are logits to sample from)
    let all_ids = ids;
    let common = session
        .tokens()
        .iter()
        .zip(&all_ids)
        .take_while(|(a, b)| a == b)
        .count()
        .min(all_ids.len() - 1);
    if common < session.tokens().len()
        && let Err(e) = session.truncate(common)
    {
        tracing::warn!(request_id = %id, error = %e, "could not reuse the conversation's cache");
        match Session::new(model) {
            Ok(s) => session = s,
            Err(e) => {
                let _ = sink.send(wire::error(id, ErrorCode::ModelError, e.to_string()));
                return 0.0;
            }
        }
    }
    let reused = session.tokens().len();
    let ids = all_ids[reused..].to_vec();
    if reused > 0 {
        tracing::debug!(request_id = %id, reused, new = ids.len(), "conversation cache reused");
    }
    tracing::debug!(request_id = %id, prompt_tokens = ids.len(), queue_ms, "generating");
    let mut seq = 0u32;
    let mut pending = String::new();
    let mut pending_lp: Vec<v1::TokenLogprobs> = Vec::new();
    let mut emit = |text: &str, lp: Option<v1::TokenLogprobs>, seq: &mut u32, flush: bool| {
        pending.push_str(text);
        pending_lp.extend(lp);
        if (spec.stream || flush) && (!pending.is_empty() || !pending_lp.is_empty()) {
            let chunk = v1::Chunk {
                id: id.to_string(),
                seq: *seq,
                text: std::mem::take(&mut pending),
                logprobs: std::mem::take(&mut pending_lp),
            };
            *seq += 1;
            let _ = sink.send(Response {
                kind: Some(Kind::Chunk(chunk)),
            });
        }
    };
    let deadline = spec.deadline;
    // the token callback only runs once decoding starts: a long prefill needs its own alarm
    let _alarm = deadline.map(|d| deadline_alarm(control.clone(), d));
    let result = generate(&mut session, &ids, &spec.params, &control.flag, &mut |ev| {
        if let Some(d) = deadline
            && Instant::now() >= d
        {
            control.stop(StopReason::Deadline);
        }
        match ev {
            Event::Token {
                id: tok,
                text,
                logprobs,
            } => {
                let lp = logprobs.map(|(chosen, top)| v1::TokenLogprobs {
                    token_id: tok,
                    token: chosen.token,
                    logprob: chosen.logprob,
                    top: top.into_iter().map(candidate).collect(),
                });
                emit(text, lp, &mut seq, false)
            }
            Event::Tail(text) => emit(text, None, &mut seq, false),
        }
    });
    emit("", None, &mut seq, true);
    if let Some(c) = &spec.conversation
        && result.is_ok()
    {
        c.put(session);
    }
    match result {
        Ok(out) => {
            let finish = match (out.finish, control.reason()) {
                (FinishReason::Cancelled, StopReason::Deadline) => v1::FinishReason::Deadline,
                (FinishReason::Cancelled, _) => v1::FinishReason::Cancelled,
                (FinishReason::Stop, _) => v1::FinishReason::Stop,
                (FinishReason::Length, _) => v1::FinishReason::Length,
            };
            let t = &out.timings;
            let timings = v1::Timings {
                queue_ms,
                prompt_ms: t.prompt_ms as f32,
                first_token_ms: t.first_token_ms as f32,
                total_ms: ms(spec.received.elapsed()),
                prompt_tok_s: t.prompt_tok_s as f32,
                decode_tok_s: t.decode_tok_s as f32,
            };
            tracing::info!(request_id = %id, finish = ?finish, tokens = out.tokens.len(), decode_tok_s = t.decode_tok_s, "answered");
            let _ = sink.send(done(
                seq,
                finish,
                out.prompt_tokens as u32,
                out.tokens.len() as u32,
                timings,
            ));
            t.decode_tok_s as f32
        }
        Err(e) => {
            let code = match e {
                EngineError::PromptTooLong { .. } => ErrorCode::TooLarge,
                EngineError::InvalidParam(_) | EngineError::EmptyPrompt => ErrorCode::BadRequest,
                _ => ErrorCode::ModelError,
            };
            tracing::warn!(request_id = %id, error = %e, "request failed");
            let _ = sink.send(wire::error(id, code, e.to_string()));
            0.0
        }
    }
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("config", &self.config)
            .field("stats", &self.stats())
            .finish()
    }
}
