//! The daemon's document library: the index and the embedding model its answers are grounded
//! on. Opened at start-up when an index exists, else when a request first asks for it (so an
//! index that `docs add` makes while the daemon runs is used without a restart); every search
//! sees what `docs add` has committed since the last one.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use fieldllm_engine::embed::Embedder;

use super::ground::{GroundError, Grounder, Grounding, Settings};
use super::index::DocIndex;

/// Why the library cannot ground a question.
#[derive(Debug, thiserror::Error)]
pub enum LibraryError {
    /// No index was ever made in the configured directory.
    #[error("this appliance has no document index at {0}: add documents with `fieldllmd docs add`")]
    NoIndex(PathBuf),
    /// The embedding model did not load.
    #[error("loading the embedding model {dir}: {source}")]
    Embedder {
        /// Its package directory.
        dir: PathBuf,
        /// Why.
        source: fieldllm_engine::EngineError,
    },
    /// Retrieval failed (index unreadable, another embedding model's index, ...).
    #[error(transparent)]
    Ground(#[from] GroundError),
}

/// Where the library is and how it grounds (`[docs]`).
#[derive(Debug, Clone)]
pub struct LibraryConfig {
    /// The index directory.
    pub index: PathBuf,
    /// The embedding model's package directory.
    pub embedder: PathBuf,
    /// Passages, threshold and prompt style.
    pub settings: Settings,
    /// tract threads of the embedding model.
    pub threads: usize,
}

/// The document library, shared by every transport.
pub struct Library {
    config: LibraryConfig,
    grounder: Mutex<Option<Arc<Grounder>>>,
}

impl std::fmt::Debug for Library {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Library")
            .field("config", &self.config)
            .finish()
    }
}

/// Whether `dir` holds a document index (tantivy's `meta.json`, written by the first commit).
pub fn index_exists(dir: &Path) -> bool {
    dir.join("meta.json").is_file()
}

impl Library {
    /// A library over `config`; nothing is read until [`Library::open`] or a question.
    pub fn new(config: LibraryConfig) -> Library {
        Library {
            config,
            grounder: Mutex::new(None),
        }
    }

    /// Its configuration.
    pub fn config(&self) -> &LibraryConfig {
        &self.config
    }

    /// Whether the index exists now.
    pub fn exists(&self) -> bool {
        index_exists(&self.config.index)
    }

    /// The grounder, opening the index and loading the embedding model the first time (a
    /// blocking step: hundreds of milliseconds, on a thread that may block).
    pub fn open(&self) -> Result<Arc<Grounder>, LibraryError> {
        // held across the load, so two first questions load the model once
        let mut slot = self.grounder.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(g) = slot.as_ref() {
            return Ok(g.clone());
        }
        let c = &self.config;
        if !self.exists() {
            return Err(LibraryError::NoIndex(c.index.clone()));
        }
        let index = DocIndex::open(&c.index).map_err(GroundError::from)?;
        let embedder =
            Embedder::load(&c.embedder, c.threads).map_err(|source| LibraryError::Embedder {
                dir: c.embedder.clone(),
                source,
            })?;
        let g = Arc::new(Grounder::new(index, embedder, c.settings)?);
        tracing::info!(index = %c.index.display(), embedder = %c.embedder.display(), "document library open");
        *slot = Some(g.clone());
        Ok(g)
    }

    /// The passages for `question` (blocking: an embedding and a search, tens of ms).
    pub fn ground(&self, question: &str) -> Result<Grounding, LibraryError> {
        Ok(self.open()?.ground(question)?)
    }
}
