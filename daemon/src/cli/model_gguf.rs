//! `fieldllmd model info FILE.gguf`: what a user's GGUF holds, read in Rust (header, metadata
//! and tensor directory only; the weights stay on disk), and whether its tokenizer imports.

use std::collections::BTreeMap;
use std::path::Path;

use fieldllm_engine::attention::KvCache;
use fieldllm_engine::graph::DEFAULT_CONTEXT;
use fieldllm_engine::import::gguf;
use fieldllm_engine::import::llama::Hyper;
use fieldllm_engine::import::tokenizer::tokenizer_json;
use serde_json::json;

/// Prints what `path` holds (as JSON with `json`); a file that is not a readable GGUF is an
/// error naming what is wrong.
pub fn info(path: &Path, json_out: bool, context: Option<usize>) -> anyhow::Result<()> {
    let g = gguf::read(path)?;
    let built = Hyper::read(&g).and_then(|h| h.check_tensors(&g).map(|()| h));
    // what one conversation's KV cache (the default f16 keys and values) costs at a few contexts
    let kv: Vec<(usize, u64)> = match &built {
        Ok(h) => {
            let mut at = vec![2048, DEFAULT_CONTEXT.min(h.context), h.context];
            at.extend(context);
            at.sort_unstable();
            at.dedup();
            at.into_iter()
                .map(|t| (t, h.kv_bytes(t, KvCache::default())))
                .collect()
        }
        Err(_) => vec![],
    };
    let arch = g.architecture()?.to_string();
    let hyper = |key: &str| g.get(&format!("{arch}.{key}")).and_then(|v| v.as_f64());
    let mut types: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    for t in &g.tensors {
        let e = types.entry(t.ty.name().to_string()).or_default();
        e.0 += 1;
        e.1 += t.bytes;
    }
    let parameters: u64 = g.tensors.iter().map(|t| t.elements()).sum();
    let tokenizer = tokenizer_json(&g).map(|_| ()).map_err(|e| e.to_string());
    let model = g.str("tokenizer.ggml.model").ok();
    let pre = g.str("tokenizer.ggml.pre").ok();
    let vocab = g.strings("tokenizer.ggml.tokens").map(|t| t.len()).ok();
    if json_out {
        let out = json!({
            "file": path, "version": g.version, "architecture": arch,
            "name": g.str("general.name").ok(),
            "layers": hyper("block_count"), "hidden": hyper("embedding_length"),
            "ffn": hyper("feed_forward_length"), "heads": hyper("attention.head_count"),
            "kv_heads": hyper("attention.head_count_kv"), "context_length": hyper("context_length"),
            "rope_base": hyper("rope.freq_base"), "parameters": parameters,
            "tensors": types.iter().map(|(k, (n, b))| (k.clone(), json!({"count": n, "bytes": b}))).collect::<serde_json::Map<_, _>>(),
            "tokenizer_model": model, "pre_tokenizer": pre, "vocabulary": vocab, "chat_template": g.get("tokenizer.chat_template").is_some(),
            "tokenizer": match &tokenizer { Ok(()) => json!("imports"), Err(e) => json!(e) },
            "builds": match &built { Ok(_) => json!(true), Err(e) => json!(e.to_string()) },
            "kv_cache_type": KvCache::default().name(),
            "kv_cache_bytes": kv.iter().map(|(t, b)| (t.to_string(), json!(b))).collect::<serde_json::Map<_, _>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let num = |v: Option<f64>| v.map_or("?".to_string(), |v| v.to_string());
    println!(
        "file            {} (GGUF v{}, {:.1} MB)",
        path.display(),
        g.version,
        g.file_len as f64 / 1e6
    );
    println!("architecture    {arch}");
    if let Ok(name) = g.str("general.name") {
        println!("name            {name}");
    }
    println!(
        "shape           {} layers, hidden {}, ffn {}, {} heads / {} kv heads",
        num(hyper("block_count")),
        num(hyper("embedding_length")),
        num(hyper("feed_forward_length")),
        num(hyper("attention.head_count")),
        num(hyper("attention.head_count_kv"))
    );
    println!("context length  {}", num(hyper("context_length")));
    println!("rope base       {}", num(hyper("rope.freq_base")));
    println!("parameters      {:.1} M", parameters as f64 / 1e6);
    for (ty, (n, bytes)) in &types {
        println!("tensors {ty:<7} {n} ({:.1} MB)", *bytes as f64 / 1e6);
    }
    println!(
        "tokenizer       {} (pre-tokenizer {}), {} tokens: {}",
        model.unwrap_or("?"),
        pre.unwrap_or("default"),
        vocab.map_or("?".into(), |v| v.to_string()),
        match &tokenizer {
            Ok(()) => "imports".to_string(),
            Err(e) => format!("does not import ({e})"),
        }
    );
    println!(
        "chat template   {}",
        if g.get("tokenizer.chat_template").is_some() {
            "yes"
        } else {
            "no"
        }
    );
    match &built {
        Ok(_) => println!("graph           builds (fieldllmd model import, or --model FILE.gguf)"),
        Err(e) => println!("graph           does not build: {e}"),
    }
    for (t, bytes) in &kv {
        println!(
            "KV cache        {:.1} MB at {t} tokens (per conversation, grows with use; f16, \
             [model] kv_cache's default; f32: twice)",
            *bytes as f64 / 1e6
        );
    }
    Ok(())
}
