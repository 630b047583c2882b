//! GGUF files imported in Rust (issue 18): what a user's GGUF holds, turned into the artifact
//! the daemon deploys, with no Python and no f32 copy of the weights: the tokenizer
//! ([`tokenizer`]), the graph ([`llama`], built in code from the metadata that `hyper` reads
//! and checks) and the weights (`weights`: the file's blocks, value for value).

mod hyper;
pub mod llama;
pub mod tokenizer;
mod weights;

use std::path::{Path, PathBuf};

pub use fieldllm_gguf as gguf;
pub use fieldllm_gguf::{Gguf, GgufError};

use crate::EngineError;
use crate::package::{
    Architecture, ChatInfo, GraphFormat, GraphInfo, Manifest, ModelInfo, TokenIds, WeightFormat,
};

/// Why a GGUF cannot be imported.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The file itself is unreadable or malformed.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// It holds something fieldllm does not run (named).
    #[error("{path}: {what}")]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// What, by name.
        what: String,
    },
    /// Its parts do not agree with each other.
    #[error("{path}: {what}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What disagrees.
        what: String,
    },
}

/// Tokens that also end an answer when the vocabulary has them (llama.cpp's end-of-generation
/// set; the Python converter's list).
const END_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_end|>", "<|eot_id|>"];

/// What an import writes, numbered: raised whenever the same GGUF would import differently
/// (2: Q4_0, Q5_0 and Q4_K kept at their own size; the rotary embedding as `ApplyRope`), so
/// a cache keyed by it re-imports after an upgrade instead of keeping the older artifact.
pub const IMPORT_REVISION: u32 = 2;

/// Imports the GGUF at `path` into a deployable artifact in `out` (which must not exist):
/// metadata, tokenizer, chat template and tensors read in Rust, the graph built in code, the
/// weights kept in the file's blocks. `name` names the model (default: the file's
/// file's name). Everything that can be refused is refused before the weights are read.
pub fn import_gguf(path: &Path, out: &Path, name: Option<&str>) -> Result<Manifest, EngineError> {
    let g = gguf::read(path).map_err(ImportError::from)?;
    let h = llama::Hyper::read(&g)?;
    h.check_tensors(&g)?;
    let tokenizer = tokenizer::tokenizer_json(&g)?;
    let template = g
        .str("tokenizer.chat_template")
        .map_err(ImportError::from)?;
    let manifest = manifest(&g, &h, name)?;
    crate::graph::refuse_existing(out)?;
    let model = llama::build(&g, &h)?;
    let files = [
        (
            "tokenizer.json".to_string(),
            serde_json::to_vec(&tokenizer).map_err(|e| EngineError::Tokenizer(e.to_string()))?,
        ),
        (manifest.chat.template.clone(), template.as_bytes().to_vec()),
    ];
    crate::graph::write_artifact(&model, manifest, &files, out)
}

/// The artifact's manifest (files filled in when written).
fn manifest(g: &Gguf, h: &llama::Hyper, name: Option<&str>) -> Result<Manifest, ImportError> {
    let tokens = g.strings("tokenizer.ggml.tokens")?;
    let mut eos = vec![g.u32("tokenizer.ggml.eos_token_id")?];
    if let Ok(eot) = g.u32("tokenizer.ggml.eot_token_id") {
        eos.push(eot);
    }
    for extra in END_TOKENS {
        if let Some(id) = tokens.iter().position(|t| *t == extra) {
            eos.push(id as u32);
        }
    }
    let mut seen = std::collections::HashSet::new();
    eos.retain(|id| seen.insert(*id));
    let bos = g.u32("tokenizer.ggml.bos_token_id")?;
    for id in eos.iter().chain([&bos]) {
        if *id as usize >= tokens.len() {
            return Err(ImportError::Invalid {
                path: g.path.clone(),
                what: format!(
                    "special token id {id} is past the vocabulary ({} tokens)",
                    tokens.len()
                ),
            });
        }
    }
    // the file's name, as ollama and llama.cpp show it (`general.name` is often a training
    // run's: SmolLM2's says "smollm2-135m-8k-lc100k-mix1-ep2")
    let name = match name {
        Some(n) => n.to_string(),
        None => g
            .path
            .file_stem()
            .map(|s| s.to_string_lossy().to_lowercase())
            .unwrap_or_else(|| "model".into()),
    };
    let types: std::collections::BTreeSet<&str> = g.tensors.iter().map(|t| t.ty.name()).collect();
    let file = g
        .path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let sha256 = crate::package::sha256_file(&g.path).map_err(|e| ImportError::Invalid {
        path: g.path.clone(),
        what: e.to_string(),
    })?;
    Ok(Manifest {
        format_version: 1,
        model: ModelInfo {
            name,
            family: "llama".into(),
            parameters: g.tensors.iter().map(|t| t.elements()).sum(),
            context_length: h.context,
            vocab_size: h.vocab,
            license: g.str("general.license").unwrap_or("unknown").to_string(),
        },
        architecture: Architecture {
            layers: h.layers,
            hidden: h.hidden,
            ffn: h.ffn,
            heads: h.heads,
            kv_heads: h.kv_heads,
            rope_base: h.rope_base as f64,
            rms_eps: h.rms_eps as f64,
        },
        source: [
            ("file".to_string(), file),
            ("sha256".to_string(), sha256),
            (
                "quantization".to_string(),
                types.into_iter().collect::<Vec<_>>().join("+"),
            ),
            ("importer".to_string(), "fieldllmd (Rust)".to_string()),
        ]
        .into(),
        tokens: TokenIds { bos, eos },
        graph: GraphInfo {
            format: GraphFormat::Nnef,
            file: "model.nnef".into(),
            weights: WeightFormat::Gguf,
        },
        chat: ChatInfo {
            template: "chat_template.jinja".into(),
        },
        files: Default::default(),
    })
}
