//! Preference losses: learning from chosen/rejected pairs or from labelled
//! single completions.
//!
//! * [`paired`] — DPO and its family on `(chosen, rejected)` sequence
//!   log-probabilities, and reward-model pairwise losses;
//! * [`unpaired`] — KTO and BCO on desirable/undesirable singletons, and the
//!   process-reward-model loss;
//! * [`odds_ratio`] — reference-free CPO and ORPO, which add an NLL term.

pub mod odds_ratio;
pub mod paired;
pub mod unpaired;
