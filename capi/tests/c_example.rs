//! examples/c/stream_logits.c, built with the system C compiler against the committed header and
//! libstuffed.so, and again against libstuffed.a (static), prints the same logits as `stuffed logits`
//! bit for bit (the same kernel path: calls of C tokens against `--chunk C`).
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The directory cargo put libstuffed.so in (this test's executable is in its `deps/`).
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(Path::parent).unwrap().to_path_buf()
}

fn cli_logits(model: &Path, ids: &[u32], chunk: usize, dir: &Path) -> Vec<u32> {
    let ids_file = dir.join("ids.txt");
    let text: Vec<String> = ids.iter().map(u32::to_string).collect();
    std::fs::write(&ids_file, text.join(" ")).unwrap();
    let out = dir.join("logits.safetensors");
    let args = ["stuffed", "logits", "--model", model.to_str().unwrap(), "--ids", ids_file.to_str().unwrap()];
    let args = args.into_iter().map(String::from).chain(["--out".into(), out.to_str().unwrap().into()]);
    let args = args.chain(["--chunk".into(), chunk.to_string()]);
    stuffed_host::cli::run(stuffed_host::cli::parse_from(args).unwrap()).unwrap();
    let ck = stuffed_host::checkpoint::Checkpoint::open(&out).unwrap();
    ck.require("logits").unwrap().as_f32().unwrap().iter().map(|x| x.to_bits()).collect()
}

#[test]
fn c_example_prints_the_clis_logits() {
    // `cargo test` links tests against no cdylib: build it (a no-op when it is current). The whole
    // workspace's libs and tests, as `cargo test --workspace` (CI) resolves features: the same
    // dependency builds are reused, only libstuffed.so/.a are new.
    let lib = lib_dir();
    let release = lib.file_name().is_some_and(|p| p == "release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let built = Command::new(cargo)
        .args(["build", "--workspace", "--lib", "--tests"])
        .args(release.then_some("--release"))
        .current_dir(root())
        .output()
        .unwrap();
    assert!(built.status.success(), "cargo build: {}", String::from_utf8_lossy(&built.stderr));
    assert!(lib.join("libstuffed.so").exists(), "no libstuffed.so in {}", lib.display());
    assert!(lib.join("libstuffed.a").exists(), "no libstuffed.a in {}", lib.display());
    let dir = tempfile::tempdir().unwrap();
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    // Against the shared library, and against the static one with the system libraries a Rust
    // staticlib needs (`rustc --print native-static-libs` on linux-gnu).
    let shared: Vec<String> =
        vec!["-L".into(), lib.display().to_string(), format!("-Wl,-rpath,{}", lib.display()), "-lstuffed".into()];
    let mut fixed = vec![lib.join("libstuffed.a").display().to_string()];
    fixed.extend(["-lgcc_s", "-lutil", "-lrt", "-lpthread", "-lm", "-ldl", "-lc"].map(String::from));
    let exes: Vec<PathBuf> = [("shared", shared), ("static", fixed)]
        .into_iter()
        .map(|(kind, link)| {
            let exe = dir.path().join(format!("stream_logits_{kind}"));
            let built = Command::new(&cc)
                .args(["-std=c11", "-O1", "-Wall", "-Wextra", "-Werror", "-I"])
                .arg(root().join("capi"))
                .arg(root().join("examples/c/stream_logits.c"))
                .args(&link)
                .arg("-o")
                .arg(&exe)
                .output()
                .unwrap();
            assert!(built.status.success(), "{cc} ({kind}): {}", String::from_utf8_lossy(&built.stderr));
            exe
        })
        .collect();
    let ids = [5u32, 9, 2, 40, 7, 13, 1, 8, 100, 3];
    for (model, chunk) in [("mamba2_hf_g1_untied", 1), ("mamba2_hf_g1_untied", 4), ("rwkv7_tiny", 3), ("gla_tiny", 10)]
    {
        let path = root().join("tests/data").join(model);
        let want = cli_logits(&path, &ids, chunk, dir.path());
        for exe in &exes {
            let run = Command::new(exe)
                .arg(&path)
                .arg(chunk.to_string())
                .args(ids.iter().map(u32::to_string))
                .output()
                .unwrap();
            assert!(run.status.success(), "{model} {}: {}", exe.display(), String::from_utf8_lossy(&run.stderr));
            let printed: Vec<u32> = String::from_utf8(run.stdout)
                .unwrap()
                .split_whitespace()
                .map(|h| u32::from_str_radix(h, 16).unwrap())
                .collect();
            assert_eq!(printed.len(), want.len(), "{model}");
            assert!(
                printed == want,
                "{model} chunk {chunk} {}: the logits differ from `stuffed logits`",
                exe.display()
            );
        }
    }
}
