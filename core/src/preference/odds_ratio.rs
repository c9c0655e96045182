//! Reference-free preference losses with an NLL term: CPO, ORPO and the odds ratio.
