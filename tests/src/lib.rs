//! Helpers shared by the end-to-end tests: the `fieldllmd` binary and the model directories.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// `models/build/NAME`; fails with the fix when `models/setup.sh` has not run.
pub fn model_dir(name: &str) -> PathBuf {
    let dir = repo_root().join("models/build").join(name);
    assert!(
        dir.join("manifest.toml").exists(),
        "{} is missing: run tests/run.sh (it runs models/setup.sh first)",
        dir.display()
    );
    dir
}

/// Path of a `fieldllmd` built from this checkout. `$FIELDLLMD_BIN` wins; otherwise the test
/// builds it once with the same cargo (a dependency's binaries are not built for tests).
pub fn fieldllmd() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("FIELDLLMD_BIN") {
            return PathBuf::from(p);
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "-p", "fieldllmd", "--bin", "fieldllmd"])
            .current_dir(repo_root())
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build -p fieldllmd failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join("target"));
        target.join("debug/fieldllmd")
    })
}

/// Runs `fieldllmd ARGS` to completion.
pub fn run(args: &[&str]) -> Output {
    Command::new(fieldllmd())
        .args(args)
        .env_remove("FIELDLLM_MODEL")
        .env_remove("RUST_LOG")
        .current_dir(repo_root())
        .output()
        .expect("start fieldllmd")
}

/// stdout and stderr as text.
pub fn texts(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Asserts a failed run: non-zero exit, no panic, and stderr mentioning every `needle`.
pub fn assert_clean_failure(o: &Output, needles: &[&str]) {
    let (_, err) = texts(o);
    assert!(
        !o.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert!(!err.contains("panicked"), "panicked: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr does not mention {n:?}: {err}");
    }
}
