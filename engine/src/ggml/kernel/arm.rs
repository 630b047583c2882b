//! aarch64 kernels on 128-bit registers holding 4 values of each of 4 rows (one row per 32-bit
//! lane; a group of 8 rows is two registers), multiplied by 4 activation bytes broadcast to
//! every lane: with the dot-product extension one `sdot`, without it `smull` + pairwise adds.
//!
//! Q4_1's nibbles (0..=15) fit an i8, so every weight form takes the signed x signed form.
//! `sdot` is written as inline assembly: its intrinsic (`vdotq_s32`) is not stable Rust. With
//! i8mm, pairs of activation rows go to [`super::i8mm`] instead.

use std::arch::aarch64::*;
use std::ops::Range;

use super::super::packed::{GROUP, Packed, values_offset};
use super::super::{BLOCK, BlockKind, QuantizedActs};
use super::{
    EIGHT_BIT, EIGHT_BIT_HALF, EIGHT_BIT_MIN, FOUR_BIT, FOUR_BIT_FIVE, FOUR_BIT_K, FOUR_BIT_ZERO,
    Out, drive_tiles,
};

/// `acc + sum of the 4 i8 x i8 products of each 32-bit lane`, plain NEON.
#[target_feature(enable = "neon")]
fn dp_neon(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let lo = vmull_s8(vget_low_s8(a), vget_low_s8(b));
    let hi = vmull_high_s8(a, b);
    // adjacent products summed in i16 (|2 * 128 * 127| fits), then pairs of those into i32
    vpadalq_s16(acc, vpaddq_s16(lo, hi))
}

/// The same with `sdot`.
#[target_feature(enable = "neon,dotprod")]
fn dp_sdot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    // SAFETY: one register-only instruction of an extension the caller's features include
    unsafe {
        std::arch::asm!(
            "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    acc
}

/// 4 f16 at `p` widened to f32 (`fcvtl`, base ARMv8: its intrinsic takes `float16x4_t`, not
/// stable Rust).
#[target_feature(enable = "neon")]
pub(super) unsafe fn f16x4(p: *const u8) -> float32x4_t {
    // SAFETY: the caller's p has 8 readable bytes
    let h = unsafe { vld1_u16(p as *const u16) };
    let out: float32x4_t;
    // SAFETY: one register-only instruction of base ARMv8 SIMD
    unsafe {
        std::arch::asm!(
            "fcvtl {out:v}.4s, {h:v}.4h",
            out = lateout(vreg) out,
            h = in(vreg) h,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    out
}

/// Block `b` of group `g` of a 4-bit form (`F`, see `FOUR_BIT*`): where its values start, and
/// its rows' scales and minimums as f32 (rows 0..4, rows 4..8), each the same f32 the planes
/// hold.
///
/// # Safety
/// `w` is of `F`'s kind, `g` and `b` a group and block of it.
#[target_feature(enable = "neon")]
#[inline]
pub(super) unsafe fn four_bit<const F: u8>(
    w: &Packed<'_>,
    g: usize,
    b: usize,
) -> (*const u8, [float32x4_t; 2], [float32x4_t; 2]) {
    match F {
        FOUR_BIT_ZERO | FOUR_BIT_FIVE => {
            let blk = w.group_block(g, b).as_ptr();
            // SAFETY: Q4_0's and Q5_0's blocks open with 8 f16 scales, then (Q5_0) fifth
            // bits, then values
            let (d, vals) = unsafe {
                (
                    [f16x4(blk), f16x4(blk.add(8))],
                    blk.add(values_offset(w.kind)),
                )
            };
            let zero = -w.kind.zero_point();
            (vals, d, d.map(|d| vmulq_n_f32(d, zero)))
        }
        FOUR_BIT_K => {
            let (head, at) = w.q4k_at(g, b);
            // SAFETY: `q4k_at` gives offsets of a super-block head and a block inside the
            // bytes `Packed::new` checked: the head holds 8 f16 d then 8 f16 dmin, the block
            // 8 scale and 8 minimum bytes, then its values
            unsafe {
                let (head, blk) = (w.bytes.as_ptr().add(head), w.bytes.as_ptr().add(at));
                let bytes = |p: *const u8| {
                    let wide = vmovl_u8(vld1_u8(p));
                    [
                        vcvtq_f32_u32(vmovl_u16(vget_low_u16(wide))),
                        vcvtq_f32_u32(vmovl_high_u16(wide)),
                    ]
                };
                let (d, dmin) = (
                    [f16x4(head), f16x4(head.add(8))],
                    [f16x4(head.add(16)), f16x4(head.add(24))],
                );
                let (sc, m) = (bytes(blk), bytes(blk.add(GROUP)));
                (
                    blk.add(values_offset(BlockKind::Q4K)),
                    [vmulq_f32(d[0], sc[0]), vmulq_f32(d[1], sc[1])],
                    // -(dmin m): the planes' negation, zeros included
                    [
                        vnegq_f32(vmulq_f32(dmin[0], m[0])),
                        vnegq_f32(vmulq_f32(dmin[1], m[1])),
                    ],
                )
            }
        }
        _ => {
            debug_assert_eq!(F, FOUR_BIT);
            let blk = w.group_block(g, b).as_ptr();
            // SAFETY: Q4_1's block opens with 8 f32 scales and 8 f32 minimums, then values
            unsafe {
                let ld = |o: usize| vld1q_f32(blk.add(o) as *const f32);
                (
                    blk.add(values_offset(BlockKind::Q4_1)),
                    [ld(0), ld(16)],
                    [ld(GROUP * 4), ld(GROUP * 4 + 16)],
                )
            }
        }
    }
}

/// Q5_0's fifth bits of values `8v..8v + 8` of 4 rows (`qh`: their 4 x 32 bits) as 16s, in
/// the nibble vectors' order: lane `r`, byte `t`: value `8v + t` (first), `8v + 4 + t`
/// (second).
#[target_feature(enable = "neon")]
#[inline]
pub(super) fn fifth_bits(qh: uint8x16_t, v: usize) -> (uint8x16_t, uint8x16_t) {
    const SPREAD: [u8; 16] = [0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12];
    // SAFETY: SPREAD is 16 bytes
    let spread = vaddq_u8(unsafe { vld1q_u8(SPREAD.as_ptr()) }, vdupq_n_u8(v as u8));
    // byte v of each lane (bits 8v..8v + 8) in its 4 bytes, then bit t / 4 + t of byte t
    let bytes = vqtbl1q_u8(qh, spread);
    let lo = vreinterpretq_u8_u32(vdupq_n_u32(0x0804_0201));
    let hi = vreinterpretq_u8_u32(vdupq_n_u32(0x8040_2010));
    let sixteen = vdupq_n_u8(0x10);
    (
        vandq_u8(vtstq_u8(bytes, lo), sixteen),
        vandq_u8(vtstq_u8(bytes, hi), sixteen),
    )
}

/// 4 activation bytes at `p`, in every lane.
#[target_feature(enable = "neon")]
unsafe fn bcast4(p: *const i8) -> int8x16_t {
    // SAFETY: the caller's p has 4 readable bytes
    vreinterpretq_s8_s32(vdupq_n_s32(unsafe {
        std::ptr::read_unaligned(p as *const i32)
    }))
}

macro_rules! kernels {
    ($gemm:ident, $q41:ident, $q80:ident, $features:literal, $dp:ident) => {
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
            let mut acc = [[vdupq_n_f32(0.0); 2]; C];
            let mask = vdupq_n_u8(0x0f);
            for b in 0..nb {
                // SAFETY: g and b are a group and block of w, of F's kind (`$gemm`)
                let (vals, d, m) = unsafe { four_bit::<F>(w, g, b) };
                let qh = if F == FOUR_BIT_FIVE {
                    // SAFETY: Q5_0's 8 rows' fifth bits are the 32 bytes before its values
                    unsafe { [vld1q_u8(vals.sub(32)), vld1q_u8(vals.sub(16))] }
                } else {
                    [vdupq_n_u8(0); 2]
                };
                let mut sum = [[vdupq_n_s32(0); 2]; C];
                for v in 0..4 {
                    for h in 0..2 {
                        // SAFETY: a block holds 4 vectors of 32 bytes of values
                        let raw = unsafe { vld1q_u8(vals.add(v * 32 + h * 16)) };
                        let (mut lo, mut hi) = (vandq_u8(raw, mask), vshrq_n_u8::<4>(raw));
                        if F == FOUR_BIT_FIVE {
                            let (l5, h5) = fifth_bits(qh[h], v);
                            (lo, hi) = (vorrq_u8(lo, l5), vorrq_u8(hi, h5));
                        }
                        let (lo, hi) = (vreinterpretq_s8_u8(lo), vreinterpretq_s8_u8(hi));
                        for c in 0..C {
                            let xp =
                                // SAFETY: row c0 + c of x has nb blocks of 32 bytes
                                unsafe { x.qs.as_ptr().add((c0 + c) * w.k + b * BLOCK + v * 8) };
                            // SAFETY: xp..xp + 8 lie in that block
                            let (x0, x1) = unsafe { (bcast4(xp), bcast4(xp.add(4))) };
                            sum[c][h] = $dp($dp(sum[c][h], lo, x0), hi, x1);
                        }
                    }
                }
                for h in 0..2 {
                    let (d, m) = (d[h], m[h]);
                    for c in 0..C {
                        let xi = (c0 + c) * nb + b;
                        let dd = vmulq_n_f32(d, x.d[xi]);
                        acc[c][h] = vfmaq_f32(acc[c][h], dd, vcvtq_f32_s32(sum[c][h]));
                        acc[c][h] = vfmaq_n_f32(acc[c][h], m, x.s[xi]);
                    }
                }
            }
            for c in 0..C {
                let mut lanes = [0f32; GROUP];
                // SAFETY: lanes holds 8 f32
                unsafe {
                    vst1q_f32(lanes.as_mut_ptr(), acc[c][0]);
                    vst1q_f32(lanes.as_mut_ptr().add(4), acc[c][1]);
                }
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
            let mut acc = [[vdupq_n_f32(0.0); 2]; C];
            let vo = values_offset(w.kind);
            let (half, min) = (K == EIGHT_BIT_HALF, K == EIGHT_BIT_MIN);
            for b in 0..nb {
                let blk = w.group_block(g, b).as_ptr();
                // [values 0..16, values 16..32] (one sum unless the form has two scales)
                let mut sum = [[[vdupq_n_s32(0); 2]; 2]; C];
                for ch in 0..8 {
                    let s = usize::from(half && ch >= 4);
                    for h in 0..2 {
                        // SAFETY: a group block holds 8 vectors of 32 bytes after the scales
                        let wv = unsafe { vld1q_s8(blk.add(vo + ch * 32 + h * 16) as *const i8) };
                        for c in 0..C {
                            // SAFETY: as above
                            let xb = unsafe {
                                bcast4(x.qs.as_ptr().add((c0 + c) * w.k + b * BLOCK + ch * 4))
                            };
                            sum[c][s][h] = $dp(sum[c][s][h], wv, xb);
                        }
                    }
                }
                for h in 0..2 {
                    // SAFETY: the scales open the block; the second plane (minimums or second
                    // scales) follows when the form has one
                    let (d, second) = unsafe {
                        (
                            vld1q_f32(blk.add(h * 16) as *const f32),
                            if half || min {
                                vld1q_f32(blk.add(GROUP * 4 + h * 16) as *const f32)
                            } else {
                                vdupq_n_f32(0.0)
                            },
                        )
                    };
                    for c in 0..C {
                        let xi = (c0 + c) * nb + b;
                        let dd = vmulq_n_f32(d, x.d[xi]);
                        acc[c][h] = vfmaq_f32(acc[c][h], dd, vcvtq_f32_s32(sum[c][0][h]));
                        if half {
                            let d1 = vmulq_n_f32(second, x.d[xi]);
                            acc[c][h] = vfmaq_f32(acc[c][h], d1, vcvtq_f32_s32(sum[c][1][h]));
                        } else if min {
                            acc[c][h] = vfmaq_n_f32(acc[c][h], second, x.s[xi]);
                        }
                    }
                }
            }
            for c in 0..C {
                let mut lanes = [0f32; GROUP];
                // SAFETY: as above
                unsafe {
                    vst1q_f32(lanes.as_mut_ptr(), acc[c][0]);
                    vst1q_f32(lanes.as_mut_ptr().add(4), acc[c][1]);
                    out.write_group(c0 + c, g, w.n, &lanes);
                }
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
                    BlockKind::Q4_0 => drive_tiles!($q41::<FOUR_BIT_ZERO>, w, groups, x, out),
                    BlockKind::Q4K => drive_tiles!($q41::<FOUR_BIT_K>, w, groups, x, out),
                    BlockKind::Q5_0 => drive_tiles!($q41::<FOUR_BIT_FIVE>, w, groups, x, out),
                    BlockKind::Q4_1 => drive_tiles!($q41::<FOUR_BIT>, w, groups, x, out),
                    BlockKind::Q8_0 => drive_tiles!($q80::<EIGHT_BIT>, w, groups, x, out),
                    BlockKind::Q8Min => drive_tiles!($q80::<EIGHT_BIT_MIN>, w, groups, x, out),
                    BlockKind::Q8Half => drive_tiles!($q80::<EIGHT_BIT_HALF>, w, groups, x, out),
                }
            }
        }
    };
}

kernels!(gemm_neon, q41_neon, q80_neon, "neon", dp_neon);
kernels!(gemm_dot, q41_dot, q80_dot, "neon,dotprod", dp_sdot);

/// One group of 8 rows x the single activation row `c`, with `sdot`: the i8mm kernel's odd
/// row out.
///
/// # Safety
/// The CPU has NEON and dotprod; `g` is a group of `w`, `c` a row of `x`, and the caller owns
/// the group's columns of `out`.
#[target_feature(enable = "neon,dotprod")]
pub(super) unsafe fn single_row_dot(
    w: &Packed<'_>,
    g: usize,
    x: &QuantizedActs,
    c: usize,
    out: Out,
) {
    // SAFETY: forwarded from the caller
    unsafe {
        match w.kind {
            BlockKind::Q4_0 => q41_dot::<1, FOUR_BIT_ZERO>(w, g, x, c, out),
            BlockKind::Q4K => q41_dot::<1, FOUR_BIT_K>(w, g, x, c, out),
            BlockKind::Q5_0 => q41_dot::<1, FOUR_BIT_FIVE>(w, g, x, c, out),
            BlockKind::Q4_1 => q41_dot::<1, FOUR_BIT>(w, g, x, c, out),
            BlockKind::Q8_0 => q80_dot::<1, EIGHT_BIT>(w, g, x, c, out),
            BlockKind::Q8Min => q80_dot::<1, EIGHT_BIT_MIN>(w, g, x, c, out),
            BlockKind::Q8Half => q80_dot::<1, EIGHT_BIT_HALF>(w, g, x, c, out),
        }
    }
}
