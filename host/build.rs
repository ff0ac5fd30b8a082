//! Feature `cuda-emu`: compiles the CUDA kernels (ptx/*.cu) as C++ with the CPU stand-ins of
//! ptx/emu/, so the GPU launch sequence runs in `cargo test` without a GPU.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // `cfg(gpu)`: the CUDA backend is compiled, on the real device (`cuda`) or emulated (`cuda-emu`).
    println!("cargo:rustc-check-cfg=cfg(gpu)");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() || std::env::var_os("CARGO_FEATURE_CUDA_EMU").is_some() {
        println!("cargo:rustc-cfg=gpu");
    }
    // `cfg(lean)` (STUFFED_LEAN=1 at build time): the shipped default models are not embedded, so the
    // binaries tools/gpu_bundle.sh sends to a GPU machine stay small (the device takes 64 MiB a call).
    println!("cargo:rustc-check-cfg=cfg(lean)");
    println!("cargo:rerun-if-env-changed=STUFFED_LEAN");
    if std::env::var_os("STUFFED_LEAN").is_some() {
        println!("cargo:rustc-cfg=lean");
    }
    #[cfg(feature = "cuda-emu")]
    {
        for f in ["../ptx/mamba2.cu", "../ptx/emu/emu.cpp", "../ptx/emu/cuda_emu.h"] {
            println!("cargo:rerun-if-changed={f}");
        }
        cc::Build::new()
            .cpp(true)
            .file("../ptx/emu/emu.cpp")
            .flag("-std=c++20")
            .flag("-pthread")
            .opt_level(2)
            .warnings(false)
            .compile("stuffed_cuda_emu");
        println!("cargo:rustc-link-lib=pthread");
    }
}
