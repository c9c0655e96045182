//! Built-in tasks, generated in code (nothing is downloaded).
//!
//! ## Arithmetic with a verifiable answer ([`Arithmetic`])
//!
//! Prompts `"47+85="` (operands zero-padded to a fixed width, so every
//! prompt has the same length); the demonstration follows DeepSeek-R1-Zero's
//! template with column addition as the reasoning,
//! `<think>7+5=12,4+8+1=13</think><answer>132</answer>` (units column
//! first, each later column adding the carry), with `<think>`, `</think>`,
//! `<answer>`, `</answer>` single tokens. The problems are split once, by
//! seed, into training and held-out sets: a model that learned the
//! digit-level procedure answers held-out problems as well as training ones,
//! one that memorised the training pairs does not.
//!
//! The reward is R1-Zero's rule-based reward ([`R1ZeroReward`]): an
//! *accuracy* reward (1 when the text inside `<answer>…</answer>` is the
//! correct number) plus a *format* reward (1 when the completion is exactly
//! `<think>…</think><answer>…</answer>`), weighted as TRL's `reward_weights`.
//!
//! ## Sorting digits, a preference task with a known ground truth ([`Sorting`])
//!
//! Prompts are `k` random digits and `=` (`"31420="`, all of length `k + 1`);
//! the ideal completion is the digits sorted ascending (`"01234"`, then EOS).
//! Unlike human preference data, the preference here has a *ground truth*:
//! [`Sorting::quality`] is 0 for a completion that is not a permutation of the
//! prompt's digits and otherwise `1 − inversions / max_inversions` (1 when
//! sorted, 0 when sorted descending). [`Sorting::pair`] draws a preference
//! pair `(chosen, rejected)` whose chosen completion has the strictly higher
//! quality — sometimes the sorted answer against a corruption (adjacent
//! swaps, a shuffle, a copy of the prompt, a wrong or missing digit),
//! sometimes two imperfect answers — so a reward model trained on the pairs
//! learns a graded score, and DPO's implicit reward can be checked against
//! the truth. The prompts are split once, by seed, into training and
//! held-out sets.

use burn::tensor::Device;
use serde::Serialize;

use crate::dpo::PreferencePair;
use crate::generate::{generate, SamplingConfig};
use crate::model::Policy;
use crate::tokenizer::CharTokenizer;
use crate::{Rng, TrainError};

/// The special tokens of the reasoning template.
pub const THINK_TOKENS: [&str; 4] = ["<think>", "</think>", "<answer>", "</answer>"];

/// One arithmetic problem `a + b`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Problem {
    /// First operand.
    pub a: u32,
    /// Second operand.
    pub b: u32,
}

impl Problem {
    /// The correct answer.
    pub fn answer(&self) -> u32 {
        self.a + self.b
    }
}

/// R1-Zero's rule-based reward: `accuracy_weight · accuracy + format_weight · format`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct R1ZeroReward {
    /// Weight of the accuracy reward (TRL `reward_weights[0]`).
    pub accuracy_weight: f64,
    /// Weight of the format reward (TRL `reward_weights[1]`).
    pub format_weight: f64,
}

impl Default for R1ZeroReward {
    fn default() -> Self {
        R1ZeroReward {
            accuracy_weight: 1.0,
            format_weight: 0.2,
        }
    }
}

/// What one completion scored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Score {
    /// 1 when the answer is correct.
    pub accuracy: f64,
    /// 1 when the completion follows the template exactly.
    pub format: f64,
    /// The weighted sum.
    pub reward: f64,
}

impl R1ZeroReward {
    /// Scores `completion` (text, EOS stripped) against `answer`.
    pub fn score(&self, completion: &str, answer: u32) -> Score {
        let format = follows_template(completion);
        let accuracy =
            extract_answer(completion).is_some_and(|a| a.trim().parse::<u32>() == Ok(answer));
        let (accuracy, format) = (f64::from(accuracy as u8), f64::from(format as u8));
        Score {
            accuracy,
            format,
            reward: self.accuracy_weight * accuracy + self.format_weight * format,
        }
    }
}

/// The text inside the first `<answer>…</answer>`.
pub fn extract_answer(text: &str) -> Option<&str> {
    let start = text.find("<answer>")? + "<answer>".len();
    let len = text[start..].find("</answer>")?;
    Some(&text[start..start + len])
}

/// `^<think>[^<]*</think><answer>[^<]*</answer>$`.
pub fn follows_template(text: &str) -> bool {
    let inner = |s: &str, open: &str, close: &str| -> Option<usize> {
        let rest = s.strip_prefix(open)?;
        let end = rest.find(close)?;
        (!rest[..end].contains('<')).then_some(open.len() + end + close.len())
    };
    let Some(n) = inner(text, "<think>", "</think>") else {
        return false;
    };
    inner(&text[n..], "<answer>", "</answer>").is_some_and(|m| n + m == text.len())
}

/// Addition problems with a held-out split (see the [module docs](self)).
#[derive(Debug, Clone)]
pub struct Arithmetic {
    /// The tokenizer (digits, `+`, `=`, and the template's special tokens).
    pub tokenizer: CharTokenizer,
    /// Training problems.
    pub train: Vec<Problem>,
    /// Held-out problems.
    pub test: Vec<Problem>,
    /// The reward.
    pub reward: R1ZeroReward,
    width: usize,
}

impl Arithmetic {
    /// Every `a + b` with `a, b ≤ max_operand`, shuffled by `seed`, with a
    /// `test_fraction` held out.
    ///
    /// # Errors
    ///
    /// [`TrainError::Config`] for `test_fraction ∉ (0, 1)` or a split that
    /// leaves either side empty.
    pub fn new(max_operand: u32, test_fraction: f64, seed: u64) -> Result<Self, TrainError> {
        if !(test_fraction > 0.0 && test_fraction < 1.0) {
            return Err(TrainError::config(format!(
                "Arithmetic: test_fraction = {test_fraction} must be in (0, 1)"
            )));
        }
        let mut all: Vec<Problem> = (0..=max_operand)
            .flat_map(|a| (0..=max_operand).map(move |b| Problem { a, b }))
            .collect();
        Rng::new(seed).shuffle(&mut all);
        let n_test = (all.len() as f64 * test_fraction).round() as usize;
        if n_test == 0 || n_test == all.len() {
            return Err(TrainError::config(
                "Arithmetic: the split leaves a side empty",
            ));
        }
        let train = all.split_off(n_test);
        Ok(Arithmetic {
            tokenizer: CharTokenizer::new("0123456789+=,", &THINK_TOKENS)?,
            train,
            test: all,
            reward: R1ZeroReward::default(),
            width: max_operand.to_string().len(),
        })
    }

    /// `"07+15="`.
    pub fn prompt_text(&self, p: Problem) -> String {
        format!("{:0w$}+{:0w$}=", p.a, p.b, w = self.width)
    }

    /// The prompt's token ids.
    pub fn prompt(&self, p: Problem) -> Vec<u32> {
        self.tokenizer
            .encode(&self.prompt_text(p))
            .expect("the prompt alphabet is the tokenizer's")
    }

    /// The demonstration completion: column addition, then the answer
    /// (`<think>7+5=12,4+8+1=13</think><answer>132</answer>` for 47 + 85).
    pub fn demonstration_text(&self, p: Problem) -> String {
        let mut steps = Vec::with_capacity(self.width);
        let (mut a, mut b, mut carry) = (p.a, p.b, 0);
        for col in 0..self.width {
            let (x, y) = (a % 10, b % 10);
            let s = x + y + carry;
            steps.push(if col == 0 {
                format!("{x}+{y}={s}")
            } else {
                format!("{x}+{y}+{carry}={s}")
            });
            carry = s / 10;
            a /= 10;
            b /= 10;
        }
        format!(
            "<think>{}</think><answer>{}</answer>",
            steps.join(","),
            p.answer()
        )
    }

    /// The demonstration's token ids, EOS appended.
    pub fn demonstration(&self, p: Problem) -> Vec<u32> {
        let mut ids = self
            .tokenizer
            .encode(&self.demonstration_text(p))
            .expect("the demonstration alphabet is the tokenizer's");
        ids.push(CharTokenizer::EOS);
        ids
    }

    /// `n` (prompt, demonstration) pairs of training problems drawn
    /// uniformly with replacement: an SFT batch.
    pub fn demonstration_batch(&self, n: usize, rng: &mut Rng) -> Vec<(Vec<u32>, Vec<u32>)> {
        (0..n)
            .map(|_| {
                let p = self.train[rng.below(self.train.len())];
                (self.prompt(p), self.demonstration(p))
            })
            .collect()
    }

    /// Prompt length in tokens.
    pub fn prompt_len(&self) -> usize {
        2 * self.width + 2
    }

    /// The longest demonstration, EOS included (a sensible `max_new_tokens`).
    pub fn max_completion_len(&self) -> usize {
        let w = self.width;
        // <think> "x+y=ss" then ",x+y+c=ss" per further column </think>
        // <answer> up to w + 1 digits </answer> EOS
        1 + 6 + 9 * (w - 1) + 1 + 1 + (w + 1) + 1 + 1
    }

    /// Scores a completion (token ids, EOS stripped) of problem `p`.
    pub fn score(&self, p: Problem, completion: &[u32]) -> Score {
        self.reward
            .score(&self.tokenizer.decode(completion), p.answer())
    }
}

/// Held-out evaluation of an [`Arithmetic`] policy.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Evaluation {
    /// Share of problems answered correctly (greedy decoding).
    pub accuracy: f64,
    /// Share of completions that follow the template.
    pub format: f64,
}

impl Arithmetic {
    /// Greedy-decodes every problem of `problems` and scores it.
    ///
    /// # Errors
    ///
    /// Those of [`generate`].
    pub fn evaluate<P: Policy>(
        &self,
        model: &P,
        problems: &[Problem],
        device: &Device,
    ) -> Result<Evaluation, TrainError> {
        let prompts: Vec<Vec<u32>> = problems.iter().map(|&p| self.prompt(p)).collect();
        let cfg = SamplingConfig::greedy(self.max_completion_len());
        let r = generate(model, &prompts, &cfg, &mut Rng::new(0), device)?;
        let (mut acc, mut fmt) = (0.0, 0.0);
        for (i, &p) in problems.iter().enumerate() {
            let s = self.score(p, r.completion(i));
            acc += s.accuracy;
            fmt += s.format;
        }
        let n = problems.len().max(1) as f64;
        Ok(Evaluation {
            accuracy: acc / n,
            format: fmt / n,
        })
    }
}

/// The digits of one [`Sorting`] prompt, each in `0..=9`.
pub type Digits = Vec<u8>;

/// Sorting digits: a preference task with a ground-truth quality (see the
/// [module docs](self)).
#[derive(Debug, Clone)]
pub struct Sorting {
    /// The tokenizer (digits and `=`; no special tokens).
    pub tokenizer: CharTokenizer,
    /// Training prompts.
    pub train: Vec<Digits>,
    /// Held-out prompts (disjoint from `train`).
    pub test: Vec<Digits>,
    /// Probability that [`pair`](Self::pair)'s chosen completion is itself
    /// imperfect (1–2 adjacent swaps from sorted) rather than sorted: the
    /// graded pairs a reward model learns a graded score from (0.5 by default).
    pub imperfect_chosen: f64,
    digits: usize,
}

/// How [`Sorting::evaluate`]'s greedy completions scored.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SortEvaluation {
    /// Mean [`Sorting::quality`].
    pub quality: f64,
    /// Share of completions that are exactly the sorted digits.
    pub exact: f64,
    /// Share of completions that are a permutation of the prompt's digits.
    pub permutation: f64,
}

impl Sorting {
    /// `n_train` training and `n_test` held-out prompts of `digits` digits
    /// each, distinct, drawn by `seed` (no prompt is in both sets).
    ///
    /// # Errors
    ///
    /// [`TrainError::Config`] for `digits ∉ 2..=9`, an empty side, or more
    /// prompts than the `10^digits` that exist.
    pub fn new(
        digits: usize,
        n_train: usize,
        n_test: usize,
        seed: u64,
    ) -> Result<Self, TrainError> {
        if !(2..=9).contains(&digits) || n_train == 0 || n_test == 0 {
            return Err(TrainError::config(format!(
                "Sorting: need 2 ≤ digits ≤ 9 and non-empty splits (digits = {digits}, \
                 n_train = {n_train}, n_test = {n_test})"
            )));
        }
        let universe = 10u64.pow(digits as u32);
        let n = (n_train + n_test) as u64;
        if n > universe {
            return Err(TrainError::config(format!(
                "Sorting: {n} prompts requested, only {universe} strings of {digits} digits exist"
            )));
        }
        let mut rng = Rng::new(seed);
        let codes: Vec<u64> = if 2 * n > universe {
            let mut all: Vec<u64> = (0..universe).collect();
            rng.shuffle(&mut all);
            all.truncate(n as usize);
            all
        } else {
            let mut seen = std::collections::HashSet::with_capacity(n as usize);
            let mut v = Vec::with_capacity(n as usize);
            while v.len() < n as usize {
                let c = rng.next_u64() % universe;
                if seen.insert(c) {
                    v.push(c);
                }
            }
            v
        };
        let decode = |mut c: u64| -> Digits {
            let mut d = vec![0u8; digits];
            for x in d.iter_mut().rev() {
                *x = (c % 10) as u8;
                c /= 10;
            }
            d
        };
        let mut all: Vec<Digits> = codes.into_iter().map(decode).collect();
        let train = all.split_off(n_test);
        Ok(Sorting {
            tokenizer: CharTokenizer::new("0123456789=", &[])?,
            train,
            test: all,
            imperfect_chosen: 0.5,
            digits,
        })
    }

    /// Digits per prompt.
    pub fn digits(&self) -> usize {
        self.digits
    }

    /// Prompt length in tokens (`digits + 1`).
    pub fn prompt_len(&self) -> usize {
        self.digits + 1
    }

    /// The longest completion of any pair, EOS included (`digits + 1`; a
    /// sensible `max_new_tokens`).
    pub fn max_completion_len(&self) -> usize {
        self.digits + 1
    }

    /// `"31420="`.
    pub fn prompt_text(&self, digits: &[u8]) -> String {
        let mut s: String = digits.iter().map(|&d| char::from(b'0' + d)).collect();
        s.push('=');
        s
    }

    /// The prompt's token ids.
    pub fn prompt(&self, digits: &[u8]) -> Vec<u32> {
        self.tokenizer
            .encode(&self.prompt_text(digits))
            .expect("digits and '=' are the tokenizer's alphabet")
    }

    /// A completion writing `digits`, EOS appended.
    pub fn completion(&self, digits: &[u8]) -> Vec<u32> {
        let text: String = digits.iter().map(|&d| char::from(b'0' + d)).collect();
        let mut ids = self
            .tokenizer
            .encode(&text)
            .expect("digits are the tokenizer's alphabet");
        ids.push(CharTokenizer::EOS);
        ids
    }

    /// The ideal completion: the digits sorted ascending, EOS appended.
    pub fn demonstration(&self, digits: &[u8]) -> Vec<u32> {
        let mut d = digits.to_vec();
        d.sort_unstable();
        self.completion(&d)
    }

    /// `n` (prompt, sorted demonstration) pairs of training prompts drawn
    /// uniformly with replacement: an SFT batch.
    pub fn demonstration_batch(&self, n: usize, rng: &mut Rng) -> Vec<(Vec<u32>, Vec<u32>)> {
        (0..n)
            .map(|_| {
                let d = &self.train[rng.below(self.train.len())];
                (self.prompt(d), self.demonstration(d))
            })
            .collect()
    }

    /// The ground-truth quality of `completion` (token ids; a trailing EOS is
    /// ignored) for the prompt `digits`, in `[0, 1]`.
    ///
    /// # Formula
    ///
    /// 0 unless the completion is a permutation of the prompt's digits;
    /// otherwise `1 − inv / max_inv` with `inv = #{i < j : yᵢ > yⱼ}` and
    /// `max_inv` the number of pairs of *different* digits (the inversions of
    /// the descending order); 1 when all digits are equal.
    pub fn quality(&self, digits: &[u8], completion: &[u32]) -> f64 {
        let ids = match completion.last() {
            Some(&CharTokenizer::EOS) => &completion[..completion.len() - 1],
            _ => completion,
        };
        let y: Option<Vec<u8>> = ids
            .iter()
            .map(|&id| {
                let t = self.tokenizer.decode(&[id]);
                let b = t.as_bytes();
                (b.len() == 1 && b[0].is_ascii_digit()).then(|| b[0] - b'0')
            })
            .collect();
        let Some(y) = y else {
            return 0.0;
        };
        let (mut a, mut b) = (y.clone(), digits.to_vec());
        a.sort_unstable();
        b.sort_unstable();
        if a != b {
            return 0.0;
        }
        let n = y.len();
        let mut inv = 0usize;
        for i in 0..n {
            for j in i + 1..n {
                inv += usize::from(y[i] > y[j]);
            }
        }
        let mut counts = [0usize; 10];
        for &d in &y {
            counts[d as usize] += 1;
        }
        let max_inv = n * n.saturating_sub(1) / 2
            - counts
                .iter()
                .map(|c| c * c.saturating_sub(1) / 2)
                .sum::<usize>();
        if max_inv == 0 {
            1.0
        } else {
            1.0 - inv as f64 / max_inv as f64
        }
    }

    /// `quality` of a completion given as digits.
    fn quality_of(&self, prompt: &[u8], y: &[u8]) -> f64 {
        self.quality(prompt, &self.completion(y))
    }

    /// One preference pair for `prompt`: `(chosen, rejected)` token ids, EOS
    /// appended, with `quality(chosen) > quality(rejected)`.
    ///
    /// The chosen completion is the sorted digits or, with probability
    /// [`imperfect_chosen`](Self::imperfect_chosen), the sorted digits with
    /// one or two random adjacent swaps. The rejected
    /// one is, with equal odds: the chosen one with 1–4 further adjacent
    /// swaps; a uniform shuffle of the prompt; the prompt copied unchanged;
    /// the chosen one with a digit dropped or replaced by a random other
    /// digit; or the chosen one with a digit replaced by a copy of its
    /// neighbour (`01234` → `01134`: still ordered, the wrong digits — the
    /// typical error of a small model). Draws are repeated until the chosen
    /// one is strictly better.
    pub fn pair(&self, prompt: &[u8], rng: &mut Rng) -> (Vec<u32>, Vec<u32>) {
        let mut sorted = prompt.to_vec();
        sorted.sort_unstable();
        let swaps = |v: &mut Vec<u8>, k: usize, rng: &mut Rng| {
            for _ in 0..k {
                let i = rng.below(v.len() - 1);
                v.swap(i, i + 1);
            }
        };
        let broken = |v: &[u8], rng: &mut Rng| -> Vec<u8> {
            let mut v = v.to_vec();
            let i = rng.below(v.len());
            if rng.below(2) == 0 {
                v.remove(i);
            } else {
                v[i] = ((v[i] as usize + 1 + rng.below(9)) % 10) as u8;
            }
            v
        };
        let duplicated = |v: &[u8], rng: &mut Rng| -> Vec<u8> {
            let mut v = v.to_vec();
            let i = rng.below(v.len() - 1);
            if rng.below(2) == 0 {
                v[i + 1] = v[i];
            } else {
                v[i] = v[i + 1];
            }
            v
        };
        for _ in 0..64 {
            let mut chosen = sorted.clone();
            if rng.next_f64() < self.imperfect_chosen {
                let k = 1 + rng.below(2);
                swaps(&mut chosen, k, rng);
            }
            let rejected = match rng.below(5) {
                0 => {
                    let mut v = chosen.clone();
                    let k = 1 + rng.below(4);
                    swaps(&mut v, k, rng);
                    v
                }
                1 => {
                    let mut v = prompt.to_vec();
                    rng.shuffle(&mut v);
                    v
                }
                2 => prompt.to_vec(),
                3 => broken(&chosen, rng),
                _ => duplicated(&chosen, rng),
            };
            if self.quality_of(prompt, &chosen) > self.quality_of(prompt, &rejected) {
                return (self.completion(&chosen), self.completion(&rejected));
            }
        }
        // Every permutation ties (e.g. all digits equal): a broken copy loses.
        (
            self.completion(&sorted),
            self.completion(&broken(&sorted, rng)),
        )
    }

    /// [`pair`](Self::pair) as a [`PreferencePair`] (prompt ids included, no margin).
    pub fn preference_pair(&self, prompt: &[u8], rng: &mut Rng) -> PreferencePair {
        let (chosen, rejected) = self.pair(prompt, rng);
        PreferencePair::new(self.prompt(prompt), chosen, rejected)
    }

    /// `n` preference pairs on prompts drawn uniformly from `prompts`, each
    /// with `margin = quality(chosen) − quality(rejected)` when `with_margin`
    /// (TRL's `margin` column for the reward model).
    pub fn preference_pairs(
        &self,
        prompts: &[Digits],
        n: usize,
        with_margin: bool,
        rng: &mut Rng,
    ) -> Vec<PreferencePair> {
        (0..n)
            .map(|_| {
                let d = &prompts[rng.below(prompts.len())];
                let p = self.preference_pair(d, rng);
                if with_margin {
                    let m = self.quality(d, &p.chosen) - self.quality(d, &p.rejected);
                    p.with_margin(m)
                } else {
                    p
                }
            })
            .collect()
    }

    /// Greedy-decodes every prompt of `prompts` and scores it with
    /// [`quality`](Self::quality).
    ///
    /// # Errors
    ///
    /// Those of [`generate`].
    pub fn evaluate<P: Policy>(
        &self,
        model: &P,
        prompts: &[Digits],
        device: &Device,
    ) -> Result<SortEvaluation, TrainError> {
        let ids: Vec<Vec<u32>> = prompts.iter().map(|d| self.prompt(d)).collect();
        let cfg = SamplingConfig::greedy(self.max_completion_len());
        let r = generate(model, &ids, &cfg, &mut Rng::new(0), device)?;
        let (mut q, mut exact, mut perm) = (0.0, 0.0, 0.0);
        for (i, d) in prompts.iter().enumerate() {
            let c = r.completion(i);
            let s = self.quality(d, c);
            q += s;
            exact += f64::from(u8::from(
                r.finished[i] && c == &self.demonstration(d)[..self.digits],
            ));
            perm += f64::from(u8::from(self.is_permutation(d, c)));
        }
        let n = prompts.len().max(1) as f64;
        Ok(SortEvaluation {
            quality: q / n,
            exact: exact / n,
            permutation: perm / n,
        })
    }

    /// Whether `completion` (ids, trailing EOS ignored) is a permutation of
    /// the prompt's digits.
    pub fn is_permutation(&self, digits: &[u8], completion: &[u32]) -> bool {
        let ids = match completion.last() {
            Some(&CharTokenizer::EOS) => &completion[..completion.len() - 1],
            _ => completion,
        };
        let mut want: Vec<u32> = self.demonstration(digits);
        want.pop();
        let mut got = ids.to_vec();
        want.sort_unstable();
        got.sort_unstable();
        want == got
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_and_answer() {
        assert!(follows_template("<think>7+15</think><answer>22</answer>"));
        assert!(follows_template("<think></think><answer></answer>"));
        assert!(!follows_template("<think>7+15</think><answer>22</answer>1"));
        assert!(!follows_template("<answer>22</answer>"));
        assert!(!follows_template(
            "<think>7<think></think><answer>22</answer>"
        ));
        assert_eq!(extract_answer("x<answer>22</answer>"), Some("22"));
        let r = R1ZeroReward::default();
        assert_eq!(
            r.score("<think>7+15</think><answer>22</answer>", 22).reward,
            1.2
        );
        assert_eq!(
            r.score("<think>7+15</think><answer>23</answer>", 22).reward,
            0.2
        );
        assert_eq!(r.score("<answer>22</answer>", 22).reward, 1.0);
    }

    #[test]
    fn split_and_encoding() {
        let t = Arithmetic::new(19, 0.2, 7).unwrap();
        assert_eq!(t.train.len() + t.test.len(), 400);
        assert_eq!(t.test.len(), 80);
        assert_eq!(
            t.demonstration_text(Problem { a: 7, b: 15 }),
            "<think>7+5=12,0+1+1=2</think><answer>22</answer>"
        );
        let t99 = Arithmetic::new(99, 0.2, 7).unwrap();
        assert_eq!(
            t99.demonstration_text(Problem { a: 47, b: 85 }),
            "<think>7+5=12,4+8+1=13</think><answer>132</answer>"
        );
        let longest = t99.demonstration(Problem { a: 99, b: 99 });
        assert_eq!(longest.len(), t99.max_completion_len());
        assert!(t.test.iter().all(|p| !t.train.contains(p)));
        let p = Problem { a: 7, b: 15 };
        assert_eq!(t.prompt_text(p), "07+15=");
        assert_eq!(t.prompt(p).len(), t.prompt_len());
        let d = t.demonstration(Problem { a: 19, b: 19 });
        assert!(d.len() <= t.max_completion_len());
        assert_eq!(t.score(p, &d[..d.len() - 1]).reward, 0.2);
        assert_eq!(t.score(p, &t.demonstration(p)[..]).accuracy, 1.0);
    }

    #[test]
    fn sorting_split_and_quality() {
        let t = Sorting::new(5, 300, 100, 3).unwrap();
        assert_eq!((t.train.len(), t.test.len()), (300, 100));
        assert!(t.test.iter().all(|p| !t.train.contains(p)));
        assert!(t
            .train
            .iter()
            .chain(&t.test)
            .all(|p| p.len() == 5 && p.iter().all(|&d| d <= 9)));
        let d = vec![3, 1, 4, 2, 0];
        assert_eq!(t.prompt_text(&d), "31420=");
        assert_eq!(t.prompt(&d).len(), t.prompt_len());
        assert_eq!(t.tokenizer.decode(&t.demonstration(&d)), "01234");
        assert_eq!(*t.demonstration(&d).last().unwrap(), CharTokenizer::EOS);
        assert_eq!(t.demonstration(&d).len(), t.max_completion_len());
        let q = |y: &[u8]| t.quality(&d, &t.completion(y));
        assert_eq!(q(&[0, 1, 2, 3, 4]), 1.0);
        assert_eq!(q(&[4, 3, 2, 1, 0]), 0.0);
        assert_eq!(q(&[1, 0, 2, 3, 4]), 0.9); // one inversion of ten
        assert_eq!(q(&[0, 1, 2, 3]), 0.0); // a digit dropped
        assert_eq!(q(&[0, 1, 2, 3, 5]), 0.0); // a wrong digit
        assert_eq!(t.quality(&d, &t.completion(&[0, 1, 2, 3, 4])[..5]), 1.0); // no EOS
                                                                              // repeated digits: max_inv counts pairs of different digits only
        let e = vec![1, 1, 0];
        assert_eq!(t.quality(&e, &t.completion(&[0, 1, 1])), 1.0);
        assert_eq!(t.quality(&e, &t.completion(&[1, 1, 0])), 0.0);
        assert_eq!(t.quality(&e, &t.completion(&[1, 0, 1])), 0.5);
        assert_eq!(t.quality(&[7, 7], &t.completion(&[7, 7])), 1.0);
        assert!(t.is_permutation(&d, &t.completion(&[4, 3, 2, 1, 0])));
        assert!(!t.is_permutation(&d, &t.completion(&[0, 1, 2, 3])));
        assert!(Sorting::new(1, 5, 5, 0).is_err());
        assert!(Sorting::new(2, 90, 20, 0).is_err());
        assert!(Sorting::new(2, 0, 20, 0).is_err());
        let all = Sorting::new(2, 80, 20, 0).unwrap(); // every string, enumerated
        assert!(all.test.iter().all(|p| !all.train.contains(p)));
    }

    #[test]
    fn sorting_pairs_prefer_the_better_completion() {
        let t = Sorting::new(5, 200, 50, 1).unwrap();
        let mut rng = Rng::new(9);
        let mut sorted_chosen = 0;
        let mut graded = 0;
        for d in t
            .train
            .iter()
            .chain([&vec![7, 7, 7, 7, 7], &vec![0, 1, 2, 3, 4]])
        {
            for _ in 0..5 {
                let (c, r) = t.pair(d, &mut rng);
                let (qc, qr) = (t.quality(d, &c), t.quality(d, &r));
                assert!(qc > qr, "{d:?}: {c:?} ({qc}) vs {r:?} ({qr})");
                assert_eq!(*c.last().unwrap(), CharTokenizer::EOS);
                assert_eq!(*r.last().unwrap(), CharTokenizer::EOS);
                assert!(c.len() <= t.max_completion_len() && r.len() <= t.max_completion_len());
                sorted_chosen += usize::from(qc == 1.0);
                graded += usize::from(qc < 1.0 && qr > 0.0);
            }
        }
        assert!(
            sorted_chosen > 300 && graded > 50,
            "{sorted_chosen} sorted, {graded} graded"
        );
        let pairs = t.preference_pairs(&t.test, 20, true, &mut rng);
        assert!(pairs
            .iter()
            .all(|p| p.margin.is_some_and(|m| m > 0.0 && m <= 1.0)));
        assert!(pairs.iter().all(|p| p.prompt.len() == t.prompt_len()));
    }
}
