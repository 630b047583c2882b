//! fieldllmd: an offline LLM question-answering daemon for edge appliances.
//!
//! See ARCHITECTURE.md at the repository root for the map. This library holds everything the
//! binary runs, so integration tests and benchmarks drive the same code.

pub mod config;
pub mod docs;
pub mod model_cache;
pub mod paths;
pub mod proto;
pub mod request;
pub mod rss;
pub mod scheduler;
pub mod systemd;
pub mod thermal;
pub mod transport;
