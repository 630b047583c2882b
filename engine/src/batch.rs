//! Answers decoded together: one tract state keeps the KV caches of many sessions (one slot
//! each), and each run carries the rows of every session that has tokens to feed at that
//! moment. Decode reads every weight once per token; run for four answers at once, the
//! products read each weight once for all four rows (their kernels take up to four rows per
//! weight load), so the answers share the cost that dominates a step.
//!
//! There is no batch loop of its own: each answer keeps its own thread and its own generation
//! loop ([`crate::generate()`]: sampling, stop strings, logprobs, cancel, whatever its caller
//! does between tokens), and only its runs meet here. A session that wants to run hands in its
//! tokens and waits; whoever finds the gathering complete (every answering session has handed
//! in, or [`GATHER_WINDOW`] has passed since the first hand-in or since the last run ended,
//! whichever is later) leads: takes the state and everything
//! handed in, runs it as one, hands each its logits. So answers join and leave between any two
//! steps, a panic in one answer's sampling ends that answer alone (its thread unwinds, its slot
//! is given back), and a new prompt's chunks ride in the same runs as the others' decode steps.
//!
//! Chunk size: a run with a 128-token chunk in it takes as long as a 128-token prefill, and
//! every answer beside it waits that long for its next token. While others answer, a prompt
//! goes in [`SHARED_PREFILL_CHUNK`]-token chunks instead (the products still fill their 4-row
//! tiles; docs/performance.md has the measured stall and prefill cost of each size).

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tract_core::internal::*;

use super::attention::{KvAttentionState, MAX_SLOTS};
use super::session::{OpProfile, PREFILL_CHUNK, Session};
use super::{EngineError, Model};

/// Prompt tokens per run while other sessions are answering.
pub const SHARED_PREFILL_CHUNK: usize = 32;

/// How long a run waits for the answering sessions that have not handed in their next token
/// yet (one is sampling, or paced by its caller) before it goes without them.
pub const GATHER_WINDOW: Duration = Duration::from_millis(3);

/// Sessions sharing one tract state (see the module's notes).
#[derive(Debug)]
pub struct Batcher {
    model: Arc<Model>,
    inner: Mutex<Inner>,
    turn: Condvar,
    /// Prompt tokens per run while others answer ([`SHARED_PREFILL_CHUNK`] unless set).
    shared_chunk: std::sync::atomic::AtomicUsize,
    /// Every op of every run timed into it, while set ([`Batcher::start_profile`]).
    profile: Mutex<Option<OpProfile>>,
}

#[derive(Debug)]
struct Inner {
    /// `None` while a run uses it.
    state: Option<Box<TypedSimpleState>>,
    /// Slots given back, to reuse.
    free: Vec<usize>,
    /// Slots ever handed out.
    next_slot: usize,
    /// Slots given back while a run held the state: emptied when it returns.
    released: Vec<usize>,
    /// Sessions answering now ([`Batcher::member`]).
    members: usize,
    /// Of them, those stepped away for a while ([`Presence::away`]): runs do not wait for them.
    away: usize,
    /// Tokens handed in for the next run.
    pending: Vec<Pending>,
    /// When the first of them was handed in.
    first_pending: Option<Instant>,
    /// When the last run gave the state back.
    free_since: Instant,
    /// Results of the last runs, by ticket.
    done: HashMap<u64, Result<Vec<f32>, String>>,
    next_ticket: u64,
    stats: BatchStats,
}

#[derive(Debug)]
struct Pending {
    ticket: u64,
    slot: usize,
    past: usize,
    tokens: Vec<u32>,
}

/// Counters over a batcher's life.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BatchStats {
    /// Runs.
    pub runs: u64,
    /// Sessions' turns in them (a run of three sessions counts three).
    pub entries: u64,
    /// Token rows in them.
    pub rows: u64,
    /// Time spent in them (the graph runs, outside the lock).
    pub busy: Duration,
    /// Runs that went when [`GATHER_WINDOW`] ran out, without the tokens of some session
    /// answering (one slow to sample, or waiting on its caller without stepping away).
    pub window_runs: u64,
}

impl Batcher {
    /// A batcher for `model`, whose rows must be open ([`crate::rows`]).
    pub fn new(model: &Arc<Model>) -> Result<Arc<Batcher>, EngineError> {
        if !model.rows {
            return Err(EngineError::Graph(
                "this model's graph runs one conversation at a time (its rows are not open)".into(),
            ));
        }
        let state = SimpleState::new(&model.plan).map_err(EngineError::graph)?;
        Ok(Arc::new(Batcher {
            model: model.clone(),
            inner: Mutex::new(Inner {
                state: Some(Box::new(state)),
                free: Vec::new(),
                next_slot: 0,
                released: Vec::new(),
                members: 0,
                away: 0,
                pending: Vec::new(),
                first_pending: None,
                free_since: Instant::now(),
                done: HashMap::new(),
                next_ticket: 0,
                stats: BatchStats::default(),
            }),
            turn: Condvar::new(),
            shared_chunk: SHARED_PREFILL_CHUNK.into(),
            profile: Mutex::new(None),
        }))
    }

    /// From now on, times every op of every run (as `fieldllmd bench --profile` does for one
    /// session) until [`Batcher::take_profile`]; a run costs a little more meanwhile.
    pub fn start_profile(&self) {
        *self.profile.lock().unwrap_or_else(PoisonError::into_inner) = Some(OpProfile::default());
    }

    /// What the runs since [`Batcher::start_profile`] spent, by op; stops timing.
    pub fn take_profile(&self) -> Option<OpProfile> {
        self.profile
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Sets the prompt tokens per run while other sessions answer (at least 1; a benchmark's
    /// knob: `fieldllmd bench --parallel` measures the stall of each size).
    pub fn set_shared_chunk(&self, tokens: usize) {
        self.shared_chunk
            .store(tokens.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    /// The model.
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // a thread that panicked holding the lock left the counters as they were: usable
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A fresh, empty session in a slot of this batcher's state.
    pub fn session(self: &Arc<Self>) -> Result<Session, EngineError> {
        let mut g = self.lock();
        let slot = match g.free.pop() {
            Some(s) => s,
            None if g.next_slot < MAX_SLOTS => {
                g.next_slot += 1;
                g.next_slot - 1
            }
            None => {
                return Err(EngineError::InvalidParam(format!(
                    "more than {MAX_SLOTS} conversations held at once"
                )));
            }
        };
        Ok(Session::shared(self, slot))
    }

    /// Counters so far.
    pub fn stats(&self) -> BatchStats {
        self.lock().stats
    }

    /// Counts a session as answering until the guard drops (see [`Session::answering`]).
    pub(crate) fn member(self: &Arc<Self>) -> Member {
        self.lock().members += 1;
        Member(self.clone())
    }

    /// Prompt tokens per run for a session feeding now.
    pub(crate) fn chunk_size(&self) -> usize {
        if self.lock().members > 1 {
            self.shared_chunk.load(std::sync::atomic::Ordering::Relaxed)
        } else {
            PREFILL_CHUNK
        }
    }

    /// Runs `tokens` for `slot` (which holds `past` tokens) in the next run; returns the logits
    /// after its last token.
    pub(crate) fn run(
        &self,
        slot: usize,
        past: usize,
        tokens: &[u32],
    ) -> Result<Vec<f32>, EngineError> {
        let mut g = self.lock();
        let ticket = g.next_ticket;
        g.next_ticket += 1;
        g.pending.push(Pending {
            ticket,
            slot,
            past,
            tokens: tokens.to_vec(),
        });
        g.first_pending.get_or_insert_with(Instant::now);
        // a leader waiting for the others may now have everyone
        self.turn.notify_all();
        loop {
            if let Some(r) = g.done.remove(&ticket) {
                return r.map_err(EngineError::Graph);
            }
            if g.state.is_none() {
                // a run is under way; its leader wakes everyone when it returns
                g = self.turn.wait(g).unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            // the window opens at the first hand-in, or when the state came back if that was
            // later: the sessions of the run that just ended get their moment to sample and
            // hand in, rather than the answers splitting into two halves that take turns
            let waited = g
                .first_pending
                .map_or(Duration::ZERO, |t| t.max(g.free_since).elapsed());
            let everyone = g.pending.len() + g.away >= g.members;
            if everyone || waited >= GATHER_WINDOW {
                if !everyone {
                    g.stats.window_runs += 1;
                }
                g = self.lead(g);
                continue;
            }
            g = self
                .turn
                .wait_timeout(g, GATHER_WINDOW - waited)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Runs everything handed in as one run, outside the lock; hands out the results.
    fn lead<'a>(&'a self, mut g: MutexGuard<'a, Inner>) -> MutexGuard<'a, Inner> {
        let Some(mut state) = g.state.take() else {
            return g;
        };
        let batch = std::mem::take(&mut g.pending);
        g.first_pending = None;
        drop(g);
        let entries: Vec<(usize, usize, &[u32])> = batch
            .iter()
            .map(|p| (p.slot, p.past, &p.tokens[..]))
            .collect();
        let started = Instant::now();
        // a panic inside tract must not leave the other sessions waiting for the state forever
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let inputs = self.model.step_inputs(&entries)?;
            let mut profile = self.profile.lock().unwrap_or_else(PoisonError::into_inner);
            let out = match profile.as_mut() {
                None => {
                    drop(profile);
                    state.run(inputs)
                }
                Some(p) => state.run_plan_with_eval(inputs, |ctx, st, node, inputs| {
                    let start = Instant::now();
                    let out = tract_core::plan::eval(ctx, st, node, inputs);
                    p.add(node.op.name().as_ref(), start.elapsed());
                    out
                }),
            }
            .map_err(EngineError::graph)?;
            self.model.step_logits(&out, entries.len())
        }))
        .unwrap_or_else(|_| Err(EngineError::Graph("the engine panicked in a run".into())));
        if result.is_err() {
            // the layers before the failing one took these rows: forget them
            for p in &batch {
                truncate_slot(&mut state, p.slot, p.past);
            }
        }
        let busy = started.elapsed();
        let mut g = self.lock();
        g.stats.busy += busy;
        for slot in std::mem::take(&mut g.released) {
            truncate_slot(&mut state, slot, 0);
            g.free.push(slot);
        }
        g.state = Some(state);
        g.free_since = Instant::now();
        g.stats.runs += 1;
        g.stats.entries += batch.len() as u64;
        g.stats.rows += batch.iter().map(|p| p.tokens.len() as u64).sum::<u64>();
        match result {
            Ok(logits) => {
                for (p, l) in batch.iter().zip(logits) {
                    g.done.insert(p.ticket, Ok(l));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, sessions = batch.len(), "a shared run failed");
                for p in &batch {
                    g.done.insert(p.ticket, Err(e.to_string()));
                }
            }
        }
        self.turn.notify_all();
        g
    }

    /// Keeps the first `len` tokens of `slot`'s cache (waits for a run under way).
    pub(crate) fn truncate(&self, slot: usize, len: usize) -> Result<(), EngineError> {
        let mut g = self.lock();
        while g.state.is_none() {
            g = self.turn.wait(g).unwrap_or_else(PoisonError::into_inner);
        }
        if let Some(state) = g.state.as_mut() {
            truncate_slot(state, slot, len);
        }
        Ok(())
    }

    /// Gives `slot` back (its session is dropped): its cache is emptied and the slot reused.
    pub(crate) fn release(&self, slot: usize) {
        let mut g = self.lock();
        match g.state.as_mut() {
            Some(state) => {
                truncate_slot(state, slot, 0);
                g.free.push(slot);
            }
            None => g.released.push(slot),
        }
    }

    /// Bytes of KV cache the state holds now (waits for a run under way).
    pub fn kv_bytes(&self) -> usize {
        let mut g = self.lock();
        while g.state.is_none() {
            g = self.turn.wait(g).unwrap_or_else(PoisonError::into_inner);
        }
        g.state.as_ref().map_or(0, |state| {
            state
                .op_states
                .iter()
                .flatten()
                .filter_map(|op| op.downcast_ref::<KvAttentionState>())
                .map(KvAttentionState::bytes)
                .sum()
        })
    }
}

/// An answering session's way to step out of the gathering while it waits on something other
/// than the engine (its caller's thermal pacing, a slow reader): the runs meanwhile go without
/// waiting [`GATHER_WINDOW`] for its tokens. Of a session with a state of its own: does nothing.
#[derive(Clone, Debug, Default)]
pub struct Presence(pub(crate) Option<Arc<Batcher>>);

impl Presence {
    /// Runs `f` stepped away.
    pub fn away<R>(&self, f: impl FnOnce() -> R) -> R {
        let Some(b) = &self.0 else { return f() };
        b.lock().away += 1;
        // a leader waiting for this session's tokens need not wait any more
        b.turn.notify_all();
        let _back = Back(b);
        f()
    }
}

/// Counts a stepped-away session back in when dropped (on unwind too).
struct Back<'a>(&'a Batcher);

impl Drop for Back<'_> {
    fn drop(&mut self) {
        let mut g = self.0.lock();
        g.away = g.away.saturating_sub(1);
    }
}

/// A session counted as answering (see [`Batcher::member`]).
pub(crate) struct Member(Arc<Batcher>);

impl Drop for Member {
    fn drop(&mut self) {
        let mut g = self.0.lock();
        g.members = g.members.saturating_sub(1);
        // a leader waiting for this session's tokens need not wait any more
        self.0.turn.notify_all();
    }
}

fn truncate_slot(state: &mut TypedSimpleState, slot: usize, len: usize) {
    for op in state.op_states.iter_mut().flatten() {
        if let Some(kv) = op.downcast_mut::<KvAttentionState>() {
            kv.truncate_slot(slot, len);
        }
    }
}
