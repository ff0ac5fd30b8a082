//! Models by name from the local Hugging Face cache (issue 27): a cache laid out by hand as the hub
//! client writes it (blobs named by their SHA-256, snapshot files symlinked to them, `refs/main`
//! holding a commit without a newline) resolves offline, in `Model::load` and through the commands.
//! One test: it sets the process's environment.
use clap::Parser;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use stuffed::cli::{run, Cli};
use stuffed::model::Model;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn cli(args: &[&str]) -> anyhow::Result<()> {
    run(Cli::try_parse_from(std::iter::once("stuffed").chain(args.iter().copied()))?)
}

/// Writes `files` of model directory `src` as commit `commit` of `repo` under the cache `hub`.
fn cache_snapshot(hub: &Path, repo: &str, commit: &str, src: &Path, files: &[&str]) {
    let base = hub.join(format!("models--{}", repo.replace('/', "--")));
    let snap = base.join("snapshots").join(commit);
    std::fs::create_dir_all(base.join("blobs")).unwrap();
    std::fs::create_dir_all(&snap).unwrap();
    for f in files {
        let bytes = std::fs::read(src.join(f)).unwrap();
        let sha = format!("{:x}", Sha256::digest(&bytes));
        std::fs::write(base.join("blobs").join(&sha), &bytes).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{sha}"), snap.join(f)).unwrap();
    }
}

fn set_ref(hub: &Path, repo: &str, name: &str, commit: &str) {
    let refs = hub.join(format!("models--{}", repo.replace('/', "--"))).join("refs");
    std::fs::create_dir_all(&refs).unwrap();
    std::fs::write(refs.join(name), commit).unwrap();
}

#[test]
fn models_by_name_from_the_hf_cache() {
    let dir = tempfile::tempdir().unwrap();
    let hub = dir.path().join("hf/hub");
    let (untied, tied) = (root().join("tests/data/mamba2_hf_g1_untied"), root().join("tests/data/mamba2_hf_g2_tied"));
    let files = ["config.json", "model.safetensors"];
    let (c1, c2) = ("1111111111111111111111111111111111111111", "2222222222222222222222222222222222222222");
    cache_snapshot(&hub, "acme/tiny", c1, &untied, &files);
    cache_snapshot(&hub, "acme/tiny", c2, &tied, &files);
    set_ref(&hub, "acme/tiny", "main", c1);
    set_ref(&hub, "acme/tiny", "v2", c2);
    std::env::remove_var("HF_HUB_CACHE");
    std::env::set_var("HF_HOME", dir.path().join("hf"));

    // refs/main, a branch, a commit: the snapshot each names, with the same facts as the path.
    let facts = |m: &Model| (m.info.family, m.info.d_model, m.info.n_layer, m.info.tied_embeddings, m.info.params);
    let main = Model::load(Path::new("acme/tiny")).unwrap();
    assert_eq!(main.info.path, hub.join("models--acme--tiny/snapshots").join(c1));
    assert_eq!(facts(&main), facts(&Model::load(&untied).unwrap()));
    // Rows and file names call it by its name, not by the snapshot's commit.
    assert_eq!(stuffed::eval::ppl::model_name(&main.info), "tiny");
    let v2 = Model::load(Path::new("acme/tiny@v2")).unwrap();
    assert_eq!(facts(&v2), facts(&Model::load(&tied).unwrap()));
    assert_ne!(facts(&main), facts(&v2));
    let by_commit = Model::load(Path::new(&format!("acme/tiny@{c2}"))).unwrap();
    assert_eq!(by_commit.info.path, v2.info.path);

    // $HF_HUB_CACHE wins over $HF_HOME.
    std::env::set_var("HF_HUB_CACHE", dir.path().join("elsewhere"));
    let e = format!("{:#}", Model::load(Path::new("acme/tiny")).err().unwrap());
    let looked = dir.path().join("elsewhere/models--acme--tiny/refs/main");
    assert_eq!(
        e,
        format!(
            "acme/tiny: no such path, and no model acme/tiny in the Hugging Face cache ({} not found; nothing is downloaded)",
            looked.display()
        )
    );
    std::env::set_var("HF_HUB_CACHE", &hub);
    let e = format!("{:#}", Model::load(Path::new("acme/tiny@v9")).err().unwrap());
    assert!(e.contains("no snapshot of acme/tiny at v9") && e.contains(&hub.display().to_string()), "{e}");

    // Through the commands: logits by name equal logits by path, bit for bit.
    let ids = dir.path().join("ids.txt");
    std::fs::write(&ids, "1 5 9 200 3 3 17 40").unwrap();
    let out = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let run_logits = |model: &str, o: &str| {
        cli(&["logits", "--model", model, "--ids", ids.to_str().unwrap(), "--out", o]).unwrap();
        std::fs::read(o).unwrap()
    };
    assert_eq!(run_logits("acme/tiny@v2", &out("a.st")), run_logits(tied.to_str().unwrap(), &out("b.st")));
    cli(&["info", "--model", "acme/tiny"]).unwrap();
    // A path that exists is a path, even when it reads as a name.
    std::fs::create_dir_all(dir.path().join("acme")).unwrap();
    std::os::unix::fs::symlink(&tied, dir.path().join("acme/tiny")).unwrap();
    std::env::set_current_dir(dir.path()).unwrap();
    assert_eq!(Model::load(Path::new("acme/tiny")).unwrap().info.path, Path::new("acme/tiny"));
}
