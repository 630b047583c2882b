//! The scheduler: a bounded priority queue in front of engine worker threads.
//!
//! Transports hand it whole [`Job`]s (made by [`crate::request::Intake`]) with a reply channel;
//! it answers every accepted job with chunks and exactly one final [`Reply`] (also across
//! cancel, deadline and shutdown) and refuses at once with `busy` when the queue is full. The
//! replies are typed events: each transport encodes them at its own edge. It knows nothing of
//! MQTT or serial, and calls the model through the small [`Engine`] trait.
//!
//! It obeys the firmware bridge's thermal limits ([`Scheduler::set_thermal`]): a decode-rate
//! cap per answer and fewer answers at once when warm; new and waiting requests refused with
//! `overheated` when hot (running answers finish); running answers ended with finish reason
//! `thermal` when critical.
//!
//! Inside: [`queue`] decides (admission, order, limits) in plain code, [`worker`] runs jobs,
//! [`control`] stops them from outside, [`stream`] cuts the text into chunks.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use firmware_bridge::{Limits as ThermalLimits, ThermalState};
use tokio::sync::mpsc::UnboundedSender;

mod control;
mod conversation;
mod engine;
mod event;
mod job;
mod queue;
pub mod scripted;
mod stream;
mod worker;

pub use conversation::Conversation;
pub use engine::{Engine, EngineSession, ModelEngine};
pub use event::{Chunk, Code, Done, Failure, Finish, Reply, Timings, TokenLogprobs, Usage};
pub use job::{Job, Priority, Transport};
use queue::{Cancel, KvBudget, Queue};

/// Where a job's replies go. Sending never blocks the worker thread.
pub type ReplySink = UnboundedSender<Reply>;

/// Scheduler settings (`[limits]` and `[model]` of the config).
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Jobs waiting beyond the running ones before new ones get `busy`.
    pub queue: usize,
    /// Engine worker threads (answers generated at once).
    pub slots: usize,
    /// Bytes of KV cache the running answers may reserve together (`None`: no bound).
    pub kv_memory: Option<u64>,
}

impl SchedulerConfig {
    /// `queue` waiting and `slots` running jobs, the configuration file's KV budget.
    pub fn new(queue: usize, slots: usize) -> SchedulerConfig {
        SchedulerConfig {
            queue,
            slots,
            kv_memory: Some(crate::config::ModelSection::default().kv_memory_bytes()),
        }
    }
}

impl Default for SchedulerConfig {
    /// The configuration file's defaults.
    fn default() -> Self {
        SchedulerConfig::new(
            crate::config::LimitsSection::default().queue,
            crate::config::ModelSection::default().slots,
        )
    }
}

pub(crate) struct Shared {
    state: Mutex<Queue>,
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

    fn lock(&self) -> MutexGuard<'_, Queue> {
        // a poisoned lock means a worker panicked mid-update; the queue itself stays usable
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
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

/// Why the scheduler could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// `slots` is 0.
    #[error("slots must be at least 1")]
    NoSlots,
    /// The OS refused a thread.
    #[error("cannot start engine thread: {0}")]
    Thread(std::io::Error),
}

impl Scheduler {
    /// Starts `config.slots` worker threads on `engine`.
    pub fn start(
        engine: Arc<dyn Engine>,
        config: SchedulerConfig,
    ) -> Result<Scheduler, StartError> {
        if config.slots == 0 {
            return Err(StartError::NoSlots);
        }
        let mut queue = Queue::new(config.queue);
        let per_token = engine.kv_bytes_per_token();
        if let Some(limit) = config.kv_memory
            && per_token > 0
        {
            queue = queue.with_kv(KvBudget {
                limit,
                per_token,
                context: engine.context_length(),
            });
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(queue),
            wake: Condvar::new(),
            idle: Condvar::new(),
            decode_cap: AtomicU32::new(0),
            beats: (0..config.slots).map(|_| AtomicU64::new(0)).collect(),
            epoch: Instant::now(),
        });
        let mut workers = Vec::new();
        for n in 0..config.slots {
            let (shared, engine) = (shared.clone(), engine.clone());
            let handle = std::thread::Builder::new()
                .name(format!("engine-{n}"))
                .spawn(move || worker::run(shared, engine, n))
                .map_err(StartError::Thread)?;
            workers.push(handle);
        }
        Ok(Scheduler {
            shared,
            config,
            workers: Arc::new(Mutex::new(workers)),
        })
    }

    /// Accepts a job, or answers at once on `sink` with `busy` (queue full), `overheated`,
    /// `bad_request` (an answer with this id is in flight) or `internal` (shutting down).
    /// Returns whether the job was accepted.
    pub fn submit(&self, job: Job, sink: ReplySink) -> bool {
        let (id, transport, priority) = (job.id.clone(), job.transport.as_str(), job.priority);
        let refused = self.shared.lock().submit(job, sink);
        match refused {
            Ok(()) => {
                tracing::debug!(request_id = %id, transport, ?priority, "queued");
                self.shared.wake.notify_one();
                true
            }
            Err((f, sink)) => {
                tracing::info!(request_id = %id, transport, code = ?f.code, depth = f.queue_depth, reason = %f.message, "refused");
                let _ = sink.send(Reply::Failed(f));
                false
            }
        }
    }

    /// Cancels a queued or running job; its answer ends with `cancelled`. False if unknown.
    pub fn cancel(&self, id: &str) -> bool {
        let mut st = self.shared.lock();
        match st.cancel(id) {
            Cancel::Unknown => false,
            Cancel::Running => true,
            Cancel::Withdrawn(w) => {
                // answered here: a waiting job needs no free worker to end, and its place in
                // the queue and its id are free from now on. Sent under the lock, as a worker
                // sends its finals: counted first, and in the channel before `shutdown` sees
                // the scheduler idle.
                let queue_ms = worker::ms(w.job.received.elapsed());
                tracing::info!(request_id = %id, queue_ms, "cancelled while waiting");
                let _ = w
                    .sink
                    .send(worker::never_started(&w, st.retry_after_ms, queue_ms));
                if st.idle() {
                    self.shared.idle.notify_all();
                }
                true
            }
        }
    }

    /// Current counters.
    pub fn stats(&self) -> Stats {
        let st = self.shared.lock();
        Stats {
            queued: st.depth(),
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
        let cap = st.set_thermal(state, limits, retry_after);
        // stored under the lock, so the cap always goes with the state it was set for
        self.shared
            .decode_cap
            .store(cap.to_bits(), Ordering::Release);
        drop(st);
        self.shared.wake.notify_all();
    }

    /// Stops intake, lets accepted jobs finish for up to `grace`, then cancels the rest and
    /// waits for the workers. Every accepted job has had its final reply when this returns.
    /// Blocking: call it from a plain thread or `spawn_blocking`.
    pub fn shutdown(&self, grace: Duration) {
        let deadline = Instant::now() + grace;
        let mut st = self.shared.lock();
        st.close();
        while !st.idle() {
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
        st.cancel_all();
        st.stopping = true;
        drop(st);
        self.shared.wake.notify_all();
        let workers =
            std::mem::take(&mut *self.workers.lock().unwrap_or_else(PoisonError::into_inner));
        for w in workers {
            let _ = w.join();
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
