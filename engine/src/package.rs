//! Model packages and deployable artifacts: `manifest.toml`, file hashes, weight formats.
//!
//! A package (what `models/` writes) holds an ONNX graph with f32 weights. An artifact (what
//! `fieldllmd model import` writes and the daemon deploys) holds the same manifest with
//! `[graph] format = "nnef"` and the weights already in their run-time format.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::EngineError;

/// The manifest name inside a package directory.
pub const MANIFEST: &str = "manifest.toml";

/// `manifest.toml`, as written by the converter and by `model import`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Layout version of this file.
    pub format_version: u32,
    /// What the model is.
    pub model: ModelInfo,
    /// Shape of the network (informative; the graph is the authority).
    pub architecture: Architecture,
    /// Where the weights came from (file, hash, quantization).
    #[serde(default)]
    pub source: BTreeMap<String, String>,
    /// Special token ids.
    pub tokens: TokenIds,
    /// The network file and its weight format.
    pub graph: GraphInfo,
    /// The chat template file.
    pub chat: ChatInfo,
    /// sha256 of every file of the package, by relative path.
    pub files: BTreeMap<String, String>,
}

/// `[model]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelInfo {
    /// Package name, e.g. `smollm2-135m-instruct`.
    pub name: String,
    /// Architecture family (`llama`).
    pub family: String,
    /// Number of weights.
    pub parameters: u64,
    /// Longest sequence (prompt + answer) the model was trained for.
    pub context_length: usize,
    /// Rows of the logits.
    pub vocab_size: usize,
    /// SPDX-ish license name.
    pub license: String,
}

/// `[architecture]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Architecture {
    /// Transformer blocks.
    pub layers: usize,
    /// Embedding width.
    pub hidden: usize,
    /// Feed-forward width.
    pub ffn: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Rotary base frequency.
    pub rope_base: f64,
    /// RMS norm epsilon.
    pub rms_eps: f64,
}

/// `[tokens]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenIds {
    /// Beginning-of-sequence id.
    pub bos: u32,
    /// Ids that end generation.
    pub eos: Vec<u32>,
}

/// `[graph]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphInfo {
    /// Container of the network.
    pub format: GraphFormat,
    /// File (or directory) name inside the package.
    pub file: String,
    /// How the weights are stored.
    pub weights: WeightFormat,
}

/// `[chat]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatInfo {
    /// Jinja chat template file inside the package.
    pub template: String,
}

/// Container of the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GraphFormat {
    /// Standard ONNX decoder with past/present KV inputs; parsed and transformed at load.
    Onnx,
    /// tract NNEF, saved after the transforms; what the daemon deploys.
    Nnef,
}

/// How the weights are stored at run time. Adding a format means adding a variant here and its
/// transform in `graph.rs`; packages, artifacts and sessions do not change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightFormat {
    /// 32-bit floats: the reference.
    F32,
    /// 16-bit floats: half the bytes, same answers within the quality tests' bounds.
    F16,
    /// The GGUF's own quantized blocks (Q4_1, Q8_0), run as they are by the project's kernels
    /// (`engine::ggml`); needs a package converted with its blocks (`gguf_blocks.json`).
    Gguf,
}

impl fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WeightFormat::F32 => "f32",
            WeightFormat::F16 => "f16",
            WeightFormat::Gguf => "gguf",
        })
    }
}

impl FromStr for WeightFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" => Ok(WeightFormat::F32),
            "f16" => Ok(WeightFormat::F16),
            "gguf" => Ok(WeightFormat::Gguf),
            other => Err(format!(
                "unknown weight format {other:?} (known: f32, f16, gguf)"
            )),
        }
    }
}

/// A package directory with its parsed manifest.
#[derive(Debug, Clone)]
pub struct Package {
    /// The directory.
    pub dir: PathBuf,
    /// Its `manifest.toml`.
    pub manifest: Manifest,
}

impl Package {
    /// Reads and parses `DIR/manifest.toml` (no hashing: see [`Package::verify`]).
    pub fn open(dir: &Path) -> Result<Package, EngineError> {
        let manifest: Manifest = read_manifest(dir)?;
        let package = Package {
            dir: dir.to_path_buf(),
            manifest,
        };
        package.check_consistency()?;
        Ok(package)
    }

    fn check_consistency(&self) -> Result<(), EngineError> {
        let m = &self.manifest;
        let bad = |message: String| EngineError::Manifest {
            path: self.dir.join(MANIFEST),
            message,
        };
        for name in [
            &m.graph.file,
            &m.chat.template,
            &"tokenizer.json".to_string(),
        ] {
            if !m
                .files
                .keys()
                .any(|f| f == name || f.starts_with(&format!("{name}/")))
            {
                return Err(bad(format!("[files] has no hash for {name:?}")));
            }
        }
        for f in m.files.keys() {
            if outside_package(f) {
                return Err(bad(format!("file {f:?} lies outside the package")));
            }
        }
        let vocab = m.model.vocab_size;
        for id in std::iter::once(m.tokens.bos).chain(m.tokens.eos.iter().copied()) {
            if id as usize >= vocab {
                return Err(bad(format!(
                    "token id {id} is outside the vocabulary ({vocab})"
                )));
            }
        }
        if m.model.context_length == 0 {
            return Err(bad("context_length is 0".into()));
        }
        Ok(())
    }

    /// Path of a file named in the manifest.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// Checks every file's sha256 against the manifest; the error names the first bad file.
    pub fn verify(&self) -> Result<(), EngineError> {
        verify_files(&self.dir, &self.manifest.files)
    }

    /// Total size in bytes of the package's files.
    pub fn size_bytes(&self) -> u64 {
        self.manifest
            .files
            .keys()
            .filter_map(|f| std::fs::metadata(self.path(f)).ok())
            .map(|m| m.len())
            .sum()
    }
}

/// `DIR/manifest.toml` parsed as `T` (an LLM's [`Manifest`], an embedding model's, ...).
pub(crate) fn read_manifest<T: serde::de::DeserializeOwned>(dir: &Path) -> Result<T, EngineError> {
    let path = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&path).map_err(|source| EngineError::Io {
        path: path.clone(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| EngineError::Manifest {
        path,
        message: e.to_string(),
    })
}

/// Whether a manifest's file path leaves its package (absolute, or through `..`).
fn outside_package(rel: &str) -> bool {
    let p = Path::new(rel);
    p.is_absolute()
        || p.components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
}

/// Checks each file of `files` (relative path -> sha256) under `dir`; the error names the first
/// bad file. A path that leaves `dir` is refused before anything is read.
pub fn verify_files(dir: &Path, files: &BTreeMap<String, String>) -> Result<(), EngineError> {
    for (rel, want) in files {
        if outside_package(rel) {
            return Err(EngineError::Manifest {
                path: dir.join(MANIFEST),
                message: format!("file {rel:?} lies outside the package"),
            });
        }
        let path = dir.join(rel);
        let got = sha256_file(&path)?;
        if !got.eq_ignore_ascii_case(want) {
            return Err(EngineError::HashMismatch {
                path,
                expected: want.clone(),
                actual: got,
            });
        }
    }
    Ok(())
}

/// sha256 of a file, as lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String, EngineError> {
    let io = |source| EngineError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_format_round_trips_and_rejects_unknown() {
        for w in [WeightFormat::F32, WeightFormat::F16] {
            assert_eq!(w.to_string().parse::<WeightFormat>(), Ok(w));
        }
        assert!("q4_0".parse::<WeightFormat>().is_err());
    }
}
