//! Answers decoded together ([`Batcher`]): each answer's greedy tokens and logits are those it
//! gets alone, whatever runs beside it: batch 1 to 4, prompts of different lengths, answers
//! joining at different steps, on the tiny GGUFs and on SmolLM2's artifact.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};

use common::*;
use fieldllm_engine::import::import_gguf;
use fieldllm_engine::sampler::argmax;
use fieldllm_engine::{Batcher, LoadOptions, Model, Session};

/// Greedy decoding of `n` tokens after `prompt`; returns the tokens and the logits of each
/// step. `step_done` is told each step.
fn greedy(
    s: &mut Session,
    prompt: &[u32],
    n: usize,
    step_done: &dyn Fn(usize),
) -> (Vec<u32>, Vec<Vec<f32>>) {
    let never = AtomicBool::new(false);
    let mut logits = s.feed(prompt, &never).unwrap();
    let (mut tokens, mut all) = (vec![], vec![]);
    for i in 0..n {
        let id = argmax(&logits);
        tokens.push(id);
        all.push(logits);
        step_done(i);
        logits = s.feed(&[id], &never).unwrap();
    }
    (tokens, all)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Each prompt alone, then up to four of them at once in one batcher: answer `i` starts once
/// answer 0 has made `joins[i]` tokens (answer 0 waits until it has joined). Every answer's tokens must be its lone answer's, and
/// its logits within `bound` of them.
fn same_answers_batched(model: &Arc<Model>, prompts: &[Vec<u32>], n: usize, bound: f32) {
    let alone: Vec<_> = prompts
        .iter()
        .map(|p| greedy(&mut Session::new(model).unwrap(), p, n, &|_| ()))
        .collect();
    for k in 1..=prompts.len() {
        let batch = Batcher::new(model).unwrap();
        let joins = [0, 2, 5, 9];
        let progress = Arc::new(AtomicUsize::new(0));
        let joined = Arc::new(AtomicUsize::new(1));
        let start = Arc::new(Barrier::new(k));
        let results: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..k)
                .map(|i| {
                    let (batch, progress, start) = (batch.clone(), progress.clone(), start.clone());
                    let joined = joined.clone();
                    let prompt = &prompts[i];
                    scope.spawn(move || {
                        let mut s = batch.session().unwrap();
                        start.wait();
                        while progress.load(Ordering::Acquire) < joins[i] {
                            std::thread::yield_now();
                        }
                        let _answering = s.answering();
                        if i > 0 {
                            joined.fetch_add(1, Ordering::AcqRel);
                        }
                        let report = |step: usize| {
                            if i == 0 {
                                progress.store(step + 1, Ordering::Release);
                                // whoever joins at this step is answering before the next run
                                let due = joins[..k].iter().filter(|&&j| j <= step + 1).count();
                                while joined.load(Ordering::Acquire) < due {
                                    std::thread::yield_now();
                                }
                            }
                        };
                        greedy(&mut s, prompt, n, &report)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (i, ((tokens, logits), (want_tokens, want_logits))) in
            results.iter().zip(&alone).enumerate()
        {
            let worst = logits
                .iter()
                .zip(want_logits)
                .map(|(a, b)| max_abs_diff(a, b))
                .fold(0.0, f32::max);
            eprintln!("batch of {k}, answer {i}: logits differ by at most {worst:.3e}");
            assert_eq!(tokens, want_tokens, "batch of {k}, answer {i}: tokens");
            assert!(
                worst <= bound,
                "batch of {k}, answer {i}: logits differ by {worst}"
            );
        }
        let stats = batch.stats();
        eprintln!("batch of {k}: {stats:?}");
        if k > 1 {
            assert!(
                stats.entries > stats.runs,
                "batch of {k}: no run carried two answers ({stats:?})"
            );
        }
    }
}

fn tiny_artifact(tmp: &tempfile::TempDir, variant: &str) -> Arc<Model> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/build/tiny-gguf");
    let out = tmp.path().join(variant);
    import_gguf(&dir.join(format!("{variant}.gguf")), &out, None).unwrap();
    Model::load(
        &out,
        &LoadOptions {
            threads: 2,
            ..LoadOptions::default()
        },
    )
    .unwrap()
}

#[test]
fn tiny_models_answer_the_same_batched_or_alone() {
    let tmp = tempfile::tempdir().unwrap();
    for variant in ["tiny-blocks", "tiny-gqa-f32", "tiny-kquants"] {
        let model = tiny_artifact(&tmp, variant);
        let vocab = model.vocab as u32;
        let prompt = |len: usize, seed: u32| -> Vec<u32> {
            (0..len as u32)
                .map(|i| (i * 7 + seed * 13 + 1) % vocab)
                .collect()
        };
        let prompts = [prompt(5, 1), prompt(17, 2), prompt(40, 3), prompt(2, 4)];
        eprintln!("{variant}");
        same_answers_batched(&model, &prompts, 12, 0.0);
    }
}

#[test]
fn smollm2_answers_the_same_batched_or_alone() {
    let model = Model::load(
        &model_dir("smollm2-135m-instruct.gguf"),
        &LoadOptions {
            threads: 2,
            ..LoadOptions::default()
        },
    )
    .unwrap();
    let questions = [
        "Name the capital of France.",
        "Why does a centrifugal pump cavitate, and how do I stop it? Answer briefly.",
        "List three checks before restarting a tripped motor.",
        "What is 12 times 7?",
    ];
    let prompts: Vec<Vec<u32>> = questions
        .iter()
        .map(|q| {
            model
                .chat_prompt(&[fieldllm_engine::chat::Message::new("user", *q)])
                .unwrap()
        })
        .collect();
    same_answers_batched(&model, &prompts, 16, 0.0);
}

/// Beside a batched answer, another panics in its loop (between two of its runs) and a third is
/// cancelled: the first still gets its lone answer, the others' slots are given back.
#[test]
fn a_panicking_or_cancelled_answer_leaves_the_others_as_they_were() {
    use fieldllm_engine::{FinishReason, GenerateParams, generate};
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_artifact(&tmp, "tiny-blocks");
    let prompt: Vec<u32> = (1..20).collect();
    let params = GenerateParams {
        max_tokens: 24,
        sampling: fieldllm_engine::SamplingParams {
            temperature: 0.0,
            ..Default::default()
        },
        ..GenerateParams::default()
    };
    let never = AtomicBool::new(false);
    let alone = generate(
        &mut Session::new(&model).unwrap(),
        &prompt,
        &params,
        &never,
        &mut |_| (),
    )
    .unwrap()
    .tokens;
    let batch = Batcher::new(&model).unwrap();
    let start = Barrier::new(3);
    std::thread::scope(|scope| {
        let ok = scope.spawn(|| {
            let mut s = batch.session().unwrap();
            start.wait();
            generate(&mut s, &prompt, &params, &never, &mut |_| ()).unwrap()
        });
        let panics = scope.spawn(|| {
            let mut s = batch.session().unwrap();
            start.wait();
            let mut n = 0;
            generate(&mut s, &prompt[..7], &params, &never, &mut |_| {
                n += 1;
                assert!(n < 4, "a bug in this answer's loop");
            })
        });
        let cancelled = scope.spawn(|| {
            let mut s = batch.session().unwrap();
            let cancel = AtomicBool::new(false);
            start.wait();
            let mut n = 0;
            generate(&mut s, &prompt[3..], &params, &cancel, &mut |_| {
                n += 1;
                if n == 5 {
                    cancel.store(true, Ordering::Relaxed);
                }
            })
            .unwrap()
        });
        assert!(panics.join().is_err(), "the second answer panicked");
        assert_eq!(cancelled.join().unwrap().finish, FinishReason::Cancelled);
        assert_eq!(
            ok.join().unwrap().tokens,
            alone,
            "the first answer is its lone answer"
        );
    });
    // every slot was given back and emptied
    assert_eq!(batch.kv_bytes(), 0);
    let s = batch.session().unwrap();
    drop(s);
}

/// Answer A waits on its caller between two tokens while answer B decodes; `away`: A steps
/// away meanwhile. Returns the runs B's answer made that waited out the gathering window for A.
fn runs_waiting_for_an_absent_answer(model: &Arc<Model>, away: bool) -> u64 {
    use fieldllm_engine::{GenerateParams, generate};
    let params = |max_tokens| GenerateParams {
        max_tokens,
        sampling: fieldllm_engine::SamplingParams {
            temperature: 0.0,
            ..Default::default()
        },
        ..GenerateParams::default()
    };
    let never = AtomicBool::new(false);
    let batch = Batcher::new(model).unwrap();
    let (out_tx, out_rx) = std::sync::mpsc::channel::<()>();
    let (back_tx, back_rx) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|scope| {
        let batch = &batch;
        let (never, params) = (&never, &params);
        let a = scope.spawn(move || {
            let mut s = batch.session().unwrap();
            let presence = s.presence();
            let mut first = true;
            generate(&mut s, &[1, 2, 3, 4], &params(6), never, &mut |_| {
                if std::mem::take(&mut first) {
                    let wait = || {
                        out_tx.send(()).unwrap();
                        back_rx.recv().unwrap();
                    };
                    if away { presence.away(wait) } else { wait() }
                }
            })
            .unwrap()
        });
        out_rx.recv().unwrap();
        let before = batch.stats();
        let mut b = batch.session().unwrap();
        let answer = generate(&mut b, &[5, 6, 7], &params(8), never, &mut |_| ()).unwrap();
        let after = batch.stats();
        back_tx.send(()).unwrap();
        assert_eq!(a.join().unwrap().tokens.len(), 6);
        assert!(after.runs - before.runs >= answer.tokens.len() as u64 - 1);
        after.window_runs - before.window_runs
    })
}

#[test]
fn an_answer_stepped_away_is_not_waited_for() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_artifact(&tmp, "tiny-blocks");
    // present but not handing in: every run of the other answer waits the window out
    assert!(runs_waiting_for_an_absent_answer(&model, false) >= 7);
    // stepped away: none does
    assert_eq!(runs_waiting_for_an_absent_answer(&model, true), 0);
}
