//! The GGUF import's tokenizer: for SmolLM2, the same `tokenizer.json` as the Python
//! converter's; for llama.cpp's test vocabularies (GPT-2, Llama 3), the token ids llama.cpp's
//! own tokenizer tests expect (models/fetch-vocabs.sh fetches them).

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::path::{Path, PathBuf};

use fieldllm_engine::import::tokenizer::tokenizer_json;
use tokenizers::Tokenizer;

fn models() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models")
}

fn need(p: &Path) -> &Path {
    assert!(
        p.exists(),
        "{} is missing: run models/setup.sh (tests/run.sh does)",
        p.display()
    );
    p
}

fn vocab(name: &str) -> PathBuf {
    models()
        .join("cache/llama-vocabs")
        .join(format!("ggml-vocab-{name}.gguf"))
}

fn tokenizer(gguf: &Path) -> Tokenizer {
    let g = fieldllm_gguf::read(need(gguf)).unwrap();
    let json = tokenizer_json(&g).unwrap();
    Tokenizer::from_bytes(serde_json::to_vec(&json).unwrap()).unwrap()
}

#[test]
fn smollm2s_tokenizer_is_the_python_converters() {
    let gguf = models().join("cache/SmolLM2-135M-Instruct.Q4_1.gguf");
    let python = models().join("build/smollm2-135m-instruct/tokenizer.json");
    let g = fieldllm_gguf::read(need(&gguf)).unwrap();
    let ours = tokenizer_json(&g).unwrap();
    let theirs: serde_json::Value =
        serde_json::from_slice(&std::fs::read(need(&python)).unwrap()).unwrap();
    // the Python converter predates "ignore_merges" in its output: the default, false
    let mut ours_without = ours.clone();
    ours_without["model"]
        .as_object_mut()
        .unwrap()
        .remove("ignore_merges");
    let mut theirs_without = theirs.clone();
    theirs_without["model"]
        .as_object_mut()
        .unwrap()
        .remove("ignore_merges");
    assert_eq!(ours["model"]["ignore_merges"], false);
    assert!(ours_without == theirs_without, "the tokenizer.json differs");
}

/// llama.cpp's test inputs and the ids it expects (`ggml-vocab-*.gguf.inp` / `.out`).
fn cases(name: &str) -> Vec<(String, Vec<u32>)> {
    let inp = std::fs::read_to_string(need(&vocab(name).with_extension("gguf.inp"))).unwrap();
    let out = std::fs::read_to_string(need(&vocab(name).with_extension("gguf.out"))).unwrap();
    let inputs: Vec<&str> = inp
        .strip_suffix("\n__ggml_vocab_test__\n")
        .unwrap_or(&inp)
        .split("\n__ggml_vocab_test__\n")
        .collect();
    let outputs: Vec<Vec<u32>> = out
        .lines()
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
        .collect();
    assert_eq!(inputs.len(), outputs.len(), "{name}");
    inputs
        .into_iter()
        .map(str::to_string)
        .zip(outputs)
        .collect()
}

fn encodes_as_llama_cpp(name: &str) {
    let t = tokenizer(&vocab(name));
    let cases = cases(name);
    assert!(cases.len() > 30, "{name}: {} cases", cases.len());
    for (text, want) in cases {
        let got = t.encode(text.as_str(), false).unwrap();
        assert_eq!(got.get_ids(), want.as_slice(), "{name}: {text:?}");
    }
}

#[test]
fn llama_3s_tokenizer_encodes_as_llama_cpp_does() {
    encodes_as_llama_cpp("llama-bpe");
}

#[test]
fn gpt_2s_tokenizer_encodes_as_llama_cpp_does() {
    encodes_as_llama_cpp("gpt-2");
}

#[test]
fn qwen2s_tokenizer_encodes_as_llama_cpp_does() {
    encodes_as_llama_cpp("qwen2");
}

#[test]
fn llama_2s_sentencepiece_tokenizer_encodes_as_llama_cpp_does() {
    encodes_as_llama_cpp("llama-spm");
}

#[test]
fn what_cannot_be_imported_is_named() {
    use fieldllm_gguf::{Value, ValueType};
    let base = fieldllm_gguf::read(need(&vocab("gpt-2"))).unwrap();
    let with = |key: &str, v: Option<Value>| {
        let mut g = base.clone();
        match v {
            Some(v) => g.metadata.insert(key.into(), v),
            None => g.metadata.remove(key),
        };
        tokenizer_json(&g).unwrap_err().to_string()
    };
    let e = with(
        "tokenizer.ggml.pre",
        Some(Value::String("deepseek-llm".into())),
    );
    assert!(
        e.contains("ggml-vocab-gpt-2.gguf")
            && e.contains("\"deepseek-llm\"")
            && e.contains("llama-bpe"),
        "{e}"
    );
    let e = with("tokenizer.ggml.model", Some(Value::String("bert".into())));
    assert!(e.contains("\"bert\""), "{e}");
    let e = with(
        "tokenizer.ggml.token_type",
        Some(Value::Array(vec![Value::Int(1, ValueType::I32)])),
    );
    assert!(
        e.contains("token_type") && e.contains("one per token"),
        "{e}"
    );
    let e = with("tokenizer.ggml.merges", None);
    assert!(e.contains("tokenizer.ggml.merges is missing"), "{e}");
    let e = with(
        "tokenizer.ggml.tokens",
        Some(Value::Uint(3, ValueType::U32)),
    );
    assert!(e.contains("expected an array of strings"), "{e}");
    // a SentencePiece file without scores
    let mut spm = fieldllm_gguf::read(need(&vocab("llama-spm"))).unwrap();
    spm.metadata.remove("tokenizer.ggml.scores");
    let e = tokenizer_json(&spm).unwrap_err().to_string();
    assert!(e.contains("tokenizer.ggml.scores is missing"), "{e}");
}

/// The engine's streaming decode (`TokenText`: the byte table and an answer's stream) turns
/// llama.cpp's ids for each test text back into the text, token by token: byte-level pieces,
/// and SentencePiece's `▁` spaces, `<0xNN>` byte pieces and prefix space.
#[test]
fn streaming_decode_gives_back_llama_cpps_test_texts() {
    for name in ["llama-spm", "llama-bpe", "gpt-2", "qwen2"] {
        let g = fieldllm_gguf::read(need(&vocab(name))).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(
            &path,
            serde_json::to_vec(&tokenizer_json(&g).unwrap()).unwrap(),
        )
        .unwrap();
        let t = fieldllm_engine::tokenizer::TokenText::load(&path).unwrap();
        for (text, ids) in cases(name) {
            let mut s = t.answer_stream();
            let mut got = String::new();
            for id in ids {
                got.push_str(&s.push(t.token_bytes(id)));
            }
            got.push_str(&s.finish());
            assert_eq!(got, text, "{name}");
        }
    }
}
