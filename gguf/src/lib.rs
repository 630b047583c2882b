//! GGUF files read in Rust (issue 18, step 1): the header, the metadata and the tensor
//! directory, every count, length, type, shape and offset checked against the file before any
//! model work, so a truncated, damaged or hostile file is refused with a message that names
//! what is wrong, and never makes the reader allocate more than the file holds.
//!
//! Written here rather than taken from crates.io: the GGUF readers there (`gguf`, `gguf-rs`)
//! are small, little-used, and do not bound allocations by the file's size; this one is what
//! the fuzz target `gguf_reader` exercises. The format: ggml's `docs/gguf.md`, versions 2 and
//! 3 (little-endian).

mod read;
mod types;
mod value;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use read::{read, read_from};
pub use types::GgmlType;
pub use value::{Value, ValueType};

/// The most dimensions a ggml tensor has.
pub const MAX_DIMS: usize = 4;
/// Data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// One tensor of the directory.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// Its name (`blk.0.attn_q.weight`).
    pub name: String,
    /// ggml's dimensions, innermost (the row's length) first.
    pub dims: Vec<u64>,
    /// Its type.
    pub ty: GgmlType,
    /// Where its data starts, from the start of the file.
    pub offset: u64,
    /// Its data's length in bytes.
    pub bytes: u64,
}

impl TensorInfo {
    /// How many weights it holds.
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A GGUF file's header, metadata and tensor directory (the data stays in the file).
#[derive(Debug, Clone, PartialEq)]
pub struct Gguf {
    /// The file it was read from (empty for bytes in memory).
    pub path: PathBuf,
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata, by key.
    pub metadata: BTreeMap<String, Value>,
    /// Tensors, in the file's order.
    pub tensors: Vec<TensorInfo>,
    /// Where the data section starts.
    pub data_offset: u64,
    /// The data's alignment.
    pub alignment: u64,
    /// The file's length.
    pub file_len: u64,
}

/// Why a file is not a GGUF this reader can use.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// It could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The first four bytes are not `GGUF`.
    #[error("{path}: not a GGUF file (it starts with {magic:02x?}, a GGUF file with \"GGUF\")")]
    NotGguf {
        /// The file.
        path: PathBuf,
        /// Its first bytes.
        magic: Vec<u8>,
    },
    /// A version this reader does not read.
    #[error(
        "{path}: GGUF version {version}; versions 2 and 3 are read (convert older files with llama.cpp's convert scripts)"
    )]
    Version {
        /// The file.
        path: PathBuf,
        /// Its version.
        version: u32,
    },
    /// The file ends inside its header.
    #[error("{path}: truncated: the file ends at byte {len} inside {what}")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// What was being read.
        what: String,
        /// The file's length.
        len: u64,
    },
    /// The header is not what the format allows.
    #[error("{path}: {what}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong, and where.
        what: String,
    },
    /// A tensor of a type this reader does not know.
    #[error("{path}: tensor {tensor} has type {ty}, which fieldllm does not run")]
    UnsupportedType {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// ggml's name for the type, or its id.
        ty: String,
    },
    /// A tensor's data does not fit where the directory puts it.
    #[error("{path}: tensor {tensor}: {what}")]
    BadTensor {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// What is wrong (its size, its place in the file).
        what: String,
    },
    /// A metadata key the model needs is absent.
    #[error("{path}: metadata key {key} is missing")]
    MissingKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
    },
    /// A metadata value of the wrong type or out of range.
    #[error("{path}: metadata key {key} is {got}, expected {expected}")]
    WrongType {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What was expected.
        expected: &'static str,
        /// What it is.
        got: String,
    },
}

impl Gguf {
    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    fn need(&self, key: &str) -> Result<&Value, GgufError> {
        self.get(key).ok_or_else(|| GgufError::MissingKey {
            path: self.path.clone(),
            key: key.to_string(),
        })
    }

    fn wrong(&self, key: &str, expected: &'static str, got: &Value) -> GgufError {
        GgufError::WrongType {
            path: self.path.clone(),
            key: key.to_string(),
            expected,
            got: got.describe(),
        }
    }

    /// An unsigned integer (of any integer type that holds it).
    pub fn u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self.need(key)?;
        v.as_u64()
            .ok_or_else(|| self.wrong(key, "a non-negative integer", v))
    }

    /// An unsigned integer that fits 32 bits.
    pub fn u32(&self, key: &str) -> Result<u32, GgufError> {
        let v = self.need(key)?;
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| self.wrong(key, "an integer of 0..=4294967295", v))
    }

    /// A finite float (f32 or f64).
    pub fn f32(&self, key: &str) -> Result<f32, GgufError> {
        let v = self.need(key)?;
        v.as_f64()
            .map(|f| f as f32)
            .filter(|f| f.is_finite())
            .ok_or_else(|| self.wrong(key, "a finite number", v))
    }

    /// A string.
    pub fn str(&self, key: &str) -> Result<&str, GgufError> {
        let v = self.need(key)?;
        match v {
            Value::String(s) => Ok(s),
            other => Err(self.wrong(key, "a string", other)),
        }
    }

    /// An array of strings (`tokenizer.ggml.tokens`).
    pub fn strings(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        let v = self.need(key)?;
        match v {
            Value::Array(items) => items
                .iter()
                .map(|i| match i {
                    Value::String(s) => Ok(s.as_str()),
                    _ => Err(self.wrong(key, "an array of strings", v)),
                })
                .collect(),
            other => Err(self.wrong(key, "an array of strings", other)),
        }
    }

    /// `general.architecture` (`llama`, `qwen2`, ...).
    pub fn architecture(&self) -> Result<&str, GgufError> {
        self.str("general.architecture")
    }

    /// The tensor named `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// The file a path names, for messages.
fn shown(path: &Path) -> PathBuf {
    path.to_path_buf()
}
