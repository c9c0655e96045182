//! `preference::*`: DPO and its paired family, the unpaired losses (KTO,
//! BCO, PRM), odds-ratio losses (ORPO, CPO, SimPO), reward-model losses.

use crate::core_api::{
    check_with, op_def, take_f64, to_value, Call, CallResult, ConfigDef, CoreReal, OpDef,
};
use posttrain_core::preference::paired::{
    paired_loss, LossTerm, PairBatch, PairGrads, PairedConfig,
};

pub(crate) fn ops() -> Vec<OpDef> {
    vec![op_def! {
        path: "preference::paired::paired_loss",
        doc: "A paired preference loss over B pairs: ℓc = c − c₀, ℓr = r − r₀ (the implicit \
              rewards' log-ratios, scored by cfg.divergence), loss_i = ω_i Σ_k w_k term_k(pair i), \
              loss = mean_i loss_i, with `terms` any mix of DPO's family (sigmoid, hinge, IPO, \
              robust, BCO, SPPO, NCA, AOT, APO, DiscoPOP, SimPO, …) as TRL DPOTrainer._compute_loss, \
              OpenRLHF DPOLoss, torchtune. Metrics: rewards, accuracy, margin. Gradient: ∂/∂c, ∂/∂r.",
        params: [
            "cfg": "PairedConfig" => "beta, label_smoothing, smooth_sigmoid, target_margin, divergence, discopop_tau, divergence_scores",
            "terms": "Vec<LossTerm>" => "the loss terms [{\"kind\": PairedLoss, \"weight\": f64}, …]",
        ],
        inputs: [
            "policy_chosen": Real => "[B] log π(chosen) (sequence sums)",
            "policy_rejected": Real => "[B] log π(rejected)",
            "reference_chosen": Real opt => "[B] log π_ref(chosen) (absent: reference-free)",
            "reference_rejected": Real opt => "[B] log π_ref(rejected)",
            "chosen_len": Real opt => "[B] chosen lengths (IPO, SimPO, length-normalised losses)",
            "rejected_len": Real opt => "[B] rejected lengths",
            "pair_weight": Real opt => "[B] per-pair weights ω",
        ],
        outputs: [
            "loss" => "the mean loss (scalar)",
            "per_pair" => "[B] loss_i",
            "reward_chosen" => "metric: mean β·ℓc",
            "reward_rejected" => "metric: mean β·ℓr",
            "accuracy" => "metric: share of pairs with reward_chosen > reward_rejected",
            "margin" => "metric: mean reward margin",
            "logps_chosen" => "metric: mean c",
            "logps_rejected" => "metric: mean r",
        ],
        vjp: [
            "loss" => ["policy_chosen", "policy_rejected"],
            "per_pair" => ["policy_chosen", "policy_rejected"],
        ],
        run: run_paired_loss,
    }]
}

fn run_paired_loss<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let cfg: PairedConfig = c.param("cfg")?;
    let terms: Vec<LossTerm> = c.param("terms")?;
    let (chosen, shape) = c.real("policy_chosen")?;
    let mut batch = PairBatch::new(chosen, c.real("policy_rejected")?.0);
    batch.reference_chosen = c.opt_real("reference_chosen")?.map(|x| x.0);
    batch.reference_rejected = c.opt_real("reference_rejected")?.map(|x| x.0);
    batch.chosen_len = c.opt_real("chosen_len")?.map(|x| x.0);
    batch.rejected_len = c.opt_real("rejected_len")?.map(|x| x.0);
    batch.pair_weight = c.opt_real("pair_weight")?.map(|x| x.0);
    let n = chosen.len();
    let mut per_pair = vec![F::zero(); n];
    let mut order = vec![0usize; 2 * n];
    let cot_loss = c.cot_scalar("loss")?;
    let cot_pp = c.cot("per_pair")?;
    let want = cot_loss.is_some() || cot_pp.is_some();
    let (mut gc, mut gr) = (vec![F::zero(); n], vec![F::zero(); n]);
    let grads = want.then(|| PairGrads {
        cotangent_loss: cot_loss.unwrap_or(F::zero()),
        cotangent_per_pair: cot_pp,
        chosen: &mut gc[..],
        rejected: &mut gr[..],
    });
    let out = paired_loss(&cfg, &terms, &batch, Some(&mut per_pair), grads, &mut order)?;
    c.scalar("loss", out.loss);
    c.output("per_pair", per_pair, shape);
    let m = out.metrics;
    c.metric("reward_chosen", m.reward_chosen.to_f64());
    c.metric("reward_rejected", m.reward_rejected.to_f64());
    c.metric("accuracy", m.accuracy.to_f64());
    c.metric("margin", m.margin.to_f64());
    c.metric("logps_chosen", m.logps_chosen.to_f64());
    c.metric("logps_rejected", m.logps_rejected.to_f64());
    if want {
        c.grad("policy_chosen", gc);
        c.grad("policy_rejected", gr);
    }
    Ok(())
}

pub(crate) fn configs() -> Vec<ConfigDef> {
    vec![
        ConfigDef {
            name: "PairedConfig",
            path: "preference::paired::PairedConfig",
            doc: "Paired-loss parameters: beta, label_smoothing, smooth_sigmoid, target_margin, divergence, discopop_tau, divergence_scores.",
            preset_args: Some(&["beta"]),
            base: |preset, args| {
                Ok(match preset {
                    Some(p) => {
                        let beta = take_f64(args, "PairedConfig", "beta")?;
                        Some(to_value(&PairedConfig::preset(p, beta)?)?)
                    }
                    None => None,
                })
            },
            check: |v| check_with::<PairedConfig>("PairedConfig", v, |c| c.validate()),
        },
        ConfigDef {
            name: "LossTerm",
            path: "preference::paired::LossTerm",
            doc: "One weighted term of a paired loss: kind (PairedLoss), weight (default 1).",
            preset_args: None,
            base: |_, args| {
                if !args.contains_key("weight") {
                    args.insert("weight".into(), 1.0.into());
                }
                Ok(None)
            },
            check: |v| check_with::<LossTerm>("LossTerm", v, |_| Ok(())),
        },
    ]
}
