//! The instruction sets the kernels are written for, and which one this CPU runs.

use std::sync::OnceLock;

/// An instruction set a kernel is written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Plain Rust: the reference, and what any other CPU runs.
    Scalar,
    /// x86-64 AVX2 + FMA: `vpmaddubsw` + `vpmaddwd`.
    Avx2,
    /// x86-64 AVX-512 VNNI: `vpdpbusd` (256-bit, and 512-bit for the 4-bit forms); AVX-512F
    /// and BW for attention and those 512-bit tiles.
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
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                v.push(Isa::Avx2);
                if is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vnni")
                    && is_x86_feature_detected!("avx512vl")
                {
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

    /// The fastest this CPU runs (detected once), or the one `FIELDLLM_ISA=scalar|avx2|...`
    /// picks for comparing them. A `FIELDLLM_ISA` that [`Isa::requested`] refuses is not
    /// obeyed here; [`crate::Model::load`] refuses it before any kernel runs.
    pub fn best() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| {
            let fastest = *Isa::available().last().unwrap_or(&Isa::Scalar);
            Isa::requested().ok().flatten().unwrap_or(fastest)
        })
    }

    /// The instruction set `FIELDLLM_ISA` asks for (None when unset or empty). An unknown
    /// name, or one this CPU cannot run, is an error rather than quietly another kernel: a
    /// comparison of two kernels must not compare one with itself.
    pub fn requested() -> Result<Option<Isa>, String> {
        match std::env::var("FIELDLLM_ISA") {
            Ok(want) if !want.is_empty() => Isa::pick(&want, Isa::available()).map(Some),
            _ => Ok(None),
        }
    }

    fn pick(want: &str, available: &[Isa]) -> Result<Isa, String> {
        let names = |v: &[Isa]| v.iter().map(|i| i.name()).collect::<Vec<_>>().join(", ");
        let Some(isa) = Isa::ALL.iter().find(|i| i.name() == want) else {
            return Err(format!(
                "FIELDLLM_ISA={want:?}: not an instruction set of the kernels (one of {})",
                names(&Isa::ALL)
            ));
        };
        if available.contains(isa) {
            Ok(*isa)
        } else {
            Err(format!(
                "FIELDLLM_ISA={want}: this CPU cannot run it (it runs {})",
                names(available)
            ))
        }
    }

    /// Every instruction set the kernels are written for.
    pub const ALL: [Isa; 6] = [
        Isa::Scalar,
        Isa::Avx2,
        Isa::Avx512Vnni,
        Isa::Neon,
        Isa::NeonDot,
        Isa::NeonI8mm,
    ];

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

/// For the kernel tests: the instruction sets this CPU runs, after checking that it runs every
/// one `FIELDLLM_TEST_ISAS` (comma-separated names) lists. CI lists those its machines must
/// have, so a kernel that went undetected fails its test instead of going untested while the
/// reference is compared with itself.
#[cfg(test)]
pub(crate) fn tested_isas() -> &'static [Isa] {
    let isas = Isa::available();
    eprintln!("kernels on this CPU: {isas:?}");
    if let Ok(want) = std::env::var("FIELDLLM_TEST_ISAS") {
        for name in want.split(',').filter(|n| !n.is_empty()) {
            assert!(
                isas.iter().any(|i| i.name() == name),
                "FIELDLLM_TEST_ISAS wants {name}, this CPU runs {isas:?}"
            );
        }
    }
    isas
}

#[cfg(test)]
mod tests {
    use super::Isa;

    #[test]
    fn a_requested_isa_is_known_and_runnable_or_refused() {
        let here = [Isa::Scalar, Isa::Avx2];
        assert_eq!(Isa::pick("avx2", &here), Ok(Isa::Avx2));
        assert_eq!(Isa::pick("scalar", &here), Ok(Isa::Scalar));
        let e = Isa::pick("avx512vnni", &here).unwrap_err();
        assert!(
            e.contains("cannot run") && e.contains("scalar, avx2"),
            "{e}"
        );
        let e = Isa::pick("AVX2", &here).unwrap_err();
        assert!(
            e.contains("not an instruction set") && e.contains("neon-i8mm"),
            "{e}"
        );
        for isa in Isa::ALL {
            assert_eq!(Isa::pick(isa.name(), &Isa::ALL), Ok(isa));
        }
    }
}
