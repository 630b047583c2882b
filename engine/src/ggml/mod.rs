//! The GGUF's own quantized blocks, run as they are: matrix products of 4- and 8-bit weights
//! with activations quantized once per row to 8 bits, using integer dot products.
//!
//! tract has no kernel for this (its only 4-bit path dequantizes every weight to f32 for every
//! activation value, and it cannot keep Q4_1's minimum at all; see PERFORMANCE.md), so the
//! project carries its own: [`kernel`] (scalar reference, AVX2, AVX-512 VNNI, NEON, NEON
//! dot-product, i8mm; the only module here with `unsafe`), split over [`crate::cpu::Team`], and
//! [`op`] (the tract ops, their NNEF form and the import transform that installs them).
//!
//! Weights come from the package as the GGUF stored them and are split into planes
//! ([`OwnedWeights`]: values, f16 scales and minimums widened to f32; the reference form the
//! tests and the import checks use), then packed for the kernels ([`packed`]: rows interleaved
//! in groups of 8). Neither step changes a quantized value.

mod acts;
pub mod convert;
pub mod kernel;
pub mod op;
pub mod packed;

pub use acts::QuantizedActs;

/// Values per quantization block (every GGUF type used here).
pub const BLOCK: usize = 32;

/// The run-time block forms the kernels run. Five are GGUF types' own (Q4_K's nearly byte for
/// byte); the others hold, value for value, the GGUF types whose values do not fit them
/// ([`convert`]): every weight dequantizes to exactly what ggml's dequantization gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockKind {
    /// GGUF's Q4_0: 4-bit unsigned `q` with one f16 scale, `x = d (q - 8)`, kept at its own 18
    /// bytes a block (the planes hold `m = -8 d`, exact, so every kernel computes it as Q4_1's
    /// `d q + m`; the packed form stores only `d`, as f16, and the kernels make `m`).
    Q4_0,
    /// GGUF's Q4_K at nearly its own size: per 256-value super-block and row its f16 `d` and
    /// `dmin`, per 32-value sub-block the 6-bit scale and minimum as bytes, then Q4_1's nibbles
    /// (148 bytes a block against the GGUF's 144; the Q4_1 form took 192). The planes hold
    /// each sub-block's `d sc` and `-dmin m` (exact in f32), so it runs as Q4_1 does.
    Q4K,
    /// GGUF's Q5_0 at its own size: 5-bit unsigned `q` with one f16 scale, `x = d (q - 16)`,
    /// packed as the nibbles of Q4_1's layout plus each row's 32 fifth bits (22 bytes a block,
    /// as the GGUF; the Q8_0 form took 36). The planes hold `q` as bytes and `m = -16 d`.
    Q5_0,
    /// 4-bit unsigned `q` with a scale and a minimum: `x = d * q + m`, 16 bytes of nibbles per
    /// block (low nibbles are values 0..16, high nibbles 16..32): GGUF's Q4_1.
    Q4_1,
    /// 8-bit signed `q` with a scale: `x = d * q`, 32 bytes per block: GGUF's Q8_0.
    Q8_0,
    /// 8-bit `q` (0..=31) with a scale and a minimum: `x = d * q + m`. Holds Q5_1 and Q5_K.
    Q8Min,
    /// 8-bit signed `q` (-32..=31) with a scale per 16 values: `x = d[j / 16] * q`. Holds Q6_K
    /// (each 16-value sub-block's scale times the super-block's).
    Q8Half,
}

impl BlockKind {
    /// Every form.
    pub const ALL: [BlockKind; 7] = [
        BlockKind::Q4_0,
        BlockKind::Q4K,
        BlockKind::Q5_0,
        BlockKind::Q4_1,
        BlockKind::Q8_0,
        BlockKind::Q8Min,
        BlockKind::Q8Half,
    ];

    /// The form's name (the GGUF type's, for GGUF's own forms).
    pub fn name(self) -> &'static str {
        match self {
            BlockKind::Q4_0 => "Q4_0",
            BlockKind::Q4K => "Q4_K",
            BlockKind::Q5_0 => "Q5_0",
            BlockKind::Q4_1 => "Q4_1",
            BlockKind::Q8_0 => "Q8_0",
            BlockKind::Q8Min => "Q8_MIN",
            BlockKind::Q8Half => "Q8_HALF",
        }
    }

    /// Parses a name of [`Self::name`].
    pub fn parse(s: &str) -> Option<BlockKind> {
        BlockKind::ALL.into_iter().find(|k| k.name() == s)
    }

    /// Bytes of quantized values per block (scales excluded).
    pub fn qs_bytes(self) -> usize {
        if self.nibbles() { BLOCK / 2 } else { BLOCK }
    }

    /// Whether the planes hold 4-bit values (two per byte).
    pub fn nibbles(self) -> bool {
        matches!(self, BlockKind::Q4_0 | BlockKind::Q4K | BlockKind::Q4_1)
    }

    /// The offset a form's unsigned values carry, `x = d (q - z)`: 8 for Q4_0, 16 for Q5_0, 0
    /// for the others. The planes hold it as the minimum `-z d`; the packed forms make it.
    pub fn zero_point(self) -> f32 {
        match self {
            BlockKind::Q4_0 => 8.0,
            BlockKind::Q5_0 => 16.0,
            _ => 0.0,
        }
    }

    /// Whether blocks carry a minimum (`x = d * q + m`).
    pub fn has_min(self) -> bool {
        matches!(
            self,
            BlockKind::Q4_0 | BlockKind::Q4K | BlockKind::Q5_0 | BlockKind::Q4_1 | BlockKind::Q8Min
        )
    }

    /// Scales per 32-value block (two for [`BlockKind::Q8Half`]).
    pub fn scales_per_block(self) -> usize {
        if self == BlockKind::Q8Half { 2 } else { 1 }
    }

    /// Bytes per block in the GGUF file, for GGUF's own forms (f16 scale, f16 minimum for
    /// Q4_1, then the values).
    pub fn gguf_block_bytes(self) -> usize {
        match self {
            BlockKind::Q4_1 => 4 + BLOCK / 2,
            BlockKind::Q4_0 | BlockKind::Q4K => 2 + BLOCK / 2,
            _ => 2 + BLOCK,
        }
    }
}

/// A weight matrix in the planes layout, borrowed.
#[derive(Debug, Clone, Copy)]
pub struct Weights<'a> {
    /// Block type.
    pub kind: BlockKind,
    /// Output rows.
    pub n: usize,
    /// Inputs per row (a multiple of [`BLOCK`]).
    pub k: usize,
    /// `n * k / 32` blocks of [`BlockKind::qs_bytes`] bytes, row-major.
    pub qs: &'a [u8],
    /// One scale per block ([`BlockKind::scales_per_block`]: two for `Q8Half`).
    pub d: &'a [f32],
    /// One minimum per block ([`BlockKind::has_min`]), else empty.
    pub m: &'a [f32],
}

/// Why a weight matrix cannot be used.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LayoutError {
    /// The sizes disagree with the shape.
    #[error("{0}")]
    Shape(String),
}

impl Weights<'_> {
    /// Blocks per row.
    pub fn blocks_per_row(&self) -> usize {
        self.k / BLOCK
    }

    /// Row `r` dequantized into `out` (`k` values): what the embedding lookup uses.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let nb = self.blocks_per_row();
        let qb = self.kind.qs_bytes();
        for b in 0..nb {
            let i = r * nb + b;
            let q = &self.qs[i * qb..(i + 1) * qb];
            let d = self.d[i];
            let o = &mut out[b * BLOCK..(b + 1) * BLOCK];
            match self.kind {
                BlockKind::Q4_0 | BlockKind::Q4K | BlockKind::Q4_1 => {
                    let m = self.m[i];
                    for j in 0..BLOCK / 2 {
                        o[j] = d * (q[j] & 0x0f) as f32 + m;
                        o[j + BLOCK / 2] = d * (q[j] >> 4) as f32 + m;
                    }
                }
                BlockKind::Q8_0 => {
                    for j in 0..BLOCK {
                        o[j] = d * (q[j] as i8) as f32;
                    }
                }
                BlockKind::Q5_0 | BlockKind::Q8Min => {
                    let m = self.m[i];
                    for j in 0..BLOCK {
                        o[j] = d * (q[j] as i8) as f32 + m;
                    }
                }
                BlockKind::Q8Half => {
                    let dd = [self.d[2 * i], self.d[2 * i + 1]];
                    for j in 0..BLOCK {
                        o[j] = dd[j / 16] * (q[j] as i8) as f32;
                    }
                }
            }
        }
    }
}

/// `k` (inputs per row) must be a positive multiple of [`BLOCK`].
pub fn check_k(k: usize) -> Result<(), LayoutError> {
    if k == 0 || !k.is_multiple_of(BLOCK) {
        return Err(LayoutError::Shape(format!(
            "k = {k} is not a positive multiple of {BLOCK}"
        )));
    }
    Ok(())
}

/// Owned planes, made from GGUF block bytes (the import) or kept by a test.
#[derive(Debug, Clone, PartialEq)]
pub struct OwnedWeights {
    /// Block type.
    pub kind: BlockKind,
    /// Output rows.
    pub n: usize,
    /// Inputs per row.
    pub k: usize,
    /// Quantized values, the GGUF's bytes.
    pub qs: Vec<u8>,
    /// Scales, widened from f16.
    pub d: Vec<f32>,
    /// Minimums (the forms of [`BlockKind::has_min`]): Q4_1's f16 widened, `-z d` for a zero
    /// point `z`, K-quants' `-dmin m`.
    pub m: Vec<f32>,
    /// Q4_K: per row and 256-value super-block, its `d` and `dmin` (f16, widened), the factors
    /// of the planes' `d sc` and `-dmin m`; empty for the other forms.
    pub sup: Vec<f32>,
}

impl OwnedWeights {
    /// Splits GGUF blocks (`n` rows of `k / 32` blocks) into planes. Nothing is re-quantized:
    /// values are copied and the f16 scales widened exactly.
    pub fn from_gguf(
        kind: BlockKind,
        n: usize,
        k: usize,
        bytes: &[u8],
    ) -> Result<OwnedWeights, LayoutError> {
        check_k(k)?;
        if !matches!(kind, BlockKind::Q4_0 | BlockKind::Q4_1 | BlockKind::Q8_0) {
            return Err(LayoutError::Shape(format!(
                "{} is not a GGUF type: see convert::from_gguf",
                kind.name()
            )));
        }
        let blocks = n * (k / BLOCK);
        let bb = kind.gguf_block_bytes();
        if bytes.len() != blocks * bb {
            return Err(LayoutError::Shape(format!(
                "{} [{n}, {k}] is {} bytes in GGUF blocks, got {}",
                kind.name(),
                blocks * bb,
                bytes.len()
            )));
        }
        let f16_at =
            |b: &[u8], o: usize| tract_core::prelude::f16::from_le_bytes([b[o], b[o + 1]]).to_f32();
        let mut w = OwnedWeights {
            kind,
            n,
            k,
            qs: Vec::with_capacity(blocks * kind.qs_bytes()),
            d: Vec::with_capacity(blocks),
            m: Vec::with_capacity(if kind.has_min() { blocks } else { 0 }),
            sup: vec![],
        };
        for blk in bytes.chunks_exact(bb) {
            w.d.push(f16_at(blk, 0));
            match kind {
                BlockKind::Q4_0 => {
                    w.m.push(-kind.zero_point() * f16_at(blk, 0));
                    w.qs.extend_from_slice(&blk[2..]);
                }
                BlockKind::Q4_1 => {
                    w.m.push(f16_at(blk, 2));
                    w.qs.extend_from_slice(&blk[4..]);
                }
                _ => w.qs.extend_from_slice(&blk[2..]),
            }
        }
        Ok(w)
    }

    /// Borrowed view.
    pub fn view(&self) -> Weights<'_> {
        Weights {
            kind: self.kind,
            n: self.n,
            k: self.k,
            qs: &self.qs,
            d: &self.d,
            m: &self.m,
        }
    }
}

/// The package's block index (`gguf_blocks.json`, written by the converter).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BlockIndex {
    tensors: Vec<IndexEntry>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct IndexEntry {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    rows: usize,
    cols: usize,
    offset: u64,
    bytes: u64,
}

/// Block index file of a package.
pub const BLOCKS_INDEX: &str = "gguf_blocks.json";
/// Block bytes file of a package.
pub const BLOCKS_BIN: &str = "gguf_blocks.bin";

/// Reads a package's GGUF blocks into planes, one per distinct tensor (entries pointing at the
/// same bytes share them).
pub fn package_blocks(
    package: &super::Package,
) -> Result<Vec<op::BlockTensor>, super::EngineError> {
    use super::EngineError;
    let ipath = package.path(BLOCKS_INDEX);
    let io = |path: &std::path::Path| {
        let path = path.to_path_buf();
        move |source| EngineError::Io { path, source }
    };
    let text = std::fs::read_to_string(&ipath).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => EngineError::Graph(format!(
            "{}: missing; weight format gguf needs a package converted with its GGUF blocks",
            ipath.display()
        )),
        _ => io(&ipath)(e),
    })?;
    let index: BlockIndex = serde_json::from_str(&text)
        .map_err(|e| EngineError::Graph(format!("{}: {e}", ipath.display())))?;
    let bpath = package.path(BLOCKS_BIN);
    let bytes = std::fs::read(&bpath).map_err(io(&bpath))?;
    let mut shared: std::collections::HashMap<u64, std::sync::Arc<OwnedWeights>> =
        Default::default();
    let mut out = Vec::with_capacity(index.tensors.len());
    for e in index.tensors {
        let bad = |m: String| EngineError::Graph(format!("{}: {}: {m}", ipath.display(), e.name));
        let kind = BlockKind::parse(&e.kind).ok_or_else(|| {
            bad(format!(
                "block type {:?} has no kernel (Q4_0, Q4_1, Q8_0 do)",
                e.kind
            ))
        })?;
        let end = e
            .offset
            .checked_add(e.bytes)
            .filter(|&end| end <= bytes.len() as u64);
        let end = end.ok_or_else(|| {
            bad(format!(
                "bytes {}+{} run past {}",
                e.offset, e.bytes, BLOCKS_BIN
            ))
        })?;
        let w = match shared.get(&e.offset) {
            Some(w) if (w.kind, w.n, w.k) == (kind, e.rows, e.cols) => w.clone(),
            Some(_) => return Err(bad("shares bytes with a tensor of another shape".into())),
            None => {
                let slice = &bytes[e.offset as usize..end as usize];
                let w = OwnedWeights::from_gguf(kind, e.rows, e.cols, slice)
                    .map_err(|err| bad(err.to_string()))?;
                let w = std::sync::Arc::new(w);
                shared.insert(e.offset, w.clone());
                w
            }
        };
        out.push(op::BlockTensor {
            precise: precise_activations(&e.name),
            name: e.name,
            key: e.offset,
            weights: w,
        });
    }
    Ok(out)
}

/// How the products quantize their activations: a load-time choice (`[model] activations`), the
/// artifact unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activations {
    /// Every product takes 8-bit activations in blocks of 32: the arithmetic of llama.cpp's CPU
    /// path (its Q8_0 / Q8_1 / Q8_K activation blocks), at its speed.
    #[default]
    Bits8,
    /// The products the artifact marks precise (the attention projections and the LM head) take
    /// ~15-bit activations (8 bits and a second 8-bit row of what they lost, see
    /// [`QuantizedActs::quantize_with_remainder`]): closer to the f32 model, twice the integer
    /// work of those products (docs/performance.md measures both).
    Precise,
}

impl Activations {
    /// Every setting.
    pub const ALL: [Activations; 2] = [Activations::Bits8, Activations::Precise];

    /// The setting's name, as the config file and the command line spell it.
    pub fn name(self) -> &'static str {
        match self {
            Activations::Bits8 => "8bit",
            Activations::Precise => "precise",
        }
    }
}

impl std::str::FromStr for Activations {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Activations::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Activations::ALL.iter().map(|a| a.name()).collect();
                format!("activations {s:?}: expected one of {names:?}")
            })
    }
}

impl std::fmt::Display for Activations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether products with the converter's constant `name` take 15-bit activations: the
/// attention projections and the LM head. Measured on SmolLM2 against the f32 model
/// (docs/performance.md): teacher-forced top-1 agreement 94.9% -> 97.7% on the 256-token
/// passage, mean KLD 0.0032 -> 0.0014 on LICENSE (ctx 512), the chat prompt's near-tie first
/// token ("The" vs "L", 0.08 apart in f32) chosen as f32 chooses it, for about 3% of decode
/// speed. Adding the MLP reached 98.4% but doubles the arithmetic of most of the layer.
fn precise_activations(name: &str) -> bool {
    precise_role(name.rsplit('.').next().unwrap_or(name))
}

/// [`precise_activations`] by the weight's role (`wq`, `wk`, `wv`, `wo`, `lm_head`): what the
/// Rust GGUF import asks.
pub(crate) fn precise_role(role: &str) -> bool {
    matches!(role, "wq" | "wk" | "wv" | "wo" | "lm_head")
}

#[cfg(test)]
mod tests;
