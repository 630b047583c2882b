//! aarch64 kernels: NEON widening multiplies (`smull`/`smlal` then pairwise adds), and the
//! dot-product extension's `sdot` (four i8 x i8 products summed into each i32 lane).
//!
//! Q4_1's nibbles (0..=15) fit an i8, so both weight types take the signed x signed form.
//! `sdot` is written as inline assembly: its intrinsic (`vdotq_s32`) is not stable Rust.

use std::arch::aarch64::*;
use std::ops::Range;

use super::super::{BLOCK, BlockKind, QuantizedActs, Weights};
use super::drive_tiles;

/// Sum of products of two 32-value blocks (each as two 16-lane halves), in 4 i32 lanes.
#[target_feature(enable = "neon")]
fn dot_neon(a0: int8x16_t, a1: int8x16_t, b0: int8x16_t, b1: int8x16_t) -> int32x4_t {
    // |a * b| <= 128 * 127, two of them fit an i16
    let p0 = vmlal_high_s8(vmull_s8(vget_low_s8(a0), vget_low_s8(b0)), a0, b0);
    let p1 = vmlal_high_s8(vmull_s8(vget_low_s8(a1), vget_low_s8(b1)), a1, b1);
    vpadalq_s16(vpaddlq_s16(p0), p1)
}

#[target_feature(enable = "neon,dotprod")]
fn dot_sdot(a0: int8x16_t, a1: int8x16_t, b0: int8x16_t, b1: int8x16_t) -> int32x4_t {
    let mut acc = vdupq_n_s32(0);
    // Safety: register-only instructions of an extension the caller's features include
    unsafe {
        std::arch::asm!(
            "sdot {acc:v}.4s, {a0:v}.16b, {b0:v}.16b",
            "sdot {acc:v}.4s, {a1:v}.16b, {b1:v}.16b",
            acc = inout(vreg) acc,
            a0 = in(vreg) a0,
            b0 = in(vreg) b0,
            a1 = in(vreg) a1,
            b1 = in(vreg) b1,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    acc
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
            let mut acc = [[vdupq_n_f32(0.0); C]; R];
            let mut macc = [[0f32; C]; R];
            let mask = vdupq_n_u8(0x0f);
            let (qs, xq) = (w.qs.as_ptr(), x.qs.as_ptr());
            for b in 0..nb {
                let mut x0 = [vdupq_n_s8(0); C];
                let mut x1 = [vdupq_n_s8(0); C];
                let mut xd = [0f32; C];
                let mut xs = [0f32; C];
                for c in 0..C {
                    let i = (c0 + c) * nb + b;
                    // Safety: i < x.rows * nb (the driver's tiles stay inside x)
                    unsafe {
                        x0[c] = vld1q_s8(xq.add(i * BLOCK));
                        x1[c] = vld1q_s8(xq.add(i * BLOCK + 16));
                        xd[c] = *x.d.get_unchecked(i);
                        xs[c] = *x.s.get_unchecked(i);
                    }
                }
                for r in 0..R {
                    let i = (r0 + r) * nb + b;
                    // Safety: i < w.n * nb (the driver's tiles stay inside rows)
                    let (raw, wd, wm) = unsafe {
                        (
                            vld1q_u8(qs.add(i * (BLOCK / 2))),
                            *w.d.get_unchecked(i),
                            *w.m.get_unchecked(i),
                        )
                    };
                    let lo = vreinterpretq_s8_u8(vandq_u8(raw, mask));
                    let hi = vreinterpretq_s8_u8(vshrq_n_u8::<4>(raw));
                    for c in 0..C {
                        let p = vcvtq_f32_s32($dot(lo, hi, x0[c], x1[c]));
                        acc[r][c] = vfmaq_n_f32(acc[r][c], p, wd * xd[c]);
                        macc[r][c] += wm * xs[c];
                    }
                }
            }
            for r in 0..R {
                for c in 0..C {
                    // Safety: the caller's Out covers (c0 + c, r0 + r)
                    unsafe {
                        *out.add((c0 + c) * ldo + r0 + r) = vaddvq_f32(acc[r][c]) + macc[r][c]
                    };
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
            let mut acc = [[vdupq_n_f32(0.0); C]; R];
            let (qs, xq) = (w.qs.as_ptr() as *const i8, x.qs.as_ptr());
            for b in 0..nb {
                let mut x0 = [vdupq_n_s8(0); C];
                let mut x1 = [vdupq_n_s8(0); C];
                let mut xd = [0f32; C];
                for c in 0..C {
                    let i = (c0 + c) * nb + b;
                    // Safety: as above
                    unsafe {
                        x0[c] = vld1q_s8(xq.add(i * BLOCK));
                        x1[c] = vld1q_s8(xq.add(i * BLOCK + 16));
                        xd[c] = *x.d.get_unchecked(i);
                    }
                }
                for r in 0..R {
                    let i = (r0 + r) * nb + b;
                    // Safety: as above
                    let (w0, w1, wd) = unsafe {
                        (
                            vld1q_s8(qs.add(i * BLOCK)),
                            vld1q_s8(qs.add(i * BLOCK + 16)),
                            *w.d.get_unchecked(i),
                        )
                    };
                    for c in 0..C {
                        let p = vcvtq_f32_s32($dot(w0, w1, x0[c], x1[c]));
                        acc[r][c] = vfmaq_n_f32(acc[r][c], p, wd * xd[c]);
                    }
                }
            }
            for r in 0..R {
                for c in 0..C {
                    // Safety: as above
                    unsafe { *out.add((c0 + c) * ldo + r0 + r) = vaddvq_f32(acc[r][c]) };
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

kernels!(gemm_neon, q41_neon, q80_neon, "neon", dot_neon);
kernels!(gemm_dot, q41_dot, q80_dot, "neon,dotprod", dot_sdot);
