//! The block kernels alone, on one thread: `cargo run --release -p fieldllm-engine --example
//! gemm_bench [ROWS...]` times `out = W x` for SmolLM2's feed-forward shapes in
//! every run-time form and every instruction set this CPU has, at 1 activation row (decode)
//! and 128 (prefill) unless ROWS says otherwise, and prints GMAC/s (multiply-adds per second).
//! Random weights in each GGUF type, made into the forms the import makes; the products are
//! the ones a model runs (`kernel::gemm`), checked against the scalar reference first.

use std::time::{Duration, Instant};

use fieldllm_engine::ggml::kernel::{Isa, gemm};
use fieldllm_engine::ggml::packed::{Packed, pack};
use fieldllm_engine::ggml::{QuantizedActs, convert};
use fieldllm_gguf::GgmlType;
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use tract_core::prelude::f16;

/// SmolLM2's feed-forward up (1536 x 576), and its down (576 x 1536) for the K-quants, whose
/// rows are whole 256-value super-blocks.
const UP: (usize, usize) = (1536, 576);
const DOWN: (usize, usize) = (576, 1536);

/// `n x k` weights of GGUF type `ty`: random bytes, each f16 scale set to a small number.
fn gguf_bytes(rng: &mut ChaCha8Rng, ty: GgmlType, n: usize, k: usize) -> Vec<u8> {
    let (per, bytes) = ty.block();
    let (per, bytes) = (per as usize, bytes as usize);
    let mut out = vec![0u8; n * k / per * bytes];
    rng.fill_bytes(&mut out);
    // where each block keeps its f16 scales (Q6_K: d last; Q4_K: d and dmin first)
    let scales: &[usize] = match ty {
        GgmlType::Q6_K => &[bytes - 2],
        GgmlType::Q4_K => &[0, 2],
        _ => &[0],
    };
    for blk in out.chunks_exact_mut(bytes) {
        for &at in scales {
            blk[at..at + 2].copy_from_slice(&f16::from_f32(0.01).to_le_bytes());
        }
    }
    out
}

fn time(mut f: impl FnMut()) -> Duration {
    f();
    let (start, mut runs) = (Instant::now(), 0u32);
    while runs < 3 || start.elapsed() < Duration::from_millis(300) {
        f();
        runs += 1;
    }
    start.elapsed() / runs
}

fn main() {
    let rows: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("ROWS: numbers"))
        .collect();
    let rows = if rows.is_empty() { vec![1, 128] } else { rows };
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let types = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q4_K,
        GgmlType::Q8_0,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ];
    println!("one thread; GMAC/s per instruction set");
    for &m in &rows {
        let (k, mut acts) = (UP.1, QuantizedActs::default());
        let x: Vec<f32> = (0..m * k).map(|i| (i % 97) as f32 - 48.5).collect();
        let took = time(|| acts.quantize(&x, m, k));
        let ns = took.as_secs_f64() * 1e9 / (m * k) as f64;
        println!("quantizing activations, rows {m:>3} of {k}: {ns:.2} ns a value");
    }
    for ty in types {
        let (per, _) = ty.block();
        let (n, k) = if per == 256 { DOWN } else { UP };
        let w = convert::from_gguf(ty, n, k, &gguf_bytes(&mut rng, ty, n, k)).expect("weights");
        let bytes = pack(&w);
        let p = Packed::new(w.kind, n, k, &bytes).expect("packed");
        for &m in &rows {
            let x: Vec<f32> = (0..m * k)
                .map(|_| (rng.next_u32() as f32 / u32::MAX as f32) - 0.5)
                .collect();
            let mut acts = QuantizedActs::default();
            acts.quantize(&x, m, k);
            let mut reference = vec![0f32; m * n];
            gemm(Isa::Scalar, &p, &acts, &mut reference);
            let mut line = format!("{:<5} ({:?}) {n}x{k} rows {m:>3}:", ty.name(), w.kind);
            for &isa in Isa::available() {
                let mut out = vec![0f32; m * n];
                let took = time(|| gemm(isa, &p, &acts, &mut out));
                // the kernels add in another order than the reference: close, not equal
                let size = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
                let worst = out
                    .iter()
                    .zip(&reference)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(worst <= 1e-4 * size, "{isa:?}: {worst} from the reference");
                let gmacs = (m * n * k) as f64 / took.as_secs_f64() / 1e9;
                line += &format!("  {isa:?} {gmacs:.1}");
            }
            println!("{line}");
        }
    }
}
