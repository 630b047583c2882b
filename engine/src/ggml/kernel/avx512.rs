//! The 4-bit forms (Q4_1, Q4_0, Q4_K) on 512-bit registers: two row groups at once, 16 rows,
//! one per 32-bit lane (group `g` in lanes 0..8, `g + 1` in 8..16), so each activation
//! broadcast, `vpdpbusd` and scale step serves 16 rows where the 256-bit kernel ([`super::x86`])
//! serves 8. On a core with 512-bit data paths (Zen 5, Intel's server cores) that is twice the
//! multiply-adds per instruction; several activation rows (answers decoded together, prefill)
//! are where the 256-bit kernel was bound by its instructions rather than by the weights' reads.
//!
//! From 2 to 7 activation rows (a decode step of 2 to 7 answers) the 4-bit forms and the
//! 8-bit forms with one scale take [`spread`] and [`spread8`]: one group, 8 rows, each row's 8
//! values in a 64-bit lane against one 64-bit activation broadcast, half the 256-bit kernel's
//! `vpdpbusd`s (SmolLM2's 1536 x 576 products in cache, one thread, `gemm_bench 2 4`, GMAC/s:
//! Q4_1 135 -> 156 at 2 rows, 165 -> 194 at 4; Q8_0 at 4 rows 85 on AVX2 -> 161).
//!
//! Each lane does exactly what the 256-bit kernel does for its row (integer sums, then the same
//! `d * xd`, the same two fused multiply-adds per block), so a product has the same bits on
//! either kernel, and in a tile of any height.

use std::arch::x86_64::*;
use std::ops::Range;

use super::super::packed::{GROUP, Packed, values_offset};
use super::super::{BLOCK, BlockKind, QuantizedActs};
use super::x86::{four_bit, write_tile};
use super::{EIGHT_BIT, EIGHT_BIT_MIN, FOUR_BIT, FOUR_BIT_K, FOUR_BIT_ZERO, Out, drive_tiles};

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

/// Activation row `r`'s 8 bytes from byte `at` in every 64-bit lane.
///
/// # Safety
/// Row `r` of `x` has 8 bytes from `at`.
#[target_feature(enable = "avx512f")]
unsafe fn bcast8(x: &QuantizedActs, r: usize, at: usize) -> __m512i {
    // SAFETY: the caller's bytes
    _mm512_set1_epi64(unsafe {
        std::ptr::read_unaligned(x.qs.as_ptr().add(r * x.k + at) as *const i64)
    })
}

/// Each row's sum from its two chains of 64-bit lanes (a row's halves in a lane's two 32-bit
/// halves): added as integers (exact), one 32-bit lane a row, the 256-bit kernel's layout.
#[target_feature(enable = "avx512f")]
fn row_sums(even: __m512i, odd: __m512i) -> __m256i {
    let s = _mm512_add_epi32(even, odd);
    // the high half added into the low one, which the narrowing keeps
    _mm512_cvtepi64_epi32(_mm512_add_epi32(s, _mm512_srli_epi64::<32>(s)))
}

/// One row group of a 4-bit form (`F`: Q4_1, Q4_0 or Q4_K) x C activation rows, for the few
/// rows of a decode step: each 32-bit lane of a group's 256-bit vector (4 bytes of one row)
/// widened to 64 bits, its low nibbles in the low half and its high nibbles in the high half,
/// so one `vpdpbusd` takes 8 values of each of the 8 rows against one 64-bit broadcast of 8
/// activation bytes, where the 256-bit kernel takes two. One group, one stream of weights, as
/// the 256-bit kernel reads them. A row's two halves are summed as integers before the scale
/// step (exact), which is then the 256-bit kernel's, lane for lane: the same bits.
///
/// # Safety
/// The CPU has the features below; `g` is a group of `w`, of `F`'s kind; `out` as
/// [`super::run_groups`] asks.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vl,avx2,fma,f16c")]
unsafe fn spread<const C: usize, const F: u8>(
    w: &Packed<'_>,
    g: usize,
    x: &QuantizedActs,
    c0: usize,
    out: Out,
) {
    let nb = w.blocks_per_row();
    let mut acc = [_mm256_setzero_ps(); C];
    let mask = _mm512_set1_epi8(0x0f);
    for b in 0..nb {
        // SAFETY: g and b are a group and block of w, of F's kind (the caller's contract)
        let (vals, d, m) = unsafe { four_bit::<F>(w, g, b) };
        // two chains a row (even and odd vectors), so the dot products overlap
        let mut even = [_mm512_setzero_si512(); C];
        let mut odd = [_mm512_setzero_si512(); C];
        for v in 0..4 {
            // SAFETY: each block holds 4 vectors of 32 bytes of values
            let q = _mm512_cvtepu32_epi64(unsafe {
                _mm256_loadu_si256(vals.add(v * 32) as *const __m256i)
            });
            // (q | q << 28) & 0x0f..: the low half's nibbles, then the high half's in bits 32..
            let t = _mm512_ternarylogic_epi64::<0xa8>(q, _mm512_slli_epi64::<28>(q), mask);
            for c in 0..C {
                // SAFETY: row c0 + c of x has nb blocks of 32 bytes; v * 8 + 8 <= 32
                let x8 = unsafe { bcast8(x, c0 + c, b * BLOCK + v * 8) };
                if v % 2 == 0 {
                    even[c] = _mm512_dpbusd_epi32(even[c], t, x8);
                } else {
                    odd[c] = _mm512_dpbusd_epi32(odd[c], t, x8);
                }
            }
        }
        for c in 0..C {
            let sum = row_sums(even[c], odd[c]);
            let xi = (c0 + c) * nb + b;
            let dd = _mm256_mul_ps(d, _mm256_set1_ps(x.d[xi]));
            acc[c] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(sum), acc[c]);
            acc[c] = _mm256_fmadd_ps(m, _mm256_set1_ps(x.s[xi]), acc[c]);
        }
    }
    // SAFETY: the caller owns this group's columns
    unsafe { write_tile(out, c0, g, w.n, &acc) };
}

/// One row group of an 8-bit form with one scale a block (`K`: Q8_0, Q8_MIN) x C activation
/// rows on 512-bit registers: two of the group's 256-bit vectors (values `4ch..4ch + 4` and
/// the next 4 of each row) interleaved so a row's 8 values sit in one 64-bit lane, against
/// one 64-bit broadcast of 8 activation bytes: one `vpdpbusd` where the 256-bit kernel
/// ([`super::x86`]) takes two. The sign moved onto the activation as there; a row's two halves
/// summed as integers before the scale step, which is the 256-bit kernel's: the same bits.
///
/// # Safety
/// As [`spread`], `w` of `K`'s kind.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vl,avx2,fma,f16c")]
unsafe fn spread8<const C: usize, const K: u8>(
    w: &Packed<'_>,
    g: usize,
    x: &QuantizedActs,
    c0: usize,
    out: Out,
) {
    let nb = w.blocks_per_row();
    let mut acc = [_mm256_setzero_ps(); C];
    let vo = values_offset(w.kind);
    // lane 2r: row r of the first vector, lane 2r + 1: row r of the second
    let pairs = _mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
    for b in 0..nb {
        let blk = w.group_block(g, b).as_ptr();
        let mut even = [_mm512_setzero_si512(); C];
        let mut odd = [_mm512_setzero_si512(); C];
        for p in 0..4 {
            // SAFETY: a group block holds 8 vectors of 32 bytes after the scales
            let wv = _mm512_permutexvar_epi32(pairs, unsafe {
                _mm512_loadu_si512(blk.add(vo + p * 64) as *const __m512i)
            });
            let wabs = _mm512_abs_epi8(wv);
            // the weights' signs moved onto the activations: -x where w < 0 (where w == 0,
            // `vpsignb`'s zero is the product's anyway: |w| is 0)
            let neg = _mm512_movepi8_mask(wv);
            for c in 0..C {
                // SAFETY: as in `spread`
                let x8 = unsafe { bcast8(x, c0 + c, b * BLOCK + p * 8) };
                let xs = _mm512_mask_sub_epi8(x8, neg, _mm512_setzero_si512(), x8);
                if p % 2 == 0 {
                    even[c] = _mm512_dpbusd_epi32(even[c], wabs, xs);
                } else {
                    odd[c] = _mm512_dpbusd_epi32(odd[c], wabs, xs);
                }
            }
        }
        // SAFETY: the scales are the block's first 32 bytes, Q8_MIN's minimums the next 32
        let (d, min) = unsafe {
            (
                _mm256_loadu_ps(blk as *const f32),
                _mm256_loadu_ps(blk.add(GROUP * 4) as *const f32),
            )
        };
        for c in 0..C {
            let sum = row_sums(even[c], odd[c]);
            let xi = (c0 + c) * nb + b;
            let dd = _mm256_mul_ps(d, _mm256_set1_ps(x.d[xi]));
            acc[c] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(sum), acc[c]);
            if K == EIGHT_BIT_MIN {
                acc[c] = _mm256_fmadd_ps(min, _mm256_set1_ps(x.s[xi]), acc[c]);
            }
        }
    }
    // SAFETY: the caller owns this group's columns
    unsafe { write_tile(out, c0, g, w.n, &acc) };
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

/// Activation rows from which [`spread`] and [`spread8`] take the decode step: one answer's
/// step stays on the 256-bit kernel, which read the weights from memory as fast or faster in
/// the daemon (its steps' products are bound by the weights' reads, not instructions).
const SPREAD_FROM: usize = 2;

/// The 4-bit forms' row groups `groups` in pairs when `x` has [`PAIRS_FROM`] rows or more,
/// else from [`SPREAD_FROM`] rows one group at a time on [`spread`] (and Q8_0's, Q8_MIN's on
/// [`spread8`]); returns the groups left to the 256-bit kernel (all of them for one row or a
/// form neither takes, else the last of an odd count of pairs).
///
/// # Safety
/// The CPU has AVX-512 F, BW, VL and VNNI; see `run_groups` for `out`.
pub(super) unsafe fn gemm_512(
    w: &Packed<'_>,
    groups: Range<usize>,
    x: &QuantizedActs,
    out: Out,
) -> Range<usize> {
    if x.rows < SPREAD_FROM {
        return groups;
    }
    if x.rows < PAIRS_FROM {
        // SAFETY: forwarded from the caller
        unsafe {
            match w.kind {
                BlockKind::Q4_1 => drive_tiles!(spread::<FOUR_BIT>, w, groups.clone(), x, out),
                BlockKind::Q4_0 => {
                    drive_tiles!(spread::<FOUR_BIT_ZERO>, w, groups.clone(), x, out)
                }
                BlockKind::Q4K => drive_tiles!(spread::<FOUR_BIT_K>, w, groups.clone(), x, out),
                BlockKind::Q8_0 => drive_tiles!(spread8::<EIGHT_BIT>, w, groups.clone(), x, out),
                BlockKind::Q8Min => {
                    drive_tiles!(spread8::<EIGHT_BIT_MIN>, w, groups.clone(), x, out)
                }
                _ => return groups,
            }
        }
        return groups.end..groups.end;
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
