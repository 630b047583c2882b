//! x86-64 kernels: AVX2 (`vpmaddubsw` u8 x i8 pairs, `vpmaddwd` to i32) and AVX-512 VNNI
//! (`vpdpbusd`, the same in one instruction), 32 values per 256-bit register.
//!
//! Q4_1's nibbles are unsigned, the activations signed: exactly the u8 x i8 form both
//! instructions take. Q8_0 x Q8_0 is signed x signed: ggml's trick moves the weight's sign onto
//! the activation (`vpsignb`) and multiplies by the weight's magnitude.

use std::arch::x86_64::*;
use std::ops::Range;

use super::super::{BLOCK, BlockKind, QuantizedActs, Weights};
use super::drive_tiles;

#[target_feature(enable = "avx2")]
fn dot_avx2(a: __m256i, b: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1))
}

#[target_feature(enable = "avx2,avx512vnni,avx512vl")]
fn dot_vnni(a: __m256i, b: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b)
}

#[target_feature(enable = "avx2")]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

macro_rules! kernels {
    ($gemm:ident, $q41:ident, $q80:ident, $features:literal, $dot:ident) => {
        /// Tile of R weight rows x C activation rows, Q4_1 weights.
        #[target_feature(enable = $features)]
        unsafe fn $q41<const R: usize, const C: usize>(
            w: &Weights<'_>,
            r0: usize,
            x: &QuantizedActs,
            c0: usize,
            out: *mut f32,
            ldo: usize,
        ) {
            let nb = w.blocks_per_row();
            let mut acc = [[_mm256_setzero_ps(); C]; R];
            let mut macc = [[0f32; C]; R];
            let mask = _mm_set1_epi8(0x0f);
            let (qs, xq) = (w.qs.as_ptr(), x.qs.as_ptr());
            for b in 0..nb {
                let mut xv = [_mm256_setzero_si256(); C];
                let mut xd = [0f32; C];
                let mut xs = [0f32; C];
                for c in 0..C {
                    let i = (c0 + c) * nb + b;
                    // Safety: i < x.rows * nb (the driver's tiles stay inside x)
                    unsafe {
                        xv[c] = _mm256_loadu_si256(xq.add(i * BLOCK) as *const __m256i);
                        xd[c] = *x.d.get_unchecked(i);
                        xs[c] = *x.s.get_unchecked(i);
                    }
                }
                for r in 0..R {
                    let i = (r0 + r) * nb + b;
                    // Safety: i < w.n * nb (the driver's tiles stay inside rows)
                    let (raw, wd, wm) = unsafe {
                        (
                            _mm_loadu_si128(qs.add(i * (BLOCK / 2)) as *const __m128i),
                            *w.d.get_unchecked(i),
                            *w.m.get_unchecked(i),
                        )
                    };
                    let lo = _mm_and_si128(raw, mask);
                    let hi = _mm_and_si128(_mm_srli_epi16::<4>(raw), mask);
                    let wv = _mm256_set_m128i(hi, lo);
                    for c in 0..C {
                        let p = _mm256_cvtepi32_ps($dot(wv, xv[c]));
                        acc[r][c] = _mm256_fmadd_ps(_mm256_set1_ps(wd * xd[c]), p, acc[r][c]);
                        macc[r][c] += wm * xs[c];
                    }
                }
            }
            for r in 0..R {
                for c in 0..C {
                    // Safety: the caller's Out covers (c0 + c, r0 + r)
                    unsafe { *out.add((c0 + c) * ldo + r0 + r) = hsum(acc[r][c]) + macc[r][c] };
                }
            }
        }

        /// Tile of R weight rows x C activation rows, Q8_0 weights.
        #[target_feature(enable = $features)]
        unsafe fn $q80<const R: usize, const C: usize>(
            w: &Weights<'_>,
            r0: usize,
            x: &QuantizedActs,
            c0: usize,
            out: *mut f32,
            ldo: usize,
        ) {
            let nb = w.blocks_per_row();
            let mut acc = [[_mm256_setzero_ps(); C]; R];
            let (qs, xq) = (w.qs.as_ptr(), x.qs.as_ptr());
            for b in 0..nb {
                let mut xv = [_mm256_setzero_si256(); C];
                let mut xd = [0f32; C];
                for c in 0..C {
                    let i = (c0 + c) * nb + b;
                    // Safety: as above
                    unsafe {
                        xv[c] = _mm256_loadu_si256(xq.add(i * BLOCK) as *const __m256i);
                        xd[c] = *x.d.get_unchecked(i);
                    }
                }
                for r in 0..R {
                    let i = (r0 + r) * nb + b;
                    // Safety: as above
                    let (wv, wd) = unsafe {
                        (
                            _mm256_loadu_si256(qs.add(i * BLOCK) as *const __m256i),
                            *w.d.get_unchecked(i),
                        )
                    };
                    let wabs = _mm256_sign_epi8(wv, wv);
                    for c in 0..C {
                        let xs = _mm256_sign_epi8(xv[c], wv);
                        let p = _mm256_cvtepi32_ps($dot(wabs, xs));
                        acc[r][c] = _mm256_fmadd_ps(_mm256_set1_ps(wd * xd[c]), p, acc[r][c]);
                    }
                }
            }
            for r in 0..R {
                for c in 0..C {
                    // Safety: as above
                    unsafe { *out.add((c0 + c) * ldo + r0 + r) = hsum(acc[r][c]) };
                }
            }
        }

        /// All tiles of weight rows `rows`.
        ///
        /// # Safety
        /// The CPU has `$features`; `out` covers `x.rows` rows of `ldo >= w.n`.
        pub(super) unsafe fn $gemm(
            w: &Weights<'_>,
            rows: Range<usize>,
            x: &QuantizedActs,
            out: *mut f32,
            ldo: usize,
        ) {
            // Safety: forwarded from the caller
            unsafe {
                match w.kind {
                    BlockKind::Q4_1 => drive_tiles!($q41, w, rows, x, out, ldo),
                    BlockKind::Q8_0 => drive_tiles!($q80, w, rows, x, out, ldo),
                }
            }
        }
    };
}

kernels!(gemm_avx2, q41_avx2, q80_avx2, "avx2,fma", dot_avx2);
kernels!(
    gemm_vnni,
    q41_vnni,
    q80_vnni,
    "avx2,fma,avx512vnni,avx512vl",
    dot_vnni
);
