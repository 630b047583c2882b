//! `docs add`: files and folders into the index, one document per commit, so an interrupted
//! run keeps every document it finished and the next run skips them (same content hash).
//!
//! A document's name is its file name: what a citation shows and what `docs remove` takes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fieldllm_engine::embed::Embedder;

use super::chunk::{Chunk, Limits, Splitter};
use super::index::{DocIndex, DocWriter, IndexError};
use super::read::{self, Document, Kind, ReadError};
use super::{embed_chunks, embedder_id};

/// What happened to one file.
#[derive(Debug)]
pub enum Outcome {
    /// New in the index.
    Added {
        /// Document name.
        name: String,
        /// Chunks written.
        chunks: usize,
    },
    /// Its content changed: the old chunks were replaced.
    Replaced {
        /// Document name.
        name: String,
        /// Chunks written.
        chunks: usize,
    },
    /// Same content hash as the indexed copy: nothing done.
    Unchanged {
        /// Document name.
        name: String,
    },
    /// Not indexed, and why; the index still holds its previous copy, if any.
    Failed {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// In a folder, but not a document type (`.md`, `.markdown`, `.txt`, `.text`, `.pdf`).
    Skipped {
        /// The file.
        path: PathBuf,
    },
}

/// Counts over one run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// New documents.
    pub added: usize,
    /// Changed documents.
    pub replaced: usize,
    /// Documents already indexed as they are.
    pub unchanged: usize,
    /// Files that could not be indexed.
    pub failed: usize,
    /// Folder entries that are not documents.
    pub skipped: usize,
    /// Chunks written.
    pub chunks: usize,
}

impl Summary {
    fn count(&mut self, o: &Outcome) {
        match o {
            Outcome::Added { chunks, .. } => {
                self.added += 1;
                self.chunks += chunks;
            }
            Outcome::Replaced { chunks, .. } => {
                self.replaced += 1;
                self.chunks += chunks;
            }
            Outcome::Unchanged { .. } => self.unchanged += 1,
            Outcome::Failed { .. } => self.failed += 1,
            Outcome::Skipped { .. } => self.skipped += 1,
        }
    }
}

/// The document files under `paths`: files as given (any extension: one that is not a
/// document type fails by name), folders walked in name order for document types. Paths that
/// cannot be read fail by name; the rest go on.
pub fn collect(paths: &[PathBuf]) -> Vec<Result<(PathBuf, Kind), Outcome>> {
    let mut out = Vec::new();
    for p in paths {
        match std::fs::metadata(p) {
            Ok(m) if m.is_dir() => walk(p, &mut out),
            Ok(_) => out.push(match Kind::of(p) {
                Some(k) => Ok((p.clone(), k)),
                None => Err(failed(
                    p,
                    "not a document type (.md, .markdown, .txt, .text or .pdf)",
                )),
            }),
            Err(e) => out.push(Err(failed(p, &e.to_string()))),
        }
    }
    out
}

fn walk(dir: &Path, out: &mut Vec<Result<(PathBuf, Kind), Outcome>>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) => return out.push(Err(failed(dir, &e.to_string()))),
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for p in paths {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with('.') {
            continue; // editors' and VCS's hidden files
        }
        match std::fs::metadata(&p) {
            Ok(m) if m.is_dir() => walk(&p, out),
            Ok(_) => out.push(
                Kind::of(&p)
                    .map(|k| (p.clone(), k))
                    .ok_or(Outcome::Skipped { path: p }),
            ),
            Err(e) => out.push(Err(failed(&p, &e.to_string()))),
        }
    }
}

fn failed(path: &Path, reason: &str) -> Outcome {
    Outcome::Failed {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// Why a run stopped before its end.
#[derive(Debug, thiserror::Error)]
pub enum AddError {
    /// The index cannot be written (or was made with another embedding model).
    #[error(transparent)]
    Index(#[from] IndexError),
    /// The embedding model failed.
    #[error("embedding {name}: {source}")]
    Embed {
        /// The document.
        name: String,
        /// Why.
        source: fieldllm_engine::EngineError,
    },
}

/// Adds (or replaces) every document under `paths`, each chunk with its embedding from
/// `embedder`, reporting each file to `report` as it is done. Only an index that cannot be
/// written, or an embedding model that fails, stops the run.
pub fn add(
    index: &DocIndex,
    embedder: &Embedder,
    paths: &[PathBuf],
    limits: Limits,
    mut report: impl FnMut(&Outcome),
) -> Result<Summary, AddError> {
    let mut writer = index.writer(&embedder_id(embedder))?;
    let mut summary = Summary::default();
    // two files of one name in one run would silently replace each other
    let mut seen: BTreeMap<String, PathBuf> = BTreeMap::new();
    for item in collect(paths) {
        let outcome = match item {
            Err(o) => o,
            Ok((path, kind)) => match name_of(&path) {
                None => failed(&path, "its file name is not UTF-8"),
                Some(name) => match seen.get(&name) {
                    Some(first) => failed(
                        &path,
                        &format!(
                            "a document named {name} was already added from {} in this run; \
                             rename one of them",
                            first.display()
                        ),
                    ),
                    None => {
                        seen.insert(name.clone(), path.clone());
                        one(index, embedder, &mut writer, &path, kind, name, limits)?
                    }
                },
            },
        };
        summary.count(&outcome);
        report(&outcome);
    }
    Ok(summary)
}

fn name_of(path: &Path) -> Option<String> {
    path.file_name()?.to_str().map(str::to_string)
}

fn one(
    index: &DocIndex,
    embedder: &Embedder,
    writer: &mut DocWriter<'_>,
    path: &Path,
    kind: Kind,
    name: String,
    limits: Limits,
) -> Result<Outcome, AddError> {
    let doc = match read::read(path, kind) {
        Ok(d) => d,
        Err(e) => return Ok(failed(path, &e.to_string())),
    };
    let before = index.sha256_of(&name)?;
    if before.as_deref() == Some(doc.sha256.as_str()) {
        return Ok(Outcome::Unchanged { name });
    }
    let chunks = chunks_of(&doc, kind, limits);
    if chunks.is_empty() {
        return Ok(failed(path, &ReadError::Empty.to_string()));
    }
    let vectors = embed_chunks(embedder, &chunks).map_err(|source| AddError::Embed {
        name: name.clone(),
        source,
    })?;
    writer.put(&name, &doc.sha256, &chunks, &vectors)?;
    let n = chunks.len();
    Ok(match before {
        None => Outcome::Added { name, chunks: n },
        Some(_) => Outcome::Replaced { name, chunks: n },
    })
}

/// A document's chunks: its pages split along their structure, numbered when it has pages
/// (a PDF, or more than one).
pub fn chunks_of(doc: &Document, kind: Kind, limits: Limits) -> Vec<Chunk> {
    let mut s = Splitter::new(kind.format(), limits);
    let paged = doc.pages.len() > 1 || kind == Kind::Pdf;
    for (i, page) in doc.pages.iter().enumerate() {
        s.page(page, paged.then_some(i as u32 + 1));
    }
    s.finish()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn run(index: &DocIndex, paths: &[PathBuf]) -> (Summary, Vec<String>) {
        let mut lines = Vec::new();
        let e = crate::docs::testing::embedder();
        let s = add(index, e, paths, Limits::default(), |o| {
            lines.push(format!("{o:?}"))
        })
        .unwrap();
        (s, lines)
    }

    fn bm25(index: &DocIndex, q: &str) -> Vec<crate::docs::index::Hit> {
        index
            .search(q, None, 3, crate::docs::index::Mode::Bm25)
            .unwrap()
    }

    #[test]
    fn a_folder_goes_in_once_and_only_changes_after() {
        let docs = tempfile::tempdir().unwrap();
        let d = docs.path();
        std::fs::create_dir(d.join("sub")).unwrap();
        std::fs::write(
            d.join("a.md"),
            "# A\n## 1 Oil\nChange the oil every 500 h.\n",
        )
        .unwrap();
        std::fs::write(
            d.join("sub/b.txt"),
            "1 Filters\nReplace filter F2 at 250 h.\n",
        )
        .unwrap();
        std::fs::write(d.join("photo.jpg"), [0xff, 0xd8, 0xff]).unwrap();
        std::fs::write(d.join(".a.md.swp"), "x").unwrap();
        std::fs::write(d.join("empty.md"), "").unwrap();
        let idx_dir = tempfile::tempdir().unwrap();
        let idx = DocIndex::open(idx_dir.path()).unwrap();

        let (s, lines) = run(&idx, &[d.to_path_buf()]);
        assert_eq!(
            (s.added, s.failed, s.skipped, s.unchanged),
            (2, 1, 1, 0),
            "{lines:?}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.contains("empty.md") && l.contains("empty"))
        );
        assert_eq!(bm25(&idx, "oil interval")[0].doc, "a.md");
        assert_eq!(bm25(&idx, "filter")[0].section, "1 Filters");

        let (s, _) = run(&idx, &[d.to_path_buf()]);
        assert_eq!((s.added, s.unchanged, s.replaced), (0, 2, 0));

        std::fs::write(
            d.join("a.md"),
            "# A\n## 1 Oil\nChange the oil every 400 h.\n",
        )
        .unwrap();
        let (s, _) = run(&idx, &[d.to_path_buf()]);
        assert_eq!((s.replaced, s.unchanged), (1, 1));
        assert!(bm25(&idx, "400")[0].text.contains("400 h"));
        assert!(bm25(&idx, "500").is_empty());
    }

    #[test]
    fn a_bad_file_keeps_the_indexed_copy_and_same_names_are_refused() {
        let docs = tempfile::tempdir().unwrap();
        let d = docs.path();
        std::fs::create_dir_all(d.join("x")).unwrap();
        std::fs::write(d.join("m.md"), "# M\nTorque 45 Nm.\n").unwrap();
        std::fs::write(d.join("x/m.md"), "# Other\nsomething\n").unwrap();
        let idx_dir = tempfile::tempdir().unwrap();
        let idx = DocIndex::open(idx_dir.path()).unwrap();
        let (s, lines) = run(&idx, &[d.to_path_buf()]);
        assert_eq!((s.added, s.failed), (1, 1), "{lines:?}");
        assert!(lines[1].contains("already added"), "{lines:?}");

        // now m.md is overwritten with binary: refused, and the old text is still found
        std::fs::write(d.join("m.md"), [0u8, 1, 2, 3]).unwrap();
        let (s, lines) = run(&idx, &[d.join("m.md"), d.join("gone.md")]);
        assert_eq!(s.failed, 2, "{lines:?}");
        assert!(lines[0].contains("not a text file"), "{lines:?}");
        assert!(lines[1].contains("gone.md"), "{lines:?}");
        assert!(bm25(&idx, "torque")[0].text.contains("45 Nm"));
    }

    #[test]
    fn a_file_that_vanishes_during_ingestion_is_named_and_the_rest_go_in() {
        let docs = tempfile::tempdir().unwrap();
        let d = docs.path();
        for (name, text) in [
            ("a.md", "Oil 500 h."),
            ("b.md", "Belt 300 h."),
            ("c.md", "Fuse 10 A."),
        ] {
            std::fs::write(d.join(name), format!("# {name}\n{text}\n")).unwrap();
        }
        let idx_dir = tempfile::tempdir().unwrap();
        let idx = DocIndex::open(idx_dir.path()).unwrap();
        let mut lines = Vec::new();
        // the folder is listed first; b.md goes away while a.md is being indexed
        let s = add(
            &idx,
            crate::docs::testing::embedder(),
            &[d.to_path_buf()],
            Limits::default(),
            |o| {
                let _ = std::fs::remove_file(d.join("b.md"));
                lines.push(format!("{o:?}"));
            },
        )
        .unwrap();
        assert_eq!((s.added, s.failed), (2, 1), "{lines:?}");
        assert!(
            lines[1].contains("b.md") && lines[1].contains("No such file"),
            "{lines:?}"
        );
        let names: Vec<String> = idx.list().unwrap().into_iter().map(|d| d.name).collect();
        assert_eq!(names, ["a.md", "c.md"]);
    }
}
