//! A deterministic xorshift for the randomised unit tests: no extra dependency, and the same
//! inputs on every run.

pub(crate) struct Xorshift(pub(crate) u64);

impl Xorshift {
    /// The seed the randomised tests start from.
    pub(crate) fn new() -> Xorshift {
        Xorshift(0x9e37_79b9_7f4a_7c15)
    }

    /// A number below `n` (0 when `n` is 0).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n.max(1) as u64) as usize
    }
}
