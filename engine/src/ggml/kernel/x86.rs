//! x86-64 kernels: AVX2 (`vpmaddubsw` u8 x i8 pairs, `vpmaddwd` to i32) and AVX-512 VNNI
//! (`vpdpbusd`, the same in one instruction), on 256-bit registers holding 4 values of each of
//! 8 rows (one row per 32-bit lane), multiplied by 4 activation bytes broadcast to every lane.
//!
//! Q4_1's nibbles are unsigned, the activations signed: exactly the u8 x i8 form both
//! instructions take; Q4_0, Q4_K and Q5_0 run the same kernel, their scales made per block
//! ([`four_bit`]: f16 widened by F16C's `vcvtph2ps`, which every AVX2 CPU has), Q5_0's fifth
//! bits added to the nibbles as 16s ([`fifth_bits`]: its values 0..=31 stay unsigned).
//!
//! Q8_0 x Q8_0 is signed x signed: ggml's trick moves the weight's sign onto the activation
//! (`vpsignb`) and multiplies by the weight's magnitude; the other 8-bit forms take the same
//! path.

use std::arch::x86_64::*;
use std::ops::Range;

use super::super::packed::{GROUP, Packed, values_offset};
use super::super::{BLOCK, BlockKind, QuantizedActs};
use super::{
    EIGHT_BIT, EIGHT_BIT_HALF, EIGHT_BIT_MIN, FOUR_BIT, FOUR_BIT_FIVE, FOUR_BIT_K, FOUR_BIT_ZERO,
    Out, drive_tiles,
};

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

/// Block `b` of group `g` of a 4-bit form (`F`, see `FOUR_BIT*`): where its values start, and
/// its 8 rows' scales and minimums as f32, each the same f32 the planes hold.
///
/// # Safety
/// `w` is of `F`'s kind, `g` and `b` a group and block of it.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn four_bit<const F: u8>(
    w: &Packed<'_>,
    g: usize,
    b: usize,
) -> (*const u8, __m256, __m256) {
    let widen = |p: *const u8| {
        // SAFETY: the caller's block holds 8 f16 at p
        _mm256_cvtph_ps(unsafe { _mm_loadu_si128(p as *const __m128i) })
    };
    let bytes = |p: *const u8| {
        // SAFETY: the caller's block holds 8 bytes at p
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(unsafe {
            _mm_loadl_epi64(p as *const __m128i)
        }))
    };
    match F {
        FOUR_BIT_ZERO | FOUR_BIT_FIVE => {
            let blk = w.group_block(g, b).as_ptr();
            let d = widen(blk);
            // SAFETY: the values follow the scales (and Q5_0's fifth bits) in the block
            let vals = unsafe { blk.add(values_offset(w.kind)) };
            let zero = -w.kind.zero_point();
            (vals, d, _mm256_mul_ps(d, _mm256_set1_ps(zero)))
        }
        FOUR_BIT_K => {
            let (head, at) = w.q4k_at(g, b);
            // SAFETY: `q4k_at` gives offsets of a super-block head and a block inside the
            // bytes `Packed::new` checked
            let (head, blk) = unsafe { (w.bytes.as_ptr().add(head), w.bytes.as_ptr().add(at)) };
            // SAFETY: the head holds 8 f16 d then 8 f16 dmin; the block 8 scale and 8
            // minimum bytes, then its values
            let (d, dmin, sc, m, vals) = unsafe {
                (
                    widen(head),
                    widen(head.add(GROUP * 2)),
                    bytes(blk),
                    bytes(blk.add(GROUP)),
                    blk.add(values_offset(BlockKind::Q4K)),
                )
            };
            // -(dmin m) by its sign bit: the planes' negation, zeros included
            let m = _mm256_xor_ps(_mm256_mul_ps(dmin, m), _mm256_set1_ps(-0.0));
            (vals, _mm256_mul_ps(d, sc), m)
        }
        _ => {
            debug_assert_eq!(F, FOUR_BIT);
            let blk = w.group_block(g, b).as_ptr();
            // SAFETY: Q4_1's scales and minimums are the block's first 64 bytes, the values
            // follow
            unsafe {
                (
                    blk.add(values_offset(BlockKind::Q4_1)),
                    _mm256_loadu_ps(blk as *const f32),
                    _mm256_loadu_ps(blk.add(GROUP * 4) as *const f32),
                )
            }
        }
    }
}

/// Q5_0's fifth bits of values `8v..8v + 8` as 16s, in the nibble vectors' order: lane `r`
/// (a row, its 32 bits in `qh`'s lane `r`), byte `t`: value `8v + t` (first), `8v + 4 + t`
/// (second). `spread` is [`spread_index`]`(v)`.
#[target_feature(enable = "avx2")]
#[inline]
fn fifth_bits(qh: __m256i, spread: __m256i) -> (__m256i, __m256i) {
    // byte v of each lane (bits 8v..8v + 8) in its 4 bytes, then bit t / 4 + t of byte t
    let bytes = _mm256_shuffle_epi8(qh, spread);
    let (lo, hi) = (
        _mm256_set1_epi32(0x0804_0201),
        _mm256_set1_epi32(0x8040_2010_u32 as i32),
    );
    let sixteen = _mm256_set1_epi8(0x10);
    let set = |bit: __m256i| {
        _mm256_and_si256(
            _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit),
            sixteen,
        )
    };
    (set(lo), set(hi))
}

/// The shuffle that puts byte `v` of each 32-bit lane in all 4 of its bytes.
#[target_feature(enable = "avx2")]
#[inline]
fn spread_index(v: usize) -> __m256i {
    let lane = _mm256_setr_epi8(
        0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12, 0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12,
        12, 12, 12,
    );
    _mm256_add_epi8(lane, _mm256_set1_epi8(v as i8))
}

/// A tile's sums, `acc[c]` the 8 rows of group `g` for activation row `c0 + c`, into `out`
/// (clipped to `n` rows).
///
/// # Safety
/// As [`Out::write_group`], for every activation row of the tile.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn write_tile<const C: usize>(
    out: Out,
    c0: usize,
    g: usize,
    n: usize,
    acc: &[__m256; C],
) {
    for (c, acc) in acc.iter().enumerate() {
        let mut lanes = [0f32; GROUP];
        // SAFETY: lanes holds 8 f32
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), *acc) };
        // SAFETY: the caller's contract
        unsafe { out.write_group(c0 + c, g, n, &lanes) };
    }
}

/// 4 activation bytes at `p`, in every lane.
#[target_feature(enable = "avx2")]
unsafe fn bcast4(p: *const i8) -> __m256i {
    // SAFETY: the caller's p has 4 readable bytes
    _mm256_set1_epi32(unsafe { std::ptr::read_unaligned(p as *const i32) })
}

macro_rules! kernels {
    // $sum16: the 4-bit kernel sums two vectors' `vpmaddubsw` pairs in 16 bits before widening
    // (AVX2, where widening costs two instructions; VNNI's `vpdpbusd` widens for free)
    // $wide: a prefill's 4-bit products in tiles of 8 activation rows, each weight vector
    // unpacked once per 8 rows (VNNI, whose AVX-512VL gives the 32 vector registers they take)
    ($gemm:ident, $q41:ident, $q80:ident, $features:literal, $dp:ident, $sum16:literal, $wide:literal) => {
        /// One group of 8 rows of a 4-bit form (`F`, see `FOUR_BIT*`) x C activation rows.
        #[target_feature(enable = $features)]
        unsafe fn $q41<const C: usize, const F: u8>(
            w: &Packed<'_>,
            g: usize,
            x: &QuantizedActs,
            c0: usize,
            out: Out,
        ) {
            let nb = w.blocks_per_row();
            let mut acc = [_mm256_setzero_ps(); C];
            let mask = _mm256_set1_epi8(0x0f);
            let spread = [0, 1, 2, 3].map(|v| spread_index(v));
            for b in 0..nb {
                // SAFETY: g and b are a group and block of w, of F's kind (`$gemm`)
                let (vals, d, m) = unsafe { four_bit::<F>(w, g, b) };
                let qh = if F == FOUR_BIT_FIVE {
                    // SAFETY: Q5_0's 8 rows' fifth bits are the 32 bytes before its values
                    unsafe { _mm256_loadu_si256(vals.sub(GROUP * 4) as *const __m256i) }
                } else {
                    _mm256_setzero_si256()
                };
                // two chains for one activation row, so the dot products overlap
                let mut lo_sum = [_mm256_setzero_si256(); C];
                let mut hi_sum = [_mm256_setzero_si256(); C];
                // 16-bit pair sums of two vectors: |4 x 2 x 31 x 127| = 31,496 fits an i16
                let mut s16 = [_mm256_setzero_si256(); C];
                for v in 0..4 {
                    // SAFETY: a block holds 4 vectors of 32 bytes of values
                    let raw = unsafe { _mm256_loadu_si256(vals.add(v * 32) as *const __m256i) };
                    let mut lo = _mm256_and_si256(raw, mask);
                    let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), mask);
                    if F == FOUR_BIT_FIVE {
                        let (l5, h5) = fifth_bits(qh, spread[v]);
                        lo = _mm256_or_si256(lo, l5);
                        hi = _mm256_or_si256(hi, h5);
                    }
                    for c in 0..C {
                        // SAFETY: row c0 + c of x has nb blocks of 32 bytes
                        let xp = unsafe { x.qs.as_ptr().add((c0 + c) * w.k + b * BLOCK + v * 8) };
                        // SAFETY: xp..xp + 8 lie in that block
                        let (x0, x1) = unsafe { (bcast4(xp), bcast4(xp.add(4))) };
                        if $sum16 {
                            let pairs = _mm256_add_epi16(
                                _mm256_maddubs_epi16(lo, x0),
                                _mm256_maddubs_epi16(hi, x1),
                            );
                            if v % 2 == 0 {
                                s16[c] = pairs;
                            } else {
                                let s = _mm256_add_epi16(s16[c], pairs);
                                let s = _mm256_madd_epi16(s, _mm256_set1_epi16(1));
                                // the two flushes on two chains, as below
                                if v == 1 {
                                    lo_sum[c] = _mm256_add_epi32(lo_sum[c], s);
                                } else {
                                    hi_sum[c] = _mm256_add_epi32(hi_sum[c], s);
                                }
                            }
                        } else if C <= 4 {
                            // two chains a row: `vpdpbusd`'s latency (4-5 cycles) over 8
                            // chained products a block would bound the tile, not its throughput
                            lo_sum[c] = $dp(lo_sum[c], lo, x0);
                            hi_sum[c] = $dp(hi_sum[c], hi, x1);
                        } else {
                            // 8 rows: one chain a row, so the tile's registers fit in 32
                            lo_sum[c] = $dp($dp(lo_sum[c], lo, x0), hi, x1);
                        }
                    }
                }
                for c in 0..C {
                    let xi = (c0 + c) * nb + b;
                    let sum = if C <= 4 || $sum16 {
                        _mm256_add_epi32(lo_sum[c], hi_sum[c])
                    } else {
                        lo_sum[c]
                    };
                    let dd = _mm256_mul_ps(d, _mm256_set1_ps(x.d[xi]));
                    acc[c] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(sum), acc[c]);
                    acc[c] = _mm256_fmadd_ps(m, _mm256_set1_ps(x.s[xi]), acc[c]);
                }
            }
            // SAFETY: the caller owns this group's columns
            unsafe { write_tile(out, c0, g, w.n, &acc) };
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
                        // a row, so the dot products overlap (latency, not throughput, bounds
                        // one chain of 8)
                        if (half && ch >= 4) || (!half && (C == 1 || ($wide && C <= 4)) && ch % 2 == 1) {
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
            // SAFETY: the caller owns this group's columns
            unsafe { write_tile(out, c0, g, w.n, &acc) };
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
                    BlockKind::Q4_0 => {
                        drive_tiles!($q41::<FOUR_BIT_ZERO>, w, groups, x, out, eights if $wide)
                    }
                    BlockKind::Q4K => {
                        drive_tiles!($q41::<FOUR_BIT_K>, w, groups, x, out, eights if $wide)
                    }
                    BlockKind::Q5_0 => {
                        drive_tiles!($q41::<FOUR_BIT_FIVE>, w, groups, x, out, eights if $wide)
                    }
                    BlockKind::Q4_1 => {
                        drive_tiles!($q41::<FOUR_BIT>, w, groups, x, out, eights if $wide)
                    }
                    BlockKind::Q8_0 => drive_tiles!($q80::<EIGHT_BIT>, w, groups, x, out),
                    BlockKind::Q8Min => drive_tiles!($q80::<EIGHT_BIT_MIN>, w, groups, x, out),
                    BlockKind::Q8Half => drive_tiles!($q80::<EIGHT_BIT_HALF>, w, groups, x, out),
                }
            }
        }
    };
}

kernels!(
    gemm_avx2,
    q41_avx2,
    q80_avx2,
    "avx2,fma,f16c",
    dp_avx2,
    true,
    false
);
kernels!(
    gemm_vnni,
    q41_vnni,
    q80_vnni,
    "avx2,fma,f16c,avx512vnni,avx512vl",
    dp_vnni,
    false,
    true
);
