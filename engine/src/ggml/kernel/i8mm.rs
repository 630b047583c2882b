//! aarch64 kernel with the 8-bit matrix-multiply extension (Armv8.6 `i8mm`): `smmla` multiplies
//! a 2x8 block of i8 by the transpose of another, into a 2x2 block of i32 sums. Here the first
//! is 2 weight rows by 8 consecutive values, the second 2 activation rows by the same 8: one
//! instruction does 32 multiply-adds where `sdot` does 16. It pays when there are pairs of
//! activation rows (prefill, and the value + remainder rows of precise products); a single row
//! goes to the `sdot` kernel, as ggml does.
//!
//! The packed layout (see [`super::super::packed`]) is the other kernels': a 16-byte half holds
//! 4 values of each of 4 rows, and the next 4 values of the same rows sit in the high nibbles
//! (Q4_1) or the next vector (Q8_0). One 32-bit zip of the two gives 8 consecutive values of
//! 2 rows, `smmla`'s operand, so no second copy of the weights is packed.
//!
//! `smmla` is written as inline assembly: its intrinsic (`vmmlaq_s32`) is not stable Rust.

use std::arch::aarch64::*;
use std::ops::Range;

use super::super::packed::{GROUP, Packed, values_offset};
use super::super::{BLOCK, BlockKind, QuantizedActs};
use super::arm;
use super::{FOUR_BIT, FOUR_BIT_FIVE, FOUR_BIT_K, FOUR_BIT_ZERO, Out};

/// `acc + a * transpose(b)`: `a` and `b` are 2x8 i8 (row-major, a row per 8 bytes), `acc` the
/// 2x2 i32 result row-major: lane `2 i + j` gains `sum_t a[i][t] * b[j][t]`.
#[target_feature(enable = "neon,i8mm")]
fn mmla(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    // SAFETY: one register-only instruction of an extension the caller's features include
    unsafe {
        std::arch::asm!(
            "smmla {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    acc
}

/// Values `8v..8v+4` (first) and `8v+4..8v+8` (second) of rows `4h..4h+4` of a group block,
/// 4 bytes per row.
///
/// # Safety
/// `vals` are a block's values of a 4-bit form (`Q41`) or Q8_0, `v < 4`, `h < 2`.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn values<const Q41: bool, const F: u8>(
    vals: *const u8,
    v: usize,
    h: usize,
) -> (int8x16_t, int8x16_t) {
    if Q41 {
        // vector v holds values 8v + t (low nibbles) and 8v + 4 + t (high nibbles)
        // SAFETY: the caller's block holds 4 vectors of 32 bytes of values
        let raw = unsafe { vld1q_u8(vals.add(v * 32 + h * 16)) };
        let (mut lo, mut hi) = (vandq_u8(raw, vdupq_n_u8(0x0f)), vshrq_n_u8::<4>(raw));
        if F == FOUR_BIT_FIVE {
            // SAFETY: Q5_0's 8 rows' fifth bits are the 32 bytes before its values
            let qh = unsafe { vld1q_u8(vals.sub(32 - h * 16)) };
            let (l5, h5) = arm::fifth_bits(qh, v);
            (lo, hi) = (vorrq_u8(lo, l5), vorrq_u8(hi, h5));
        }
        (vreinterpretq_s8_u8(lo), vreinterpretq_s8_u8(hi))
    } else {
        // vector c holds values 4c + t: vectors 2v and 2v + 1
        // SAFETY: the caller's block holds 8 vectors of 32 bytes of values
        unsafe {
            (
                vld1q_s8(vals.add(2 * v * 32 + h * 16) as *const i8),
                vld1q_s8(vals.add((2 * v + 1) * 32 + h * 16) as *const i8),
            )
        }
    }
}

/// Per activation pair `q`, the `nb` per-block values (scales or sums) of rows `c0 + 2q` and
/// `c0 + 2q + 1`.
fn pairs<const P: usize>(v: &[f32], nb: usize, c0: usize) -> [(&[f32], &[f32]); P] {
    let row = |c: usize| &v[c * nb..(c + 1) * nb];
    std::array::from_fn(|q| (row(c0 + 2 * q), row(c0 + 2 * q + 1)))
}

/// One group of 8 rows x `2 P` activation rows from `c0`: a 4-bit form (`Q41`; `F`, see
/// `FOUR_BIT*`) or Q8_0.
///
/// Sums (`sum[p][q]`) and totals (`acc[q][p]`) are kept per row pair `p` (rows `2p`, `2p + 1`)
/// and activation pair `q` (rows `c0 + 2q`, `c0 + 2q + 1`), lanes in `smmla`'s order:
/// (r0, c0), (r0, c1), (r1, c0), (r1, c1).
///
/// # Safety
/// The CPU has NEON and i8mm; `g` is a group of `w`, rows `c0..c0 + 2P` are rows of `x`, and
/// the caller owns the group's columns of `out`.
#[target_feature(enable = "neon,i8mm")]
unsafe fn tile<const Q41: bool, const F: u8, const P: usize>(
    w: &Packed<'_>,
    g: usize,
    x: &QuantizedActs,
    c0: usize,
    out: Out,
) {
    let nb = w.blocks_per_row();
    // each activation row's scales and sums sliced once, so the block loop checks no bounds
    let (xd, xs) = (pairs::<P>(&x.d, nb, c0), pairs::<P>(&x.s, nb, c0));
    let mut acc = [[vdupq_n_f32(0.0); 4]; P];
    for b in 0..nb {
        let (vals, d, m) = if Q41 {
            // SAFETY: g and b are a group and block of w, of F's kind (`gemm_i8mm`)
            unsafe { arm::four_bit::<F>(w, g, b) }
        } else {
            let blk = w.group_block(g, b).as_ptr();
            // SAFETY: Q8_0's block opens with 8 f32 scales, then its values
            unsafe {
                let ld = |o: usize| vld1q_f32(blk.add(o) as *const f32);
                let d = [ld(0), ld(16)];
                (blk.add(values_offset(BlockKind::Q8_0)), d, d)
            }
        };
        let mut sum = [[vdupq_n_s32(0); P]; 4];
        for v in 0..4 {
            let mut xb = [vdupq_n_s8(0); P];
            for (q, xb) in xb.iter_mut().enumerate() {
                // SAFETY: rows c0 + 2q and c0 + 2q + 1 of x have nb blocks of 32 bytes
                let at = |c: usize| unsafe { x.qs.as_ptr().add(c * w.k + b * BLOCK + v * 8) };
                // SAFETY: 8 bytes at each of those rows' offset lie in their block
                *xb = unsafe { vcombine_s8(vld1_s8(at(c0 + 2 * q)), vld1_s8(at(c0 + 2 * q + 1))) };
            }
            for h in 0..2 {
                // SAFETY: the caller's group block, v < 4, h < 2
                let (lo, hi) = unsafe { values::<Q41, F>(vals, v, h) };
                let (lo, hi) = (vreinterpretq_s32_s8(lo), vreinterpretq_s32_s8(hi));
                // rows 4h, 4h + 1 and rows 4h + 2, 4h + 3, 8 consecutive values each
                let a0 = vreinterpretq_s8_s32(vzip1q_s32(lo, hi));
                let a1 = vreinterpretq_s8_s32(vzip2q_s32(lo, hi));
                for q in 0..P {
                    sum[2 * h][q] = mmla(sum[2 * h][q], a0, xb[q]);
                    sum[2 * h + 1][q] = mmla(sum[2 * h + 1][q], a1, xb[q]);
                }
            }
        }
        // an activation pair's block values as [c0, c1, c0, c1], smmla's lane order
        let across = |(r0, r1): (&[f32], &[f32])| {
            let two = vset_lane_f32::<1>(r1[b], vdup_n_f32(r0[b]));
            vcombine_f32(two, two)
        };
        let xd = xd.map(across);
        let xs = if Q41 { xs.map(across) } else { xd };
        for p in 0..4 {
            // a row pair's as [r0, r0, r1, r1], from the 4 lanes holding them
            let pair = |s: [float32x4_t; 2]| {
                let s = s[p / 2];
                if p % 2 == 0 {
                    vzip1q_f32(s, s)
                } else {
                    vzip2q_f32(s, s)
                }
            };
            let (dp, mp) = (pair(d), pair(m));
            for q in 0..P {
                let a = vfmaq_f32(acc[q][p], vmulq_f32(dp, xd[q]), vcvtq_f32_s32(sum[p][q]));
                acc[q][p] = if Q41 { vfmaq_f32(a, mp, xs[q]) } else { a };
            }
        }
    }
    for (q, acc) in acc.iter().enumerate() {
        // even lanes are activation row c0 + 2q, odd lanes c0 + 2q + 1
        let rows = [
            (vuzp1q_f32(acc[0], acc[1]), vuzp1q_f32(acc[2], acc[3])),
            (vuzp2q_f32(acc[0], acc[1]), vuzp2q_f32(acc[2], acc[3])),
        ];
        for (i, (r0, r4)) in rows.into_iter().enumerate() {
            let mut lanes = [0f32; GROUP];
            // SAFETY: lanes holds 8 f32; the caller owns this group's columns
            unsafe {
                vst1q_f32(lanes.as_mut_ptr(), r0);
                vst1q_f32(lanes.as_mut_ptr().add(4), r4);
                out.write_group(c0 + 2 * q + i, g, w.n, &lanes);
            }
        }
    }
}

/// Every tile of row groups `groups`: activation rows 4 at a time, then a pair, then the last
/// one alone through `sdot`.
#[target_feature(enable = "neon,dotprod,i8mm")]
unsafe fn drive<const Q41: bool, const F: u8>(
    w: &Packed<'_>,
    groups: Range<usize>,
    x: &QuantizedActs,
    out: Out,
) {
    for g in groups {
        let mut c = 0;
        while c + 4 <= x.rows {
            // SAFETY: forwarded from `gemm_i8mm`'s caller; c..c + 4 are rows of x
            unsafe { tile::<Q41, F, 2>(w, g, x, c, out) };
            c += 4;
        }
        if c + 2 <= x.rows {
            // SAFETY: as above, rows c..c + 2
            unsafe { tile::<Q41, F, 1>(w, g, x, c, out) };
            c += 2;
        }
        if c < x.rows {
            // SAFETY: as above, row c
            unsafe { arm::single_row_dot(w, g, x, c, out) };
        }
    }
}

/// Every tile of row groups `groups`.
///
/// # Safety
/// The CPU has NEON, dotprod and i8mm; see `run_groups`.
pub(super) unsafe fn gemm_i8mm(w: &Packed<'_>, groups: Range<usize>, x: &QuantizedActs, out: Out) {
    // SAFETY: forwarded from the caller
    unsafe {
        match w.kind {
            BlockKind::Q4_0 => drive::<true, FOUR_BIT_ZERO>(w, groups, x, out),
            BlockKind::Q4K => drive::<true, FOUR_BIT_K>(w, groups, x, out),
            BlockKind::Q5_0 => drive::<true, FOUR_BIT_FIVE>(w, groups, x, out),
            BlockKind::Q4_1 => drive::<true, FOUR_BIT>(w, groups, x, out),
            BlockKind::Q8_0 => drive::<false, FOUR_BIT>(w, groups, x, out),
            // the forms holding Q5_1, Q5_K and Q6_K: the dot-product kernel (i8mm's 2x8
            // tiles for them are not written yet)
            BlockKind::Q8Min | BlockKind::Q8Half => super::arm::gemm_dot(w, groups, x, out),
        }
    }
}
