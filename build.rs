//! Build script: compiles `proto/` with a vendored protoc (no system protoc needed) and bakes an rpath to
//! libtorch so every binary runs without LD_LIBRARY_PATH.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // --- gRPC code ----------------------------------------------------------------------------
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    let protos = ["proto/ddpo/v1/ddpo.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("ddpo_descriptor.bin"))
        .compile_protos(&protos, &["proto"])?;

    // --- libtorch rpath -----------------------------------------------------------------------
    // torch-sys (a direct dependency, `links = "tch"`) tells us where the libtorch it linked lives.
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        if let Some(lib) = std::env::var_os("DEP_TCH_LIBTORCH_LIB") {
            let lib = lib.to_string_lossy();
            println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
            // Keep libtorch_cuda.so as a NEEDED entry even though no symbol of it is referenced
            // directly: without it CUDA looks absent at run time on GPU machines.
            if std::path::Path::new(&*lib)
                .join("libtorch_cuda.so")
                .exists()
            {
                println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
                println!("cargo:rustc-link-arg=-L{lib}");
                println!("cargo:rustc-link-arg=-ltorch_cuda");
                println!("cargo:rustc-link-arg=-Wl,--as-needed");
            }
        }
    }
    Ok(())
}
