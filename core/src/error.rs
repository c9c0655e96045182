//! The one error type of the crate.
//!
//! Every op validates its configuration and the shapes of its inputs before it
//! computes anything, and reports the first problem as an [`Error`] whose
//! message names the input or parameter, the value it got, and the rule it
//! broke. Nothing here allocates, so the same errors exist under `no_std`.

use core::fmt;

/// A short, inline copy of an option name that failed to parse (no allocation).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ShortStr {
    buf: [u8; 40],
    len: u8,
}

impl ShortStr {
    /// Copies up to 40 bytes of `s` (cut at a char boundary, `…` appended when cut).
    pub fn new(s: &str) -> Self {
        let mut buf = [0u8; 40];
        let mut end = s.len().min(37);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        buf[..end].copy_from_slice(&s.as_bytes()[..end]);
        let mut len = end;
        if end < s.len() {
            buf[end..end + 3].copy_from_slice("…".as_bytes());
            len += 3;
        }
        ShortStr {
            buf,
            len: len as u8,
        }
    }

    /// The stored text.
    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len as usize]).unwrap_or("?")
    }
}

impl fmt::Debug for ShortStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for ShortStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an op refused its input. Every variant's doc is the condition that
/// triggers it.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// An input (or output buffer) has `got` elements where the op's shape
    /// requires `expected` (for example `log_prob` of `batch·seq` elements, or
    /// `index` with one id per row).
    ShapeMismatch {
        /// The input or buffer, named as in the op's signature.
        input: &'static str,
        /// The length the op requires.
        expected: usize,
        /// The length it got.
        got: usize,
    },
    /// A parameter lies outside its valid range, e.g. `clip_ratio_c ≤ 1`,
    /// `label_smoothing ∉ [0, 0.5)`, a negative `epsilon`.
    OutOfRange {
        /// The parameter, named as the peers name it.
        param: &'static str,
        /// The value received.
        value: f64,
        /// The rule it broke, e.g. `"must be > 1"`.
        rule: &'static str,
    },
    /// An input that must hold at least one element (or one row) is empty.
    Empty {
        /// The input.
        input: &'static str,
    },
    /// A group (identified by its id) has fewer members than the estimator
    /// needs (for example pass@k with a singleton group).
    EmptyGroup {
        /// The group id.
        group: i64,
        /// How many members the estimator needs at least.
        needed: usize,
    },
    /// A string did not name any known option.
    UnknownOption {
        /// What was being parsed, e.g. `"loss aggregation mode"`.
        kind: &'static str,
        /// The text received.
        got: ShortStr,
        /// The accepted names, comma-separated.
        expected: &'static str,
    },
    /// An input holds NaN or ±inf at a position where the op forbids it (an
    /// unmasked position of an input that must be finite).
    NonFinite {
        /// The input.
        input: &'static str,
        /// The flat index of the first offending element.
        index: usize,
    },
    /// Inputs are individually well-formed but inconsistent, e.g. a sequence
    /// length beyond the row length, or a required optional input missing.
    Invalid {
        /// The input or parameter.
        input: &'static str,
        /// The rule it broke.
        rule: &'static str,
    },
}

impl Error {
    /// Builds [`Error::UnknownOption`].
    pub fn unknown_option(kind: &'static str, got: &str, expected: &'static str) -> Self {
        Error::UnknownOption {
            kind,
            got: ShortStr::new(got),
            expected,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::ShapeMismatch { input, expected, got } => write!(
                f,
                "shape mismatch: `{input}` has {got} elements, but the op requires {expected}"
            ),
            Error::OutOfRange { param, value, rule } => {
                write!(f, "parameter `{param}` = {value} is out of range: it {rule}")
            }
            Error::Empty { input } => write!(f, "`{input}` is empty, but the op needs at least one element"),
            Error::EmptyGroup { group, needed } => write!(
                f,
                "group {group} has fewer than {needed} members, which this estimator requires"
            ),
            Error::UnknownOption { kind, got, expected } => {
                write!(f, "unknown {kind} {got:?}; expected one of: {expected}")
            }
            Error::NonFinite { input, index } => write!(
                f,
                "`{input}` holds a non-finite value at unmasked position {index}, where the op requires a finite one"
            ),
            Error::Invalid { input, rule } => write!(f, "invalid `{input}`: {rule}"),
        }
    }
}

impl core::error::Error for Error {}

/// `Err(ShapeMismatch)` unless `got == expected`.
#[inline]
pub fn check_len(input: &'static str, got: usize, expected: usize) -> Result<(), Error> {
    if got == expected {
        Ok(())
    } else {
        Err(Error::ShapeMismatch {
            input,
            expected,
            got,
        })
    }
}

/// `Err(OutOfRange)` unless `ok`.
#[inline]
pub fn check_param(
    ok: bool,
    param: &'static str,
    value: f64,
    rule: &'static str,
) -> Result<(), Error> {
    if ok {
        Ok(())
    } else {
        Err(Error::OutOfRange { param, value, rule })
    }
}

/// `Err(OutOfRange)` unless `value` is finite and `≥ 0` (the most common
/// range rule: ε, β, coefficients, weights).
#[inline]
pub fn check_finite_nonneg(param: &'static str, value: f64) -> Result<(), Error> {
    check_param(
        value.is_finite() && value >= 0.0,
        param,
        value,
        "must be finite and ≥ 0",
    )
}
