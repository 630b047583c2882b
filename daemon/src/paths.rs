//! Where things are looked for when the command line and config say nothing.

use std::path::PathBuf;

/// Installed location of the default model (what the Yocto recipe and Debian layout use).
pub const SYSTEM_MODEL_DIR: &str = "/usr/share/fieldllm/models/smollm2-135m-instruct";
/// Where `models/setup.sh` leaves the deployable artifact in a source checkout.
pub const DEV_MODEL_DIR: &str = "models/build/smollm2-135m-instruct.gguf";

/// The model directory to use: `explicit`, else `$FIELDLLM_MODEL`, else the installed model,
/// else the artifact of a source checkout (relative to the current directory).
pub fn default_model_dir(explicit: Option<PathBuf>) -> PathBuf {
    if let Some(p) = explicit {
        return p;
    }
    if let Some(p) = std::env::var_os("FIELDLLM_MODEL").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let system = PathBuf::from(SYSTEM_MODEL_DIR);
    if system.join("manifest.toml").exists() {
        return system;
    }
    PathBuf::from(DEV_MODEL_DIR)
}
