//! Every kernel against the scalar reference, and the reference against plain f32 arithmetic,
//! on random blocks of awkward sizes.

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use tract_core::prelude::f16;

use super::kernel::{Isa, gemm};
use super::*;

fn uniform(rng: &mut ChaCha8Rng) -> f32 {
    (rng.next_u32() as f64 / u32::MAX as f64 * 2.0 - 1.0) as f32
}

/// Random GGUF blocks: random values, f16 scales of a trained model's size.
fn random_gguf(rng: &mut ChaCha8Rng, kind: BlockKind, n: usize, k: usize) -> Vec<u8> {
    let mut bytes = Vec::new();
    for _ in 0..n * k / BLOCK {
        bytes.extend(f16::from_f32(0.01 + 0.05 * uniform(rng).abs()).to_le_bytes());
        if kind == BlockKind::Q4_1 {
            bytes.extend(f16::from_f32(-0.2 * uniform(rng).abs()).to_le_bytes());
        }
        for _ in 0..kind.qs_bytes() {
            let mut b = rng.next_u32() as u8;
            if kind == BlockKind::Q8_0 && b == 0x80 {
                b = 0x81; // ggml's quantizer never writes -128
            }
            bytes.push(b);
        }
    }
    bytes
}

/// A row length near `k` that `kind` takes: Q4_K's rows are whole 256-value super-blocks.
fn row_len(kind: BlockKind, k: usize) -> usize {
    if kind == BlockKind::Q4K {
        k.next_multiple_of(256)
    } else {
        k
    }
}

/// Random Q4_K super-blocks as a GGUF holds them: f16 `d` and `dmin`, 12 bytes of packed
/// 6-bit scales and minimums (every bit random), 128 bytes of nibbles.
fn random_q4_k(rng: &mut ChaCha8Rng, n: usize, k: usize) -> OwnedWeights {
    let mut bytes = Vec::new();
    for _ in 0..n * k / 256 {
        bytes.extend(f16::from_f32(0.001 + 0.002 * uniform(rng).abs()).to_le_bytes());
        bytes.extend(f16::from_f32(0.001 * uniform(rng).abs()).to_le_bytes());
        bytes.extend((0..140).map(|_| rng.next_u32() as u8));
    }
    convert::from_gguf(fieldllm_gguf::GgmlType::Q4_K, n, k, &bytes).unwrap()
}

/// Every run-time form.
const KINDS: [BlockKind; 7] = BlockKind::ALL;

/// Random weights of `kind`: GGUF blocks for GGUF's own forms; for the others, the values the
/// GGUF types they hold make (Q5_1 / Q5_K: 0..=31 with a minimum; Q6_K: -32..=31, two scales).
fn random_weights(rng: &mut ChaCha8Rng, kind: BlockKind, n: usize, k: usize) -> OwnedWeights {
    let blocks = n * k / BLOCK;
    let scale = |rng: &mut ChaCha8Rng| f16::from_f32(0.01 + 0.05 * uniform(rng).abs()).to_f32();
    match kind {
        BlockKind::Q4_0 | BlockKind::Q4_1 | BlockKind::Q8_0 => {
            OwnedWeights::from_gguf(kind, n, k, &random_gguf(rng, kind, n, k)).unwrap()
        }
        BlockKind::Q4K => random_q4_k(rng, n, k),
        BlockKind::Q5_0 => {
            // f16 scales, then 4 bytes of fifth bits and 16 of nibbles, every bit random
            let mut bytes = Vec::new();
            for _ in 0..n * k / BLOCK {
                bytes.extend(f16::from_f32(0.01 + 0.05 * uniform(rng).abs()).to_le_bytes());
                bytes.extend((0..20).map(|_| rng.next_u32() as u8));
            }
            convert::from_gguf(fieldllm_gguf::GgmlType::Q5_0, n, k, &bytes).unwrap()
        }
        BlockKind::Q8Min => OwnedWeights {
            kind,
            n,
            k,
            qs: (0..blocks * BLOCK)
                .map(|_| (rng.next_u32() % 32) as u8)
                .collect(),
            d: (0..blocks).map(|_| scale(rng)).collect(),
            m: (0..blocks).map(|_| -0.2 * uniform(rng).abs()).collect(),
            sup: vec![],
        },
        BlockKind::Q8Half => OwnedWeights {
            kind,
            n,
            k,
            qs: (0..blocks * BLOCK)
                .map(|_| ((rng.next_u32() % 64) as i8 - 32) as u8)
                .collect(),
            d: (0..2 * blocks)
                .map(|_| scale(rng) * (1 + rng.next_u32() % 127) as f32 / 64.0)
                .collect(),
            m: vec![],
            sup: vec![],
        },
    }
}

fn random_acts(rng: &mut ChaCha8Rng, rows: usize, k: usize) -> Vec<f32> {
    (0..rows * k)
        .map(|i| uniform(rng) * if i % 7 == 0 { 4.0 } else { 1.0 })
        .collect()
}

/// The reference: planes as the GGUF stored them, one block at a time, integer dot product,
/// then the scales (ggml's `vec_dot_q4_1_q8_1` / `vec_dot_q8_0_q8_0`).
fn reference(w: &Weights<'_>, x: &QuantizedActs) -> Vec<f32> {
    let nb = w.blocks_per_row();
    let qb = w.kind.qs_bytes();
    let mut out = vec![0f32; x.rows * w.n];
    for c in 0..x.rows {
        for r in 0..w.n {
            let mut acc = 0f32;
            for b in 0..nb {
                let (wi, xi) = (r * nb + b, c * nb + b);
                let q = &w.qs[wi * qb..(wi + 1) * qb];
                let xq = &x.qs[xi * BLOCK..(xi + 1) * BLOCK];
                let mut sumi = 0i32;
                match w.kind {
                    BlockKind::Q4_0 | BlockKind::Q4K | BlockKind::Q4_1 => {
                        for j in 0..BLOCK / 2 {
                            sumi += (q[j] & 0x0f) as i32 * xq[j] as i32;
                            sumi += (q[j] >> 4) as i32 * xq[j + BLOCK / 2] as i32;
                        }
                        acc += w.d[wi] * x.d[xi] * sumi as f32 + w.m[wi] * x.s[xi];
                    }
                    BlockKind::Q8_0 | BlockKind::Q5_0 | BlockKind::Q8Min => {
                        for j in 0..BLOCK {
                            sumi += (q[j] as i8) as i32 * xq[j] as i32;
                        }
                        acc += w.d[wi] * x.d[xi] * sumi as f32;
                        if w.kind.has_min() {
                            acc += w.m[wi] * x.s[xi];
                        }
                    }
                    BlockKind::Q8Half => {
                        let mut half = [0i32; 2];
                        for j in 0..BLOCK {
                            half[j / 16] += (q[j] as i8) as i32 * xq[j] as i32;
                        }
                        acc += w.d[2 * wi] * x.d[xi] * half[0] as f32
                            + w.d[2 * wi + 1] * x.d[xi] * half[1] as f32;
                    }
                }
            }
            out[c * w.n + r] = acc;
        }
    }
    out
}

#[test]
fn the_reference_is_the_f32_product_of_the_dequantized_operands() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for kind in KINDS {
        let (n, k, rows) = (5, row_len(kind, 96), 3);
        let w = random_weights(&mut rng, kind, n, k);
        let x = random_acts(&mut rng, rows, k);
        let mut q = QuantizedActs::default();
        q.quantize(&x, rows, k);
        let out = reference(&w.view(), &q);
        let mut wrow = vec![0f32; k];
        for c in 0..rows {
            for r in 0..n {
                w.view().dequantize_row(r, &mut wrow);
                let mut want = 0f64;
                let mut scale = 0f64;
                for (kk, w) in wrow.iter().enumerate() {
                    let xd = q.d[(c * k + kk) / BLOCK] * q.qs[c * k + kk] as f32;
                    want += *w as f64 * xd as f64;
                    scale += (*w as f64 * xd as f64).abs();
                }
                let got = out[c * n + r] as f64;
                assert!(
                    (got - want).abs() <= 1e-5 * scale + 1e-6,
                    "{kind:?} [{c},{r}]: {got} vs {want}"
                );
            }
        }
    }
}

#[test]
fn quantized_activations_are_within_half_a_step() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let mut x = random_acts(&mut rng, 2, 64);
    x[32..64].iter_mut().for_each(|v| *v = 0.0); // an all-zero block
    let mut q = QuantizedActs::default();
    q.quantize(&x, 2, 64);
    for (i, v) in x.iter().enumerate() {
        let d = q.d[i / BLOCK];
        assert!((d * q.qs[i] as f32 - v).abs() <= d / 2.0 + 1e-7, "x[{i}]");
    }
    assert_eq!(q.d[1], 0.0);
    for b in 0..q.d.len() {
        let sum: i32 = q.qs[b * BLOCK..(b + 1) * BLOCK]
            .iter()
            .map(|&v| v as i32)
            .sum();
        assert_eq!(q.s[b], q.d[b] * sum as f32);
    }
}

#[test]
fn rounding_is_f32_round() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let mut ys: Vec<f32> = (0..10_000).map(|_| uniform(&mut rng) * 130.0).collect();
    let below_half = f32::from_bits(0.5f32.to_bits() - 1);
    ys.extend([
        0.5,
        -0.5,
        1.5,
        -2.5,
        below_half,
        -below_half,
        126.5,
        -127.0,
        0.0,
        -0.0,
    ]);
    for y in ys {
        assert_eq!(super::acts::round_half_away(y), y.round() as i32, "{y}");
    }
    assert_eq!(super::acts::round_half_away(f32::NAN), 0);
}

#[test]
fn a_remainder_row_brings_the_activations_to_15_bits() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (rows, k) = (3, 96);
    let x = random_acts(&mut rng, rows, k);
    let mut q = QuantizedActs::default();
    q.quantize_with_remainder(&x, rows, k);
    assert_eq!((q.rows, q.k), (2 * rows, k));
    let half = rows * k / BLOCK;
    for (i, v) in x.iter().enumerate() {
        let (b, r) = (i / BLOCK, half + i / BLOCK);
        let first = q.d[b] * q.qs[i] as f32;
        let both = first + q.d[r] * q.qs[rows * k + i] as f32;
        // the remainder is at most half a step, quantized in 127 steps of its own
        assert!((both - v).abs() <= q.d[b] / 254.0 * 0.51 + 1e-7, "x[{i}]");
        assert!((both - v).abs() <= (first - v).abs(), "x[{i}]");
    }
}

#[test]
fn quantizing_over_a_team_gives_the_same_bytes() {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    for threads in [2, 3] {
        let team = crate::cpu::Team::new(threads);
        // below the rows a team shares, uneven splits, more rows than blocks of work
        for rows in [1, 7, 8, 9, 37, 128] {
            let k = 96;
            let x = random_acts(&mut rng, rows, k);
            for remainder in [false, true] {
                let mut alone = QuantizedActs::default();
                if remainder {
                    alone.quantize_with_remainder(&x, rows, k);
                } else {
                    alone.quantize(&x, rows, k);
                }
                // a buffer left from a larger call is resized, not trusted
                let mut shared = QuantizedActs::default();
                shared.quantize_on(Some(&team), &random_acts(&mut rng, 200, k), 200, k, true);
                shared.quantize_on(Some(&team), &x, rows, k, remainder);
                assert_eq!((shared.rows, shared.k), (alone.rows, alone.k));
                assert_eq!(shared.qs, alone.qs, "{threads} threads, {rows} rows");
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&shared.d), bits(&alone.d));
                assert_eq!(bits(&shared.s), bits(&alone.s));
            }
        }
    }
}

#[test]
fn every_kernel_matches_the_reference_on_awkward_sizes() {
    let isas = crate::cpu::tested_isas();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for kind in KINDS {
        for (n, k) in [
            (1, 32),
            (3, 64),
            (5, 96),
            (7, 576),
            (13, 160),
            (67, 224),
            (4, 32),
        ] {
            let k = row_len(kind, k);
            // every way to cut rows into tiles of 4, 2 and 1
            for rows in [1, 2, 3, 4, 5, 6, 7, 9, 37] {
                let w = random_weights(&mut rng, kind, n, k);
                let mut q = QuantizedActs::default();
                q.quantize(&random_acts(&mut rng, rows, k), rows, k);
                let want = reference(&w.view(), &q);
                let bytes = packed::pack(&w);
                let p = packed::Packed::new(kind, n, k, &bytes).unwrap();
                let mut dot = None;
                for &isa in isas {
                    let mut got = vec![f32::NAN; rows * n];
                    gemm(isa, &p, &q, &mut got);
                    for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (g - e).abs() <= 1e-4 * e.abs().max(1.0),
                            "{isa:?} {kind:?} n={n} k={k} rows={rows} [{i}]: {g} vs {e}"
                        );
                    }
                    // the i8mm kernel forms the same integer sums and applies the scales in
                    // the same f32 operations as the sdot one: the same bits
                    // so do AVX-512's kernels (512-bit tiles of a decode step or a prompt
                    // chunk, the 256-bit VNNI one) and AVX2's
                    match isa {
                        Isa::NeonDot | Isa::Avx2 => dot = Some(got),
                        Isa::NeonI8mm | Isa::Avx512Vnni => assert!(
                            dot.as_ref().is_none_or(|d| same_bits(d, &got)),
                            "{kind:?} n={n} k={k} rows={rows}: {isa:?} differs"
                        ),
                        _ => {}
                    }
                }
            }
        }
    }
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Random weights of `kind`, `[n, k]`, packed for the kernels.
fn random_packed(rng: &mut ChaCha8Rng, kind: BlockKind, n: usize, k: usize) -> Vec<u8> {
    packed::pack(&random_weights(rng, kind, n, k))
}

#[test]
fn a_split_product_equals_the_whole() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let (n, k, rows) = (133, 128, 3);
    let bytes = random_packed(&mut rng, BlockKind::Q4_1, n, k);
    let p = packed::Packed::new(BlockKind::Q4_1, n, k, &bytes).unwrap();
    let mut q = QuantizedActs::default();
    q.quantize(&random_acts(&mut rng, rows, k), rows, k);
    let isa = Isa::best();
    let mut whole = vec![0f32; rows * n];
    gemm(isa, &p, &q, &mut whole);
    let team = crate::cpu::Team::new(3);
    let mut split = vec![f32::NAN; rows * n];
    kernel::gemm_on(Some(&team), isa, &p, &q, &mut split);
    assert_eq!(whole, split);
}

/// A product that panics in its parts (activations of another width: the kernel entry's check)
/// reaches the caller as a panic only once every part is done, writes nothing, and leaves the
/// team whole: the next product on it is right.
#[test]
fn a_product_that_panics_leaves_the_team_whole() {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let (n, k, rows) = (133, 128, 3);
    let bytes = random_packed(&mut rng, BlockKind::Q8_0, n, k);
    let p = packed::Packed::new(BlockKind::Q8_0, n, k, &bytes).unwrap();
    let isa = Isa::best();
    let team = crate::cpu::Team::new(2);
    let mut narrow = QuantizedActs::default();
    narrow.quantize(&random_acts(&mut rng, rows, 64), rows, 64);
    let mut out = vec![f32::NAN; rows * n];
    let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        kernel::gemm_on(Some(&team), isa, &p, &narrow, &mut out)
    }));
    assert!(failed.is_err(), "a mismatched product must not run");
    assert!(out.iter().all(|v| v.is_nan()), "nothing was written");
    let mut q = QuantizedActs::default();
    q.quantize(&random_acts(&mut rng, rows, k), rows, k);
    let mut whole = vec![0f32; rows * n];
    gemm(isa, &p, &q, &mut whole);
    let mut split = vec![f32::NAN; rows * n];
    kernel::gemm_on(Some(&team), isa, &p, &q, &mut split);
    assert_eq!(whole, split);
}

#[test]
fn planes_check_their_sizes() {
    assert!(OwnedWeights::from_gguf(BlockKind::Q4_1, 2, 48, &[0; 60]).is_err());
    assert!(OwnedWeights::from_gguf(BlockKind::Q4_1, 2, 32, &[0; 39]).is_err());
    let w = OwnedWeights::from_gguf(BlockKind::Q8_0, 2, 32, &[0; 68]).unwrap();
    assert_eq!((w.qs.len(), w.d.len(), w.m.len()), (64, 2, 0));
}

#[test]
fn packing_moves_every_value_and_scale_unchanged() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for kind in KINDS {
        for (n, k) in [(1, 32), (8, 64), (13, 96)] {
            let k = row_len(kind, k);
            let w = random_weights(&mut rng, kind, n, k);
            let bytes = packed::pack(&w);
            let p = packed::Packed::new(kind, n, k, &bytes).unwrap();
            let (mut a, mut b) = (vec![0f32; k], vec![0f32; k]);
            for r in 0..n {
                w.view().dequantize_row(r, &mut a);
                p.dequantize_row(r, &mut b);
                assert_eq!(a, b, "{kind:?} [{n}, {k}] row {r}");
            }
            assert!(packed::Packed::new(kind, n, k, &bytes[1..]).is_err());
        }
    }
}

/// Q4_0 kept at its GGUF size (f16 scales, no minimum plane) gives, on every instruction set,
/// the same bits as the same weights held in the Q4_1 form (`m = -8 d` in f32), which it
/// replaced: a quarter fewer bytes read, nothing else changed.
#[test]
fn q4_0_at_its_own_size_computes_what_the_q4_1_form_did() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for (n, k, rows) in [(13, 160, 1), (67, 224, 5), (8, 576, 37)] {
        let w0 = random_weights(&mut rng, BlockKind::Q4_0, n, k);
        let w1 = OwnedWeights {
            kind: BlockKind::Q4_1,
            ..w0.clone()
        };
        let (b0, b1) = (packed::pack(&w0), packed::pack(&w1));
        assert_eq!(
            b0.len() * 4,
            b1.len() * 3,
            "18 bytes a row-block against 24"
        );
        assert_eq!(b0.len(), n.div_ceil(8) * 8 * k / BLOCK * 18);
        let p0 = packed::Packed::new(BlockKind::Q4_0, n, k, &b0).unwrap();
        let p1 = packed::Packed::new(BlockKind::Q4_1, n, k, &b1).unwrap();
        assert_same_products(&mut rng, &p0, &p1, rows);
    }
}

/// `a` and `b` (the same weights in two forms) give the same bits on every instruction set,
/// for `rows` random activation rows.
fn assert_same_products(
    rng: &mut ChaCha8Rng,
    a: &packed::Packed<'_>,
    b: &packed::Packed<'_>,
    rows: usize,
) {
    let (n, k) = (a.n, a.k);
    let mut q = QuantizedActs::default();
    q.quantize(&random_acts(rng, rows, k), rows, k);
    for &isa in crate::cpu::tested_isas() {
        let (mut x, mut y) = (vec![0f32; rows * n], vec![0f32; rows * n]);
        gemm(isa, a, &q, &mut x);
        gemm(isa, b, &q, &mut y);
        assert!(
            same_bits(&x, &y),
            "{isa:?} {:?} n={n} k={k} rows={rows}",
            a.kind
        );
    }
}

/// Q4_K at nearly its own size (6-bit factors, f16 super-block scales) gives, on every
/// instruction set, the same bits as the same weights held in the Q4_1 form (each block's
/// `d sc` and `-dmin m` in f32), which it replaced.
#[test]
fn q4_k_at_its_own_size_computes_what_the_q4_1_form_did() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    for (n, k, rows) in [(13, 256, 1), (67, 512, 5), (8, 768, 37)] {
        let wk = random_q4_k(&mut rng, n, k);
        let w1 = OwnedWeights {
            kind: BlockKind::Q4_1,
            sup: vec![],
            ..wk.clone()
        };
        let (bk, b1) = (packed::pack(&wk), packed::pack(&w1));
        assert_eq!(
            bk.len(),
            n.div_ceil(8) * 8 * k / 256 * 148,
            "148 bytes a row-block"
        );
        let pk = packed::Packed::new(BlockKind::Q4K, n, k, &bk).unwrap();
        let p1 = packed::Packed::new(BlockKind::Q4_1, n, k, &b1).unwrap();
        for r in 0..n {
            for b in 0..k / BLOCK {
                assert_eq!(pk.block(r, b), p1.block(r, b), "row {r} block {b}");
            }
        }
        assert_same_products(&mut rng, &pk, &p1, rows);
    }
    assert!(packed::Packed::new(BlockKind::Q4K, 8, 288, &[0; 8 * 9 * 148]).is_err());
}

/// The forms of GGUF's own types keep its bytes a block (Q4_K: 148 against 144).
#[test]
fn packed_forms_read_the_gguf_bytes() {
    let per_row_block = |kind: BlockKind| packed::group_block_bytes(kind) as f64 / 8.0;
    assert_eq!(per_row_block(BlockKind::Q4_0), 18.0);
    assert_eq!(per_row_block(BlockKind::Q5_0), 22.0);
    assert_eq!(per_row_block(BlockKind::Q4K), 18.5);
}

/// A row's product has the same bits in a tile of any height, on every instruction set: alone
/// (a decode step), among 2-7 rows (answers decoded together: tiles of 4, 2 and 1) or among
/// 8 or more (a prompt's chunk, which AVX-512 runs on 512-bit tiles of two row groups, an odd
/// last group on the 256-bit kernel). An answer's tokens must not depend on the batch it ran in.
#[test]
fn a_row_has_the_same_bits_in_a_tile_of_any_height() {
    let isas = crate::cpu::tested_isas();
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    for kind in KINDS {
        // 9 groups (pairs and an odd last one), 2 groups, one partial group
        for (n, k) in [(67, 224), (16, 576), (5, 96)] {
            let k = row_len(kind, k);
            let bytes = random_packed(&mut rng, kind, n, k);
            let p = packed::Packed::new(kind, n, k, &bytes).unwrap();
            for rows in [2, 3, 4, 7, 8, 9, 11, 37] {
                let x = random_acts(&mut rng, rows, k);
                let mut q = QuantizedActs::default();
                q.quantize(&x, rows, k);
                for &isa in isas {
                    let mut all = vec![f32::NAN; rows * n];
                    gemm(isa, &p, &q, &mut all);
                    for (r, want) in all.chunks_exact(n).enumerate() {
                        let mut one = QuantizedActs::default();
                        one.quantize(&x[r * k..(r + 1) * k], 1, k);
                        let mut alone = vec![f32::NAN; n];
                        gemm(isa, &p, &one, &mut alone);
                        assert!(
                            same_bits(&alone, want),
                            "{isa:?} {kind:?} n={n} k={k}: row {r} of {rows} differs from alone"
                        );
                    }
                }
            }
        }
    }
}
