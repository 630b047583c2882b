//! `fieldllmd model import|info|verify`.

use std::path::PathBuf;

use anyhow::Context;
use fieldllm_engine::attention::KvCache;
use fieldllm_engine::graph::{DEFAULT_CONTEXT, import, kv_bytes};
use fieldllm_engine::import::import_gguf;
use fieldllm_engine::{Package, WeightFormat};

/// Model package subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum ModelCommand {
    /// Make the artifact the daemon deploys (NNEF, run-time weights) from a GGUF file (read in
    /// Rust, its blocks kept as they are) or from an ONNX package.
    Import {
        /// A .gguf file, or a package directory written by models/ (ONNX graph).
        src: PathBuf,
        /// Artifact directory to create (must not exist).
        out: PathBuf,
        /// Run-time weight format of a package: f32, f16 (the default), or gguf (the GGUF's own
        /// blocks, a package converted with them). A GGUF file keeps its blocks: gguf only.
        #[arg(long)]
        weights: Option<WeightFormat>,
        /// The model's name in the artifact (a GGUF's default: its general.name).
        #[arg(long)]
        name: Option<String>,
    },
    /// Describe a package or artifact directory, or a GGUF file (what it holds, and whether
    /// its tokenizer imports).
    Info {
        /// The directory, or the .gguf file.
        dir: PathBuf,
        /// Print the manifest as JSON.
        #[arg(long)]
        json: bool,
        /// Also say what one conversation's KV cache costs at this many tokens.
        #[arg(long)]
        context: Option<usize>,
    },
    /// Check every file of a package against its manifest's sha256.
    Verify {
        /// The directory.
        dir: PathBuf,
    },
}

/// The line an import ends with: what was made, its size, how long it took.
fn imported(
    m: &fieldllm_engine::package::Manifest,
    out: &std::path::Path,
    weights: &str,
    start: std::time::Instant,
) -> anyhow::Result<()> {
    let artifact = Package::open(out)?;
    println!(
        "imported {} -> {} ({weights}, {:.1} MB, {:.1} s)",
        m.model.name,
        out.display(),
        artifact.size_bytes() as f64 / 1e6,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

pub fn run(cmd: ModelCommand) -> anyhow::Result<()> {
    match cmd {
        ModelCommand::Import {
            src,
            out,
            weights,
            name,
        } if src.is_file() => {
            if weights.is_some_and(|w| w != WeightFormat::Gguf) {
                anyhow::bail!(
                    "{}: a GGUF file is imported with its own blocks (--weights gguf); f32 and f16 \
                     are for ONNX packages",
                    src.display()
                );
            }
            let start = std::time::Instant::now();
            let m = import_gguf(&src, &out, name.as_deref())
                .with_context(|| format!("importing {} into {}", src.display(), out.display()))?;
            let from = m.source.get("quantization").map_or("?", |q| q.as_str());
            imported(
                &m,
                &out,
                &format!("{} weights from {from}", m.graph.weights),
                start,
            )?;
        }
        ModelCommand::Import {
            src, out, weights, ..
        } => {
            let weights = weights.unwrap_or(WeightFormat::F16);
            let package = Package::open(&src)?;
            package.verify().context("the source package is damaged")?;
            let start = std::time::Instant::now();
            let m = import(&package, weights, &out)
                .with_context(|| format!("importing {} into {}", src.display(), out.display()))?;
            imported(&m, &out, &format!("{weights} weights"), start)?;
        }
        ModelCommand::Info { dir, json, context } if dir.is_file() => {
            super::model_gguf::info(&dir, json, context)?;
        }
        ModelCommand::Info { dir, json, context } => {
            let p = Package::open(&dir)?;
            let m = &p.manifest;
            if json {
                println!("{}", serde_json::to_string_pretty(m)?);
                return Ok(());
            }
            let a = &m.architecture;
            println!("name            {}", m.model.name);
            println!("family          {}", m.model.family);
            println!("parameters      {:.1} M", m.model.parameters as f64 / 1e6);
            println!("context length  {}", m.model.context_length);
            println!("vocabulary      {}", m.model.vocab_size);
            println!(
                "architecture    {} layers, hidden {}, ffn {}, {} heads / {} kv heads",
                a.layers, a.hidden, a.ffn, a.heads, a.kv_heads
            );
            println!(
                "graph           {:?} {} ({} weights)",
                m.graph.format, m.graph.file, m.graph.weights
            );
            for (k, v) in &m.source {
                println!("source.{k:<9} {v}");
            }
            println!(
                "tokens          bos {} eos {:?}",
                m.tokens.bos, m.tokens.eos
            );
            println!("license         {}", m.model.license);
            let mut at = vec![2048, DEFAULT_CONTEXT.min(m.model.context_length)];
            at.extend(context);
            at.sort_unstable();
            at.dedup();
            for t in at {
                println!(
                    "KV cache        {:.1} MB at {t} tokens (per conversation, grows with use; \
                     [model] kv_cache = \"f16\", the default; f32: {:.1} MB)",
                    kv_bytes(a, t, KvCache::F16) as f64 / 1e6,
                    kv_bytes(a, t, KvCache::F32) as f64 / 1e6
                );
            }
            println!(
                "files           {} ({:.1} MB)",
                m.files.len(),
                p.size_bytes() as f64 / 1e6
            );
        }
        ModelCommand::Verify { dir } => {
            let p = Package::open(&dir)?;
            p.verify()?;
            println!(
                "{}: {} files match their sha256",
                dir.display(),
                p.manifest.files.len()
            );
        }
    }
    Ok(())
}
