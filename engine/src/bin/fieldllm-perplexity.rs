//! `fieldllm-perplexity MODEL TEXT CTX CHUNKS`: the model's perplexity on the first CHUNKS chunks
//! of CTX tokens of TEXT, printed alone on stdout (llama-perplexity's measure; see
//! `fieldllm_engine::quality`). `fieldllmd bench --perplexity` is the user's tool; this one needs
//! nothing but the engine, so a board's integrator (and `tests/cross/aarch64.sh`, under qemu)
//! can check a model without the daemon. `FIELDLLM_ISA` picks the kernels as for the daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use fieldllm_engine::{LoadOptions, Model, quality};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, text, ctx, chunks] = args.as_slice() else {
        eprintln!("usage: fieldllm-perplexity MODEL TEXT CTX CHUNKS");
        return ExitCode::from(2);
    };
    match run(model.into(), text.into(), ctx, chunks) {
        Ok(p) => {
            println!("{p}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fieldllm-perplexity: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(model: PathBuf, text: PathBuf, ctx: &str, chunks: &str) -> Result<f64, String> {
    let ctx: usize = ctx.parse().map_err(|e| format!("CTX {ctx:?}: {e}"))?;
    let chunks: usize = chunks
        .parse()
        .map_err(|e| format!("CHUNKS {chunks:?}: {e}"))?;
    let text = std::fs::read_to_string(&text).map_err(|e| format!("{}: {e}", text.display()))?;
    let options = LoadOptions {
        verify: false,
        threads: 2,
        context: None,
        ..LoadOptions::default()
    };
    let model = Model::load(&model, &options).map_err(|e| e.to_string())?;
    let tokens = model.tokenizer.encode(&text).map_err(|e| e.to_string())?;
    quality::measure(&model, &tokens, ctx, chunks, None, |_, _, _| {})
        .map(|q| q.perplexity)
        .map_err(|e| e.to_string())
}
