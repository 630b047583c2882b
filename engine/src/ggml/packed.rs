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
//! - Q4_K instead groups 8 blocks (a 256-value super-block): 8 x f16 `d`, 8 x f16 `dmin`, then
//!   per block 8 bytes of 6-bit scales, 8 of 6-bit minimums and the values (1,184 bytes, 148 a
//!   block; [`Packed::q4k_at`]);
//! - Q5_0: its 8 x f16 scales, then the rows' 32 fifth bits (8 x u32, bit `j` for value `j`),
//!   then its low 4 bits as Q4_1's nibbles (22 bytes a row, its GGUF size);
//! - Q4_0, Q4_1, Q4_K, Q5_0: 4 vectors of 32 bytes; vector `v`, row `r`, byte `t` (0..4)
//!   holds value `8v + t` of row `r` in its low nibble and value `8v + 4 + t` in its high one;
//! - the 8-bit forms: 8 vectors of 32 bytes; vector `c`, row `r`, byte `t` is value `4c + t`
//!   of row `r`.
//!
//! Rows past `n` (the last group's padding) are zero and never written out. Values are the
//! GGUF's quantized values moved, never re-quantized.

use tract_core::prelude::f16;

use super::{BLOCK, BlockKind, LayoutError, OwnedWeights};

/// Rows per group.
pub const GROUP: usize = 8;

/// Blocks per Q4_K super-block.
pub const SUPER: usize = 8;

/// Bytes of a Q4_K super-block's head (`d`, `dmin` of 8 rows) and of each block after it.
const Q4K_HEAD: usize = 2 * GROUP * 2;
const Q4K_BLOCK: usize = 2 * GROUP + GROUP * BLOCK / 2;

/// Bytes of the planes (of 8 rows) before the values: f32 scales, then f32 minimums or second
/// scales; Q4_0's f16 scales alone.
fn planes_bytes(kind: BlockKind) -> usize {
    match kind {
        BlockKind::Q4_0 => GROUP * 2,
        BlockKind::Q4K => 2 * GROUP,
        BlockKind::Q5_0 => GROUP * 2 + GROUP * 4,
        BlockKind::Q8_0 => GROUP * 4,
        _ => 2 * GROUP * 4,
    }
}

/// Bytes of one group's block: scales (and minimums) then values (Q4_K: a super-block's
/// bytes / 8).
pub fn group_block_bytes(kind: BlockKind) -> usize {
    match kind {
        BlockKind::Q4K => (Q4K_HEAD + SUPER * Q4K_BLOCK) / SUPER,
        _ => values_offset(kind) + GROUP * if nibble_vectors(kind) { 16 } else { BLOCK },
    }
}

/// Whether the packed values are 4 vectors of nibbles (Q5_0's fifth bits kept apart).
pub fn nibble_vectors(kind: BlockKind) -> bool {
    kind.nibbles() || kind == BlockKind::Q5_0
}

/// Byte offset of the values in a group's block (Q4_K: in a block of [`Packed::q4k_at`]).
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
        if kind == BlockKind::Q4K && !k.is_multiple_of(SUPER * BLOCK) {
            return Err(LayoutError::Shape(format!(
                "Q4_K [{n}, {k}]: rows must be whole 256-value super-blocks"
            )));
        }
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

    /// Q4_K: byte offsets in [`Self::bytes`] of the head of the super-block holding block `b`
    /// of group `g`, and of that block (its scales, minimums, then values).
    pub fn q4k_at(&self, g: usize, b: usize) -> (usize, usize) {
        q4k_offsets(self.blocks_per_row(), g, b)
    }

    /// Row `r`'s block `b`: scales, minimum and values.
    pub fn block(&self, r: usize, b: usize) -> RowBlock {
        let lane = r % GROUP;
        let h16 = |o: usize| f16::from_le_bytes([self.bytes[o], self.bytes[o + 1]]).to_f32();
        let (blk, d, second) = match self.kind {
            BlockKind::Q4K => {
                let (head, at) = self.q4k_at(r / GROUP, b);
                let blk = &self.bytes[at..at + Q4K_BLOCK];
                let (d, dmin) = (h16(head + lane * 2), h16(head + GROUP * 2 + lane * 2));
                (
                    blk,
                    d * blk[lane] as f32,
                    -(dmin * blk[GROUP + lane] as f32),
                )
            }
            BlockKind::Q4_0 | BlockKind::Q5_0 => {
                let blk = self.group_block(r / GROUP, b);
                let d = f16::from_le_bytes([blk[lane * 2], blk[lane * 2 + 1]]).to_f32();
                (blk, d, -self.kind.zero_point() * d)
            }
            _ => {
                let blk = self.group_block(r / GROUP, b);
                let f = |o: usize| f32::from_le_bytes([blk[o], blk[o + 1], blk[o + 2], blk[o + 3]]);
                (blk, f(lane * 4), f(GROUP * 4 + lane * 4))
            }
        };
        let vo = values_offset(self.kind);
        let mut q = [0i32; BLOCK];
        if nibble_vectors(self.kind) {
            for (j, qj) in q.iter_mut().enumerate() {
                let (v, hi, t) = (j / 8, (j / 4) % 2 == 1, j % 4);
                let byte = blk[vo + v * 32 + lane * 4 + t];
                *qj = if hi { byte >> 4 } else { byte & 0x0f } as i32;
            }
            if self.kind == BlockKind::Q5_0 {
                let o = GROUP * 2 + lane * 4;
                let qh = u32::from_le_bytes([blk[o], blk[o + 1], blk[o + 2], blk[o + 3]]);
                for (j, qj) in q.iter_mut().enumerate() {
                    *qj |= (((qh >> j) & 1) << 4) as i32;
                }
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

/// [`Packed::q4k_at`] for rows of `nb` blocks.
fn q4k_offsets(nb: usize, g: usize, b: usize) -> (usize, usize) {
    let head = (g * nb + b - b % SUPER) * group_block_bytes(BlockKind::Q4K);
    (head, head + Q4K_HEAD + (b % SUPER) * Q4K_BLOCK)
}

/// The head of super-block `s` of group `g`: its rows' `d`, then their `dmin`, as f16 (the
/// GGUF's, widened exactly by the planes: narrowed back exactly).
fn q4k_head(w: &OwnedWeights, g: usize, s: usize, head: &mut [u8]) {
    let per_row = w.k / (SUPER * BLOCK);
    for lane in 0..GROUP {
        let r = g * GROUP + lane;
        if r >= w.n {
            break;
        }
        let i = r * per_row + s;
        for (plane, v) in [w.sup[2 * i], w.sup[2 * i + 1]].into_iter().enumerate() {
            let o = plane * GROUP * 2 + lane * 2;
            head[o..o + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
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
            let at = if w.kind == BlockKind::Q4K {
                let (head, at) = q4k_offsets(nb, g, b);
                if b % SUPER == 0 {
                    q4k_head(w, g, b / SUPER, &mut out[head..head + Q4K_HEAD]);
                }
                at..at + Q4K_BLOCK
            } else {
                (g * nb + b) * gbb..(g * nb + b + 1) * gbb
            };
            let blk = &mut out[at];
            for lane in 0..GROUP {
                let r = g * GROUP + lane;
                if r >= w.n {
                    break;
                }
                let i = r * nb + b;
                match w.kind {
                    BlockKind::Q4_0 | BlockKind::Q5_0 => {
                        // the GGUF's f16, widened exactly by the planes: narrowed back exactly
                        let d = f16::from_f32(w.d[i]);
                        blk[lane * 2..lane * 2 + 2].copy_from_slice(&d.to_le_bytes());
                    }
                    BlockKind::Q4K => {
                        // the 6-bit factors: d sc / d and -dmin m / dmin, exact (a zero
                        // factor: any byte gives the same zero product; NaN: 0, and the
                        // import's check of every product refuses the tensor)
                        let (d, dmin) = (w.sup[2 * (i / SUPER)], w.sup[2 * (i / SUPER) + 1]);
                        blk[lane] = (w.d[i] / d) as u8;
                        blk[GROUP + lane] = (-w.m[i] / dmin) as u8;
                    }
                    _ => {
                        let o = lane * 4;
                        blk[o..o + 4].copy_from_slice(&w.d[i * spb].to_le_bytes());
                        let second = if spb == 2 {
                            Some(w.d[i * 2 + 1])
                        } else if w.kind.has_min() {
                            Some(w.m[i])
                        } else {
                            None
                        };
                        if let Some(v) = second {
                            let o = GROUP * 4 + lane * 4;
                            blk[o..o + 4].copy_from_slice(&v.to_le_bytes());
                        }
                    }
                }
                let q = &w.qs[i * qb..(i + 1) * qb];
                if w.kind == BlockKind::Q5_0 {
                    // the planes hold one value a byte: fifth bits apart, then as Q4_1
                    let qh = q
                        .iter()
                        .enumerate()
                        .fold(0u32, |h, (j, &v)| h | (((v >> 4) & 1) as u32) << j);
                    let o = GROUP * 2 + lane * 4;
                    blk[o..o + 4].copy_from_slice(&qh.to_le_bytes());
                    for v in 0..4 {
                        for t in 0..4 {
                            blk[vo + v * 32 + lane * 4 + t] =
                                (q[8 * v + t] & 0x0f) | ((q[8 * v + 4 + t] & 0x0f) << 4);
                        }
                    }
                } else if w.kind.nibbles() {
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
