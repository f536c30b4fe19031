//! `largest_micro_that_fits`: the micro-batch `archscale bench --micro fit` picks.

use archscale_compiler::estimates::{largest_micro_that_fits, plan_memory};
use std::path::Path;

fn d8_plan() -> archscale_compiler::Plan {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/transformer_ctx4096.toml");
    let e = archscale_spec::load_experiment(&file, &["depth=[8]".to_string()])
        .unwrap_or_else(|e| panic!("{e}"));
    let mut plans = archscale_compiler::plan_experiment(&e).unwrap_or_else(|e| panic!("{e}"));
    plans.remove(0)
}

fn total_at(plan: &archscale_compiler::Plan, micro: usize) -> u64 {
    let mut p = plan.clone();
    p.layout.micro_batch = micro;
    plan_memory(&p).total_bytes
}

#[test]
fn the_largest_micro_batch_fits_and_one_more_does_not() {
    let plan = d8_plan();
    for gib in [8u64, 20, 80, 139] {
        let bytes = gib << 30;
        let m = largest_micro_that_fits(&plan, bytes, 1 << 12).expect("one sequence fits");
        assert!(total_at(&plan, m) <= bytes, "{gib} GiB: micro {m}");
        assert!(
            total_at(&plan, m + 1) > bytes,
            "{gib} GiB: micro {} fits too",
            m + 1
        );
    }
}

#[test]
fn nothing_fits_in_too_little_memory_and_the_limit_is_kept() {
    let plan = d8_plan();
    assert_eq!(largest_micro_that_fits(&plan, 1 << 20, 64), None);
    assert_eq!(largest_micro_that_fits(&plan, 139 << 30, 3), Some(3));
}
