//! Spec types -> `RunInputs`: one per sweep member, in sweep order. The spec crate has
//! already validated and resolved every member; this maps its types onto the compiler's.

use crate::inputs::{
    ArchAtDepth, BaseHyperparameters, Cluster, OptimizerChoice, RunInputs, TokenMult,
};
use crate::plan::{
    AttentionPlan, DataSource, DecayShape, DiffAttnPlan, GmuPlan, LayerPlan, MambaDims, MambaPlan,
    Mixer, MlpKind, NormKind, Parametrization, Sharding,
};
use archscale_spec::arch::Norm;
use archscale_spec::{
    BaseSpec, DataSourceSpec, Decay, Experiment, Optimizer, ResolvedArch, ResolvedMixer, RunSpec,
    SpecErrors,
};

/// Every run of the experiment, in sweep order.
pub fn expand(experiment: &Experiment) -> Result<Vec<RunInputs>, SpecErrors> {
    Ok(experiment.runs.iter().map(run_inputs).collect())
}

/// One sweep member.
pub fn run_inputs(run: &RunSpec) -> RunInputs {
    RunInputs {
        arch: arch_at_depth(&run.resolved),
        train_name: run.name.clone(),
        base: base(&run.base),
        parametrization: match run.parametrization {
            archscale_spec::Parametrization::Sp => Parametrization::Sp,
            archscale_spec::Parametrization::Mup => Parametrization::Mup,
            archscale_spec::Parametrization::MupPlusPlus => Parametrization::MupPlusPlus,
        },
        tied_embeddings: run.tied_embeddings,
        max_tokens: run.tokens,
        ctx_len: run.seq_len.map(|s| s as usize),
        micro_batch: run.micro_batch.map(|m| m as usize),
        optimizer: match run.optimizer {
            Optimizer::AdamW => OptimizerChoice::Adamw,
            Optimizer::Muon => OptimizerChoice::Muon,
            Optimizer::NAdam => OptimizerChoice::Nadam,
        },
        decay: match run.decay {
            Decay::Linear => DecayShape::Linear,
            Decay::Cosine => DecayShape::Cosine,
        },
        wsd: run.wsd,
        label_smoothing: run.label_smoothing,
        varlen: run.varlen,
        rope_base: run.rope_base,
        swa_len: run.swa_len.map(|w| w as usize),
        cluster: Cluster {
            nodes: run.nodes as usize,
            gpus_per_node: run.gpus_per_node as usize,
            gpu_memory_gib: run.gpu_memory_gib,
        },
        sharding: run.sharding.map(|s| match s {
            archscale_spec::Sharding::DataParallel => Sharding::DataParallel,
            archscale_spec::Sharding::Zero1 => Sharding::Zero1,
            archscale_spec::Sharding::Zero3 => Sharding::Zero3,
            archscale_spec::Sharding::HybridShard => Sharding::HybridShard,
        }),
        seed: run.seed,
        out_dir: run.out_dir.clone(),
        eval_interval: run.eval_interval,
        save_interval: run.save_interval,
        log_interval: run.log_interval,
        train_data: run.train_data.iter().map(source).collect(),
        val_data: run.val_data.iter().map(source).collect(),
    }
}

fn base(b: &BaseSpec) -> BaseHyperparameters {
    BaseHyperparameters {
        d0: b.d0,
        eta0: b.eta0,
        b0: b.b0,
        t0: b.t0,
        hd0: b.hd0,
        w_init0: b.w_init0,
        n0_mult: b.n0_mult,
        weight_decay0: b.weight_decay0,
        eps0: b.eps0,
        min_lr0: b.min_lr0,
        warmup_tokens0: b.warmup_tokens0,
        beta1_0: b.beta1_0,
        beta2_0: b.beta2_0,
        muon_beta_0: b.muon_beta_0,
        weight_lr_scale_0: b.weight_lr_scale_0,
        n0_mult_is_float: b.n0_mult_is_float,
    }
}

fn source(s: &DataSourceSpec) -> DataSource {
    match s {
        DataSourceSpec::Packed {
            dir,
            prefix,
            weight,
        } => DataSource::Packed {
            dir: dir.clone(),
            prefix: prefix.clone(),
            weight: *weight,
        },
        DataSourceSpec::Synthetic {
            seed,
            tokens,
            weight,
        } => DataSource::Synthetic {
            seed: *seed,
            tokens: *tokens,
            weight: *weight,
        },
        DataSourceSpec::SyntheticText {
            seed,
            tokens,
            weight,
        } => DataSource::SyntheticText {
            seed: *seed,
            tokens: *tokens,
            weight: *weight,
        },
    }
}

/// The resolved family as the compiler's `ArchAtDepth`.
pub fn arch_at_depth(a: &ResolvedArch) -> ArchAtDepth {
    ArchAtDepth {
        family: a.family.clone(),
        depth: a.depth,
        aspect_ratio: a.aspect_ratio,
        n_embd: a.n_embd,
        n_head: a.n_head,
        n_query_groups: a.n_query_groups,
        head_size: a.head_size,
        intermediate_size: a.intermediate_size,
        vocab_size: a.vocab_size,
        padding_multiple: a.padding_multiple,
        norm: match a.norm {
            Norm::RmsNorm => NormKind::RmsNorm,
            Norm::LayerNorm => NormKind::LayerNorm,
        },
        norm_eps: a.norm_eps,
        mlp: MlpKind::Swiglu,
        tied_embeddings: a.tied_embeddings,
        bias: a.bias,
        attn_bias: a.attn_bias,
        attn_out_bias: a.attn_out_bias,
        rope_base: a.rope_base,
        layers: a
            .layers
            .iter()
            .map(|l| LayerPlan {
                index: l.index,
                mixer: match &l.mixer {
                    ResolvedMixer::Attention {
                        window,
                        rope,
                        kv_from,
                        exports_kv,
                        exports_memory,
                        differential,
                    } => Mixer::Attention(AttentionPlan {
                        window: *window,
                        rope: *rope,
                        kv_from: *kv_from,
                        exports_kv: *exports_kv,
                        exports_memory: *exports_memory,
                        differential: differential.map(|lambda_init| DiffAttnPlan { lambda_init }),
                    }),
                    ResolvedMixer::Mamba { export_memory } => Mixer::Mamba(MambaPlan {
                        export_memory: *export_memory,
                    }),
                    ResolvedMixer::Mamba2 { export_memory } => Mixer::Mamba2 {
                        export_memory: *export_memory,
                    },
                    ResolvedMixer::GatedDeltaNet { export_memory } => Mixer::GatedDeltaNet {
                        export_memory: *export_memory,
                    },
                    ResolvedMixer::Gmu {
                        memory_from,
                        d_mem,
                        gated_norm,
                    } => Mixer::Gmu(GmuPlan {
                        memory_from: *memory_from,
                        d_mem: *d_mem,
                        gated_norm: *gated_norm,
                    }),
                },
                mlp_exports_memory: l.mlp_exports_memory,
            })
            .collect(),
        mamba: a.mamba.map(|m| MambaDims {
            d_inner: m.d_inner,
            d_state: m.d_state,
            d_conv: m.d_conv,
            dt_rank: m.dt_rank,
        }),
        token_mult: TokenMult {
            value: a.token_mult,
            is_int: a.token_mult_is_int,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn sambay_sweep_expands_to_arch_at_depth() {
        let text = "arch = \"sambay\"\ndepth = [8, 16]\nparametrization = \"mup++\"\n[cluster]\ngpus_per_node = 8\n";
        let exp = archscale_spec::parse_experiment("e.toml", text, Path::new("."), &[]).unwrap();
        let runs = expand(&exp).unwrap();
        assert_eq!(runs.len(), 2);
        let a = &runs[0].arch;
        assert_eq!(
            (
                a.n_embd,
                a.n_head,
                a.n_query_groups,
                a.head_size,
                a.intermediate_size
            ),
            (992, 8, 2, 128, 3968)
        );
        assert_eq!(
            a.token_mult,
            TokenMult {
                value: 240808.0,
                is_int: false
            }
        );
        assert_eq!(a.rope_base, None);
        assert_eq!(
            a.layers[4].mixer,
            Mixer::Mamba(MambaPlan {
                export_memory: true
            })
        );
        assert_eq!(
            a.layers[6].mixer,
            Mixer::Gmu(GmuPlan {
                memory_from: 4,
                d_mem: 1984,
                gated_norm: false
            })
        );
        match &a.layers[7].mixer {
            Mixer::Attention(p) => assert_eq!((p.kv_from, p.window), (Some(5), None)),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            a.mamba,
            Some(MambaDims {
                d_inner: 1984,
                d_state: 16,
                d_conv: 4,
                dt_rank: 62
            })
        );
        assert_eq!(runs[1].arch.depth, 16);
        assert_eq!(runs[0].base, BaseHyperparameters::default());
        assert_eq!(
            runs[0].cluster,
            Cluster {
                nodes: 1,
                gpus_per_node: 8,
                gpu_memory_gib: 80.0
            }
        );
    }
}
