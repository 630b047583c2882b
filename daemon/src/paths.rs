//! Where things are looked for when the command line and config say nothing.

use std::path::PathBuf;

/// Installed location of the default model (what the Yocto recipe and Debian layout use).
pub const SYSTEM_MODEL_DIR: &str = "/usr/share/fieldllm/models/smollm2-135m-instruct";
/// Where `models/setup.sh` leaves the deployable artifact in a source checkout.
pub const DEV_MODEL_DIR: &str = "models/build/smollm2-135m-instruct.gguf";

/// Installed location of the sentence-embedding model for document search.
pub const SYSTEM_EMBEDDER_DIR: &str = "/usr/share/fieldllm/models/all-minilm-l6-v2";
/// Where `models/setup.sh` leaves it in a source checkout.
pub const DEV_EMBEDDER_DIR: &str = "models/build/all-minilm-l6-v2";

/// The embedding model to use: `explicit`, else `$FIELDLLM_EMBEDDER`, else the installed one,
/// else a source checkout's (relative to the current directory).
pub fn default_embedder_dir(explicit: Option<PathBuf>) -> PathBuf {
    package_dir(
        explicit,
        "FIELDLLM_EMBEDDER",
        SYSTEM_EMBEDDER_DIR,
        DEV_EMBEDDER_DIR,
    )
}

/// The model directory to use: `explicit`, else `$FIELDLLM_MODEL`, else the installed model,
/// else the artifact of a source checkout (relative to the current directory).
pub fn default_model_dir(explicit: Option<PathBuf>) -> PathBuf {
    package_dir(explicit, "FIELDLLM_MODEL", SYSTEM_MODEL_DIR, DEV_MODEL_DIR)
}

/// [`default_model_dir`], with a GGUF file resolved to its cached import
/// ([`crate::model_cache`]).
pub fn model_dir(explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    crate::model_cache::artifact_dir(default_model_dir(explicit))
}

/// `explicit`, else the variable `env` when set, else `system` when a package is installed
/// there, else `dev`.
fn package_dir(explicit: Option<PathBuf>, env: &str, system: &str, dev: &str) -> PathBuf {
    if let Some(p) = explicit {
        return p;
    }
    if let Some(p) = std::env::var_os(env).filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let system = PathBuf::from(system);
    if system.join("manifest.toml").exists() {
        return system;
    }
    PathBuf::from(dev)
}

/// The document index's directory when the service's state directory is not known.
pub const SYSTEM_DOCS_INDEX: &str = "/var/lib/fieldllm/docs";

/// The document index to use: `explicit`, else `docs` under systemd's `$STATE_DIRECTORY`
/// (the unit's `StateDirectory=fieldllm`), else [`SYSTEM_DOCS_INDEX`].
pub fn default_docs_index(explicit: Option<PathBuf>) -> PathBuf {
    if let Some(p) = explicit {
        return p;
    }
    // systemd may list several directories, colon-separated: the first is ours
    if let Some(state) = std::env::var("STATE_DIRECTORY")
        .ok()
        .and_then(|s| s.split(':').next().map(str::to_string))
        .filter(|s| !s.is_empty())
    {
        return PathBuf::from(state).join("docs");
    }
    PathBuf::from(SYSTEM_DOCS_INDEX)
}
