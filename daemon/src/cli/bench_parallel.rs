//! `fieldllmd bench --parallel N [--parallel N ...]`: N answers started together, as N field
//! devices asking at once: aggregate and per-answer decode tok/s and time to first token.
//!
//! The answers go through an in-process scheduler with N slots, the daemon's own path (validate,
//! queue, a worker and a session per answer), greedy, each asked for `--gen` tokens. A warm-up
//! answer runs first. Aggregate tok/s is every answer's tokens over the wall time from submit
//! to the last final event; per-answer tok/s is each answer's tokens after its first over the
//! time from its first chunk to its end (the mean over answers); time to first token is from
//! submit to the answer's first chunk.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fieldllm_engine::ggml::Activations;
use fieldllmd::proto::Request;
use fieldllmd::request::{Intake, Limits, Origin};
use fieldllmd::scheduler::{ModelEngine, Reply, Scheduler, SchedulerConfig, Transport};
use serde::Serialize;

/// What to measure.
#[derive(Debug, Clone)]
pub struct ParallelBench {
    /// Answers started together, one row each.
    pub levels: Vec<usize>,
    /// Tokens each answer is asked for.
    pub max_tokens: u32,
    /// tract threads.
    pub threads: usize,
    /// What the products quantize activations to.
    pub activations: Activations,
}

#[derive(Debug, Serialize)]
struct Row {
    answers: usize,
    tokens: u64,
    wall_s: f64,
    aggregate_tok_s: f64,
    per_answer_tok_s: f64,
    ttft_p50_ms: f64,
    ttft_max_ms: f64,
}

/// Questions that ask for long answers, one per answer (in turn), so the prompts differ.
const QUESTIONS: [&str; 4] = [
    "Explain step by step how to find why a hydraulic pump loses pressure.",
    "Describe in detail how to check a three-phase motor that trips its breaker.",
    "List everything a technician should inspect on a compressor before a restart.",
    "Explain in detail what causes bearing noise in a centrifugal fan and how to fix it.",
];

fn request(id: String, i: usize, max_tokens: u32) -> Request {
    Request {
        id,
        prompt: QUESTIONS[i % QUESTIONS.len()].into(),
        max_tokens: Some(max_tokens),
        temperature: Some(0.0),
        stream: Some(true),
        ..Request::default()
    }
}

#[derive(Default)]
struct Answer {
    first: Option<Instant>,
    end: Option<Instant>,
    tokens: u32,
}

/// `n` answers submitted at once; waits for every final event.
fn level(
    s: &Scheduler,
    intake: &Intake,
    n: usize,
    max_tokens: u32,
    tag: &str,
) -> anyhow::Result<Row> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Reply>();
    let mut answers: HashMap<String, Answer> = HashMap::new();
    let t0 = Instant::now();
    for i in 0..n {
        let id = format!("{tag}-{i}");
        let job = intake
            .job(
                request(id.clone(), i, max_tokens),
                None,
                Origin::new(Transport::Local),
                t0,
            )
            .map_err(|r| anyhow::anyhow!("bench request refused: {}", r.message))?;
        answers.insert(id, Answer::default());
        s.submit(job, tx.clone());
    }
    drop(tx);
    let mut open = n;
    while open > 0 {
        let Some(r) = rx.blocking_recv() else {
            bail!("the scheduler closed with {open} answers open")
        };
        let now = Instant::now();
        let a = answers
            .get_mut(r.id())
            .context("a reply for an answer not asked")?;
        match r {
            Reply::Chunk(_) => {
                a.first.get_or_insert(now);
            }
            Reply::Done(d) => {
                a.first.get_or_insert(now);
                a.end = Some(now);
                a.tokens = d.usage.completion_tokens;
                open -= 1;
            }
            Reply::Failed(f) => bail!("answer {} failed: {}", f.id, f.message),
        }
    }
    let wall = t0.elapsed();
    let tokens: u64 = answers.values().map(|a| u64::from(a.tokens)).sum();
    let mut ttft: Vec<f64> = answers
        .values()
        .filter_map(|a| a.first)
        .map(|f| (f - t0).as_secs_f64() * 1e3)
        .collect();
    ttft.sort_by(f64::total_cmp);
    let per_answer: Vec<f64> = answers
        .values()
        .filter_map(|a| {
            let span = a.end?.checked_duration_since(a.first?)?;
            (a.tokens > 1 && span > Duration::ZERO)
                .then(|| f64::from(a.tokens - 1) / span.as_secs_f64())
        })
        .collect();
    Ok(Row {
        answers: n,
        tokens,
        wall_s: wall.as_secs_f64(),
        aggregate_tok_s: tokens as f64 / wall.as_secs_f64(),
        per_answer_tok_s: per_answer.iter().sum::<f64>() / per_answer.len().max(1) as f64,
        ttft_p50_ms: ttft.get(ttft.len() / 2).copied().unwrap_or(0.0),
        ttft_max_ms: ttft.last().copied().unwrap_or(0.0),
    })
}

/// Runs every level and prints a table (or JSON).
pub fn run(b: ParallelBench, model_dir: &std::path::Path, json: bool) -> anyhow::Result<()> {
    anyhow::ensure!(
        b.levels.iter().all(|&n| n > 0) && b.max_tokens > 0,
        "--parallel and --gen must be positive"
    );
    let model = super::bench::load_model(model_dir, b.threads, b.activations)?;
    let name = model.manifest().model.name.clone();
    let engine = Arc::new(ModelEngine(model));
    let limits = Limits {
        max_tokens: b.max_tokens.max(Limits::default().max_tokens),
        ..Limits::default()
    };
    let intake = Intake::new(limits, engine.clone());
    let mut rows = Vec::new();
    for &n in &b.levels {
        let s = Scheduler::start(
            engine.clone(),
            SchedulerConfig {
                queue: n.max(16),
                slots: n,
            },
        )?;
        // first answers pay for allocations
        level(&s, &intake, 1, 8, &format!("warm{n}"))?;
        rows.push(level(&s, &intake, n, b.max_tokens, &format!("p{n}"))?);
        s.shutdown(Duration::from_secs(1));
    }
    if json {
        println!(
            "{}",
            serde_json::json!({"model": name, "threads": b.threads, "max_tokens": b.max_tokens, "rows": rows})
        );
        return Ok(());
    }
    println!(
        "model {name}, {} thread(s), answers of up to {} tokens, started together",
        b.threads, b.max_tokens
    );
    println!(
        "| answers | tokens | wall s | aggregate tok/s | per-answer tok/s | TTFT p50 ms | TTFT max ms |"
    );
    println!(
        "|--------:|-------:|-------:|----------------:|-----------------:|------------:|------------:|"
    );
    for r in &rows {
        println!(
            "| {} | {} | {:.2} | {:.1} | {:.1} | {:.0} | {:.0} |",
            r.answers,
            r.tokens,
            r.wall_s,
            r.aggregate_tok_s,
            r.per_answer_tok_s,
            r.ttft_p50_ms,
            r.ttft_max_ms
        );
    }
    Ok(())
}
