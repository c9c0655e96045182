//! `advantage::*`: group advantages (GRPO, Dr. GRPO, RLOO, GPG, pass@k,
//! GDPO, …), GAE and discounted returns, REINFORCE++, ReMax, the optimal
//! token baseline.

use crate::core_api::{check_with, op_def, to_value, Call, CallResult, ConfigDef, CoreReal, OpDef};
use posttrain_core::advantage::{group_zscore_advantages, GroupNormConfig};

pub(crate) fn ops() -> Vec<OpDef> {
    vec![op_def! {
        path: "advantage::group_zscore_advantages",
        doc: "GRPO's group-normalised advantages: A_i = (s_i − mean_g) / (std_g + ε) \
              (or s_i − mean_g without scaling), groups given by `index`; singleton \
              groups follow `cfg.singleton` (verl compute_grpo_outcome_advantage, TRL \
              GRPOTrainer, OpenRLHF, torchtune). No gradient (advantages are constants).",
        params: ["cfg": "GroupNormConfig" => "scale_by_std, std_eps, bessel, singleton (ops.core.config(\"GroupNormConfig\", preset=...))"],
        inputs: [
            "scores": Real => "[N] one score per sequence",
            "index": Index => "[N] group id of each sequence",
        ],
        outputs: ["advantages" => "[N] the advantages"],
        vjp: [],
        run: run_group_zscore,
    }]
}

fn run_group_zscore<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let cfg: GroupNormConfig = c.param("cfg")?;
    let (scores, shape) = c.real("scores")?;
    let (index, _) = c.index("index")?;
    let mut perm = vec![0usize; scores.len()];
    let mut out = vec![F::zero(); scores.len()];
    group_zscore_advantages(&cfg, scores, index, &mut perm, &mut out)?;
    c.output("advantages", out, shape);
    Ok(())
}

pub(crate) fn configs() -> Vec<ConfigDef> {
    vec![ConfigDef {
        name: "GroupNormConfig",
        path: "advantage::GroupNormConfig",
        doc: "Group z-score parameters: scale_by_std, std_eps, bessel, singleton (MeanZeroStdOne | RawScore | Zero).",
        preset_args: Some(&[]),
        base: |preset, _| {
            Ok(match preset {
                Some(p) => Some(to_value(&GroupNormConfig::preset(p))?),
                None => None,
            })
        },
        check: |v| {
            check_with::<GroupNormConfig>("GroupNormConfig", v, |c| {
                GroupNormConfig::new(c.scale_by_std, c.std_eps, c.bessel, c.singleton).map(|_| ())
            })
        },
    }]
}
