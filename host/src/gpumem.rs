//! `--max-gpu-mem`: how many tokens one GPU call may hold so that weights, state and buffers fit.
//! Pure arithmetic (tested without a GPU); the CUDA backend allocates exactly what it counts.
use anyhow::{bail, Result};
use stuffed_core::mamba2::Config;

/// Tokens per SSD block on the GPU (`Q` in ptx/mamba2.cu): larger than the core's 64, so fewer block
/// states cross memory; a call's buffers hold whole blocks.
pub const GPU_Q: usize = 256;

/// Device bytes a model needs: fixed, and per token of a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizes {
    /// Weights (matrices in the matmul type, vectors f32).
    pub weights: usize,
    /// The recurrent state (f32).
    pub state: usize,
    /// Activations and scratch per token of a call.
    pub per_token: usize,
    /// One row of logits (f32) and its argmax.
    pub per_logit_row: usize,
    /// One hidden row (the pending row) and the NLL's per-row running sums.
    pub row: usize,
}

impl Sizes {
    /// `el`: bytes per matmul element (4 for f32, 2 for bf16); `untied`: a separate LM head.
    pub fn mamba2(c: &Config, el: usize, untied: bool) -> Sizes {
        let (d, di, nh, cd, nin) = (c.d_model, c.d_inner(), c.n_heads, c.conv_dim(), c.in_proj_rows());
        let mats = (nin * d + d * di) * el;
        let vecs = (d + nin + cd * c.d_conv + cd + 2 * nh + di + di + d) * 4;
        let head = c.vocab_rows * d * el * if untied { 2 } else { 1 };
        Sizes {
            weights: c.n_layer * (mats + vecs) + head + d * 4,
            state: c.paper_state_size() * 4,
            // x, h, zx, u, Δ, cum, y, block states, C·Bᵀ per block, hidden row, token/target/NLL
            per_token: d * 4
                + d.max(di) * el
                + nin * 4
                + cd * 4
                + 2 * nh * 4
                + di * 4
                + c.ssm_len() * 4 / GPU_Q
                + c.n_groups * GPU_Q * 4
                + d * el
                + 12,
            per_logit_row: c.vocab_rows * 4 + 4,
            row: d * el + NLL_ROWS * 12,
        }
    }
}

/// What fits: tokens per call, rows of logits at once, and the bytes that takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    pub chunk: usize,
    pub sub: usize,
    pub bytes: usize,
}

/// Most rows of logits alive at once.
pub const MAX_SUB: usize = 512;
/// Rows per head GEMM in the NLL, which takes the logits in vocab tiles (at most; fewer when the
/// logits buffer is smaller).
pub const NLL_ROWS: usize = 2048;

impl Plan {
    fn of(s: &Sizes, chunk: usize, sub: usize) -> Plan {
        let blocks = chunk.div_ceil(GPU_Q) * GPU_Q;
        let bytes = s.weights + s.state + blocks * s.per_token + s.row + sub * s.per_logit_row;
        Plan { chunk, sub, bytes }
    }
}

/// The largest chunk ≤ `want` (a multiple of the SSD block once ≥ 64) whose buffers fit in
/// `budget` bytes; an error naming the sizes when even one token does not fit.
pub fn plan(s: &Sizes, want: usize, budget: usize) -> Result<Plan> {
    let want = want.max(1);
    let sub_for = |chunk: usize| chunk.clamp(1, MAX_SUB);
    let min = Plan::of(s, 1, 1);
    if min.bytes > budget {
        bail!(
            "the weights ({}) and state ({}) need {} of GPU memory; {} is available (--max-gpu-mem or the \
             free memory)",
            size(s.weights),
            size(s.state),
            size(min.bytes),
            size(budget)
        );
    }
    let mut chunk = if want >= GPU_Q { want / GPU_Q * GPU_Q } else { want };
    while chunk > GPU_Q && Plan::of(s, chunk, sub_for(chunk)).bytes > budget {
        // Halve towards the largest fitting multiple of the block.
        let lo = (chunk / 2).max(GPU_Q) / GPU_Q * GPU_Q;
        if Plan::of(s, lo, sub_for(lo)).bytes <= budget {
            let spare = budget - Plan::of(s, lo, sub_for(lo)).bytes;
            let extra = spare / (s.per_token * GPU_Q) * GPU_Q;
            chunk = (lo + extra).min(chunk - GPU_Q);
            while Plan::of(s, chunk, sub_for(chunk)).bytes > budget {
                chunk -= GPU_Q;
            }
            break;
        }
        chunk = lo;
    }
    while chunk > 1 && Plan::of(s, chunk, sub_for(chunk)).bytes > budget {
        chunk = (chunk / 2).max(1);
    }
    let mut sub = sub_for(chunk);
    while sub > 1 && Plan::of(s, chunk, sub).bytes > budget {
        sub /= 2;
    }
    Ok(Plan::of(s, chunk, sub))
}

/// `b` bytes in GiB, MiB or KiB, whichever reads best.
fn size(b: usize) -> String {
    let units = [("GiB", 1usize << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    let (name, unit) = units.into_iter().find(|&(_, u)| b >= u).unwrap_or(("KiB", 1 << 10));
    format!("{:.2} {name}", b as f64 / unit as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mamba-2 2.7B's shape (FORMATS.md: d 2560, 64 layers, 80 heads × 64, N 128, vocab 50,288).
    fn big() -> Config {
        crate::synth::mamba2_config("2.7b").unwrap()
    }

    #[test]
    fn sizes_count_the_weights_of_2_7b() {
        let s = Sizes::mamba2(&big(), 2, false);
        // 2.7B parameters in bf16 ≈ 5.4 GB.
        assert!((5.0e9..5.8e9).contains(&(s.weights as f64)), "{}", s.weights);
        assert_eq!(s.state, big().paper_state_size() * 4);
    }

    #[test]
    fn plan_fits_the_budget_and_shrinks_with_it() {
        let s = Sizes::mamba2(&big(), 2, false);
        let roomy = plan(&s, 65536, 80 << 30).unwrap();
        assert_eq!((roomy.chunk, roomy.sub), (65536, MAX_SUB));
        assert!(roomy.bytes <= 80 << 30);
        let tight_budget = s.weights + s.state + (4 << 30);
        let tight = plan(&s, 65536, tight_budget).unwrap();
        assert!(tight.chunk < 65536 && tight.chunk >= GPU_Q && tight.chunk.is_multiple_of(GPU_Q), "{tight:?}");
        assert!(tight.bytes <= tight_budget);
        // The next block up would not fit: the plan takes all the room it can.
        assert!(Plan::of(&s, tight.chunk + GPU_Q, tight.sub).bytes > tight_budget);
        // Fewer tokens asked for than fit: exactly those.
        assert_eq!(plan(&s, 1000, 80 << 30).unwrap().chunk, 768);
        assert_eq!(plan(&s, 1, 80 << 30).unwrap().chunk, 1);
    }

    #[test]
    fn weights_that_do_not_fit_are_one_clear_error() {
        let s = Sizes::mamba2(&big(), 2, false);
        let e = plan(&s, 4096, 4 << 30).unwrap_err().to_string();
        assert!(e.contains("GiB of GPU memory") && e.contains("4.00 GiB is available"), "{e}");
        // Tiny models read in smaller units, not as 0.00 GiB.
        let tiny = Sizes { weights: 300 << 10, state: 20 << 10, per_token: 1000, per_logit_row: 1028, row: 1 << 10 };
        let e = plan(&tiny, 64, 100 << 10).unwrap_err().to_string();
        assert!(e.contains("(300.00 KiB)") && e.contains("100.00 KiB is available"), "{e}");
    }
}
