//! The document index (DESIGN.md section 10): ingestion, chunks, full-text and vector search,
//! and the passages an answer is grounded on.
//!
//! [`read`] a file's pages (Markdown, text, PDF), [`chunk`] them along their structure,
//! [`ingest`] files and folders into the [`index`] (tantivy BM25 and the chunks' embeddings,
//! one commit per document); [`ground`] a question on the passages that answer it, through the
//! daemon's [`library`]; [`eval`] retrieval on a question set.

pub mod chunk;
pub mod eval;
pub mod ground;
pub mod index;
pub mod ingest;
pub mod library;
pub mod read;

use fieldllm_engine::embed::Embedder;

use self::chunk::Chunk;
use self::index::EmbedderId;

/// What an index records of the embedding model its vectors come from.
pub fn embedder_id(e: &Embedder) -> EmbedderId {
    let m = e.manifest();
    EmbedderId {
        name: m.model.name.clone(),
        sha256: m.files.get(&m.graph.file).cloned().unwrap_or_default(),
        dimensions: m.model.dimensions,
    }
}

/// The text a chunk is embedded as: its section path, then its text, so a passage that never
/// names its subject ("Replace the element sooner ...") is still found by it.
pub fn embedding_text(c: &Chunk) -> String {
    if c.section.is_empty() {
        c.text.clone()
    } else {
        format!("{}\n{}", c.section, c.text)
    }
}

/// Each chunk's embedding, in order (embedded as [`embedding_text`] says).
pub fn embed_chunks(
    e: &Embedder,
    chunks: &[Chunk],
) -> Result<Vec<Vec<f32>>, fieldllm_engine::EngineError> {
    let texts: Vec<String> = chunks.iter().map(embedding_text).collect();
    e.embed(&texts.iter().map(String::as_str).collect::<Vec<_>>())
}

#[cfg(test)]
pub(crate) mod testing {
    use std::sync::OnceLock;

    use fieldllm_engine::embed::Embedder;

    /// The real embedding model of this checkout (`models/setup.sh` builds it), loaded once.
    pub fn embedder() -> &'static Embedder {
        static E: OnceLock<Embedder> = OnceLock::new();
        E.get_or_init(|| {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../models/build/all-minilm-l6-v2");
            Embedder::load(&dir, 2)
                .unwrap_or_else(|e| panic!("{e}: run models/setup.sh (tests/run.sh does)"))
        })
    }
}
