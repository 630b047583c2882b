//! The equipment documents of `tests/corpus` and indexes made of them by `fieldllmd docs add`.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::path::Path;

use crate::pdf::text_pdf_of;
use crate::{repo_root, run, texts};

/// The documents of tests/corpus in a folder, the generator manual as a PDF.
pub fn corpus() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = repo_root().join("tests/corpus");
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if name.ends_with(".md") || name.ends_with(".txt") {
            std::fs::copy(&path, dir.path().join(name)).unwrap();
        }
    }
    let pdf = std::fs::read_to_string(src.join("gen-15-generator-manual.pdf-source")).unwrap();
    std::fs::write(
        dir.path().join("gen-15-generator-manual.pdf"),
        text_pdf_of(&pdf),
    )
    .unwrap();
    dir
}

/// An index of [`corpus`], made by `docs add`.
pub fn indexed_corpus() -> tempfile::TempDir {
    let files = corpus();
    let index = tempfile::tempdir().unwrap();
    ok(&docs(
        index.path(),
        &["add", files.path().to_str().unwrap()],
    ));
    index
}

/// `fieldllmd docs --index INDEX ARGS...`.
pub fn docs(index: &Path, args: &[&str]) -> std::process::Output {
    let index = index.to_str().unwrap();
    let mut all = vec!["docs", "--index", index];
    all.extend_from_slice(args);
    run(&all)
}

/// Its standard output, asserting it succeeded.
pub fn ok(o: &std::process::Output) -> String {
    let (out, err) = texts(o);
    assert!(o.status.success(), "exit {:?}: {err}\n{out}", o.status);
    out
}
