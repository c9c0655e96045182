//! A character tokenizer with added special tokens, for the teaching models.
//!
//! Real LLM tokenizers add their chat and reasoning markers as *single*
//! tokens (`<think>` is one id in DeepSeek-R1's vocabulary); this tokenizer
//! does the same on top of a fixed alphabet, so a tiny model sees
//! `<think>` as one symbol instead of seven characters.
//!
//! Ids: `0` = [`PAD`](CharTokenizer::PAD), `1` = [`EOS`](CharTokenizer::EOS),
//! then the special tokens in the order given, then the alphabet.
//!
//! ```
//! use posttrain_trainers::tokenizer::CharTokenizer;
//! let tok = CharTokenizer::new("0123456789+=", &["<answer>", "</answer>"])?;
//! let ids = tok.encode("1+2=<answer>3</answer>")?;
//! assert_eq!(ids.len(), 7);
//! assert_eq!(tok.decode(&ids), "1+2=<answer>3</answer>");
//! # Ok::<(), posttrain_trainers::TrainError>(())
//! ```

use crate::TrainError;

/// Character-level tokenizer with special tokens (see the [module docs](self)).
#[derive(Debug, Clone, PartialEq)]
pub struct CharTokenizer {
    specials: Vec<String>,
    alphabet: Vec<char>,
}

impl CharTokenizer {
    /// Padding id (never predicted: masked out of every loss).
    pub const PAD: u32 = 0;
    /// End-of-sequence id: generation stops after sampling it.
    pub const EOS: u32 = 1;

    /// A tokenizer over `alphabet` plus `specials` (each at least two
    /// characters, matched greedily before single characters).
    ///
    /// # Errors
    ///
    /// [`TrainError::Config`] for a repeated character or special token, or
    /// a special token shorter than two characters.
    pub fn new(alphabet: &str, specials: &[&str]) -> Result<Self, TrainError> {
        let mut chars: Vec<char> = Vec::new();
        for c in alphabet.chars() {
            if chars.contains(&c) {
                return Err(TrainError::config(format!(
                    "CharTokenizer: character {c:?} appears twice in the alphabet"
                )));
            }
            chars.push(c);
        }
        let mut sp: Vec<String> = Vec::new();
        for s in specials {
            if s.chars().count() < 2 || sp.iter().any(|t| t == s) {
                return Err(TrainError::config(format!(
                    "CharTokenizer: special token {s:?} is repeated or shorter than 2 characters"
                )));
            }
            sp.push((*s).to_string());
        }
        Ok(CharTokenizer {
            specials: sp,
            alphabet: chars,
        })
    }

    /// The number of ids (PAD, EOS, specials, alphabet).
    pub fn vocab_size(&self) -> usize {
        2 + self.specials.len() + self.alphabet.len()
    }

    /// The id of a special token.
    ///
    /// # Errors
    ///
    /// [`TrainError::Config`] if it is not one of this tokenizer's specials.
    pub fn special(&self, token: &str) -> Result<u32, TrainError> {
        self.specials
            .iter()
            .position(|s| s == token)
            .map(|i| 2 + i as u32)
            .ok_or_else(|| TrainError::config(format!("CharTokenizer: no special token {token:?}")))
    }

    /// Encodes `text` (specials matched longest-first, then characters).
    ///
    /// # Errors
    ///
    /// [`TrainError::Config`] for a character outside the alphabet.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TrainError> {
        let mut ids = Vec::with_capacity(text.len());
        let mut rest = text;
        'outer: while let Some(c) = rest.chars().next() {
            let mut best: Option<(usize, usize)> = None;
            for (i, s) in self.specials.iter().enumerate() {
                if rest.starts_with(s.as_str()) && best.is_none_or(|(_, l)| s.len() > l) {
                    best = Some((i, s.len()));
                }
            }
            if let Some((i, len)) = best {
                ids.push(2 + i as u32);
                rest = &rest[len..];
                continue 'outer;
            }
            match self.alphabet.iter().position(|&a| a == c) {
                Some(i) => ids.push((2 + self.specials.len() + i) as u32),
                None => {
                    return Err(TrainError::config(format!(
                        "CharTokenizer: character {c:?} in {text:?} is not in the alphabet"
                    )))
                }
            }
            rest = &rest[c.len_utf8()..];
        }
        Ok(ids)
    }

    /// Decodes ids to text; PAD and EOS (and ids out of range) are skipped.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut out = String::new();
        for &id in ids {
            let id = id as usize;
            if id < 2 {
                continue;
            }
            if let Some(s) = self.specials.get(id - 2) {
                out.push_str(s);
            } else if let Some(c) = self.alphabet.get(id - 2 - self.specials.len()) {
                out.push(*c);
            }
        }
        out
    }
}
