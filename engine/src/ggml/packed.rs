//! The run-time weight layout: rows in groups of 8, interleaved 4 values at a time, so one
//! SIMD register holds 4 consecutive weights of each of 8 rows and a dot-product instruction
//! against 4 activation bytes broadcast to every lane gives each row's partial sum in its own
//! lane (ggml's `q4_0_8x8` repacking idea, applied to Q4_1 and Q8_0). A decode step reads each
//! weight matrix as one sequential stream, and needs no horizontal sums.
//!
//! Per group of 8 rows and per 32-value block, little-endian:
//! - `d`: 8 x f32, the rows' scales (the GGUF's f16, widened exactly); for Q8_HALF, the scales
//!   of values 0..16; Q4_0 keeps its 8 x f16 as the GGUF has them, and no second plane (its
//!   minimum is `-8 d`), so a block is its GGUF size, 18 bytes a row;
//! - a second plane of 8 x f32: the rows' minimums (Q4_1, Q8_MIN), or the scales of values
//!   16..32 (Q8_HALF); Q8_0 has none;
//! - Q4_0, Q4_1: 4 vectors of 32 bytes; vector `v`, row `r`, byte `t` (0..4) holds value `8v + t`
//!   of row `r` in its low nibble and value `8v + 4 + t` in its high nibble;
//! - the 8-bit forms: 8 vectors of 32 bytes; vector `c`, row `r`, byte `t` is value `4c + t`
//!   of row `r`.
//!
//! Rows past `n` (the last group's padding) are zero and never written out. Values are the
//! GGUF's quantized values moved, never re-quantized.

use tract_core::prelude::f16;

use super::{BLOCK, BlockKind, LayoutError, OwnedWeights};

/// Rows per group.
pub const GROUP: usize = 8;

/// Bytes of the planes (of 8 rows) before the values: f32 scales, then f32 minimums or second
/// scales; Q4_0's f16 scales alone.
fn planes_bytes(kind: BlockKind) -> usize {
    match kind {
        BlockKind::Q4_0 => GROUP * 2,
        BlockKind::Q8_0 => GROUP * 4,
        _ => 2 * GROUP * 4,
    }
}

/// Bytes of one group's block: scales (and minimums) then values.
pub fn group_block_bytes(kind: BlockKind) -> usize {
    values_offset(kind) + GROUP * kind.qs_bytes()
}

/// Byte offset of the values in a group's block.
pub fn values_offset(kind: BlockKind) -> usize {
    planes_bytes(kind)
}

/// One row's block, unpacked: what the scalar kernel and the lookup use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowBlock {
    /// Scales of values 0..16 and 16..32 (equal but for Q8_HALF).
    pub d: [f32; 2],
    /// Minimum (0 for forms without).
    pub m: f32,
    /// The 32 quantized values.
    pub q: [i32; BLOCK],
}

/// A packed weight matrix, borrowed.
#[derive(Debug, Clone, Copy)]
pub struct Packed<'a> {
    /// Block type.
    pub kind: BlockKind,
    /// Output rows (without padding).
    pub n: usize,
    /// Inputs per row.
    pub k: usize,
    /// `groups * k / 32` group blocks, group-major.
    pub bytes: &'a [u8],
}

impl<'a> Packed<'a> {
    /// Checks the length against the shape.
    pub fn new(kind: BlockKind, n: usize, k: usize, bytes: &'a [u8]) -> Result<Self, LayoutError> {
        super::check_k(k)?;
        if n == 0 {
            return Err(LayoutError::Shape(format!("[{n}, {k}]: no rows")));
        }
        let want = n.div_ceil(GROUP) * (k / BLOCK) * group_block_bytes(kind);
        if bytes.len() != want {
            return Err(LayoutError::Shape(format!(
                "packed {} [{n}, {k}] is {want} bytes, got {}",
                kind.name(),
                bytes.len()
            )));
        }
        Ok(Packed { kind, n, k, bytes })
    }

    /// Groups of rows (the last one maybe padded).
    pub fn groups(&self) -> usize {
        self.n.div_ceil(GROUP)
    }

    /// Blocks per row.
    pub fn blocks_per_row(&self) -> usize {
        self.k / BLOCK
    }

    /// The block `b` of group `g`.
    pub fn group_block(&self, g: usize, b: usize) -> &'a [u8] {
        let gbb = group_block_bytes(self.kind);
        let i = g * self.blocks_per_row() + b;
        &self.bytes[i * gbb..(i + 1) * gbb]
    }

    /// Row `r`'s block `b`: scales, minimum and values.
    pub fn block(&self, r: usize, b: usize) -> RowBlock {
        let blk = self.group_block(r / GROUP, b);
        let lane = r % GROUP;
        let f = |o: usize| f32::from_le_bytes([blk[o], blk[o + 1], blk[o + 2], blk[o + 3]]);
        let (d, second) = if self.kind == BlockKind::Q4_0 {
            let d = f16::from_le_bytes([blk[lane * 2], blk[lane * 2 + 1]]).to_f32();
            (d, -8.0 * d)
        } else {
            (f(lane * 4), f(GROUP * 4 + lane * 4))
        };
        let vo = values_offset(self.kind);
        let mut q = [0i32; BLOCK];
        if self.kind.nibbles() {
            for (j, qj) in q.iter_mut().enumerate() {
                let (v, hi, t) = (j / 8, (j / 4) % 2 == 1, j % 4);
                let byte = blk[vo + v * 32 + lane * 4 + t];
                *qj = if hi { byte >> 4 } else { byte & 0x0f } as i32;
            }
        } else {
            for (j, qj) in q.iter_mut().enumerate() {
                *qj = blk[vo + (j / 4) * 32 + lane * 4 + j % 4] as i8 as i32;
            }
        }
        match self.kind {
            BlockKind::Q8Half => RowBlock {
                d: [d, second],
                m: 0.0,
                q,
            },
            k if k.has_min() => RowBlock {
                d: [d, d],
                m: second,
                q,
            },
            _ => RowBlock {
                d: [d, d],
                m: 0.0,
                q,
            },
        }
    }

    /// Row `r` dequantized into `out` (`k` values): the embedding lookup.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        for b in 0..self.blocks_per_row() {
            let blk = self.block(r, b);
            let min = self.kind.has_min();
            for (j, (o, q)) in out[b * BLOCK..(b + 1) * BLOCK]
                .iter_mut()
                .zip(blk.q)
                .enumerate()
            {
                // no `+ 0.0` without a minimum: it would turn ggml's -0.0 into 0.0
                let v = blk.d[j / 16] * q as f32;
                *o = if min { v + blk.m } else { v };
            }
        }
    }
}

/// Packs planes into groups.
pub fn pack(w: &OwnedWeights) -> Vec<u8> {
    let nb = w.k / BLOCK;
    let gbb = group_block_bytes(w.kind);
    let groups = w.n.div_ceil(GROUP);
    let mut out = vec![0u8; groups * nb * gbb];
    let qb = w.kind.qs_bytes();
    let spb = w.kind.scales_per_block();
    let vo = values_offset(w.kind);
    for g in 0..groups {
        for b in 0..nb {
            let blk = &mut out[(g * nb + b) * gbb..(g * nb + b + 1) * gbb];
            for lane in 0..GROUP {
                let r = g * GROUP + lane;
                if r >= w.n {
                    break;
                }
                let i = r * nb + b;
                if w.kind == BlockKind::Q4_0 {
                    // the GGUF's f16, widened exactly by the planes: narrowed back exactly
                    let d = f16::from_f32(w.d[i]);
                    debug_assert_eq!(d.to_f32().to_bits(), w.d[i].to_bits());
                    blk[lane * 2..lane * 2 + 2].copy_from_slice(&d.to_le_bytes());
                } else {
                    blk[lane * 4..lane * 4 + 4].copy_from_slice(&w.d[i * spb].to_le_bytes());
                }
                let second = if spb == 2 {
                    Some(w.d[i * 2 + 1])
                } else if w.kind.has_min() && w.kind != BlockKind::Q4_0 {
                    Some(w.m[i])
                } else {
                    None
                };
                if let Some(v) = second {
                    let o = GROUP * 4 + lane * 4;
                    blk[o..o + 4].copy_from_slice(&v.to_le_bytes());
                }
                let q = &w.qs[i * qb..(i + 1) * qb];
                if w.kind.nibbles() {
                    // GGUF: byte j holds value j (low nibble) and j + 16 (high)
                    let val = |j: usize| {
                        if j < 16 { q[j] & 0x0f } else { q[j - 16] >> 4 }
                    };
                    for v in 0..4 {
                        for t in 0..4 {
                            blk[vo + v * 32 + lane * 4 + t] =
                                val(8 * v + t) | (val(8 * v + 4 + t) << 4);
                        }
                    }
                } else {
                    for c in 0..8 {
                        for t in 0..4 {
                            blk[vo + c * 32 + lane * 4 + t] = q[4 * c + t];
                        }
                    }
                }
            }
        }
    }
    out
}
