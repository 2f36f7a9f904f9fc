//! Random numbers: splitmix64 (`util::prng`) to seed, xoshiro256** to draw. Both fully specified, so streams are
//! the same on every platform and with every crate version.

use super::*;

#[derive(Debug, Clone)]
pub(super) struct Rng {
    pub(super) s: [u64; 4],
}

impl Rng {
    pub(super) fn new(seed: u64) -> Rng {
        let mut sm = SplitMix::new(seed);
        Rng {
            s: [sm.next_u64(), sm.next_u64(), sm.next_u64(), sm.next_u64()],
        }
    }

    /// An independent stream for one row and purpose.
    pub(super) fn for_row(seed: u64, idx: u64, stream: u64) -> Rng {
        let b = SplitMix::new(seed).next_u64() ^ idx;
        let c = SplitMix::new(b).next_u64() ^ stream;
        Rng::new(SplitMix::new(c).next_u64())
    }

    pub(super) fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in `0..n` (multiply-shift; the bias is below 2^-59 for the small n used here).
    pub(super) fn below(&mut self, n: usize) -> usize {
        debug_assert!(n > 0);
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Uniform in `[0, 1)` with 24 random bits.
    pub(super) fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / 16_777_216.0)
    }

    pub(super) fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.unit()
    }

    pub(super) fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }

    /// The first `k` elements of a uniformly random permutation of `0..n`.
    pub(super) fn sample(&mut self, n: usize, k: usize) -> Vec<usize> {
        let mut v: Vec<usize> = (0..n).collect();
        for i in 0..k.min(n) {
            let j = i + self.below(n - i);
            v.swap(i, j);
        }
        v.truncate(k.min(n));
        v
    }
}
