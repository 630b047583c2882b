//! Retrieval quality over a question set: hit@1, hit@3 and mean reciprocal rank (over the top
//! ten) of each ranking, so a change to chunking, analysis or fusion is measured, not assumed.
//!
//! A question set is JSON lines: `{"q": question, "doc": document name, "section": text the
//! expected chunk's section path contains}`.

use serde::{Deserialize, Serialize};

use super::index::Hit;

/// How deep a ranking is read for the reciprocal rank.
pub const DEPTH: usize = 10;

/// One question and where its answer is.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Question {
    /// The question, as a technician would ask it.
    pub q: String,
    /// The document that answers it.
    pub doc: String,
    /// Part of the answering chunk's section path ("5.1 Pump noise").
    pub section: String,
    /// A fact a right answer states ("230 bar"), for measuring grounded answers.
    #[serde(default)]
    pub fact: Option<String>,
}

impl Question {
    /// Whether `hit` is the passage that answers this question.
    pub fn answered_by(&self, hit: &Hit) -> bool {
        hit.doc == self.doc && hit.section.contains(&self.section)
    }

    /// 1-based rank of the first answering hit, if any.
    pub fn rank(&self, hits: &[Hit]) -> Option<usize> {
        hits.iter().position(|h| self.answered_by(h)).map(|i| i + 1)
    }
}

/// Whether `text` states `fact`: case and white space ignored ("hand\nprimer" states "hand
/// primer").
pub fn states(text: &str, fact: &str) -> bool {
    let norm = |s: &str| {
        s.split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .to_lowercase()
    };
    norm(text).contains(&norm(fact))
}

/// Reads a question set; a bad line is an error naming its number.
pub fn parse(text: &str) -> Result<Vec<Question>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| format!("line {}: {e}", i + 1)))
        .collect()
}

/// The scores of one ranking over a question set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Scores {
    /// Questions.
    pub questions: usize,
    /// Share answered by the first hit.
    pub hit1: f64,
    /// Share answered within the first three.
    pub hit3: f64,
    /// Mean of 1/rank (0 when not in the first [`DEPTH`]).
    pub mrr: f64,
}

/// Scores from the rank each question's answer got (`None`: not within [`DEPTH`]).
pub fn score(ranks: &[Option<usize>]) -> Scores {
    let n = ranks.len().max(1) as f64;
    let within = |k: usize| ranks.iter().filter(|r| r.is_some_and(|r| r <= k)).count() as f64 / n;
    Scores {
        questions: ranks.len(),
        hit1: within(1),
        hit3: within(3),
        mrr: ranks
            .iter()
            .map(|r| r.filter(|r| *r <= DEPTH).map_or(0.0, |r| 1.0 / r as f64))
            .sum::<f64>()
            / n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_count_ranks() {
        let s = score(&[Some(1), Some(2), Some(4), None]);
        assert_eq!(s.questions, 4);
        assert!((s.hit1 - 0.25).abs() < 1e-12);
        assert!((s.hit3 - 0.5).abs() < 1e-12);
        assert!((s.mrr - (1.0 + 0.5 + 0.25) / 4.0).abs() < 1e-12);
        assert_eq!(score(&[Some(11)]).mrr, 0.0);
    }

    #[test]
    fn question_sets_parse_and_name_bad_lines() {
        let q = parse("{\"q\":\"a\",\"doc\":\"d.md\",\"section\":\"1\"}\n\n").unwrap();
        assert_eq!(q.len(), 1);
        let e = parse("{\"q\":\"a\",\"doc\":\"d.md\",\"section\":\"1\"}\n{\"q\":1}\n").unwrap_err();
        assert!(e.starts_with("line 2:"), "{e}");
    }
}
