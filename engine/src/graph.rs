//! Loading a package into tract, compiling artifacts, and the loaded [`Model`].
//!
//! Pipeline (DESIGN.md section 2): ONNX -> typed -> decluttered -> `transformers_detect_all`
//! (past/present pairs become a stateful KV cache) -> weight format -> saved as NNEF (the
//! artifact). Loading an artifact skips the parse and the transforms: NNEF -> optimized -> plan.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tract_core::internal::*;
use tract_core::runtime::RunOptions;
use tract_linalg::multithread::Executor;
use tract_nnef::framework::Nnef;
use tract_onnx::prelude::InferenceModelExt;
use tract_transformers::WithTractTransformers;

use super::EngineError;
use super::attention;
use super::chat::{ChatTemplate, Message};
use super::ggml;
use super::package::{GraphFormat, Manifest, Package, WeightFormat};
use super::tokenizer::TokenText;

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Check every file's sha256 before loading (the daemon always does; benchmarks may skip).
    pub verify: bool,
    /// Threads for tract's matrix products (1 = no thread pool).
    pub threads: usize,
    /// The most tokens (prompt and answer) one session holds: what its KV cache may grow to.
    /// `None`: the model's own context, capped at [`DEFAULT_CONTEXT`]; more than the model's
    /// own is refused.
    pub context: Option<usize>,
    /// How the products quantize their activations.
    pub activations: ggml::Activations,
    /// What the KV caches keep keys and values as (`[model] kv_cache`; halves by default, as
    /// llama.cpp's `--cache-type-k/v f16`).
    pub kv_cache: attention::KvCache,
}

/// The context a model gets when nothing sets it, at most: Llama 3's 131,072 tokens would let
/// one session's KV cache grow to gigabytes (`model info` says what a context costs).
pub const DEFAULT_CONTEXT: usize = 8192;

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            verify: true,
            threads: 2,
            context: None,
            activations: ggml::Activations::default(),
            kv_cache: attention::KvCache::default(),
        }
    }
}

/// Bytes of KV cache one session holds at `tokens` positions, keys and values kept as `kv`.
pub fn kv_bytes(a: &super::package::Architecture, tokens: usize, kv: attention::KvCache) -> u64 {
    kv_cache_bytes(
        a.layers,
        a.kv_heads * (a.hidden / a.heads.max(1)),
        tokens,
        kv,
    )
}

/// Bytes of keys and values kept as `kv` for `layers` layers of `kv_width` (key/value heads
/// times head width) at `tokens` positions.
pub fn kv_cache_bytes(
    layers: usize,
    kv_width: usize,
    tokens: usize,
    kv: attention::KvCache,
) -> u64 {
    2 * (layers * kv_width) as u64 * kv.bytes() as u64 * tokens as u64
}

/// A loaded model: immutable, shared by every [`super::Session`] through an `Arc`.
#[derive(Debug)]
pub struct Model {
    /// The package it came from.
    pub package: Package,
    pub(crate) plan: Arc<TypedSimplePlan>,
    /// Tokenizer plus per-token byte table.
    pub tokenizer: TokenText,
    /// The chat template.
    pub template: ChatTemplate,
    /// Rows of the logits output.
    pub vocab: usize,
    /// Context window in tokens.
    pub context_length: usize,
    /// Time spent in [`Model::load`].
    pub load_time: Duration,
    /// Threads it was loaded to use.
    pub threads: usize,
    /// Whether its rows are open ([`crate::rows`]): one run may carry several conversations.
    pub rows: bool,
    /// What its KV caches keep keys and values as (f32 where a cache stayed tract's own:
    /// what its KV memory is counted as).
    pub kv_cache: attention::KvCache,
}

fn nnef() -> Nnef {
    tract_nnef::nnef()
        .with_tract_transformers()
        .with_registry(ggml::op::registry())
}

fn transform(model: &mut TypedModel, name: &str) -> Result<(), EngineError> {
    let t = tract_core::transform::get_transform(name)
        .map_err(EngineError::graph)?
        .ok_or_else(|| EngineError::Graph(format!("tract transform {name} is not linked in")))?;
    t.transform(model).map_err(EngineError::graph)
}

/// Parses the package's ONNX graph and applies the load-time transforms, leaving a decluttered
/// model with a stateful KV cache and weights in `weights` format.
fn typed_from_onnx(package: &Package, weights: WeightFormat) -> Result<TypedModel, EngineError> {
    let path = package.path(&package.manifest.graph.file);
    let mut model = tract_onnx::onnx()
        .model_for_path(&path)
        .and_then(|m| m.into_typed())
        .map_err(|e| EngineError::Graph(format!("{}: {e:#}", path.display())))?;
    if weights == WeightFormat::Gguf {
        // before decluttering: the constants still have their ONNX names and shapes
        let tensors = ggml::package_blocks(package)?;
        ggml::op::install_blocks(&mut model, &tensors).map_err(EngineError::graph)?;
    }
    model.declutter().map_err(EngineError::graph)?;
    transform(&mut model, "transformers_detect_all")?;
    if weights == WeightFormat::F16 {
        transform(&mut model, "f32_to_f16")?;
    }
    model.declutter().map_err(EngineError::graph)?;
    Ok(model)
}

fn typed_for_run(package: &Package) -> Result<TypedModel, EngineError> {
    let g = &package.manifest.graph;
    match g.format {
        GraphFormat::Onnx => typed_from_onnx(package, g.weights),
        GraphFormat::Nnef => {
            let path = package.path(&g.file);
            let mut framework = nnef();
            // before tract's own .dat reader: the packed blocks are mapped, not copied
            framework
                .resource_loaders
                .insert(0, Box::new(crate::mapped::MapLoader::new(&path)));
            framework
                .model_for_path(&path)
                .map_err(|e| EngineError::Graph(format!("{}: {e:#}", path.display())))
        }
    }
}

/// Compiles `package` (an ONNX package) into a deployable artifact in `out` with weights in
/// `weights` format: NNEF saved after the transforms, tokenizer and template copied, manifest
/// rewritten with fresh hashes. `out` must not exist.
pub fn import(
    package: &Package,
    weights: WeightFormat,
    out: &Path,
) -> Result<Manifest, EngineError> {
    if package.manifest.graph.format != GraphFormat::Onnx {
        return Err(EngineError::Manifest {
            path: package.path(super::package::MANIFEST),
            message: "already an artifact (graph format nnef); import takes an ONNX package".into(),
        });
    }
    refuse_existing(out)?;
    let model = typed_from_onnx(package, weights)?;
    let mut manifest = package.manifest.clone();
    manifest.graph.weights = weights;
    let mut files = vec![];
    for rel in ["tokenizer.json".to_string(), manifest.chat.template.clone()] {
        let path = package.path(&rel);
        let bytes = std::fs::read(&path).map_err(|source| EngineError::Io { path, source })?;
        files.push((rel, bytes));
    }
    write_artifact(&model, manifest, &files, out)
}

/// The error of an I/O failure on `path`, for `map_err`.
fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> EngineError + use<> {
    let path = path.to_path_buf();
    move |source| EngineError::Io { path, source }
}

/// An artifact is never written over: `out` must not exist (checked before any model work,
/// and again by [`write_artifact`]).
pub(crate) fn refuse_existing(out: &Path) -> Result<(), EngineError> {
    if out.exists() {
        return Err(io_at(out)(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "already exists",
        )));
    }
    Ok(())
}

/// Writes an artifact into `out` (which must not exist): `model` saved as NNEF (`model.nnef/`),
/// `files` beside it, and `manifest` with `[graph]` pointing at the NNEF and the sha256 of
/// every file. What `import` (ONNX packages) and `import::gguf` (GGUF files) both end with.
///
/// Written into a sibling directory and renamed into place at the end (fsynced), so a crash or
/// power cut mid-write leaves no half artifact at `out`; when another writer made `out` first,
/// theirs is kept and this one's copy removed.
pub(crate) fn write_artifact(
    model: &TypedModel,
    manifest: Manifest,
    files: &[(String, Vec<u8>)],
    out: &Path,
) -> Result<Manifest, EngineError> {
    refuse_existing(out)?;
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let partial = out.with_file_name(format!(".{name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&partial);
    let written = write_artifact_files(model, manifest, files, &partial).and_then(|m| {
        sync_dir_tree(&partial).map_err(io_at(&partial))?;
        std::fs::rename(&partial, out).map_err(io_at(out))?;
        if let Some(parent) = out.parent() {
            // the rename itself must reach the disk
            let _ = std::fs::File::open(parent).and_then(|d| d.sync_all());
        }
        Ok(m)
    });
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&partial);
    }
    written
}

/// fsync of every file in `dir` (one level of subdirectories) and of the directories.
fn sync_dir_tree(dir: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            sync_dir_tree(&p)?;
        } else {
            std::fs::File::open(&p)?.sync_all()?;
        }
    }
    std::fs::File::open(dir)?.sync_all()
}

fn write_artifact_files(
    model: &TypedModel,
    mut manifest: Manifest,
    files: &[(String, Vec<u8>)],
    out: &Path,
) -> Result<Manifest, EngineError> {
    std::fs::create_dir_all(out).map_err(io_at(out))?;
    let graph_dir = "model.nnef";
    nnef()
        .write_to_dir(model, out.join(graph_dir))
        .map_err(EngineError::graph)?;
    manifest.files.clear();
    for (rel, bytes) in files {
        let path = out.join(rel);
        std::fs::write(&path, bytes).map_err(io_at(&path))?;
        manifest
            .files
            .insert(rel.clone(), super::package::sha256_file(&path)?);
    }
    let mut graph_files: Vec<_> = std::fs::read_dir(out.join(graph_dir))
        .map_err(io_at(&out.join(graph_dir)))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    graph_files.sort();
    for f in graph_files {
        let rel = format!("{graph_dir}/{f}");
        manifest
            .files
            .insert(rel.clone(), super::package::sha256_file(&out.join(&rel))?);
    }
    manifest.graph.format = GraphFormat::Nnef;
    manifest.graph.file = graph_dir.into();
    let text = toml::to_string(&manifest).map_err(|e| EngineError::Manifest {
        path: out.join(super::package::MANIFEST),
        message: e.to_string(),
    })?;
    let mpath = out.join(super::package::MANIFEST);
    std::fs::write(&mpath, text).map_err(io_at(&mpath))?;
    Ok(manifest)
}

impl Model {
    /// Loads a package or artifact directory: verify hashes (optional), tokenizer, template,
    /// graph; checks that the tokenizer fits the model.
    pub fn load(dir: &Path, options: &LoadOptions) -> Result<Arc<Model>, EngineError> {
        let start = Instant::now();
        if options.threads == 0 {
            return Err(EngineError::InvalidParam(
                "threads must be at least 1".into(),
            ));
        }
        // a kernel choice that cannot be obeyed is refused, not swapped for another
        crate::cpu::Isa::requested().map_err(EngineError::InvalidParam)?;
        let package = Package::open(dir)?;
        if options.verify {
            package.verify()?;
        }
        let m = &package.manifest;
        let tokenizer = TokenText::load(&package.path("tokenizer.json"))?;
        let template = ChatTemplate::load(&package.path(&m.chat.template), &tokenizer, m)?;

        let mut typed = typed_for_run(&package)?;
        let rows = crate::rows::open(&mut typed).map_err(EngineError::graph)?;
        let mut optimized = typed.into_optimized().map_err(EngineError::graph)?;
        let team = (options.threads > 1).then(|| Arc::new(crate::cpu::Team::new(options.threads)));
        ggml::op::install_team(&mut optimized, team.as_ref());
        ggml::op::install_activations(&mut optimized, options.activations);
        let row_inputs = if rows {
            Some(crate::rows::attention_inputs(&optimized).map_err(EngineError::graph)?)
        } else {
            None
        };
        let kv_cache =
            attention::install(&mut optimized, team.as_ref(), row_inputs, options.kv_cache)
                .map_err(EngineError::graph)?;
        crate::rope::install(&mut optimized).map_err(EngineError::graph)?;
        crate::elementwise::install(&mut optimized, team.as_ref()).map_err(EngineError::graph)?;
        crate::norm::install(&mut optimized, team.as_ref()).map_err(EngineError::graph)?;
        check_io(&optimized, m, rows)?;
        if tracing::enabled!(tracing::Level::DEBUG) {
            let mut ops = std::collections::BTreeMap::<String, usize>::new();
            for node in optimized.nodes() {
                *ops.entry(node.op.name().to_string()).or_default() += 1;
            }
            tracing::debug!(?ops, "optimized graph");
        }
        let executor = if options.threads > 1 {
            Some(Executor::multithread(options.threads))
        } else {
            Some(Executor::SingleThread)
        };
        let run_options = RunOptions {
            executor,
            ..RunOptions::default()
        };
        let plan =
            SimplePlan::new_with_options(optimized, &run_options).map_err(EngineError::graph)?;

        let vocab = m.model.vocab_size;
        if tokenizer.vocab_size() > vocab {
            return Err(EngineError::Tokenizer(format!(
                "tokenizer has {} tokens but the model's logits have {vocab} rows: \
                 the tokenizer does not fit this model",
                tokenizer.vocab_size()
            )));
        }
        let context_length = match options.context {
            None => m.model.context_length.min(DEFAULT_CONTEXT),
            Some(0) => {
                return Err(EngineError::InvalidParam(
                    "context must be at least 1".into(),
                ));
            }
            Some(c) if c > m.model.context_length => {
                return Err(EngineError::InvalidParam(format!(
                    "context {c} is more than the model's own ({})",
                    m.model.context_length
                )));
            }
            Some(c) => c,
        };
        tracing::info!(
            model = %m.model.name,
            weights = %m.graph.weights,
            graph = ?m.graph.format,
            threads = options.threads,
            kv_cache = kv_cache.name(),
            load_ms = start.elapsed().as_millis() as u64,
            mapped_mb = crate::mapped::WeightStorage::of(plan.model()).mapped_bytes / 1_000_000,
            "model loaded"
        );
        Ok(Arc::new(Model {
            package,
            plan,
            tokenizer,
            template,
            vocab,
            context_length,
            load_time: start.elapsed(),
            threads: options.threads,
            rows,
            kv_cache,
        }))
    }

    /// Where the model's constants live: bytes mapped from the artifact's files, bytes in the
    /// heap, and how many mapped tensors were copied to the heap after all (see
    /// [`crate::mapped`]).
    pub fn weight_storage(&self) -> crate::mapped::WeightStorage {
        crate::mapped::WeightStorage::of(self.plan.model())
    }

    /// The inputs of one run: for each entry (slot, tokens already in that slot, new tokens),
    /// its tokens as consecutive rows. A model without open rows takes one entry of slot 0.
    pub(crate) fn step_inputs(
        &self,
        entries: &[(usize, usize, &[u32])],
    ) -> Result<TVec<TValue>, EngineError> {
        let ids: Vec<i64> = entries
            .iter()
            .flat_map(|e| e.2.iter().map(|&t| t as i64))
            .collect();
        let ids = Tensor::from_shape(&[1, ids.len()], &ids).map_err(EngineError::graph)?;
        if !self.rows {
            if entries.len() != 1 || entries[0].0 != 0 {
                return Err(EngineError::Graph(
                    "this model's graph runs one conversation at a time".into(),
                ));
            }
            return Ok(tvec![ids.into_tvalue()]);
        }
        let (mut positions, mut slots, mut last) = (vec![], vec![], vec![]);
        for &(slot, past, tokens) in entries {
            positions.extend((past..past + tokens.len()).map(|p| p as i64));
            slots.extend(std::iter::repeat_n(slot as i64, tokens.len()));
            last.push(positions.len() as i64 - 1);
        }
        Ok(tvec![
            ids.into_tvalue(),
            tensor1(&positions).into_tvalue(),
            tensor1(&slots).into_tvalue(),
            tensor1(&last).into_tvalue(),
        ])
    }

    /// The logits of a run's `entries` entries, one vector each.
    pub(crate) fn step_logits(
        &self,
        out: &[TValue],
        entries: usize,
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        let logits = out[0].cast_to::<f32>().map_err(EngineError::graph)?;
        let view = logits.try_as_plain_ram().map_err(EngineError::graph)?;
        let slice = view.as_slice::<f32>().map_err(EngineError::graph)?;
        if slice.len() != entries * self.vocab {
            return Err(EngineError::Graph(format!(
                "logits have {} values, expected {entries} x {}",
                slice.len(),
                self.vocab
            )));
        }
        Ok(slice
            .chunks_exact(self.vocab)
            .map(<[f32]>::to_vec)
            .collect())
    }

    /// The package manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.package.manifest
    }

    /// Token ids of a conversation rendered with the chat template, ending with the assistant
    /// header. A message that contains a special token's text (`<|im_end|>`, ...) is refused:
    /// it would be read as that token and let a message forge turns of the conversation.
    pub fn chat_prompt(&self, messages: &[Message]) -> Result<Vec<u32>, EngineError> {
        for m in messages {
            if let Some(special) = self
                .tokenizer
                .special_texts()
                .find(|s| m.content.contains(s.as_str()))
            {
                return Err(EngineError::InvalidParam(format!(
                    "{} message contains the special token text {special:?}",
                    m.role
                )));
            }
        }
        let text = self.template.render(messages, true)?;
        self.tokenizer.encode(&text)
    }

    /// Ids that end generation.
    pub fn eos(&self) -> &[u32] {
        &self.package.manifest.tokens.eos
    }
}

/// After the KV transform the graph must take token ids only and give logits only; anything else
/// means the package's graph is not the decoder shape the engine drives.
fn check_io(model: &TypedModel, m: &Manifest, rows: bool) -> Result<(), EngineError> {
    let inputs = if rows { 4 } else { 1 };
    if model.inputs.len() != inputs || model.outputs.len() != 1 {
        return Err(EngineError::Graph(format!(
            "expected {inputs} input(s) (token ids, and rows when open) and 1 output (logits) \
             after KV-cache detection, found {} inputs and {} outputs",
            model.inputs.len(),
            model.outputs.len()
        )));
    }
    let out = model
        .outlet_fact(model.outputs[0])
        .map_err(EngineError::graph)?;
    let last = out.shape.last().and_then(|d| d.as_usize());
    if last != Some(m.model.vocab_size) {
        return Err(EngineError::Graph(format!(
            "logits have {} rows, the manifest says vocab_size = {}",
            out.shape.last().map(|d| d.to_string()).unwrap_or_default(),
            m.model.vocab_size
        )));
    }
    Ok(())
}
