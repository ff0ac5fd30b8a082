//! SplitMix64: the one seeded generator behind synthetic weights, random token ids, the fuzzer's
//! cases, passkey keys and the bootstrap — the same numbers on every machine.

/// A SplitMix64 stream (Steele, Lea & Flood 2014): state advanced by the golden gamma, each output
/// the state through the mix function.
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` by the remainder (its bias, < n / 2⁶⁴, does not matter here); 0 for n = 0.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// Uniform in [lo, hi) from the top 24 bits (every value an f32 step of (hi − lo) / 2²⁴).
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32)
    }

    /// One element of `v` (non-empty), uniformly.
    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The known first outputs of SplitMix64 from seed 1234567 (Vigna's reference splitmix64.c), so
    /// a typo in a constant fails.
    #[test]
    fn matches_the_reference_stream() {
        let mut r = SplitMix64::new(1234567);
        let got: Vec<u64> = (0..5).map(|_| r.next_u64()).collect();
        assert_eq!(
            got,
            [6457827717110365317, 3203168211198807973, 9817491932198370423, 4593380528125082431, 16408922859458223821]
        );
    }
}
