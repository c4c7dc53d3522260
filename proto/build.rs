//! Compiles the `.proto` files with protox (pure Rust), so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files =
        ["pdserve/worker/v1/worker.proto", "pdserve/kv/v1/transfer.proto", "pdserve/discovery/v1/discovery.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
