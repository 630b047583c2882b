//! What a Llama-family GGUF's metadata says about the graph to build ([`Hyper`]), read and
//! checked, and every tensor the graph will read checked against it, before any weight is
//! read.

use super::weights::tensor;
use super::{Gguf, ImportError};

/// The architectures this builder makes, by `general.architecture`: Llama (1, 2, 3, 3.1, 3.2,
/// SmolLM2) and Qwen2 / Qwen2.5, whose only differences are biases on the Q/K/V products and
/// rows kept in the rotary's half-split order (llama.cpp runs it as NEOX rotary).
pub const ARCHITECTURES: [&str; 2] = ["llama", "qwen2"];

/// The hyper-parameters the graph is built from, read from the metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Hyper {
    /// `general.architecture`.
    pub arch: String,
    /// Transformer blocks.
    pub layers: usize,
    /// Embedding width.
    pub hidden: usize,
    /// Feed-forward width.
    pub ffn: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (fewer: grouped-query attention).
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Rows of the embedding and the logits.
    pub vocab: usize,
    /// The context the model was trained for.
    pub context: usize,
    /// Rotary base.
    pub rope_base: f32,
    /// RMS norm epsilon.
    pub rms_eps: f32,
    /// Llama 3.1's per-frequency rotary factors (`rope_freqs.weight`), when the file has them.
    pub rope_freqs: bool,
    /// Whether the LM head is its own tensor (`output.weight`) or the embedding's (tied).
    pub untied_head: bool,
    /// Qwen2: the Q/K/V products have biases, and Q/K rows are stored in the half-split
    /// rotary order already (Llama's are permuted to llama.cpp's interleaved one).
    pub qkv_bias: bool,
}

impl Hyper {
    /// Reads and checks the metadata: every count positive, heads dividing the width and each
    /// other, the rotary covering whole heads; an architecture other than Llama's refused by
    /// name.
    pub fn read(g: &Gguf) -> Result<Hyper, ImportError> {
        let arch = g.architecture()?.to_string();
        let bad = |what: String| ImportError::Invalid {
            path: g.path.clone(),
            what,
        };
        if !ARCHITECTURES.contains(&arch.as_str()) {
            return Err(ImportError::Unsupported {
                path: g.path.clone(),
                what: format!(
                    "architecture {arch:?} is not one fieldllm builds (it builds: {})",
                    ARCHITECTURES.join(", ")
                ),
            });
        }
        let key = |k: &str| format!("{arch}.{k}");
        let count = |k: &str| -> Result<usize, ImportError> {
            let v = g.u32(&key(k))? as usize;
            if v == 0 {
                return Err(bad(format!("metadata key {} is 0", key(k))));
            }
            Ok(v)
        };
        let (layers, hidden, ffn, heads) = (
            count("block_count")?,
            count("embedding_length")?,
            count("feed_forward_length")?,
            count("attention.head_count")?,
        );
        let kv_heads = match g.get(&key("attention.head_count_kv")) {
            Some(_) => count("attention.head_count_kv")?,
            None => heads,
        };
        if hidden % heads != 0 || heads % kv_heads != 0 {
            return Err(bad(format!(
                "{heads} heads do not split a width of {hidden}, or {kv_heads} key/value heads do not divide them"
            )));
        }
        let head_dim = hidden / heads;
        if head_dim % 2 != 0 {
            return Err(bad(format!(
                "head width {head_dim} is odd: rotary needs pairs"
            )));
        }
        for k in [
            "rope.dimension_count",
            "attention.key_length",
            "attention.value_length",
        ] {
            if g.get(&key(k)).is_some() && count(k)? != head_dim {
                return Err(ImportError::Unsupported {
                    path: g.path.clone(),
                    what: format!(
                        "{} is {}, not the head width {head_dim}: partial rotary or unequal head widths are not built",
                        key(k),
                        count(k)?
                    ),
                });
            }
        }
        let rope_base = match g.get(&key("rope.freq_base")) {
            Some(_) => g.f32(&key("rope.freq_base"))?,
            None => 10000.0,
        };
        let rms_eps = g.f32(&key("attention.layer_norm_rms_epsilon"))?;
        if rope_base <= 0.0 || rms_eps < 0.0 {
            return Err(bad(format!(
                "rope base {rope_base} or RMS epsilon {rms_eps} out of range"
            )));
        }
        if let Some(kind) = g.get(&key("rope.scaling.type")) {
            let kind = g.str(&key("rope.scaling.type")).map_err(|_| {
                bad(format!(
                    "{} is {}",
                    key("rope.scaling.type"),
                    kind.describe()
                ))
            })?;
            if kind != "none" && !(kind == "llama3" && g.tensor("rope_freqs.weight").is_some()) {
                return Err(ImportError::Unsupported {
                    path: g.path.clone(),
                    what: format!(
                        "rotary scaling {kind:?} is not built (none, and llama3 with rope_freqs.weight, are)"
                    ),
                });
            }
        }
        let vocab = g.strings("tokenizer.ggml.tokens")?.len();
        let embd = tensor(g, "token_embd.weight")?;
        let untied_head = g.tensor("output.weight").is_some();
        for t in std::iter::once(embd).chain(g.tensor("output.weight")) {
            if t.dims.get(1) != Some(&(vocab as u64)) {
                return Err(bad(format!(
                    "the tokenizer has {vocab} tokens but {} has {} rows: the vocabulary does not match the model",
                    t.name,
                    t.dims.get(1).copied().unwrap_or(0)
                )));
            }
        }
        Ok(Hyper {
            layers,
            hidden,
            ffn,
            heads,
            kv_heads,
            head_dim,
            vocab,
            context: count("context_length")?,
            rope_base,
            rms_eps,
            rope_freqs: g.tensor("rope_freqs.weight").is_some(),
            untied_head,
            qkv_bias: arch == "qwen2",
            arch,
        })
    }

    /// Bytes of one conversation's KV cache at `tokens` positions, keys and values kept as
    /// `kv`.
    pub fn kv_bytes(&self, tokens: usize, kv: crate::attention::KvCache) -> u64 {
        crate::graph::kv_cache_bytes(self.layers, self.kv_heads * self.head_dim, tokens, kv)
    }

    /// Checks every tensor the graph reads (present, the shape the metadata gives it, a type
    /// it can hold) before any is read: a file is refused whole, by the first bad tensor.
    pub fn check_tensors(&self, g: &Gguf) -> Result<(), ImportError> {
        let (h, f, kv) = (self.hidden, self.ffn, self.kv_heads * self.head_dim);
        let mut matrices = vec![("token_embd.weight".to_string(), [h, self.vocab])];
        let mut vectors = vec![("output_norm.weight".to_string(), h)];
        if self.untied_head {
            matrices.push(("output.weight".into(), [h, self.vocab]));
        }
        if self.rope_freqs {
            vectors.push(("rope_freqs.weight".into(), self.head_dim / 2));
        }
        for i in 0..self.layers {
            let p = format!("blk.{i}.");
            for (t, dims) in [
                ("attn_q", [h, h]),
                ("attn_k", [h, kv]),
                ("attn_v", [h, kv]),
                ("attn_output", [h, h]),
                ("ffn_gate", [h, f]),
                ("ffn_up", [h, f]),
                ("ffn_down", [f, h]),
            ] {
                matrices.push((format!("{p}{t}.weight"), dims));
            }
            vectors.push((format!("{p}attn_norm.weight"), h));
            if self.qkv_bias {
                vectors.push((format!("{p}attn_q.bias"), h));
                vectors.push((format!("{p}attn_k.bias"), kv));
                vectors.push((format!("{p}attn_v.bias"), kv));
            }
            vectors.push((format!("{p}ffn_norm.weight"), h));
        }
        for (name, dims) in &matrices {
            super::weights::check(g, name, dims, true)?;
        }
        for (name, len) in &vectors {
            super::weights::check(g, name, &[*len], false)?;
        }
        Ok(())
    }
}
