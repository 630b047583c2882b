//! `fieldllmd bench`: load time, peak RSS, prefill and decode speed, like llama-bench's pp/tg.

use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::Context;
use fieldllm_engine::attention::KvCache;
use fieldllm_engine::ggml::Activations;
use fieldllm_engine::sampler::argmax;
use fieldllm_engine::session::OpProfile;
use fieldllm_engine::{LoadOptions, Model, Session};
use serde::Serialize;

use super::ModelArg;

/// Flags of `bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Thread counts to measure (repeatable) [default: 1 and 2].
    #[arg(long)]
    threads: Vec<usize>,
    /// Prompt length for the prefill measurement.
    #[arg(long, default_value_t = 128)]
    prompt: usize,
    /// Tokens to generate for the decode measurement.
    #[arg(long = "gen", default_value_t = 128)]
    generate: usize,
    /// Repetitions of each measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Also time every op of a prefill and of the decode steps and print where a token's time
    /// goes, by op.
    #[arg(long, conflicts_with = "json")]
    profile: bool,
    /// Measure the MQTT service instead: the same requests in-process and through this broker
    /// to a running `fieldllmd serve` (same model), side by side.
    #[arg(long, value_name = "mqtt://HOST:PORT")]
    service: Option<String>,
    /// With --service: the daemon's node id.
    #[arg(long, default_value = "bench", requires = "service")]
    node: String,
    /// With --service: topic prefix.
    #[arg(long, default_value = "fieldllm/v1", requires = "service")]
    prefix: String,
    /// With --service: requests per row.
    #[arg(long, default_value_t = 200, requires = "service")]
    requests: usize,
    /// With --service: devices asking at once, each on its own connection, one question at a
    /// time (repeatable) [default: 1 and 4].
    #[arg(long, requires = "service")]
    concurrency: Vec<usize>,
    /// With --service: only through the broker (no in-process rows, no model loaded here).
    #[arg(long, requires = "service")]
    mqtt_only: bool,
    /// With --service: tokens per answer.
    #[arg(long, default_value_t = 16, requires = "service")]
    max_tokens: u32,
    /// Measure quality instead: perplexity on this text as llama.cpp's `llama-perplexity`
    /// computes it (chunks of --ctx tokens, the second half of each scored).
    #[arg(long, value_name = "FILE", conflicts_with = "service")]
    perplexity: Option<std::path::PathBuf>,
    /// With --perplexity: tokens per chunk.
    #[arg(long, default_value_t = 512, requires = "perplexity")]
    ctx: usize,
    /// With --perplexity: score at most this many chunks (0: all).
    #[arg(long, default_value_t = 0, requires = "perplexity")]
    chunks: usize,
    /// Measure the document index instead, on this folder of documents: ingestion, search
    /// latency, index size, RSS, and (with --docs-model) the time to first token it adds.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["service", "perplexity"])]
    docs: Option<std::path::PathBuf>,
    /// With --docs: index sizes to search, in chunks.
    #[arg(long, value_delimiter = ',', default_values_t = [1000, 10000], requires = "docs")]
    docs_chunks: Vec<usize>,
    /// With --docs: questions to search with (JSON lines with "q").
    #[arg(long, value_name = "FILE", requires = "docs")]
    docs_queries: Option<std::path::PathBuf>,
    /// With --docs: the embedding model package [default: as `docs`].
    #[arg(long, value_name = "DIR", requires = "docs")]
    embedder: Option<std::path::PathBuf>,
    /// With --docs: also measure the time to first token of grounded answers with the model.
    #[arg(long, requires = "docs")]
    docs_ttft: bool,
    /// With --perplexity: also run this model (the f32 package of the same GGUF) and report the
    /// mean KL divergence from it and how often both pick the same top token.
    #[arg(long, value_name = "F32_MODEL", requires = "perplexity")]
    kl_divergence: Option<std::path::PathBuf>,
    /// Measure answers started together instead: this many at once through an in-process
    /// scheduler with as many slots (repeatable: one row each), each asked for --gen tokens;
    /// aggregate and per-answer tok/s and time to first token.
    #[arg(long, value_name = "N", conflicts_with_all = ["service", "perplexity", "docs"])]
    parallel: Vec<usize>,
    /// With --parallel: each answer on a tract state of its own, each step reading every
    /// weight for itself (how slots ran before answers were decoded together).
    #[arg(long, requires = "parallel")]
    separate: bool,
    /// What the matrix products quantize activations to: 8bit or precise (as `[model]
    /// activations`).
    #[arg(long, default_value_t = Activations::default())]
    activations: Activations,
    /// What the KV caches keep keys and values as: f16 or f32 (as `[model] kv_cache`).
    #[arg(long, default_value_t = KvCache::default())]
    kv_cache: KvCache,
}

#[derive(Debug, Serialize)]
struct Row {
    threads: usize,
    load_ms: f64,
    prefill_tokens: usize,
    prefill_tok_s: f64,
    decode_tokens: usize,
    decode_tok_s: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    model: String,
    weights: String,
    /// The kernels' instruction set (`FIELDLLM_ISA`, or the fastest this CPU runs).
    isa: &'static str,
    /// What the products quantize activations to.
    activations: String,
    /// What the KV caches keep keys and values as.
    kv_cache: String,
    rows: Vec<Row>,
    peak_rss_mb: f64,
    /// After the last run, the model still loaded: anonymous memory (heap, KV cache) and
    /// file-backed memory (mapped weights, the binary).
    anon_rss_mb: f64,
    file_rss_mb: f64,
}

/// Loads a model the way every benchmark does: files not hashed (a benchmark measures, it
/// does not deploy), the model's own context.
pub(super) fn load_model(
    dir: &std::path::Path,
    threads: usize,
    activations: Activations,
    kv_cache: KvCache,
) -> anyhow::Result<std::sync::Arc<Model>> {
    Model::load(
        dir,
        &LoadOptions {
            verify: false,
            threads,
            context: None,
            activations,
            kv_cache,
        },
    )
    .with_context(|| format!("loading {}", dir.display()))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Token ids for the prompt: a fixed text repeated until long enough (real tokens, not zeros,
/// so attention and embeddings see ordinary input).
fn prompt_ids(model: &Model, n: usize) -> anyhow::Result<Vec<u32>> {
    const TEXT: &str = "The hydraulic pump on line 3 trips its breaker a few minutes after start-up. \
        The technician checks the motor current, the fluid temperature and the pressure relief valve, \
        then reads the fault log of the drive and compares it with the maintenance manual. ";
    let one = model.tokenizer.encode(TEXT)?;
    Ok(one.iter().copied().cycle().take(n).collect())
}

pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    if let Some(url) = &a.service {
        let b = super::bench_service::ServiceBench {
            url: url.clone(),
            node: a.node.clone(),
            prefix: a.prefix.clone(),
            requests: a.requests,
            concurrency: a.concurrency.clone(),
            max_tokens: a.max_tokens,
            threads: a.threads.first().copied().unwrap_or(1),
            mqtt_only: a.mqtt_only,
        };
        return super::bench_service::run(b, &a.model.dir()?, a.json);
    }
    if !a.parallel.is_empty() {
        let b = super::bench_parallel::ParallelBench {
            levels: a.parallel.clone(),
            max_tokens: u32::try_from(a.generate).context("--gen is too large")?,
            threads: a.threads.first().copied().unwrap_or(2),
            activations: a.activations,
            kv_cache: a.kv_cache,
            batched: !a.separate,
            profile: a.profile,
        };
        return super::bench_parallel::run(b, &a.model.dir()?, a.json);
    }
    if let Some(dir) = &a.docs {
        let b = super::bench_docs::DocsBench {
            dir: dir.clone(),
            threads: if a.threads.is_empty() {
                vec![1, 2]
            } else {
                a.threads.clone()
            },
            sizes: a.docs_chunks.clone(),
            queries: a.docs_queries.clone(),
            embedder: fieldllmd::paths::default_embedder_dir(a.embedder.clone()),
            model: if a.docs_ttft {
                Some(a.model.dir()?)
            } else {
                None
            },
        };
        return super::bench_docs::run(b, a.json);
    }
    if let Some(text) = &a.perplexity {
        let q = super::bench_quality::QualityBench {
            model: a.model.dir()?,
            text: text.clone(),
            ctx: a.ctx,
            chunks: a.chunks,
            reference: a.kl_divergence.clone(),
            threads: a.threads.first().copied().unwrap_or(2),
            activations: a.activations,
            kv_cache: a.kv_cache,
        };
        return super::bench_quality::run(q, a.json);
    }
    let threads = if a.threads.is_empty() {
        vec![1, 2]
    } else {
        a.threads.clone()
    };
    anyhow::ensure!(
        a.reps > 0 && a.prompt > 0 && a.generate > 0,
        "--reps, --prompt and --gen must be positive"
    );
    let dir = a.model.dir()?;
    let never = AtomicBool::new(false);
    let mut rows = Vec::new();
    let mut profiles = Vec::new();
    let mut name = String::new();
    let mut weights = String::new();
    let mut anon_file = (0, 0);
    for &t in &threads {
        let model = load_model(&dir, t, a.activations, a.kv_cache)?;
        name = model.manifest().model.name.clone();
        weights = model.manifest().graph.weights.to_string();
        anyhow::ensure!(
            a.prompt + a.generate < model.context_length,
            "prompt + gen exceed the context"
        );
        let ids = prompt_ids(&model, a.prompt)?;
        let mut pp = Vec::new();
        let mut tg = Vec::new();
        for _ in 0..a.reps {
            let mut s = Session::new(&model)?;
            let start = Instant::now();
            s.feed(&ids, &never)?;
            pp.push(a.prompt as f64 / start.elapsed().as_secs_f64());

            // decode from a one-token context, as llama-bench's tg test does
            let mut s = Session::new(&model)?;
            let mut logits = s.feed(&ids[..1], &never)?;
            let start = Instant::now();
            for _ in 0..a.generate {
                let next = argmax(&logits);
                logits = s.feed(&[next], &never)?;
            }
            tg.push(a.generate as f64 / start.elapsed().as_secs_f64());
        }
        if a.profile {
            let prefill = profile_prefill(&model, &ids)?;
            profiles.push((t, "prefill", "prompt token", prefill));
            let decode = profile_decode(&model, ids[0], a.generate)?;
            profiles.push((t, "decode", "token", decode));
        }
        anon_file = (
            fieldllmd::rss::anon_rss_bytes().unwrap_or(0),
            fieldllmd::rss::file_rss_bytes().unwrap_or(0),
        );
        rows.push(Row {
            threads: t,
            load_ms: model.load_time.as_secs_f64() * 1e3,
            prefill_tokens: a.prompt,
            prefill_tok_s: median(pp),
            decode_tokens: a.generate,
            decode_tok_s: median(tg),
        });
    }
    let report = Report {
        model: name,
        weights,
        activations: a.activations.to_string(),
        kv_cache: a.kv_cache.to_string(),
        isa: fieldllm_engine::cpu::Isa::best().name(),
        rows,
        peak_rss_mb: fieldllmd::rss::peak_rss_bytes().unwrap_or(0) as f64 / 1e6,
        anon_rss_mb: anon_file.0 as f64 / 1e6,
        file_rss_mb: anon_file.1 as f64 / 1e6,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "model {} ({} weights, {} activations, {} KV cache), kernels {}, peak RSS {:.0} MB (at the end: {:.0} MB anonymous, {:.0} MB file-backed)",
        report.model,
        report.weights,
        report.activations,
        report.kv_cache,
        report.isa,
        report.peak_rss_mb,
        report.anon_rss_mb,
        report.file_rss_mb
    );
    println!(
        "| threads | load ms | pp{} tok/s | tg{} tok/s |",
        a.prompt, a.generate
    );
    println!("|--------:|--------:|-----------:|-----------:|");
    for r in &report.rows {
        println!(
            "| {:>7} | {:>7.0} | {:>10.1} | {:>10.1} |",
            r.threads, r.load_ms, r.prefill_tok_s, r.decode_tok_s
        );
    }
    for (t, what, per, table) in profiles {
        println!("\n{what} profile, {t} thread(s), per {per}:\n{table}");
    }
    Ok(())
}

/// Decodes `n` tokens after `first` with every node timed; a table of the ops by time per
/// token, with what the graph's run spent outside the ops (the executor, state handling).
fn profile_decode(model: &std::sync::Arc<Model>, first: u32, n: usize) -> anyhow::Result<String> {
    let never = AtomicBool::new(false);
    let mut s = Session::new(model)?;
    let mut logits = s.feed(&[first], &never)?;
    let mut profile = OpProfile::default();
    let start = Instant::now();
    for _ in 0..n {
        let next = argmax(&logits);
        logits = s.feed_profiled(&[next], &mut profile)?;
    }
    Ok(profile_table(profile, start.elapsed(), n, n))
}

/// Prefills `ids` in one feed with every node timed: the same table, per prompt token.
fn profile_prefill(model: &std::sync::Arc<Model>, ids: &[u32]) -> anyhow::Result<String> {
    let mut s = Session::new(model)?;
    let mut profile = OpProfile::default();
    let start = Instant::now();
    s.feed_profiled(ids, &mut profile)?;
    Ok(profile_table(profile, start.elapsed(), ids.len(), 1))
}

/// The ops of `profile` by nodes per graph run (`runs`) and time per token (`n` tokens in
/// `elapsed`), and what the graph's runs spent outside them.
pub(super) fn profile_table(
    profile: OpProfile,
    elapsed: std::time::Duration,
    n: usize,
    runs: usize,
) -> String {
    let total = elapsed.as_secs_f64() * 1e6 / n as f64;
    let mut ops: Vec<_> = profile.ops.into_iter().collect();
    ops.sort_by_key(|(_, (_, time))| std::cmp::Reverse(*time));
    let mut out = String::from("| op | nodes | µs | share |\n|---|--:|--:|--:|\n");
    let mut in_ops = 0.0;
    for (op, (count, time)) in ops {
        let us = time.as_secs_f64() * 1e6 / n as f64;
        in_ops += us;
        out += &format!(
            "| {op} | {} | {us:.1} | {:.1}% |\n",
            count / runs as u64,
            100.0 * us / total
        );
    }
    out += &format!(
        "| (outside the ops) | - | {:.1} | {:.1}% |\n| total | - | {total:.1} | 100% |",
        total - in_ops,
        100.0 * (total - in_ops) / total
    );
    out
}
