"""GGUF -> fieldllm model package conversion (ONNX graph, tokenizer, chat template, manifest)."""
