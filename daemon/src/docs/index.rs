//! The document index: one directory holding a tantivy index of every chunk: its text
//! (BM25), its sentence embedding (stored beside it, scanned exactly), document name, section
//! path, page and the document's content hash. The embedding model it was made with is
//! recorded in every commit's payload, and an index is never searched or extended with
//! another model's vectors.
//!
//! A document is replaced or removed in one tantivy commit, and a commit is atomic (its
//! `meta.json` is swapped in whole): a process killed mid-ingestion, or a power cut, leaves
//! the index as of its last commit. The writer's lock is an advisory file lock the kernel
//! drops with the process, so the next `docs add` goes on.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tantivy::collector::{DocSetCollector, TopDocs};
use tantivy::directory::MmapDirectory;
use tantivy::index::SegmentId;
use tantivy::query::{AllQuery, QueryParser, TermQuery};
use tantivy::schema::{
    Field, IndexRecordOption, STORED, STRING, Schema, TextFieldIndexing, TextOptions, Value,
};
use tantivy::{
    DocAddress, Index, IndexReader, IndexWriter, ReloadPolicy, Searcher, TantivyDocument, Term,
};

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
    /// Made with another embedding model: its vectors and the query's would not compare.
    #[error(
        "document index {path} was made with the embedding model {index} and this one is {this}: \
         re-index (`fieldllmd docs add` into a new --index) or use the model it was made with"
    )]
    OtherEmbedder {
        /// The directory.
        path: PathBuf,
        /// What the index records.
        index: String,
        /// What was offered.
        this: String,
    },
    /// A stored vector is not of the recorded length.
    #[error("document index {path}: a stored vector has {got} dimensions, not {want}: damaged")]
    BadVector {
        /// The directory.
        path: PathBuf,
        /// Stored.
        got: usize,
        /// Expected.
        want: usize,
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
    /// The ranking's score: BM25, cosine similarity, or the fused score (see [`Mode`]).
    pub score: f32,
    /// The chunk's text.
    pub text: String,
    /// Cosine similarity of the chunk's embedding with the query's, when it was computed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub similarity: Option<f32>,
}

/// How a search ranks chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Keywords only (BM25).
    Bm25,
    /// Meaning only (cosine similarity of sentence embeddings).
    Vector,
    /// Both, fused by reciprocal rank (score = sum of 1 / (60 + rank)).
    Hybrid,
}

/// The embedding model an index's vectors come from: name, hash of its graph, length.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EmbedderId {
    /// Package name.
    pub name: String,
    /// sha256 of its graph file.
    pub sha256: String,
    /// Vector length.
    pub dimensions: usize,
}

impl std::fmt::Display for EmbedderId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let short = &self.sha256[..self.sha256.len().min(12)];
        write!(
            f,
            "{} ({} dimensions, sha256 {short})",
            self.name, self.dimensions
        )
    }
}

/// Reciprocal rank fusion's constant (Cormack et al. 2009; what Elasticsearch and open-webui
/// use).
const RRF_K: f32 = 60.0;
/// How many of each ranking's best are fused, at least.
const FUSE_DEPTH: usize = 40;

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
    vector: Field,
}

/// The text analyzer of `text` and `section`: words lower-cased, Lucene's English stop words
/// dropped ("the", "is", "of", ...: they match every passage), English stemming ("grinding"
/// finds "grind", "valves" finds "valve").
const ANALYZER: &str = "en_words";

fn analyzer() -> tantivy::tokenizer::TextAnalyzer {
    use tantivy::tokenizer::{
        Language, LowerCaser, RemoveLongFilter, SimpleTokenizer, Stemmer, StopWordFilter,
        TextAnalyzer,
    };
    let builder = TextAnalyzer::builder(SimpleTokenizer::default())
        .filter(RemoveLongFilter::limit(40))
        .filter(LowerCaser);
    match StopWordFilter::new(Language::English) {
        Some(stop) => builder
            .filter(stop)
            .filter(Stemmer::new(Language::English))
            .build(),
        None => builder.filter(Stemmer::new(Language::English)).build(),
    }
}

fn schema() -> (Schema, Fields) {
    let mut b = Schema::builder();
    let words = TextOptions::default()
        .set_indexing_options(
            TextFieldIndexing::default()
                .set_tokenizer(ANALYZER)
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
        // little-endian f32s
        vector: b.add_bytes_field("vector", STORED),
    };
    (b.build(), fields)
}

/// An open document index.
pub struct DocIndex {
    path: PathBuf,
    index: Index,
    reader: IndexReader,
    fields: Fields,
    /// Each segment's vectors, read once: (doc id, vector) rows of the segment.
    vectors: Mutex<HashMap<SegmentId, SegmentVectors>>,
}

struct SegmentVectors {
    docs: Vec<u32>,
    /// `docs.len()` rows of the index's dimensions.
    matrix: Vec<f32>,
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
        index.tokenizers().register(ANALYZER, analyzer());
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
            vectors: Mutex::new(HashMap::new()),
        })
    }

    /// The embedding model of the last commit, if any document was ever added.
    pub fn embedder(&self) -> Result<Option<EmbedderId>, IndexError> {
        let metas = self.index.load_metas().map_err(|e| self.err(e))?;
        let Some(payload) = metas.payload else {
            return Ok(None);
        };
        serde_json::from_str(&payload).map(Some).map_err(|e| {
            self.err(tantivy::TantivyError::InvalidArgument(format!(
                "unreadable embedding model record {payload:?}: {e}"
            )))
        })
    }

    /// Refuses an index whose vectors were made by another model than `id`.
    pub fn check_embedder(&self, id: &EmbedderId) -> Result<(), IndexError> {
        match self.embedder()? {
            Some(have) if have != *id => Err(IndexError::OtherEmbedder {
                path: self.path.clone(),
                index: have.to_string(),
                this: id.to_string(),
            }),
            _ => Ok(()),
        }
    }

    fn err(&self, source: tantivy::TantivyError) -> IndexError {
        IndexError::Tantivy {
            path: self.path.clone(),
            source,
        }
    }

    /// A writer for vectors of `embedder`, holding the index's write lock until dropped.
    /// An index made with another model is refused.
    pub fn writer(&self, embedder: &EmbedderId) -> Result<DocWriter<'_>, IndexError> {
        self.check_embedder(embedder)?;
        let writer = self
            .index
            .writer_with_num_threads(1, WRITER_BYTES)
            .map_err(|e| self.err(e))?;
        let payload = serde_json::to_string(embedder).unwrap_or_default();
        Ok(DocWriter {
            index: self,
            writer,
            payload,
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

    /// The `k` best chunks for `query`, ranked by `mode`. `query_vector` (the query's
    /// embedding, from the index's model) is needed for [`Mode::Vector`] and [`Mode::Hybrid`].
    pub fn search(
        &self,
        query: &str,
        query_vector: Option<&[f32]>,
        k: usize,
        mode: Mode,
    ) -> Result<Vec<Hit>, IndexError> {
        self.reader.reload().map_err(|e| self.err(e))?;
        let searcher = self.reader.searcher();
        let k = k.max(1);
        let depth = (k * 4).max(FUSE_DEPTH);
        let ranked: Vec<(f32, DocAddress)> = match (mode, query_vector) {
            (Mode::Bm25, _) | (_, None) => self.bm25(&searcher, query, k)?,
            (Mode::Vector, Some(q)) => self.nearest(&searcher, q, k)?,
            (Mode::Hybrid, Some(q)) => {
                let lists = [
                    self.bm25(&searcher, query, depth)?,
                    self.nearest(&searcher, q, depth)?,
                ];
                fuse(&lists, k)
            }
        };
        let mut hits = Vec::with_capacity(ranked.len());
        for (score, addr) in ranked {
            let d: TantivyDocument = searcher.doc(addr).map_err(|e| self.err(e))?;
            let similarity = match query_vector {
                Some(q) => self.vector_of(&d)?.map(|v| dot(q, &v)),
                None => None,
            };
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
                similarity,
            });
        }
        Ok(hits)
    }

    /// BM25 over text and section titles. Query syntax errors never fail a search: what
    /// parses is searched.
    fn bm25(
        &self,
        searcher: &Searcher,
        query: &str,
        k: usize,
    ) -> Result<Vec<(f32, DocAddress)>, IndexError> {
        let parser =
            QueryParser::for_index(&self.index, vec![self.fields.text, self.fields.section]);
        let (q, _unparsed) = parser.parse_query_lenient(query);
        searcher
            .search(&q, &TopDocs::with_limit(k).order_by_score())
            .map_err(|e| self.err(e))
    }

    /// The `k` chunks whose vectors are nearest `q`: an exact scan (10,000 chunks of 384
    /// floats are 15 MB and a few milliseconds; an approximate index pays off past ~10^5).
    fn nearest(
        &self,
        searcher: &Searcher,
        q: &[f32],
        k: usize,
    ) -> Result<Vec<(f32, DocAddress)>, IndexError> {
        let mut cache = self.vectors.lock().unwrap_or_else(|p| p.into_inner());
        let live: Vec<SegmentId> = searcher
            .segment_readers()
            .iter()
            .map(|r| r.segment_id())
            .collect();
        cache.retain(|id, _| live.contains(id));
        let mut best: Vec<(f32, DocAddress)> = Vec::with_capacity(k + 1);
        for (ord, seg) in searcher.segment_readers().iter().enumerate() {
            let vs = match cache.entry(seg.segment_id()) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(self.load_vectors(seg, q.len())?)
                }
            };
            for (row, &doc) in vs.docs.iter().enumerate() {
                if seg.is_deleted(doc) {
                    continue;
                }
                let v = &vs.matrix[row * q.len()..(row + 1) * q.len()];
                let score = dot(q, v);
                if best.len() < k || score > best[best.len() - 1].0 {
                    let at = best.partition_point(|(s, _)| *s >= score);
                    best.insert(at, (score, DocAddress::new(ord as u32, doc)));
                    best.truncate(k);
                }
            }
        }
        Ok(best)
    }

    fn load_vectors(
        &self,
        seg: &tantivy::SegmentReader,
        dims: usize,
    ) -> Result<SegmentVectors, IndexError> {
        let store = seg.get_store_reader(64).map_err(|e| self.err(e.into()))?;
        let mut out = SegmentVectors {
            docs: Vec::new(),
            matrix: Vec::new(),
        };
        for doc in 0..seg.max_doc() {
            if seg.is_deleted(doc) {
                continue;
            }
            let d: TantivyDocument = store.get(doc).map_err(|e| self.err(e))?;
            if let Some(v) = self.vector_of(&d)? {
                if v.len() != dims {
                    return Err(IndexError::BadVector {
                        path: self.path.clone(),
                        got: v.len(),
                        want: dims,
                    });
                }
                out.docs.push(doc);
                out.matrix.extend_from_slice(&v);
            }
        }
        Ok(out)
    }

    fn vector_of(&self, d: &TantivyDocument) -> Result<Option<Vec<f32>>, IndexError> {
        let Some(bytes) = d.get_first(self.fields.vector).and_then(|v| v.as_bytes()) else {
            return Ok(None);
        };
        Ok(Some(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        ))
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
    /// The embedding model's record, written with every commit.
    payload: String,
}

impl DocWriter<'_> {
    /// Replaces the document `name` (if present) with these chunks and their embeddings, in
    /// one commit.
    pub fn put(
        &mut self,
        name: &str,
        sha256: &str,
        chunks: &[Chunk],
        vectors: &[Vec<f32>],
    ) -> Result<(), IndexError> {
        assert_eq!(chunks.len(), vectors.len(), "one vector per chunk");
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
            let bytes: Vec<u8> = vectors[i].iter().flat_map(|x| x.to_le_bytes()).collect();
            d.add_bytes(f.vector, &bytes);
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
        let mut prepared = self
            .writer
            .prepare_commit()
            .map_err(|e| self.index.err(e))?;
        prepared.set_payload(&self.payload);
        prepared.commit().map_err(|e| self.index.err(e))?;
        Ok(())
    }
}

/// Reciprocal rank fusion of rankings: each chunk scores the sum of 1 / (60 + rank) over the
/// rankings it is in; the `k` best, ties broken by first appearance.
pub fn fuse(lists: &[Vec<(f32, DocAddress)>], k: usize) -> Vec<(f32, DocAddress)> {
    let mut scores: Vec<(f32, DocAddress)> = Vec::new();
    for list in lists {
        for (rank, (_, addr)) in list.iter().enumerate() {
            let add = 1.0 / (RRF_K + rank as f32 + 1.0);
            match scores.iter_mut().find(|(_, a)| a == addr) {
                Some((s, _)) => *s += add,
                None => scores.push((add, *addr)),
            }
        }
    }
    scores.sort_by(|a, b| b.0.total_cmp(&a.0));
    scores.truncate(k);
    scores
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::docs::chunk::{Format, Limits, Splitter};
    use crate::docs::{embed_chunks, embedder_id, testing};

    fn chunks(text: &str) -> (Vec<Chunk>, Vec<Vec<f32>>) {
        let c = Splitter::split(Format::Markdown, Limits::default(), text);
        let v = embed_chunks(testing::embedder(), &c).unwrap();
        (c, v)
    }

    fn put(w: &mut DocWriter<'_>, name: &str, hash: &str, text: &str) {
        let (c, v) = chunks(text);
        w.put(name, hash, &c, &v).unwrap();
    }

    fn query(q: &str) -> Vec<f32> {
        testing::embedder().embed(&[q]).unwrap().remove(0)
    }

    fn id() -> EmbedderId {
        embedder_id(testing::embedder())
    }

    #[test]
    fn put_search_replace_remove_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let idx = DocIndex::open(dir.path()).unwrap();
        assert_eq!(idx.embedder().unwrap(), None);
        let manual = "# HPU-220\n## 4.1 Main relief valve RV-1\nA grinding noise with falling pressure points to cavitation.\n## 5 Electrical\nMotor M1 draws 12 A.\n";
        {
            let mut w = idx.writer(&id()).unwrap();
            put(&mut w, "hpu.md", "h1", manual);
            put(
                &mut w,
                "other.md",
                "h2",
                "# Fan\nThe fan runs at 1500 rpm.\n",
            );
        }
        assert_eq!(idx.embedder().unwrap(), Some(id()));
        let q = "pump grinds and pressure drops";
        for mode in [Mode::Bm25, Mode::Vector, Mode::Hybrid] {
            let hits = idx.search(q, Some(&query(q)), 3, mode).unwrap();
            assert_eq!(hits[0].doc, "hpu.md", "{mode:?}");
            assert_eq!(hits[0].section, "HPU-220 › 4.1 Main relief valve RV-1");
            assert!(hits[0].text.contains("cavitation"));
            assert!(hits[0].similarity.unwrap() > 0.3, "{hits:?}");
        }
        // meaning without a shared word: only the vectors find it
        let q = "how fast does the cooling blower spin";
        assert!(
            idx.search(q, None, 3, Mode::Bm25)
                .unwrap()
                .iter()
                .all(|h| h.doc != "other.md")
        );
        let hits = idx.search(q, Some(&query(q)), 1, Mode::Vector).unwrap();
        assert_eq!(hits[0].doc, "other.md", "{hits:?}");
        assert_eq!(idx.sha256_of("hpu.md").unwrap().as_deref(), Some("h1"));
        assert_eq!(idx.sha256_of("nope.md").unwrap(), None);
        // syntax a technician types is searched, not an error
        let odd = "RV-1 \"relief: (valve";
        assert!(!idx.search(odd, None, 3, Mode::Bm25).unwrap().is_empty());

        // replaced: the old chunks and their vectors are gone
        put(
            &mut idx.writer(&id()).unwrap(),
            "hpu.md",
            "h3",
            "# HPU-220\nNew text about hoses.\n",
        );
        assert!(
            idx.search("cavitation", None, 3, Mode::Bm25)
                .unwrap()
                .is_empty()
        );
        let hits = idx
            .search("x", Some(&query("cavitation")), 5, Mode::Vector)
            .unwrap();
        assert_eq!(hits.len(), 2, "{hits:?}");
        assert!(hits.iter().all(|h| !h.text.contains("cavitation")));
        let list = idx.list().unwrap();
        let names: Vec<(&str, &str, usize)> = list
            .iter()
            .map(|d| (d.name.as_str(), d.sha256.as_str(), d.chunks))
            .collect();
        assert_eq!(names, vec![("hpu.md", "h3", 1), ("other.md", "h2", 1)]);

        idx.writer(&id()).unwrap().remove("other.md").unwrap();
        drop(idx);
        // a new process sees what was committed
        let again = DocIndex::open(dir.path()).unwrap();
        assert_eq!(again.list().unwrap().len(), 1);
        let hits = again
            .search("fan rpm", Some(&query("fan rpm")), 3, Mode::Hybrid)
            .unwrap();
        assert!(hits.iter().all(|h| h.doc == "hpu.md"), "{hits:?}");
    }

    #[test]
    fn an_index_of_another_embedding_model_is_refused_naming_both() {
        let dir = tempfile::tempdir().unwrap();
        let idx = DocIndex::open(dir.path()).unwrap();
        put(&mut idx.writer(&id()).unwrap(), "a.md", "h", "# A\ntext\n");
        let other = EmbedderId {
            name: "bge-small-en".into(),
            sha256: "ab".repeat(32),
            dimensions: 384,
        };
        let e = idx.writer(&other).err().unwrap();
        let msg = e.to_string();
        assert!(matches!(e, IndexError::OtherEmbedder { .. }), "{msg}");
        assert!(
            msg.contains("all-minilm-l6-v2") && msg.contains("bge-small-en"),
            "{msg}"
        );
        assert!(idx.check_embedder(&other).is_err());
        assert!(idx.check_embedder(&id()).is_ok());
    }

    #[test]
    fn fusion_rewards_agreement() {
        let a = |d| DocAddress::new(0, d);
        let bm25 = vec![(9.0, a(1)), (8.0, a(2)), (7.0, a(3))];
        let vec = vec![(0.9, a(3)), (0.8, a(4)), (0.7, a(1))];
        let fused: Vec<u32> = fuse(&[bm25, vec], 4)
            .iter()
            .map(|(_, d)| d.doc_id)
            .collect();
        // 1: 1/61 + 1/63; 3: 1/63 + 1/61 (tie, first seen wins); then 2 and 4 at 1/62
        assert_eq!(fused, vec![1, 3, 2, 4]);
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
