//! GGUF files imported in Rust (issue 18): what a user's GGUF holds, turned into what the
//! engine runs. Here now: the tokenizer ([`tokenizer`]). Next: the tract graph and the
//! weights, straight from the file.

pub mod tokenizer;

use std::path::PathBuf;

pub use fieldllm_gguf as gguf;
pub use fieldllm_gguf::{Gguf, GgufError};

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
