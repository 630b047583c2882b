//! The instruction sets the kernels are written for, and which one this CPU runs.

use std::sync::OnceLock;

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
    /// aarch64 NEON with the 8-bit matrix-multiply extension (Armv8.6 i8mm): `smmla` for 2 or
    /// more activation rows (prefill, and the remainder rows of precise products), `sdot` for
    /// one.
    NeonI8mm,
}

impl Isa {
    /// Every instruction set this CPU can run, the reference first (detected once).
    pub fn available() -> &'static [Isa] {
        static AVAILABLE: OnceLock<Vec<Isa>> = OnceLock::new();
        AVAILABLE.get_or_init(Isa::detect)
    }

    fn detect() -> Vec<Isa> {
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
                    // the i8mm kernel hands single rows to the sdot one: it needs both
                    if std::arch::is_aarch64_feature_detected!("i8mm") {
                        v.push(Isa::NeonI8mm);
                    }
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
            Isa::NeonI8mm => "neon-i8mm",
        }
    }
}
