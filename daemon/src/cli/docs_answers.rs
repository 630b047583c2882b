//! `fieldllmd docs eval --answers`: how well grounded answers state what the documents say,
//! for each way of putting the passages to the model (DESIGN.md section 10: measured, not
//! assumed). Per question with a `fact`: does the model's answer state it; does the quoted key
//! sentence; do the passages at all (the ceiling retrieval leaves).

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use fieldllm_engine::{GenerateParams, Model, Session, generate};
use fieldllmd::docs::eval::{Question, states};
use fieldllmd::docs::ground::{self, Grounder, Grounding, Style};

/// One configuration's figures.
#[derive(Debug, serde::Serialize)]
pub struct AnswerScores {
    style: Style,
    passages: usize,
    questions: usize,
    /// Share of answers that state the fact.
    answer_states_fact: f64,
    /// Share of key sentences that state it (what a technician sees without the model).
    key_sentence_states_fact: f64,
    /// Share where the answer or the key sentence printed under it states it: what the
    /// technician reads.
    shown_states_fact: f64,
    /// Share where some passage in the prompt states it.
    passages_state_fact: f64,
    mean_prompt_tokens: f64,
    mean_first_token_ms: f64,
}

/// Runs every question with a fact through each (style, passage count).
pub fn run(
    model: &Arc<Model>,
    grounder: &Grounder,
    questions: &[Question],
    styles: &[Style],
    passages: &[usize],
    max_tokens: usize,
) -> anyhow::Result<Vec<AnswerScores>> {
    let with_fact: Vec<&Question> = questions.iter().filter(|q| q.fact.is_some()).collect();
    anyhow::ensure!(
        !with_fact.is_empty(),
        "no question has a \"fact\" to check answers by"
    );
    let grounded: Vec<Grounding> = with_fact
        .iter()
        .map(|q| grounder.ground(&q.q))
        .collect::<Result<_, _>>()?;
    let params = GenerateParams {
        max_tokens,
        ..GenerateParams::default()
    };
    let mut out = Vec::new();
    for &style in styles {
        for &n in passages {
            let mut s = AnswerScores {
                style,
                passages: n,
                questions: with_fact.len(),
                answer_states_fact: 0.0,
                key_sentence_states_fact: 0.0,
                shown_states_fact: 0.0,
                passages_state_fact: 0.0,
                mean_prompt_tokens: 0.0,
                mean_first_token_ms: 0.0,
            };
            for (q, g) in with_fact.iter().zip(&grounded) {
                let fact = q.fact.as_deref().unwrap_or_default();
                let Grounding::Covered {
                    sources,
                    key_sentence,
                } = g
                else {
                    continue;
                };
                let top: Vec<_> = sources.iter().take(n).cloned().collect();
                let p = ground::prompt(model, &q.q, &top, key_sentence, style, max_tokens)?;
                let mut session = Session::new(model)?;
                let cancel = AtomicBool::new(false);
                let o = generate(&mut session, &p.ids, &params, &cancel, &mut |_| {})?;
                tracing::info!(?style, n, question = %q.q, fact, answer = %o.text, "answer");
                s.answer_states_fact += f64::from(u8::from(states(&o.text, fact)));
                s.key_sentence_states_fact += f64::from(u8::from(states(key_sentence, fact)));
                s.shown_states_fact += f64::from(u8::from(
                    states(&o.text, fact) || states(key_sentence, fact),
                ));
                s.passages_state_fact +=
                    f64::from(u8::from(p.sources.iter().any(|x| states(&x.text, fact))));
                s.mean_prompt_tokens += p.ids.len() as f64;
                s.mean_first_token_ms += o.timings.first_token_ms;
            }
            let count = with_fact.len() as f64;
            s.answer_states_fact /= count;
            s.key_sentence_states_fact /= count;
            s.shown_states_fact /= count;
            s.passages_state_fact /= count;
            s.mean_prompt_tokens /= count;
            s.mean_first_token_ms /= count;
            out.push(s);
        }
    }
    Ok(out)
}
