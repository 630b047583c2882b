//! ggml's tensor types: their ids in a GGUF file and their block geometry (ggml-common.h).

/// A tensor type this reader knows the block layout of. The numbers are ggml's `ggml_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[allow(non_camel_case_types)] // ggml's own names, as users see them in file names
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// 32 weights: f16 scale, 16 bytes of 4-bit values.
    Q4_0,
    /// 32 weights: f16 scale and minimum, 16 bytes of 4-bit values.
    Q4_1,
    /// 32 weights: f16 scale, 4 bytes of 5th bits, 16 bytes of 4-bit values.
    Q5_0,
    /// 32 weights: f16 scale and minimum, 5th bits, 4-bit values.
    Q5_1,
    /// 32 weights: f16 scale, 32 signed bytes.
    Q8_0,
    /// 32 weights: f16 scale and sum, 32 signed bytes.
    Q8_1,
    /// 256 weights, 2-bit K-quant.
    Q2_K,
    /// 256 weights, 3-bit K-quant.
    Q3_K,
    /// 256 weights: f16 scale and minimum, 12 bytes of 6-bit sub-block scales, 4-bit values.
    Q4_K,
    /// 256 weights: as Q4_K plus 32 bytes of 5th bits.
    Q5_K,
    /// 256 weights: 4+2-bit values, 16 signed sub-block scales, f16 scale.
    Q6_K,
    /// 256 weights: f32 scale, 256 signed bytes, 16 block sums (activations only).
    Q8_K,
    /// 8-bit integer.
    I8,
    /// 16-bit integer.
    I16,
    /// 32-bit integer.
    I32,
    /// 64-bit integer.
    I64,
    /// 64-bit float.
    F64,
    /// bfloat16.
    BF16,
}

/// Each type: ggml's id, its name, weights per block and bytes per block (ggml-common.h).
const TYPES: [(GgmlType, u32, &str, u64, u64); 20] = {
    use GgmlType::*;
    [
        (F32, 0, "F32", 1, 4),
        (F16, 1, "F16", 1, 2),
        (Q4_0, 2, "Q4_0", 32, 18),
        (Q4_1, 3, "Q4_1", 32, 20),
        (Q5_0, 6, "Q5_0", 32, 22),
        (Q5_1, 7, "Q5_1", 32, 24),
        (Q8_0, 8, "Q8_0", 32, 34),
        (Q8_1, 9, "Q8_1", 32, 36),
        (Q2_K, 10, "Q2_K", 256, 84),
        (Q3_K, 11, "Q3_K", 256, 110),
        (Q4_K, 12, "Q4_K", 256, 144),
        (Q5_K, 13, "Q5_K", 256, 176),
        (Q6_K, 14, "Q6_K", 256, 210),
        (Q8_K, 15, "Q8_K", 256, 292),
        (I8, 24, "I8", 1, 1),
        (I16, 25, "I16", 1, 2),
        (I32, 26, "I32", 1, 4),
        (I64, 27, "I64", 1, 8),
        (F64, 28, "F64", 1, 8),
        (BF16, 30, "BF16", 1, 2),
    ]
};

/// ggml's ids this reader names but does not lay out.
const NAMED_ONLY: [(u32, &str); 14] = [
    (4, "Q4_2/Q4_3 (removed from ggml in 2023)"),
    (5, "Q4_2/Q4_3 (removed from ggml in 2023)"),
    (16, "IQ2_XXS"),
    (17, "IQ2_XS"),
    (18, "IQ3_XXS"),
    (19, "IQ1_S"),
    (20, "IQ4_NL"),
    (21, "IQ3_S"),
    (22, "IQ2_S"),
    (23, "IQ4_XS"),
    (29, "IQ1_M"),
    (34, "TQ1_0"),
    (35, "TQ2_0"),
    (39, "MXFP4"),
];

impl GgmlType {
    /// The type with ggml's id `id`; `Err` carries a name for the ids ggml has that this reader
    /// does not lay out (the i-quants, ternary and MX types), or `None` for an id ggml lacks.
    pub fn from_id(id: u32) -> Result<GgmlType, Option<&'static str>> {
        if let Some(row) = TYPES.iter().find(|r| r.1 == id) {
            return Ok(row.0);
        }
        Err(NAMED_ONLY.iter().find(|r| r.0 == id).map(|r| r.1))
    }

    fn row(self) -> &'static (GgmlType, u32, &'static str, u64, u64) {
        // every variant has its row (the test below checks the table)
        &TYPES[TYPES.iter().position(|r| r.0 == self).unwrap_or(0)]
    }

    /// ggml's id.
    pub fn id(self) -> u32 {
        self.row().1
    }

    /// Weights per block and bytes per block.
    pub fn block(self) -> (u64, u64) {
        let r = self.row();
        (r.3, r.4)
    }

    /// ggml's name ("Q4_K").
    pub fn name(self) -> &'static str {
        self.row().2
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_blocks_are_ggmls() {
        // one row per type, found by `row` (not the fallback to the first)
        for (i, r) in TYPES.iter().enumerate() {
            assert_eq!(r.0.row().1, r.1, "{}", r.2);
            assert!(
                TYPES[..i].iter().all(|o| o.0 != r.0 && o.1 != r.1),
                "{}",
                r.2
            );
        }
        for id in 0..64 {
            if let Ok(t) = GgmlType::from_id(id) {
                assert_eq!(t.id(), id);
                let (n, b) = t.block();
                assert!(n > 0 && b > 0, "{t}");
            }
        }
        // bits per weight as ggml-common.h's static asserts give them
        assert_eq!(GgmlType::Q4_K.block(), (256, 2 + 2 + 12 + 128));
        assert_eq!(GgmlType::Q6_K.block(), (256, 128 + 64 + 16 + 2));
        assert_eq!(GgmlType::Q5_0.block(), (32, 2 + 4 + 16));
        assert_eq!(GgmlType::from_id(20), Err(Some("IQ4_NL")));
        assert_eq!(GgmlType::from_id(999), Err(None));
    }
}
