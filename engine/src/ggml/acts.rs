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
        quantize_blocks(self.x, &mut self.value);
        if let Some(rest) = &mut self.rest {
            let v = &self.value;
            let lost: Vec<f32> = self
                .x
                .chunks_exact(BLOCK)
                .zip(v.qs.chunks_exact(BLOCK).zip(v.d.iter()))
                .flat_map(|(xb, (qb, &d))| xb.iter().zip(qb).map(move |(x, &q)| x - d * q as f32))
                .collect();
            quantize_blocks(&lost, rest);
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

/// Each block of 32 activations of `x` to bytes in `out.qs`, its scale and `d * sum(q)` in
/// `out.d`, `out.s` ([`quantize_block_plain`] per block). Under AVX2 in vector instructions
/// ([`x86::quantize_blocks`], the same bytes: 1.2 -> 0.7 ns a value, `gemm_bench`), elsewhere
/// the plain form (aarch64's baseline has NEON, which the compiler uses).
fn quantize_blocks(x: &[f32], out: &mut Blocks<'_>) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        return x86::quantize_blocks(x, out);
    }
    for (b, xb) in x.chunks_exact(BLOCK).enumerate() {
        (out.d[b], out.s[b]) = quantize_block_plain(xb, &mut out.qs[b * BLOCK..][..BLOCK]);
    }
}

/// One block of 32 activations to bytes in `q`; returns `(d, d * sum(q))`. The reference the
/// vector form is tested against.
fn quantize_block_plain(xb: &[f32], q: &mut [i8]) -> (f32, f32) {
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
    // a NaN value quantizes to 0 (the maximum skipped it)
    let mut r = [0i32; BLOCK];
    if d >= f32::MIN_POSITIVE {
        // d normal, so 1 / d is finite and |v * id| <= 127 (and a bit) or NaN: the vector form
        // applies (d infinite: id 0, every value 0)
        let id = 1.0 / d;
        for (r, v) in r.iter_mut().zip(xb) {
            *r = round_half_away_small(v * id);
        }
    } else if d > 0.0 {
        // a subnormal scale (values below about 1.5e-36): 1 / d overflows or d kept too few
        // bits for v / d to stay within 127, so divide and clamp
        for (r, v) in r.iter_mut().zip(xb) {
            *r = round_half_away(v / d).clamp(-127, 127);
        }
    }
    for (qi, r) in q.iter_mut().zip(&r) {
        *qi = *r as i8;
    }
    (d, d * r.iter().sum::<i32>() as f32)
}

// AVX2 intrinsics on whole blocks: each `unsafe` says why it holds.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use std::arch::x86_64::*;

    use super::{BLOCK, Blocks, MAGIC, quantize_block_plain};

    /// [`super::quantize_blocks`] under AVX2 (checked here, so this stays safe to call
    /// anywhere): [`quantize_block_plain`]'s bytes, scales and sums.
    pub(super) fn quantize_blocks(x: &[f32], out: &mut Blocks<'_>) {
        let n = x.len() / BLOCK;
        assert!(
            x.len() == n * BLOCK && out.qs.len() >= n * BLOCK && out.d.len().min(out.s.len()) >= n,
            "whole blocks"
        );
        if !std::arch::is_x86_feature_detected!("avx2") {
            for (b, xb) in x.chunks_exact(BLOCK).enumerate() {
                (out.d[b], out.s[b]) = quantize_block_plain(xb, &mut out.qs[b * BLOCK..][..BLOCK]);
            }
            return;
        }
        // SAFETY: the CPU has AVX2 (just checked); `out` holds `n` blocks (asserted)
        unsafe { blocks(x, out) }
    }

    /// The blocks in two loops, [`amax`] and [`block`] inlined: first every block's scale,
    /// then the bytes. Each block's chain (a horizontal maximum, then two divisions, then the
    /// rounding) ran one block after another in one loop (0.65 ns a value, `gemm_bench`);
    /// split, the blocks' chains overlap.
    /// SAFETY: the CPU has AVX2; `out` holds `x.len() / BLOCK` blocks.
    #[target_feature(enable = "avx2")]
    unsafe fn blocks(x: &[f32], out: &mut Blocks<'_>) {
        for (xb, d) in x.chunks_exact(BLOCK).zip(out.d.iter_mut()) {
            // SAFETY: the CPU has AVX2 (this function's contract)
            *d = unsafe { amax(xb.try_into().expect("a block")) } / 127.0;
        }
        for (b, xb) in x.chunks_exact(BLOCK).enumerate() {
            let (xb, q) = (
                xb.try_into().expect("a block"),
                (&mut out.qs[b * BLOCK..][..BLOCK])
                    .try_into()
                    .expect("a block"),
            );
            let d = out.d[b];
            out.s[b] = if d >= f32::MIN_POSITIVE {
                // SAFETY: the CPU has AVX2 (this function's contract)
                unsafe { block(xb, d, q) }
            } else {
                // zero or subnormal: the plain form's branches (the same d)
                quantize_block_plain(xb, q).1
            };
        }
    }

    /// The largest |value| of a block, skipping NaN, as the plain form: max_ps(v, m) is
    /// `v > m ? v : m`.
    /// SAFETY: the CPU has AVX2.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn amax(xb: &[f32; BLOCK]) -> f32 {
        let (p, abs) = (
            xb.as_ptr(),
            _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff)),
        );
        let mut m = _mm256_setzero_ps();
        for i in 0..BLOCK / 8 {
            // SAFETY: 8 values from 8 * i, within the block
            let v = unsafe { _mm256_loadu_ps(p.add(8 * i)) };
            m = _mm256_max_ps(_mm256_and_ps(v, abs), m);
        }
        let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        _mm_cvtss_f32(_mm_max_ss(m2, _mm_shuffle_ps(m2, m2, 1)))
    }

    /// One block's bytes for its scale `d` (normal): returns `d * sum(q)`, both as
    /// [`quantize_block_plain`].
    /// SAFETY: the CPU has AVX2.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn block(xb: &[f32; BLOCK], d: f32, q: &mut [i8; BLOCK]) -> f32 {
        // (no closures here: they do not take the function's target features, and the
        // vectors went through the stack)
        let (p, id) = (xb.as_ptr(), _mm256_set1_ps(1.0 / d));
        // SAFETY: 4 x 8 values are the block's 32
        let r = unsafe {
            [
                round8(_mm256_mul_ps(_mm256_loadu_ps(p), id)),
                round8(_mm256_mul_ps(_mm256_loadu_ps(p.add(8)), id)),
                round8(_mm256_mul_ps(_mm256_loadu_ps(p.add(16)), id)),
                round8(_mm256_mul_ps(_mm256_loadu_ps(p.add(24)), id)),
            ]
        };
        // the low byte of each (`as i8` wraps): 0..=255 packs unchanged through both packs
        let low = _mm256_set1_epi32(0xff);
        let ab = _mm256_packus_epi32(_mm256_and_si256(r[0], low), _mm256_and_si256(r[1], low));
        let ce = _mm256_packus_epi32(_mm256_and_si256(r[2], low), _mm256_and_si256(r[3], low));
        let bytes = _mm256_packus_epi16(ab, ce);
        // the packs work within 128-bit halves: put the 4-byte groups back in order
        let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        // SAFETY: 32 bytes into the 32 of `q`
        unsafe { _mm256_storeu_si256(q.as_mut_ptr().cast(), bytes) };
        let sum = _mm256_add_epi32(_mm256_add_epi32(r[0], r[1]), _mm256_add_epi32(r[2], r[3]));
        let s4 = _mm_add_epi32(
            _mm256_castsi256_si128(sum),
            _mm256_extracti128_si256(sum, 1),
        );
        let s2 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0b01_00_11_10));
        let s1 = _mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0b10_11_00_01));
        d * _mm_cvtsi128_si32(s1) as f32
    }

    /// `round_half_away_small` of 8 values (|y| < 2^22 or NaN): masks are -1 where true.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn round8(y: __m256) -> __m256i {
        let (magic, half, zero) = (
            _mm256_set1_ps(MAGIC),
            _mm256_set1_ps(0.5),
            _mm256_setzero_ps(),
        );
        let big = _mm256_add_ps(y, magic);
        let n = _mm256_sub_epi32(
            _mm256_castps_si256(big),
            _mm256_set1_epi32(MAGIC.to_bits() as i32),
        );
        let f = _mm256_sub_ps(y, _mm256_sub_ps(big, magic));
        let up = _mm256_and_ps(
            _mm256_cmp_ps::<_CMP_EQ_OQ>(f, half),
            _mm256_cmp_ps::<_CMP_GT_OQ>(y, zero),
        );
        let down = _mm256_and_ps(
            _mm256_cmp_ps::<_CMP_EQ_OQ>(f, _mm256_sub_ps(zero, half)),
            _mm256_cmp_ps::<_CMP_LT_OQ>(y, zero),
        );
        let n = _mm256_sub_epi32(n, _mm256_castps_si256(up));
        let n = _mm256_add_epi32(n, _mm256_castps_si256(down));
        let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(y, y);
        _mm256_andnot_si256(_mm256_castps_si256(nan), n)
    }
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
            let (d, s) = quantize_block_plain(&x, &mut q);
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

    /// Blocks that take every branch of the rounding: exact halves, NaN, infinities, zeros,
    /// scales whose inverse overflows or loses bits (denormal `d`), random magnitudes.
    fn awkward_blocks() -> Vec<[f32; BLOCK]> {
        let mut blocks = Vec::new();
        let mut halves = [0f32; BLOCK];
        for (i, v) in halves.iter_mut().enumerate() {
            // amax 127 gives d = 1: these land on .5 exactly
            *v = (i as f32 - 16.0) + 0.5;
        }
        halves[0] = 127.0;
        blocks.push(halves);
        blocks.push(halves.map(|v| -v));
        for fill in [
            f32::NAN,
            f32::INFINITY,
            -0.0,
            1e-36,
            1e-38,
            1e-40,
            1e-45,
            3e38,
        ] {
            let mut b = [0.3f32; BLOCK];
            b[5] = fill;
            b[9] = -fill;
            blocks.push(b);
            blocks.push([fill; BLOCK]);
            blocks.push(std::array::from_fn(|i| fill * (i as f32 - 15.5) / 16.0));
        }
        let mut seed = 0x9e37_79b9_u32;
        for scale in [1e-37f32, 1e-20, 1e-3, 1.0, 1e3, 1e30] {
            for _ in 0..200 {
                blocks.push(std::array::from_fn(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    (seed as f32 / u32::MAX as f32 - 0.5) * scale
                }));
            }
        }
        blocks
    }

    /// The blocks as this CPU quantizes them (AVX2 where it has it) against the plain form.
    #[test]
    fn the_vector_form_gives_the_plain_forms_bytes() {
        let blocks = awkward_blocks();
        let x: Vec<f32> = blocks.iter().flatten().copied().collect();
        let n = blocks.len();
        let (mut qs, mut d, mut s) = (vec![0i8; n * BLOCK], vec![0f32; n], vec![0f32; n]);
        quantize_blocks(
            &x,
            &mut Blocks {
                qs: &mut qs,
                d: &mut d,
                s: &mut s,
            },
        );
        for (b, x) in blocks.iter().enumerate() {
            let mut want = [0i8; BLOCK];
            let (wd, ws) = quantize_block_plain(x, &mut want);
            assert_eq!(qs[b * BLOCK..][..BLOCK], want, "{x:?}");
            assert_eq!(
                (d[b].to_bits(), s[b].to_bits()),
                (wd.to_bits(), ws.to_bits()),
                "{x:?}"
            );
        }
    }

    #[test]
    fn subnormal_scales_stay_within_a_byte() {
        for v in [1e-36f32, 1e-40, 1e-42, 1e-43] {
            let mut q = [0i8; BLOCK];
            let (d, _) = quantize_block_plain(&[v; BLOCK], &mut q);
            let want = (v / d).round().min(127.0) as i8;
            assert!(q.iter().all(|&b| b == want && b > 0), "{v}: {q:?}");
        }
    }
}
