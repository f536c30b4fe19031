//! `compile` answers Ok or a CompileError for any inputs, never a panic: extreme sizes,
//! zero, NaN and infinite numbers included (debug builds check integer overflow).

mod common;

use archscale_compiler::plan::*;
use archscale_compiler::{compile, OptimizerChoice, RunInputs};
use proptest::prelude::*;

fn any_size() -> impl Strategy<Value = usize> {
    prop_oneof![
        0usize..4,
        1usize..100_000,
        Just(usize::MAX),
        Just(1 << 40),
        Just(1 << 24)
    ]
}

fn any_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..4,
        1u64..10_000_000_000_000,
        Just(u64::MAX),
        Just(1 << 62)
    ]
}

fn any_f64() -> impl Strategy<Value = f64> {
    prop_oneof![
        -1e3f64..1e13,
        Just(0.0),
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(-f64::INFINITY),
        Just(1e300),
        Just(f64::MIN_POSITIVE)
    ]
}

prop_compose! {
    fn mutated()(
        family in prop::sample::select(vec![("transformer", 8usize), ("sambay", 12), ("samba", 16), ("phi4miniflash", 32)]),
        which in 0usize..16,
        size in any_size(),
        int in any_u64(),
        float in any_f64(),
        optional in any::<bool>(),
        opt in prop::sample::select(vec![OptimizerChoice::Adamw, OptimizerChoice::Muon, OptimizerChoice::Nadam]),
        par in prop::sample::select(vec![Parametrization::Sp, Parametrization::Mup, Parametrization::MupPlusPlus]),
    ) -> RunInputs {
        let mut inp = common::inputs(family.0, family.1);
        inp.optimizer = opt;
        inp.parametrization = par;
        match which {
            0 => inp.arch.depth = size,
            1 => inp.arch.n_embd = size,
            2 => inp.arch.n_head = size,
            3 => inp.arch.head_size = size,
            4 => inp.arch.vocab_size = size,
            5 => inp.cluster.nodes = size,
            6 => inp.cluster.gpus_per_node = size,
            7 => inp.ctx_len = Some(size),
            8 => inp.micro_batch = Some(size),
            9 => inp.base.b0 = int,
            10 => inp.base.t0 = int,
            11 => inp.base.d0 = int,
            12 => inp.max_tokens = if optional { Some(float) } else { None },
            13 => inp.base.eta0 = float,
            14 => inp.arch.token_mult.value = float,
            _ => {
                inp.base.warmup_tokens0 = int;
                inp.cluster.gpu_memory_gib = float;
                inp.arch.padding_multiple = size;
            }
        }
        inp
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]
    #[test]
    fn compile_never_panics(inputs in mutated()) {
        if let Err(e) = compile(&inputs) {
            prop_assert!(!e.key.is_empty());
            prop_assert!(!e.message.is_empty());
        }
    }
}
