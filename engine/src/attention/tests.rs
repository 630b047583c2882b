//! [`KvAttention`] against attention written out in f64 over the whole history, for decode
//! steps, prompt chunks, masks, grouped heads, teams and truncation.

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};

use super::kernel::{self, Rows};
use super::*;

fn random(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.next_u32() as f64 / u32::MAX as f64 * 4.0 - 2.0) as f32)
        .collect()
}

/// `x` as the cache keeps it, bits.
fn halves(x: &[f32]) -> Vec<u16> {
    x.iter().map(|&x| kernel::narrow(x)).collect()
}

/// Rows of `m` (halves or f32), position `j`'s vector at `m[j * stride + off..][..d]`.
fn view<T>(m: &[T], (stride, off): (usize, usize), d: usize) -> Rows<'_, T> {
    Rows { m, stride, off, d }
}

/// One head's attention over a whole `[len, d]` cache, unmasked, scale 0.3, on `isa`.
#[cfg(target_arch = "x86_64")]
fn head_alone<T: Elem>(isa: Isa, q: &[f32], (k, v): (&[T], &[T]), d: usize) -> Vec<f32> {
    let (mut out, mut scores) = (vec![f32::NAN; d], vec![0f32; k.len() / d]);
    let rows = (view(k, (d, 0), d), view(v, (d, 0), d));
    attend(isa, q, rows, 0.3, None, &mut scores, &mut out);
    out
}

/// Each value's bits, to compare exactly (NaN included).
#[cfg(target_arch = "x86_64")]
fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|x| x.to_bits()).collect()
}

/// `x` rounded as the cache rounds it.
fn rounded(x: &[f32]) -> Vec<f32> {
    x.iter()
        .map(|&x| kernel::widen(kernel::narrow(x)))
        .collect()
}

fn op(team: Option<Arc<Team>>) -> KvAttention {
    op_of(team, KvCache::F16)
}

fn op_of(team: Option<Arc<Team>>, kv: KvCache) -> KvAttention {
    KvAttention {
        kv,
        name: "kv".into(),
        past_sequence_fact: f32::fact([1usize, 2, 0, 8].as_ref()),
        causal: true,
        scale: None,
        team,
        rows: false,
    }
}

fn new_state(op: &KvAttention) -> Box<dyn OpState> {
    op.state(&EvalContext::out_of_plan())
        .unwrap()
        .expect("the op keeps a state")
}

/// The history a test feeds, kept whole for the reference: `[position][kv head][d]`, keys and
/// values rounded as the cache keeps them.
#[derive(Default)]
struct History {
    k: Vec<f32>,
    v: Vec<f32>,
    len: usize,
    /// The cache's type.
    kv: KvCache,
}

impl History {
    /// `x` as the cache keeps it.
    fn kept(&self, x: &[f32]) -> Vec<f32> {
        match self.kv {
            KvCache::F16 => rounded(x),
            KvCache::F32 => x.to_vec(),
        }
    }
}

/// Attention of `q [heads, s, d]` (its queries at positions `past..past + s`) over `h`, causal,
/// with an additive mask `[1 | heads, s, len]` if given, in f64.
fn reference(
    h: &History,
    q: &[f32],
    heads: usize,
    kv_heads: usize,
    s: usize,
    d: usize,
    mask: Option<(&[f32], bool)>,
) -> Vec<f32> {
    let past = h.len - s;
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = vec![0f32; heads * s * d];
    for hd in 0..heads {
        let g = hd / (heads / kv_heads);
        for i in 0..s {
            let qi = &q[(hd * s + i) * d..(hd * s + i + 1) * d];
            let visible = if mask.is_some() { h.len } else { past + i + 1 };
            let scores: Vec<f64> = (0..visible)
                .map(|j| {
                    let kj = &h.k[(j * kv_heads + g) * d..(j * kv_heads + g + 1) * d];
                    let dot: f64 = qi.iter().zip(kj).map(|(&a, &b)| a as f64 * b as f64).sum();
                    let m = mask.map_or(0.0, |(m, per_head)| {
                        let mh = if per_head { hd } else { 0 };
                        m[(mh * s + i) * h.len + j] as f64
                    });
                    dot * scale + m
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
            let sum: f64 = w.iter().sum();
            for e in 0..d {
                let acc: f64 = (0..visible)
                    .map(|j| w[j] / sum * h.v[(j * kv_heads + g) * d + e] as f64)
                    .sum();
                out[(hd * s + i) * d + e] = acc as f32;
            }
        }
    }
    out
}

/// Feeds `s` new positions; returns (got, want).
#[allow(clippy::too_many_arguments)]
fn step(
    rng: &mut ChaCha8Rng,
    op: &KvAttention,
    state: &mut Box<dyn OpState>,
    h: &mut History,
    heads: usize,
    kv_heads: usize,
    s: usize,
    d: usize,
    mask: Option<bool>,
) -> (Vec<f32>, Vec<f32>) {
    let q = random(rng, heads * s * d);
    let (k, v) = (random(rng, kv_heads * s * d), random(rng, kv_heads * s * d));
    for pos in 0..s {
        for g in 0..kv_heads {
            let (kk, vv) = (
                h.kept(&k[(g * s + pos) * d..(g * s + pos + 1) * d]),
                h.kept(&v[(g * s + pos) * d..(g * s + pos + 1) * d]),
            );
            h.k.extend(kk);
            h.v.extend(vv);
        }
    }
    h.len += s;
    let mut inputs = tvec![
        Tensor::from_shape(&[1, heads, s, d], &q)
            .unwrap()
            .into_tvalue(),
        Tensor::from_shape(&[1, kv_heads, s, d], &k)
            .unwrap()
            .into_tvalue(),
        Tensor::from_shape(&[1, kv_heads, s, d], &v)
            .unwrap()
            .into_tvalue(),
    ];
    let mask_values = mask.map(|per_head| {
        let mh = if per_head { heads } else { 1 };
        // hides about a third of the keys, never all of a row
        let m: Vec<f32> = (0..mh * s * h.len)
            .map(|i| {
                if i % h.len != 0 && rng.next_u32().is_multiple_of(3) {
                    -1e4
                } else {
                    0.0
                }
            })
            .collect();
        inputs.push(
            Tensor::from_shape(&[1, mh, s, h.len], &m)
                .unwrap()
                .into_tvalue(),
        );
        (m, per_head)
    });
    let got = state
        .eval(&EvalContext::out_of_plan(), op, inputs)
        .unwrap()
        .remove(0);
    assert_eq!(got.shape(), &[1, heads, s, d]);
    let got = floats(&got).unwrap().to_vec();
    let want = reference(
        h,
        &q,
        heads,
        kv_heads,
        s,
        d,
        mask_values.as_ref().map(|(m, p)| (&m[..], *p)),
    );
    (got, want)
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    let err = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(err < 1e-4, "{what}: max error {err}");
}

#[test]
fn decode_steps_match_the_reference_with_grouped_heads_and_teams() {
    for kv in [KvCache::F16, KvCache::F32] {
        for (threads, heads, kv_heads, d) in
            [(1, 9, 3, 64), (2, 9, 3, 64), (3, 4, 1, 13), (2, 2, 2, 8)]
        {
            let mut rng = ChaCha8Rng::seed_from_u64(threads as u64 * 100 + heads as u64);
            let team = (threads > 1).then(|| Arc::new(Team::new(threads)));
            let op = op_of(team, kv);
            let mut state = new_state(&op);
            let mut h = History {
                kv,
                ..History::default()
            };
            for t in 0..40 {
                let (got, want) = step(
                    &mut rng, &op, &mut state, &mut h, heads, kv_heads, 1, d, None,
                );
                assert_close(&got, &want, &format!("{kv:?} {threads} threads, step {t}"));
            }
        }
    }
}

/// The cache keeps each key and value as the nearest half (ties to even), the largest half
/// beyond their range rather than an infinity, NaN as NaN.
#[test]
fn keys_and_values_round_to_the_nearest_half() {
    let round = |x: f32| kernel::widen(kernel::narrow(x));
    let step = 1.0 / 1024.0; // between halves at 1
    assert_eq!(round(1.0), 1.0);
    assert_eq!(round(1.0 + 0.4 * step), 1.0);
    assert_eq!(round(1.0 + 0.6 * step), 1.0 + step);
    assert_eq!(round(1.0 + 0.5 * step), 1.0, "a tie goes to the even half");
    assert_eq!(
        round(1.0 + 1.5 * step),
        1.0 + 2.0 * step,
        "a tie goes to the even half"
    );
    assert_eq!(round(-3.25), -3.25);
    assert_eq!(round(1e-9), 0.0);
    // below 2^-14 the halves are subnormal, 2^-24 apart: 6e-5 is 1006.6 of those steps
    assert_eq!(round(6e-5), 1007.0 * 2f32.powi(-24), "subnormal");
    for (x, want) in [
        (1e6, 65504.0),
        (-1e6, -65504.0),
        (f32::INFINITY, 65504.0),
        (f32::NEG_INFINITY, -65504.0),
    ] {
        assert_eq!(round(x), want, "{x}");
    }
    assert!(round(f32::NAN).is_nan());
}

/// Every instruction set narrows to the bits of the one-at-a-time conversion: ties, NaN,
/// infinities, values beyond the halves' range, subnormals, lengths with and without a tail.
#[test]
fn every_instruction_set_narrows_as_one_at_a_time() {
    let mut rng = ChaCha8Rng::seed_from_u64(22);
    let mut random_values = random(&mut rng, 1000);
    for x in random_values.iter_mut().step_by(7) {
        *x *= 3e4; // some near the top of the range
    }
    // the special values first, so the vector loops take them, and some again in a tail
    let special = [
        1.0 + 0.5 / 1024.0,
        1.0 + 1.5 / 1024.0,
        f32::NAN,
        -f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1e6,
        -7e4,
        65504.0,
        65519.0,
        65520.0,
        6e-5,
        -3e-7,
        1e-9,
        -0.0,
        2.5e-8,
    ];
    let x: Vec<f32> = special
        .iter()
        .chain(&random_values)
        .chain(&special[..5])
        .copied()
        .collect();
    for &isa in crate::cpu::tested_isas() {
        for n in [0, 5, 8, 13, 16, x.len()] {
            let mut got = vec![0u16; n];
            kernel::narrow_into(isa, &x[..n], &mut got);
            let want: Vec<u16> = x[..n].iter().map(|&x| kernel::narrow(x)).collect();
            for ((g, w), x) in got.iter().zip(&want).zip(&x) {
                let nan = |h: u16| kernel::widen(h).is_nan();
                assert!(g == w || (nan(*g) && nan(*w)), "{isa:?} {x}: {g:#x} {w:#x}");
            }
        }
    }
}

/// What the halves cost: a 64-position prompt's attention over the cache against f64 over the
/// keys and values as they came (f32, in [-2, 2], where a half's step is at most 2^-10): within
/// 4e-3, where over the rounded values it is within 1e-4 (the tests above).
#[test]
fn attention_over_halves_stays_near_attention_over_f32() {
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let (heads, kv_heads, s, d) = (9, 3, 64, 64);
    let op = op(None);
    let mut state = new_state(&op);
    let q = random(&mut rng, heads * s * d);
    let (k, v) = (
        random(&mut rng, kv_heads * s * d),
        random(&mut rng, kv_heads * s * d),
    );
    let t = |shape: &[usize], x: &[f32]| Tensor::from_shape(shape, x).unwrap().into_tvalue();
    let inputs = tvec![
        t(&[1, heads, s, d], &q),
        t(&[1, kv_heads, s, d], &k),
        t(&[1, kv_heads, s, d], &v),
    ];
    let got = state
        .eval(&EvalContext::out_of_plan(), &op, inputs)
        .unwrap()
        .remove(0);
    let got = floats(&got).unwrap().to_vec();
    let mut h = History {
        len: s,
        ..History::default()
    };
    for pos in 0..s {
        for g in 0..kv_heads {
            h.k.extend_from_slice(&k[(g * s + pos) * d..][..d]);
            h.v.extend_from_slice(&v[(g * s + pos) * d..][..d]);
        }
    }
    let want = reference(&h, &q, heads, kv_heads, s, d, None);
    let err = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(err < 4e-3, "max error {err} against f32 keys and values");
    assert!(err > 0.0, "the cache did not round at all");
}

#[test]
fn prompt_chunks_then_decode_match_the_reference() {
    // the (head, query) pairs split over 1, 2 and 3 threads, runs ending inside a head
    for threads in [1, 2, 3] {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let op = op((threads > 1).then(|| Arc::new(Team::new(threads))));
        let mut state = new_state(&op);
        let mut h = History::default();
        for (i, s) in [37, 1, 5, 33, 1, 1].into_iter().enumerate() {
            let (got, want) = step(&mut rng, &op, &mut state, &mut h, 6, 2, s, 16, None);
            assert_close(&got, &want, &format!("{threads} threads, chunk {i} of {s}"));
        }
    }
}

#[test]
fn masks_shared_or_per_head_are_added_to_the_scores() {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    for per_head in [false, true] {
        let op = op(Some(Arc::new(Team::new(2))));
        let mut state = new_state(&op);
        let mut h = History::default();
        for s in [4, 1, 1, 3, 1] {
            let (got, want) = step(
                &mut rng,
                &op,
                &mut state,
                &mut h,
                4,
                2,
                s,
                8,
                Some(per_head),
            );
            assert_close(&got, &want, &format!("mask per head {per_head}, chunk {s}"));
        }
    }
}

#[test]
fn truncating_forgets_the_tail_exactly() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let op = op(None);
    let mut state = new_state(&op);
    let mut h = History::default();
    step(&mut rng, &op, &mut state, &mut h, 4, 2, 10, 8, None);
    step(&mut rng, &op, &mut state, &mut h, 4, 2, 1, 8, None);
    let kv = state.downcast_mut::<KvAttentionState>().unwrap();
    assert_eq!(kv.len(), 11);
    kv.truncate(6);
    kv.truncate(20); // longer than the cache: nothing to forget
    assert_eq!(kv.len(), 6);
    h.len = 6;
    h.k.truncate(6 * 2 * 8);
    h.v.truncate(6 * 2 * 8);
    for t in 0..3 {
        let (got, want) = step(&mut rng, &op, &mut state, &mut h, 4, 2, 1, 8, None);
        assert_close(&got, &want, &format!("after truncate, step {t}"));
    }
}

/// A cache that grows past its room (every kv head's rows move to a larger buffer) keeps every
/// head's history, and a truncated one grows again from where it was cut.
#[test]
fn caches_that_grow_past_their_room_keep_every_head() {
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let op = op(Some(Arc::new(Team::new(2))));
    let mut state = new_state(&op);
    let mut h = History::default();
    let chunk = GROW_POSITIONS - 3;
    for (i, s) in [chunk, 1, 1, 1, 1, 1].into_iter().enumerate() {
        let (got, want) = step(&mut rng, &op, &mut state, &mut h, 6, 3, s, 16, None);
        assert_close(&got, &want, &format!("chunk {i} of {s}"));
    }
    let kv = state.downcast_mut::<KvAttentionState>().unwrap();
    assert_eq!(kv.len(), GROW_POSITIONS + 2);
    let grown = kv.bytes();
    assert_eq!(
        grown,
        2 * 2 * GROW_POSITIONS * 3 * 16 * 2,
        "two steps of room, K and V, 2 bytes a value"
    );
    kv.truncate(GROW_POSITIONS - 1);
    h.len = GROW_POSITIONS - 1;
    h.k.truncate(h.len * 3 * 16);
    h.v.truncate(h.len * 3 * 16);
    for t in 0..4 {
        let (got, want) = step(&mut rng, &op, &mut state, &mut h, 6, 3, 1, 16, None);
        assert_close(&got, &want, &format!("after truncate, step {t}"));
    }
    let kv = state.downcast_mut::<KvAttentionState>().unwrap();
    assert_eq!(kv.bytes(), grown, "the room kept, not grown again");
}

#[test]
fn shapes_that_do_not_fit_are_errors() {
    let op = op(None);
    let mut state = new_state(&op);
    let t = |shape: &[usize]| Tensor::zero::<f32>(shape).unwrap().into_tvalue();
    let ctx = EvalContext::out_of_plan();
    let cases: [(&str, &[&[usize]]); 5] = [
        (
            "K heads do not divide Q heads",
            &[&[1, 4, 1, 8], &[1, 3, 1, 8], &[1, 3, 1, 8]],
        ),
        (
            "head dims differ",
            &[&[1, 4, 1, 8], &[1, 2, 1, 4], &[1, 2, 1, 4]],
        ),
        (
            "a mask of the wrong length",
            &[&[1, 4, 1, 8], &[1, 2, 1, 8], &[1, 2, 1, 8], &[1, 1, 1, 5]],
        ),
        (
            "a head dimension of 0",
            &[&[1, 4, 1, 0], &[1, 2, 1, 0], &[1, 2, 1, 0]],
        ),
        ("two inputs", &[&[1, 4, 1, 8], &[1, 2, 1, 8]]),
    ];
    for (what, shapes) in cases {
        let inputs = shapes.iter().map(|s| t(s)).collect();
        assert!(state.eval(&ctx, &op, inputs).is_err(), "{what}");
    }
    // and none of them grew the cache
    assert_eq!(state.downcast_ref::<KvAttentionState>().unwrap().len(), 0);
}

#[test]
fn every_instruction_set_matches_plain_rust_on_awkward_sizes() {
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    for &isa in crate::cpu::tested_isas() {
        for (d, kv_heads, len) in [
            (8, 1, 1),
            (64, 3, 7),
            (16, 2, 4),
            (13, 2, 5),
            (64, 3, 0),
            (32, 1, 9),
        ] {
            let m = rounded(&random(&mut rng, len * kv_heads * d + 3));
            let mh = halves(&m);
            let q = random(&mut rng, d);
            let w = random(&mut rng, len);
            for g in 0..kv_heads {
                let rows = view(&mh, (kv_heads * d, g * d), d);
                let mut got = vec![f32::NAN; len];
                kernel::dots(isa, &q, rows, &mut got);
                let mut want = vec![f32::NAN; len];
                kernel::dots(Isa::Scalar, &q, rows, &mut want);
                assert_close(&got, &want, &format!("{isa:?} dots d {d} len {len}"));
                let mut got = vec![f32::NAN; d];
                kernel::weighted_sum(isa, &w, rows, &mut got);
                let mut want = vec![f32::NAN; d];
                kernel::weighted_sum(Isa::Scalar, &w, rows, &mut want);
                assert_close(
                    &got,
                    &want,
                    &format!("{isa:?} weighted sum d {d} len {len}"),
                );
                // and plain Rust is the formula
                let mut scalar = vec![f32::NAN; len];
                kernel::dots(Isa::Scalar, &q, rows, &mut scalar);
                assert_close(
                    &scalar,
                    &want_dots(&q, &m, kv_heads * d, g * d, len),
                    "scalar",
                );
                // and an f32 cache's rows of the same values give the same
                let full = view(&m, (kv_heads * d, g * d), d);
                let mut f = vec![f32::NAN; len];
                kernel::dots(isa, &q, full, &mut f);
                assert_close(&f, &scalar, &format!("{isa:?} f32 dots d {d} len {len}"));
                let mut f = vec![f32::NAN; d];
                kernel::weighted_sum(isa, &w, full, &mut f);
                assert_close(&f, &want, &format!("{isa:?} f32 weighted sum d {d}"));
            }
        }
    }
}

/// One head's attention, each instruction set's path against the plain one and f64: head
/// dimensions the AVX-512 path takes and not, lengths around its 16 keys, masks with `-inf`.
#[test]
fn every_instruction_set_attends_a_head_as_plain_rust_does() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for &isa in crate::cpu::tested_isas() {
        for (d, kv_heads, len, masked) in [
            (64, 3, 115, false),
            (64, 3, 16, true),
            (128, 2, 33, false),
            (16, 1, 1, false),
            (48, 2, 47, true),
            (8, 1, 5, false),
            (64, 1, 0, false),
            (64, 3, 20, true),
        ] {
            let k = rounded(&random(&mut rng, len * kv_heads * d));
            let v = rounded(&random(&mut rng, len * kv_heads * d));
            let (kh, vh) = (halves(&k), halves(&v));
            let q = random(&mut rng, d);
            let mut mask = random(&mut rng, len);
            if masked && len > 3 {
                mask[1] = f32::NEG_INFINITY;
                mask[len - 2] = f32::NEG_INFINITY;
            }
            let mask = masked.then_some(&mask[..]);
            for g in 0..kv_heads {
                let at = (kv_heads * d, g * d);
                let run = |isa| {
                    let (mut scores, mut o) = (vec![f32::NAN; len], vec![f32::NAN; d]);
                    attend(
                        isa,
                        &q,
                        (view(&kh, at, d), view(&vh, at, d)),
                        0.3,
                        mask,
                        &mut scores,
                        &mut o,
                    );
                    o
                };
                let what = format!("{isa:?} d {d} len {len} masked {masked}");
                assert_close(&run(isa), &run(Isa::Scalar), &what);
                // an f32 cache of the same (rounded) values attends the same
                let (mut scores, mut full) = (vec![f32::NAN; len], vec![f32::NAN; d]);
                attend(
                    isa,
                    &q,
                    (view(&k, at, d), view(&v, at, d)),
                    0.3,
                    mask,
                    &mut scores,
                    &mut full,
                );
                assert_close(&full, &run(Isa::Scalar), &format!("{what} f32 cache"));
                // and f64
                let scores: Vec<f64> = (0..len)
                    .map(|j| {
                        let kj = &k[j * kv_heads * d + g * d..][..d];
                        let dot: f64 = q.iter().zip(kj).map(|(&a, &b)| a as f64 * b as f64).sum();
                        dot * 0.3 + mask.map_or(0.0, |m| m[j] as f64)
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = w.iter().sum();
                let want: Vec<f32> = (0..d)
                    .map(|e| {
                        let acc: f64 = (0..len)
                            .map(|j| w[j] / sum * v[j * kv_heads * d + g * d + e] as f64)
                            .sum();
                        if len == 0 { 0.0 } else { acc as f32 }
                    })
                    .collect();
                assert_close(&run(isa), &want, &format!("{what} vs f64"));
            }
        }
    }
}

/// A kv head's group of heads at once (AVX-512) against each head by plain Rust, and bit for
/// bit against each head alone on AVX-512: group sizes 1 to 8 (passes of up to 4 heads, of 1 at
/// d 128), lengths around 16, none.
#[cfg(target_arch = "x86_64")]
#[test]
fn a_group_of_heads_attends_as_each_head_alone() {
    let isa = Isa::best();
    if !super::avx512::fits(isa, 64) {
        return; // no AVX-512 here
    }
    let mut rng = ChaCha8Rng::seed_from_u64(14);
    for (d, group, len) in [
        (64, 3, 115),
        (64, 4, 16),
        (128, 4, 33),
        (128, 3, 7),
        (16, 8, 47),
        (32, 5, 1),
        (64, 2, 0),
        (48, 1, 18),
    ] {
        let (k, v) = (
            halves(&random(&mut rng, len * d)),
            halves(&random(&mut rng, len * d)),
        );
        let stride = 3 * d; // queries of one row: one head's apart from the next
        let q = random(&mut rng, group * stride);
        let mut got = vec![f32::NAN; group * d];
        let mut scores = vec![f32::NAN; group * len];
        super::avx512::attend_group(
            isa,
            (&q, stride),
            (view(&k, (d, 0), d), view(&v, (d, 0), d)),
            0.3,
            len,
            &mut scores,
            &mut got,
        );
        for h in 0..group {
            let qh = &q[h * stride..][..d];
            let want = head_alone(Isa::Scalar, qh, (&k, &v), d);
            let what = format!("d {d} group {group} len {len} head {h}");
            assert_close(&got[h * d..][..d], &want, &what);
            // and the same bits as the head alone on AVX-512: an answer's tokens must not
            // depend on whether its step ran grouped (several answers) or not (one)
            let alone = head_alone(isa, qh, (&k, &v), d);
            assert_eq!(bits(&got[h * d..][..d]), bits(&alone), "{what}: bits");
        }
        // an f32 cache holding the same values (the halves widened): the same bits, grouped
        // and a head alone
        let widened = |m: &[u16]| m.iter().map(|&h| kernel::widen(h)).collect::<Vec<f32>>();
        let (kf, vf) = (widened(&k), widened(&v));
        let mut full = vec![f32::NAN; group * d];
        super::avx512::attend_group(
            isa,
            (&q, stride),
            (view(&kf, (d, 0), d), view(&vf, (d, 0), d)),
            0.3,
            len,
            &mut scores,
            &mut full,
        );
        assert_eq!(
            bits(&full),
            bits(&got),
            "d {d} group {group} len {len}: f32 cache"
        );
        for h in 0..group {
            let alone = head_alone(isa, &q[h * stride..][..d], (&kf, &vf), d);
            assert_eq!(
                bits(&full[h * d..][..d]),
                bits(&alone),
                "f32 cache head {h} alone"
            );
        }
    }
}

/// Every key masked gives zeros on every path.
#[test]
fn a_head_with_every_key_masked_attends_to_nothing() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let (d, len) = (64, 20);
    let (k, v, q) = (
        halves(&random(&mut rng, len * d)),
        halves(&random(&mut rng, len * d)),
        random(&mut rng, d),
    );
    let mask = vec![f32::NEG_INFINITY; len];
    for &isa in crate::cpu::tested_isas() {
        let rows = |m| Rows {
            m,
            stride: d,
            off: 0,
            d,
        };
        let (mut scores, mut o) = (vec![0f32; len], vec![f32::NAN; d]);
        attend(
            isa,
            &q,
            (rows(&k), rows(&v)),
            0.125,
            Some(&mask),
            &mut scores,
            &mut o,
        );
        assert!(o.iter().all(|&x| x == 0.0), "{isa:?}: {o:?}");
    }
}

fn want_dots(q: &[f32], m: &[f32], stride: usize, off: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|j| (0..q.len()).map(|i| q[i] * m[j * stride + off + i]).sum())
        .collect()
}

/// One run with open rows: `plan` lists (slot, rows) runs in the order they are fed; each
/// slot's rows continue its history. Returns per plan entry (got, want).
fn rows_step(
    rng: &mut ChaCha8Rng,
    op: &KvAttention,
    state: &mut Box<dyn OpState>,
    hists: &mut [History],
    plan: &[(usize, usize)],
    (heads, kv_heads, d): (usize, usize, usize),
) -> TractResult<Vec<(Vec<f32>, Vec<f32>)>> {
    let s: usize = plan.iter().map(|p| p.1).sum();
    let q = random(rng, heads * s * d);
    let (k, v) = (random(rng, kv_heads * s * d), random(rng, kv_heads * s * d));
    let (mut positions, mut slots) = (vec![], vec![]);
    let mut next: Vec<usize> = hists.iter().map(|h| h.len).collect();
    for &(slot, n) in plan {
        for _ in 0..n {
            positions.push(next[slot] as i64);
            slots.push(slot as i64);
            next[slot] += 1;
        }
    }
    let t = |shape: &[usize], v: &[f32]| Tensor::from_shape(shape, v).unwrap().into_tvalue();
    let inputs = tvec![
        t(&[1, heads, s, d], &q),
        t(&[1, kv_heads, s, d], &k),
        t(&[1, kv_heads, s, d], &v),
        tensor1(&positions).into_tvalue(),
        tensor1(&slots).into_tvalue(),
    ];
    let got = state
        .eval(&EvalContext::out_of_plan(), op, inputs)?
        .remove(0);
    let got = floats(&got)?.to_vec();
    // the reference: each entry's rows alone, over its slot's whole history
    let mut out = vec![];
    let mut row = 0;
    for &(slot, n) in plan {
        let h = &mut hists[slot];
        let pick = |x: &[f32], hs: usize| -> Vec<f32> {
            (0..hs)
                .flat_map(|g| (row..row + n).flat_map(move |i| x[(g * s + i) * d..][..d].to_vec()))
                .collect()
        };
        let (kk, vv) = (pick(&k, kv_heads), pick(&v, kv_heads));
        for pos in 0..n {
            for g in 0..kv_heads {
                let (k1, v1) = (
                    h.kept(&kk[(g * n + pos) * d..][..d]),
                    h.kept(&vv[(g * n + pos) * d..][..d]),
                );
                h.k.extend(k1);
                h.v.extend(v1);
            }
        }
        h.len += n;
        let want = reference(h, &pick(&q, heads), heads, kv_heads, n, d, None);
        out.push((pick(&got, heads), want));
        row += n;
    }
    Ok(out)
}

#[test]
fn rows_of_several_conversations_each_see_their_own_cache() {
    let dims = (6, 2, 16);
    for threads in [1, 2, 3] {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let mut op = op((threads > 1).then(|| Arc::new(Team::new(threads))));
        op.rows = true;
        let mut state = new_state(&op);
        let mut hists: Vec<History> = (0..4).map(|_| History::default()).collect();
        // prompts of different lengths joining at different steps, decode rows in any order,
        // a slot's rows split in two runs of one step
        let steps: [&[(usize, usize)]; 6] = [
            &[(0, 5), (2, 3)],
            &[(0, 1), (1, 4), (2, 1)],
            &[(2, 1), (0, 1), (1, 1)],
            &[(3, 7), (1, 1), (3, 2)],
            &[(1, 1), (2, 1), (3, 1), (0, 1)],
            &[(0, 1)],
        ];
        for (t, plan) in steps.into_iter().enumerate() {
            let res = rows_step(&mut rng, &op, &mut state, &mut hists, plan, dims).unwrap();
            for ((got, want), (slot, n)) in res.iter().zip(plan) {
                assert_close(
                    got,
                    want,
                    &format!("{threads} threads, step {t}, slot {slot} x{n}"),
                );
            }
        }
        let kv = state.downcast_mut::<KvAttentionState>().unwrap();
        for (slot, h) in hists.iter().enumerate() {
            assert_eq!(kv.slot_len(slot), h.len, "slot {slot}");
        }
        // forgetting one slot leaves the others as they were
        kv.truncate_slot(1, 0);
        hists[1] = History::default();
        let res = rows_step(
            &mut rng,
            &op,
            &mut state,
            &mut hists,
            &[(1, 2), (3, 1)],
            dims,
        );
        for (got, want) in res.unwrap() {
            assert_close(&got, &want, "after forgetting slot 1");
        }
    }
}

/// SmolLM2's shape (9 heads over 3 kv heads, d 64): a decode step of four answers at
/// different lengths, and a prompt chunk beside them, on one and two threads (the kv head's
/// group of heads together on AVX-512) match the reference.
#[test]
fn decode_steps_of_four_answers_match_the_reference() {
    let dims = (9, 3, 64);
    for (threads, kv) in [1, 2]
        .into_iter()
        .flat_map(|t| [(t, KvCache::F16), (t, KvCache::F32)])
    {
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        let mut op = op_of((threads > 1).then(|| Arc::new(Team::new(threads))), kv);
        op.rows = true;
        let mut state = new_state(&op);
        let mut hists: Vec<History> = (0..4)
            .map(|_| History {
                kv,
                ..History::default()
            })
            .collect();
        let steps: [&[(usize, usize)]; 5] = [
            &[(0, 21), (1, 3), (2, 17), (3, 40)],
            &[(0, 1), (1, 1), (2, 1), (3, 1)],
            &[(3, 1), (1, 1), (0, 1), (2, 1)],
            &[(0, 1), (1, 1), (2, 1), (3, 1)],
            &[(0, 1), (1, 9), (2, 1), (3, 1)],
        ];
        for (t, plan) in steps.into_iter().enumerate() {
            let res = rows_step(&mut rng, &op, &mut state, &mut hists, plan, dims).unwrap();
            for ((got, want), (slot, n)) in res.iter().zip(plan) {
                assert_close(
                    got,
                    want,
                    &format!("{kv:?} {threads} threads, step {t}, slot {slot} x{n}"),
                );
            }
        }
    }
}

#[test]
fn rows_out_of_order_or_out_of_range_are_errors_that_change_nothing() {
    let mut op = op(None);
    op.rows = true;
    let mut state = new_state(&op);
    let (heads, kv_heads, d) = (4, 2, 8);
    let t = |shape: &[usize]| Tensor::zero::<f32>(shape).unwrap().into_tvalue();
    let run = |state: &mut Box<dyn OpState>, positions: &[i64], slots: &[i64]| {
        let s = positions.len();
        let inputs = tvec![
            t(&[1, heads, s, d]),
            t(&[1, kv_heads, s, d]),
            t(&[1, kv_heads, s, d]),
            tensor1(positions).into_tvalue(),
            tensor1(slots).into_tvalue(),
        ];
        state.eval(&EvalContext::out_of_plan(), &op, inputs)
    };
    run(&mut state, &[0, 1, 0], &[0, 0, 5]).unwrap();
    for (what, positions, slots) in [
        ("a gap", &[2i64, 3][..], &[0i64, 5][..]),
        ("a position already held", &[1, 2], &[0, 0]),
        ("rows of a slot out of order", &[3, 2], &[0, 0]),
        ("a negative slot", &[2, 0], &[0, -1]),
        ("a slot past the limit", &[2, 0], &[0, MAX_SLOTS as i64]),
        ("fewer slots than rows", &[2, 1], &[0]),
    ] {
        let err = run(&mut state, positions, slots);
        assert!(err.is_err(), "{what}");
    }
    let kv = state.downcast_ref::<KvAttentionState>().unwrap();
    assert_eq!((kv.slot_len(0), kv.slot_len(5), kv.slot_len(1)), (2, 1, 0));
}

/// Not a test: `cargo test --release -p fieldllm-engine --lib attention::tests::attend_speed --
/// --ignored --nocapture` times one thread's attention of a 4-answer decode step of SmolLM2's
/// shape (30 layers, 9 heads over 3 kv heads, d 64, 115 positions), a layer's share of a step's
/// weights read between layers as the products would; and the time to read those caches once,
/// straight.
#[test]
#[ignore]
fn attend_speed() {
    let (layers, answers, heads, kv_heads, d, len) = (30, 4, 9, 3, 64, 115);
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let caches: Vec<(Vec<u16>, Vec<u16>)> = (0..layers * answers)
        .map(|_| {
            (
                halves(&random(&mut rng, len * kv_heads * d)),
                halves(&random(&mut rng, len * kv_heads * d)),
            )
        })
        .collect();
    let q = random(&mut rng, heads * d);
    // a step's weights (SmolLM2 Q4_1: ~112 MB), a layer's share read between two layers, each
    // its own: the caches come back from memory each step, as in the daemon (a 2 MB sweep read
    // again and again stayed in cache, and the caches with it: 0.6 ms where the daemon spends
    // ~1.6 ms of thread time)
    let per_layer = (112 << 20) / layers;
    let sweep = vec![1u8; per_layer * layers];
    let isa = Isa::best();
    let mut sink = 0u64;
    // the best of 20 rounds of `step(layer's caches of each answer)` over every layer, with
    // other memory read between layers, as the products do
    type Caches = [(Vec<u16>, Vec<u16>)];
    let mut time = |step: &mut dyn FnMut(&Caches)| {
        let mut best = std::time::Duration::MAX;
        for _ in 0..20 {
            let mut t = std::time::Duration::ZERO;
            for l in 0..layers {
                sink += sweep[l * per_layer..][..per_layer]
                    .iter()
                    .step_by(64)
                    .map(|&b| b as u64)
                    .sum::<u64>();
                let start = std::time::Instant::now();
                step(&caches[l * answers..][..answers]);
                t += start.elapsed();
            }
            best = best.min(t);
        }
        best
    };
    let (mut o, mut scores) = (vec![0f32; d], vec![0f32; len]);
    let best = time(&mut |layer| {
        for (k, v) in layer {
            for h in 0..heads {
                // the cache's layout: each kv head's rows apart
                let view = |m| Rows {
                    m,
                    stride: d,
                    off: h / 3 * d * len,
                    d,
                };
                attend(
                    isa,
                    &q[h * d..][..d],
                    (view(k), view(v)),
                    0.125,
                    None,
                    &mut scores,
                    &mut o,
                );
            }
        }
    });
    println!("{isa:?}: one 4-answer step's attention on one thread {best:?}");
    #[cfg(target_arch = "x86_64")]
    if super::avx512::fits(isa, d) {
        let (mut out, mut scores) = (vec![0f32; 3 * d], vec![0f32; 3 * len]);
        let best = time(&mut |layer| {
            for (k, v) in layer {
                for g in 0..kv_heads {
                    let view = |m| Rows {
                        m,
                        stride: d,
                        off: g * d * len,
                        d,
                    };
                    super::avx512::attend_group(
                        isa,
                        (&q[g * 3 * d..], d),
                        (view(k), view(v)),
                        0.125,
                        len,
                        &mut scores,
                        &mut out,
                    );
                }
            }
        });
        println!("the same, a kv head's group of heads together: {best:?}");
    }
    let mut read = std::time::Duration::MAX;
    for _ in 0..20 {
        let start = std::time::Instant::now();
        for (k, v) in &caches {
            for m in [k, v] {
                let mut acc = [0u32; 16];
                for c in m.chunks_exact(16) {
                    for (a, x) in acc.iter_mut().zip(c) {
                        *a = a.wrapping_add(u32::from(*x));
                    }
                }
                sink += acc.iter().map(|&a| a as u64).sum::<u64>();
            }
        }
        read = read.min(start.elapsed());
    }
    println!("reading the same caches once, straight: {read:?} ({sink})");
}
