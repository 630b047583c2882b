//! Activations quantized to 8 bits for the kernels, rows split over a team's threads.
//!
//! A prefill's products quantize 128 or more rows each; on one thread that was 8% of a
//! prefill's CPU time while the team's other threads waited (`perf` of `fieldllmd bench`,
//! SmolLM2 Q4_0, 2 threads), so [`QuantizedActs::quantize_on`] gives each thread its rows.

use std::sync::{Mutex, PoisonError};

use super::BLOCK;
use crate::cpu::{Team, part_of};

/// Rows below which quantizing stays on the calling thread (a decode step's one or two rows:
/// waking the team costs about what they take).
const SHARE_FROM_ROWS: usize = 8;

/// Activations quantized to 8 bits, once per row, in blocks of 32 (ggml's Q8_1: a scale and
/// the block's sum, the sum serving Q4_1's minimum term). Reused between calls: quantizing
/// allocates only when a row count grows.
#[derive(Debug, Default, Clone)]
pub struct QuantizedActs {
    /// Rows.
    pub rows: usize,
    /// Values per row.
    pub k: usize,
    /// `rows * k` values.
    pub qs: Vec<i8>,
    /// Scale per block.
    pub d: Vec<f32>,
    /// `d * sum(qs)` per block.
    pub s: Vec<f32>,
}

impl QuantizedActs {
    /// Quantizes `x` (`rows` rows of `k` values, `k` a multiple of 32): per block,
    /// `d = max|x| / 127`, `q = round(x / d)`, as ggml's `quantize_row_q8_1`.
    pub fn quantize(&mut self, x: &[f32], rows: usize, k: usize) {
        self.quantize_on(None, x, rows, k, false)
    }

    /// Quantizes `x` as [`Self::quantize`] into rows `0..rows`, and what that lost
    /// (`x - d * q`) into rows `rows..2 * rows`: the two rows' products sum to the product of
    /// `x` to about 15 bits instead of 7, for one more activation row per weight load.
    pub fn quantize_with_remainder(&mut self, x: &[f32], rows: usize, k: usize) {
        self.quantize_on(None, x, rows, k, true)
    }

    /// [`Self::quantize`] (or, with `remainder`, [`Self::quantize_with_remainder`]) with the
    /// rows split over `team`'s threads: the same bytes, each block quantized alone.
    pub fn quantize_on(
        &mut self,
        team: Option<&Team>,
        x: &[f32],
        rows: usize,
        k: usize,
        remainder: bool,
    ) {
        assert!(
            k.is_multiple_of(BLOCK) && x.len() == rows * k,
            "activations shape"
        );
        self.resize(if remainder { 2 * rows } else { rows }, k);
        let nb = k / BLOCK;
        // the values' rows, then (with `remainder`) the remainders' rows
        let (mut qs, mut rq) = self.qs.split_at_mut(rows * k);
        let (mut d, mut rd) = self.d.split_at_mut(rows * nb);
        let (mut s, mut rs) = self.s.split_at_mut(rows * nb);
        let threads = match team {
            Some(t) if rows >= SHARE_FROM_ROWS => t.threads(),
            _ => 1,
        };
        let mut parts = Vec::with_capacity(threads);
        for p in 0..threads {
            let mine = part_of(rows, threads, 1, p);
            let (values, blocks) = (mine.len() * k, mine.len() * nb);
            let rest = remainder.then(|| Blocks {
                qs: take(&mut rq, values),
                d: take(&mut rd, blocks),
                s: take(&mut rs, blocks),
            });
            let x = &x[mine.start * k..][..values];
            let value = Blocks {
                qs: take(&mut qs, values),
                d: take(&mut d, blocks),
                s: take(&mut s, blocks),
            };
            parts.push(Mutex::new(Part { x, value, rest }));
        }
        let run = |p: usize| {
            if let Some(part) = parts.get(p) {
                part.lock().unwrap_or_else(PoisonError::into_inner).run();
            }
        };
        match team {
            Some(team) if threads > 1 => team.run(&run),
            _ => run(0),
        }
    }

    fn resize(&mut self, rows: usize, k: usize) {
        self.rows = rows;
        self.k = k;
        self.qs.resize(rows * k, 0);
        self.d.resize(rows * k / BLOCK, 0.0);
        self.s.resize(rows * k / BLOCK, 0.0);
    }
}

/// The first `n` items of `*rest`, leaving the others there.
fn take<'a, T>(rest: &mut &'a mut [T], n: usize) -> &'a mut [T] {
    let (head, tail) = std::mem::take(rest).split_at_mut(n);
    *rest = tail;
    head
}

/// Quantized blocks: values, scales, sums.
struct Blocks<'a> {
    qs: &'a mut [i8],
    d: &'a mut [f32],
    s: &'a mut [f32],
}

/// One thread's rows: their activations, where they go, and where their remainders go.
struct Part<'a> {
    x: &'a [f32],
    value: Blocks<'a>,
    rest: Option<Blocks<'a>>,
}

impl Part<'_> {
    fn run(&mut self) {
        for (b, xb) in self.x.chunks_exact(BLOCK).enumerate() {
            let q = &mut self.value.qs[b * BLOCK..][..BLOCK];
            let (d, s) = quantize_block(xb, q);
            (self.value.d[b], self.value.s[b]) = (d, s);
            if let Some(rest) = &mut self.rest {
                let mut lost = [0f32; BLOCK];
                for ((r, v), &q) in lost.iter_mut().zip(xb).zip(q.iter()) {
                    *r = v - d * q as f32;
                }
                (rest.d[b], rest.s[b]) = quantize_block(&lost, &mut rest.qs[b * BLOCK..][..BLOCK]);
            }
        }
    }
}

/// `y.round() as i32` for |y| < 2^23 (NaN: 0) without libm: `f32::round` is a call on
/// baseline x86-64, 3% of decode. Ties go away from zero as in ggml's reference quantizer;
/// ties to even (its AVX path, or the 1.5 * 2^23 trick) measured 96.1% top-1 agreement
/// instead of 97.7% on the quality test's passage.
#[inline(always)]
pub(super) fn round_half_away(y: f32) -> i32 {
    let t = y as i32; // toward zero
    let f = y - t as f32; // exact below 2^23
    t + (f >= 0.5) as i32 - (f <= -0.5) as i32
}

/// 1.5 * 2^23: an f32 below 2^22 in magnitude plus this is rounded to a whole number (ties to
/// even), which the sum's low mantissa bits hold as a two's complement integer.
const MAGIC: f32 = 12_582_912.0;

/// [`round_half_away`] for |y| < 2^22 (NaN: 0) in float and integer operations the compiler
/// makes vector instructions of (the saturating `as i32` it makes one scalar conversion per
/// value, a third of quantizing's time): the nearest whole number by [`MAGIC`], moved away
/// from zero where `y` was exactly halfway.
#[inline(always)]
fn round_half_away_small(y: f32) -> i32 {
    let big = y + MAGIC;
    let n = big.to_bits() as i32 - MAGIC.to_bits() as i32;
    let f = y - (big - MAGIC); // exact: both within half a step
    let n = n + (f == 0.5 && y > 0.0) as i32 - (f == -0.5 && y < 0.0) as i32;
    if y.is_nan() { 0 } else { n }
}

/// One block of 32 activations to bytes in `q`; returns `(d, d * sum(q))`.
fn quantize_block(xb: &[f32], q: &mut [i8]) -> (f32, f32) {
    // 8 running maxima, so the compiler keeps them in vector registers (`f32::max`'s NaN
    // rule kept it scalar); `v > m` ignores a NaN as `max` does, and maxima combine exactly in
    // any order
    let mut lanes = [0f32; 8];
    for c in xb.chunks_exact(8) {
        for (m, v) in lanes.iter_mut().zip(c) {
            let v = v.abs();
            *m = if v > *m { v } else { *m };
        }
    }
    let amax = lanes.iter().fold(0f32, |a, &v| if v > a { v } else { a });
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    // NaN stays NaN-free here (as 0): a NaN activation already poisons d
    let mut r = [0i32; BLOCK];
    if id.is_finite() {
        // |v * id| <= 127 (and a bit) or NaN: the vector form applies
        for (r, v) in r.iter_mut().zip(xb) {
            *r = round_half_away_small(v * id);
        }
    } else {
        // a scale so small (below 2^-128) that 1 / d overflows: v * id is infinite
        for (r, v) in r.iter_mut().zip(xb) {
            *r = round_half_away(v * id);
        }
    }
    for (qi, r) in q.iter_mut().zip(&r) {
        *qi = *r as i8;
    }
    (d, d * r.iter().sum::<i32>() as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_roundings_agree_below_2_22() {
        let mut edge = vec![
            0.0, -0.0, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 126.5, -127.5, 127.0,
        ];
        edge.extend([
            0.49999997f32,
            -0.49999997,
            4_194_303.5,
            -4_194_303.5,
            f32::NAN,
        ]);
        // every f32 of a few ranges, and strides through the rest below 2^22
        let ranges = [(-3.0f32, 3.0f32), (125.0, 129.0), (-129.0, -125.0)];
        for (lo, hi) in ranges {
            let mut v = lo;
            while v <= hi {
                edge.push(v);
                v = f32::from_bits(if v >= 0.0 {
                    v.to_bits() + 1
                } else {
                    v.to_bits() - 1
                });
                if v == 0.0 {
                    v = f32::from_bits(1);
                }
            }
        }
        let mut bits = 0u32;
        while bits < 0x4a80_0000 {
            edge.push(f32::from_bits(bits));
            edge.push(-f32::from_bits(bits));
            bits += 997;
        }
        for y in edge {
            assert_eq!(
                round_half_away_small(y),
                round_half_away(y),
                "{y} ({:#x})",
                y.to_bits()
            );
        }
    }

    #[test]
    fn blocks_with_tiny_huge_or_missing_values_stay_defined() {
        let mut q = [0i8; BLOCK];
        for fill in [1e-40f32, 1e-44, f32::INFINITY, f32::NAN, 0.0, 3e38] {
            let mut x = [0.25f32; BLOCK];
            x[3] = fill;
            x[7] = -fill;
            let (d, s) = quantize_block(&x, &mut q);
            // the same bytes as one value at a time in the old form
            let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
            let dd = amax / 127.0;
            let id = if dd > 0.0 { 1.0 / dd } else { 0.0 };
            let want: Vec<i8> = x.iter().map(|v| round_half_away(v * id) as i8).collect();
            assert_eq!(q.to_vec(), want, "{fill}");
            assert_eq!(d.to_bits(), dd.to_bits());
            let sum: i32 = x.iter().map(|v| round_half_away(v * id)).sum();
            assert_eq!(s.to_bits(), (dd * sum as f32).to_bits());
        }
    }
}
