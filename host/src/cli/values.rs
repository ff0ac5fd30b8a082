//! Typed flag values, each parsed by clap (`value_parser`), so a bad value is refused at parse
//! time naming its flag, before any model is loaded, and the commands get types, not strings.
use crate::forget::ForgetSpec;
use anyhow::Result;

/// `--lengths`: prompt lengths in tokens (`1k,2k`, `1k..32k:1k`, `1k..1m:x2`).
#[derive(Clone, Debug)]
pub struct Lengths(pub Vec<u64>);

pub fn lengths(s: &str) -> Result<Lengths> {
    crate::eval::passkey::parse_lengths(s).map(Lengths)
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
    crate::eval::passkey::parse_shard(s).map(|(k, n)| Shard { k, n })
}

/// `--snapshot-at`: positions (tokens consumed), in the syntax of `--lengths`.
#[derive(Clone, Debug)]
pub struct Positions(pub Vec<u64>);

pub fn positions(s: &str) -> Result<Positions> {
    crate::eval::passkey::parse_lengths(s).map(Positions)
}

/// `--max-gpu-mem`: bytes (`40G`, `512M`, `1.5GiB`).
pub fn bytes(s: &str) -> Result<usize> {
    crate::score::parse_bytes(s)
}

/// `--forget`: a training-free forgetting method (resolved against `--train-len` by the command).
pub fn forget(s: &str) -> Result<ForgetSpec> {
    ForgetSpec::parse(s)
}
