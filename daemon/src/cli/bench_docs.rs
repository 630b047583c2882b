//! `fieldllmd bench --docs DIR`: the document index on this machine. Ingestion chunks/s
//! (reading, splitting, embedding, committing) at each thread count; search latency p50/p99 of
//! the whole path (question embedded, BM25 and vector scan fused) at each index size; index size
//! on disk; RSS added by the embedding model and an open index; with a model, the time to
//! first token a grounded answer adds.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::Context as _;
use fieldllm_engine::embed::Embedder;
use fieldllm_engine::{GenerateParams, LoadOptions, Model, Session, generate};
use fieldllmd::docs::chunk::{Chunk, Limits};
use fieldllmd::docs::ground::{self, Grounder, Grounding, Settings};
use fieldllmd::docs::index::{DocIndex, Mode};
use fieldllmd::docs::ingest;
use fieldllmd::docs::read;
use fieldllmd::docs::{embed_chunks, embedder_id};
use fieldllmd::rss::rss_bytes;
use serde::Serialize;

/// What to measure.
#[derive(Debug)]
pub struct DocsBench {
    /// Folder of documents: ingested as they are for the ingestion rows, copied (unit numbers
    /// changed) to reach each index size.
    pub dir: PathBuf,
    /// Thread counts for ingestion.
    pub threads: Vec<usize>,
    /// Index sizes, in chunks, for the search rows.
    pub sizes: Vec<usize>,
    /// Questions (JSON lines with `q`) to search with.
    pub queries: Option<PathBuf>,
    /// Embedding model package.
    pub embedder: PathBuf,
    /// LLM for the time-to-first-token row.
    pub model: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct IngestRow {
    threads: usize,
    documents: usize,
    chunks: usize,
    seconds: f64,
    chunks_per_s: f64,
}

#[derive(Debug, Serialize)]
struct SearchRow {
    chunks: usize,
    queries: usize,
    p50_ms: f64,
    p99_ms: f64,
    index_only_p50_ms: f64,
    index_only_p99_ms: f64,
    index_mb: f64,
    rss_added_mb: f64,
    /// The first search of a freshly opened index, vectors read in.
    cold_ms: f64,
}

#[derive(Debug, Serialize)]
struct TtftRow {
    plain_first_token_ms: f64,
    grounded_first_token_ms: f64,
    grounding_ms: f64,
    grounded_prompt_tokens: usize,
    plain_prompt_tokens: usize,
}

pub fn run(b: DocsBench, json: bool) -> anyhow::Result<()> {
    let rss_start = rss_bytes().unwrap_or(0);
    let mut ingest_rows = Vec::new();
    // the last one's index (and the folder it lives in) serves the time-to-first-token row
    let mut ingested = None;
    for &t in &b.threads {
        let e = Embedder::load(&b.embedder, t)?;
        let dir = tempfile::tempdir()?;
        let index = DocIndex::open(dir.path())?;
        let start = Instant::now();
        let s = ingest::add(
            &index,
            &e,
            std::slice::from_ref(&b.dir),
            Limits::default(),
            |_| {},
        )?;
        let seconds = start.elapsed().as_secs_f64();
        ingest_rows.push(IngestRow {
            threads: t,
            documents: s.added,
            chunks: s.chunks,
            seconds,
            chunks_per_s: s.chunks as f64 / seconds,
        });
        ingested = Some((dir, index));
    }
    let threads = b.threads.iter().copied().max().unwrap_or(2);
    let embedder = Embedder::load(&b.embedder, threads)?;
    let queries = queries(&b)?;
    let (chunks, vectors) = corpus_chunks(&b.dir, &embedder)?;
    anyhow::ensure!(!chunks.is_empty(), "{}: no chunks", b.dir.display());
    let mut search_rows = Vec::new();
    for &size in &b.sizes {
        let dir = tempfile::tempdir()?;
        build(dir.path(), &embedder, &chunks, &vectors, size)?;
        let before = rss_bytes().unwrap_or(0);
        let index = DocIndex::open(dir.path())?;
        // the first search after a change reads the new segments' vectors into memory
        let t = Instant::now();
        let qv = embedder.embed(&[queries[0].as_str()])?.remove(0);
        index.search(&queries[0], Some(&qv), 5, Mode::Hybrid)?;
        let cold_ms = t.elapsed().as_secs_f64() * 1e3;
        let mut whole = Vec::new();
        let mut only = Vec::new();
        for q in &queries {
            let t = Instant::now();
            let qv = embedder.embed(&[q.as_str()])?.remove(0);
            let t_index = Instant::now();
            index.search(q, Some(&qv), 5, Mode::Hybrid)?;
            only.push(t_index.elapsed().as_secs_f64() * 1e3);
            whole.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let after = rss_bytes().unwrap_or(0);
        search_rows.push(SearchRow {
            chunks: size,
            queries: queries.len(),
            p50_ms: percentile(&mut whole, 0.50),
            p99_ms: percentile(&mut whole, 0.99),
            index_only_p50_ms: percentile(&mut only, 0.50),
            index_only_p99_ms: percentile(&mut only, 0.99),
            index_mb: dir_bytes(dir.path()) as f64 / 1e6,
            rss_added_mb: after.saturating_sub(before) as f64 / 1e6,
            cold_ms,
        });
    }
    let embedder_rss_mb = rss_bytes().unwrap_or(0).saturating_sub(rss_start) as f64 / 1e6;
    let ttft = match (&b.model, ingested) {
        (Some(m), Some((_dir, index))) => Some(ttft(m, index, embedder, &queries, threads)?),
        _ => None,
    };
    if json {
        println!(
            "{}",
            serde_json::json!({"ingest": ingest_rows, "search": search_rows, "rss_after_all_mb": embedder_rss_mb, "ttft": ttft})
        );
        return Ok(());
    }
    println!("| threads | documents | chunks | seconds | chunks/s |\n|--:|--:|--:|--:|--:|");
    for r in &ingest_rows {
        println!(
            "| {} | {} | {} | {:.1} | {:.1} |",
            r.threads, r.documents, r.chunks, r.seconds, r.chunks_per_s
        );
    }
    println!(
        "\n| chunks | queries | search p50 ms | p99 ms | index only p50 | p99 | first search ms | index MB | RSS added by the open index MB |\n|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
    );
    for r in &search_rows {
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.2} | {:.2} | {:.0} | {:.1} | {:.1} |",
            r.chunks,
            r.queries,
            r.p50_ms,
            r.p99_ms,
            r.index_only_p50_ms,
            r.index_only_p99_ms,
            r.cold_ms,
            r.index_mb,
            r.rss_added_mb
        );
    }
    println!(
        "\nRSS added since start (embedding models loaded, indexes opened): {embedder_rss_mb:.1} MB"
    );
    if let Some(t) = ttft {
        println!(
            "time to first token: plain {:.0} ms ({} prompt tokens), grounded {:.0} ms ({} prompt tokens) + retrieval {:.0} ms",
            t.plain_first_token_ms,
            t.plain_prompt_tokens,
            t.grounded_first_token_ms,
            t.grounded_prompt_tokens,
            t.grounding_ms
        );
    }
    Ok(())
}

fn queries(b: &DocsBench) -> anyhow::Result<Vec<String>> {
    let Some(path) = &b.queries else {
        return Ok(vec![
            "pump grinding noise pressure drops".into(),
            "relief valve setting".into(),
            "oil change interval".into(),
            "fault code overtemperature".into(),
            "torque for the drain plug".into(),
        ]);
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let qs = fieldllmd::docs::eval::parse(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(qs.into_iter().map(|q| q.q).collect())
}

/// Every chunk of the folder's documents, with its real embedding.
fn corpus_chunks(dir: &Path, e: &Embedder) -> anyhow::Result<(Vec<Chunk>, Vec<Vec<f32>>)> {
    let mut chunks = Vec::new();
    for item in ingest::collect(&[dir.to_path_buf()]) {
        let Ok((path, kind)) = item else { continue };
        let doc = read::read(&path, kind)?;
        chunks.extend(ingest::chunks_of(&doc, kind, Limits::default()));
    }
    let vectors = embed_chunks(e, &chunks)?;
    Ok((chunks, vectors))
}

/// An index of `size` chunks: the corpus's chunks copied, each copy's text naming its own
/// unit ("unit 17"), in documents of 100 chunks. A copy reuses its original's embedding: the
/// search's cost does not depend on the vectors' values, and embedding 10,000 chunks here
/// would take minutes that the ingestion rows already measure.
fn build(
    dir: &Path,
    e: &Embedder,
    chunks: &[Chunk],
    vectors: &[Vec<f32>],
    size: usize,
) -> anyhow::Result<()> {
    let index = DocIndex::open(dir)?;
    let mut w = index.writer(&embedder_id(e))?;
    let mut doc = Vec::new();
    let mut vecs = Vec::new();
    for i in 0..size {
        let j = i % chunks.len();
        let mut c = chunks[j].clone();
        c.text = format!("{} (unit {})", c.text, i / chunks.len());
        doc.push(c);
        vecs.push(vectors[j].clone());
        if doc.len() == 100 || i + 1 == size {
            let name = format!("copy-{:05}.md", i / 100);
            w.put(&name, &name, &doc, &vecs)?;
            doc.clear();
            vecs.clear();
        }
    }
    Ok(())
}

fn ttft(
    model: &Path,
    index: DocIndex,
    e: Embedder,
    queries: &[String],
    threads: usize,
) -> anyhow::Result<TtftRow> {
    let m: Arc<Model> = Model::load(
        model,
        &LoadOptions {
            verify: true,
            threads,
            context: None,
            activations: Default::default(),
            kv_cache: Default::default(),
        },
    )?;
    let grounder = Grounder::new(index, e, Settings::default())?;
    let params = GenerateParams {
        max_tokens: 1,
        ..GenerateParams::default()
    };
    let never = AtomicBool::new(false);
    let first = |ids: &[u32]| -> anyhow::Result<f64> {
        let mut s = Session::new(&m)?;
        Ok(generate(&mut s, ids, &params, &never, &mut |_| {})?
            .timings
            .first_token_ms)
    };
    let (mut plain, mut grounded, mut grounding, mut gp, mut pp, mut n) = (0.0, 0.0, 0.0, 0, 0, 0);
    for q in queries {
        let t = Instant::now();
        let Grounding::Covered {
            sources,
            key_sentence,
        } = grounder.ground(q)?
        else {
            continue;
        };
        let p = ground::prompt(
            &m,
            q,
            &sources,
            &key_sentence,
            grounder.settings().style,
            64,
        )?;
        grounding += t.elapsed().as_secs_f64() * 1e3;
        let ids = m.chat_prompt(&[fieldllm_engine::chat::Message::new("user", q.clone())])?;
        plain += first(&ids)?;
        grounded += first(&p.ids)?;
        gp += p.ids.len();
        pp += ids.len();
        n += 1;
    }
    anyhow::ensure!(n > 0, "no query was covered by the documents");
    let n_f = n as f64;
    Ok(TtftRow {
        plain_first_token_ms: plain / n_f,
        grounded_first_token_ms: grounded / n_f,
        grounding_ms: grounding / n_f,
        grounded_prompt_tokens: gp / n,
        plain_prompt_tokens: pp / n,
    })
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}
