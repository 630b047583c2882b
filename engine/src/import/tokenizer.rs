//! A GGUF's tokenizer (`tokenizer.ggml.*`) as an HF `tokenizer.json`, which the `tokenizers`
//! crate runs: byte-level BPE with the pre-tokenizer `tokenizer.ggml.pre` names (the same JSON
//! as the Python converter's, `models/fieldllm_convert/tokenizer.py`, for the names both
//! know), and SentencePiece (Llama 2 style files: pieces with scores, `▁` for spaces, `<0xNN>`
//! byte pieces) as HF's own Llama conversion writes it: BPE whose merges are ranked by the
//! merged piece's score, with byte fallback.

use serde_json::{Value, json};

use super::{Gguf, ImportError};

/// ggml's token types (`llama_token_type`).
const TOKEN_TYPE_NORMAL: i64 = 1;
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Llama 3's pre-tokenizer split (its `tokenizer.json`; llama.cpp's `LLAMA_VOCAB_PRE_TYPE_LLAMA3`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2's: Llama 3's with one digit per pre-token (llama.cpp's `LLAMA_VOCAB_PRE_TYPE_QWEN2`).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How text is split before BPE, by llama.cpp's pre-tokenizer name, and whether a whole
/// pre-token found in the vocabulary skips the merges (Llama 3's `ignore_merges`, as llama.cpp
/// does for it: without it, one of llama.cpp's 46 test texts, "Cửa Việt", comes out in other
/// tokens).
fn pre_tokenizer(pre: &str) -> Option<(Vec<Value>, bool)> {
    let byte_level = |regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": regex});
    Some(match pre {
        // each digit alone, then GPT-2's regex
        "smollm" | "starcoder" | "refact" => (
            vec![
                json!({"type": "Digits", "individual_digits": true}),
                byte_level(true),
            ],
            false,
        ),
        "gpt-2" | "default" => (vec![byte_level(true)], false),
        "llama-bpe" | "llama3" | "llama-v3" => (
            vec![
                json!({"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": false}),
                byte_level(false),
            ],
            true,
        ),
        "qwen2" => (
            vec![
                json!({"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": false}),
                byte_level(false),
            ],
            false,
        ),
        _ => return None,
    })
}

/// The pre-tokenizer names [`tokenizer_json`] knows.
pub const KNOWN_PRE: [&str; 9] = [
    "default",
    "gpt-2",
    "smollm",
    "starcoder",
    "refact",
    "llama-bpe",
    "llama3",
    "llama-v3",
    "qwen2",
];

/// The HF `tokenizer.json` of `g`'s tokenizer; refuses, by name, what it cannot express.
pub fn tokenizer_json(g: &Gguf) -> Result<Value, ImportError> {
    let unsupported = |what: String| ImportError::Unsupported {
        path: g.path.clone(),
        what,
    };
    match g.str("tokenizer.ggml.model")? {
        "gpt2" => {}
        "llama" => return sentencepiece_json(g),
        other => {
            return Err(unsupported(format!(
                "its tokenizer.ggml.model is {other:?}; byte-level BPE (\"gpt2\") and SentencePiece (\"llama\") are read"
            )));
        }
    }
    let pre = match g.get("tokenizer.ggml.pre") {
        None => "default",
        Some(_) => g.str("tokenizer.ggml.pre")?,
    };
    let (pretokenizers, ignore_merges) = pre_tokenizer(pre).ok_or_else(|| {
        unsupported(format!(
            "its pre-tokenizer {pre:?} (tokenizer.ggml.pre) is not one fieldllm knows: {}",
            KNOWN_PRE.join(", ")
        ))
    })?;
    let tokens = tokens(g)?;
    let types = token_types(g, tokens.len())?;
    let merges = g.strings("tokenizer.ggml.merges")?;
    let added = added_tokens(&tokens, &types);
    let vocab = vocab(&tokens);
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": pretokenizers},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": ignore_merges,
            "vocab": vocab,
            "merges": merges,
        },
    }))
}

/// A SentencePiece vocabulary (`tokenizer.ggml.model = "llama"`) as HF's `LlamaConverter`
/// writes it: `▁` prepended and for every space, BPE over the pieces with byte fallback, the
/// merges every split of a piece into two pieces, ranked by the piece's score (llama.cpp's
/// SentencePiece tokenizer merges the best-scoring pair first: the same order).
fn sentencepiece_json(g: &Gguf) -> Result<Value, ImportError> {
    let invalid = |what: String| ImportError::Invalid {
        path: g.path.clone(),
        what,
    };
    let tokens = tokens(g)?;
    let types = token_types(g, tokens.len())?;
    let scores = scores(g, tokens.len())?;
    let unk = match g.get("tokenizer.ggml.unknown_token_id") {
        None => None,
        Some(_) => {
            let id = g.u32("tokenizer.ggml.unknown_token_id")? as usize;
            Some(*tokens.get(id).ok_or_else(|| {
                invalid(format!(
                    "tokenizer.ggml.unknown_token_id is {id}, past the {} tokens",
                    tokens.len()
                ))
            })?)
        }
    };
    let ids: std::collections::HashMap<&str, usize> =
        tokens.iter().enumerate().map(|(i, t)| (*t, i)).collect();
    // every split of a piece into two pieces, by the piece's score (best first), then as HF
    // orders a piece's own splits: by the left piece's id, then the right's
    let mut merges: Vec<(f32, usize, usize)> = Vec::new();
    for (i, piece) in tokens.iter().enumerate() {
        let mut local: Vec<(usize, usize)> = piece
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| Some((*ids.get(&piece[..at])?, *ids.get(&piece[at..])?)))
            .collect();
        local.sort_unstable();
        merges.extend(local.into_iter().map(|(l, r)| (scores[i], l, r)));
    }
    // stable: equal scores keep the order above
    merges.sort_by(|a, b| b.0.total_cmp(&a.0));
    let merges: Vec<String> = merges
        .into_iter()
        .map(|(_, l, r)| format!("{} {}", tokens[l], tokens[r]))
        .collect();
    let added = added_tokens(&tokens, &types);
    let vocab = vocab(&tokens);
    let add_space_prefix = !matches!(
        g.get("tokenizer.ggml.add_space_prefix"),
        Some(fieldllm_gguf::Value::Bool(false))
    );
    let mut normalizers = Vec::new();
    if add_space_prefix {
        normalizers.push(json!({"type": "Prepend", "prepend": "▁"}));
    }
    normalizers.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"}));
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": usize::from(add_space_prefix), "stop": 0},
        ]},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        },
    }))
}

/// `tokenizer.ggml.tokens`, not empty.
fn tokens(g: &Gguf) -> Result<Vec<&str>, ImportError> {
    let tokens = g.strings("tokenizer.ggml.tokens")?;
    if tokens.is_empty() {
        return Err(ImportError::Invalid {
            path: g.path.clone(),
            what: "tokenizer.ggml.tokens is empty".into(),
        });
    }
    Ok(tokens)
}

/// The control and user-defined tokens, as HF's `added_tokens` (control ones special).
fn added_tokens(tokens: &[&str], types: &[i64]) -> Vec<Value> {
    tokens
        .iter()
        .zip(types)
        .enumerate()
        .filter(|(_, (_, t))| matches!(**t, TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED))
        .map(|(i, (text, t))| {
            json!({"id": i, "content": text, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": *t == TOKEN_TYPE_CONTROL})
        })
        .collect()
}

/// Token text -> id. A token that appears twice keeps its last id, as a JSON object built in
/// order would (and the Python converter's dict does).
fn vocab(tokens: &[&str]) -> serde_json::Map<String, Value> {
    tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), json!(i)))
        .collect()
}

/// `tokenizer.ggml.scores`, one finite float per token.
fn scores(g: &Gguf, n: usize) -> Result<Vec<f32>, ImportError> {
    let v = g
        .get("tokenizer.ggml.scores")
        .ok_or_else(|| fieldllm_gguf::GgufError::MissingKey {
            path: g.path.clone(),
            key: "tokenizer.ggml.scores".into(),
        })?;
    let wrong = || ImportError::Invalid {
        path: g.path.clone(),
        what: format!(
            "tokenizer.ggml.scores is {}, expected an array of {n} numbers (one per token)",
            v.describe()
        ),
    };
    let fieldllm_gguf::Value::Array(items) = v else {
        return Err(wrong());
    };
    if items.len() != n {
        return Err(wrong());
    }
    items
        .iter()
        .map(|i| {
            i.as_f64()
                .map(|f| f as f32)
                .filter(|f| f.is_finite())
                .ok_or_else(wrong)
        })
        .collect()
}

/// `tokenizer.ggml.token_type`, one per token (all normal when the file has none).
fn token_types(g: &Gguf, n: usize) -> Result<Vec<i64>, ImportError> {
    let Some(v) = g.get("tokenizer.ggml.token_type") else {
        return Ok(vec![TOKEN_TYPE_NORMAL; n]);
    };
    let wrong = || ImportError::Invalid {
        path: g.path.clone(),
        what: format!(
            "tokenizer.ggml.token_type is {}, expected an array of {n} integers (one per token)",
            v.describe()
        ),
    };
    let fieldllm_gguf::Value::Array(items) = v else {
        return Err(wrong());
    };
    if items.len() != n {
        return Err(wrong());
    }
    items
        .iter()
        .map(|i| match *i {
            fieldllm_gguf::Value::Int(t, _) => Ok(t),
            fieldllm_gguf::Value::Uint(t, _) => i64::try_from(t).map_err(|_| wrong()),
            _ => Err(wrong()),
        })
        .collect()
}
