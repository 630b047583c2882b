//! The scheduler: a bounded priority queue in front of engine worker threads.
//!
//! Transports hand it validated [`JobSpec`]s with a reply channel; it answers every accepted
//! job with exactly one final `Done` or `Error` (also across cancel, deadline and shutdown) and
//! refuses at once with `busy` when the queue is full. It knows nothing of MQTT or serial.
//!
//! It obeys the firmware bridge's thermal limits ([`Scheduler::set_thermal`]): a decode-rate
//! cap per answer and fewer answers at once when warm; new and waiting requests refused with
//! `overheated` when hot (running answers finish); running answers ended with finish reason
//! `thermal` when critical.

use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use firmware_bridge::{Limits as ThermalLimits, Policy, ThermalState};
use tokio::sync::mpsc::UnboundedSender;

use crate::proto::v1::{self, response::Kind};
use crate::proto::{self as wire, ErrorCode, Response};
use crate::request::JobSpec;
use fieldllm_engine::generate::{Candidate, Event};
use fieldllm_engine::{EngineError, FinishReason, Model, Session, generate};

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
    /// Running at critical: ends with finish reason `thermal`.
    Thermal = 3,
    /// Still queued when the board got hot: refused with `overheated`.
    Overheated = 4,
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
            3 => StopReason::Thermal,
            4 => StopReason::Overheated,
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

impl Queued {
    fn stopped(&self) -> bool {
        self.control.flag.load(Ordering::Acquire)
    }
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
    thermal: ThermalState,
    limits: ThermalLimits,
    retry_after_ms: u32,
}

impl Default for State {
    fn default() -> Self {
        State {
            queue: BinaryHeap::new(),
            active: HashMap::new(),
            running: 0,
            accepting: false,
            stopping: false,
            order: 0,
            answered: 0,
            last_decode_tok_s: 0.0,
            thermal: ThermalState::Nominal,
            limits: Policy::default().limits(ThermalState::Nominal),
            retry_after_ms: 0,
        }
    }
}

impl State {
    /// The next job a worker may take: one already stopped (answered at once, whatever the
    /// limits), else the first in line if the thermal limits allow one more running answer.
    fn next_job(&mut self) -> Option<Queued> {
        let open = self.limits.accept && self.running < self.limits.max_running;
        if open || self.queue.peek().is_some_and(Queued::stopped) {
            return self.queue.pop();
        }
        if self.queue.iter().any(Queued::stopped) {
            let mut v = std::mem::take(&mut self.queue).into_vec();
            let job = v.iter().position(Queued::stopped).map(|i| v.swap_remove(i));
            self.queue = v.into();
            return job;
        }
        None
    }
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    idle: Condvar,
    /// Decode-rate cap per answer, tokens/s as `f32` bits (0: none). Read per token without
    /// the lock.
    decode_cap: AtomicU32,
    /// Per worker: the last sign of life of the job it runs (ms since `epoch`, plus one), or
    /// 0 when idle. The heartbeat behind systemd's watchdog.
    beats: Vec<AtomicU64>,
    epoch: Instant,
}

impl Shared {
    fn beat(&self, worker: usize) {
        let ms = self.epoch.elapsed().as_millis() as u64 + 1;
        self.beats[worker].store(ms, Ordering::Release);
    }
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
    /// The thermal state the scheduler obeys.
    pub thermal: ThermalState,
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
            decode_cap: AtomicU32::new(0),
            beats: (0..config.slots).map(|_| AtomicU64::new(0)).collect(),
            epoch: Instant::now(),
        });
        let mut workers = Vec::new();
        for n in 0..config.slots {
            let (shared, model) = (shared.clone(), model.clone());
            let handle = std::thread::Builder::new()
                .name(format!("engine-{n}"))
                .spawn(move || worker(shared, model, n))
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
        if !st.limits.accept {
            let (state, wait) = (st.thermal, st.retry_after_ms);
            tracing::info!(request_id = %spec.id, transport = spec.transport, thermal = state.as_str(), "overheated: refused");
            let mut r = wire::error(
                &spec.id,
                ErrorCode::Overheated,
                format!(
                    "the accelerator is {}: no new work until it cools; try again in {} s",
                    state.as_str(),
                    wait.div_ceil(1000)
                ),
            );
            if let Some(Kind::Error(e)) = &mut r.kind {
                e.retry_after_ms = wait;
                e.queue_depth = st.queue.len() as u32;
            }
            let _ = sink.send(r);
            return false;
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
            tracing::info!(request_id = %spec.id, transport = spec.transport, depth, "queue full: busy");
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
        tracing::debug!(request_id = %spec.id, transport = spec.transport, priority = ?spec.priority, "queued");
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
            thermal: st.thermal,
        }
    }

    /// The heartbeat: the longest time a worker has been on one job without a sign of life
    /// (a generated token, or the start of the job), if that exceeds `limit`. Idle workers
    /// are alive. A long prefill shows no token until it ends, so `limit` must exceed the
    /// longest prefill the board can take.
    pub fn stalled(&self, limit: Duration) -> Option<Duration> {
        let now = self.shared.epoch.elapsed().as_millis() as u64 + 1;
        self.shared
            .beats
            .iter()
            .map(|b| b.load(Ordering::Acquire))
            .filter(|&b| b != 0)
            .map(|b| Duration::from_millis(now.saturating_sub(b)))
            .filter(|d| *d > limit)
            .max()
    }

    /// Obeys a new thermal state from the firmware bridge. Not accepting: waiting jobs are
    /// answered `overheated` with `retry_after`. Stopping running answers: they end `thermal`.
    pub fn set_thermal(&self, state: ThermalState, limits: ThermalLimits, retry_after: Duration) {
        let mut st = self.shared.lock();
        st.thermal = state;
        st.limits = limits;
        st.retry_after_ms = u32::try_from(retry_after.as_millis()).unwrap_or(u32::MAX);
        let cap = limits.decode_tok_s.filter(|c| *c > 0.0).unwrap_or(0.0);
        self.shared
            .decode_cap
            .store(cap.to_bits(), Ordering::Release);
        if !limits.accept {
            for q in st.queue.iter() {
                q.control.stop(StopReason::Overheated);
            }
        }
        if limits.stop_running {
            for c in st.active.values() {
                c.stop(StopReason::Thermal);
            }
        }
        drop(st);
        self.shared.wake.notify_all();
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

fn worker(shared: Arc<Shared>, model: Arc<Model>, n: usize) {
    loop {
        let job = {
            let mut st = shared.lock();
            loop {
                if let Some(job) = st.next_job() {
                    st.running += 1;
                    shared.beat(n);
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
            run_job(&model, job, &mut out, &shared, n)
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
        shared.beats[n].store(0, Ordering::Release);
        let mut st = shared.lock();
        st.running -= 1;
        st.active.remove(&id);
        st.answered += 1;
        if decode > 0.0 {
            st.last_decode_tok_s = decode;
        }
        // a slot under the thermal limit is free again
        shared.wake.notify_one();
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

/// Holds each token back until `1 / cap` after the previous one, so the answer's decode rate
/// stays under the thermal cap (read per token: a cap lifted mid-answer applies at once).
/// Sleeps in short slices so a cancel or a critical state still ends the answer promptly.
struct Pacer<'a> {
    cap: &'a AtomicU32,
    next: Option<Instant>,
}

impl Pacer<'_> {
    fn wait(&mut self, stop: &AtomicBool) {
        let cap = f32::from_bits(self.cap.load(Ordering::Acquire));
        if cap <= 0.0 {
            self.next = None;
            return;
        }
        if let Some(at) = self.next {
            loop {
                let now = Instant::now();
                if now >= at || stop.load(Ordering::Acquire) {
                    break;
                }
                std::thread::sleep((at - now).min(Duration::from_millis(50)));
            }
        }
        self.next = Some(Instant::now() + Duration::from_secs_f32(1.0 / cap));
    }
}

/// Runs one job to its final message; returns its decode speed (0 if none).
fn run_job(
    model: &Arc<Model>,
    job: Queued,
    sink: &mut HoldFinal,
    shared: &Shared,
    worker: usize,
) -> f32 {
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
            StopReason::Thermal | StopReason::Overheated => {
                // never started: the same answer as a refusal at the door
                let wait = shared.lock().retry_after_ms;
                let mut r = wire::error(
                    id,
                    ErrorCode::Overheated,
                    format!(
                        "the accelerator got hot before this request started; try again in {} s",
                        wait.div_ceil(1000)
                    ),
                );
                if let Some(Kind::Error(e)) = &mut r.kind {
                    e.retry_after_ms = wait;
                }
                tracing::info!(request_id = %id, "overheated: dropped from the queue");
                let _ = sink.send(r);
                return 0.0;
            }
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
    tracing::debug!(request_id = %id, transport = spec.transport, prompt_tokens = ids.len(), queue_ms, "generating");
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
    let mut pacer = Pacer {
        cap: &shared.decode_cap,
        next: None,
    };
    let result = generate(&mut session, &ids, &spec.params, &control.flag, &mut |ev| {
        if let Event::Token { .. } = ev {
            shared.beat(worker);
            pacer.wait(&control.flag);
        }
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
                (FinishReason::Cancelled, StopReason::Thermal | StopReason::Overheated) => {
                    v1::FinishReason::Thermal
                }
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
            tracing::info!(request_id = %id, transport = spec.transport, finish = ?finish, tokens = out.tokens.len(), decode_tok_s = t.decode_tok_s, "answered");
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
            tracing::warn!(request_id = %id, transport = spec.transport, error = %e, "request failed");
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
