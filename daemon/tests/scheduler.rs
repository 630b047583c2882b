//! The scheduler with real models: priorities, admission, cancel, deadlines, shutdown, and
//! exactly one final message for every accepted job.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::model_dir;
use fieldllm_engine::{LoadOptions, Model};
use fieldllmd::proto::v1::{self, response::Kind};
use fieldllmd::proto::{ErrorCode, Request, Response};
use fieldllmd::request::{Limits, validate};
use fieldllmd::scheduler::{Scheduler, SchedulerConfig};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

fn spec(id: &str, prompt: &str, f: impl FnOnce(&mut Request)) -> fieldllmd::request::JobSpec {
    let mut r = Request {
        id: id.into(),
        prompt: prompt.into(),
        ..Request::default()
    };
    f(&mut r);
    validate(r, &Limits::default(), Instant::now()).unwrap()
}

/// Reads responses until `n` finals arrived; checks per id: chunks in seq order, one final.
fn collect(
    rx: &mut UnboundedReceiver<Response>,
    n: usize,
) -> (Vec<String>, HashMap<String, Response>) {
    let mut order = Vec::new();
    let mut finals = HashMap::new();
    let mut next_seq: HashMap<String, u32> = HashMap::new();
    while finals.len() < n {
        let r = rx
            .blocking_recv()
            .expect("channel open until every final arrived");
        let id = r.id().to_string();
        assert!(
            !finals.contains_key(&id),
            "a message after the final for {id}: {r:?}"
        );
        match &r.kind {
            Some(Kind::Chunk(c)) => {
                let want = next_seq.entry(id.clone()).or_default();
                assert_eq!(c.seq, *want, "chunks of {id} out of order");
                *want += 1;
            }
            Some(Kind::Done(d)) => {
                assert_eq!(
                    d.seq,
                    next_seq.get(&id).copied().unwrap_or(0),
                    "Done.seq of {id}"
                );
                order.push(id.clone());
                finals.insert(id, r);
            }
            Some(Kind::Error(_)) => {
                order.push(id.clone());
                finals.insert(id, r);
            }
            None => panic!("empty response"),
        }
    }
    (order, finals)
}

fn finish(r: &Response) -> v1::FinishReason {
    match &r.kind {
        Some(Kind::Done(d)) => v1::FinishReason::try_from(d.finish_reason).unwrap(),
        other => panic!("expected Done, got {other:?}"),
    }
}

fn error_code(r: &Response) -> ErrorCode {
    match &r.kind {
        Some(Kind::Error(e)) => ErrorCode::try_from(e.code).unwrap(),
        other => panic!("expected Error, got {other:?}"),
    }
}

fn tiny() -> std::sync::Arc<Model> {
    Model::load(
        &model_dir("tiny-llama"),
        &LoadOptions {
            verify: true,
            threads: 1,
        },
    )
    .unwrap()
}

fn smollm2() -> std::sync::Arc<Model> {
    Model::load(
        &model_dir("smollm2-135m-instruct.f16"),
        &LoadOptions {
            verify: false,
            threads: 2,
        },
    )
    .unwrap()
}

#[test]
fn higher_priority_runs_first_and_every_job_ends_once() {
    // SmolLM2, not the tiny model: a job must outlast the four submits for the order to show
    let s = Scheduler::start(smollm2(), SchedulerConfig { queue: 8, slots: 1 }).unwrap();
    let (tx, mut rx) = unbounded_channel();
    let short = |r: &mut Request| r.max_tokens = Some(4);
    let high = |r: &mut Request| {
        r.priority = v1::Priority::High as i32;
        r.max_tokens = Some(4);
    };
    assert!(s.submit(spec("first", "pump", high), tx.clone()));
    assert!(s.submit(
        spec("low", "pump", |r| {
            r.priority = v1::Priority::Low as i32;
            r.max_tokens = Some(4);
        }),
        tx.clone()
    ));
    assert!(s.submit(spec("normal", "pump", short), tx.clone()));
    assert!(s.submit(spec("high", "pump", high), tx.clone()));
    let (order, finals) = collect(&mut rx, 4);
    assert_eq!(order, ["first", "high", "normal", "low"]);
    for r in finals.values() {
        assert!(matches!(
            finish(r),
            v1::FinishReason::Stop | v1::FinishReason::Length
        ));
    }
    // counters are updated just after the final is sent; after shutdown they are settled
    s.shutdown(Duration::from_secs(1));
    assert_eq!(s.stats().answered, 4);
    assert_eq!((s.stats().queued, s.stats().running), (0, 0));
}

#[test]
fn a_full_queue_answers_busy_at_once_with_its_depth() {
    let s = Scheduler::start(smollm2(), SchedulerConfig { queue: 2, slots: 1 }).unwrap();
    let (tx, mut rx) = unbounded_channel();
    let accepted: Vec<bool> = (0..10)
        .map(|i| {
            s.submit(
                spec(&format!("j{i}"), "valve", |r| r.max_tokens = Some(4)),
                tx.clone(),
            )
        })
        .collect();
    let n_ok = accepted.iter().filter(|&&a| a).count();
    assert!(
        (2..=3).contains(&n_ok),
        "queue 2 (+1 running) accepted {n_ok}"
    );
    let (_, finals) = collect(&mut rx, 10);
    for (i, ok) in accepted.iter().enumerate() {
        let r = &finals[&format!("j{i}")];
        if *ok {
            finish(r);
        } else {
            assert_eq!(error_code(r), ErrorCode::Busy);
            let Some(Kind::Error(e)) = &r.kind else {
                unreachable!()
            };
            assert_eq!(e.queue_depth, 2);
            assert!(e.retry_after_ms > 0);
        }
    }
    s.shutdown(Duration::from_secs(1));
}

#[test]
fn duplicate_ids_in_flight_are_refused() {
    let s = Scheduler::start(smollm2(), SchedulerConfig { queue: 4, slots: 1 }).unwrap();
    let (tx, mut rx) = unbounded_channel();
    let long = |r: &mut Request| r.max_tokens = Some(64);
    assert!(s.submit(spec("same", "Tell me about pumps.", long), tx.clone()));
    let (tx2, mut rx2) = unbounded_channel();
    assert!(!s.submit(spec("same", "again", |_| {}), tx2));
    assert_eq!(
        error_code(&rx2.blocking_recv().unwrap()),
        ErrorCode::BadRequest
    );
    assert!(s.cancel("same"));
    let (_, finals) = collect(&mut rx, 1);
    assert_eq!(finish(&finals["same"]), v1::FinishReason::Cancelled);
    s.shutdown(Duration::from_secs(1));
}

#[test]
fn cancel_ends_running_and_queued_answers_with_cancelled() {
    let s = Scheduler::start(smollm2(), SchedulerConfig { queue: 4, slots: 1 }).unwrap();
    let (tx, mut rx) = unbounded_channel();
    let long = |r: &mut Request| r.max_tokens = Some(200);
    assert!(s.submit(
        spec(
            "running",
            "Write a long story about a hydraulic pump.",
            long
        ),
        tx.clone()
    ));
    assert!(s.submit(spec("queued", "Another question.", long), tx.clone()));
    // wait for the first chunk of the running answer, then cancel both
    let first = rx.blocking_recv().unwrap();
    assert!(matches!(first.kind, Some(Kind::Chunk(_))), "{first:?}");
    assert!(s.cancel("queued"));
    assert!(s.cancel("running"));
    assert!(!s.cancel("unknown"));
    let mut finals = HashMap::new();
    while finals.len() < 2 {
        let r = rx.blocking_recv().unwrap();
        if r.is_final() {
            assert!(finals.insert(r.id().to_string(), r).is_none());
        }
    }
    assert_eq!(finish(&finals["running"]), v1::FinishReason::Cancelled);
    assert_eq!(finish(&finals["queued"]), v1::FinishReason::Cancelled);
    let Some(Kind::Done(d)) = &finals["running"].kind else {
        unreachable!()
    };
    assert!(d.usage.unwrap().completion_tokens < 200);
    s.shutdown(Duration::from_secs(1));
}

#[test]
fn deadlines_end_answers_with_deadline() {
    let s = Scheduler::start(smollm2(), SchedulerConfig { queue: 4, slots: 1 }).unwrap();
    let (tx, mut rx) = unbounded_channel();
    assert!(s.submit(
        spec("slow", "Write a long story about valves.", |r| {
            r.max_tokens = Some(200);
            r.deadline_ms = 400;
        }),
        tx.clone()
    ));
    assert!(s.submit(spec("late", "Hi", |r| r.deadline_ms = 1), tx.clone()));
    let (_, finals) = collect(&mut rx, 2);
    assert_eq!(finish(&finals["slow"]), v1::FinishReason::Deadline);
    assert_eq!(finish(&finals["late"]), v1::FinishReason::Deadline);
    s.shutdown(Duration::from_secs(1));
}

#[test]
fn a_deadline_ends_a_long_prefill_before_any_token() {
    let s = Scheduler::start(smollm2(), SchedulerConfig { queue: 4, slots: 1 }).unwrap();
    let (tx, mut rx) = unbounded_channel();
    // about 1,400 tokens: seconds of prefill on one thread, far past the deadline
    let prompt = "Check the pressure valve and log the reading. ".repeat(150);
    assert!(s.submit(
        spec("long", &prompt, |r| {
            r.max_tokens = Some(50);
            r.deadline_ms = 200;
        }),
        tx
    ));
    let (_, finals) = collect(&mut rx, 1);
    assert_eq!(finish(&finals["long"]), v1::FinishReason::Deadline);
    let Some(Kind::Done(d)) = &finals["long"].kind else {
        unreachable!()
    };
    assert_eq!(
        d.usage.unwrap().completion_tokens,
        0,
        "stopped inside the prefill, not at the first token"
    );
    s.shutdown(Duration::from_secs(1));
}

#[test]
fn shutdown_finishes_within_grace_then_cancels_the_rest() {
    let s = Scheduler::start(smollm2(), SchedulerConfig { queue: 8, slots: 1 }).unwrap();
    let (tx, mut rx) = unbounded_channel();
    for i in 0..4 {
        assert!(s.submit(
            spec(
                &format!("s{i}"),
                "Write a long story about a compressor.",
                |r| r.max_tokens = Some(200)
            ),
            tx.clone()
        ));
    }
    let started = Instant::now();
    s.shutdown(Duration::from_millis(300));
    assert!(started.elapsed() < Duration::from_secs(10));
    // shutdown has returned: every final is already in the channel
    let (_, finals) = collect(&mut rx, 4);
    assert!(
        finals
            .values()
            .all(|r| finish(r) == v1::FinishReason::Cancelled
                || finish(r) == v1::FinishReason::Stop
                || finish(r) == v1::FinishReason::Length)
    );
    assert!(
        finals
            .values()
            .any(|r| finish(r) == v1::FinishReason::Cancelled)
    );
    let (tx2, mut rx2) = unbounded_channel();
    assert!(!s.submit(spec("after", "hi", |_| {}), tx2));
    assert_eq!(
        error_code(&rx2.blocking_recv().unwrap()),
        ErrorCode::Internal
    );
}

#[test]
fn non_streaming_requests_get_one_chunk_then_done() {
    let s = Scheduler::start(tiny(), SchedulerConfig::default()).unwrap();
    let (tx, mut rx) = unbounded_channel();
    assert!(s.submit(
        spec("whole", "pump", |r| {
            r.stream = Some(false);
            r.max_tokens = Some(12);
            r.logprobs = 2;
        }),
        tx
    ));
    let mut chunks = Vec::new();
    loop {
        let r = rx.blocking_recv().unwrap();
        match r.kind {
            Some(Kind::Chunk(c)) => chunks.push(c),
            Some(Kind::Done(d)) => {
                assert_eq!(chunks.len() as u32, d.seq);
                let with_logprobs: usize = chunks.iter().map(|c| c.logprobs.len()).sum();
                assert_eq!(with_logprobs as u32, d.usage.unwrap().completion_tokens);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(chunks.len() <= 1);
    s.shutdown(Duration::from_secs(1));
}

/// Runs one turn; returns the answer's text and its Done.
fn turn(
    s: &Scheduler,
    id: &str,
    messages: &[(&str, &str)],
    conversation: Option<&fieldllmd::scheduler::Conversation>,
) -> (String, v1::Done) {
    let mut spec = spec(id, "", |r| {
        r.prompt.clear();
        r.messages = messages
            .iter()
            .map(|(role, content)| v1::Message {
                role: (*role).into(),
                content: (*content).into(),
            })
            .collect();
        r.max_tokens = Some(24);
        r.temperature = Some(0.0);
    });
    spec.conversation = conversation.cloned();
    let (tx, mut rx) = unbounded_channel();
    assert!(s.submit(spec, tx));
    let mut text = String::new();
    loop {
        let r = rx.blocking_recv().unwrap();
        match r.kind {
            Some(Kind::Chunk(c)) => text.push_str(&c.text),
            Some(Kind::Done(d)) => return (text, d),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn a_conversation_feeds_only_its_new_tokens_and_answers_the_same() {
    let model = smollm2();
    let s = Scheduler::start(model.clone(), SchedulerConfig { queue: 4, slots: 1 }).unwrap();
    let conv = fieldllmd::scheduler::Conversation::new();
    let q1 = [("user", "What does a pressure relief valve do?")];
    let (a1, d1) = turn(&s, "t1", &q1, Some(&conv));
    let q2 = [
        ("user", "What does a pressure relief valve do?"),
        ("assistant", a1.as_str()),
        ("user", "And how often should it be tested?"),
    ];
    let full = model
        .chat_prompt(
            &q2.iter()
                .map(|(r, c)| fieldllm_engine::chat::Message {
                    role: (*r).into(),
                    content: (*c).into(),
                })
                .collect::<Vec<_>>(),
        )
        .unwrap()
        .len() as u32;
    let (a2, d2) = turn(&s, "t2", &q2, Some(&conv));
    let fed = d2.usage.unwrap().prompt_tokens;
    eprintln!(
        "turn 1 fed {} tokens; turn 2 fed {fed} of its {full}; prompt ms {:.1} then {:.1}",
        d1.usage.unwrap().prompt_tokens,
        d1.timings.unwrap().prompt_ms,
        d2.timings.unwrap().prompt_ms
    );
    assert!(
        fed < full / 2,
        "turn 2 reused the cache: fed {fed} of {full}"
    );
    // the same question without the kept cache gives the same greedy answer
    let (b2, e2) = turn(&s, "t2-fresh", &q2, None);
    eprintln!(
        "turn 2 without the kept cache: fed {} tokens, prompt ms {:.1}",
        e2.usage.unwrap().prompt_tokens,
        e2.timings.unwrap().prompt_ms
    );
    assert_eq!(e2.usage.unwrap().prompt_tokens, full);
    assert_eq!(a2, b2, "reusing the cache changes nothing in the answer");
    // a reset conversation starts afresh
    conv.reset();
    let (_, d3) = turn(&s, "t3", &q2, Some(&conv));
    assert_eq!(d3.usage.unwrap().prompt_tokens, full);
    s.shutdown(Duration::from_secs(1));
}

fn done_of(r: &Response) -> &v1::Done {
    match &r.kind {
        Some(Kind::Done(d)) => d,
        other => panic!("expected Done, got {other:?}"),
    }
}

fn error_of(r: &Response) -> &v1::Error {
    match &r.kind {
        Some(Kind::Error(e)) => e,
        other => panic!("expected Error, got {other:?}"),
    }
}

/// Waits for the final of `id`, checking nothing else ends twice on the way.
fn final_of(rx: &mut UnboundedReceiver<Response>, id: &str) -> Response {
    loop {
        let r = rx.blocking_recv().unwrap();
        if r.is_final() && r.id() == id {
            return r;
        }
        assert!(!r.is_final(), "unexpected final {r:?}");
    }
}

#[test]
fn thermal_limits_cap_refuse_and_stop_then_lift() {
    use firmware_bridge::{Policy, ThermalState};
    let policy = Policy {
        warm_decode_tok_s: 40.0,
        warm_max_running: 1,
    };
    let s = Scheduler::start(tiny(), SchedulerConfig { queue: 8, slots: 2 }).unwrap();
    let set = |state| s.set_thermal(state, policy.limits(state), Duration::from_secs(7));
    let (tx, mut rx) = unbounded_channel();
    let tokens = |n: u32| move |r: &mut Request| r.max_tokens = Some(n);

    // nominal: the tiny model runs far above the cap, so the cap below is what slows it
    assert!(s.submit(spec("free", "pump", tokens(40)), tx.clone()));
    let free = final_of(&mut rx, "free");
    let free_rate = done_of(&free).timings.unwrap().decode_tok_s;
    assert!(free_rate > 80.0, "uncapped decode {free_rate} tok/s");

    // warm: each answer under the cap, one at a time although there are two slots
    set(ThermalState::Warm);
    assert_eq!(s.stats().thermal, ThermalState::Warm);
    assert!(s.submit(spec("warm-1", "pump", tokens(30)), tx.clone()));
    assert!(s.submit(spec("warm-2", "pump", tokens(30)), tx.clone()));
    let (_, finals) = collect(&mut rx, 2);
    for id in ["warm-1", "warm-2"] {
        let d = done_of(&finals[id]);
        let rate = d.timings.unwrap().decode_tok_s;
        assert!(
            rate <= 40.0 && rate > 20.0,
            "{id}: {rate} tok/s under a 40 cap"
        );
        assert_eq!(d.usage.unwrap().completion_tokens, 30, "capped, not cut");
    }
    let waited = done_of(&finals["warm-2"]).timings.unwrap().queue_ms;
    assert!(
        waited > 500.0,
        "warm-2 waited {waited} ms for warm-1's slot"
    );

    // hot: the running answer finishes; the waiting one and new ones are refused
    assert!(s.submit(spec("running", "pump", tokens(60)), tx.clone()));
    assert!(s.submit(spec("waiting", "pump", tokens(10)), tx.clone()));
    let first = rx.blocking_recv().unwrap();
    assert_eq!(first.id(), "running");
    set(ThermalState::Hot);
    let waiting = final_of(&mut rx, "waiting");
    let e = error_of(&waiting);
    assert_eq!(
        (e.code, e.retry_after_ms),
        (ErrorCode::Overheated as i32, 7000)
    );
    let (tx2, mut rx2) = unbounded_channel();
    assert!(!s.submit(spec("new", "pump", tokens(10)), tx2));
    let e = rx2.blocking_recv().unwrap();
    assert_eq!(error_code(&e), ErrorCode::Overheated);
    assert!(error_of(&e).message.contains("hot"), "{e:?}");
    let running = final_of(&mut rx, "running");
    assert_eq!(finish(&running), v1::FinishReason::Length);

    // critical: the running answer ends now, with `thermal`
    set(ThermalState::Warm);
    assert!(s.submit(spec("cut", "pump", tokens(200)), tx.clone()));
    assert_eq!(rx.blocking_recv().unwrap().id(), "cut");
    set(ThermalState::Critical);
    let cut = final_of(&mut rx, "cut");
    assert_eq!(finish(&cut), v1::FinishReason::Thermal);
    assert!(done_of(&cut).usage.unwrap().completion_tokens < 200);

    // cool again: full speed
    set(ThermalState::Nominal);
    assert!(s.submit(spec("again", "pump", tokens(40)), tx.clone()));
    let again = final_of(&mut rx, "again");
    assert!(done_of(&again).timings.unwrap().decode_tok_s > 80.0);
    s.shutdown(Duration::from_secs(1));
    assert_eq!(s.stats().answered, 7, "every accepted job ended once");
}

#[test]
fn the_heartbeat_sees_a_worker_stuck_without_tokens() {
    let s = Scheduler::start(smollm2(), SchedulerConfig { queue: 4, slots: 1 }).unwrap();
    assert_eq!(s.stalled(Duration::ZERO), None, "idle workers are alive");
    let (tx, mut rx) = unbounded_channel();
    // a long prefill stands in for a hung engine: no token for seconds
    let prompt = "Check the pressure valve and log the reading. ".repeat(150);
    assert!(s.submit(spec("long", &prompt, |r| r.max_tokens = Some(4)), tx));
    std::thread::sleep(Duration::from_millis(600));
    let stuck = s.stalled(Duration::from_millis(300));
    assert!(
        stuck.is_some_and(|d| d >= Duration::from_millis(300)),
        "{stuck:?}"
    );
    assert_eq!(
        s.stalled(Duration::from_secs(600)),
        None,
        "within a generous limit"
    );
    assert!(s.cancel("long"));
    collect(&mut rx, 1);
    assert_eq!(s.stalled(Duration::ZERO), None, "alive again once done");
    s.shutdown(Duration::from_secs(1));
}
