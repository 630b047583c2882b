//! The document index: one directory holding a tantivy full-text index (BM25) of every chunk,
//! with its document name, section path, page and the document's content hash.
//!
//! A document is replaced or removed in one tantivy commit, and a commit is atomic (its
//! `meta.json` is swapped in whole): a process killed mid-ingestion, or a power cut, leaves
//! the index as of its last commit. The writer's lock is an advisory file lock the kernel
//! drops with the process, so the next `docs add` goes on.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tantivy::collector::{DocSetCollector, TopDocs};
use tantivy::directory::MmapDirectory;
use tantivy::query::{AllQuery, QueryParser, TermQuery};
use tantivy::schema::{
    Field, IndexRecordOption, STORED, STRING, Schema, TextFieldIndexing, TextOptions, Value,
};
use tantivy::{Index, IndexReader, IndexWriter, ReloadPolicy, TantivyDocument, Term};

use super::chunk::Chunk;

/// Memory for the index writer (tantivy needs at least 15 MB per indexing thread).
const WRITER_BYTES: usize = 32 << 20;

/// Why the index could not be used.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// The directory could not be opened or made.
    #[error("document index {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// tantivy refused (an index of another schema, a damaged file, ...).
    #[error("document index {path}: {source}")]
    Tantivy {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: tantivy::TantivyError,
    },
}

/// One search hit.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Hit {
    /// Document name (its file name).
    pub doc: String,
    /// Section title path.
    pub section: String,
    /// Page (PDF), when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub page: Option<u32>,
    /// BM25 score.
    pub score: f32,
    /// The chunk's text.
    pub text: String,
}

/// One document in the index.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DocInfo {
    /// Its name.
    pub name: String,
    /// sha256 of its content when added.
    pub sha256: String,
    /// How many chunks it was split into.
    pub chunks: usize,
}

struct Fields {
    doc: Field,
    section: Field,
    text: Field,
    page: Field,
    hash: Field,
    ordinal: Field,
}

fn schema() -> (Schema, Fields) {
    let mut b = Schema::builder();
    // English stemming: "grinding" finds "grind", "valves" finds "valve"
    let words = TextOptions::default()
        .set_indexing_options(
            TextFieldIndexing::default()
                .set_tokenizer("en_stem")
                .set_index_option(IndexRecordOption::WithFreqsAndPositions),
        )
        .set_stored();
    let fields = Fields {
        doc: b.add_text_field("doc", STRING | STORED),
        section: b.add_text_field("section", words.clone()),
        text: b.add_text_field("text", words),
        page: b.add_u64_field("page", STORED),
        hash: b.add_text_field("sha256", STORED),
        ordinal: b.add_u64_field("ordinal", STORED),
    };
    (b.build(), fields)
}

/// An open document index.
pub struct DocIndex {
    path: PathBuf,
    index: Index,
    reader: IndexReader,
    fields: Fields,
}

impl std::fmt::Debug for DocIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DocIndex")
            .field("path", &self.path)
            .finish()
    }
}

impl DocIndex {
    /// Opens the index in `dir`, creating both when missing. An index of another schema is
    /// refused.
    pub fn open(dir: &Path) -> Result<DocIndex, IndexError> {
        let path = dir.to_path_buf();
        std::fs::create_dir_all(dir).map_err(|source| IndexError::Dir {
            path: path.clone(),
            source,
        })?;
        let t = |source| IndexError::Tantivy {
            path: path.clone(),
            source,
        };
        let mmap = MmapDirectory::open(dir).map_err(|e| t(e.into()))?;
        let (schema, fields) = schema();
        let index = Index::open_or_create(mmap, schema).map_err(t)?;
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()
            .map_err(t)?;
        Ok(DocIndex {
            path,
            index,
            reader,
            fields,
        })
    }

    fn err(&self, source: tantivy::TantivyError) -> IndexError {
        IndexError::Tantivy {
            path: self.path.clone(),
            source,
        }
    }

    /// A writer, holding the index's write lock until dropped.
    pub fn writer(&self) -> Result<DocWriter<'_>, IndexError> {
        let writer = self
            .index
            .writer_with_num_threads(1, WRITER_BYTES)
            .map_err(|e| self.err(e))?;
        Ok(DocWriter {
            index: self,
            writer,
        })
    }

    /// The content hash the document `name` was added with, if it is in the index.
    pub fn sha256_of(&self, name: &str) -> Result<Option<String>, IndexError> {
        self.reader.reload().map_err(|e| self.err(e))?;
        let searcher = self.reader.searcher();
        let q = TermQuery::new(
            Term::from_field_text(self.fields.doc, name),
            IndexRecordOption::Basic,
        );
        let top = searcher
            .search(&q, &TopDocs::with_limit(1).order_by_score())
            .map_err(|e| self.err(e))?;
        let Some((_, addr)) = top.first() else {
            return Ok(None);
        };
        let d: TantivyDocument = searcher.doc(*addr).map_err(|e| self.err(e))?;
        Ok(Some(self.string(&d, self.fields.hash)))
    }

    /// Every document, by name.
    pub fn list(&self) -> Result<Vec<DocInfo>, IndexError> {
        self.reader.reload().map_err(|e| self.err(e))?;
        let searcher = self.reader.searcher();
        let all = searcher
            .search(&AllQuery, &DocSetCollector)
            .map_err(|e| self.err(e))?;
        let mut docs: BTreeMap<String, DocInfo> = BTreeMap::new();
        for addr in all {
            let d: TantivyDocument = searcher.doc(addr).map_err(|e| self.err(e))?;
            let name = self.string(&d, self.fields.doc);
            docs.entry(name.clone())
                .or_insert_with(|| DocInfo {
                    name,
                    sha256: self.string(&d, self.fields.hash),
                    chunks: 0,
                })
                .chunks += 1;
        }
        Ok(docs.into_values().collect())
    }

    /// The `k` best chunks for `query` (BM25 over text and section titles). Query syntax
    /// errors never fail a search: what parses is searched.
    pub fn search(&self, query: &str, k: usize) -> Result<Vec<Hit>, IndexError> {
        self.reader.reload().map_err(|e| self.err(e))?;
        let searcher = self.reader.searcher();
        let parser =
            QueryParser::for_index(&self.index, vec![self.fields.text, self.fields.section]);
        let (q, _unparsed) = parser.parse_query_lenient(query);
        let top = searcher
            .search(&q, &TopDocs::with_limit(k.max(1)).order_by_score())
            .map_err(|e| self.err(e))?;
        let mut hits = Vec::with_capacity(top.len());
        for (score, addr) in top {
            let d: TantivyDocument = searcher.doc(addr).map_err(|e| self.err(e))?;
            let page = d
                .get_first(self.fields.page)
                .and_then(|v| v.as_u64())
                .filter(|p| *p > 0)
                .map(|p| p as u32);
            hits.push(Hit {
                doc: self.string(&d, self.fields.doc),
                section: self.string(&d, self.fields.section),
                page,
                score,
                text: self.string(&d, self.fields.text),
            });
        }
        Ok(hits)
    }

    fn string(&self, d: &TantivyDocument, f: Field) -> String {
        d.get_first(f)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string()
    }
}

/// Changes to the index; each `put` or `remove` is committed on its own.
pub struct DocWriter<'a> {
    index: &'a DocIndex,
    writer: IndexWriter,
}

impl DocWriter<'_> {
    /// Replaces the document `name` (if present) with these chunks, in one commit.
    pub fn put(&mut self, name: &str, sha256: &str, chunks: &[Chunk]) -> Result<(), IndexError> {
        let f = &self.index.fields;
        self.writer.delete_term(Term::from_field_text(f.doc, name));
        for (i, c) in chunks.iter().enumerate() {
            let mut d = TantivyDocument::default();
            d.add_text(f.doc, name);
            d.add_text(f.section, &c.section);
            d.add_text(f.text, &c.text);
            d.add_u64(f.page, c.page.map_or(0, u64::from));
            d.add_text(f.hash, sha256);
            d.add_u64(f.ordinal, i as u64);
            self.writer.add_document(d).map_err(|e| self.index.err(e))?;
        }
        self.commit()
    }

    /// Removes the document `name`, in one commit.
    pub fn remove(&mut self, name: &str) -> Result<(), IndexError> {
        let f = &self.index.fields;
        self.writer.delete_term(Term::from_field_text(f.doc, name));
        self.commit()
    }

    fn commit(&mut self) -> Result<(), IndexError> {
        self.writer.commit().map_err(|e| self.index.err(e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::docs::chunk::{Format, Limits, Splitter};

    fn chunks(text: &str) -> Vec<Chunk> {
        Splitter::split(Format::Markdown, Limits::default(), text)
    }

    #[test]
    fn put_search_replace_remove_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let idx = DocIndex::open(dir.path()).unwrap();
        let manual = "# HPU-220\n## 4.1 Main relief valve RV-1\nA grinding noise with falling pressure points to cavitation.\n## 5 Electrical\nMotor M1 draws 12 A.\n";
        {
            let mut w = idx.writer().unwrap();
            w.put("hpu.md", "h1", &chunks(manual)).unwrap();
            w.put(
                "other.md",
                "h2",
                &chunks("# Fan\nThe fan runs at 1500 rpm.\n"),
            )
            .unwrap();
        }
        let hits = idx.search("pump grinds and pressure drops", 3).unwrap();
        assert_eq!(hits[0].doc, "hpu.md");
        assert_eq!(hits[0].section, "HPU-220 › 4.1 Main relief valve RV-1");
        assert!(hits[0].text.contains("cavitation"));
        assert_eq!(idx.sha256_of("hpu.md").unwrap().as_deref(), Some("h1"));
        assert_eq!(idx.sha256_of("nope.md").unwrap(), None);
        // syntax a technician types is searched, not an error
        assert!(!idx.search("RV-1 \"relief: (valve", 3).unwrap().is_empty());

        // replaced: the old chunks are gone
        idx.writer()
            .unwrap()
            .put(
                "hpu.md",
                "h3",
                &chunks("# HPU-220\nNew text about hoses.\n"),
            )
            .unwrap();
        assert!(idx.search("cavitation", 3).unwrap().is_empty());
        let list = idx.list().unwrap();
        let names: Vec<(&str, &str, usize)> = list
            .iter()
            .map(|d| (d.name.as_str(), d.sha256.as_str(), d.chunks))
            .collect();
        assert_eq!(names, vec![("hpu.md", "h3", 1), ("other.md", "h2", 1)]);

        idx.writer().unwrap().remove("other.md").unwrap();
        drop(idx);
        // a new process sees what was committed
        let again = DocIndex::open(dir.path()).unwrap();
        assert_eq!(again.list().unwrap().len(), 1);
        assert!(again.search("fan rpm", 3).unwrap().is_empty());
    }

    #[test]
    fn a_directory_that_is_a_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        let e = DocIndex::open(&file).unwrap_err();
        assert!(e.to_string().contains("document index"), "{e}");
    }
}
