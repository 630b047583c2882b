//! One head's whole attention in AVX-512, for head dimensions of 16 to 128 (a multiple of 16):
//! scores, softmax and the weighted sum of the values in three passes over 16 lanes.
//!
//! Why apart from [`super::kernel`]'s two loops: the decode step of several answers spends a
//! quarter of its time in attention (4 answers of SmolLM2, 3.0 ms of a 13.2 ms run, `fieldllmd
//! bench --parallel 4 --profile`), and one thread's attention of such a step took 2.3 ms with
//! every key in cache, ~70 cycles a key and head where the arithmetic is ~15: each score was a
//! horizontal sum of its own, each weight a call to libm's `expf`, and the output went through
//! memory for every four keys. Here 16 keys' dot products are summed across lanes together
//! ([`reduce16`], 3 instructions a key), `exp` is a polynomial over 16 lanes ([`exp16`]), the
//! output stays in registers and is divided by the weights' sum once.
//!
//! `exp16` is Cephes' `expf` (the polynomial ggml's and most SIMD libraries' `expf` use):
//! within 2 ulp of the exact value over the arguments softmax gives it (`x <= 0`); the test
//! beside the kernel checks the whole head against f64 and the plain path.

// SIMD intrinsics reading rows whose bounds the safe entry checked: each use says so.
#![allow(unsafe_code)]

use std::arch::x86_64::*;

use super::kernel::{Elem, Rows};
use crate::cpu::Isa;

/// `$f::<W>(args)` for `W = d / 16` (1..=8): a head's output stays in `W` registers, so each
/// width the kernels take is its own instance.
macro_rules! by_width {
    ($d:expr, $f:ident($($a:expr),*)) => {
        match $d / 16 {
            1 => $f::<1, _>($($a),*),
            2 => $f::<2, _>($($a),*),
            3 => $f::<3, _>($($a),*),
            4 => $f::<4, _>($($a),*),
            5 => $f::<5, _>($($a),*),
            6 => $f::<6, _>($($a),*),
            7 => $f::<7, _>($($a),*),
            _ => $f::<8, _>($($a),*),
        }
    };
}
/// Whether this path runs for `isa` and head dimension `d`.
pub fn fits(isa: Isa, d: usize) -> bool {
    isa == Isa::Avx512Vnni && d.is_multiple_of(16) && (16..=128).contains(&d)
}

/// `o = softmax(scale * K q + mask) V` over the first `scores.len()` positions (`scores` is
/// scratch, left holding the unnormalized weights); every key masked gives zeros.
///
/// # Panics
/// If `!fits(isa, q.len())`, or the rows, `o` or the mask are shorter than the positions.
pub fn attend<T: Elem>(
    isa: Isa,
    q: &[f32],
    (k, v): (Rows<'_, T>, Rows<'_, T>),
    scale: f32,
    mask: Option<&[f32]>,
    scores: &mut [f32],
    o: &mut [f32],
) {
    let d = q.len();
    assert!(fits(isa, d), "the AVX-512 attention does not take d {d}");
    assert!(
        k.d == d && v.d == d && o.len() == d,
        "head dimensions differ"
    );
    let len = scores.len();
    if let Some(last) = len.checked_sub(1) {
        // every row read below is in bounds
        let _ = (k.row(last), v.row(last));
    }
    assert!(mask.is_none_or(|m| m.len() >= len), "a mask row too short");
    let x = Head {
        q,
        k,
        v,
        scale,
        mask,
    };
    // SAFETY: the CPU has AVX-512 (Isa::Avx512Vnni detects it); the bounds are checked above
    unsafe { by_width!(d, head(x, scores, o)) }
}

/// One head's inputs.
#[derive(Clone, Copy)]
struct Head<'a, T> {
    q: &'a [f32],
    k: Rows<'a, T>,
    v: Rows<'a, T>,
    scale: f32,
    mask: Option<&'a [f32]>,
}

/// Position `j`'s vector in `r`, unchecked.
///
/// # Safety
/// Row `j` of `r` is in bounds.
#[inline(always)]
unsafe fn row<T>(r: &Rows<'_, T>, j: usize) -> *const T {
    // SAFETY: the caller's row is in bounds
    unsafe { r.m.as_ptr().add(j * r.stride + r.off) }
}

/// The 16 values at `p`, widened to f32 (halves) or as they are.
///
/// # Safety
/// `p` points at 16 readable values.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load16<T: Elem>(p: *const T) -> __m512 {
    // SAFETY: forwarded (unaligned loads of 16 values of T)
    unsafe {
        if T::HALF {
            _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
        } else {
            _mm512_loadu_ps(p.cast())
        }
    }
}

/// How many rows ahead of the one they read the loops ask for keys (values: half as far).
/// The caches come from memory on every step (the weights read between two layers evict
/// them), and a head's few kilobytes of keys or values are too short a stream for the
/// hardware's prefetcher to get ahead of the loop on its own: `attend_speed`, a layer's share of
/// the weights read between layers, one thread, the grouped path 1.05-1.09 -> 0.80-0.82 ms,
/// a head at a time 0.81-0.84 -> 0.74-0.78; `fieldllmd bench --parallel 1 --parallel 4
/// --profile`, a 4-answer step's attention 876-918 -> 760-770 µs (16 and 64 were no better).
/// With the cache's rows in halves (half the bytes) 16 and 32 are alike and 64 worse.
const AHEAD: usize = 32;

/// The first rows the loops read, asked for together before they start.
#[inline(always)]
fn start_prefetch<const N: usize, T>(k: &Rows<'_, T>, v: &Rows<'_, T>, len: usize) {
    for j in 0..AHEAD.min(len) {
        prefetch::<N, T>(k, j, len);
    }
    for j in 0..(AHEAD / 2).min(len) {
        prefetch::<N, T>(v, j, len);
    }
}

/// Asks for row `j` of `r` (its `N` vectors of 16 values, each 64-byte cache line of them) to
/// be brought into L1, if `j < len`.
#[inline(always)]
fn prefetch<const N: usize, T>(r: &Rows<'_, T>, j: usize, len: usize) {
    if j < len {
        let p = r.m.as_ptr().wrapping_add(j * r.stride + r.off);
        for c in (0..N * 16).step_by(64 / size_of::<T>()) {
            // SAFETY: a prefetch is a hint that never faults, whatever the address
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(c) as *const i8) };
        }
    }
}

/// # Safety
/// AVX-512F; `N * 16 == q.len()`, the bounds `attend` checks.
#[target_feature(enable = "avx512f")]
unsafe fn head<const N: usize, T: Elem>(x: Head<'_, T>, scores: &mut [f32], o: &mut [f32]) {
    start_prefetch::<N, T>(&x.k, &x.v, scores.len());
    // SAFETY: forwarded
    let max = unsafe { scores_of::<N, T>(x, scores) };
    if max == f32::NEG_INFINITY || scores.is_empty() {
        o.fill(0.0);
        return; // every key masked: nothing to attend to
    }
    let sum = exp_in_place(scores, max);
    // SAFETY: forwarded
    unsafe { weighted::<N, T>(&x.v, scores, 1.0 / sum, o) };
}

/// `scores[j] = scale * q . k_j + mask[j]`; returns their maximum.
///
/// # Safety
/// As [`head`].
#[target_feature(enable = "avx512f")]
unsafe fn scores_of<const N: usize, T: Elem>(x: Head<'_, T>, scores: &mut [f32]) -> f32 {
    // SAFETY: q holds N vectors of 16
    let q: [__m512; N] =
        std::array::from_fn(|c| unsafe { _mm512_loadu_ps(x.q.as_ptr().add(16 * c)) });
    let dot = |j: usize| {
        // SAFETY: row j is in bounds (j < scores.len()), and holds N vectors of 16
        let r = unsafe { row(&x.k, j) };
        // SAFETY: as above
        let mut a = _mm512_mul_ps(q[0], unsafe { load16(r) });
        for (c, q) in q.iter().enumerate().skip(1) {
            // SAFETY: as above
            a = _mm512_fmadd_ps(*q, unsafe { load16(r.add(16 * c)) }, a);
        }
        a
    };
    let scale = _mm512_set1_ps(x.scale);
    let len = scores.len();
    let mut maxv = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut j = 0;
    while j + 16 <= len {
        for t in 0..16 {
            prefetch::<N, T>(&x.k, j + AHEAD + t, len);
        }
        let s = _mm512_mul_ps(reduce16(std::array::from_fn(|t| dot(j + t))), scale);
        let s = match x.mask {
            // SAFETY: the mask holds len values
            Some(m) => _mm512_add_ps(s, unsafe { _mm512_loadu_ps(m.as_ptr().add(j)) }),
            None => s,
        };
        // SAFETY: j + 16 <= len
        unsafe { _mm512_storeu_ps(scores.as_mut_ptr().add(j), s) };
        maxv = _mm512_max_ps(maxv, s);
        j += 16;
    }
    let mut max = _mm512_reduce_max_ps(maxv);
    for t in j..len {
        let s = _mm512_reduce_add_ps(dot(t)) * x.scale + x.mask.map_or(0.0, |m| m[t]);
        scores[t] = s;
        max = max.max(s);
    }
    max
}

/// The lanes of a chunk of `n <= 16` values.
#[inline(always)]
fn live(n: usize) -> __mmask16 {
    if n == 16 { 0xffff } else { (1u16 << n) - 1 }
}

/// The largest of `scores`, 16 at a time (a scalar fold took ~0.1 ms of a 4-answer step).
#[target_feature(enable = "avx512f")]
fn max_of(scores: &[f32]) -> f32 {
    let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
    for chunk in scores.chunks(16) {
        let live = live(chunk.len());
        // SAFETY: the mask covers the chunk's values only
        let s = unsafe { _mm512_maskz_loadu_ps(live, chunk.as_ptr()) };
        m = _mm512_mask_max_ps(m, live, m, s);
    }
    _mm512_reduce_max_ps(m)
}

/// `scores[j] = exp(scores[j] - max)`; returns their sum.
#[target_feature(enable = "avx512f")]
fn exp_in_place(scores: &mut [f32], max: f32) -> f32 {
    let m = _mm512_set1_ps(max);
    let mut sum = _mm512_setzero_ps();
    for chunk in scores.chunks_mut(16) {
        let live = live(chunk.len());
        let p = chunk.as_mut_ptr();
        // SAFETY: the mask covers the chunk's values only
        let e = exp16(_mm512_sub_ps(unsafe { _mm512_maskz_loadu_ps(live, p) }, m));
        // SAFETY: as above
        unsafe { _mm512_mask_storeu_ps(p, live, e) };
        sum = _mm512_mask_add_ps(sum, live, sum, e);
    }
    _mm512_reduce_add_ps(sum)
}

/// `o = inv * sum_j w[j] v_j`, the output in registers, one chain of keys (the order
/// [`weighted_heads`] keeps; its N vectors are N independent chains, and the few cycles a
/// key this leaves on the table are ~17 µs of a decode step).
///
/// # Safety
/// As [`head`]; `w.len()` rows of `v` are in bounds.
#[target_feature(enable = "avx512f")]
unsafe fn weighted<const N: usize, T: Elem>(v: &Rows<'_, T>, w: &[f32], inv: f32, o: &mut [f32]) {
    let mut a = [_mm512_setzero_ps(); N];
    for (j, &wj) in w.iter().enumerate() {
        prefetch::<N, T>(v, j + AHEAD / 2, w.len());
        // SAFETY: row j is in bounds and holds N vectors of 16
        let r = unsafe { row(v, j) };
        let wj = _mm512_set1_ps(wj);
        for (c, a) in a.iter_mut().enumerate() {
            // SAFETY: as above
            *a = _mm512_fmadd_ps(wj, unsafe { load16(r.add(16 * c)) }, *a);
        }
    }
    let inv = _mm512_set1_ps(inv);
    for (c, a) in a.iter().enumerate() {
        let s = _mm512_mul_ps(*a, inv);
        // SAFETY: o holds N vectors of 16
        unsafe { _mm512_storeu_ps(o.as_mut_ptr().add(16 * c), s) };
    }
}

/// The heads of one kv head's group for one query row: `o[h] = softmax(scale * K q_h) V` for
/// `h` in `0..group`, `q_h = q[h * q_stride..][..d]`, over the first `len` positions (no mask).
/// Each block of 16 keys serves every head of the group while it is in L1, and each value row
/// every head's sum: one pass over the kv head's memory where a head at a time made `group`.
/// `scores` is scratch (`group * len`).
///
/// # Panics
/// If `!fits(isa, d)`, or the queries, rows, scratch or output are shorter than that.
#[allow(clippy::too_many_arguments)]
pub fn attend_group<T: Elem>(
    isa: Isa,
    (q, q_stride): (&[f32], usize),
    (k, v): (Rows<'_, T>, Rows<'_, T>),
    scale: f32,
    len: usize,
    scores: &mut [f32],
    o: &mut [f32],
) {
    let d = k.d;
    let group = o.len() / d;
    assert!(fits(isa, d), "the AVX-512 attention does not take d {d}");
    assert!(
        v.d == d && group > 0 && o.len() == group * d && scores.len() >= group * len,
        "a group's output or scratch does not fit"
    );
    assert!(
        q.len() >= (group - 1) * q_stride + d,
        "a group's queries are short"
    );
    if len == 0 {
        o.fill(0.0);
        return;
    }
    let _ = (k.row(len - 1), v.row(len - 1)); // every row read below is in bounds
    let x = Group {
        q,
        q_stride,
        group,
        k,
        v,
        scale,
        len,
    };
    // SAFETY: the CPU has AVX-512 (Isa::Avx512Vnni detects it); the bounds are checked above
    unsafe { by_width!(d, group_of(x, scores, o)) }
}

/// One group's inputs.
#[derive(Clone, Copy)]
struct Group<'a, T> {
    q: &'a [f32],
    q_stride: usize,
    group: usize,
    k: Rows<'a, T>,
    v: Rows<'a, T>,
    scale: f32,
    len: usize,
}

/// # Safety
/// AVX-512F; `N * 16 == d`, the bounds `attend_group` checks.
#[target_feature(enable = "avx512f")]
unsafe fn group_of<const N: usize, T: Elem>(x: Group<'_, T>, scores: &mut [f32], o: &mut [f32]) {
    let (len, d) = (x.len, N * 16);
    start_prefetch::<N, T>(&x.k, &x.v, len);
    // SAFETY: forwarded
    unsafe { group_scores::<N, T>(x, scores) };
    let mut inv = [0f32; 4];
    let mut h0 = 0;
    while h0 < x.group {
        // as many heads a pass as keep their sums in 16 registers, up to 4
        let p = (16 / N).clamp(1, 4).min(x.group - h0);
        for (h, inv) in (h0..h0 + p).zip(&mut inv) {
            let row = &mut scores[h * len..][..len];
            *inv = 1.0 / exp_in_place(row, max_of(row));
        }
        let w = &scores[h0 * len..];
        let out = &mut o[h0 * d..];
        // SAFETY: forwarded; p <= 4 heads' weights and outputs follow h0
        unsafe {
            match p {
                1 => weighted_heads::<N, 1, T>(&x.v, w, len, inv, out),
                2 => weighted_heads::<N, 2, T>(&x.v, w, len, inv, out),
                3 => weighted_heads::<N, 3, T>(&x.v, w, len, inv, out),
                _ => weighted_heads::<N, 4, T>(&x.v, w, len, inv, out),
            }
        }
        h0 += p;
    }
}

/// `scores[h * len + j] = scale * q_h . k_j`, 16 keys at a time for every head.
///
/// # Safety
/// As [`group_of`].
#[target_feature(enable = "avx512f")]
unsafe fn group_scores<const N: usize, T: Elem>(x: Group<'_, T>, scores: &mut [f32]) {
    let scale = _mm512_set1_ps(x.scale);
    let dot = |q: &[__m512; N], j: usize| {
        // SAFETY: row j < len is in bounds and holds N vectors of 16
        let r = unsafe { row(&x.k, j) };
        // SAFETY: as above
        let mut a = _mm512_mul_ps(q[0], unsafe { load16(r) });
        for (c, q) in q.iter().enumerate().skip(1) {
            // SAFETY: as above
            a = _mm512_fmadd_ps(*q, unsafe { load16(r.add(16 * c)) }, a);
        }
        a
    };
    let query = |h: usize| -> [__m512; N] {
        // SAFETY: head h < group's query holds N vectors of 16 (checked)
        std::array::from_fn(|c| unsafe {
            _mm512_loadu_ps(x.q.as_ptr().add(h * x.q_stride + 16 * c))
        })
    };
    let len = x.len;
    let mut j = 0;
    while j + 16 <= len {
        for t in 0..16 {
            prefetch::<N, T>(&x.k, j + AHEAD + t, len);
        }
        for h in 0..x.group {
            let q = query(h);
            let s = _mm512_mul_ps(reduce16(std::array::from_fn(|t| dot(&q, j + t))), scale);
            // SAFETY: h * len + j + 16 <= group * len <= scores.len()
            unsafe { _mm512_storeu_ps(scores.as_mut_ptr().add(h * len + j), s) };
        }
        j += 16;
    }
    for h in 0..x.group {
        let q = query(h);
        for t in j..len {
            scores[h * len + t] = _mm512_reduce_add_ps(dot(&q, t)) * x.scale;
        }
    }
}

/// `o[h] = inv[h] * sum_j w[h * len + j] v_j` for `P` heads, each value row loaded once. The
/// same sums in the same order as [`weighted`] (one chain of keys, then scaled): a head's output
/// has the same bits whether its group ran together or not, so an answer's tokens do not depend
/// on the batch it ran in. (Two chains a head, even and odd keys, took 24 registers for 3 heads
/// and lost the grouping's gain, 1.63 against 1.46 ms in `attend_speed`.)
///
/// # Safety
/// As [`group_of`]; `w` holds `P * len` weights and `o` `P * N * 16` values.
#[target_feature(enable = "avx512f")]
unsafe fn weighted_heads<const N: usize, const P: usize, T: Elem>(
    v: &Rows<'_, T>,
    w: &[f32],
    len: usize,
    inv: [f32; 4],
    o: &mut [f32],
) {
    let mut a = [[_mm512_setzero_ps(); N]; P];
    for j in 0..len {
        prefetch::<N, T>(v, j + AHEAD / 2, len);
        // SAFETY: row j < len is in bounds and holds N vectors of 16
        let r = unsafe { row(v, j) };
        // SAFETY: as above
        let vr: [__m512; N] = std::array::from_fn(|c| unsafe { load16(r.add(16 * c)) });
        for (h, a) in a.iter_mut().enumerate() {
            let wj = _mm512_set1_ps(w[h * len + j]);
            for (a, vr) in a.iter_mut().zip(&vr) {
                *a = _mm512_fmadd_ps(wj, *vr, *a);
            }
        }
    }
    for (h, a) in a.iter().enumerate() {
        let inv = _mm512_set1_ps(inv[h]);
        for (c, a) in a.iter().enumerate() {
            let s = _mm512_mul_ps(*a, inv);
            // SAFETY: o holds P heads of N vectors of 16
            unsafe { _mm512_storeu_ps(o.as_mut_ptr().add((h * N + c) * 16), s) };
        }
    }
}

/// Lane `t` of the result is the sum of `v[t]`'s lanes: pairs of vectors folded together at
/// each level (within 128-bit lanes, then across them), 45 instructions for 16 sums.
#[target_feature(enable = "avx512f")]
fn reduce16(v: [__m512; 16]) -> __m512 {
    // each 128-bit lane: a's partial sums in places 0 and 2, b's in 1 and 3
    let l1: [__m512; 8] = std::array::from_fn(|i| {
        let (a, b) = (v[2 * i], v[2 * i + 1]);
        _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b))
    });
    // each 128-bit lane of l2[i]: that lane's sums of v[4i..4i + 4]
    let l2: [__m512; 4] = std::array::from_fn(|i| {
        let (a, b) = (_mm512_castps_pd(l1[2 * i]), _mm512_castps_pd(l1[2 * i + 1]));
        _mm512_add_ps(
            _mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
            _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)),
        )
    });
    // the 128-bit lanes summed in pairs, then again
    let fold = |a: __m512, b: __m512| {
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b),
            _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b),
        )
    };
    fold(fold(l2[0], l2[1]), fold(l2[2], l2[3]))
}

/// `exp(x)` in each lane for `x <= 0` (`-inf` gives 0): `2^n exp(r)`, `n = round(x / ln 2)`,
/// `r = x - n ln 2` in two parts (Cody-Waite), `exp(r)` Cephes' degree-7 polynomial.
#[target_feature(enable = "avx512f")]
fn exp16(x: __m512) -> __m512 {
    // below -104, exp underflows f32 to 0 (this clamp also turns -inf into a number)
    let x = _mm512_max_ps(x, _mm512_set1_ps(-104.0));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm512_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let p = _mm512_fmadd_ps(
        p,
        _mm512_mul_ps(r, r),
        _mm512_add_ps(r, _mm512_set1_ps(1.0)),
    );
    // p * 2^n, gradual underflow included
    _mm512_scalef_ps(p, n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lanes(v: __m512) -> [f32; 16] {
        let mut out = [0f32; 16];
        // SAFETY: out holds 16 f32
        unsafe { _mm512_storeu_ps(out.as_mut_ptr(), v) };
        out
    }

    #[test]
    fn sixteen_sums_land_in_their_lanes() {
        if !fits(Isa::best(), 64) {
            return; // no AVX-512 here
        }
        let x: Vec<f32> = (0..256).map(|i| (i * 7 % 31) as f32 - 11.0).collect();
        // SAFETY: AVX-512F (fits); x holds 16 vectors of 16
        let v = std::array::from_fn(|t| unsafe { _mm512_loadu_ps(x.as_ptr().add(16 * t)) });
        // SAFETY: AVX-512F
        let got = lanes(unsafe { reduce16(v) });
        for (t, got) in got.iter().enumerate() {
            assert_eq!(*got, x[16 * t..][..16].iter().sum::<f32>(), "lane {t}");
        }
    }

    #[test]
    fn exp_is_within_two_ulp_for_what_softmax_gives_it() {
        if !fits(Isa::best(), 64) {
            return;
        }
        let mut x: Vec<f32> = (0..4096).map(|i| -(i as f32) * 0.0263).collect();
        x.extend([
            f32::NEG_INFINITY,
            -87.0,
            -88.5,
            -103.9,
            -104.0,
            -200.0,
            -0.0,
            -1e-7,
        ]);
        for c in x.chunks(16) {
            let mut v = [0f32; 16];
            v[..c.len()].copy_from_slice(c);
            // SAFETY: AVX-512F (fits)
            let got = lanes(unsafe { exp16(_mm512_loadu_ps(v.as_ptr())) });
            for (&x, &got) in c.iter().zip(&got) {
                let want = (x as f64).exp() as f32;
                let ulp = (got.to_bits() as i64 - want.to_bits() as i64).abs();
                assert!(ulp <= 2, "exp({x}) = {got}, want {want} ({ulp} ulp)");
            }
        }
    }
}
