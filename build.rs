//! Compiles the protos in pure Rust (protox): no `protoc` is needed on the build machine.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/adapterdrop/v1/adapterdrop.proto",
        "proto/adapterdrop/v1/admin.proto",
        // Open Inference Protocol (KServe v2), package `inference`.
        "proto/kserve/grpc_service.proto",
        "proto/kserve/model_config.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // Reflection serves this encoded descriptor set.
    std::fs::write(out.join("descriptor.bin"), prost::Message::encode_to_vec(&fds))?;
    // Undecodable requests are INVALID_ARGUMENT, not tonic-prost's INTERNAL (src/codec.rs).
    tonic_prost_build::configure().codec_path("crate::codec::ProtoCodec").compile_fds(fds)?;
    Ok(())
}
