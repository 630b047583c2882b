//! The two loops of one query's attention over a kv head's rows of the cache, per instruction set:
//! the scores (`q . k_j` for every position `j`) and the weighted sum of the values
//! (`sum_j w_j v_j`). Written with intrinsics because the compiler's vectorizer, given plain
//! loops over four keys at once, interleaved the keys instead of walking the head dimension
//! (slower than one key at a time, measured).
//!
//! Which set runs is the matrix kernels' choice ([`Isa::best`]): AVX2 + FMA under both x86
//! kinds, NEON under every aarch64 kind, plain Rust otherwise (and for head dimensions the
//! vectors do not divide).

// SIMD intrinsics reading rows whose bounds the safe callers checked: each use says so.
#![allow(unsafe_code)]

use crate::cpu::Isa;

/// The vectors of one kv head in the cache: position `j`'s is
/// `m[j * stride + off..][..d]`.
#[derive(Clone, Copy, Debug)]
pub struct Rows<'a> {
    /// The rows: a kv head's own (`[positions, d]`, the cache's layout), or every head's by
    /// position (`[positions, kv heads, d]`).
    pub m: &'a [f32],
    /// Values from one position's vector to the next (d, or kv heads x d).
    pub stride: usize,
    /// Where the head's first vector starts (0, or head x d).
    pub off: usize,
    /// The head dimension.
    pub d: usize,
}

impl<'a> Rows<'a> {
    /// Position `j`'s vector (bounds-checked).
    #[inline(always)]
    pub(super) fn row(&self, j: usize) -> &'a [f32] {
        &self.m[j * self.stride + self.off..][..self.d]
    }
}

/// `scores[j] = q . k_j` for `j` in `0..scores.len()`.
pub fn dots(isa: Isa, q: &[f32], k: Rows<'_>, scores: &mut [f32]) {
    assert_eq!(q.len(), k.d, "query and keys differ in length");
    if let Some(last) = scores.len().checked_sub(1) {
        let _ = k.row(last); // every row read below is in bounds
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512Vnni if k.d.is_multiple_of(8) => {
            // SAFETY: the CPU has AVX2 + FMA (Isa); rows are in bounds (checked above)
            unsafe { x86::dots(q, k, scores) }
        }
        #[cfg(target_arch = "aarch64")]
        Isa::Neon | Isa::NeonDot | Isa::NeonI8mm if k.d.is_multiple_of(4) => {
            // SAFETY: the CPU has NEON (Isa); rows are in bounds (checked above)
            unsafe { arm::dots(q, k, scores) }
        }
        _ => {
            for (j, s) in scores.iter_mut().enumerate() {
                *s = q.iter().zip(k.row(j)).map(|(a, b)| a * b).sum();
            }
        }
    }
}

/// `o = sum_j w[j] v_j` for `j` in `0..w.len()`.
pub fn weighted_sum(isa: Isa, w: &[f32], v: Rows<'_>, o: &mut [f32]) {
    assert_eq!(o.len(), v.d, "output and values differ in length");
    if let Some(last) = w.len().checked_sub(1) {
        let _ = v.row(last);
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512Vnni if v.d.is_multiple_of(8) => {
            // SAFETY: as in `dots`
            unsafe { x86::weighted_sum(w, v, o) }
        }
        #[cfg(target_arch = "aarch64")]
        Isa::Neon | Isa::NeonDot | Isa::NeonI8mm if v.d.is_multiple_of(4) => {
            // SAFETY: as in `dots`
            unsafe { arm::weighted_sum(w, v, o) }
        }
        _ => {
            o.fill(0.0);
            for (j, &w) in w.iter().enumerate() {
                for (o, x) in o.iter_mut().zip(v.row(j)) {
                    *o += w * x;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Rows;

    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// Four keys at a time (four independent sums).
    /// SAFETY: rows `0..scores.len()` of `k` are in bounds, `k.d % 8 == 0`, `q.len() == k.d`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dots(q: &[f32], k: Rows<'_>, scores: &mut [f32]) {
        let (d, len) = (k.d, scores.len());
        let qp = q.as_ptr();
        let mut j = 0;
        while j + 4 <= len {
            let r = [k.row(j), k.row(j + 1), k.row(j + 2), k.row(j + 3)].map(|r| r.as_ptr());
            let mut a = [_mm256_setzero_ps(); 4];
            for i in (0..d).step_by(8) {
                // SAFETY: i + 8 <= d, the length of q and of every row
                unsafe {
                    let x = _mm256_loadu_ps(qp.add(i));
                    for (a, r) in a.iter_mut().zip(r) {
                        *a = _mm256_fmadd_ps(x, _mm256_loadu_ps(r.add(i)), *a);
                    }
                }
            }
            for (s, a) in scores[j..j + 4].iter_mut().zip(a) {
                *s = hsum(a);
            }
            j += 4;
        }
        for (s, j) in scores[j..].iter_mut().zip(j..) {
            let r = k.row(j).as_ptr();
            let mut a = _mm256_setzero_ps();
            for i in (0..d).step_by(8) {
                // SAFETY: as above
                unsafe {
                    a = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(i)), _mm256_loadu_ps(r.add(i)), a)
                };
            }
            *s = hsum(a);
        }
    }

    /// Four values at a time into `o` (one load and store of `o` per four).
    /// SAFETY: rows `0..w.len()` of `v` are in bounds, `v.d % 8 == 0`, `o.len() == v.d`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn weighted_sum(w: &[f32], v: Rows<'_>, o: &mut [f32]) {
        o.fill(0.0);
        let (d, len) = (v.d, w.len());
        let op = o.as_mut_ptr();
        let mut j = 0;
        while j < len {
            // four positions, or what is left (a weight of 0 on a repeated row adds nothing)
            let pick = |t: usize| if j + t < len { j + t } else { j };
            let weight = |t: usize| if j + t < len { w[j + t] } else { 0.0 };
            let r = [0, 1, 2, 3].map(|t| v.row(pick(t)).as_ptr());
            let c = [0, 1, 2, 3].map(|t| _mm256_set1_ps(weight(t)));
            for i in (0..d).step_by(8) {
                // SAFETY: i + 8 <= d, the length of o and of every row
                unsafe {
                    let mut acc = _mm256_loadu_ps(op.add(i));
                    for (c, r) in c.iter().zip(r) {
                        acc = _mm256_fmadd_ps(*c, _mm256_loadu_ps(r.add(i)), acc);
                    }
                    _mm256_storeu_ps(op.add(i), acc);
                }
            }
            j += 4;
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use std::arch::aarch64::*;

    use super::Rows;

    /// Four keys at a time (four independent sums).
    /// SAFETY: rows `0..scores.len()` of `k` are in bounds, `k.d % 4 == 0`, `q.len() == k.d`.
    #[target_feature(enable = "neon")]
    pub unsafe fn dots(q: &[f32], k: Rows<'_>, scores: &mut [f32]) {
        let (d, len) = (k.d, scores.len());
        let qp = q.as_ptr();
        let mut j = 0;
        while j + 4 <= len {
            let r = [k.row(j), k.row(j + 1), k.row(j + 2), k.row(j + 3)].map(|r| r.as_ptr());
            let mut a = [vdupq_n_f32(0.0); 4];
            for i in (0..d).step_by(4) {
                // SAFETY: i + 4 <= d, the length of q and of every row
                unsafe {
                    let x = vld1q_f32(qp.add(i));
                    for (a, r) in a.iter_mut().zip(r) {
                        *a = vfmaq_f32(*a, x, vld1q_f32(r.add(i)));
                    }
                }
            }
            for (s, a) in scores[j..j + 4].iter_mut().zip(a) {
                *s = vaddvq_f32(a);
            }
            j += 4;
        }
        for (s, j) in scores[j..].iter_mut().zip(j..) {
            let r = k.row(j).as_ptr();
            let mut a = vdupq_n_f32(0.0);
            for i in (0..d).step_by(4) {
                // SAFETY: as above
                unsafe { a = vfmaq_f32(a, vld1q_f32(qp.add(i)), vld1q_f32(r.add(i))) };
            }
            *s = vaddvq_f32(a);
        }
    }

    /// Four values at a time into `o`.
    /// SAFETY: rows `0..w.len()` of `v` are in bounds, `v.d % 4 == 0`, `o.len() == v.d`.
    #[target_feature(enable = "neon")]
    pub unsafe fn weighted_sum(w: &[f32], v: Rows<'_>, o: &mut [f32]) {
        o.fill(0.0);
        let (d, len) = (v.d, w.len());
        let op = o.as_mut_ptr();
        let mut j = 0;
        while j < len {
            // four positions, or what is left (a weight of 0 on a repeated row adds nothing)
            let pick = |t: usize| if j + t < len { j + t } else { j };
            let weight = |t: usize| if j + t < len { w[j + t] } else { 0.0 };
            let r = [0, 1, 2, 3].map(|t| v.row(pick(t)).as_ptr());
            let c = [0, 1, 2, 3].map(weight);
            for i in (0..d).step_by(4) {
                // SAFETY: i + 4 <= d, the length of o and of every row
                unsafe {
                    let mut acc = vld1q_f32(op.add(i));
                    for (&c, r) in c.iter().zip(r) {
                        acc = vfmaq_n_f32(acc, vld1q_f32(r.add(i)), c);
                    }
                    vst1q_f32(op.add(i), acc);
                }
            }
            j += 4;
        }
    }
}
