//! The document index (DESIGN.md section 10): ingestion, chunks, full-text and vector search,
//! and the passages an answer is grounded on.
//!
//! Built in steps (issue 17). Here now: [`read`] a file's pages (Markdown, text, PDF),
//! [`chunk`] them along their structure, [`ingest`] files and folders into the [`index`]
//! (tantivy BM25, one commit per document). Next: embeddings of every chunk run by tract and
//! fused with BM25, then grounded answers.

pub mod chunk;
pub mod index;
pub mod ingest;
pub mod read;
