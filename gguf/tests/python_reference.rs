//! The reader against the `gguf` package's (PyPI, pinned in models/requirements.txt) on the
//! SmolLM2 GGUF that models/setup.sh fetches: every tensor's name, type, shape, place and
//! size, and the metadata values, the same.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::path::PathBuf;
use std::process::Command;

use fieldllm_gguf::{Value, read};

const SCRIPT: &str = r#"
import json, sys
import gguf
r = gguf.GGUFReader(sys.argv[1])
tensors = [[t.name, int(t.tensor_type), [int(d) for d in t.shape], int(t.data_offset), int(t.n_bytes)]
           for t in r.tensors]
meta = {}
for k, f in r.fields.items():
    if k.startswith("GGUF."):
        continue
    if len(f.types) == 1 and f.types[0] != gguf.GGUFValueType.ARRAY:
        v = f.contents()
        meta[k] = v if not isinstance(v, float) else float(v)
    else:
        meta[k] = {"array": len(f.data)}
print(json.dumps({"tensors": tensors, "meta": meta}))
"#;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn smollm2s_directory_and_metadata_read_as_ggufs_own_reader_reads_them() {
    let file = root().join("models/cache/SmolLM2-135M-Instruct.Q4_1.gguf");
    let python = root().join("models/.venv/bin/python");
    assert!(
        file.exists() && python.exists(),
        "{} or {} is missing: run models/setup.sh (tests/run.sh does)",
        file.display(),
        python.display()
    );
    let out = Command::new(&python)
        .arg("-c")
        .arg(SCRIPT)
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();

    let g = read(&file).unwrap();
    let tensors = want["tensors"].as_array().unwrap();
    assert_eq!(g.tensors.len(), tensors.len());
    for (t, w) in g.tensors.iter().zip(tensors) {
        assert_eq!(t.name, w[0].as_str().unwrap());
        assert_eq!(u64::from(t.ty.id()), w[1].as_u64().unwrap(), "{}", t.name);
        let dims: Vec<u64> = w[2]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap())
            .collect();
        assert_eq!(t.dims, dims, "{}", t.name);
        assert_eq!(t.offset, w[3].as_u64().unwrap(), "{}", t.name);
        assert_eq!(t.bytes, w[4].as_u64().unwrap(), "{}", t.name);
    }
    let meta = want["meta"].as_object().unwrap();
    assert_eq!(g.metadata.len(), meta.len());
    for (k, w) in meta {
        let v = g.get(k).unwrap_or_else(|| panic!("{k} missing"));
        match (v, w) {
            (Value::String(s), serde_json::Value::String(ws)) => assert_eq!(s, ws, "{k}"),
            (Value::Array(items), w) => {
                assert_eq!(items.len() as u64, w["array"].as_u64().unwrap(), "{k}")
            }
            (Value::Bool(b), serde_json::Value::Bool(wb)) => assert_eq!(b, wb, "{k}"),
            (Value::Float(f, _), w) => assert_eq!(*f as f32, w.as_f64().unwrap() as f32, "{k}"),
            (v, w) => assert_eq!(v.as_u64(), w.as_u64(), "{k}"),
        }
    }
    assert_eq!(g.architecture().unwrap(), "llama");
    assert_eq!(g.u32("llama.block_count").unwrap(), 30);
    assert_eq!(g.strings("tokenizer.ggml.tokens").unwrap().len(), 49152);
}
