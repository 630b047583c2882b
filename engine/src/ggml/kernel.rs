//! The matrix product `out[c, r] = sum_k w[r, k] * x[c, k]` for quantized weights and
//! quantized activations, per instruction set, and which one this CPU runs.
//!
//! Every kernel computes each block's integer dot product exactly and scales it in f32, as
//! ggml does; they differ from the scalar reference only in the order of f32 additions.
//! A tile is one group of 8 weight rows (see [`super::packed`]) by 1, 2 or 4 activation rows:
//! each activation load serves 8 rows, and with several tokens (prefill) each weight load
//! serves 4 tokens.

// SIMD intrinsics, and a raw output shared by threads that each write their own columns (made
// safe by `OutParts`): every `unsafe` says why it holds in a `SAFETY:` comment.
#![allow(unsafe_code)]

use std::marker::PhantomData;
use std::ops::Range;
use std::sync::{Mutex, PoisonError};

use super::packed::{GROUP, Packed};
use super::{BLOCK, BlockKind, QuantizedActs};
pub use crate::cpu::Isa;
use crate::cpu::{Team, part_of};

/// The 4-bit kernels' `F`: Q4_1 (f32 scales and minimums).
pub(crate) const FOUR_BIT: u8 = 0;
/// Q4_0: f16 scales, minimums `-8 d`.
pub(crate) const FOUR_BIT_ZERO: u8 = 1;
/// Q4_K: f16 `d` and `dmin` per super-block, 6-bit factors per block.
pub(crate) const FOUR_BIT_K: u8 = 2;
/// Q5_0: Q4_0's layout plus fifth bits, minimums `-16 d`.
pub(crate) const FOUR_BIT_FIVE: u8 = 3;

/// The 8-bit kernels' `K`: Q8_0 (one scale).
pub(crate) const EIGHT_BIT: u8 = 0;
/// Q8_MIN: a scale and a minimum.
pub(crate) const EIGHT_BIT_MIN: u8 = 1;
/// Q8_HALF: a scale per 16 values.
pub(crate) const EIGHT_BIT_HALF: u8 = 2;

#[cfg(target_arch = "aarch64")]
mod arm;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "aarch64")]
mod i8mm;
#[cfg(target_arch = "x86_64")]
mod x86;

/// Where a kernel writes: `rows` of `ldo` f32, one per activation row; a kernel given weight
/// rows `r0..r1` writes only columns `r0..r1` of each. A raw view, private to the kernels: the
/// public way in is [`gemm`] / [`gemm_on`], which hand each thread an [`OutPart`] of its own.
#[derive(Debug, Clone, Copy)]
struct Out {
    ptr: *mut f32,
    ldo: usize,
    rows: usize,
}

/// The columns of one range of row groups in a product's output, borrowed from the whole
/// output for `'a`: the compiler keeps the buffer alive and unaliased while any part exists,
/// and [`OutParts::new`], the only way to make parts, gives each group to exactly one part.
#[derive(Debug)]
pub struct OutPart<'a> {
    out: Out,
    groups: Range<usize>,
    _borrow: PhantomData<&'a mut [f32]>,
}

// SAFETY: a part is the only writer of its groups' columns (`OutParts::new` splits one
// exclusive borrow into disjoint ranges), and it writes only through `&mut self`; moving it to
// another thread moves that exclusive right with it, for no longer than the borrow `'a`.
unsafe impl Send for OutPart<'_> {}

/// A product's output split into one part per thread, each behind its own lock, so a team's
/// threads can each take theirs through a shared reference. The locks are never contended.
#[derive(Debug)]
pub struct OutParts<'a>(Vec<Mutex<OutPart<'a>>>);

impl<'a> OutParts<'a> {
    /// Splits `out` (`rows * ldo` values) by row groups `0..groups` into `parts` contiguous
    /// ranges ([`part_of`]).
    pub fn new(out: &'a mut [f32], rows: usize, ldo: usize, groups: usize, parts: usize) -> Self {
        assert_eq!(out.len(), rows * ldo, "output size");
        let raw = Out {
            ptr: out.as_mut_ptr(),
            ldo,
            rows,
        };
        OutParts(
            (0..parts.max(1))
                .map(|p| {
                    Mutex::new(OutPart {
                        out: raw,
                        groups: part_of(groups, parts.max(1), 1, p),
                        _borrow: PhantomData,
                    })
                })
                .collect(),
        )
    }

    /// Part `p` for the duration of the closure (nothing if there is no such part).
    pub fn with(&self, p: usize, f: impl FnOnce(&mut OutPart<'a>)) {
        if let Some(part) = self.0.get(p) {
            // a panic inside a kernel leaves the part usable (its columns are the caller's to
            // discard), so a poisoned lock is taken as is
            f(&mut part.lock().unwrap_or_else(PoisonError::into_inner));
        }
    }
}

impl OutPart<'_> {
    /// Row groups this part writes.
    pub fn groups(&self) -> Range<usize> {
        self.groups.clone()
    }

    /// `out[c * n + r] = sum_k w[r, k] * x[c, k]` for the weight rows of this part's groups.
    pub fn gemm(&mut self, isa: Isa, w: &Packed<'_>, x: &QuantizedActs) {
        let (out, groups) = (self.out, self.groups.clone());
        assert!(groups.end <= w.groups() && x.k == w.k && out.rows == x.rows && out.ldo >= w.n);
        assert!(isa == Isa::Scalar || Isa::available().contains(&isa));
        // SAFETY: the buffer is borrowed for this part's lifetime, `&mut self` makes this the
        // one thread writing through the part, and no other part covers these groups; the
        // asserts above keep every write inside `rows * ldo`; `isa` is available on this CPU.
        unsafe { run_groups(isa, w, groups, x, out) }
    }
}

/// `out[c * n + r] = sum_k w[r, k] * x[c, k]` for every weight row and activation row, on this
/// thread.
pub fn gemm(isa: Isa, w: &Packed<'_>, x: &QuantizedActs, out: &mut [f32]) {
    gemm_on(None, isa, w, x, out)
}

/// [`gemm`] with the weight rows split over `team`'s threads (none, or a product too small to
/// share: this thread alone). A panic in any part reaches the caller once every part is done.
pub fn gemm_on(team: Option<&Team>, isa: Isa, w: &Packed<'_>, x: &QuantizedActs, out: &mut [f32]) {
    let threads = match team {
        Some(t) if w.n >= 64 => t.threads(),
        _ => 1,
    };
    let parts = OutParts::new(out, x.rows, w.n, w.groups(), threads);
    match team {
        Some(team) if threads > 1 => team.run(&|p| parts.with(p, |part| part.gemm(isa, w, x))),
        _ => parts.with(0, |part| part.gemm(isa, w, x)),
    }
}

/// The kernel of `isa` over row groups `groups`.
///
/// # Safety
/// `out` must be valid for writes of `rows * ldo` values for the call, no other thread may
/// access those groups' columns of it meanwhile, and `isa` must be available on this CPU.
unsafe fn run_groups(isa: Isa, w: &Packed<'_>, groups: Range<usize>, x: &QuantizedActs, out: Out) {
    match isa {
        Isa::Scalar => scalar(w, groups, x, out),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller's contract, which is the kernels' own
        Isa::Avx2 => unsafe { x86::gemm_avx2(w, groups, x, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller's contract
        Isa::Avx512Vnni => unsafe {
            // the 4-bit forms (and 2-7 rows of Q8_0 and Q8_MIN) on 512-bit registers, the
            // rest on 256
            let left = avx512::gemm_512(w, groups, x, out);
            x86::gemm_vnni(w, left, x, out)
        },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above
        Isa::Neon => unsafe { arm::gemm_neon(w, groups, x, out) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above
        Isa::NeonDot => unsafe { arm::gemm_dot(w, groups, x, out) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above
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
                let blk = w.block(r, b);
                let xi = c * nb + b;
                let xq = &x.qs[xi * BLOCK..(xi + 1) * BLOCK];
                let dot = |r: Range<usize>| -> i32 {
                    blk.q[r.clone()]
                        .iter()
                        .zip(&xq[r])
                        .map(|(&a, &b)| a * b as i32)
                        .sum()
                };
                if w.kind == BlockKind::Q8Half {
                    let (lo, hi) = (dot(0..16), dot(16..32));
                    acc += blk.d[0] * x.d[xi] * lo as f32 + blk.d[1] * x.d[xi] * hi as f32;
                } else {
                    acc += blk.d[0] * x.d[xi] * dot(0..32) as f32 + blk.m * x.s[xi];
                }
            }
            // SAFETY: in bounds (asserted by the caller), column r is this caller's
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
        // SAFETY: the caller's contract
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
        // SAFETY: the caller's contract, for the `valid` rows of the group
        unsafe {
            std::ptr::copy_nonoverlapping(lanes.as_ptr(), self.ptr.add(c * self.ldo + r0), valid)
        };
    }
}

/// Walks row groups `groups` and all activation rows, 4 activation rows at a time while there
/// are, then 2, then 1, calling `tile::<C>(g, c0)` (or `tile::<C, K>`). Shared by every SIMD
/// kernel.
macro_rules! drive_tiles {
    ($tile:ident, $w:expr, $groups:expr, $x:expr, $out:expr) => {
        drive_tiles!(@go [], $tile, $w, $groups, $x, $out, 0)
    };
    // a kernel with one more const parameter after the tile's rows: `tile::<C, K>`
    ($tile:ident :: <$k:tt>, $w:expr, $groups:expr, $x:expr, $out:expr) => {
        drive_tiles!(@go [$k], $tile, $w, $groups, $x, $out, 0)
    };
    // tiles of 8 activation rows first where `$on` (a kernel with the registers for them),
    // each group's tiles together as above
    ($tile:ident :: <$k:tt>, $w:expr, $groups:expr, $x:expr, $out:expr, eights if $on:expr) => {{
        let (w, x, out) = ($w, $x, $out);
        let groups: std::ops::Range<usize> = $groups;
        let eights = if $on { x.rows / 8 * 8 } else { 0 };
        for g in groups {
            for c in (0..eights).step_by(8) {
                $tile::<8, $k>(w, g, x, c, out);
            }
            drive_tiles!(@go [$k], $tile, w, g..g + 1, x, out, eights)
        }
    }};
    (@go [$($k:tt)?], $tile:ident, $w:expr, $groups:expr, $x:expr, $out:expr, $from:expr) => {{
        let (w, x, out) = ($w, $x, $out);
        let groups: std::ops::Range<usize> = $groups;
        for g in groups {
            let mut c = $from;
            while c + 4 <= x.rows {
                $tile::<4 $(, $k)?>(w, g, x, c, out);
                c += 4;
            }
            if c + 2 <= x.rows {
                $tile::<2 $(, $k)?>(w, g, x, c, out);
                c += 2;
            }
            while c < x.rows {
                $tile::<1 $(, $k)?>(w, g, x, c, out);
                c += 1;
            }
        }
    }};
}
pub(crate) use drive_tiles;
