//! The daemon's document library: the index and the embedding model its answers are grounded
//! on. Opened at start-up when an index exists, else when a request first asks for it (so an
//! index that `docs add` makes while the daemon runs is used without a restart); every search
//! sees what `docs add` has committed since the last one.
//!
//! Searches run one at a time on a thread of their own ("docs"), like the engine's workers:
//! never on a tokio worker, and with one thread's scratch memory rather than one per thread of
//! a blocking pool (tract keeps matrix-product scratch per thread).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, mpsc};

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
    /// The search panicked (caught: the next search runs as usual).
    #[error("the document search failed unexpectedly")]
    Panicked,
    /// The search thread is gone (the daemon is stopping).
    #[error("the document search has stopped")]
    Stopped,
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
    shelf: Arc<Shelf>,
    searches: mpsc::Sender<Search>,
}

/// What the search thread and the library share.
struct Shelf {
    config: LibraryConfig,
    grounder: Mutex<Option<Arc<Grounder>>>,
}

/// A question for the search thread and where its result goes.
struct Search {
    question: String,
    reply: tokio::sync::oneshot::Sender<Result<Grounding, LibraryError>>,
}

impl std::fmt::Debug for Library {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Library")
            .field("config", &self.shelf.config)
            .finish()
    }
}

/// Whether `dir` holds a document index (tantivy's `meta.json`, written by the first commit).
pub fn index_exists(dir: &Path) -> bool {
    dir.join("meta.json").is_file()
}

impl Library {
    /// A library over `config` and its search thread; nothing is read until
    /// [`Library::open`] or a question. The thread ends when the library is dropped.
    pub fn new(config: LibraryConfig) -> std::io::Result<Library> {
        let shelf = Arc::new(Shelf {
            config,
            grounder: Mutex::new(None),
        });
        let (searches, rx) = mpsc::channel::<Search>();
        let worker = shelf.clone();
        std::thread::Builder::new()
            .name("docs".into())
            .spawn(move || {
                for s in rx {
                    let found = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        worker.ground(&s.question)
                    }))
                    .unwrap_or_else(|_| {
                        tracing::error!("the document search panicked");
                        Err(LibraryError::Panicked)
                    });
                    // the asker may have gone (a port closed): nothing to do then
                    let _ = s.reply.send(found);
                }
            })?;
        Ok(Library { shelf, searches })
    }

    /// Its configuration.
    pub fn config(&self) -> &LibraryConfig {
        &self.shelf.config
    }

    /// Whether the index exists now.
    pub fn exists(&self) -> bool {
        self.shelf.exists()
    }

    /// Opens the index and loads the embedding model now, if not yet (blocking; start-up
    /// calls it so the first question does not wait for the load).
    pub fn open(&self) -> Result<Arc<Grounder>, LibraryError> {
        self.shelf.open()
    }

    /// The passages for `question`, found on the search thread.
    pub async fn search(&self, question: String) -> Result<Grounding, LibraryError> {
        let (reply, found) = tokio::sync::oneshot::channel();
        self.searches
            .send(Search { question, reply })
            .map_err(|_| LibraryError::Stopped)?;
        found.await.map_err(|_| LibraryError::Stopped)?
    }
}

impl Shelf {
    fn exists(&self) -> bool {
        index_exists(&self.config.index)
    }

    /// The grounder, opening the index and loading the embedding model the first time (a
    /// blocking step: hundreds of milliseconds, on a thread that may block).
    fn open(&self) -> Result<Arc<Grounder>, LibraryError> {
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
        // the model file's parse is freed by now: give its pages back (measured: the daemon's
        // resident memory with the library open, see `bench --docs`)
        crate::rss::release_freed_memory();
        tracing::info!(index = %c.index.display(), embedder = %c.embedder.display(), "document library open");
        *slot = Some(g.clone());
        Ok(g)
    }

    /// The passages for `question` (blocking: an embedding and a search, tens of ms).
    fn ground(&self, question: &str) -> Result<Grounding, LibraryError> {
        let found = self.open()?.ground(question);
        // the embedding's activations (a batch of sentences, padded) are freed by now; without
        // this glibc keeps them resident, ~40 MB after a few questions (measured)
        crate::rss::release_freed_memory();
        Ok(found?)
    }
}
