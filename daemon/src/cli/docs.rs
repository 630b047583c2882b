//! `fieldllmd docs add|list|remove|search`: the document index from the command line.

use std::path::PathBuf;

use anyhow::Context as _;
use fieldllm_engine::embed::Embedder;
use fieldllmd::docs::chunk::Limits;
use fieldllmd::docs::embedder_id;
use fieldllmd::docs::ground::Style;
use fieldllmd::docs::index::{DocIndex, Mode};
use fieldllmd::docs::ingest::{self, Outcome};

/// Document index subcommands.
#[derive(Debug, clap::Args)]
pub struct DocsArgs {
    /// The index directory [default: $STATE_DIRECTORY/docs under systemd, else
    /// /var/lib/fieldllm/docs].
    #[arg(long, value_name = "DIR", global = true)]
    index: Option<PathBuf>,
    /// Sentence-embedding model package [default: $FIELDLLM_EMBEDDER, the installed
    /// all-minilm-l6-v2, or models/build/all-minilm-l6-v2].
    #[arg(long, value_name = "DIR", global = true)]
    embedder: Option<PathBuf>,
    /// Threads for the embedding model.
    #[arg(long, default_value_t = 2, global = true)]
    threads: usize,
    #[command(subcommand)]
    command: DocsCommand,
}

#[derive(Debug, clap::Subcommand)]
enum DocsCommand {
    /// Index files and folders of Markdown, plain text and PDF (a changed file replaces its
    /// old copy; an unchanged one is skipped).
    Add {
        /// Files and folders.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// The indexed documents.
    List {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Take documents out of the index, by name (as `docs list` shows it).
    Remove {
        /// Document names.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Retrieval quality over a question set (JSON lines of q, doc, section): hit@1, hit@3
    /// and MRR of keywords, meaning and both fused.
    Eval {
        /// The question set.
        questions: PathBuf,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Also generate grounded answers and check each states its question's `fact`.
        #[arg(long)]
        answers: bool,
        #[command(flatten)]
        model: super::ModelArg,
        /// With --answers: prompt styles to compare.
        #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Style::Passages, Style::PassagesBestLast, Style::KeySentence])]
        styles: Vec<Style>,
        /// With --answers: passage counts to compare.
        #[arg(long, value_delimiter = ',', default_values_t = [1, 3])]
        passages: Vec<usize>,
        /// With --answers: most tokens per answer.
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
    },
    /// The passages that best match a question.
    Search {
        /// How many.
        #[arg(long, default_value_t = 5)]
        k: usize,
        /// One JSON object per line: doc, section, page (when known), score, similarity, text.
        #[arg(long)]
        json: bool,
        /// Ranking: keywords, meaning, or both fused.
        #[arg(long, value_enum, default_value_t = Mode::Hybrid)]
        mode: Mode,
        /// The question or keywords.
        #[arg(required = true, num_args = 1..)]
        query: Vec<String>,
    },
}

pub fn run(args: DocsArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.threads > 0, "--threads must be at least 1");
    let dir = fieldllmd::paths::default_docs_index(args.index);
    let index = DocIndex::open(&dir)?;
    let embedder = || -> anyhow::Result<Embedder> {
        let dir = fieldllmd::paths::default_embedder_dir(args.embedder.clone());
        let e = Embedder::load(&dir, args.threads)
            .with_context(|| format!("loading the embedding model {}", dir.display()))?;
        index.check_embedder(&embedder_id(&e))?;
        Ok(e)
    };
    match args.command {
        DocsCommand::Add { paths } => add(&index, &embedder()?, &paths),
        DocsCommand::List { json } => list(&index, json),
        DocsCommand::Remove { names } => remove(&index, &names),
        DocsCommand::Eval {
            questions,
            json,
            answers,
            model,
            styles,
            passages,
            max_tokens,
        } => {
            let questions = read_questions(&questions)?;
            let e = embedder()?;
            eval(&index, &e, &questions, json)?;
            if answers {
                let settings = fieldllmd::docs::ground::Settings {
                    passages: passages.iter().copied().max().unwrap_or(3),
                    ..Default::default()
                };
                let grounder = fieldllmd::docs::ground::Grounder::new(index, e, settings)?;
                let m = fieldllm_engine::Model::load(
                    &model.dir()?,
                    &fieldllm_engine::LoadOptions {
                        verify: true,
                        threads: args.threads,
                        context: None,
                        activations: Default::default(),
                        kv_cache: Default::default(),
                    },
                )?;
                let rows = super::docs_answers::run(
                    &m, &grounder, &questions, &styles, &passages, max_tokens,
                )?;
                for r in rows {
                    println!("{}", serde_json::to_string(&r)?);
                }
            }
            Ok(())
        }
        DocsCommand::Search {
            k,
            json,
            mode,
            query,
        } => {
            let e = match mode {
                Mode::Bm25 => None,
                Mode::Vector | Mode::Hybrid => Some(embedder()?),
            };
            search(&index, e.as_ref(), k, json, mode, &query.join(" "))
        }
    }
}

fn add(index: &DocIndex, embedder: &Embedder, paths: &[PathBuf]) -> anyhow::Result<()> {
    let start = std::time::Instant::now();
    let summary = ingest::add(index, embedder, paths, Limits::default(), |o| match o {
        Outcome::Added { name, chunks } => println!("added      {name} ({chunks} chunks)"),
        Outcome::Replaced { name, chunks } => println!("replaced   {name} ({chunks} chunks)"),
        Outcome::Unchanged { name } => println!("unchanged  {name}"),
        Outcome::Skipped { path } => {
            println!("skipped    {} (not a document type)", path.display())
        }
        Outcome::Failed { path, reason } => eprintln!("error: {}: {reason}", path.display()),
    })?;
    println!(
        "{} added, {} replaced, {} unchanged, {} failed, {} chunks in {:.1} s",
        summary.added,
        summary.replaced,
        summary.unchanged,
        summary.failed,
        summary.chunks,
        start.elapsed().as_secs_f64()
    );
    if summary.failed > 0 {
        anyhow::bail!(
            "{} file(s) could not be indexed (named above); the rest are in",
            summary.failed
        );
    }
    Ok(())
}

fn list(index: &DocIndex, json: bool) -> anyhow::Result<()> {
    for d in index.list()? {
        if json {
            println!("{}", serde_json::to_string(&d)?);
        } else {
            println!(
                "{:<40} {:>5} chunks  sha256 {}",
                d.name,
                d.chunks,
                &d.sha256[..12.min(d.sha256.len())]
            );
        }
    }
    Ok(())
}

fn remove(index: &DocIndex, names: &[String]) -> anyhow::Result<()> {
    let present: std::collections::BTreeSet<String> =
        index.list()?.into_iter().map(|d| d.name).collect();
    let mut missing = Vec::new();
    // an index with documents records its embedding model; one without has nothing to remove
    let Some(id) = index.embedder()? else {
        anyhow::bail!("not in the index: {} (see `docs list`)", names.join(", "));
    };
    let mut writer = index.writer(&id)?;
    for name in names {
        if !present.contains(name) {
            missing.push(name.as_str());
            continue;
        }
        writer
            .remove(name)
            .with_context(|| format!("removing {name}"))?;
        println!("removed    {name}");
    }
    if !missing.is_empty() {
        anyhow::bail!("not in the index: {} (see `docs list`)", missing.join(", "));
    }
    Ok(())
}

fn search(
    index: &DocIndex,
    embedder: Option<&Embedder>,
    k: usize,
    json: bool,
    mode: Mode,
    query: &str,
) -> anyhow::Result<()> {
    let q = match embedder {
        Some(e) => Some(e.embed(&[query])?.remove(0)),
        None => None,
    };
    let hits = index.search(query, q.as_deref(), k, mode)?;
    for (i, h) in hits.iter().enumerate() {
        if json {
            println!("{}", serde_json::to_string(h)?);
            continue;
        }
        let page = h.page.map(|p| format!(" p.{p}")).unwrap_or_default();
        println!(
            "[{}] {} §{}{page}  (score {:.2})",
            i + 1,
            h.doc,
            h.section,
            h.score
        );
        for line in h.text.lines() {
            println!("    {line}");
        }
    }
    if hits.is_empty() && !json {
        println!("no passage matches");
    }
    Ok(())
}

fn read_questions(path: &std::path::Path) -> anyhow::Result<Vec<fieldllmd::docs::eval::Question>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let questions = fieldllmd::docs::eval::parse(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    anyhow::ensure!(!questions.is_empty(), "{}: no questions", path.display());
    Ok(questions)
}

fn eval(
    index: &DocIndex,
    embedder: &Embedder,
    questions: &[fieldllmd::docs::eval::Question],
    json: bool,
) -> anyhow::Result<()> {
    use fieldllmd::docs::eval;
    let texts: Vec<&str> = questions.iter().map(|q| q.q.as_str()).collect();
    let vectors = embedder.embed(&texts)?;
    for mode in [Mode::Bm25, Mode::Vector, Mode::Hybrid] {
        let mut ranks = Vec::with_capacity(questions.len());
        for (q, v) in questions.iter().zip(&vectors) {
            let hits = index.search(&q.q, Some(v), eval::DEPTH, mode)?;
            let rank = q.rank(&hits);
            if rank != Some(1) {
                tracing::info!(?mode, question = %q.q, ?rank, first = ?hits.first().map(|h| (&h.doc, &h.section)), "not first");
            }
            ranks.push(rank);
        }
        let s = eval::score(&ranks);
        let name = format!("{mode:?}").to_lowercase();
        if json {
            println!(
                "{}",
                serde_json::json!({"mode": name, "questions": s.questions, "hit1": s.hit1, "hit3": s.hit3, "mrr": s.mrr})
            );
        } else {
            println!(
                "{name:<7} {} questions  hit@1 {:.3}  hit@3 {:.3}  MRR {:.3}",
                s.questions, s.hit1, s.hit3, s.mrr
            );
        }
    }
    Ok(())
}
