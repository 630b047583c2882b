//! The 4-bit forms (Q4_1, Q4_0, Q4_K) on 512-bit registers: two row groups at once, 16 rows,
//! one per 32-bit lane (group `g` in lanes 0..8, `g + 1` in 8..16), so each activation
//! broadcast, `vpdpbusd` and scale step serves 16 rows where the 256-bit kernel ([`super::x86`])
//! serves 8. On a core with 512-bit data paths (Zen 5, Intel's server cores) that is twice the
//! multiply-adds per instruction; several activation rows (answers decoded together, prefill)
//! are where the 256-bit kernel was bound by its instructions rather than by the weights' reads.
//!
//! Each lane does exactly what the 256-bit kernel does for its row (integer sums, then the same
//! `d * xd`, the same two fused multiply-adds per block), so a product has the same bits on
//! either kernel, and in a tile of any height.

use std::arch::x86_64::*;
use std::ops::Range;

use super::super::packed::{GROUP, Packed};
use super::super::{BLOCK, BlockKind, QuantizedActs};
use super::x86::four_bit;
use super::{FOUR_BIT, FOUR_BIT_K, FOUR_BIT_ZERO, Out, drive_tiles};

/// `lo` in lanes 0..8, `hi` in 8..16.
#[target_feature(enable = "avx512f")]
fn join_ps(lo: __m256, hi: __m256) -> __m512 {
    _mm512_castpd_ps(_mm512_insertf64x4::<1>(
        _mm512_castpd256_pd512(_mm256_castps_pd(lo)),
        _mm256_castps_pd(hi),
    ))
}

/// 4 activation bytes at `p`, in every lane.
///
/// # Safety
/// `p` has 4 readable bytes.
#[target_feature(enable = "avx512f")]
unsafe fn bcast4(p: *const i8) -> __m512i {
    // SAFETY: the caller's p has 4 readable bytes
    _mm512_set1_epi32(unsafe { std::ptr::read_unaligned(p as *const i32) })
}

/// Row groups `g` and `g + 1` of a 4-bit form (`F`: Q4_1, Q4_0 or Q4_K) x C activation rows.
///
/// # Safety
/// The CPU has the features below; `g + 1` is a group of `w`, of `F`'s kind; `out` as
/// [`super::run_groups`] asks, for both groups.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vl,avx2,fma,f16c")]
unsafe fn pair<const C: usize, const F: u8>(
    w: &Packed<'_>,
    g: usize,
    x: &QuantizedActs,
    c0: usize,
    out: Out,
) {
    let nb = w.blocks_per_row();
    let mut acc = [_mm512_setzero_ps(); C];
    let mask = _mm512_set1_epi8(0x0f);
    for b in 0..nb {
        // SAFETY: g and g + 1 are groups of w, b a block, of F's kind (the caller's contract)
        let ((va, da, ma), (vb, db, mb)) =
            unsafe { (four_bit::<F>(w, g, b), four_bit::<F>(w, g + 1, b)) };
        let (d, m) = (join_ps(da, db), join_ps(ma, mb));
        // two chains a row while the tile has room for them, as the 256-bit kernel
        let mut lo_sum = [_mm512_setzero_si512(); C];
        let mut hi_sum = [_mm512_setzero_si512(); C];
        for v in 0..4 {
            // SAFETY: each block holds 4 vectors of 32 bytes of values
            let raw = unsafe {
                _mm512_inserti64x4::<1>(
                    _mm512_castsi256_si512(_mm256_loadu_si256(va.add(v * 32) as *const __m256i)),
                    _mm256_loadu_si256(vb.add(v * 32) as *const __m256i),
                )
            };
            let lo = _mm512_and_si512(raw, mask);
            let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), mask);
            for c in 0..C {
                // SAFETY: row c0 + c of x has nb blocks of 32 bytes; xp..xp + 8 lie in one
                let (x0, x1) = unsafe {
                    let xp = x.qs.as_ptr().add((c0 + c) * w.k + b * BLOCK + v * 8);
                    (bcast4(xp), bcast4(xp.add(4)))
                };
                if C <= 4 {
                    lo_sum[c] = _mm512_dpbusd_epi32(lo_sum[c], lo, x0);
                    hi_sum[c] = _mm512_dpbusd_epi32(hi_sum[c], hi, x1);
                } else {
                    lo_sum[c] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(lo_sum[c], lo, x0), hi, x1);
                }
            }
        }
        for c in 0..C {
            let xi = (c0 + c) * nb + b;
            let sum = if C <= 4 {
                _mm512_add_epi32(lo_sum[c], hi_sum[c])
            } else {
                lo_sum[c]
            };
            let dd = _mm512_mul_ps(d, _mm512_set1_ps(x.d[xi]));
            acc[c] = _mm512_fmadd_ps(dd, _mm512_cvtepi32_ps(sum), acc[c]);
            acc[c] = _mm512_fmadd_ps(m, _mm512_set1_ps(x.s[xi]), acc[c]);
        }
    }
    for (c, acc) in acc.iter().enumerate() {
        let mut lanes = [[0f32; GROUP]; 2];
        // SAFETY: lanes holds 16 contiguous f32
        unsafe { _mm512_storeu_ps(lanes.as_mut_ptr() as *mut f32, *acc) };
        // SAFETY: the caller owns both groups' columns
        unsafe {
            out.write_group(c0 + c, g, w.n, &lanes[0]);
            out.write_group(c0 + c, g + 1, w.n, &lanes[1]);
        }
    }
}

/// Every tile of `F`'s row groups `groups` taken two at a time, activation rows walked as
/// every kernel walks them ([`drive_tiles`]: 8 at a time, then 4, 2, 1). Returns the groups left (the last of an odd count).
///
/// # Safety
/// As [`pair`], for every group of `groups`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vl,avx2,fma,f16c")]
unsafe fn pairs<const F: u8>(
    w: &Packed<'_>,
    groups: Range<usize>,
    x: &QuantizedActs,
    out: Out,
) -> Range<usize> {
    let mut g = groups.start;
    while g + 2 <= groups.end {
        // SAFETY: g and g + 1 lie in the caller's groups; each tile starting at g takes both
        unsafe { drive_tiles!(pair::<F>, w, g..g + 1, x, out, eights if true) };
        g += 2;
    }
    g..groups.end
}

/// Activation rows from which the 4-bit forms take the 512-bit tiles: a prompt's chunk, or
/// 8 answers decoded together. Below it each group is read as one stream: the tiles of two
/// groups read two, and with the weights out of cache (every decode step) that cost more than
/// their instructions saved (SmolLM2's 1536 x 576 Q4_1 product over 80 MB of copies, two
/// threads: 1 row 1.52 -> 1.97 ms, 4 rows 1.83 -> 2.28 ms; 8 rows 3.31 -> 2.33-2.72 ms).
const PAIRS_FROM: usize = 8;

/// The 4-bit forms' row groups `groups` in pairs when `x` has [`PAIRS_FROM`] rows or more;
/// returns the groups left to the 256-bit kernel (every group of the forms this kernel does
/// not take or of fewer rows, else the last of an odd count).
///
/// # Safety
/// The CPU has AVX-512 F, BW, VL and VNNI; see `run_groups` for `out`.
pub(super) unsafe fn gemm_pairs(
    w: &Packed<'_>,
    groups: Range<usize>,
    x: &QuantizedActs,
    out: Out,
) -> Range<usize> {
    if x.rows < PAIRS_FROM {
        return groups;
    }
    // SAFETY: forwarded from the caller
    unsafe {
        match w.kind {
            BlockKind::Q4_1 => pairs::<FOUR_BIT>(w, groups, x, out),
            BlockKind::Q4_0 => pairs::<FOUR_BIT_ZERO>(w, groups, x, out),
            BlockKind::Q4K => pairs::<FOUR_BIT_K>(w, groups, x, out),
            _ => groups,
        }
    }
}
