//! Models by name from the local Hugging Face cache, offline: `owner/name[@revision]` that is not an
//! existing path names `models--owner--name/snapshots/<commit>/` under `$HF_HUB_CACHE`, else
//! `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub` — the
//! layout the hub client writes (`refs/<branch>` holds a commit; snapshot files are symlinks into
//! `blobs/`). Nothing is downloaded.
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

/// The hub cache directory the environment names.
pub fn cache_dir() -> PathBuf {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(d) = var("HF_HUB_CACHE") {
        return d;
    }
    if let Some(h) = var("HF_HOME") {
        return h.join("hub");
    }
    let cache = var("XDG_CACHE_HOME").unwrap_or_else(|| var("HOME").unwrap_or_default().join(".cache"));
    cache.join("huggingface").join("hub")
}

/// `owner/name[@revision]` as `(owner, name, revision)`, when `s` has that form (names and
/// revisions of letters, digits, `-`, `_` and `.`, not `.` or `..`).
pub fn parse_name(s: &str) -> Option<(&str, &str, Option<&str>)> {
    let (repo, rev) = match s.split_once('@') {
        Some((r, v)) => (r, Some(v)),
        None => (s, None),
    };
    let (owner, name) = repo.split_once('/')?;
    let part = |p: &str| {
        !p.is_empty() && p != "." && p != ".." && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    (part(owner) && part(name) && rev.is_none_or(part)).then_some((owner, name, rev))
}

/// `path` itself when it exists or is no model name; else the cached snapshot it names, or one
/// line saying where it looked.
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    let Some((owner, name, rev)) = path.to_str().and_then(parse_name) else {
        return Ok(path.to_path_buf());
    };
    let cache = cache_dir();
    let repo = cache.join(format!("models--{owner}--{name}"));
    let rev_name = rev.unwrap_or("main");
    // A branch or tag resolves through refs/; a commit hash names its snapshot directly.
    let commit = match std::fs::read_to_string(repo.join("refs").join(rev_name)) {
        Ok(c) => c.trim().to_string(),
        Err(_) if rev.is_some() => rev_name.to_string(),
        Err(_) => bail!(
            "{}: no such path, and no model {owner}/{name} in the Hugging Face cache ({} not found; nothing is downloaded)",
            path.display(),
            repo.join("refs").join("main").display()
        ),
    };
    let snap = repo.join("snapshots").join(&commit);
    if !snap.is_dir() {
        bail!(
            "{}: no such path, and no snapshot of {owner}/{name} at {} in the Hugging Face cache ({} not found; nothing is downloaded)",
            path.display(),
            rev_name,
            snap.display()
        );
    }
    Ok(snap)
}

/// The model name of a cached snapshot path (`…/models--owner--name/snapshots/<commit>` → `name`),
/// for the rows and file names that name a model by its directory.
pub fn snapshot_name(path: &Path) -> Option<String> {
    let snaps = path.parent()?;
    let repo = snaps.parent()?.file_name()?.to_str()?;
    if snaps.file_name()? != "snapshots" || !repo.starts_with("models--") {
        return None;
    }
    repo.rsplit("--").next().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::parse_name;

    #[test]
    fn names_and_paths() {
        assert_eq!(parse_name("state-spaces/mamba2-130m"), Some(("state-spaces", "mamba2-130m", None)));
        assert_eq!(parse_name("a/b@v1.0"), Some(("a", "b", Some("v1.0"))));
        for not in ["a", "/a/b", "a/b/c", "../b", "a/..", "a/b@", "a/ b", "./x", "a/b@x/y"] {
            assert_eq!(parse_name(not), None, "{not}");
        }
    }
}
