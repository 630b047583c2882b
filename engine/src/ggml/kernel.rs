//! The matrix product `out[c, r] = sum_k w[r, k] * x[c, k]` for quantized weights and
//! quantized activations, per instruction set, and which one this CPU runs.
//!
//! Every kernel computes each block's integer dot product exactly and scales it in f32, as
//! ggml does; they differ from the scalar reference only in the order of f32 additions.
//! A tile is one group of 8 weight rows (see [`super::packed`]) by 1, 2 or 4 activation rows:
//! each activation load serves 8 rows, and with several tokens (prefill) each weight load
//! serves 4 tokens.

use std::ops::Range;

use super::packed::{GROUP, Packed};
use super::{BLOCK, QuantizedActs};
pub use crate::cpu::Isa;

#[cfg(target_arch = "aarch64")]
mod arm;
#[cfg(target_arch = "aarch64")]
mod i8mm;
#[cfg(target_arch = "x86_64")]
mod x86;

/// Where a kernel writes: `rows` of `ldo` f32, one per activation row; a kernel given weight
/// rows `r0..r1` writes only columns `r0..r1` of each, so threads can share one output.
#[derive(Debug, Clone, Copy)]
pub struct Out {
    ptr: *mut f32,
    ldo: usize,
    rows: usize,
}

// Safety: threads given the same `Out` write disjoint columns (see `gemm_into`'s contract).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// Wraps `out` (`rows * ldo` values).
    pub fn new(out: &mut [f32], rows: usize, ldo: usize) -> Out {
        assert_eq!(out.len(), rows * ldo, "output size");
        Out {
            ptr: out.as_mut_ptr(),
            ldo,
            rows,
        }
    }
}

/// `out[c * n + r] = sum_k w[r, k] * x[c, k]` for every weight row and activation row.
pub fn gemm(isa: Isa, w: &Packed<'_>, x: &QuantizedActs, out: &mut [f32]) {
    let o = Out::new(out, x.rows, w.n);
    // Safety: one caller writes all of `out`, which it borrows mutably.
    unsafe { gemm_into(isa, w, 0..w.groups(), x, o) }
}

/// [`gemm`] for the rows of row groups `groups` only (rows `8 * start .. 8 * end`, clipped to
/// `n`).
///
/// # Safety
/// `out` must stay valid for the call, and no other thread may write those rows' columns of it
/// meanwhile.
pub unsafe fn gemm_into(
    isa: Isa,
    w: &Packed<'_>,
    groups: Range<usize>,
    x: &QuantizedActs,
    out: Out,
) {
    assert!(groups.end <= w.groups() && x.k == w.k && out.rows == x.rows && out.ldo >= w.n);
    assert!(isa == Isa::Scalar || Isa::available().contains(&isa));
    match isa {
        Isa::Scalar => scalar(w, groups, x, out),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::gemm_avx2(w, groups, x, out) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => unsafe { x86::gemm_vnni(w, groups, x, out) },
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => unsafe { arm::gemm_neon(w, groups, x, out) },
        #[cfg(target_arch = "aarch64")]
        Isa::NeonDot => unsafe { arm::gemm_dot(w, groups, x, out) },
        #[cfg(target_arch = "aarch64")]
        Isa::NeonI8mm => unsafe { i8mm::gemm_i8mm(w, groups, x, out) },
        #[allow(unreachable_patterns)]
        _ => scalar(w, groups, x, out),
    }
}

/// Plain Rust over the packed layout, one row and block at a time: integer dot product, then
/// the scales.
fn scalar(w: &Packed<'_>, groups: Range<usize>, x: &QuantizedActs, out: Out) {
    let nb = w.blocks_per_row();
    let rows = groups.start * GROUP..(groups.end * GROUP).min(w.n);
    for c in 0..x.rows {
        for r in rows.clone() {
            let mut acc = 0f32;
            for b in 0..nb {
                let (d, m, q) = w.block(r, b);
                let xi = c * nb + b;
                let xq = &x.qs[xi * BLOCK..(xi + 1) * BLOCK];
                let sumi: i32 = q.iter().zip(xq).map(|(&a, &b)| a * b as i32).sum();
                acc += d * x.d[xi] * sumi as f32 + m * x.s[xi];
            }
            // Safety: in bounds (asserted by the caller), column r is this caller's
            unsafe { out.write(c, r, acc) };
        }
    }
}

impl Out {
    /// Writes `v` at (activation row `c`, weight row `r`).
    ///
    /// # Safety
    /// In bounds, and column `r` belongs to the caller.
    #[inline(always)]
    unsafe fn write(&self, c: usize, r: usize, v: f32) {
        debug_assert!(c < self.rows && r < self.ldo);
        unsafe { *self.ptr.add(c * self.ldo + r) = v };
    }

    /// Writes the 8 lanes of group `g` for activation row `c`, clipped to `n` rows.
    ///
    /// # Safety
    /// As [`Out::write`], for every row of the group below `n`.
    #[inline(always)]
    unsafe fn write_group(&self, c: usize, g: usize, n: usize, lanes: &[f32; GROUP]) {
        let r0 = g * GROUP;
        let valid = n.saturating_sub(r0).min(GROUP);
        debug_assert!(c < self.rows && r0 + valid <= self.ldo);
        unsafe {
            std::ptr::copy_nonoverlapping(lanes.as_ptr(), self.ptr.add(c * self.ldo + r0), valid)
        };
    }
}

/// Walks row groups `groups` and all activation rows, 4 activation rows at a time while there
/// are, then 2, then 1, calling `tile::<C>(g, c0)`. Shared by every SIMD kernel.
macro_rules! drive_tiles {
    ($tile:ident, $w:expr, $groups:expr, $x:expr, $out:expr) => {{
        let (w, x, out) = ($w, $x, $out);
        let groups: std::ops::Range<usize> = $groups;
        for g in groups {
            let mut c = 0;
            while c + 4 <= x.rows {
                $tile::<4>(w, g, x, c, out);
                c += 4;
            }
            if c + 2 <= x.rows {
                $tile::<2>(w, g, x, c, out);
                c += 2;
            }
            while c < x.rows {
                $tile::<1>(w, g, x, c, out);
                c += 1;
            }
        }
    }};
}
pub(crate) use drive_tiles;
