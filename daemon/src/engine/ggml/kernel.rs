//! The matrix product `out[c, r] = sum_k w[r, k] * x[c, k]` for quantized weights and
//! quantized activations, per instruction set, and which one this CPU runs.
//!
//! Every kernel computes each block's integer dot product exactly and scales it in f32, as
//! ggml does; they differ from the scalar reference only in the order of f32 additions.
//! Tiles share loads: with one activation row (decode) a tile is 4 weight rows, so each
//! activation block is loaded once for four rows; with several (prefill), 2 weight rows by 4
//! activation rows, so each weight block is unpacked once for four tokens.

use std::ops::Range;
use std::sync::OnceLock;

use super::{BLOCK, BlockKind, QuantizedActs, Weights};

#[cfg(target_arch = "aarch64")]
mod arm;
#[cfg(target_arch = "x86_64")]
mod x86;

/// An instruction set a kernel is written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Plain Rust: the reference, and what any other CPU runs.
    Scalar,
    /// x86-64 AVX2 + FMA: `vpmaddubsw` + `vpmaddwd`.
    Avx2,
    /// x86-64 AVX-512 VNNI (256-bit): `vpdpbusd`.
    Avx512Vnni,
    /// aarch64 NEON: widening multiplies `smull` / `smlal`.
    Neon,
    /// aarch64 NEON with the dot-product extension: `sdot`.
    NeonDot,
}

impl Isa {
    /// Every instruction set this CPU can run, the reference first.
    pub fn available() -> Vec<Isa> {
        let mut v = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                v.push(Isa::Avx2);
                if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl") {
                    v.push(Isa::Avx512Vnni);
                }
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            if std::arch::is_aarch64_feature_detected!("neon") {
                v.push(Isa::Neon);
                if std::arch::is_aarch64_feature_detected!("dotprod") {
                    v.push(Isa::NeonDot);
                }
            }
        }
        v
    }

    /// The fastest this CPU runs (detected once). `FIELDLLM_ISA=scalar|avx2|...` picks a
    /// lesser one, for comparing them in a benchmark.
    pub fn best() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| {
            let avail = Isa::available();
            if let Ok(want) = std::env::var("FIELDLLM_ISA")
                && let Some(isa) = avail.iter().find(|i| i.name() == want)
            {
                return *isa;
            }
            *avail.last().unwrap_or(&Isa::Scalar)
        })
    }

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512vnni",
            Isa::Neon => "neon",
            Isa::NeonDot => "neon-dotprod",
        }
    }
}

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
pub fn gemm(isa: Isa, w: &Weights<'_>, x: &QuantizedActs, out: &mut [f32]) {
    let o = Out::new(out, x.rows, w.n);
    // Safety: one caller writes all of `out`, which it borrows mutably.
    unsafe { gemm_into(isa, w, 0..w.n, x, o) }
}

/// [`gemm`] for weight rows `rows` only.
///
/// # Safety
/// `out` must stay valid for the call, and no other thread may write columns `rows` of it
/// meanwhile.
pub unsafe fn gemm_into(
    isa: Isa,
    w: &Weights<'_>,
    rows: Range<usize>,
    x: &QuantizedActs,
    out: Out,
) {
    assert!(rows.end <= w.n && x.k == w.k && out.rows == x.rows && out.ldo >= w.n);
    assert!(Isa::available().contains(&isa) || isa == Isa::Scalar);
    match isa {
        Isa::Scalar => scalar(w, rows, x, out),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::gemm_avx2(w, rows, x, out.ptr, out.ldo) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => unsafe { x86::gemm_vnni(w, rows, x, out.ptr, out.ldo) },
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => unsafe { arm::gemm_neon(w, rows, x, out.ptr, out.ldo) },
        #[cfg(target_arch = "aarch64")]
        Isa::NeonDot => unsafe { arm::gemm_dot(w, rows, x, out.ptr, out.ldo) },
        #[allow(unreachable_patterns)]
        _ => scalar(w, rows, x, out),
    }
}

/// The reference: one block at a time, integer dot product, then the scales.
fn scalar(w: &Weights<'_>, rows: Range<usize>, x: &QuantizedActs, out: Out) {
    let nb = w.blocks_per_row();
    let qb = w.kind.qs_bytes();
    for c in 0..x.rows {
        for r in rows.clone() {
            let mut acc = 0f32;
            for b in 0..nb {
                let wi = r * nb + b;
                let xi = c * nb + b;
                let q = &w.qs[wi * qb..(wi + 1) * qb];
                let xq = &x.qs[xi * BLOCK..(xi + 1) * BLOCK];
                let mut sumi = 0i32;
                match w.kind {
                    BlockKind::Q4_1 => {
                        for j in 0..BLOCK / 2 {
                            sumi += (q[j] & 0x0f) as i32 * xq[j] as i32;
                            sumi += (q[j] >> 4) as i32 * xq[j + BLOCK / 2] as i32;
                        }
                        acc += w.d[wi] * x.d[xi] * sumi as f32 + w.m[wi] * x.s[xi];
                    }
                    BlockKind::Q8_0 => {
                        for j in 0..BLOCK {
                            sumi += (q[j] as i8) as i32 * xq[j] as i32;
                        }
                        acc += w.d[wi] * x.d[xi] * sumi as f32;
                    }
                }
            }
            // Safety: in bounds (asserted by the caller), column r is this caller's
            unsafe { *out.ptr.add(c * out.ldo + r) = acc };
        }
    }
}

/// Walks weight rows `rows` and all activation rows in tiles, calling `tile::<R, C>` with
/// (first weight row, first activation row). Shared by every SIMD kernel.
macro_rules! drive_tiles {
    ($tile:ident, $w:expr, $rows:expr, $x:expr, $out:expr, $ldo:expr) => {{
        let (w, x, out, ldo) = ($w, $x, $out, $ldo);
        let rows: std::ops::Range<usize> = $rows;
        let s = x.rows;
        let mut r = rows.start;
        if s == 1 {
            while r + 4 <= rows.end {
                $tile::<4, 1>(w, r, x, 0, out, ldo);
                r += 4;
            }
            while r < rows.end {
                $tile::<1, 1>(w, r, x, 0, out, ldo);
                r += 1;
            }
        } else {
            while r < rows.end {
                let two = r + 2 <= rows.end;
                let mut c = 0;
                while c + 4 <= s {
                    if two {
                        $tile::<2, 4>(w, r, x, c, out, ldo)
                    } else {
                        $tile::<1, 4>(w, r, x, c, out, ldo)
                    }
                    c += 4;
                }
                while c < s {
                    if two {
                        $tile::<2, 1>(w, r, x, c, out, ldo)
                    } else {
                        $tile::<1, 1>(w, r, x, c, out, ldo)
                    }
                    c += 1;
                }
                r += if two { 2 } else { 1 };
            }
        }
    }};
}
pub(crate) use drive_tiles;
