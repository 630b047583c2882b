//! Compiles `proto/fieldllm/v1/*.proto` with protox (pure Rust: no `protoc` on the build
//! machine), then prost for the types and pbjson for the proto3 JSON mapping.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["fieldllm/v1/fieldllm.proto"], ["proto"])?;
    let descriptors = prost::Message::encode_to_vec(&fds);
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("fieldllm_descriptors.bin"), &descriptors)?;
    prost_build::Config::new().compile_fds(fds)?;
    pbjson_build::Builder::new()
        .register_descriptors(&descriptors)?
        .build(&[".fieldllm"])?;
    Ok(())
}
