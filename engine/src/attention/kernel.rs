//! The two loops of one query's attention over a kv head's rows of the cache, per instruction set:
//! the scores (`q . k_j` for every position `j`) and the weighted sum of the values
//! (`sum_j w_j v_j`). Written with intrinsics because the compiler's vectorizer, given plain
//! loops over four keys at once, interleaved the keys instead of walking the head dimension
//! (slower than one key at a time, measured).
//!
//! Which set runs is the matrix kernels' choice ([`Isa::best`]): AVX2 + FMA (+ F16C, which
//! widens the cache's halves) under both x86 kinds, NEON under every aarch64 kind, plain Rust
//! otherwise (and for head dimensions the vectors do not divide).
//!
//! The cache holds keys and values as IEEE half-precision floats (by default) or f32
//! ([`Elem`], [`KvCache`]), each widened to f32 as it is loaded; every sum is f32.

// SIMD intrinsics reading rows whose bounds the safe callers checked: each use says so.
#![allow(unsafe_code)]

use tract_core::prelude::f16;

use crate::cpu::Isa;

/// What a KV cache keeps its keys and values as (`[model] kv_cache`): llama.cpp's cache types
/// `f16` (its default) and `f32`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum KvCache {
    /// IEEE half-precision floats: half the memory and half the reads of a decode step's
    /// attention; keys and values round to 11 significant bits.
    #[default]
    F16,
    /// f32: the keys and values as computed.
    F32,
}

impl KvCache {
    /// Bytes one key or value takes.
    pub fn bytes(self) -> usize {
        match self {
            KvCache::F16 => 2,
            KvCache::F32 => 4,
        }
    }

    /// The setting's name (`f16`, `f32`).
    pub fn name(self) -> &'static str {
        match self {
            KvCache::F16 => "f16",
            KvCache::F32 => "f32",
        }
    }
}

impl std::fmt::Display for KvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for KvCache {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f16" => Ok(KvCache::F16),
            "f32" => Ok(KvCache::F32),
            _ => Err(format!("a KV cache type is f16 or f32, not {s:?}")),
        }
    }
}

/// A value as a cache keeps it: `u16` (an IEEE half's bits) or `f32`.
pub trait Elem: Copy + Default + Send + Sync + std::fmt::Debug + 'static {
    /// Whether this is the half (the kernels' loads widen it).
    const HALF: bool;
    /// `x` as kept.
    fn narrow(x: f32) -> Self;
    /// The value kept, as f32 (exact).
    fn widen(self) -> f32;
    /// `out` as halves' bits, when that is what it holds.
    fn halves_mut(out: &mut [Self]) -> Option<&mut [u16]>;
}

impl Elem for u16 {
    const HALF: bool = true;
    #[inline]
    fn narrow(x: f32) -> u16 {
        narrow(x)
    }
    #[inline(always)]
    fn widen(self) -> f32 {
        widen(self)
    }
    fn halves_mut(out: &mut [u16]) -> Option<&mut [u16]> {
        Some(out)
    }
}

impl Elem for f32 {
    const HALF: bool = false;
    #[inline(always)]
    fn narrow(x: f32) -> f32 {
        x
    }
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
    fn halves_mut(_: &mut [f32]) -> Option<&mut [u16]> {
        None
    }
}

/// The vectors of one kv head in the cache: position `j`'s is
/// `m[j * stride + off..][..d]`.
#[derive(Clone, Copy, Debug)]
pub struct Rows<'a, T = u16> {
    /// The rows: a kv head's own (`[positions, d]`, the cache's layout), or every head's by
    /// position (`[positions, kv heads, d]`).
    pub m: &'a [T],
    /// Values from one position's vector to the next (d, or kv heads x d).
    pub stride: usize,
    /// Where the head's first vector starts (0, or head x d).
    pub off: usize,
    /// The head dimension.
    pub d: usize,
}

impl<'a, T> Rows<'a, T> {
    /// Position `j`'s vector (bounds-checked).
    #[inline(always)]
    pub(super) fn row(&self, j: usize) -> &'a [T] {
        &self.m[j * self.stride + self.off..][..self.d]
    }
}

/// The half-precision float whose bits are `h`, as f32 (exact).
#[inline(always)]
pub fn widen(h: u16) -> f32 {
    f16::from_bits(h).to_f32()
}

/// `x` as the bits of the nearest half-precision float, ties to even; beyond the halves' range
/// (±65504) the largest of them rather than an infinity (a key of `inf` would turn its every
/// score into NaN). NaN stays NaN.
#[inline]
pub fn narrow(x: f32) -> u16 {
    f16::from_f32(x.clamp(-65504.0, 65504.0)).to_bits()
}

/// `out[i] = T::narrow(x[i])`: for halves the same bits as one at a time, eight at a time where
/// the CPU converts them (a decode step of 4 answers narrows 46,080 values: ~90 µs one at a
/// time through `half`'s runtime-dispatched conversion).
///
/// # Panics
/// If the lengths differ.
pub fn narrow_into<T: Elem>(isa: Isa, x: &[f32], out: &mut [T]) {
    assert_eq!(
        x.len(),
        out.len(),
        "narrowing into a slice of another length"
    );
    // values the vector loop narrowed; the rest one at a time below
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if matches!(isa, Isa::Avx2 | Isa::Avx512Vnni)
        && let Some(halves) = T::halves_mut(out)
    {
        // SAFETY: the CPU has AVX2 and F16C (Isa); the lengths are equal (checked)
        done = unsafe { x86::narrow_into(x, halves) };
    }
    #[cfg(target_arch = "aarch64")]
    if matches!(isa, Isa::Neon | Isa::NeonDot | Isa::NeonI8mm)
        && let Some(halves) = T::halves_mut(out)
    {
        // SAFETY: the CPU has NEON (Isa); the lengths are equal (checked)
        done = unsafe { arm::narrow_into(x, halves) };
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let _ = isa;
    for (o, &x) in out[done..].iter_mut().zip(&x[done..]) {
        *o = T::narrow(x);
    }
}

/// `scores[j] = q . k_j` for `j` in `0..scores.len()`.
pub fn dots<T: Elem>(isa: Isa, q: &[f32], k: Rows<'_, T>, scores: &mut [f32]) {
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
                *s = q.iter().zip(k.row(j)).map(|(a, &b)| a * b.widen()).sum();
            }
        }
    }
}

/// `o = sum_j w[j] v_j` for `j` in `0..w.len()`.
pub fn weighted_sum<T: Elem>(isa: Isa, w: &[f32], v: Rows<'_, T>, o: &mut [f32]) {
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
                for (o, &x) in o.iter_mut().zip(v.row(j)) {
                    *o += w * x.widen();
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Elem, Rows};

    /// Eight values at `p`, widened (halves) or as they are.
    /// SAFETY: `p` points at 8 readable values.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn load8<T: Elem>(p: *const T) -> __m256 {
        // SAFETY: forwarded (unaligned loads of 8 values of T)
        unsafe {
            if T::HALF {
                _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
            } else {
                _mm256_loadu_ps(p.cast())
            }
        }
    }

    /// [`super::narrow_into`] eight at a time: clamped to the halves' range (NaN kept: `min`
    /// and `max` return their second operand when either is NaN), rounded to nearest even.
    /// Returns how many it narrowed (the whole eights).
    /// SAFETY: `x.len() == out.len()`.
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn narrow_into(x: &[f32], out: &mut [u16]) -> usize {
        let (hi, lo) = (_mm256_set1_ps(65504.0), _mm256_set1_ps(-65504.0));
        let mut i = 0;
        while i + 8 <= x.len() {
            // SAFETY: i + 8 <= the length of both
            unsafe {
                let v = _mm256_max_ps(lo, _mm256_min_ps(hi, _mm256_loadu_ps(x.as_ptr().add(i))));
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
                _mm_storeu_si128(out.as_mut_ptr().add(i).cast(), h);
            }
            i += 8;
        }
        i
    }

    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// Four keys at a time (four independent sums).
    /// SAFETY: rows `0..scores.len()` of `k` are in bounds, `k.d % 8 == 0`, `q.len() == k.d`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dots<T: Elem>(q: &[f32], k: Rows<'_, T>, scores: &mut [f32]) {
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
                        *a = _mm256_fmadd_ps(x, load8(r.add(i)), *a);
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
                unsafe { a = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(i)), load8(r.add(i)), a) };
            }
            *s = hsum(a);
        }
    }

    /// Four values at a time into `o` (one load and store of `o` per four).
    /// SAFETY: rows `0..w.len()` of `v` are in bounds, `v.d % 8 == 0`, `o.len() == v.d`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn weighted_sum<T: Elem>(w: &[f32], v: Rows<'_, T>, o: &mut [f32]) {
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
                        acc = _mm256_fmadd_ps(*c, load8(r.add(i)), acc);
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
    use std::arch::asm;

    use super::{Elem, Rows};

    /// Four values at `p`, widened (halves: `fcvtl`, Rust's f16 NEON intrinsics are not
    /// stable) or as they are.
    /// SAFETY: `p` points at 4 readable values.
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn load4<T: Elem>(p: *const T) -> float32x4_t {
        if !T::HALF {
            // SAFETY: forwarded
            return unsafe { vld1q_f32(p.cast()) };
        }
        // SAFETY: forwarded
        let h = unsafe { vld1_u16(p.cast()) };
        let f: float32x4_t;
        // SAFETY: a register-to-register conversion of base AArch64 (FP and SIMD)
        unsafe {
            asm!(
                "fcvtl {f:v}.4s, {h:v}.4h",
                h = in(vreg) h,
                f = lateout(vreg) f,
                // not preserves_flags: a signalling NaN sets FPSR's invalid-operation flag
                options(pure, nomem, nostack)
            )
        };
        f
    }

    /// [`super::narrow_into`] four at a time: clamped to the halves' range (`fmin`/`fmax` keep
    /// NaN), then `fcvtn`, which rounds as the FPCR says (nearest even: Linux leaves it so).
    /// Returns how many it narrowed (the whole fours).
    /// SAFETY: `x.len() == out.len()`.
    #[target_feature(enable = "neon")]
    pub unsafe fn narrow_into(x: &[f32], out: &mut [u16]) -> usize {
        let (hi, lo) = (vdupq_n_f32(65504.0), vdupq_n_f32(-65504.0));
        let mut i = 0;
        while i + 4 <= x.len() {
            // SAFETY: i + 4 <= the length of both; the conversion is register to register
            unsafe {
                let v = vmaxq_f32(lo, vminq_f32(hi, vld1q_f32(x.as_ptr().add(i))));
                let h: uint16x4_t;
                asm!(
                    "fcvtn {h:v}.4h, {v:v}.4s",
                    v = in(vreg) v,
                    h = lateout(vreg) h,
                    // not preserves_flags: rounding sets FPSR's inexact and underflow flags
                    options(pure, nomem, nostack)
                );
                vst1_u16(out.as_mut_ptr().add(i), h);
            }
            i += 4;
        }
        i
    }

    /// Four keys at a time (four independent sums).
    /// SAFETY: rows `0..scores.len()` of `k` are in bounds, `k.d % 4 == 0`, `q.len() == k.d`.
    #[target_feature(enable = "neon")]
    pub unsafe fn dots<T: Elem>(q: &[f32], k: Rows<'_, T>, scores: &mut [f32]) {
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
                        *a = vfmaq_f32(*a, x, load4(r.add(i)));
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
                unsafe { a = vfmaq_f32(a, vld1q_f32(qp.add(i)), load4(r.add(i))) };
            }
            *s = vaddvq_f32(a);
        }
    }

    /// Four values at a time into `o`.
    /// SAFETY: rows `0..w.len()` of `v` are in bounds, `v.d % 4 == 0`, `o.len() == v.d`.
    #[target_feature(enable = "neon")]
    pub unsafe fn weighted_sum<T: Elem>(w: &[f32], v: Rows<'_, T>, o: &mut [f32]) {
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
                        acc = vfmaq_n_f32(acc, load4(r.add(i)), c);
                    }
                    vst1q_f32(op.add(i), acc);
                }
            }
            j += 4;
        }
    }
}
