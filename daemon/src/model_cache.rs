//! A GGUF file given where a model directory is expected (`--model FILE.gguf`, `[model] path`)
//! is imported once, in Rust, into a cache, and the artifact there is what loads: as ollama
//! and llama.cpp take the file a user brings. The cache key is the file's path, size and
//! modification time (hashing gigabytes at every start would cost seconds) and the import's
//! revision; a changed file, or a fieldllmd that imports it differently, gets a new artifact. The import writes beside its destination and renames into place, so
//! an interrupted import leaves nothing half-written, and two processes importing at once
//! both end with the one that landed.

use std::path::{Path, PathBuf};

use anyhow::Context;
use sha2::{Digest, Sha256};

/// Where imported artifacts go: `$FIELDLLM_CACHE`, else systemd's `$CACHE_DIRECTORY` (the
/// unit's `CacheDirectory=fieldllm`), else `$XDG_CACHE_HOME/fieldllm`, else
/// `$HOME/.cache/fieldllm`; `models/` under it.
pub fn cache_root() -> PathBuf {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let base = var("FIELDLLM_CACHE")
        .or_else(|| {
            std::env::var("CACHE_DIRECTORY")
                .ok()
                .and_then(|s| s.split(':').next().map(PathBuf::from))
                .filter(|p| !p.as_os_str().is_empty())
        })
        .or_else(|| var("XDG_CACHE_HOME").map(|p| p.join("fieldllm")))
        .or_else(|| var("HOME").map(|p| p.join(".cache/fieldllm")))
        .unwrap_or_else(|| PathBuf::from("/var/cache/fieldllm"));
    base.join("models")
}

/// The artifact directory for `path`: `path` itself when it is a directory, else the cached
/// import of the GGUF file it names (made now if missing).
pub fn artifact_dir(path: PathBuf) -> anyhow::Result<PathBuf> {
    if !path.is_file() {
        return Ok(path);
    }
    let dir = cache_root().join(cache_name(&path)?);
    if dir.join("manifest.toml").exists() {
        return Ok(dir);
    }
    let root = cache_root();
    std::fs::create_dir_all(&root)
        .with_context(|| format!("creating the model cache {}", root.display()))?;
    tracing::info!(file = %path.display(), artifact = %dir.display(), "importing the GGUF (first use)");
    let start = std::time::Instant::now();
    match fieldllm_engine::import::import_gguf(&path, &dir, None) {
        Ok(_) => {
            tracing::info!(ms = start.elapsed().as_millis() as u64, "imported");
            Ok(dir)
        }
        // another process imported it meanwhile: theirs landed whole
        Err(_) if dir.join("manifest.toml").exists() => Ok(dir),
        Err(e) => Err(e).with_context(|| format!("importing {}", path.display())),
    }
}

/// `STEM-KEY`: the file's name, and 16 hex digits of its canonical path, size, mtime and the
/// import's revision.
fn cache_name(path: &Path) -> anyhow::Result<String> {
    let canon = path
        .canonicalize()
        .with_context(|| format!("{}", path.display()))?;
    let meta = std::fs::metadata(&canon).with_context(|| format!("{}", canon.display()))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let mut h = Sha256::new();
    h.update(canon.to_string_lossy().as_bytes());
    h.update(meta.len().to_le_bytes());
    h.update(mtime.to_le_bytes());
    h.update(fieldllm_engine::import::IMPORT_REVISION.to_le_bytes());
    let key = hex::encode(&h.finalize()[..8]);
    let stem = canon
        .file_stem()
        .map(|s| s.to_string_lossy().to_lowercase())
        .unwrap_or_else(|| "model".into());
    Ok(format!("{stem}-{key}"))
}
