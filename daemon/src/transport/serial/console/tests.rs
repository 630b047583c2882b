//! The console's decisions, without a port: what it writes and what it asks of the scheduler.

#![allow(clippy::unwrap_used)]
use std::sync::Arc;

use super::*;
use crate::request::{Intake, Limits};
use crate::scheduler::scripted::{Gate, ScriptedEngine};
use crate::scheduler::{Done, Failure, Timings, Usage};
use crate::thermal::ThermalView;
use crate::transport::serial::ModelInfo;

fn console(max_prompt_bytes: usize) -> Console {
    let limits = Limits {
        max_prompt_bytes,
        ..Limits::default()
    };
    let info = PortInfo {
        intake: Intake::new(limits, Arc::new(ScriptedEngine::new(Gate::open()))),
        node: "n1".into(),
        model: ModelInfo {
            name: "scripted".into(),
            weights: "none".into(),
            context: 2048,
            parameters: 0,
        },
        thermal: ThermalView::none(),
        started: Instant::now(),
    };
    Console::new(info, "/dev/ttyUSB1", Priority::High)
}

fn text(step: &Step) -> String {
    String::from_utf8_lossy(&step.out).into_owned()
}

/// Types `line` + Enter; returns the step and the job it submitted.
fn ask(c: &mut Console, line: &str) -> (Step, Job) {
    let mut step = c.input(format!("{line}\r").as_bytes(), Stats::default());
    let job = match step.actions.pop() {
        Some(Action::Submit(job)) => job,
        other => panic!("no job: {other:?}, wrote {:?}", text(&step)),
    };
    (step, job)
}

fn done(id: &str) -> Reply {
    Reply::Done(Done {
        citations: None,
        id: id.into(),
        seq: 1,
        finish: Finish::Stop,
        usage: Usage::default(),
        timings: Timings::default(),
    })
}

fn chunk(id: &str, t: &str) -> Reply {
    Reply::Chunk(crate::scheduler::Chunk {
        id: id.into(),
        seq: 0,
        text: t.into(),
        logprobs: Vec::new(),
    })
}

#[test]
fn a_question_is_a_whole_job_from_this_console() {
    let mut c = console(8192);
    let (step, job) = ask(&mut c, "why does the pump whine");
    assert!(text(&step).ends_with("why does the pump whine\r\n"), "echo");
    assert!(job.id.starts_with("console-ttyUSB1-"), "{}", job.id);
    assert_eq!(
        (job.priority, job.transport),
        (Priority::High, Transport::Console)
    );
    assert!(job.conversation.is_some() && job.stream);
    assert!(c.busy());
    // typing during the answer is dropped; Ctrl-C cancels it
    let typed = c.input(b"abc", Stats::default());
    assert!(typed.out.is_empty() && typed.actions.is_empty());
    let stop = c.input(&[0x03], Stats::default());
    assert!(matches!(&stop.actions[..], [Action::Cancel(id)] if id == &job.id));
    // the answer streams, then the prompt comes back
    assert_eq!(
        text(&c.response(chunk(&job.id, "Bearing\nwear"))),
        "Bearing\r\nwear"
    );
    assert!(text(&c.response(done(&job.id))).ends_with("fieldllm> "));
    assert!(!c.busy());
    // the follow-up carries the conversation: question and answer before it
    let (_, next) = ask(&mut c, "and then");
    assert!(
        next.prompt.len() > job.prompt.len() + 3,
        "the history is in the prompt"
    );
}

#[test]
fn a_conversation_too_long_for_the_limits_starts_afresh() {
    // room for the first exchange, not for a second on top of it
    let mut c = console(60);
    let (_, first) = ask(&mut c, "what is the relief valve setting");
    c.response(chunk(&first.id, "about 210 bar"));
    c.response(done(&first.id));
    let (step, fresh) = ask(&mut c, "and the pump's rated flow");
    assert!(
        text(&step).contains("starting a new one"),
        "{:?}",
        text(&step)
    );
    // one user message of five words and the assistant header: nothing of the first
    // exchange
    assert_eq!(fresh.prompt.len(), 1 + 5 + 1 + 1);
    // and the one after that is asked in the new conversation
    c.response(done(&fresh.id));
    let (step, _) = ask(&mut c, "thanks");
    assert!(!text(&step).contains("starting a new one"));
}

#[test]
fn a_question_too_large_alone_keeps_the_conversation() {
    let mut c = console(60);
    let (_, first) = ask(&mut c, "relief valve setting");
    c.response(done(&first.id));
    let step = c.input(
        b"this question alone is longer than the sixty bytes allowed here\r",
        Stats::default(),
    );
    let out = text(&step);
    assert!(step.actions.is_empty());
    assert!(
        out.contains("Not asked:") && !out.contains("starting a new one"),
        "{out:?}"
    );
    // the conversation is still there for the next question
    let (_, next) = ask(&mut c, "and the flow");
    assert!(
        next.prompt.len() > 1 + 3 + 1 + 1,
        "the history is in the prompt"
    );
}

#[test]
fn a_question_too_large_alone_is_not_asked() {
    let mut c = console(16);
    let step = c.input(
        b"this question is longer than sixteen bytes\r",
        Stats::default(),
    );
    assert!(step.actions.is_empty());
    assert!(
        text(&step).contains("Not asked: prompt is 42 bytes, at most 16"),
        "{:?}",
        text(&step)
    );
    assert!(!c.busy());
}

#[test]
fn failures_are_shown_with_their_code() {
    let mut c = console(8192);
    let (_, job) = ask(&mut c, "pump noise");
    let out = text(&c.response(Reply::Failed(Failure {
        queue_depth: 16,
        retry_after_ms: 1000,
        ..Failure::new(&job.id, Code::Busy, "queue full (16 waiting)")
    })));
    assert!(
        out.contains("[error busy: queue full (16 waiting)]"),
        "{out:?}"
    );
    assert!(out.ends_with("fieldllm> ") && !c.busy());
}

#[test]
fn settings_are_checked_by_the_request_rules() {
    let mut c = console(8192);
    let out = text(&c.input(b"/set temperature -1\r", Stats::default()));
    assert!(out.contains("Not set:"), "{out:?}");
    let out = text(&c.input(b"/set temperature 0.4\r", Stats::default()));
    assert!(out.contains("temperature = 0.4"), "{out:?}");
    let (_, job) = ask(&mut c, "pump noise");
    assert_eq!(job.params.sampling.temperature, 0.4);
}

#[test]
fn a_reopened_port_never_reuses_a_question_id() {
    // a cable pulled mid-answer: the old console's answer may still be in flight when the
    // port reopens with a new console
    let mut before = console(8192);
    let (_, first) = ask(&mut before, "why does the pump whine");
    let mut after = console(8192);
    let (_, again) = ask(&mut after, "why does the pump whine");
    before.response(done(&first.id));
    let (_, next) = ask(&mut before, "and the valve");
    assert!(first.id.starts_with("console-ttyUSB1-"), "{}", first.id);
    assert_ne!(first.id, again.id);
    assert_ne!(again.id, next.id);
    assert_ne!(first.id, next.id);
}

/// A console whose daemon has a document index (an index directory that exists; the search
/// itself is the loop's, so its result is handed in).
fn console_with_docs(index: &std::path::Path) -> Console {
    use crate::docs::library::{Library, LibraryConfig};
    std::fs::write(index.join("meta.json"), "{}").unwrap();
    let library = Arc::new(
        Library::new(LibraryConfig {
            index: index.to_path_buf(),
            embedder: "/nonexistent".into(),
            settings: crate::docs::ground::Settings::default(),
            threads: 1,
        })
        .unwrap(),
    );
    let mut c = console(8192);
    c.info.intake = c.info.intake.clone().with_library(library);
    c.docs = c.info.intake.library().is_some_and(|l| l.exists());
    c
}

fn covered() -> Grounding {
    Grounding::Covered {
        sources: vec![crate::docs::ground::Source {
            n: 1,
            doc: "hpu.md".into(),
            section: "HPU › 4 Valves › 4.1 Main relief valve".into(),
            page: None,
            score: 0.03,
            similarity: 0.6,
            text: "Set the main relief valve to 230 bar. Lock nut 25 Nm.".into(),
        }],
        key_sentence: "Set the main relief valve to 230 bar.".into(),
    }
}

#[test]
fn with_documents_a_question_is_searched_asked_and_cited() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = console_with_docs(dir.path());
    assert!(String::from_utf8_lossy(&c.banner()).contains("installed documents"));
    let mut step = c.input(b"relief valve setting?\r", Stats::default());
    let Some(Action::Ground(req)) = step.actions.pop() else {
        panic!("no search: {}", text(&step))
    };
    assert_eq!(
        (req.docs, req.prompt.as_str()),
        (Some(true), "relief valve setting?")
    );
    assert!(c.busy(), "typing waits for the search too");
    let mut step = c.grounded(Ok(covered()));
    let Some(Action::Submit(job)) = step.actions.pop() else {
        panic!("no job: {}", text(&step))
    };
    assert!(job.citations.is_some());
    let id = job.id.clone();
    c.response(chunk(&id, "It is 230 bar."));
    let step = c.response(Reply::Done(Done {
        citations: job.citations.clone(),
        id: id.clone(),
        seq: 1,
        finish: Finish::Stop,
        usage: Usage::default(),
        timings: Timings::default(),
    }));
    let out = text(&step);
    assert!(
        out.contains("From [1]: \"Set the main relief valve to 230 bar.\"\r\nSources:\r\n[1] hpu.md §4.1 Main relief valve\r\n"),
        "{out}"
    );
    let step = c.input(b"/sources\r", Stats::default());
    assert!(text(&step).contains("[1] hpu.md §4.1 Main relief valve\r\nSet the main relief valve to 230 bar. Lock nut 25 Nm."), "{}", text(&step));

    // not covered: said as the answer, not as an error, and the prompt comes back
    let mut step = c.input(b"capital of France?\r", Stats::default());
    assert!(matches!(step.actions.pop(), Some(Action::Ground(_))));
    let r = Rejection {
        code: Code::NotCovered,
        message: crate::docs::ground::NOT_COVERED.into(),
    };
    let step = c.grounded(Err(r));
    let out = text(&step);
    assert!(
        out.starts_with(crate::docs::ground::NOT_COVERED) && out.ends_with("fieldllm> "),
        "{out}"
    );
    assert!(!c.busy() && step.actions.is_empty());

    // off: the model alone
    let step = c.input(b"/docs off\r", Stats::default());
    assert!(text(&step).contains("model alone"));
    let (_, job) = ask(&mut c, "relief valve setting?");
    assert!(job.citations.is_none());
}

#[test]
fn docs_cannot_be_turned_on_without_an_index() {
    let mut c = console(8192);
    let step = c.input(b"/docs on\r", Stats::default());
    assert!(text(&step).contains("enabled = false"), "{}", text(&step));
    let step = c.input(b"/sources\r", Stats::default());
    assert!(text(&step).contains("cited no documents"));
    let dir = tempfile::tempdir().unwrap();
    let mut c = console_with_docs(dir.path());
    std::fs::remove_file(dir.path().join("meta.json")).unwrap();
    c.docs = false;
    let step = c.input(b"/docs on\r", Stats::default());
    assert!(
        text(&step).contains("fieldllmd docs add"),
        "{}",
        text(&step)
    );
    let (_, job) = ask(&mut c, "still asks the model");
    assert!(job.citations.is_none());
}
