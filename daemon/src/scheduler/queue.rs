//! The scheduler's bookkeeping as plain code: the priority queue, admission (who gets in, who
//! gets `busy`, `overheated`, a duplicate-id or shutting-down refusal), which job a free worker
//! takes under the thermal limits, and the counters. No threads, no clocks: the [`Scheduler`]
//! handle holds it under a lock and acts on what it decides.
//!
//! [`Scheduler`]: super::Scheduler

use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use firmware_bridge::{Limits as ThermalLimits, Policy, ThermalState};

use super::ReplySink;
use super::control::{Control, StopReason};
use super::event::{Code, Failure};
use super::job::Job;

/// How long a client refused with `busy` is told to wait.
pub(super) const BUSY_RETRY_MS: u32 = 1000;

/// The KV memory the running answers may reserve (`[model] kv_memory_mb`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvBudget {
    /// Bytes the running answers may reserve together.
    pub limit: u64,
    /// Bytes one token of a conversation takes.
    pub per_token: u64,
    /// Tokens one conversation holds at most.
    pub context: usize,
}

impl KvBudget {
    /// What `job` reserves: its prompt (the whole conversation) and `max_tokens`, at most the
    /// context, rounded up to the cache's growth step (what its cache can grow to).
    pub fn reservation(&self, job: &Job) -> u64 {
        use fieldllm_engine::attention::GROW_POSITIONS;
        let tokens = (job.prompt.len() + job.params.max_tokens).min(self.context);
        tokens.div_ceil(GROW_POSITIONS) as u64 * GROW_POSITIONS as u64 * self.per_token
    }
}

/// An accepted job waiting for a worker.
pub(super) struct Waiting {
    pub(super) job: Job,
    pub(super) sink: ReplySink,
    pub(super) control: Arc<Control>,
    order: u64,
}

impl Waiting {
    fn stopped(&self) -> bool {
        self.control.stopped()
    }
}

impl PartialEq for Waiting {
    fn eq(&self, other: &Self) -> bool {
        self.order == other.order
    }
}
impl Eq for Waiting {}
impl PartialOrd for Waiting {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Waiting {
    // max-heap: higher priority first, then earlier arrival
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.job
            .priority
            .cmp(&other.job.priority)
            .then(other.order.cmp(&self.order))
    }
}

/// What [`Queue::cancel`] found.
pub(super) enum Cancel {
    /// No job by that id is in flight.
    Unknown,
    /// A running job, flagged: its worker ends the answer with `cancelled`.
    Running,
    /// A waiting job, out of the queue: nobody else will answer it.
    Withdrawn(Box<Waiting>),
}

/// The queue, the jobs in flight and the counters.
pub(super) struct Queue {
    waiting: BinaryHeap<Waiting>,
    /// Every accepted job not yet finished (waiting or running), by id.
    active: HashMap<String, Arc<Control>>,
    /// Jobs waiting beyond the running ones before new ones get `busy`.
    capacity: usize,
    pub(super) running: usize,
    accepting: bool,
    /// Workers leave once the queue is empty.
    pub(super) stopping: bool,
    order: u64,
    pub(super) answered: u64,
    pub(super) last_decode_tok_s: f32,
    pub(super) thermal: ThermalState,
    limits: ThermalLimits,
    pub(super) retry_after_ms: u32,
    kv: Option<KvBudget>,
    /// KV bytes reserved by each running job, and their sum.
    reserved: HashMap<String, u64>,
    pub(super) kv_reserved: u64,
}

impl Queue {
    pub(super) fn new(capacity: usize) -> Queue {
        Queue {
            waiting: BinaryHeap::new(),
            active: HashMap::new(),
            capacity,
            running: 0,
            accepting: true,
            stopping: false,
            order: 0,
            answered: 0,
            last_decode_tok_s: 0.0,
            thermal: ThermalState::Nominal,
            limits: Policy::default().limits(ThermalState::Nominal),
            retry_after_ms: 0,
            kv: None,
            reserved: HashMap::new(),
            kv_reserved: 0,
        }
    }

    /// The queue with a KV budget: a job runs only when its reservation fits beside the
    /// running ones'; one that could never fit is refused.
    pub(super) fn with_kv(mut self, kv: KvBudget) -> Queue {
        self.kv = Some(kv);
        self
    }

    /// Jobs waiting.
    pub(super) fn depth(&self) -> usize {
        self.waiting.len()
    }

    /// Whether every accepted job has finished.
    pub(super) fn idle(&self) -> bool {
        self.active.is_empty()
    }

    /// Whether `id` may enter now; if not, the refusal to send.
    pub(super) fn admit(&self, id: &str) -> Result<(), Failure> {
        let depth = self.waiting.len() as u32;
        let refuse = |code, message: String, retry_after_ms| Failure {
            id: id.to_string(),
            code,
            message,
            queue_depth: depth,
            retry_after_ms,
        };
        if !self.accepting {
            return Err(refuse(Code::Internal, "shutting down".into(), 0));
        }
        if !self.limits.accept {
            return Err(refuse(
                Code::Overheated,
                format!(
                    "the accelerator is {}: no new work until it cools; try again in {} s",
                    self.thermal.as_str(),
                    self.retry_after_ms.div_ceil(1000)
                ),
                self.retry_after_ms,
            ));
        }
        if self.active.contains_key(id) {
            return Err(refuse(
                Code::BadRequest,
                format!("an answer to id {id:?} is already in progress"),
                0,
            ));
        }
        if self.waiting.len() >= self.capacity {
            return Err(refuse(
                Code::Busy,
                format!("queue full ({depth} waiting)"),
                BUSY_RETRY_MS,
            ));
        }
        Ok(())
    }

    /// Admits `job` or hands back the refusal (and the sink to send it on).
    pub(super) fn submit(&mut self, job: Job, sink: ReplySink) -> Result<(), (Failure, ReplySink)> {
        if let Err(f) = self.admit(&job.id) {
            return Err((f, sink));
        }
        if let Some(kv) = self.kv
            && kv.reservation(&job) > kv.limit
        {
            let mb = |b: u64| b.div_ceil(1_000_000);
            let f = Failure::new(
                &job.id,
                Code::TooLarge,
                format!(
                    "this request needs {} MB of KV cache ({} prompt tokens and max_tokens {}), \
                     more than the {} MB the running answers may take ([model] kv_memory_mb)",
                    mb(kv.reservation(&job)),
                    job.prompt.len(),
                    job.params.max_tokens,
                    mb(kv.limit)
                ),
            );
            return Err((f, sink));
        }
        let control = Arc::new(Control::default());
        self.active.insert(job.id.clone(), control.clone());
        self.order += 1;
        self.waiting.push(Waiting {
            job,
            sink,
            control,
            order: self.order,
        });
        Ok(())
    }

    /// The job a free worker takes, counted as running: one already stopped (answered at
    /// once, whatever the limits), else the first in line if the thermal limits allow one more
    /// running answer.
    pub(super) fn next_job(&mut self) -> Option<Waiting> {
        let open = self.limits.accept
            && self.running < self.limits.max_running
            && self.waiting.peek().is_some_and(|w| self.kv_fits(&w.job));
        let job = if open || self.waiting.peek().is_some_and(Waiting::stopped) {
            self.waiting.pop()
        } else {
            self.take_waiting(Waiting::stopped)
        };
        if let Some(w) = &job {
            self.running += 1;
            if let Some(kv) = self.kv
                && !w.stopped()
            {
                let r = kv.reservation(&w.job);
                self.kv_reserved += r;
                self.reserved.insert(w.job.id.clone(), r);
            }
        }
        job
    }

    /// Whether `job`'s KV reservation fits beside the running jobs' (the first always does:
    /// a job larger than the whole budget was refused at the door).
    fn kv_fits(&self, job: &Job) -> bool {
        self.kv.is_none_or(|kv| {
            self.reserved.is_empty() || self.kv_reserved + kv.reservation(job) <= kv.limit
        })
    }

    /// A running job ended; `decode_tok_s` is its speed (0: none measured).
    pub(super) fn finished(&mut self, id: &str, decode_tok_s: f32) {
        if let Some(r) = self.reserved.remove(id) {
            self.kv_reserved -= r;
        }
        self.running = self.running.saturating_sub(1);
        self.active.remove(id);
        self.answered += 1;
        if decode_tok_s > 0.0 {
            self.last_decode_tok_s = decode_tok_s;
        }
    }

    /// Cancels a job. A running one is flagged (its worker ends it); a waiting one leaves the
    /// queue at once, counted as answered, and frees its place and its id: the caller sends
    /// its final.
    pub(super) fn cancel(&mut self, id: &str) -> Cancel {
        let Some(control) = self.active.get(id) else {
            return Cancel::Unknown;
        };
        control.stop(StopReason::Cancelled);
        let Some(w) = self.take_waiting(|w| w.job.id == id) else {
            return Cancel::Running;
        };
        self.active.remove(id);
        self.answered += 1;
        Cancel::Withdrawn(Box::new(w))
    }

    /// Takes the first waiting job that `which` picks out of the queue, wherever it stands.
    fn take_waiting(&mut self, which: impl Fn(&Waiting) -> bool) -> Option<Waiting> {
        if !self.waiting.iter().any(&which) {
            return None;
        }
        let mut v = std::mem::take(&mut self.waiting).into_vec();
        let job = v.iter().position(&which).map(|i| v.swap_remove(i));
        self.waiting = v.into();
        job
    }

    /// Obeys a thermal state: waiting jobs are stopped (to be answered `overheated`) when work
    /// is refused, running ones (to end `thermal`) when they must stop. Returns the decode cap
    /// (0: none).
    pub(super) fn set_thermal(
        &mut self,
        state: ThermalState,
        limits: ThermalLimits,
        retry_after: Duration,
    ) -> f32 {
        self.thermal = state;
        self.limits = limits;
        self.retry_after_ms = u32::try_from(retry_after.as_millis()).unwrap_or(u32::MAX);
        if !limits.accept {
            for w in self.waiting.iter() {
                w.control.stop(StopReason::Overheated);
            }
        }
        if limits.stop_running {
            for c in self.active.values() {
                c.stop(StopReason::Thermal);
            }
        }
        limits.decode_tok_s.filter(|c| *c > 0.0).unwrap_or(0.0)
    }

    /// Refuses new jobs from now on.
    pub(super) fn close(&mut self) {
        self.accepting = false;
    }

    /// Cancels every job in flight (the end of a shutdown's grace).
    pub(super) fn cancel_all(&self) {
        for c in self.active.values() {
            c.stop(StopReason::Cancelled);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Instant;

    use fieldllm_engine::GenerateParams;

    use super::*;
    use crate::scheduler::job::{Priority, Transport};

    fn job(id: &str, priority: Priority) -> Job {
        Job {
            citations: None,
            id: id.into(),
            prompt: vec![1, 2, 3],
            params: GenerateParams::default(),
            priority,
            deadline: None,
            stream: true,
            received: Instant::now(),
            conversation: None,
            transport: Transport::Local,
        }
    }

    fn sink() -> ReplySink {
        tokio::sync::mpsc::unbounded_channel().0
    }

    fn submit(q: &mut Queue, id: &str, p: Priority) -> Result<(), Failure> {
        q.submit(job(id, p), sink()).map_err(|(f, _)| f)
    }

    fn order(q: &mut Queue) -> Vec<String> {
        let mut v = Vec::new();
        while let Some(w) = q.next_job() {
            q.finished(&w.job.id, 0.0);
            v.push(w.job.id);
        }
        v
    }

    #[test]
    fn higher_priority_first_then_arrival() {
        let mut q = Queue::new(8);
        for (id, p) in [
            ("n1", Priority::Normal),
            ("low", Priority::Low),
            ("h1", Priority::High),
            ("n2", Priority::Normal),
            ("h2", Priority::High),
        ] {
            submit(&mut q, id, p).unwrap();
        }
        assert_eq!(order(&mut q), ["h1", "h2", "n1", "n2", "low"]);
        assert_eq!(q.answered, 5);
        assert!(q.idle());
    }

    /// 1000 bytes a token, room for 1536 tokens: a job of 3 prompt tokens and `max_tokens`
    /// 300 reserves 512 positions (two of the cache's 256-position steps), so three run at
    /// once and a fourth waits for one of them; a job that can never fit is refused.
    #[test]
    fn the_kv_budget_holds_back_what_does_not_fit_and_refuses_what_never_will() {
        let kv = KvBudget {
            limit: 1536 * 1000,
            per_token: 1000,
            context: 2048,
        };
        let mut q = Queue::new(8).with_kv(kv);
        let sized = |id: &str, max_tokens: usize| {
            let mut j = job(id, Priority::Normal);
            j.params.max_tokens = max_tokens;
            j
        };
        for id in ["a", "b", "c", "d"] {
            q.submit(sized(id, 300), sink())
                .map_err(|(f, _)| f)
                .unwrap();
        }
        assert_eq!(kv.reservation(&sized("x", 300)), 512 * 1000);
        let running: Vec<_> = (0..3).map(|_| q.next_job().unwrap()).collect();
        assert_eq!(q.kv_reserved, 1536 * 1000);
        assert!(q.next_job().is_none(), "the fourth waits");
        assert_eq!(q.depth(), 1);
        q.finished(&running[1].job.id, 0.0);
        assert_eq!(q.kv_reserved, 1024 * 1000);
        assert_eq!(q.next_job().unwrap().job.id, "d");
        // the context caps a reservation; more than the whole budget is refused at the door
        let huge = sized("huge", 100_000);
        assert_eq!(kv.reservation(&huge), 2048 * 1000);
        let f = q.submit(huge, sink()).map_err(|(f, _)| f).unwrap_err();
        assert_eq!(f.code, Code::TooLarge);
        assert!(f.message.contains("kv_memory_mb"), "{}", f.message);
        // a waiting job that was stopped still leaves at once, budget or not
        q.submit(sized("e", 300), sink())
            .map_err(|(f, _)| f)
            .unwrap();
        q.submit(sized("f", 300), sink())
            .map_err(|(f, _)| f)
            .unwrap();
        assert!(q.next_job().is_none());
        assert!(matches!(q.cancel("f"), Cancel::Withdrawn(_)));
        q.active["e"].stop(StopReason::Deadline);
        let e = q.next_job().unwrap();
        assert_eq!(e.job.id, "e");
        q.finished("e", 0.0);
        assert_eq!(q.kv_reserved, 1536 * 1000, "a stopped job reserves nothing");
    }

    #[test]
    fn a_full_queue_refuses_busy_with_its_depth() {
        let mut q = Queue::new(2);
        submit(&mut q, "a", Priority::Normal).unwrap();
        // a running job does not count against the queue
        let running = q.next_job().unwrap();
        submit(&mut q, "b", Priority::Normal).unwrap();
        submit(&mut q, "c", Priority::Normal).unwrap();
        let f = submit(&mut q, "d", Priority::High).unwrap_err();
        assert_eq!(
            (f.code, f.queue_depth, f.retry_after_ms),
            (Code::Busy, 2, BUSY_RETRY_MS)
        );
        assert_eq!(f.id, "d");
        q.finished(&running.job.id, 0.0);
        assert_eq!(q.depth(), 2);
    }

    #[test]
    fn an_id_in_flight_is_refused_until_it_finishes() {
        let mut q = Queue::new(4);
        submit(&mut q, "same", Priority::Normal).unwrap();
        assert_eq!(
            submit(&mut q, "same", Priority::Normal).unwrap_err().code,
            Code::BadRequest
        );
        let w = q.next_job().unwrap();
        assert_eq!(
            submit(&mut q, "same", Priority::Normal).unwrap_err().code,
            Code::BadRequest,
            "running counts as in flight"
        );
        q.finished(&w.job.id, 12.5);
        submit(&mut q, "same", Priority::Normal).unwrap();
        assert_eq!(q.last_decode_tok_s, 12.5);
    }

    #[test]
    fn a_closed_queue_refuses_as_shutting_down() {
        let mut q = Queue::new(4);
        q.close();
        let f = submit(&mut q, "late", Priority::Normal).unwrap_err();
        assert_eq!(f.code, Code::Internal);
        assert!(f.message.contains("shutting down"));
    }

    #[test]
    fn cancel_withdraws_a_waiting_job_and_flags_a_running_one() {
        let mut q = Queue::new(2);
        submit(&mut q, "run", Priority::Normal).unwrap();
        let running = q.next_job().unwrap();
        submit(&mut q, "a", Priority::Normal).unwrap();
        submit(&mut q, "b", Priority::High).unwrap();
        assert_eq!(
            submit(&mut q, "c", Priority::Normal).unwrap_err().code,
            Code::Busy
        );
        let Cancel::Withdrawn(w) = q.cancel("a") else {
            panic!("a waiting job is withdrawn")
        };
        assert_eq!(w.job.id, "a");
        assert_eq!(w.control.reason(), StopReason::Cancelled);
        // its place and its id are free at once, with the running job still running
        assert_eq!((q.depth(), q.answered), (1, 1));
        submit(&mut q, "a", Priority::Low).unwrap();
        assert!(matches!(q.cancel("run"), Cancel::Running));
        assert_eq!(running.control.reason(), StopReason::Cancelled);
        assert!(matches!(q.cancel("unknown"), Cancel::Unknown));
        q.finished("run", 0.0);
        assert_eq!(order(&mut q), ["b", "a"]);
    }

    #[test]
    fn thermal_limits_gate_admission_and_the_running_count() {
        let policy = Policy {
            warm_decode_tok_s: 40.0,
            warm_max_running: 1,
        };
        let mut q = Queue::new(8);
        let wait = Duration::from_secs(7);
        // warm: a cap, and one answer at a time
        let cap = q.set_thermal(ThermalState::Warm, policy.limits(ThermalState::Warm), wait);
        assert_eq!(cap, 40.0);
        submit(&mut q, "w1", Priority::Normal).unwrap();
        submit(&mut q, "w2", Priority::Normal).unwrap();
        let w1 = q.next_job().unwrap();
        assert!(q.next_job().is_none(), "one running at warm");
        // hot: the cap stays; waiting jobs are stopped as overheated and still handed out (to
        // be answered), new ones refused with the wait
        assert_eq!(
            q.set_thermal(ThermalState::Hot, policy.limits(ThermalState::Hot), wait),
            40.0
        );
        let w2 = q.next_job().expect("a stopped job passes the limits");
        assert_eq!(w2.control.reason(), StopReason::Overheated);
        assert!(!w1.control.stopped(), "the running answer finishes");
        let f = submit(&mut q, "new", Priority::High).unwrap_err();
        assert_eq!((f.code, f.retry_after_ms), (Code::Overheated, 7000));
        assert!(f.message.contains("hot"), "{}", f.message);
        // critical: the running answer is stopped
        q.set_thermal(
            ThermalState::Critical,
            policy.limits(ThermalState::Critical),
            wait,
        );
        assert_eq!(w1.control.reason(), StopReason::Thermal);
        q.finished("w1", 0.0);
        q.finished("w2", 0.0);
        // nominal: open again
        q.set_thermal(
            ThermalState::Nominal,
            policy.limits(ThermalState::Nominal),
            wait,
        );
        submit(&mut q, "again", Priority::Normal).unwrap();
        assert!(q.next_job().is_some());
    }

    #[test]
    fn a_stopped_job_deep_in_the_queue_is_answered_past_the_limits() {
        let policy = Policy {
            warm_decode_tok_s: 40.0,
            warm_max_running: 1,
        };
        let mut q = Queue::new(8);
        let go = |q: &mut Queue, state| {
            q.set_thermal(state, policy.limits(state), Duration::ZERO);
        };
        go(&mut q, ThermalState::Warm);
        submit(&mut q, "run", Priority::Normal).unwrap();
        let _running = q.next_job().unwrap();
        submit(&mut q, "dropped", Priority::Low).unwrap();
        // hot for a moment: the waiting job is stopped (to be answered `overheated`)
        go(&mut q, ThermalState::Hot);
        go(&mut q, ThermalState::Warm);
        submit(&mut q, "first", Priority::High).unwrap();
        let w = q.next_job().expect("the stopped job is answered now");
        assert_eq!(w.job.id, "dropped");
        assert_eq!(w.control.reason(), StopReason::Overheated);
        assert!(q.next_job().is_none(), "\"first\" still waits for the slot");
    }
}
