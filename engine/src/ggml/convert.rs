//! GGUF block types into the run-time forms ([`BlockKind`]), value for value: each weight
//! dequantizes to exactly the f32 ggml's own dequantization gives (`dequantize_row_*` in
//! ggml-quants.c; checked against the `gguf` package's in `engine/tests/import_gguf.rs`).
//!
//! The products are exact because every scale the forms hold is a product ggml computes in
//! f32 without rounding: an f16 (11 significant bits) times a 6- or 8-bit integer scale fits
//! f32's 24 bits. K-quants' super-blocks of 256 become 8 blocks of 32 (16 for Q6_K's scales).

use tract_core::prelude::f16;

use super::{BLOCK, BlockKind, LayoutError, OwnedWeights, check_k};
use fieldllm_gguf::GgmlType;

/// The run-time form that holds GGUF type `ty`, if any.
pub fn form_of(ty: GgmlType) -> Option<BlockKind> {
    Some(match ty {
        GgmlType::Q4_0 => BlockKind::Q4_0,
        GgmlType::Q4_K => BlockKind::Q4K,
        GgmlType::Q4_1 => BlockKind::Q4_1,
        GgmlType::Q5_0 => BlockKind::Q5_0,
        GgmlType::Q8_0 => BlockKind::Q8_0,
        GgmlType::Q5_1 | GgmlType::Q5_K => BlockKind::Q8Min,
        GgmlType::Q6_K => BlockKind::Q8Half,
        _ => return None,
    })
}

fn f16_at(b: &[u8], o: usize) -> f32 {
    f16::from_le_bytes([b[o], b[o + 1]]).to_f32()
}

/// `n` rows of `k` weights in GGUF type `ty` (the file's bytes, row-major) as planes of the
/// form [`form_of`] names.
pub fn from_gguf(
    ty: GgmlType,
    n: usize,
    k: usize,
    bytes: &[u8],
) -> Result<OwnedWeights, LayoutError> {
    check_k(k)?;
    let kind = form_of(ty)
        .ok_or_else(|| LayoutError::Shape(format!("{} has no run-time form", ty.name())))?;
    if matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0) {
        return OwnedWeights::from_gguf(kind, n, k, bytes);
    }
    let (per, bb) = ty.block();
    let (per, bb) = (per as usize, bb as usize);
    if !k.is_multiple_of(per) || bytes.len() != n * k / per * bb {
        return Err(LayoutError::Shape(format!(
            "{} [{n}, {k}]: rows must be whole {per}-weight blocks of {bb} bytes ({} bytes given)",
            ty.name(),
            bytes.len()
        )));
    }
    let blocks = n * k / BLOCK;
    let mut w = OwnedWeights {
        kind,
        n,
        k,
        qs: Vec::with_capacity(blocks * kind.qs_bytes()),
        d: Vec::with_capacity(blocks * kind.scales_per_block()),
        m: Vec::with_capacity(if kind.has_min() { blocks } else { 0 }),
        sup: vec![],
    };
    for blk in bytes.chunks_exact(bb) {
        match ty {
            GgmlType::Q5_0 => q5_0(blk, &mut w),
            GgmlType::Q5_1 => q5_1(blk, &mut w),
            GgmlType::Q4_K => q4_k(blk, &mut w),
            GgmlType::Q5_K => q5_k(blk, &mut w),
            GgmlType::Q6_K => q6_k(blk, &mut w),
            _ => unreachable!("form_of covers the types above"),
        }
    }
    Ok(w)
}

/// The 5-bit values of a Q5_0 / Q5_1 block: nibbles and the 32 fifth bits of `qh`.
fn five_bits(qh: &[u8], qs: &[u8]) -> [u8; BLOCK] {
    let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let mut q = [0u8; BLOCK];
    for j in 0..BLOCK / 2 {
        q[j] = (qs[j] & 0x0f) | (((qh >> j) & 1) << 4) as u8;
        q[j + 16] = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4) as u8;
    }
    q
}

/// Q5_0: `d`, `qh`, nibbles; `x = d (q - 16)`: `d q + m` with `m = -16 d` (exact: `d q` and
/// `16 d` are f16 times 5 bits).
fn q5_0(blk: &[u8], w: &mut OwnedWeights) {
    let d = f16_at(blk, 0);
    w.d.push(d);
    w.m.push(-BlockKind::Q5_0.zero_point() * d);
    w.qs.extend_from_slice(&five_bits(&blk[2..6], &blk[6..22]));
}

/// Q5_1: `d`, `m`, `qh`, nibbles; `x = d q + m`.
fn q5_1(blk: &[u8], w: &mut OwnedWeights) {
    w.d.push(f16_at(blk, 0));
    w.m.push(f16_at(blk, 2));
    w.qs.extend_from_slice(&five_bits(&blk[4..8], &blk[8..24]));
}

/// Scale and minimum `j` (0..8) of a Q4_K / Q5_K super-block's 12 packed 6-bit bytes
/// (ggml's `get_scale_min_k4`).
fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// The 8 sub-blocks' scales and minimums of a Q4_K / Q5_K super-block: `d * sc`, `-dmin * m`
/// (and, for the Q4_K form, `d` and `dmin`).
fn k_scales(blk: &[u8], w: &mut OwnedWeights) {
    let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
    if w.kind == BlockKind::Q4K {
        w.sup.extend([d, dmin]);
    }
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, &blk[4..16]);
        w.d.push(d * sc as f32);
        w.m.push(-(dmin * m as f32));
    }
}

/// Q4_K: 256 weights, `d`, `dmin`, 12 bytes of 6-bit scales and minimums, 128 bytes of
/// nibbles: sub-block `2c` is the low nibbles of bytes `32c..32c + 32`, `2c + 1` their high
/// nibbles. Each sub-block becomes a Q4_1-like block (nibbles re-paired as Q4_1 pairs them).
fn q4_k(blk: &[u8], w: &mut OwnedWeights) {
    k_scales(blk, w);
    let qs = &blk[16..144];
    for c in 0..4 {
        let bytes = &qs[32 * c..32 * c + 32];
        for shift in [0, 4] {
            let v = |j: usize| (bytes[j] >> shift) & 0x0f;
            w.qs.extend((0..16).map(|j| v(j) | (v(j + 16) << 4)));
        }
    }
}

/// Q5_K: as Q4_K plus 32 bytes of fifth bits (bit `2c` of byte `l` for the low nibbles of
/// chunk `c`, bit `2c + 1` for the high ones).
fn q5_k(blk: &[u8], w: &mut OwnedWeights) {
    k_scales(blk, w);
    let (qh, qs) = (&blk[16..48], &blk[48..176]);
    for c in 0..4 {
        let bytes = &qs[32 * c..32 * c + 32];
        for (half, shift) in [(0, 0), (1, 4)] {
            let bit = 2 * c + half;
            w.qs.extend(
                (0..32).map(|l| ((bytes[l] >> shift) & 0x0f) | (((qh[l] >> bit) & 1) << 4)),
            );
        }
    }
}

/// Q6_K: 256 weights, 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 signed 8-bit
/// scales, `d` last; `x = d * sc[j / 16] * (q - 32)` in ggml's order of values.
fn q6_k(blk: &[u8], w: &mut OwnedWeights) {
    let (ql, qh, sc) = (&blk[0..128], &blk[128..192], &blk[192..208]);
    let d = f16_at(blk, 208);
    let mut y = [0i8; 256];
    for half in 0..2 {
        let (ql, qh) = (&ql[64 * half..], &qh[32 * half..]);
        let y = &mut y[128 * half..];
        for l in 0..32 {
            let q = |lo: u8, hi: u8| ((lo & 0x0f) | ((hi & 3) << 4)) as i8 - 32;
            y[l] = q(ql[l], qh[l]);
            y[l + 32] = q(ql[l + 32], qh[l] >> 2);
            y[l + 64] = q(ql[l] >> 4, qh[l] >> 4);
            y[l + 96] = q(ql[l + 32] >> 4, qh[l] >> 6);
        }
    }
    w.qs.extend(y.iter().map(|&v| v as u8));
    w.d.extend(sc.iter().map(|&s| d * (s as i8) as f32));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_min_k4_unpacks_six_bits() {
        // j < 4: low 6 bits of s[j], s[j + 4]; j >= 4: nibbles of s[j + 4] and top bits
        let mut s = [0u8; 12];
        s[0] = 0b11_000101; // sc0 = 5, top bits 3 go to sc4
        s[4] = 0b10_000111; // m0 = 7, top bits 2 go to m4
        s[8] = 0x9a; // sc4 low nibble 0xa, m4 low nibble 0x9
        assert_eq!(scale_min_k4(0, &s), (5, 7));
        assert_eq!(scale_min_k4(4, &s), (0x3a, 0x29));
    }

    #[test]
    fn every_type_needs_whole_blocks() {
        assert!(from_gguf(GgmlType::Q4_K, 1, 128, &[0; 72]).is_err());
        assert!(from_gguf(GgmlType::Q6_K, 1, 256, &[0; 209]).is_err());
        let w = from_gguf(GgmlType::Q6_K, 2, 256, &[0; 420]).unwrap();
        assert_eq!(
            (w.kind, w.d.len(), w.qs.len()),
            (BlockKind::Q8Half, 32, 512)
        );
        assert!(from_gguf(GgmlType::F16, 1, 32, &[0; 64]).is_err());
    }
}
