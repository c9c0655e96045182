//! The shape of a token batch.

/// The shape of a row-major `[batch, seq]` token matrix (`batch` sequences of
/// `seq` padded positions). Slices passed to the ops hold `batch · seq`
/// elements, row `i` at `[i·seq, (i+1)·seq)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Dims {
    /// Number of sequences (rows).
    pub batch: usize,
    /// Padded length of each sequence (columns).
    pub seq: usize,
}

impl Dims {
    /// `[batch, seq]`.
    pub const fn new(batch: usize, seq: usize) -> Self {
        Dims { batch, seq }
    }
    /// `batch · seq`.
    pub const fn len(&self) -> usize {
        self.batch * self.seq
    }
    /// Whether the matrix holds no element.
    pub const fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The flat range of row `i`.
    pub const fn row(&self, i: usize) -> core::ops::Range<usize> {
        i * self.seq..(i + 1) * self.seq
    }
}
