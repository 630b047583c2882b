//! The Yocto layer's crate list is generated from Cargo.lock; a dependency change without
//! regenerating it would break `bitbake fieldllmd` (cargo --frozen finds a crate missing).

use std::process::Command;

use fieldllm_tests::{repo_root, texts};

#[test]
fn the_crates_inc_matches_cargo_lock() {
    let script = repo_root().join("yocto/meta-fieldllm/scripts/gen-crates-inc.py");
    let o = Command::new("python3")
        .arg(&script)
        .arg("--check")
        .output()
        .expect("python3");
    let (out, err) = texts(&o);
    assert!(
        o.status.success(),
        "{out}{err}\nrun {} to regenerate it",
        script.display()
    );
}
