//! Compiles the `.proto` files into `OUT_DIR` with a vendored `protoc`, so building Magnetar
//! needs no system protobuf compiler.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // prost-build finds protoc through this variable; a build script is single-threaded.
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Entry payloads move between sockets, the journal and caches without copies.
        .bytes(".magnetar.bookie.v1")
        .compile_protos(&["proto/metastore.proto", "proto/bookie.proto", "proto/pulsar_api.proto"], &["proto"])?;
    Ok(())
}
