//! x86-64 kernels: AVX2 (`vpmaddubsw` u8 x i8 pairs, `vpmaddwd` to i32) and AVX-512 VNNI
//! (`vpdpbusd`, the same in one instruction), on 256-bit registers holding 4 values of each of
//! 8 rows (one row per 32-bit lane), multiplied by 4 activation bytes broadcast to every lane.
//!
//! Q4_1's nibbles are unsigned, the activations signed: exactly the u8 x i8 form both
//! instructions take; Q4_0 runs the same kernel, its f16 scales widened by F16C
//! (`vcvtph2ps`, which every AVX2 CPU has) and its minimum made as `-8 d`. Q8_0 x Q8_0 is signed x signed: ggml's trick moves the weight's sign onto
//! the activation (`vpsignb`) and multiplies by the weight's magnitude; the other 8-bit forms
//! take the same path.

use std::arch::x86_64::*;
use std::ops::Range;

use super::super::packed::{GROUP, Packed, values_offset};
use super::super::{BLOCK, BlockKind, QuantizedActs};
use super::{EIGHT_BIT, EIGHT_BIT_HALF, EIGHT_BIT_MIN, Out, drive_tiles};

/// `acc + sum of u8 x i8 products of each 32-bit lane`.
#[target_feature(enable = "avx2")]
fn dp_avx2(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
    // |pair sum| <= 2 * 255 * 128 only for bytes the kernels never make: nibbles (<= 15) and
    // magnitudes (<= 128) times |x| <= 127 stay below i16's limit
    _mm256_add_epi32(
        acc,
        _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)),
    )
}

#[target_feature(enable = "avx2,avx512vnni,avx512vl")]
fn dp_vnni(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(acc, a, b)
}

/// 4 activation bytes at `p`, in every lane.
#[target_feature(enable = "avx2")]
unsafe fn bcast4(p: *const i8) -> __m256i {
    // SAFETY: the caller's p has 4 readable bytes
    _mm256_set1_epi32(unsafe { std::ptr::read_unaligned(p as *const i32) })
}

macro_rules! kernels {
    ($gemm:ident, $q41:ident, $q80:ident, $features:literal, $dp:ident) => {
        /// One group of 8 Q4_1 (or, `Z`, Q4_0) rows x C activation rows.
        #[target_feature(enable = $features)]
        unsafe fn $q41<const C: usize, const Z: bool>(
            w: &Packed<'_>,
            g: usize,
            x: &QuantizedActs,
            c0: usize,
            out: Out,
        ) {
            let nb = w.blocks_per_row();
            let mut acc = [_mm256_setzero_ps(); C];
            let mask = _mm256_set1_epi8(0x0f);
            let vo = values_offset(w.kind);
            for b in 0..nb {
                let blk = w.group_block(g, b).as_ptr();
                // two chains for one activation row, so the dot products overlap
                let mut lo_sum = [_mm256_setzero_si256(); C];
                let mut hi_sum = [_mm256_setzero_si256(); C];
                for v in 0..4 {
                    // SAFETY: a group block holds 4 vectors of 32 bytes after the scales
                    let raw = unsafe { _mm256_loadu_si256(blk.add(vo + v * 32) as *const __m256i) };
                    let lo = _mm256_and_si256(raw, mask);
                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), mask);
                    for c in 0..C {
                        // SAFETY: row c0 + c of x has nb blocks of 32 bytes
                        let xp = unsafe { x.qs.as_ptr().add((c0 + c) * w.k + b * BLOCK + v * 8) };
                        // SAFETY: xp..xp + 8 lie in that block
                        let (x0, x1) = unsafe { (bcast4(xp), bcast4(xp.add(4))) };
                        if C == 1 {
                            lo_sum[c] = $dp(lo_sum[c], lo, x0);
                            hi_sum[c] = $dp(hi_sum[c], hi, x1);
                        } else {
                            lo_sum[c] = $dp($dp(lo_sum[c], lo, x0), hi, x1);
                        }
                    }
                }
                let (d, m) = if Z {
                    // SAFETY: Q4_0's 8 f16 scales are the block's first 16 bytes
                    let d = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(blk as *const __m128i) });
                    (d, _mm256_mul_ps(d, _mm256_set1_ps(-8.0)))
                } else {
                    // SAFETY: Q4_1's scales and minimums are the block's first 64 bytes
                    unsafe {
                        (
                            _mm256_loadu_ps(blk as *const f32),
                            _mm256_loadu_ps(blk.add(GROUP * 4) as *const f32),
                        )
                    }
                };
                for c in 0..C {
                    let xi = (c0 + c) * nb + b;
                    let sum = if C == 1 {
                        _mm256_add_epi32(lo_sum[c], hi_sum[c])
                    } else {
                        lo_sum[c]
                    };
                    let dd = _mm256_mul_ps(d, _mm256_set1_ps(x.d[xi]));
                    acc[c] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(sum), acc[c]);
                    acc[c] = _mm256_fmadd_ps(m, _mm256_set1_ps(x.s[xi]), acc[c]);
                }
            }
            for c in 0..C {
                let mut lanes = [0f32; GROUP];
                // SAFETY: lanes holds 8 f32
                unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[c]) };
                // SAFETY: the caller owns this group's columns
                unsafe { out.write_group(c0 + c, g, w.n, &lanes) };
            }
        }

        /// One group of 8 rows of an 8-bit form (`K`, see `EIGHT_BIT*`) x C activation rows.
        #[target_feature(enable = $features)]
        unsafe fn $q80<const C: usize, const K: u8>(
            w: &Packed<'_>,
            g: usize,
            x: &QuantizedActs,
            c0: usize,
            out: Out,
        ) {
            let nb = w.blocks_per_row();
            let mut acc = [_mm256_setzero_ps(); C];
            let vo = values_offset(w.kind);
            let (half, min) = (K == EIGHT_BIT_HALF, K == EIGHT_BIT_MIN);
            for b in 0..nb {
                let blk = w.group_block(g, b).as_ptr();
                let mut even = [_mm256_setzero_si256(); C];
                let mut odd = [_mm256_setzero_si256(); C];
                for ch in 0..8 {
                    // SAFETY: a group block holds 8 vectors of 32 bytes after the scales
                    let wv = unsafe { _mm256_loadu_si256(blk.add(vo + ch * 32) as *const __m256i) };
                    let wabs = _mm256_sign_epi8(wv, wv);
                    for c in 0..C {
                        // SAFETY: as above
                        let xb = unsafe {
                            bcast4(x.qs.as_ptr().add((c0 + c) * w.k + b * BLOCK + ch * 4))
                        };
                        let xs = _mm256_sign_epi8(xb, wv);
                        // two scales: values 16..32 (chunks 4..8) sum apart; one: two chains
                        // for one activation row, so the dot products overlap
                        if (half && ch >= 4) || (!half && C == 1 && ch % 2 == 1) {
                            odd[c] = $dp(odd[c], wabs, xs);
                        } else {
                            even[c] = $dp(even[c], wabs, xs);
                        }
                    }
                }
                // SAFETY: the scales are the block's first 32 bytes, the second plane (the
                // minimums or second scales) the next 32 when the form has one
                let (d, second) = unsafe {
                    (
                        _mm256_loadu_ps(blk as *const f32),
                        if half || min {
                            _mm256_loadu_ps(blk.add(GROUP * 4) as *const f32)
                        } else {
                            _mm256_setzero_ps()
                        },
                    )
                };
                for c in 0..C {
                    let xi = (c0 + c) * nb + b;
                    let xd = _mm256_set1_ps(x.d[xi]);
                    if half {
                        let (d0, d1) = (_mm256_mul_ps(d, xd), _mm256_mul_ps(second, xd));
                        acc[c] = _mm256_fmadd_ps(d0, _mm256_cvtepi32_ps(even[c]), acc[c]);
                        acc[c] = _mm256_fmadd_ps(d1, _mm256_cvtepi32_ps(odd[c]), acc[c]);
                        continue;
                    }
                    let sum = _mm256_add_epi32(even[c], odd[c]);
                    let dd = _mm256_mul_ps(d, xd);
                    acc[c] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(sum), acc[c]);
                    if min {
                        acc[c] = _mm256_fmadd_ps(second, _mm256_set1_ps(x.s[xi]), acc[c]);
                    }
                }
            }
            for c in 0..C {
                let mut lanes = [0f32; GROUP];
                // SAFETY: lanes holds 8 f32
                unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[c]) };
                // SAFETY: the caller owns this group's columns
                unsafe { out.write_group(c0 + c, g, w.n, &lanes) };
            }
        }

        /// Every tile of row groups `groups`.
        ///
        /// # Safety
        /// The CPU has `$features`; see `run_groups`.
        pub(super) unsafe fn $gemm(
            w: &Packed<'_>,
            groups: Range<usize>,
            x: &QuantizedActs,
            out: Out,
        ) {
            // SAFETY: forwarded from the caller
            unsafe {
                match w.kind {
                    BlockKind::Q4_0 => drive_tiles!($q41::<true>, w, groups, x, out),
                    BlockKind::Q4_1 => drive_tiles!($q41::<false>, w, groups, x, out),
                    BlockKind::Q8_0 => drive_tiles!($q80::<EIGHT_BIT>, w, groups, x, out),
                    BlockKind::Q8Min => drive_tiles!($q80::<EIGHT_BIT_MIN>, w, groups, x, out),
                    BlockKind::Q8Half => drive_tiles!($q80::<EIGHT_BIT_HALF>, w, groups, x, out),
                }
            }
        }
    };
}

kernels!(gemm_avx2, q41_avx2, q80_avx2, "avx2,fma,f16c", dp_avx2);
kernels!(
    gemm_vnni,
    q41_vnni,
    q80_vnni,
    "avx2,fma,f16c,avx512vnni,avx512vl",
    dp_vnni
);
