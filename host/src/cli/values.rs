//! Typed flag values, each parsed by clap (`value_parser`), so a bad value is refused at parse
//! time naming its flag, before any model is loaded, and the commands get types, not strings.
use crate::forget::ForgetSpec;
use anyhow::{anyhow, bail, Result};

/// `--lengths`: prompt lengths in tokens (`1k,2k`, `1k..32k:1k`, `1k..1m:x2`).
#[derive(Clone, Debug)]
pub struct Lengths(pub Vec<u64>);

pub fn lengths(s: &str) -> Result<Lengths> {
    parse_lengths(s).map(Lengths)
}

/// `--shard k/n`: the share k of n (1 ≤ k ≤ n).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub k: usize,
    pub n: usize,
}

impl Shard {
    /// As the options record it: `[k, n]`.
    pub fn pair(self) -> (usize, usize) {
        (self.k, self.n)
    }
}

pub fn shard(s: &str) -> Result<Shard> {
    parse_shard(s).map(|(k, n)| Shard { k, n })
}

/// `--snapshot-at`: positions (tokens consumed), in the syntax of `--lengths`.
#[derive(Clone, Debug)]
pub struct Positions(pub Vec<u64>);

pub fn positions(s: &str) -> Result<Positions> {
    parse_lengths(s).map(Positions)
}

/// `--max-gpu-mem`: bytes (`40G`, `512M`, `1.5GiB`).
pub fn bytes(s: &str) -> Result<usize> {
    crate::backend::parse_bytes(s)
}

/// `--forget`: a training-free forgetting method (resolved against `--train-len` by the command).
pub fn forget(s: &str) -> Result<ForgetSpec> {
    ForgetSpec::parse(s)
}

/// Parses `1k,2k,8k`, `1k..32k:1k` (step) and `1k..1m:x2` (factor); `k` = 1,024, `m` = 1,048,576.
pub fn parse_lengths(s: &str) -> Result<Vec<u64>> {
    use crate::text::parse_count as num;
    let mut out = Vec::new();
    for part in s.split(',').filter(|p| !p.trim().is_empty()) {
        match part.split_once("..") {
            None => out.push(num(part)?),
            Some((a, rest)) => {
                let (b, step) =
                    rest.split_once(':').ok_or_else(|| anyhow!("range '{part}' needs a step: A..B:STEP or A..B:xF"))?;
                let (a, b) = (num(a)?, num(b)?);
                if b < a {
                    bail!("range '{part}' is empty");
                }
                let mut v = a;
                if let Some(f) = step.trim().strip_prefix('x') {
                    let f: u64 = f.parse().map_err(|_| anyhow!("'{step}' is not a factor such as x2"))?;
                    if f < 2 {
                        bail!("factor in '{part}' must be at least 2");
                    }
                    while v <= b {
                        out.push(v);
                        v *= f;
                    }
                } else {
                    let st = num(step)?;
                    while v <= b {
                        out.push(v);
                        v += st;
                    }
                }
            }
        }
    }
    if out.is_empty() {
        bail!("no lengths in '{s}'");
    }
    Ok(out)
}

/// `k/n`: this shard takes the (length, sample) pairs whose running index ≡ k−1 (mod n).
pub fn parse_shard(s: &str) -> Result<(usize, usize)> {
    let (k, n) = s.split_once('/').ok_or_else(|| anyhow!("--shard takes k/n, e.g. 2/8"))?;
    let (k, n): (usize, usize) = (k.trim().parse()?, n.trim().parse()?);
    if k == 0 || n == 0 || k > n {
        bail!("--shard {s}: need 1 ≤ k ≤ n");
    }
    Ok((k, n))
}
