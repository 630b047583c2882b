//! Grounded answers: the passages that answer a question, the prompt that puts them before a
//! small model, and the sources an answer cites.
//!
//! The decisions here are plain functions (what is relevant, what fits, how the prompt reads);
//! [`Grounder`] only fetches: the question's embedding and the index's hits.

use fieldllm_engine::chat::Message;
use fieldllm_engine::embed::Embedder;
use serde::Serialize;

use super::index::{DocIndex, Hit, IndexError, Mode};

/// Defaults of grounding; `[docs]` in the config overrides them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    /// Passages put in the prompt, at most.
    pub passages: usize,
    /// Cosine similarity the best passage must reach for the documents to be said to cover
    /// the question. Measured on tests/corpus: off-topic questions ("What is the capital of
    /// France?", "How do I bake bread?", a car's wiper) scored at most 0.23, the 32 questions
    /// the Markdown and text documents answer at least 0.30.
    pub min_similarity: f32,
    /// How the prompt presents them.
    pub style: Style,
}

impl Default for Settings {
    fn default() -> Self {
        // measured with `docs eval --answers` over tests/corpus (SmolLM2-135M, greedy, 64
        // tokens): one passage best first, 25% of answers state the question's fact, against
        // 12.5-22.5% with three passages in any order or with the key sentence quoted, at less
        // than half the prompt. The key sentence printed under the answer states it for 55%.
        Settings {
            passages: 1,
            min_similarity: 0.26,
            style: Style::Passages,
        }
    }
}

/// How the passages are put to the model (measured in `fieldllmd bench --docs-answers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Style {
    /// The passages, best first, then the question.
    Passages,
    /// The passages, best last (nearest the question), then the question.
    PassagesBestLast,
    /// The best passage's most relevant sentence quoted first, then the passages.
    KeySentence,
}

/// A passage an answer is grounded on, numbered as the answer cites it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Source {
    /// 1-based number, as in "[1]".
    pub n: usize,
    /// Document name.
    pub doc: String,
    /// Section title path.
    pub section: String,
    /// Page, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub page: Option<u32>,
    /// The ranking's score.
    pub score: f32,
    /// Cosine similarity with the question.
    pub similarity: f32,
    /// The passage.
    pub text: String,
}

impl Source {
    /// `[1] hpu-220-service-manual.md §4.1 Main relief valve RV-1 p.3`: the document, the
    /// innermost section title and the page.
    pub fn line(&self) -> String {
        let mut s = format!("[{}] {}", self.n, self.doc);
        let title = innermost(&self.section);
        if !title.is_empty() {
            s.push_str(" §");
            s.push_str(title);
        }
        if let Some(p) = self.page {
            s.push_str(&format!(" p.{p}"));
        }
        s
    }
}

/// The last title of a section path ("A › 4 Valves › 4.1 Main relief valve" -> "4.1 Main
/// relief valve").
pub fn innermost(section: &str) -> &str {
    section.rsplit(" › ").next().unwrap_or(section).trim()
}

/// What retrieval found for a question.
#[derive(Debug, Clone, PartialEq)]
pub enum Grounding {
    /// Relevant passages, best first, and the sentence of the best one nearest the question.
    Covered {
        /// The passages.
        sources: Vec<Source>,
        /// The best passage's most relevant sentence.
        key_sentence: String,
    },
    /// Nothing reached [`Settings::min_similarity`]: the documents do not cover it.
    NotCovered {
        /// The best similarity seen (for logs), if the index has any passage.
        best: Option<f32>,
    },
}

/// What a grounded answer cites: the passages in its prompt, [1] first, and the sentence of
/// [1] nearest the question.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Citations {
    /// The passages, as they went into the prompt (trimmed to fit).
    pub sources: Vec<Source>,
    /// The best passage's most relevant sentence.
    pub key_sentence: String,
}

/// The words said when the documents do not cover a question (no model answer is made up).
pub const NOT_COVERED: &str =
    "The installed documents do not cover this question, so I cannot answer it from them.";

/// Decides from ranked hits (each with its similarity) whether the documents cover the
/// question, and keeps the `settings.passages` best of those above the threshold.
pub fn select(hits: &[Hit], settings: &Settings) -> Vec<Source> {
    let best = hits
        .iter()
        .filter_map(|h| h.similarity)
        .fold(f32::NEG_INFINITY, f32::max);
    if best < settings.min_similarity {
        return Vec::new();
    }
    // a passage below the threshold is noise beside the ones above it
    hits.iter()
        .filter(|h| h.similarity.unwrap_or(0.0) >= settings.min_similarity)
        .take(settings.passages.max(1))
        .enumerate()
        .map(|(i, h)| Source {
            n: i + 1,
            doc: h.doc.clone(),
            section: h.section.clone(),
            page: h.page,
            score: h.score,
            similarity: h.similarity.unwrap_or(0.0),
            text: h.text.clone(),
        })
        .collect()
}

/// Sentences of a passage: cut after `.`, `!` or `?` followed by white space (not after a
/// list item's number), and before a line that starts a list item or table row.
pub fn sentences(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.is_empty() || starts_item(t) {
            push_sentence(&mut out, &mut cur);
        }
        if t.is_empty() {
            continue;
        }
        if !cur.is_empty() {
            cur.push(' ');
        }
        let mut chars = t.chars().peekable();
        while let Some(c) = chars.next() {
            cur.push(c);
            let ends =
                matches!(c, '.' | '!' | '?') && chars.peek().is_none_or(|n| n.is_whitespace());
            if ends && !is_item_number(&cur) {
                push_sentence(&mut out, &mut cur);
            }
        }
    }
    push_sentence(&mut out, &mut cur);
    out
}

fn starts_item(line: &str) -> bool {
    let digits = line.chars().take_while(char::is_ascii_digit).count();
    line.starts_with(['-', '*', '|']) || (digits > 0 && line[digits..].starts_with(['.', ')']))
}

/// Whether the `.` that ends `cur` is not a sentence's end: a list item's number ("2.") or an
/// abbreviation manuals use ("part no.", "e.g.", "approx.").
fn is_item_number(cur: &str) -> bool {
    const ABBREVIATIONS: [&str; 8] = ["no", "nos", "e.g", "i.e", "approx", "fig", "min", "max"];
    let t = cur.trim().trim_end_matches('.');
    let last = t
        .rsplit(|c: char| c.is_whitespace() || c == '(')
        .next()
        .unwrap_or("");
    (!t.is_empty() && t.chars().all(|c| c.is_ascii_digit()))
        || ABBREVIATIONS.contains(&last.to_ascii_lowercase().as_str())
}

fn push_sentence(out: &mut Vec<String>, cur: &mut String) {
    let s = cur.trim();
    if s.chars().filter(|c| c.is_alphanumeric()).count() >= 3 {
        out.push(s.to_string());
    }
    cur.clear();
}

/// The chat messages of a grounded question: an instruction, the passages (as `style` says),
/// the question last and whole. `passages` are those that fit the prompt (see [`fit`]).
pub fn messages(
    question: &str,
    sources: &[Source],
    key_sentence: &str,
    style: Style,
) -> Vec<Message> {
    let system = "You are a maintenance assistant. Answer the technician's question using only \
                  the manual excerpts given. Give the exact values, part numbers and steps they \
                  state. If they do not contain the answer, say so.";
    let excerpt = |s: &Source| format!("{}\n{}", s.line(), s.text.trim());
    let mut ordered: Vec<&Source> = sources.iter().collect();
    if style == Style::PassagesBestLast {
        ordered.reverse();
    }
    let mut user = String::from("Manual excerpts:\n\n");
    for s in &ordered {
        user.push_str(&excerpt(s));
        user.push_str("\n\n");
    }
    if let (Style::KeySentence, false, Some(best)) =
        (style, key_sentence.is_empty(), sources.first())
    {
        user.push_str(&format!(
            "The most relevant line, from {}: \"{}\"\n\n",
            best.line(),
            key_sentence
        ));
    }
    user.push_str("Question: ");
    user.push_str(question.trim());
    vec![
        Message::new("system", system.to_string()),
        Message::new("user", user),
    ]
}

/// A grounded question (`grounded`: what [`messages`] made) after a conversation's earlier
/// turns: one system message (the grounding instruction, then the conversation's own), the
/// turns, then the grounded question. The passages go with the last question only: earlier
/// answers stay in the conversation, their passages do not.
pub fn with_history(history: &[Message], grounded: &[Message]) -> Vec<Message> {
    let mut system: Vec<&str> = grounded
        .iter()
        .chain(history)
        .filter(|m| m.role == "system")
        .map(|m| m.content.as_str())
        .collect();
    system.dedup();
    let mut out = Vec::with_capacity(history.len() + 2);
    if !system.is_empty() {
        out.push(Message::new("system", system.join("\n\n")));
    }
    out.extend(history.iter().filter(|m| m.role != "system").cloned());
    out.extend(grounded.iter().filter(|m| m.role != "system").cloned());
    out
}

/// The longest prefix of `sources` (best first) whose prompt fits `budget` tokens as
/// `count` measures the whole prompt: passages are dropped, then the last one cut, never the
/// question. `None` when even the question alone does not fit.
pub fn fit(
    question: &str,
    sources: &[Source],
    key_sentence: &str,
    style: Style,
    budget: usize,
    count: &dyn Fn(&[Message]) -> usize,
) -> Option<Vec<Source>> {
    if count(&messages(question, &[], "", style)) > budget {
        return None;
    }
    let mut kept: Vec<Source> = Vec::new();
    for s in sources {
        let mut with = kept.clone();
        with.push(s.clone());
        if count(&messages(question, &with, key_sentence, style)) <= budget {
            kept = with;
            continue;
        }
        // the passage does not fit whole: keep as much of its start as does (by halving)
        let mut text: Vec<char> = s.text.chars().collect();
        while text.len() > 80 {
            text.truncate(text.len() / 2);
            let mut cut = s.clone();
            cut.text = text.iter().collect::<String>() + " …";
            let mut with = kept.clone();
            with.push(cut.clone());
            if count(&messages(question, &with, key_sentence, style)) <= budget {
                kept = with;
                break;
            }
        }
        break;
    }
    Some(kept)
}

/// A grounded question as the model takes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    /// Token ids of the whole chat prompt.
    pub ids: Vec<u32>,
    /// The sources in it (passages trimmed to fit), as the answer cites them.
    pub sources: Vec<Source>,
}

/// The prompt ids for `question` grounded on `sources`, passages trimmed so that the prompt
/// and `reserve` answer tokens fit `model`'s context.
pub fn prompt(
    model: &fieldllm_engine::Model,
    question: &str,
    sources: &[Source],
    key_sentence: &str,
    style: Style,
    reserve: usize,
) -> Result<Prompt, fieldllm_engine::EngineError> {
    let budget = model.context_length.saturating_sub(reserve);
    let count = |m: &[Message]| model.chat_prompt(m).map_or(usize::MAX, |ids| ids.len());
    let kept = fit(question, sources, key_sentence, style, budget, &count).ok_or(
        fieldllm_engine::EngineError::PromptTooLong {
            tokens: count(&messages(question, &[], "", style)),
            context: budget,
        },
    )?;
    let ids = model.chat_prompt(&messages(question, &kept, key_sentence, style))?;
    Ok(Prompt { ids, sources: kept })
}

/// Retrieval for grounded answers: the index and the embedding model its vectors come from.
pub struct Grounder {
    index: DocIndex,
    embedder: Embedder,
    settings: Settings,
}

impl std::fmt::Debug for Grounder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grounder")
            .field("index", &self.index)
            .field("settings", &self.settings)
            .finish()
    }
}

/// Why grounding failed.
#[derive(Debug, thiserror::Error)]
pub enum GroundError {
    /// The index could not be read.
    #[error(transparent)]
    Index(#[from] IndexError),
    /// The embedding model failed.
    #[error("embedding the question: {0}")]
    Embed(#[from] fieldllm_engine::EngineError),
}

impl Grounder {
    /// A grounder over `index`, whose vectors must come from `embedder`.
    pub fn new(
        index: DocIndex,
        embedder: Embedder,
        settings: Settings,
    ) -> Result<Grounder, GroundError> {
        index.check_embedder(&super::embedder_id(&embedder))?;
        Ok(Grounder {
            index,
            embedder,
            settings,
        })
    }

    /// Its settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The passages for `question`, or that the documents do not cover it. Sees what
    /// `docs add` committed since the last call.
    pub fn ground(&self, question: &str) -> Result<Grounding, GroundError> {
        let q = self.embedder.embed(&[question])?.remove(0);
        let depth = self.settings.passages.max(1) * 2;
        let hits = self.index.search(question, Some(&q), depth, Mode::Hybrid)?;
        let sources = select(&hits, &self.settings);
        let Some(best) = sources.first() else {
            let best = hits.iter().filter_map(|h| h.similarity).reduce(f32::max);
            return Ok(Grounding::NotCovered { best });
        };
        // the best passage's sentence nearest the question (measured against choosing among
        // all passages' sentences, with or without their section title: 0.55 of the 40
        // questions' facts either way, within one question; adding the share of the
        // question's content words a sentence holds, weight 0.05-0.4, or a bonus for a
        // sentence with figures, 0.05-0.2: 0.55 at every weight. The misses are sentences
        // that state the value without the question's words, "RV-1 limits the system
        // pressure to 230 bar": a question-answering model's job, not a similarity's)
        let candidates = sentences(&best.text);
        let texts = &candidates;
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let vectors = self.embedder.embed(&refs)?;
        let key_sentence = candidates
            .iter()
            .zip(&vectors)
            .map(|(s, v)| (s, v.iter().zip(&q).map(|(a, b)| a * b).sum::<f32>()))
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(s, _)| s.clone())
            .unwrap_or_default();
        Ok(Grounding::Covered {
            sources,
            key_sentence,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn hit(doc: &str, section: &str, sim: f32, text: &str) -> Hit {
        Hit {
            doc: doc.into(),
            section: section.into(),
            page: None,
            score: 0.03,
            text: text.into(),
            similarity: Some(sim),
        }
    }

    #[test]
    fn below_the_threshold_nothing_is_covered() {
        let s = Settings {
            passages: 3,
            ..Settings::default()
        };
        assert!(select(&[hit("a.md", "A", 0.2, "x")], &s).is_empty());
        let got = select(
            &[
                hit(
                    "a.md",
                    "M › 4 Valves › 4.1 Main relief valve RV-1",
                    0.6,
                    "x",
                ),
                hit("b.md", "B", 0.1, "y"),
                hit("c.pdf", "5 Fault codes", 0.4, "z"),
            ],
            &s,
        );
        let lines: Vec<String> = got.iter().map(Source::line).collect();
        assert_eq!(
            lines,
            [
                "[1] a.md §4.1 Main relief valve RV-1",
                "[2] c.pdf §5 Fault codes"
            ]
        );
    }

    #[test]
    fn sentences_split_on_stops_and_list_items() {
        let t = "Check first, in this order:\n1. the oil level at LG-1;\n2. the strainer.\nRV-1 is set to 230 bar. Never above 235 bar. Replace the cartridge (part no. 220-0630).";
        assert_eq!(
            sentences(t),
            [
                "Check first, in this order:",
                "1. the oil level at LG-1;",
                "2. the strainer.",
                "RV-1 is set to 230 bar.",
                "Never above 235 bar.",
                "Replace the cartridge (part no. 220-0630)."
            ]
        );
    }

    #[test]
    fn the_question_is_never_cut_and_passages_are_trimmed_to_fit() {
        let sources: Vec<Source> = (1..=3)
            .map(|n| Source {
                n,
                doc: format!("d{n}.md"),
                section: "S".into(),
                page: None,
                score: 0.0,
                similarity: 0.5,
                text: "word ".repeat(200),
            })
            .collect();
        // one "token" per character: a crude but monotone count
        let count = |m: &[Message]| m.iter().map(|m| m.content.chars().count()).sum::<usize>();
        let q = "What torque for the lock nut?";
        let alone = count(&messages(q, &[], "", Style::Passages));
        let kept = fit(q, &sources, "", Style::Passages, alone + 1500, &count).unwrap();
        assert_eq!(kept.len(), 2, "one whole passage and one cut");
        assert!(kept[1].text.ends_with('…'));
        let all = messages(q, &kept, "", Style::Passages);
        assert!(count(&all) <= alone + 1500);
        assert!(
            all[1].content.ends_with(q),
            "the question is last and whole"
        );
        assert!(fit(q, &sources, "", Style::Passages, alone - 1, &count).is_none());
        assert_eq!(
            fit(q, &sources, "", Style::Passages, alone + 5, &count).unwrap(),
            vec![]
        );
    }

    #[test]
    fn styles_order_and_quote() {
        let s = |n: usize, text: &str| Source {
            n,
            doc: "m.md".into(),
            section: format!("{n} Part"),
            page: Some(n as u32),
            score: 0.0,
            similarity: 0.5,
            text: text.into(),
        };
        let src = [s(1, "BEST passage."), s(2, "second passage.")];
        let u = |style| messages("Q?", &src, "BEST", style)[1].content.clone();
        let first = u(Style::Passages);
        assert!(first.find("BEST").unwrap() < first.find("second").unwrap());
        let last = u(Style::PassagesBestLast);
        assert!(last.find("BEST").unwrap() > last.find("second").unwrap());
        let key = u(Style::KeySentence);
        assert!(
            key.contains("The most relevant line, from [1] m.md §1 Part p.1: \"BEST\""),
            "{key}"
        );
        assert!(key.ends_with("Question: Q?"));
    }
}
