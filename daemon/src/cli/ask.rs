//! `fieldllmd ask`: one question, the answer streamed to stdout.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use anyhow::Context;
use fieldllm_engine::chat::Message;
use fieldllm_engine::generate::{Candidate, DEFAULT_MAX_TOKENS, Event};
use fieldllm_engine::{
    GenerateParams, LoadOptions, Model, Outcome, SamplingParams, Session, generate,
};
use fieldllmd::docs::ground::{self, Grounding, Settings, Source, Style};
use serde_json::json;

use super::ModelArg;

/// Flags of `ask` (DESIGN.md section 9).
#[derive(Debug, clap::Args)]
pub struct AskArgs {
    /// The question.
    question: String,
    #[command(flatten)]
    model: ModelArg,
    /// System message (default: the chat template's own).
    #[arg(long)]
    system: Option<String>,
    /// Most tokens in the answer [default: 512; with --via, the daemon's limit].
    #[arg(long)]
    max_tokens: Option<usize>,
    /// 0 = greedy.
    #[arg(long, default_value_t = SamplingParams::default().temperature, allow_negative_numbers = true)]
    temperature: f32,
    /// Nucleus sampling mass (1 = off).
    #[arg(long, default_value_t = SamplingParams::default().top_p, allow_negative_numbers = true)]
    top_p: f32,
    /// Keep the K most likely tokens (0 = off).
    #[arg(long, default_value_t = SamplingParams::default().top_k)]
    top_k: usize,
    /// Drop tokens below this fraction of the best one's probability.
    #[arg(long, default_value_t = SamplingParams::default().min_p, allow_negative_numbers = true)]
    min_p: f32,
    /// Repetition penalty (1 = off).
    #[arg(long, default_value_t = SamplingParams::default().repeat_penalty, allow_negative_numbers = true)]
    repeat_penalty: f32,
    /// Random seed (same seed, same answer).
    #[arg(long, default_value_t = SamplingParams::default().seed)]
    seed: u64,
    /// Stop when this text appears (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Threads for the model.
    #[arg(long, default_value_t = fieldllmd::config::ModelSection::default().threads)]
    threads: usize,
    /// Print JSON lines with the top-K candidates and log-probabilities of each token.
    #[arg(long, value_name = "K")]
    logprobs: Option<usize>,
    /// Print timings to stderr at the end.
    #[arg(long)]
    stats: bool,
    /// Ask a running daemon through this MQTT broker (mqtt://HOST:PORT) instead of loading
    /// the model here.
    #[arg(long, value_name = "URL")]
    via: Option<String>,
    /// With --via: the appliance's node id (default: the fleet topic, any appliance answers).
    #[arg(long, requires = "via")]
    node: Option<String>,
    /// With --via: the daemons' topic prefix.
    #[arg(long, default_value = "fieldllm/v1", requires = "via")]
    prefix: String,
    /// Answer from the document index (`fieldllmd docs add`; with --via, the daemon's), then
    /// list the sources used.
    #[arg(long, conflicts_with = "system")]
    docs: bool,
    /// With --docs: the index directory [default: as `docs`].
    #[arg(long, value_name = "DIR", requires = "docs", conflicts_with = "via")]
    index: Option<PathBuf>,
    /// With --docs: the sentence-embedding model package [default: as `docs`].
    #[arg(long, value_name = "DIR", requires = "docs", conflicts_with = "via")]
    embedder: Option<PathBuf>,
    /// With --docs: passages in the prompt, at most.
    #[arg(long, default_value_t = Settings::default().passages, requires = "docs", conflicts_with = "via")]
    passages: usize,
    /// With --docs: how the passages are put to the model.
    #[arg(long, value_enum, default_value_t = Settings::default().style, requires = "docs", conflicts_with = "via")]
    docs_style: Style,
}

fn cand_json(c: &Candidate) -> serde_json::Value {
    json!({"id": c.id, "token": c.token, "logprob": c.logprob})
}

pub fn run(a: AskArgs) -> anyhow::Result<()> {
    let params = GenerateParams {
        sampling: SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            min_p: a.min_p,
            repeat_penalty: a.repeat_penalty,
            seed: a.seed,
            ..SamplingParams::default()
        },
        max_tokens: a.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
        stop: a.stop.clone(),
        logprobs: a.logprobs.unwrap_or(0),
    };
    // refuse bad flags before spending a second on loading the model
    params.validate()?;
    if a.logprobs == Some(0) {
        anyhow::bail!("--logprobs must be at least 1");
    }
    if a.question.trim().is_empty() {
        anyhow::bail!("empty question");
    }
    if let Some(url) = &a.via {
        let mut messages = Vec::new();
        if let Some(s) = &a.system {
            messages.push(fieldllmd::proto::v1::Message {
                role: "system".into(),
                content: s.clone(),
            });
        }
        messages.push(fieldllmd::proto::v1::Message {
            role: "user".into(),
            content: a.question.clone(),
        });
        let req = fieldllmd::proto::Request {
            id: format!(
                "ask-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis())
                    .unwrap_or(0)
            ),
            messages,
            max_tokens: a.max_tokens.map(|n| n as u32),
            temperature: Some(a.temperature),
            top_p: Some(a.top_p),
            top_k: Some(a.top_k as u32),
            min_p: Some(a.min_p),
            seed: Some(a.seed),
            stop: a.stop.clone(),
            logprobs: a.logprobs.unwrap_or(0) as u32,
            docs: a.docs.then_some(true),
            ..Default::default()
        };
        return super::via::ask(url, &a.prefix, a.node.as_deref(), req, a.logprobs.is_some());
    }
    let grounding = if a.docs {
        let grounder = open_grounder(&a)?;
        match grounder.ground(&a.question)? {
            Grounding::NotCovered { best } => {
                tracing::info!(?best, "no passage reached the threshold");
                println!("{}", ground::NOT_COVERED);
                return Ok(());
            }
            covered => Some(covered),
        }
    } else {
        None
    };
    let model = load_model(&a)?;
    let (ids, sources, key) = match grounding {
        Some(Grounding::Covered {
            sources,
            key_sentence,
        }) => {
            let p = ground::prompt(
                &model,
                &a.question,
                &sources,
                &key_sentence,
                a.docs_style,
                params.max_tokens.min(model.context_length / 2),
            )?;
            (p.ids, Some(p.sources), key_sentence)
        }
        _ => {
            let mut messages = Vec::new();
            if let Some(s) = &a.system {
                messages.push(Message::new("system", s.clone()));
            }
            messages.push(Message::new("user", a.question.clone()));
            (model.chat_prompt(&messages)?, None, String::new())
        }
    };
    let outcome = stream(&model, &ids, &params, a.logprobs.is_some())?;
    if let Some(sources) = sources {
        print_sources(&sources, &key, a.logprobs.is_some())?;
    }
    if a.stats {
        let t = &outcome.timings;
        eprintln!(
            "load {:.0} ms | prompt {} tok {:.1} tok/s | first token {:.0} ms | {} tokens {:.1} tok/s | finish {:?}",
            model.load_time.as_secs_f64() * 1e3,
            outcome.prompt_tokens,
            t.prompt_tok_s,
            t.first_token_ms,
            outcome.tokens.len(),
            t.decode_tok_s,
            outcome.finish
        );
    }
    Ok(())
}

fn load_model(a: &AskArgs) -> anyhow::Result<std::sync::Arc<Model>> {
    let dir = a.model.dir()?;
    Model::load(
        &dir,
        &LoadOptions {
            verify: true,
            threads: a.threads,
            context: None,
            activations: Default::default(),
            kv_cache: Default::default(),
        },
    )
    .with_context(|| format!("loading model {}", dir.display()))
}

/// The document index and embedding model `--docs` answers from.
fn open_grounder(a: &AskArgs) -> anyhow::Result<ground::Grounder> {
    let settings = Settings {
        passages: a.passages,
        style: a.docs_style,
        ..Settings::default()
    };
    let index_dir = fieldllmd::paths::default_docs_index(a.index.clone());
    let idx = fieldllmd::docs::index::DocIndex::open(&index_dir)?;
    if idx.list()?.is_empty() {
        anyhow::bail!(
            "the document index {} holds no documents: add them with `fieldllmd docs add`",
            index_dir.display()
        );
    }
    let dir = fieldllmd::paths::default_embedder_dir(a.embedder.clone());
    let e = fieldllm_engine::embed::Embedder::load(&dir, a.threads)
        .with_context(|| format!("loading the embedding model {}", dir.display()))?;
    Ok(ground::Grounder::new(idx, e, settings)?)
}

/// The sources after the answer, and the best passage's sentence nearest the question: a small
/// model often phrases an answer without the fact, so the technician reads it from the manual.
fn print_sources(sources: &[Source], key: &str, json_lines: bool) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if json_lines {
        writeln!(
            out,
            "{}",
            json!({ "sources": sources, "key_sentence": key })
        )?;
    } else {
        if !key.is_empty() {
            writeln!(out, "From [1]: \"{key}\"")?;
        }
        writeln!(out, "Sources:")?;
        for s in sources {
            writeln!(out, "{}", s.line())?;
        }
    }
    out.flush()?;
    Ok(())
}

/// Generates the answer to `ids`, streamed to stdout (text, or JSON lines with log-probs).
fn stream(
    model: &std::sync::Arc<Model>,
    ids: &[u32],
    params: &GenerateParams,
    json_lines: bool,
) -> anyhow::Result<Outcome> {
    let mut session = Session::new(model)?;
    let cancel = AtomicBool::new(false);
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut write_err = None;
    let outcome = generate(&mut session, ids, params, &cancel, &mut |ev| {
        let r = match ev {
            Event::Token { id, text, logprobs } if json_lines => {
                let (chosen, top) = logprobs.unwrap_or_else(|| {
                    (
                        Candidate {
                            id,
                            token: String::new(),
                            logprob: f32::NAN,
                        },
                        Vec::new(),
                    )
                });
                let line = json!({
                    "id": id, "token": chosen.token, "text": text, "logprob": chosen.logprob,
                    "top_logprobs": top.iter().map(cand_json).collect::<Vec<_>>(),
                });
                writeln!(out, "{line}")
            }
            Event::Token { text, .. } => write!(out, "{text}").and_then(|_| out.flush()),
            Event::Tail(text) if json_lines => writeln!(out, "{}", json!({"text": text})),
            Event::Tail(text) => write!(out, "{text}").and_then(|_| out.flush()),
        };
        if let Err(e) = r {
            write_err.get_or_insert(e);
        }
    })?;
    if let Some(e) = write_err {
        return Err(e).context("writing the answer to stdout");
    }
    if json_lines {
        let done = json!({
            "finish_reason": outcome.finish, "text": outcome.text,
            "usage": {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.tokens.len()},
            "timings": outcome.timings,
        });
        writeln!(out, "{done}")?;
    } else {
        writeln!(out)?;
    }
    out.flush()?;
    Ok(outcome)
}
