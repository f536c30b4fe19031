//! The worked tables of hp-spec §7.2 and §10 (values from running ArchScale's own code),
//! checked against `compile` on hand-built inputs.

#![allow(clippy::type_complexity)] // table rows are tuples on purpose

mod common;

use archscale_compiler::compile::model_and_params;
use archscale_compiler::hparams;
use archscale_compiler::plan::*;
use archscale_compiler::{compile, RunInputs};
use common::{apply_train_name, inputs};

/// hp-spec §10.1: model, d, n_embd, n_head, n_query_groups, head_size, intermediate_size,
/// padded vocab, num_parameters, non-embedding, tied.
const TABLE_10_1: [(
    &str,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    u64,
    u64,
    bool,
); 21] = [
    (
        "transformer",
        8,
        1024,
        8,
        2,
        128,
        4096,
        32000,
        187188224,
        121652224,
        false,
    ),
    (
        "transformer",
        12,
        1536,
        12,
        3,
        128,
        6144,
        32000,
        508859904,
        410555904,
        false,
    ),
    (
        "transformer",
        16,
        2048,
        16,
        4,
        128,
        8192,
        32000,
        1104218112,
        973146112,
        false,
    ),
    (
        "transformer",
        20,
        2560,
        20,
        5,
        128,
        10240,
        32000,
        2064488960,
        1900648960,
        false,
    ),
    (
        "transformer",
        24,
        3072,
        24,
        6,
        128,
        12288,
        32000,
        3480898560,
        3284290560,
        false,
    ),
    (
        "sambay", 8, 992, 8, 2, 128, 3968, 32000, 190340000, 126852000, false,
    ),
    (
        "sambay", 12, 1488, 12, 3, 128, 5952, 32000, 519825360, 424593360, false,
    ),
    (
        "sambay", 16, 1984, 16, 4, 128, 7936, 32000, 1129306688, 1002330688, false,
    ),
    (
        "sambay", 20, 2480, 20, 5, 128, 9920, 32000, 2111623280, 1952903280, false,
    ),
    (
        "sambay", 24, 2976, 24, 6, 128, 11904, 32000, 3559614432, 3369150432, false,
    ),
    (
        "sambayda", 8, 992, 8, 2, 128, 3968, 32000, 190343072, 126855072, false,
    ),
    (
        "sambayda", 12, 1488, 12, 3, 128, 5952, 32000, 519829968, 424597968, false,
    ),
    (
        "sambayda", 16, 1984, 16, 4, 128, 7936, 32000, 1129312832, 1002336832, false,
    ),
    (
        "sambayda", 20, 2480, 20, 5, 128, 9920, 32000, 2111630960, 1952910960, false,
    ),
    (
        "sambayda", 24, 2976, 24, 6, 128, 11904, 32000, 3559623648, 3369159648, false,
    ),
    (
        "samba", 8, 976, 8, 2, 128, 3904, 32000, 188165968, 125701968, false,
    ),
    (
        "samba", 12, 1464, 12, 3, 128, 5856, 32000, 517455192, 423759192, false,
    ),
    (
        "samba", 16, 1952, 16, 4, 128, 7808, 32000, 1128757664, 1003829664, false,
    ),
    (
        "samba", 20, 2440, 20, 5, 128, 9760, 32000, 2116116840, 1959956840, false,
    ),
    (
        "samba", 24, 2928, 24, 6, 128, 11712, 32000, 3573310704, 3385918704, false,
    ),
    (
        "phi4miniflash",
        32,
        2560,
        40,
        20,
        64,
        10240,
        200064,
        3852562944,
        3340399104,
        true,
    ),
];

#[test]
fn parameter_counts_match_table_10_1() {
    for (model, d, n, h, g, hs, inter, v, total, non_emb, tied) in TABLE_10_1 {
        let inp = inputs(model, d);
        let sv = hparams::setup(&inp).unwrap();
        let (cfg, params) = model_and_params(&inp, &sv).unwrap();
        let what = format!("{model}_d{d}");
        assert_eq!(cfg.name, what);
        assert_eq!(
            (
                cfg.n_embd,
                cfg.n_head,
                cfg.n_query_groups,
                cfg.head_size,
                cfg.intermediate_size,
                cfg.padded_vocab_size
            ),
            (n, h, g, hs, inter, v),
            "{what}"
        );
        assert_eq!(cfg.tied_embeddings, tied, "{what}");
        assert_eq!(
            archscale_compiler::params::count_total(&params),
            total,
            "{what} num_parameters"
        );
        assert_eq!(
            archscale_compiler::params::count_non_embedding(&params),
            non_emb,
            "{what} non-embedding"
        );
        // Names are unique and every tensor has a positive size.
        let mut names: Vec<&str> = params.iter().map(|p| p.name.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), params.len(), "{what} duplicate names");
        assert!(params.iter().all(|p| p.numel() > 0));
    }
}

#[test]
fn transformer_d8_worked_check() {
    // hp-spec §6.2: one layer = 15,206,400; the matrix part equals n_target exactly.
    let inp = inputs("transformer", 8);
    let plan = compile(&inp).unwrap();
    let layer0: usize = plan
        .params
        .iter()
        .filter(|p| p.layer == Some(0))
        .map(|p| p.numel())
        .sum();
    assert_eq!(layer0, 15_206_400);
    let matrices: u64 = plan
        .params
        .iter()
        .filter(|p| p.layer.is_some() && p.shape.len() == 2)
        .map(|p| p.numel() as u64)
        .sum();
    assert_eq!(matrices, 121_634_816);
    assert_eq!(plan.estimates.params_total, 187_188_224);
    // Registration order: lm_head, wte, blocks (norm_1, attn, norm_2, mlp), ln_f.
    let names: Vec<&str> = plan
        .params
        .iter()
        .take(8)
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "lm_head.weight",
            "transformer.wte.weight",
            "transformer.h.0.norm_1.weight",
            "transformer.h.0.attn.attn.weight",
            "transformer.h.0.attn.proj.weight",
            "transformer.h.0.norm_2.weight",
            "transformer.h.0.mlp.w1.weight",
            "transformer.h.0.mlp.w3.weight",
        ]
    );
    assert_eq!(plan.params.last().unwrap().name, "transformer.ln_f.weight");
    assert_eq!(plan.params[3].shape, vec![(8 + 2 * 2) * 128, 1024]);
    assert_eq!(plan.params[6].shape, vec![2 * 4096, 1024]);
    assert_eq!(plan.params[7].shape, vec![1024, 4096]);
}

#[test]
fn group_sizes_scaling_mup_transformer_d12() {
    // hp-spec §8.1: vectors 27 tensors / 98,342,400; weights 48 / 410,517,504 (= n_target).
    let plan = compile(&inputs("transformer", 12)).unwrap();
    let count = |g: usize| {
        let ps: Vec<_> = plan.params.iter().filter(|p| p.group == g).collect();
        (ps.len(), ps.iter().map(|p| p.numel() as u64).sum::<u64>())
    };
    assert_eq!(count(0), (27, 98_342_400));
    assert_eq!(count(1), (48, 410_517_504));
}

#[test]
fn sambay_layout_and_names() {
    let plan = compile(&inputs("sambay", 8)).unwrap();
    let kinds: Vec<String> = plan
        .layers
        .iter()
        .map(|l| match &l.mixer {
            Mixer::Mamba(m) if m.export_memory => "M*".into(),
            Mixer::Mamba(_) => "M".into(),
            Mixer::Attention(a) if a.kv_from.is_some() => "X".into(),
            Mixer::Attention(a) if a.window.is_some() => "S".into(),
            Mixer::Attention(_) => "A".into(),
            Mixer::Gmu(_) => "G".into(),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(kinds.join(" "), "M S M S M* A G X");
    let mamba: Vec<&str> = plan
        .params
        .iter()
        .filter(|p| p.name.starts_with("transformer.h.0.attn."))
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(
        mamba,
        [
            "transformer.h.0.attn.A_log",
            "transformer.h.0.attn.D",
            "transformer.h.0.attn.in_proj.weight",
            "transformer.h.0.attn.conv1d.weight",
            "transformer.h.0.attn.conv1d.bias",
            "transformer.h.0.attn.x_proj.weight",
            "transformer.h.0.attn.dt_proj.weight",
            "transformer.h.0.attn.dt_proj.bias",
            "transformer.h.0.attn.out_proj.weight",
        ]
    );
    let p = |name: &str| plan.params.iter().find(|p| p.name == name).unwrap();
    assert_eq!(
        p("transformer.h.0.attn.x_proj.weight").shape,
        vec![62 + 32, 1984]
    );
    assert_eq!(
        p("transformer.h.0.attn.conv1d.weight").shape,
        vec![1984, 1, 4]
    );
    assert_eq!(
        p("transformer.h.6.attn.gmu.in_proj.weight").shape,
        vec![1984, 992]
    );
    assert_eq!(
        p("transformer.h.6.attn.gmu.out_proj.weight").shape,
        vec![992, 1984]
    );
    assert_eq!(
        p("transformer.h.7.attn.attn.weight").shape,
        vec![8 * 128, 992]
    );
    assert_eq!(
        p("transformer.h.5.attn.attn.weight").shape,
        vec![(8 + 4) * 128, 992]
    );
}

fn rel_eq(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * b.abs().max(f64::MIN_POSITIVE)
}

/// hp-spec §10.2: model, d, train_tokens, learning_rate, weight lr_mult, weight peak LR,
/// max_iters, max_steps (`scaling_mup`, 1 node x 8, ctx 4096, default base).
const TABLE_10_2: [(&str, usize, u64, f64, f64, f64, u64, u64); 16] = [
    (
        "transformer",
        8,
        12500000000,
        0.000565685424949238,
        2.0,
        0.001131370849898476,
        190734,
        5960,
    ),
    (
        "transformer",
        12,
        42187500000,
        0.0004618802153517006,
        1.3333333333333333,
        0.0006158402871356008,
        643730,
        20116,
    ),
    (
        "transformer",
        16,
        100000000000,
        0.0004,
        1.0,
        0.0004,
        1525878,
        47683,
    ),
    (
        "transformer",
        20,
        195312500000,
        0.00035777087639996636,
        0.8,
        0.0002862167011199731,
        2980232,
        93132,
    ),
    (
        "transformer",
        24,
        337500000000,
        0.00032659863237109043,
        0.6666666666666666,
        0.00021773242158072695,
        5149841,
        160932,
    ),
    (
        "sambay",
        8,
        12670477505,
        0.000565685424949238,
        2.0,
        0.001131370849898476,
        193336,
        6041,
    ),
    (
        "sambay",
        12,
        42762861580,
        0.0004618802153517006,
        1.3333333333333333,
        0.0006158402871356008,
        652509,
        20390,
    ),
    (
        "sambay",
        16,
        101363820043,
        0.0004,
        1.0,
        0.0004,
        1546689,
        48334,
    ),
    (
        "sambay",
        20,
        197976211021,
        0.00035777087639996636,
        0.8,
        0.0002862167011199731,
        3020877,
        94402,
    ),
    (
        "sambay",
        24,
        342102892645,
        0.00032659863237109043,
        0.6666666666666666,
        0.00021773242158072695,
        5220075,
        163127,
    ),
    (
        "samba",
        8,
        12774237271,
        0.000565685424949238,
        2.0,
        0.001131370849898476,
        194919,
        6091,
    ),
    (
        "samba",
        12,
        43113050789,
        0.0004618802153517006,
        1.3333333333333333,
        0.0006158402871356008,
        657852,
        20557,
    ),
    (
        "samba",
        16,
        102193898168,
        0.0004,
        1.0,
        0.0004,
        1559355,
        48729,
    ),
    (
        "samba",
        20,
        199597457359,
        0.00035777087639996636,
        0.8,
        0.0002862167011199731,
        3045615,
        95175,
    ),
    (
        "samba",
        24,
        344904406317,
        0.00032659863237109043,
        0.6666666666666666,
        0.00021773242158072695,
        5262823,
        164463,
    ),
    (
        "phi4miniflash",
        32,
        351293103448,
        0.000282842712474619,
        0.5,
        0.0001414213562373095,
        5360307,
        167509,
    ),
];

#[test]
fn hyperparameters_match_table_10_2() {
    for (model, d, tokens, lr, mult, weight_lr, max_iters, max_steps) in TABLE_10_2 {
        let what = format!("{model}_d{d}");
        let plan = compile(&inputs(model, d)).unwrap();
        assert_eq!(plan.training.train_tokens, tokens as f64, "{what}");
        assert_eq!(
            plan.archscale_summary["train_tokens"],
            serde_json::json!(tokens),
            "{what} int rendering"
        );
        let g = &plan.optimizer.groups;
        assert_eq!(g.len(), 2);
        assert_eq!(
            g[0].peak_lr.to_bits(),
            lr.to_bits(),
            "{what} lr {} vs {lr}",
            g[0].peak_lr
        );
        assert_eq!(g[0].lr_mult, Some(1.0));
        assert_eq!((g[0].weight_decay, g[1].weight_decay), (0.0, 0.1), "{what}");
        assert_eq!(g[1].lr_mult.unwrap().to_bits(), mult.to_bits(), "{what}");
        // Peak of the weights group = the group LR right at the end of warmup.
        let peak = g[1].lr_at(&plan.schedule, plan.schedule.warmup_iters);
        assert_eq!(
            peak.to_bits(),
            weight_lr.to_bits(),
            "{what} weight peak {peak} vs {weight_lr}"
        );
        assert_eq!(
            (plan.schedule.max_iters, plan.training.max_steps),
            (max_iters, max_steps),
            "{what}"
        );
        assert_eq!(plan.schedule.warmup_iters, 15258);
        assert_eq!(
            (
                plan.layout.micro_batch,
                plan.layout.gas,
                plan.layout.seq_len
            ),
            (2, 32, 4096)
        );
        assert_eq!(plan.layout.batch_tokens, 2_097_152);
        assert_eq!(plan.schedule.min_lr, 0.0);
    }
}

struct Variant {
    name: &'static str,
    seq_len: usize,
    micro: usize,
    lr: f64,
    rope_base: f64,
    label_smoothing: f64,
    tied: bool,
    logit_scale: f64,
    residual_div: f64,
    /// (optimizer, lr_mult, wd, beta1, beta2, eps) per group.
    groups: Vec<(OptimizerKind, Option<f64>, f64, f64, f64, f64)>,
    /// Group LRs at optimizer step 10058 (6 significant digits in the table).
    lr_at_10058: Vec<f64>,
}

#[test]
fn train_name_variants_table_10_3() {
    use OptimizerKind::*;
    let mup_lr = 4.618802153517006e-4;
    let mup_groups = vec![
        (AdamW, Some(1.0), 0.0, 0.9, 0.95, 1e-8),
        (AdamW, Some(4.0 / 3.0), 0.1, 0.9, 0.95, 1e-8),
    ];
    let v =
        |name, seq_len, micro, lr, rope_base, ls, tied, logit_scale, residual_div, groups, lrs| {
            Variant {
                name,
                seq_len,
                micro,
                lr,
                rope_base,
                label_smoothing: ls,
                tied,
                logit_scale,
                residual_div,
                groups,
                lr_at_10058: lrs,
            }
        };
    let sqrt24 = 24f64.sqrt();
    let variants = vec![
        v(
            "scaling",
            4096,
            2,
            4e-4,
            1e4,
            0.0,
            false,
            1.0,
            1.0,
            vec![(AdamW, None, 0.1, 0.9, 0.95, 1e-8)],
            vec![2.04862e-4],
        ),
        v(
            "scaling_mup",
            4096,
            2,
            mup_lr,
            1e4,
            0.0,
            false,
            4.0 / 3.0,
            sqrt24,
            mup_groups.clone(),
            vec![2.36554e-4, 3.15406e-4],
        ),
        v(
            "scaling_mup_tie",
            4096,
            2,
            mup_lr,
            1e4,
            0.0,
            true,
            4.0 / 3.0,
            sqrt24,
            mup_groups.clone(),
            vec![2.36554e-4, 3.15406e-4],
        ),
        v(
            "scaling_ori_mup",
            4096,
            2,
            4e-4,
            1e4,
            0.0,
            false,
            4.0 / 3.0,
            1.0,
            vec![
                (AdamW, Some(1.0), 0.1, 0.9, 0.95, 1e-8),
                (AdamW, Some(4.0 / 3.0), 0.1, 0.9, 0.95, 1e-8),
            ],
            vec![2.04862e-4, 2.73149e-4],
        ),
        v(
            "scaling_mup_varlen",
            8192,
            1,
            mup_lr,
            1e4,
            0.0,
            false,
            4.0 / 3.0,
            sqrt24,
            mup_groups.clone(),
            vec![2.36554e-4, 3.15406e-4],
        ),
        v(
            "scaling_mup_rbase",
            4096,
            2,
            mup_lr,
            1e4,
            0.0,
            false,
            4.0 / 3.0,
            sqrt24,
            mup_groups.clone(),
            vec![2.36554e-4, 3.15406e-4],
        ),
        v(
            "scaling_mup_rbase_",
            4096,
            2,
            mup_lr,
            6.4e5,
            0.0,
            false,
            4.0 / 3.0,
            sqrt24,
            mup_groups.clone(),
            vec![2.36554e-4, 3.15406e-4],
        ),
        v(
            "scaling_mup_ls_",
            4096,
            2,
            mup_lr,
            1e4,
            0.1,
            false,
            4.0 / 3.0,
            sqrt24,
            mup_groups.clone(),
            vec![2.36554e-4, 3.15406e-4],
        ),
        v(
            "scaling_mup_cosine",
            4096,
            2,
            mup_lr,
            1e4,
            0.0,
            false,
            4.0 / 3.0,
            sqrt24,
            mup_groups.clone(),
            vec![2.39757e-4, 3.19675e-4],
        ),
        v(
            "scaling_mup_wsd",
            4096,
            2,
            mup_lr,
            1e4,
            0.0,
            false,
            4.0 / 3.0,
            sqrt24,
            mup_groups.clone(),
            vec![4.61880e-4, 6.15840e-4],
        ),
        v(
            "scaling_mup_hadam",
            4096,
            2,
            mup_lr,
            1e4,
            0.0,
            false,
            4.0 / 3.0,
            sqrt24,
            vec![
                (AdamW, Some(1.0), 0.0, 0.8, 0.95, 1e-10),
                (NAdam, Some(4.0 / 3.0), 0.1, 0.9, 0.95, 1e-10),
            ],
            vec![2.36554e-4, 3.15406e-4],
        ),
        v(
            "scaling_mup_muon",
            4096,
            2,
            mup_lr,
            1e4,
            0.0,
            false,
            4.0 / 3.0,
            sqrt24,
            vec![
                (AdamW, Some(1.0), 0.0, 0.9, 0.95, 1e-8),
                (Muon, Some(4.0 / 3.0), 0.1, 0.95, 0.0, 1e-7),
            ],
            vec![2.36554e-4, 3.15406e-4],
        ),
        v(
            "scaling_muon",
            4096,
            2,
            4e-4,
            1e4,
            0.0,
            false,
            1.0,
            1.0,
            vec![(AdamW, None, 0.1, 0.9, 0.95, 1e-8)],
            vec![2.04862e-4],
        ),
    ];
    for v in variants {
        let mut inp: RunInputs = inputs("transformer", 12);
        apply_train_name(&mut inp, v.name);
        let plan = compile(&inp).unwrap_or_else(|e| panic!("{}: {e}", v.name));
        let n = v.name;
        assert_eq!(
            (
                plan.layout.seq_len,
                plan.layout.micro_batch,
                plan.layout.gas
            ),
            (v.seq_len, v.micro, 32),
            "{n}"
        );
        assert_eq!(plan.optimizer.groups[0].peak_lr, v.lr, "{n}");
        assert_eq!(plan.model.rope_base, Some(v.rope_base), "{n}");
        assert_eq!(plan.training.label_smoothing, v.label_smoothing, "{n}");
        assert_eq!(plan.model.tied_embeddings, v.tied, "{n}");
        assert_eq!(plan.model.logit_scale, v.logit_scale, "{n}");
        assert!(
            rel_eq(1.0 / plan.model.residual_scale, v.residual_div, 1e-15),
            "{n}"
        );
        assert_eq!(plan.training.max_steps, 20116, "{n}");
        assert_eq!(plan.optimizer.grad_clip, 1.0);
        let got: Vec<_> = plan
            .optimizer
            .groups
            .iter()
            .map(|g| {
                (
                    g.optimizer,
                    g.lr_mult,
                    g.weight_decay,
                    g.beta1,
                    g.beta2,
                    g.eps,
                )
            })
            .collect();
        assert_eq!(got, v.groups, "{n}");
        let it = 10058 * plan.layout.gas as u64 - 1;
        for (g, want) in plan.optimizer.groups.iter().zip(&v.lr_at_10058) {
            let lr = g.lr_at(&plan.schedule, it);
            assert!(
                rel_eq(lr, *want, 5e-6),
                "{n}: group {} LR at step 10058 = {lr}, table {want}",
                g.name
            );
        }
        assert_eq!(
            plan.run_name,
            format!("{n}_transformer_d12_ctx{}", v.seq_len)
        );
        assert_eq!(plan.archscale_summary["train_name"], n);
    }
}

#[test]
fn special_cases_table_10_4() {
    // Long context: transformer d16, ctx 32768, 4e10 tokens, scaling_mup_rbase_varlen.
    let mut inp = inputs("transformer", 16);
    apply_train_name(&mut inp, "scaling_mup_rbase_varlen");
    inp.ctx_len = Some(32768);
    inp.max_tokens = Some(4e10);
    let p = compile(&inp).unwrap();
    assert_eq!(
        (
            p.layout.seq_len,
            p.layout.micro_batch,
            p.training.num_extrapol,
            p.layout.gas
        ),
        (32768, 1, 2, 8)
    );
    assert_eq!(p.layout.batch_tokens, 2_097_152);
    assert_eq!(p.optimizer.groups[0].peak_lr, 4e-4);
    assert_eq!(p.schedule.warmup_iters, 3814);
    assert_eq!(
        (p.schedule.max_iters, p.training.max_steps),
        (152587, 19073)
    );
    assert_eq!(p.archscale_summary["max_iters"].to_string(), "152587.0");
    assert_eq!(p.archscale_summary["max_steps"].to_string(), "19073.0");
    assert_eq!(
        p.archscale_summary["train_tokens"].to_string(),
        "40000000000.0"
    );
    assert_eq!(p.archscale_summary["rope_base"], 640000);
    assert_eq!(
        p.run_name,
        "scaling_mup_rbase_varlen_transformer_d16_ctx32768"
    );
    assert_eq!(p.data.val_block_size, 2 * 32768 + 1);

    // Data scaling: 8 nodes, 2e11 tokens, scaling_mup_tie.
    let mut inp = inputs("transformer", 16);
    apply_train_name(&mut inp, "scaling_mup_tie");
    inp.cluster.nodes = 8;
    inp.max_tokens = Some(2e11);
    let p = compile(&inp).unwrap();
    assert_eq!(p.layout.gas, 4);
    assert_eq!(p.schedule.warmup_iters, 1907);
    assert_eq!(p.training.max_steps, 95367);
    let sv = hparams::setup(&inp).unwrap();
    assert_eq!(sv.global_batch_size, 64);

    // README phi4 run: 128 nodes, ctx 8192, 5e12 tokens, eta0 5e-4, b0 2^23, scaling.
    let mut inp = inputs("phi4miniflash", 32);
    apply_train_name(&mut inp, "scaling");
    inp.cluster.nodes = 128;
    inp.ctx_len = Some(8192);
    inp.max_tokens = Some(5e12);
    inp.base.eta0 = 5e-4;
    inp.base.b0 = 8_388_608;
    inp.base.warmup_tokens0 = 25_165_824_000;
    let p = compile(&inp).unwrap();
    assert_eq!(
        (p.layout.world, p.layout.batch_tokens, p.layout.gas),
        (1024, 8_388_608, 1)
    );
    assert_eq!(p.optimizer.groups.len(), 1);
    assert_eq!(p.optimizer.groups[0].peak_lr, 5e-4);
    assert_eq!(p.optimizer.groups[0].weight_decay, 0.1);
    assert_eq!(p.schedule.warmup_iters, 3000);
    assert_eq!(p.training.max_steps, 596046);
    assert_eq!(
        p.optimizer.groups[0].lr_at(&p.schedule, 0),
        0.0,
        "LR of step 1 is exactly 0"
    );
    assert_eq!(p.data.n_chunks, 128);
    assert!(p.params.iter().all(|p| p.group == 0));

    // 3 nodes x 8: sambay d12, scaling_mup.
    let mut inp = inputs("sambay", 12);
    inp.cluster.nodes = 3;
    let p = compile(&inp).unwrap();
    assert_eq!(p.layout.batch_tokens, 1_966_080);
    assert_eq!(p.layout.gas, 10);
    let want = 4e-4 * (1_966_080f64 / 2_097_152f64).sqrt() * (16f64 / 12f64).sqrt();
    assert_eq!(p.optimizer.groups[0].peak_lr, want);
    assert!(rel_eq(p.optimizer.groups[0].peak_lr, 4.4721e-4, 1e-4));
    assert_eq!(hparams::setup(&inp).unwrap().global_batch_size, 160);
}

fn init_std(rule: &InitRule) -> f64 {
    match rule {
        InitRule::Normal { std } => *std,
        InitRule::Uniform { bound } => bound / 3f64.sqrt(),
        InitRule::Zeros => 0.0,
        other => panic!("no std for {other:?}"),
    }
}

#[test]
fn init_stds_match_table_7_2() {
    let s = |fan_in: f64| 1.0 / (3.0 * fan_in).sqrt();
    // train_name: qkv, attn.proj, w1, w3, wte (None: tied), lm_head.
    let rows: [(&str, [Option<f64>; 6]); 4] = [
        (
            "scaling",
            [
                Some(0.02),
                Some(0.005),
                Some(0.02),
                Some(0.005),
                Some(1e-4),
                Some(0.02),
            ],
        ),
        (
            "scaling_mup",
            [
                Some(s(1024.0)),
                Some(s(1024.0)),
                Some(s(1024.0)),
                Some(s(4096.0)),
                Some(1e-4),
                Some(0.0),
            ],
        ),
        (
            "scaling_mup_tie",
            [
                Some(s(1024.0)),
                Some(s(1024.0) / 4.0),
                Some(s(1024.0)),
                Some(s(4096.0) / 4.0),
                None,
                Some(0.02),
            ],
        ),
        (
            "scaling_ori_mup",
            [
                Some(s(1024.0)),
                Some(s(1024.0)),
                Some(s(1024.0)),
                Some(s(4096.0)),
                Some(1e-4),
                Some(0.0),
            ],
        ),
    ];
    for (name, want) in rows {
        let mut inp = inputs("transformer", 8);
        apply_train_name(&mut inp, name);
        let plan = compile(&inp).unwrap();
        let find = |n: &str| {
            plan.params
                .iter()
                .find(|p| p.name == n || p.aliases.iter().any(|a| a == n))
        };
        let names = [
            "transformer.h.3.attn.attn.weight",
            "transformer.h.3.attn.proj.weight",
            "transformer.h.3.mlp.w1.weight",
            "transformer.h.3.mlp.w3.weight",
            "transformer.wte.weight",
            "lm_head.weight",
        ];
        for (pname, w) in names.iter().zip(want) {
            let p = find(pname).unwrap();
            match w {
                Some(w) => assert!(
                    rel_eq(init_std(&p.init), w, 1e-12),
                    "{name} {pname}: {:?} vs std {w}",
                    p.init
                ),
                None => assert_eq!(
                    p.name, "lm_head.weight",
                    "{name}: tied wte is the lm_head tensor"
                ),
            }
        }
        let norm = find("transformer.h.0.norm_1.weight").unwrap();
        assert_eq!(norm.init, InitRule::Ones);
    }
}

#[test]
fn mamba_init_rules() {
    let find = |plan: &Plan, n: &str| {
        plan.params
            .iter()
            .find(|p| p.name == n)
            .unwrap()
            .init
            .clone()
    };
    // sambay d8: n = 992, L = 8, dt_rank = 62, d_inner = 1984.
    let sp = {
        let mut inp = inputs("sambay", 8);
        apply_train_name(&mut inp, "scaling");
        compile(&inp).unwrap()
    };
    let mup = compile(&inputs("sambay", 8)).unwrap();
    let a = "transformer.h.0.attn";
    assert_eq!(
        find(&sp, &format!("{a}.dt_proj.weight")),
        InitRule::Normal { std: 0.02 }
    );
    assert_eq!(
        find(&mup, &format!("{a}.dt_proj.weight")),
        InitRule::Uniform {
            bound: 62f64.powf(-0.5)
        }
    );
    assert_eq!(
        find(&sp, &format!("{a}.out_proj.weight")),
        InitRule::Normal { std: 0.02 / 4.0 }
    );
    assert_eq!(
        find(&mup, &format!("{a}.out_proj.weight")),
        InitRule::Uniform {
            bound: 1.0 / 1984f64.sqrt()
        }
    );
    for plan in [&sp, &mup] {
        assert_eq!(
            find(plan, &format!("{a}.conv1d.weight")),
            InitRule::Uniform { bound: 0.5 }
        );
        assert_eq!(
            find(plan, &format!("{a}.conv1d.bias")),
            InitRule::Uniform { bound: 0.5 }
        );
        assert_eq!(find(plan, &format!("{a}.A_log")), InitRule::MambaALog);
        assert_eq!(find(plan, &format!("{a}.D")), InitRule::Ones);
        assert!(matches!(
            find(plan, &format!("{a}.dt_proj.bias")),
            InitRule::MambaDtBias { .. }
        ));
    }
    // Groups under μP: conv1d, A_log, D, dt bias are vectors; projections are weights.
    let group = |n: &str| mup.params.iter().find(|p| p.name == n).unwrap().group;
    for v in ["conv1d.weight", "conv1d.bias", "A_log", "D", "dt_proj.bias"] {
        assert_eq!(group(&format!("{a}.{v}")), 0, "{v}");
    }
    for w in [
        "in_proj.weight",
        "x_proj.weight",
        "dt_proj.weight",
        "out_proj.weight",
    ] {
        assert_eq!(group(&format!("{a}.{w}")), 1, "{w}");
    }
    assert_eq!(group("transformer.h.6.attn.gmu.out_proj.weight"), 1);
    assert_eq!(
        find(&mup, "transformer.h.6.attn.gmu.out_proj.weight"),
        InitRule::Uniform {
            bound: 1.0 / 1984f64.sqrt()
        }
    );
}

#[test]
fn differential_attention_names_and_rejection() {
    let plan = compile(&inputs("sambayda", 8)).unwrap();
    let names: Vec<&str> = plan
        .params
        .iter()
        .filter(|p| p.name.starts_with("transformer.h.1.attn."))
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "transformer.h.1.attn.attn.weight",
            "transformer.h.1.attn.da.lambda_q1",
            "transformer.h.1.attn.da.lambda_k1",
            "transformer.h.1.attn.da.lambda_q2",
            "transformer.h.1.attn.da.lambda_k2",
            "transformer.h.1.attn.da.subln.weight",
            "transformer.h.1.attn.proj.weight",
        ]
    );
    for d in [12, 20] {
        let err = compile(&inputs("sambayda", d)).unwrap_err();
        assert_eq!(err.key, "depth");
        assert!(
            err.message.contains("differential attention"),
            "{}",
            err.message
        );
    }
}

#[test]
fn phi4_tied_layer_norm_biases() {
    let mut inp = inputs("phi4miniflash", 32);
    apply_train_name(&mut inp, "scaling");
    let plan = compile(&inp).unwrap();
    assert_eq!(plan.params[0].name, "lm_head.weight");
    assert_eq!(
        plan.params[0].aliases,
        vec!["transformer.wte.weight".to_string()]
    );
    assert_eq!(plan.params[0].init, InitRule::Normal { std: 0.02 });
    assert!(plan
        .params
        .iter()
        .any(|p| p.name == "transformer.h.1.attn.attn.bias"));
    assert!(plan
        .params
        .iter()
        .any(|p| p.name == "transformer.h.1.attn.proj.bias"));
    assert!(plan
        .params
        .iter()
        .any(|p| p.name == "transformer.ln_f.bias"));
    // The run is tied because the family is, so the derived name needs no `_tie`.
    assert_eq!(plan.run_name, "scaling_phi4miniflash_d32_ctx4096");
    assert_eq!(plan.model.attn_scale, 1.0 / 8.0);
    let mup = compile(&inputs("phi4miniflash", 32)).unwrap();
    assert_eq!(mup.model.attn_scale, (1.0 / 8.0) * (128f64.sqrt() / 8.0));
}

#[test]
fn sambayoco_d16_matches_the_arch_spec_count() {
    // arch-spec §1.1 gives 1138.7M (a hand count there, not an oracle value).
    let inp = inputs("sambayoco", 16);
    let sv = hparams::setup(&inp).unwrap();
    let (_, params) = model_and_params(&inp, &sv).unwrap();
    let total = archscale_compiler::params::count_total(&params) as f64 / 1e6;
    assert!((total - 1138.7).abs() < 0.05, "{total}");
}
