//! The scheduler's rules against a scripted engine whose pace the test holds (priorities,
//! admission, cancel, deadlines, shutdown, thermal limits, panics, the heartbeat, exactly one
//! final reply for every accepted job), and against SmolLM2 for what only a real model shows
//! (a conversation's kept KV cache answers as a fresh one does).

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fieldllm_engine::{LoadOptions, Model};
use fieldllmd::proto::{Request, v1};
use fieldllmd::request::{Intake, Limits, Origin};
use fieldllmd::scheduler::scripted::{Gate, PANIC, ScriptedEngine};
use fieldllmd::scheduler::{
    Code, Conversation, Done, Engine, Failure, Finish, ModelEngine, Reply, Scheduler,
    SchedulerConfig, Transport,
};
use firmware_bridge::{Policy, ThermalState};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

/// Long enough for anything that is going to happen; only reached when a test fails.
const PATIENCE: Duration = Duration::from_secs(60);

/// A scheduler on a scripted engine, and the intake that makes its jobs.
struct Bench {
    s: Scheduler,
    intake: Intake,
    gate: Gate,
}

fn bench(gate: Gate, queue: usize, slots: usize) -> Bench {
    let engine: Arc<dyn Engine> = Arc::new(ScriptedEngine::new(gate.clone()));
    Bench {
        s: Scheduler::start(engine.clone(), SchedulerConfig::new(queue, slots)).unwrap(),
        intake: Intake::new(Limits::default(), engine),
        gate,
    }
}

impl Bench {
    fn job(
        &self,
        id: &str,
        prompt: &str,
        f: impl FnOnce(&mut Request),
    ) -> fieldllmd::scheduler::Job {
        let mut r = Request {
            id: id.into(),
            prompt: prompt.into(),
            ..Request::default()
        };
        f(&mut r);
        self.intake
            .job(r, None, Origin::new(Transport::Local), Instant::now())
            .unwrap()
    }

    fn submit(
        &self,
        id: &str,
        f: impl FnOnce(&mut Request),
        tx: &tokio::sync::mpsc::UnboundedSender<Reply>,
    ) -> bool {
        self.s.submit(self.job(id, "pump noise", f), tx.clone())
    }

    /// Waits until `n` jobs are held inside the engine (running, at the gate).
    fn held(&self, n: usize) {
        assert!(
            self.gate.wait_held(n, PATIENCE),
            "{n} jobs never reached the engine"
        );
    }
}

fn tokens(n: u32) -> impl FnOnce(&mut Request) {
    move |r| r.max_tokens = Some(n)
}

/// Reads replies until `n` finals arrived; checks per id: chunks in seq order, one final,
/// `Done.seq` counting the chunks.
fn collect(rx: &mut UnboundedReceiver<Reply>, n: usize) -> (Vec<String>, HashMap<String, Reply>) {
    collect_after(rx, n, &[])
}

/// [`collect`] when the test already read `seen` chunks of some ids.
fn collect_after(
    rx: &mut UnboundedReceiver<Reply>,
    n: usize,
    seen: &[(&str, u32)],
) -> (Vec<String>, HashMap<String, Reply>) {
    let mut order = Vec::new();
    let mut finals = HashMap::new();
    let mut next_seq: HashMap<String, u32> =
        seen.iter().map(|(id, n)| (id.to_string(), *n)).collect();
    while finals.len() < n {
        let r = recv(rx);
        let id = r.id().to_string();
        assert!(
            !finals.contains_key(&id),
            "a reply after the final for {id}: {r:?}"
        );
        match &r {
            Reply::Chunk(c) => {
                let want = next_seq.entry(id.clone()).or_default();
                assert_eq!(c.seq, *want, "chunks of {id} out of order");
                *want += 1;
            }
            Reply::Done(d) => {
                assert_eq!(
                    d.seq,
                    next_seq.get(&id).copied().unwrap_or(0),
                    "Done.seq of {id}"
                );
                order.push(id.clone());
                finals.insert(id, r);
            }
            Reply::Failed(_) => {
                order.push(id.clone());
                finals.insert(id, r);
            }
        }
    }
    (order, finals)
}

/// The next reply; a test fails (rather than hangs) if none comes within [`PATIENCE`].
fn recv(rx: &mut UnboundedReceiver<Reply>) -> Reply {
    let until = Instant::now() + PATIENCE;
    loop {
        match rx.try_recv() {
            Ok(r) => return r,
            Err(TryRecvError::Disconnected) => panic!("reply channel closed"),
            Err(TryRecvError::Empty) if Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(1))
            }
            Err(TryRecvError::Empty) => panic!("no reply within {PATIENCE:?}"),
        }
    }
}

fn done(r: &Reply) -> &Done {
    match r {
        Reply::Done(d) => d,
        other => panic!("expected Done, got {other:?}"),
    }
}

fn failure(r: &Reply) -> &Failure {
    match r {
        Reply::Failed(f) => f,
        other => panic!("expected a failure, got {other:?}"),
    }
}

/// Waits for the final of `id`, checking nothing else ends on the way.
fn final_of(rx: &mut UnboundedReceiver<Reply>, id: &str) -> Reply {
    loop {
        let r = recv(rx);
        if r.is_final() && r.id() == id {
            return r;
        }
        assert!(!r.is_final(), "unexpected final {r:?}");
    }
}

#[test]
fn higher_priority_runs_first_and_every_job_ends_once() {
    let b = bench(Gate::closed(), 8, 1);
    let (tx, mut rx) = unbounded_channel();
    let with = |p: v1::Priority| {
        move |r: &mut Request| {
            r.priority = p as i32;
            r.max_tokens = Some(4);
        }
    };
    assert!(b.submit("first", with(v1::Priority::High), &tx));
    // "first" is in the engine: the rest wait in the queue, whatever their arrival
    b.held(1);
    assert!(b.submit("low", with(v1::Priority::Low), &tx));
    assert!(b.submit("normal", with(v1::Priority::Normal), &tx));
    assert!(b.submit("high", with(v1::Priority::High), &tx));
    assert_eq!(b.s.stats().queued, 3);
    b.gate.open_all();
    let (order, finals) = collect(&mut rx, 4);
    assert_eq!(order, ["first", "high", "normal", "low"]);
    for r in finals.values() {
        assert_eq!(done(r).finish, Finish::Length);
        assert_eq!(done(r).usage.completion_tokens, 4);
    }
    // counters are updated just after the final is sent; after shutdown they are settled
    b.s.shutdown(Duration::from_secs(1));
    assert_eq!(b.s.stats().answered, 4);
    assert_eq!((b.s.stats().queued, b.s.stats().running), (0, 0));
}

#[test]
fn a_full_queue_answers_busy_at_once_with_its_depth() {
    let b = bench(Gate::closed(), 2, 1);
    let (tx, mut rx) = unbounded_channel();
    assert!(b.submit("j0", tokens(4), &tx));
    b.held(1);
    let accepted: Vec<bool> = (1..10)
        .map(|i| b.submit(&format!("j{i}"), tokens(4), &tx))
        .collect();
    assert_eq!(
        accepted,
        [true, true, false, false, false, false, false, false, false]
    );
    // the refusals are already in the channel, before anything ran
    for i in 3..10 {
        let f = failure(&final_of(&mut rx, &format!("j{i}"))).clone();
        assert_eq!((f.code, f.queue_depth), (Code::Busy, 2));
        assert!(f.retry_after_ms > 0);
    }
    b.gate.open_all();
    let (_, finals) = collect(&mut rx, 3);
    for i in 0..3 {
        assert_eq!(done(&finals[&format!("j{i}")]).finish, Finish::Length);
    }
    b.s.shutdown(Duration::from_secs(1));
}

#[test]
fn duplicate_ids_in_flight_are_refused() {
    let b = bench(Gate::closed(), 4, 1);
    let (tx, mut rx) = unbounded_channel();
    assert!(b.submit("same", tokens(64), &tx));
    b.held(1);
    let (tx2, mut rx2) = unbounded_channel();
    assert!(!b.submit("same", tokens(8), &tx2));
    assert_eq!(failure(&recv(&mut rx2)).code, Code::BadRequest);
    assert!(b.s.cancel("same"));
    let (_, finals) = collect(&mut rx, 1);
    assert_eq!(done(&finals["same"]).finish, Finish::Cancelled);
    // finished: the id may be used again
    b.gate.open_all();
    assert!(b.submit("same", tokens(2), &tx));
    assert_eq!(done(&final_of(&mut rx, "same")).finish, Finish::Length);
    b.s.shutdown(Duration::from_secs(1));
}

#[test]
fn cancel_ends_running_and_queued_answers_with_cancelled() {
    let b = bench(Gate::closed(), 4, 1);
    let (tx, mut rx) = unbounded_channel();
    assert!(b.submit("running", tokens(200), &tx));
    assert!(b.submit("queued", tokens(200), &tx));
    // the prefill and three tokens, then the engine is held mid-answer
    b.gate.allow(4);
    for seq in 0..3 {
        let r = recv(&mut rx);
        assert!(
            matches!(&r, Reply::Chunk(c) if c.id == "running" && c.seq == seq),
            "{r:?}"
        );
    }
    b.held(1);
    assert!(b.s.cancel("queued"));
    assert!(b.s.cancel("running"));
    assert!(!b.s.cancel("unknown"));
    let (_, finals) = collect_after(&mut rx, 2, &[("running", 3)]);
    assert_eq!(done(&finals["running"]).finish, Finish::Cancelled);
    assert_eq!(done(&finals["running"]).usage.completion_tokens, 3);
    assert_eq!(done(&finals["queued"]).finish, Finish::Cancelled);
    assert_eq!(done(&finals["queued"]).usage.completion_tokens, 0);
    b.s.shutdown(Duration::from_secs(1));
}

#[test]
fn a_cancelled_waiting_job_leaves_the_queue_at_once() {
    // one slot held mid-answer, the queue full behind it
    let b = bench(Gate::closed(), 2, 1);
    let (tx, mut rx) = unbounded_channel();
    assert!(b.submit("running", tokens(200), &tx));
    b.held(1);
    assert!(b.submit("w1", tokens(8), &tx));
    assert!(b.submit("w2", tokens(8), &tx));
    let (tx2, mut rx2) = unbounded_channel();
    assert!(!b.submit("w3", tokens(8), &tx2));
    assert_eq!(failure(&recv(&mut rx2)).code, Code::Busy);
    assert!(b.s.cancel("w1"));
    assert!(b.s.cancel("w2"));
    // their finals come now, while the running answer is still held at the gate
    let (_, finals) = collect(&mut rx, 2);
    for id in ["w1", "w2"] {
        assert_eq!(done(&finals[id]).finish, Finish::Cancelled);
        assert_eq!(done(&finals[id]).usage.completion_tokens, 0);
    }
    let stats = b.s.stats();
    assert_eq!((stats.queued, stats.running, stats.answered), (0, 1, 2));
    // their places and their ids are free: no `busy`, no "already in progress"
    assert!(b.submit("w1", tokens(2), &tx));
    assert!(b.submit("w3", tokens(2), &tx));
    assert!(!b.s.cancel("w2"), "a cancelled id is no longer in flight");
    b.gate.open_all();
    let (order, finals) = collect(&mut rx, 3);
    assert_eq!(order, ["running", "w1", "w3"]);
    assert!(finals.values().all(|r| done(r).finish == Finish::Length));
    b.s.shutdown(Duration::from_secs(1));
}

#[test]
fn deadlines_end_answers_with_deadline() {
    let b = bench(Gate::closed(), 4, 1);
    let (tx, mut rx) = unbounded_channel();
    // held in its prefill by the gate: only the deadline alarm can end it
    assert!(b.submit(
        "slow",
        |r| {
            r.max_tokens = Some(200);
            r.deadline_ms = 300;
        },
        &tx
    ));
    b.held(1);
    // past its deadline by the time a worker is free
    assert!(b.submit("late", |r| r.deadline_ms = 1, &tx));
    let (_, finals) = collect(&mut rx, 2);
    let slow = done(&finals["slow"]);
    assert_eq!(slow.finish, Finish::Deadline);
    assert_eq!(
        slow.usage.completion_tokens, 0,
        "stopped inside the prefill"
    );
    assert_eq!(done(&finals["late"]).finish, Finish::Deadline);
    // a deadline mid-answer: the first tokens, then held until the deadline
    b.gate.allow(3);
    assert!(b.submit(
        "mid",
        |r| {
            r.max_tokens = Some(200);
            r.deadline_ms = 300;
        },
        &tx
    ));
    let mid = final_of(&mut rx, "mid");
    assert_eq!(done(&mid).finish, Finish::Deadline);
    assert_eq!(done(&mid).usage.completion_tokens, 2);
    b.s.shutdown(Duration::from_secs(1));
}

#[test]
fn shutdown_finishes_within_grace_then_cancels_the_rest() {
    let b = bench(Gate::closed(), 8, 1);
    let (tx, mut rx) = unbounded_channel();
    assert!(b.submit("s0", tokens(3), &tx));
    assert!(b.submit("s1", tokens(200), &tx));
    assert!(b.submit("s2", tokens(200), &tx));
    b.held(1);
    let s = b.s.clone();
    let stopping = std::thread::spawn(move || s.shutdown(Duration::from_secs(2)));
    // within the grace: s0 finishes by itself; s1 starts and is held, s2 waits
    b.gate.allow(4);
    stopping.join().unwrap();
    // shutdown has returned: every final is already in the channel
    let (_, finals) = collect(&mut rx, 3);
    assert_eq!(done(&finals["s0"]).finish, Finish::Length);
    assert_eq!(done(&finals["s1"]).finish, Finish::Cancelled);
    assert_eq!(done(&finals["s2"]).finish, Finish::Cancelled);
    assert!(rx.try_recv().is_err(), "nothing after the finals");
    let (tx2, mut rx2) = unbounded_channel();
    assert!(!b.submit("after", tokens(2), &tx2));
    assert_eq!(failure(&recv(&mut rx2)).code, Code::Internal);
}

#[test]
fn non_streaming_requests_get_one_chunk_then_done() {
    let b = bench(Gate::open(), 4, 1);
    let (tx, mut rx) = unbounded_channel();
    assert!(b.submit(
        "whole",
        |r| {
            r.stream = Some(false);
            r.max_tokens = Some(12);
            r.logprobs = 2;
        },
        &tx
    ));
    let mut chunks = Vec::new();
    let d = loop {
        match recv(&mut rx) {
            Reply::Chunk(c) => chunks.push(c),
            Reply::Done(d) => break d,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(chunks.len(), 1);
    assert_eq!(d.seq, 1);
    assert_eq!(chunks[0].text.split_whitespace().count(), 12);
    assert_eq!(chunks[0].logprobs.len() as u32, d.usage.completion_tokens);
    assert!(chunks[0].logprobs.iter().all(|t| t.top.len() == 2));
    b.s.shutdown(Duration::from_secs(1));
}

#[test]
fn an_engine_panic_is_an_internal_error_and_the_worker_lives_on() {
    let b = bench(Gate::open(), 4, 1);
    let (tx, mut rx) = unbounded_channel();
    assert!(b.s.submit(
        b.job("boom", &format!("the {PANIC} word"), tokens(4)),
        tx.clone()
    ));
    let f = failure(&final_of(&mut rx, "boom")).clone();
    assert_eq!(f.code, Code::Internal);
    assert!(b.submit("after", tokens(3), &tx));
    assert_eq!(done(&final_of(&mut rx, "after")).usage.completion_tokens, 3);
    b.s.shutdown(Duration::from_secs(1));
    assert_eq!(b.s.stats().answered, 2);
}

/// Runs one turn of `msgs` (in `conv` when given, from the console): the answer's text, its
/// `Done`, and the whole prompt's length in tokens.
fn turn(
    s: &Scheduler,
    intake: &Intake,
    id: &str,
    msgs: &[(&str, &str)],
    conv: Option<&Conversation>,
    f: impl FnOnce(&mut Request),
) -> (String, Done, u32) {
    let mut r = Request {
        id: id.into(),
        messages: msgs
            .iter()
            .map(|(role, content)| v1::Message {
                role: (*role).into(),
                content: (*content).into(),
            })
            .collect(),
        ..Request::default()
    };
    f(&mut r);
    let mut origin = Origin::new(Transport::Console);
    if let Some(c) = conv {
        origin = origin.in_conversation(c.clone());
    }
    let job = intake.job(r, None, origin, Instant::now()).unwrap();
    let full = job.prompt.len() as u32;
    let (tx, mut rx) = unbounded_channel();
    assert!(s.submit(job, tx));
    let mut text = String::new();
    loop {
        match recv(&mut rx) {
            Reply::Chunk(c) => text.push_str(&c.text),
            Reply::Done(d) => return (text, d, full),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn a_conversation_feeds_only_its_new_tokens() {
    let b = bench(Gate::open(), 4, 1);
    let conv = Conversation::new();
    let five = |r: &mut Request| r.max_tokens = Some(5);
    let turn = |id, msgs: &[(&str, &str)], conv| {
        let (text, done, full) = turn(&b.s, &b.intake, id, msgs, conv, five);
        (text, done.usage.prompt_tokens, full)
    };
    let q1 = ("user", "what does a relief valve do");
    let (a1, fed1, full1) = turn("t1", &[q1], Some(&conv));
    assert_eq!(fed1, full1);
    let q2 = [
        q1,
        ("assistant", a1.as_str()),
        ("user", "how often is it tested"),
    ];
    let (_, fed2, full2) = turn("t2", &q2, Some(&conv));
    assert!(
        fed2 < full2 / 2,
        "turn 2 reused the cache: fed {fed2} of {full2}"
    );
    // without the conversation, and after a reset, everything is fed
    assert_eq!(turn("t2-fresh", &q2, None).1, full2);
    conv.reset();
    assert_eq!(turn("t3", &q2, Some(&conv)).1, full2);
    b.s.shutdown(Duration::from_secs(1));
}

#[test]
fn thermal_limits_cap_refuse_and_stop_then_lift() {
    let policy = Policy {
        warm_decode_tok_s: 40.0,
        warm_max_running: 1,
    };
    let b = bench(Gate::open(), 8, 2);
    let s = &b.s;
    let set = |state| s.set_thermal(state, policy.limits(state), Duration::from_secs(7));
    let (tx, mut rx) = unbounded_channel();

    // nominal: nothing holds the scripted engine back
    assert!(b.submit("free", tokens(40), &tx));
    let free_rate = done(&final_of(&mut rx, "free")).timings.decode_tok_s;
    assert!(free_rate > 80.0, "uncapped decode {free_rate} tok/s");

    // warm: each answer under the cap, one at a time although there are two slots
    set(ThermalState::Warm);
    assert_eq!(s.stats().thermal, ThermalState::Warm);
    assert!(b.submit("warm-1", tokens(30), &tx));
    assert!(b.submit("warm-2", tokens(30), &tx));
    let (_, finals) = collect(&mut rx, 2);
    for id in ["warm-1", "warm-2"] {
        let d = done(&finals[id]);
        // the pacer sleeps 1/40 s between tokens: the rate cannot exceed the cap
        assert!(
            d.timings.decode_tok_s <= 40.0,
            "{id}: {} tok/s",
            d.timings.decode_tok_s
        );
        assert_eq!(d.usage.completion_tokens, 30, "capped, not cut");
    }
    // warm-2 waited for warm-1's 29 paced gaps of 25 ms
    let waited = done(&finals["warm-2"]).timings.queue_ms;
    assert!(
        waited > 500.0,
        "warm-2 waited {waited} ms for warm-1's slot"
    );

    // hot: the running answer finishes; the waiting one and new ones are refused
    b.gate.close();
    assert!(b.submit("running", tokens(6), &tx));
    assert!(b.submit("waiting", tokens(6), &tx));
    b.held(1);
    set(ThermalState::Hot);
    let f = failure(&final_of(&mut rx, "waiting")).clone();
    assert_eq!((f.code, f.retry_after_ms), (Code::Overheated, 7000));
    let (tx2, mut rx2) = unbounded_channel();
    assert!(!b.submit("new", tokens(6), &tx2));
    let f = failure(&recv(&mut rx2)).clone();
    assert_eq!(f.code, Code::Overheated);
    assert!(f.message.contains("hot"), "{f:?}");
    b.gate.open_all();
    assert_eq!(done(&final_of(&mut rx, "running")).finish, Finish::Length);

    // critical: the running answer ends now, with `thermal`
    set(ThermalState::Warm);
    b.gate.close();
    b.gate.allow(2);
    assert!(b.submit("cut", tokens(200), &tx));
    assert!(matches!(recv(&mut rx), Reply::Chunk(c) if c.id == "cut"));
    b.held(1);
    set(ThermalState::Critical);
    let cut = final_of(&mut rx, "cut");
    assert_eq!(done(&cut).finish, Finish::Thermal);
    assert_eq!(done(&cut).usage.completion_tokens, 1);

    // cool again: full speed
    set(ThermalState::Nominal);
    b.gate.open_all();
    assert!(b.submit("again", tokens(40), &tx));
    assert!(done(&final_of(&mut rx, "again")).timings.decode_tok_s > 80.0);
    s.shutdown(Duration::from_secs(1));
    assert_eq!(s.stats().answered, 7, "every accepted job ended once");
}

#[test]
fn the_heartbeat_sees_a_worker_stuck_without_tokens() {
    let b = bench(Gate::closed(), 4, 1);
    assert_eq!(b.s.stalled(Duration::ZERO), None, "idle workers are alive");
    let (tx, mut rx) = unbounded_channel();
    // an engine held in its prefill stands in for a hung one: no token comes
    assert!(b.submit("stuck", tokens(4), &tx));
    b.held(1);
    std::thread::sleep(Duration::from_millis(50));
    let stuck = b.s.stalled(Duration::from_millis(20));
    assert!(
        stuck.is_some_and(|d| d >= Duration::from_millis(20)),
        "{stuck:?}"
    );
    assert_eq!(
        b.s.stalled(Duration::from_secs(600)),
        None,
        "within a generous limit"
    );
    // tokens are signs of life
    b.gate.allow(2);
    assert!(matches!(recv(&mut rx), Reply::Chunk(_)));
    b.held(1);
    assert_eq!(b.s.stalled(Duration::from_secs(5)), None);
    assert!(b.s.cancel("stuck"));
    collect_after(&mut rx, 1, &[("stuck", 1)]);
    assert_eq!(b.s.stalled(Duration::ZERO), None, "alive again once done");
    b.s.shutdown(Duration::from_secs(1));
}

/// SmolLM2's f16 artifact (`models/setup.sh`), two threads.
fn smollm2() -> Arc<Model> {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/build/smollm2-135m-instruct.f16");
    assert!(
        dir.join("manifest.toml").exists(),
        "{} is missing: run tests/run.sh (it runs models/setup.sh first)",
        dir.display()
    );
    Model::load(
        &dir,
        &LoadOptions {
            verify: false,
            threads: 2,
            context: None,
            activations: Default::default(),
            kv_cache: Default::default(),
        },
    )
    .unwrap()
}

/// What only the real model shows: reusing a conversation's KV cache (rolled back past the
/// stop string the last answer may have been cut at) answers exactly as a fresh session does.
#[test]
fn smollm2_a_kept_conversation_answers_as_a_fresh_one() {
    let engine: Arc<dyn Engine> = Arc::new(ModelEngine::new(smollm2(), true).unwrap());
    let s = Scheduler::start(engine.clone(), SchedulerConfig::new(4, 1)).unwrap();
    let intake = Intake::new(Limits::default(), engine);
    let conv = Conversation::new();
    let greedy = |r: &mut Request| {
        r.max_tokens = Some(24);
        r.temperature = Some(0.0);
    };
    let turn = |id, msgs: &[(&str, &str)], conv| turn(&s, &intake, id, msgs, conv, greedy);
    let q1 = ("user", "What does a pressure relief valve do?");
    let (a1, d1, _) = turn("t1", &[q1], Some(&conv));
    let q2 = [
        q1,
        ("assistant", a1.as_str()),
        ("user", "And how often should it be tested?"),
    ];
    let (a2, d2, full) = turn("t2", &q2, Some(&conv));
    let fed = d2.usage.prompt_tokens;
    eprintln!(
        "turn 1 fed {}; turn 2 fed {fed} of its {full}; prompt ms {:.1} then {:.1}",
        d1.usage.prompt_tokens, d1.timings.prompt_ms, d2.timings.prompt_ms
    );
    assert!(
        fed < full / 2,
        "turn 2 reused the cache: fed {fed} of {full}"
    );
    let (b2, e2, _) = turn("t2-fresh", &q2, None);
    assert_eq!(e2.usage.prompt_tokens, full);
    assert_eq!(a2, b2, "reusing the cache changes nothing in the answer");
    s.shutdown(Duration::from_secs(1));
}
