//! `fieldllmd bench --parallel N [--parallel N ...]`: N answers started together, as N field
//! devices asking at once: aggregate and per-answer decode tok/s and time to first token.
//!
//! The answers go through an in-process scheduler with N slots, the daemon's own path (validate,
//! queue, a worker and a session per answer), greedy, each asked for `--gen` tokens. A warm-up
//! answer runs first. Aggregate tok/s is every answer's tokens over the wall time from submit
//! to the last final event (the prompts' prefill included); aggregate decode tok/s is every
//! answer's tokens after its first over the time from the first answer's first chunk to the
//! last final event (the decode phase: the prompts are measured by time to first token);
//! per-answer tok/s is each answer's tokens after its first over the time from its first chunk
//! to its end (the mean over answers); time to first token is from submit to the answer's
//! first chunk.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fieldllm_engine::ggml::Activations;
use fieldllmd::proto::Request;
use fieldllmd::request::{Intake, Limits, Origin};
use fieldllmd::scheduler::{Engine, ModelEngine, Reply, Scheduler, SchedulerConfig, Transport};
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
    /// What the KV caches keep keys and values as.
    pub kv_cache: fieldllm_engine::attention::KvCache,
    /// Answers decoded together (else each on a state of its own).
    pub batched: bool,
    /// Time every op of the shared runs of each level (decoded together only).
    pub profile: bool,
}

#[derive(Debug, Serialize)]
struct Row {
    answers: usize,
    tokens: u64,
    wall_s: f64,
    aggregate_tok_s: f64,
    /// Tokens after each answer's first over the span from the first first token to the end.
    decode_tok_s: f64,
    per_answer_tok_s: f64,
    ttft_p50_ms: f64,
    ttft_max_ms: f64,
    /// The longest wait between two chunks of one answer.
    max_gap_ms: f64,
    /// Answers per shared run (mean), and the share of the wall time the runs took.
    answers_per_run: f64,
    busy_pct: f64,
    /// Runs that went when the gathering window ran out, without some answer's token (%).
    window_runs_pct: f64,
    /// Resident memory after the answers, and the part that is not mapped files.
    rss_mb: f64,
    anon_mb: f64,
}

/// The stall a long prompt joining running answers causes, at one prompt chunk size.
#[derive(Debug, Serialize)]
struct Stall {
    chunk: usize,
    /// The running answers' median wait between chunks before the join.
    median_gap_ms: f64,
    /// Their longest wait from the join until the newcomer's first chunk.
    longest_gap_ms: f64,
    /// The newcomer's time to first token.
    joiner_ttft_ms: f64,
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
    last: Option<Instant>,
    max_gap: Duration,
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
                if let Some(last) = a.last {
                    a.max_gap = a.max_gap.max(now - last);
                }
                a.last = Some(now);
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
    let first = answers.values().filter_map(|a| a.first).min();
    let end = answers.values().filter_map(|a| a.end).max();
    let decoded: u64 = answers
        .values()
        .map(|a| u64::from(a.tokens.saturating_sub(1)))
        .sum();
    let decode_tok_s = match (first, end) {
        (Some(f), Some(e)) if e > f => decoded as f64 / (e - f).as_secs_f64(),
        _ => 0.0,
    };
    Ok(Row {
        answers: n,
        decode_tok_s,
        tokens,
        wall_s: wall.as_secs_f64(),
        aggregate_tok_s: tokens as f64 / wall.as_secs_f64(),
        per_answer_tok_s: per_answer.iter().sum::<f64>() / per_answer.len().max(1) as f64,
        ttft_p50_ms: ttft.get(ttft.len() / 2).copied().unwrap_or(0.0),
        ttft_max_ms: ttft.last().copied().unwrap_or(0.0),
        max_gap_ms: answers
            .values()
            .map(|a| a.max_gap.as_secs_f64() * 1e3)
            .fold(0.0, f64::max),
        answers_per_run: 0.0,
        busy_pct: 0.0,
        window_runs_pct: 0.0,
        rss_mb: fieldllmd::rss::rss_bytes().unwrap_or(0) as f64 / 1e6,
        anon_mb: fieldllmd::rss::anon_rss_bytes().unwrap_or(0) as f64 / 1e6,
    })
}

/// A long question (about 500 tokens): a manual's page and a question about it.
fn long_question() -> String {
    let page = "The pump is driven by a three-phase motor through a flexible coupling. \
                Check the coupling alignment, the bearing temperatures and the suction \
                pressure before each start. Low suction pressure causes cavitation, which \
                sounds like gravel passing through the casing and erodes the impeller. ";
    format!(
        "{}Given this page, what should I check first when the pump gets noisy?",
        page.repeat(10)
    )
}

/// The stall a joining prompt causes: `running` answers decode; once each has streamed a few
/// chunks a long prompt joins (the batcher's prompt chunk is `chunk`).
fn stall(s: &Scheduler, intake: &Intake, running: usize, chunk: usize) -> anyhow::Result<Stall> {
    let tag = format!("stall{chunk}");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Reply>();
    let t0 = Instant::now();
    let origin = || Origin::new(Transport::Local);
    for i in 0..running {
        let job = intake
            .job(request(format!("{tag}-{i}"), i, 96), None, origin(), t0)
            .map_err(|r| anyhow::anyhow!("bench request refused: {}", r.message))?;
        s.submit(job, tx.clone());
    }
    let mut last: HashMap<String, Instant> = HashMap::new();
    let mut chunks: HashMap<String, usize> = HashMap::new();
    let (mut before, mut during) = (Vec::new(), 0f64);
    let mut joined: Option<Instant> = None;
    let mut first: Option<Instant> = None;
    let mut open = running;
    let joiner = format!("{tag}-join");
    while open > 0 {
        let Some(r) = rx.blocking_recv() else {
            bail!("the scheduler closed with {open} answers open")
        };
        let now = Instant::now();
        let id = r.id().to_string();
        match r {
            Reply::Failed(f) => bail!("answer {} failed: {}", f.id, f.message),
            Reply::Done(_) => open -= 1,
            Reply::Chunk(_) if id == joiner => {
                first.get_or_insert(now);
            }
            Reply::Chunk(_) => {
                if let Some(prev) = last.insert(id.clone(), now) {
                    let gap = (now - prev).as_secs_f64() * 1e3;
                    match (joined, first) {
                        (None, _) => before.push(gap),
                        (Some(_), None) => during = during.max(gap),
                        _ => {}
                    }
                }
                *chunks.entry(id).or_default() += 1;
                if joined.is_none() && chunks.len() == running && chunks.values().all(|&c| c >= 8) {
                    let mut req = request(joiner.clone(), 0, 8);
                    req.prompt = long_question();
                    let job = intake
                        .job(req, None, origin(), now)
                        .map_err(|r| anyhow::anyhow!("bench request refused: {}", r.message))?;
                    s.submit(job, tx.clone());
                    joined = Some(now);
                    open += 1;
                }
            }
        }
    }
    before.sort_by(f64::total_cmp);
    let median = before.get(before.len() / 2).copied().unwrap_or(0.0);
    let ttft = match (joined, first) {
        (Some(j), Some(f)) => (f - j).as_secs_f64() * 1e3,
        _ => 0.0,
    };
    Ok(Stall {
        chunk,
        median_gap_ms: median,
        longest_gap_ms: during,
        joiner_ttft_ms: ttft,
    })
}

/// Runs every level and prints a table (or JSON).
pub fn run(b: ParallelBench, model_dir: &std::path::Path, json: bool) -> anyhow::Result<()> {
    anyhow::ensure!(
        b.levels.iter().all(|&n| n > 0) && b.max_tokens > 0,
        "--parallel and --gen must be positive"
    );
    let model = super::bench::load_model(model_dir, b.threads, b.activations, b.kv_cache)?;
    let name = model.manifest().model.name.clone();
    let engine = Arc::new(ModelEngine::new(model, b.batched)?);
    let batched = engine.batcher().is_some();
    let mut profiles = Vec::new();
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
                kv_memory: None,
            },
        )?;
        // first answers pay for allocations
        level(&s, &intake, 1, 8, &format!("warm{n}"))?;
        let before = engine.batcher().map(|b| b.stats());
        if let Some(batcher) = engine.batcher().filter(|_| b.profile) {
            batcher.start_profile();
        }
        let mut row = level(&s, &intake, n, b.max_tokens, &format!("p{n}"))?;
        if let (Some(batcher), Some(before)) = (engine.batcher(), before) {
            let after = batcher.stats();
            let runs = (after.runs - before.runs).max(1);
            row.answers_per_run = (after.entries - before.entries) as f64 / runs as f64;
            row.busy_pct = (after.busy - before.busy).as_secs_f64() / row.wall_s * 100.0;
            row.window_runs_pct =
                (after.window_runs - before.window_runs) as f64 / runs as f64 * 100.0;
            if let Some(p) = batcher.take_profile() {
                let busy = after.busy - before.busy;
                let table = super::bench::profile_table(p, busy, runs as usize, runs as usize);
                profiles.push((n, row.answers_per_run, table));
            }
        }
        rows.push(row);
        s.shutdown(Duration::from_secs(1));
    }
    // the stall of a long prompt joining three running answers, by prompt chunk size
    let mut stalls = Vec::new();
    let long = engine.prompt(&[fieldllm_engine::chat::Message::new("user", long_question())])?;
    // a model with a small context (the tiny test model) has no room for the long prompt
    let room = long.len() + 8 < engine.context_length();
    if let Some(batcher) = engine.batcher().filter(|_| room) {
        let s = Scheduler::start(
            engine.clone(),
            SchedulerConfig {
                queue: 16,
                slots: 4,
                kv_memory: None,
            },
        )?;
        for chunk in [16, fieldllm_engine::batch::SHARED_PREFILL_CHUNK, 64, 128] {
            batcher.set_shared_chunk(chunk);
            stalls.push(stall(&s, &intake, 3, chunk)?);
        }
        batcher.set_shared_chunk(fieldllm_engine::batch::SHARED_PREFILL_CHUNK);
        s.shutdown(Duration::from_secs(1));
    }
    if json {
        println!(
            "{}",
            serde_json::json!({"model": name, "threads": b.threads, "max_tokens": b.max_tokens, "batched": batched, "rows": rows, "stall": stalls})
        );
        return Ok(());
    }
    println!(
        "model {name}, {} thread(s), answers of up to {} tokens, started together, {}",
        b.threads,
        b.max_tokens,
        if batched {
            "decoded together"
        } else {
            "each on a state of its own"
        }
    );
    println!(
        "| answers | tokens | wall s | aggregate tok/s | aggregate decode tok/s | per-answer tok/s | TTFT p50 ms | TTFT max ms | max gap ms | answers/run | window runs % | runs' share % | RSS MB | anon MB |"
    );
    println!(
        "|--------:|-------:|-------:|----------------:|-----------------------:|-----------------:|------------:|------------:|-----------:|------------:|--------------:|--------------:|-------:|--------:|"
    );
    for r in &rows {
        println!(
            "| {} | {} | {:.2} | {:.1} | {:.1} | {:.1} | {:.0} | {:.0} | {:.0} | {:.2} | {:.0} | {:.0} | {:.0} | {:.0} |",
            r.answers,
            r.tokens,
            r.wall_s,
            r.aggregate_tok_s,
            r.decode_tok_s,
            r.per_answer_tok_s,
            r.ttft_p50_ms,
            r.ttft_max_ms,
            r.max_gap_ms,
            r.answers_per_run,
            r.window_runs_pct,
            r.busy_pct,
            r.rss_mb,
            r.anon_mb
        );
    }
    for (n, per_run, table) in &profiles {
        println!(
            "\nshared runs with {n} answers started ({per_run:.2} answers a run), per run:\n{table}"
        );
    }
    if !stalls.is_empty() {
        println!("a ~500-token prompt joining 3 answers that are decoding:");
        println!(
            "| prompt chunk | their median gap ms | their longest gap ms | newcomer's TTFT ms |"
        );
        println!("|--:|--:|--:|--:|");
        for st in &stalls {
            println!(
                "| {} | {:.0} | {:.0} | {:.0} |",
                st.chunk, st.median_gap_ms, st.longest_gap_ms, st.joiner_ttft_ms
            );
        }
    }
    Ok(())
}
