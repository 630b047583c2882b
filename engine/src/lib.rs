//! fieldllm's engine: model packages, the tract graph, the GGUF block kernels and attention,
//! tokenizer, chat template, sessions, sampler, generation.
//!
//! It knows nothing of MQTT, serial, async runtimes or the command line (it depends on none of
//! them, so the compiler holds that line): callers hand it token ids or messages and receive
//! [`generate::Event`]s through a callback, on their own thread. A [`Model`] is loaded once and
//! shared; each conversation owns a [`Session`] holding its KV cache.

pub mod attention;
pub mod batch;
pub mod chat;
pub mod cpu;
pub mod elementwise;
pub mod embed;
pub mod generate;
pub mod ggml;
pub mod graph;
pub mod import;
pub mod mapped;
pub mod norm;
pub mod package;
pub mod quality;
pub mod rope;
pub mod rows;
pub mod sampler;
pub mod session;
pub mod stop;
pub mod tokenizer;

use std::path::PathBuf;

pub use batch::Batcher;
pub use generate::{Event, FinishReason, GenerateParams, Outcome, generate};
pub use graph::{LoadOptions, Model};
pub use package::{Package, WeightFormat};
pub use sampler::SamplingParams;
pub use session::Session;

/// Everything the engine can fail with; each variant names what is wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `manifest.toml` is missing a field, has an unknown one, or is inconsistent.
    #[error("{path}: invalid manifest: {message}")]
    Manifest {
        /// The manifest.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A package file does not match the hash its manifest records.
    #[error(
        "{path}: sha256 mismatch (manifest says {expected}, file has {actual}): corrupt or modified model file"
    )]
    HashMismatch {
        /// The file.
        path: PathBuf,
        /// Hash in the manifest.
        expected: String,
        /// Hash of the file.
        actual: String,
    },
    /// The tokenizer cannot be loaded or does not fit the model.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template does not parse or render.
    #[error("chat template: {0}")]
    Template(String),
    /// tract could not load, transform or run the graph.
    #[error("model graph: {0}")]
    Graph(String),
    /// A request parameter is out of range.
    #[error("invalid parameter: {0}")]
    InvalidParam(String),
    /// The prompt is empty.
    #[error("empty prompt")]
    EmptyPrompt,
    /// The prompt does not fit the context window.
    #[error("prompt is {tokens} tokens, the context holds {context}")]
    PromptTooLong {
        /// Prompt length in tokens.
        tokens: usize,
        /// Context length in tokens.
        context: usize,
    },
    /// A GGUF file cannot be imported (named: the file, and what in it).
    #[error(transparent)]
    Import(#[from] import::ImportError),
}

impl EngineError {
    pub(crate) fn graph(e: impl std::fmt::Display) -> Self {
        // tract errors are anyhow chains: keep every cause, one line
        EngineError::Graph(format!("{e:#}"))
    }
}
