//! `--state-dtype`: the recurrent state kept in bf16 or f16 between forward calls, as serving stacks
//! store it, to measure how far that drifts. All arithmetic stays f32: the state is rounded (to
//! nearest, ties to even, through `half`) after every token (`--state-round token`, decode-like: the
//! token-by-token recurrence) or after every forward call (`--state-round chunk`, prefill-like).
//! Which values: every (layer, head) recurrent matrix (`Recurrent::head_state`, generic over the
//! families); with `--state-dtype-all` the whole state (conv / token-shift values, window caches).
use anyhow::{bail, Result};
use half::{bf16, f16};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::ops::Range;
use stuffed_core::Recurrent;

/// The type the state is stored in between calls.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StateDtype {
    #[default]
    F32,
    Bf16,
    F16,
}

/// Where the state is rounded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StateRound {
    /// After every token (decode-like; runs the token-by-token recurrence).
    #[default]
    Token,
    /// After every forward call of `--chunk` tokens (prefill-like).
    Chunk,
}

/// A run's state storage: dtype, rounding point, and whether conv / token-shift values round too.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatePrecision {
    pub dtype: StateDtype,
    pub round: StateRound,
    /// `--state-dtype-all`: every state value, not only the recurrent matrices.
    pub all: bool,
}

impl fmt::Display for StateDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StateDtype::F32 => "f32",
            StateDtype::Bf16 => "bf16",
            StateDtype::F16 => "f16",
        })
    }
}

impl fmt::Display for StateRound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StateRound::Token => "token",
            StateRound::Chunk => "chunk",
        })
    }
}

impl fmt::Display for StatePrecision {
    /// `f32`, or `bf16/token`, `f16/chunk/all`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_f32() {
            return f.write_str("f32");
        }
        write!(f, "{}/{}{}", self.dtype, self.round, if self.all { "/all" } else { "" })
    }
}

impl StatePrecision {
    /// The state as the model computes it: nothing rounded.
    pub fn is_f32(&self) -> bool {
        self.dtype == StateDtype::F32
    }

    /// Refuses a rounded state on a device that keeps its own (the CUDA backend).
    pub fn check_cpu(&self, device: crate::backend::Device) -> Result<()> {
        if !self.is_f32() && device != crate::backend::Device::Cpu {
            bail!(
                "--state-dtype {}: CPU only (the CUDA backend keeps its state in f32); drop --device cuda",
                self.dtype
            );
        }
        Ok(())
    }
}

/// `x` rounded to `dtype` (nearest, ties to even) and back to f32.
#[inline]
pub fn round_one(dtype: StateDtype, x: f32) -> f32 {
    match dtype {
        StateDtype::F32 => x,
        StateDtype::Bf16 => bf16::from_f32(x).to_f32(),
        StateDtype::F16 => f16::from_f32(x).to_f32(),
    }
}

/// Rounds `v` in place to `dtype`; the index of the first finite value that overflowed to an
/// infinity, if any (the values past it are left as they were).
pub fn round_slice(dtype: StateDtype, v: &mut [f32]) -> Option<usize> {
    if dtype == StateDtype::F32 {
        return None;
    }
    for (i, x) in v.iter_mut().enumerate() {
        let r = round_one(dtype, *x);
        if r.is_infinite() && x.is_finite() {
            return Some(i);
        }
        *x = r;
    }
    None
}

/// The state ranges a precision rounds for `net`: the recurrent matrix of every (layer, head),
/// merged and sorted, or with `all` the whole state but its counters (`Recurrent::counters`: a
/// window's ring position, RetNet's positions: integers that bf16 holds exactly only to 256).
pub fn ranges(net: &dyn Recurrent, all: bool) -> Vec<Range<usize>> {
    if all {
        let c = net.counters();
        let mut skip: Vec<Range<usize>> = c.layers.map_or(Vec::new(), |r| r.ranges().collect());
        skip.push(c.tail);
        let mut out = Vec::new();
        let mut at = 0;
        for s in skip.into_iter().filter(|s| !s.is_empty()) {
            out.push(at..s.start);
            at = s.end;
        }
        out.push(at..net.state_len());
        out.retain(|r| !r.is_empty());
        return out;
    }
    let mut r: Vec<Range<usize>> =
        (0..net.n_layer()).flat_map(|l| (0..net.n_heads()).map(move |h| net.head_state(l, h))).collect();
    r.sort_by_key(|r| r.start);
    let mut out: Vec<Range<usize>> = Vec::with_capacity(r.len());
    for x in r {
        match out.last_mut() {
            Some(last) if x.start <= last.end => last.end = last.end.max(x.end),
            _ => out.push(x),
        }
    }
    out
}

/// The layer whose state holds element `i` (its recurrent matrix or conv / token-shift values).
pub fn layer_of(net: &dyn Recurrent, i: usize) -> Option<usize> {
    (0..net.n_layer()).find(|&l| {
        (0..net.n_heads()).any(|h| {
            net.head_state(l, h).contains(&i)
                || net.conv_state(l, h).is_some_and(|r| r.ranges().any(|run| run.contains(&i)))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every class of f32 (zeros, subnormals, ties, the largest values, infinities, NaN) and a sweep
    /// of bit patterns round exactly as a direct `half` conversion does.
    #[test]
    fn rounding_is_halfs_bit_for_bit() {
        let mut xs: Vec<f32> = vec![
            0.0,
            -0.0,
            1.0,
            f32::MIN_POSITIVE,
            f32::MIN_POSITIVE / 3.0,
            f32::MAX,
            f32::MIN,
            65504.0,
            65519.0,
            -65519.0,
            6.0e-8,
            f32::from_bits(0x3f80_8000), // a bf16 tie, rounds to even (down)
            f32::from_bits(0x3f81_8000), // a bf16 tie, rounds to even (up)
            f32::from_bits(0x3f80_1000), // an f16 tie
        ];
        let mut s = 0x9e37_79b9u32;
        for _ in 0..200_000 {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            xs.push(f32::from_bits(s));
        }
        for &x in xs.iter().filter(|x| x.is_finite()) {
            assert_eq!(round_one(StateDtype::Bf16, x).to_bits(), bf16::from_f32(x).to_f32().to_bits(), "{x:e}");
            assert_eq!(round_one(StateDtype::F16, x).to_bits(), f16::from_f32(x).to_f32().to_bits(), "{x:e}");
            assert_eq!(round_one(StateDtype::F32, x).to_bits(), x.to_bits());
        }
        // Ties go to even: 1 + 2^-8 is halfway between bf16 1 and 1 + 2^-7.
        assert_eq!(round_one(StateDtype::Bf16, f32::from_bits(0x3f80_8000)), 1.0);
        assert_eq!(round_one(StateDtype::Bf16, f32::from_bits(0x3f81_8000)).to_bits(), 0x3f82_0000);
        let mut v: Vec<f32> = xs.iter().copied().filter(|x| x.abs() < 6.0e4).collect();
        let want: Vec<u32> = v.iter().map(|&x| f16::from_f32(x).to_f32().to_bits()).collect();
        assert_eq!(round_slice(StateDtype::F16, &mut v), None);
        assert_eq!(v.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), want);
    }

    /// A finite value past f16's range is reported (its index), not turned into an infinity.
    #[test]
    fn f16_overflow_is_found() {
        let mut v = vec![1.0f32, -70000.0, 2.0];
        assert_eq!(round_slice(StateDtype::F16, &mut v), Some(1));
        assert_eq!(v[1], -70000.0);
        let mut v = vec![1.0f32, 65519.0, 2.0];
        assert_eq!(round_slice(StateDtype::F16, &mut v), None);
        assert_eq!(v[1], 65504.0);
        let mut v = vec![f32::MAX];
        assert_eq!(round_slice(StateDtype::Bf16, &mut v), Some(0), "f32::MAX rounds past bf16's largest");
    }
}
