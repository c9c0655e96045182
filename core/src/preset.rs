//! Named presets: which peer framework's numbers an op reproduces.

/// A peer framework whose exact numerics an op can reproduce.
///
/// Where the peers disagree (GRPO's std epsilon, singleton groups, k3 clamps,
/// whitening, masked-mean epsilon, the meaning of CISPO, …) each op takes
/// explicit parameters, and its config offers a `preset(Preset)` constructor
/// that fills them the way that framework does. The per-op docs list what each
/// preset sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub enum Preset {
    /// Hugging Face TRL.
    Trl,
    /// verl (Volcano Engine RL).
    Verl,
    /// OpenRLHF.
    OpenRlhf,
    /// PyTorch torchtune.
    Torchtune,
}

impl core::str::FromStr for Preset {
    type Err = crate::Error;
    /// Parses `trl`, `verl`, `openrlhf`, `torchtune` (case-insensitive).
    fn from_str(s: &str) -> Result<Self, crate::Error> {
        let eq = |name: &str| s.eq_ignore_ascii_case(name);
        if eq("trl") {
            Ok(Preset::Trl)
        } else if eq("verl") {
            Ok(Preset::Verl)
        } else if eq("openrlhf") {
            Ok(Preset::OpenRlhf)
        } else if eq("torchtune") {
            Ok(Preset::Torchtune)
        } else {
            Err(crate::Error::unknown_option(
                "preset",
                s,
                "trl, verl, openrlhf, torchtune",
            ))
        }
    }
}
