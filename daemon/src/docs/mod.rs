//! The document index (DESIGN.md section 10): ingestion, chunks, full-text and vector search,
//! and the passages an answer is grounded on.
//!
//! Built in steps (issue 17). Here now: [`chunk`], splitting a document along its structure.
//! Next: the index directory (tantivy BM25 + embeddings, atomic commits), the embedding model
//! run by tract, `fieldllmd docs add|list|remove|search`, then grounded answers.

pub mod chunk;
