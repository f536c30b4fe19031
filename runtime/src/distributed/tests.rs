use super::flat_layout::FlatLayout;
use super::*;
use archscale_compiler::plan::{Plan, Sharding};

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn err(pairs: &[(&str, &str)]) -> String {
    RankEnv::from_map(&env(pairs)).unwrap_err().to_string()
}

#[test]
fn no_launcher_is_a_single_process() {
    let e = RankEnv::from_map(&env(&[("PATH", "/bin")])).unwrap();
    assert_eq!(
        (e.rank, e.world, e.local_rank, e.local_world, e.node_rank()),
        (0, 1, 0, 1, 0)
    );
    assert_eq!(
        (e.master_addr.as_str(), e.master_port, e.source),
        ("127.0.0.1", 29500, EnvSource::Single)
    );
}

#[test]
fn torchrun_variables() {
    let e = RankEnv::from_map(&env(&[
        ("RANK", "11"),
        ("WORLD_SIZE", "16"),
        ("LOCAL_RANK", "3"),
        ("LOCAL_WORLD_SIZE", "8"),
        ("MASTER_ADDR", "10.0.0.5"),
        ("MASTER_PORT", "29400"),
        // Torchrun wins over Slurm when both are set (torchrun inside an sbatch job).
        ("SLURM_PROCID", "0"),
        ("SLURM_NTASKS", "2"),
    ]))
    .unwrap();
    assert_eq!(
        (e.rank, e.world, e.local_rank, e.local_world, e.node_rank()),
        (11, 16, 3, 8, 1)
    );
    assert_eq!(
        (e.master_addr.as_str(), e.master_port, e.source),
        ("10.0.0.5", 29400, EnvSource::Torchrun)
    );
}

#[test]
fn slurm_variables_and_master_fallbacks() {
    let base = [
        ("SLURM_PROCID", "9"),
        ("SLURM_NTASKS", "16"),
        ("SLURM_LOCALID", "1"),
    ];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut all = base.to_vec();
        all.extend_from_slice(extra);
        RankEnv::from_map(&env(&all)).unwrap()
    };
    let e = with(&[
        ("SLURM_NTASKS_PER_NODE", "8(x2)"),
        ("SLURM_JOB_NODELIST", "gpu-[03-04]"),
    ]);
    assert_eq!(
        (e.rank, e.world, e.local_rank, e.local_world, e.node_rank()),
        (9, 16, 1, 8, 1)
    );
    assert_eq!(
        (e.master_addr.as_str(), e.source),
        ("gpu-03", EnvSource::Slurm)
    );
    let e = with(&[
        ("SLURM_JOB_NUM_NODES", "4"),
        ("SLURM_LAUNCH_NODE_IPADDR", "10.1.1.1"),
        ("SLURM_JOB_NODELIST", "a,b"),
    ]);
    assert_eq!((e.local_world, e.master_addr.as_str()), (4, "10.1.1.1"));
    let e = with(&[
        ("SLURM_NTASKS_PER_NODE", "8"),
        ("MASTER_ADDR", "head"),
        ("SLURM_LAUNCH_NODE_IPADDR", "10.1.1.1"),
    ]);
    assert_eq!(e.master_addr, "head");
}

#[test]
fn slurm_node_list_first_host() {
    assert_eq!(first_host("gpu-[03-05,9],cpu1").as_deref(), Some("gpu-03"));
    assert_eq!(first_host("node7,node8").as_deref(), Some("node7"));
    assert_eq!(first_host("node[12,14]-ib").as_deref(), Some("node12-ib"));
    assert_eq!(first_host("single").as_deref(), Some("single"));
    assert_eq!(first_host("a,b[1-2]").as_deref(), Some("a"));
    assert_eq!(first_host("bad[").as_deref(), None);
}

#[test]
fn inconsistent_values_name_the_variables() {
    assert!(err(&[("RANK", "4"), ("WORLD_SIZE", "4")]).contains("RANK=4 is not below WORLD_SIZE=4"));
    assert!(err(&[("RANK", "1")]).contains("RANK is set but WORLD_SIZE is not"));
    assert!(
        err(&[("RANK", "x"), ("WORLD_SIZE", "2")]).contains("RANK=x is not a non-negative integer")
    );
    assert!(err(&[
        ("RANK", "0"),
        ("WORLD_SIZE", "6"),
        ("LOCAL_WORLD_SIZE", "4")
    ])
    .contains("WORLD_SIZE=6 is not a multiple of LOCAL_WORLD_SIZE=4"));
    assert!(err(&[
        ("RANK", "0"),
        ("WORLD_SIZE", "8"),
        ("LOCAL_RANK", "4"),
        ("LOCAL_WORLD_SIZE", "4")
    ])
    .contains("LOCAL_RANK=4 is not below LOCAL_WORLD_SIZE=4"));
    assert!(
        err(&[("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_PORT", "70000")])
            .contains("MASTER_PORT=70000")
    );
    assert!(err(&[
        ("SLURM_PROCID", "2"),
        ("SLURM_NTASKS", "2"),
        ("MASTER_ADDR", "h")
    ])
    .contains("SLURM_PROCID=2 is not below SLURM_NTASKS=2"));
    assert!(err(&[
        ("SLURM_PROCID", "0"),
        ("SLURM_NTASKS", "6"),
        ("SLURM_JOB_NUM_NODES", "4"),
        ("MASTER_ADDR", "h")
    ])
    .contains("SLURM_NTASKS=6 is not a multiple of SLURM_JOB_NUM_NODES=4"));
    assert!(err(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2")]).contains("set MASTER_ADDR"));
}

/// Compiled plans of a small transformer on `nodes x gpus` under each sharding.
fn plan(nodes: usize, gpus: usize, sharding: &str) -> Plan {
    plan_with_optimizer(nodes, gpus, sharding, "adamw")
}

fn plan_with_optimizer(nodes: usize, gpus: usize, sharding: &str, optimizer: &str) -> Plan {
    let dir = tempfile::tempdir().unwrap();
    let experiment = format!(
        r#"arch = "transformer"
depth = 4
parametrization = "mup++"

[base]
depth = 4
lr = 1e-3
batch_tokens = 4096
warmup_tokens = 4096

[train]
tokens = 40960
seq_len = 64
micro_batch = 1
optimizer = "{optimizer}"

[data]
train = [{{ synthetic = {{ seed = 1, tokens = 10_000 }} }}]
val = [{{ synthetic = {{ seed = 2, tokens = 1_000 }} }}]

[cluster]
nodes = {nodes}
gpus_per_node = {gpus}
gpu_memory_gib = 80
sharding = "{sharding}"
"#
    );
    let exp = archscale_spec::parse_experiment("exp.toml", &experiment, dir.path(), &[])
        .unwrap_or_else(|e| panic!("{}", e.render()));
    let mut plans =
        archscale_compiler::plan_experiment(&exp).unwrap_or_else(|e| panic!("{}", e.render()));
    plans.swap_remove(0)
}

#[test]
fn per_rank_bytes_agree_with_plan_estimates() {
    for (nodes, gpus) in [(1, 1), (1, 4), (2, 4)] {
        for sharding in ["data_parallel", "zero1", "zero3", "hybrid_shard"] {
            let plan = plan(nodes, gpus, sharding);
            let world = plan.layout.world;
            // the ranks a state is cut over: none, the world, or the GPUs of a node
            let (params_over, optimizer_over) = match plan.layout.sharding {
                Sharding::DataParallel => (1, 1),
                Sharding::Zero1 => (1, world),
                Sharding::Zero3 => (world, world),
                Sharding::HybridShard => (gpus, gpus),
            };
            let mem = &plan.estimates.memory;
            // every buffer is one `Gpu::alloc`, rounded up to 256 bytes
            let alloc = |bytes: usize| (bytes.max(1).div_ceil(256) * 256) as u64;
            // the runtime's layout is cut into `optimizer_over` shards (units padded to
            // 64·shards); params and grads are the whole flat buffer unless ZeRO-3 shards them
            let opt_layout = FlatLayout::new(&plan, optimizer_over, 0).unwrap();
            let param_elems = if params_over > 1 {
                opt_layout.local_len
            } else {
                opt_layout.numel
            };
            let state = alloc(param_elems * 4);
            assert_eq!(mem.params_bytes, state, "{nodes}x{gpus} {sharding}: params");
            assert_eq!(mem.grads_bytes, state, "{nodes}x{gpus} {sharding}: grads");
            // the first fp32 moment of the rank's chunks, the second of its AdamW tensors
            // only (compact, the longest rank's length), plus the AdamW work-item tables
            // (offset, bf16-gradient offset and second-moment offset i64, length and group
            // i32) and the groups' hyperparameters
            let items: usize = (0..opt_layout.units.len())
                .map(|u| opt_layout.opt_chunks(u).len())
                .sum();
            let adamw = |i: usize| {
                plan.optimizer.groups[plan.params[i].group].optimizer
                    == archscale_compiler::plan::OptimizerKind::AdamW
            };
            let optimizer = alloc(opt_layout.local_len * 4)
                + alloc(opt_layout.compact_state_len(&adamw) * 4)
                + 3 * alloc(items * 8)
                + 2 * alloc(items * 4)
                + alloc(8 * 4 * plan.optimizer.groups.len());
            assert_eq!(
                mem.optimizer_bytes, optimizer,
                "{nodes}x{gpus} {sharding}: optimizer"
            );
        }
    }
}

#[test]
fn rank_env_checked_against_plan_layout() {
    let p = plan(2, 4, "hybrid_shard");
    assert_eq!(p.layout.sharding, Sharding::HybridShard);
    let ok = RankEnv::from_map(&env(&[
        ("RANK", "5"),
        ("WORLD_SIZE", "8"),
        ("LOCAL_WORLD_SIZE", "4"),
        ("LOCAL_RANK", "1"),
    ]))
    .unwrap();
    ok.check_layout(&p.layout).unwrap();
    let single = RankEnv::from_map(&env(&[])).unwrap();
    let e = single.check_layout(&p.layout).unwrap_err().to_string();
    assert!(
        e.contains("WORLD_SIZE=1 but the plan's world is 8 (2 nodes x 4 GPUs)"),
        "{e}"
    );
    let wrong_node = RankEnv::from_map(&env(&[
        ("RANK", "0"),
        ("WORLD_SIZE", "8"),
        ("LOCAL_WORLD_SIZE", "8"),
    ]))
    .unwrap();
    assert!(wrong_node
        .check_layout(&p.layout)
        .unwrap_err()
        .to_string()
        .contains("LOCAL_WORLD_SIZE=8 but the plan runs 4 GPUs per node"));
}

/// Deterministic full tensors in plan order (varied signs and magnitudes).
fn full_tensors(plan: &Plan, salt: u32) -> Vec<Vec<f32>> {
    plan.params
        .iter()
        .enumerate()
        .map(|(i, p)| {
            (0..p.numel())
                .map(|e| {
                    let x = (e as u32)
                        .wrapping_mul(2654435761)
                        .wrapping_add(salt + i as u32 * 7919);
                    (x % 20001) as f32 * 1e-4 - 1.0
                })
                .collect()
        })
        .collect()
}

/// Every rank of a ZeRO world writes its optimizer shard at once (threads, a real barrier);
/// state is cut into `shards` chunks (fewer than `world` under hybrid shard: replicas).
fn save_from_ranks(
    plan: &Plan,
    world: usize,
    shards: usize,
    run_dir: &std::path::Path,
) -> std::path::PathBuf {
    use crate::checkpoint::{save_sharded, TrainState};
    use crate::distributed::flat_layout::FlatLayout;
    let params = full_tensors(plan, 1);
    let m = full_tensors(plan, 2);
    let v = full_tensors(plan, 3);
    let barrier = std::sync::Barrier::new(world);
    let paths: Vec<Option<std::path::PathBuf>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let (params, m, v, barrier) = (&params, &m, &v, &barrier);
                s.spawn(move || {
                    let layout = FlatLayout::new(plan, shards, rank % shards).unwrap();
                    fn refs(t: &[Vec<f32>]) -> Vec<&[f32]> {
                        t.iter().map(|x| x.as_slice()).collect()
                    }
                    let shard = crate::OptimizerShard {
                        step: 7,
                        rank,
                        manifest: layout.manifest(plan.layout.sharding, shards, "optimizer"),
                        exp_avg: layout.local_from_full(&refs(m)).unwrap(),
                        exp_avg_sq: layout.local_from_full(&refs(v)).unwrap(),
                    };
                    let state = TrainState {
                        format: 0,
                        run_name: plan.run_name.clone(),
                        step: 7,
                        iter_num: 7,
                        tokens: 7 * 4096,
                        optimizer_step: 0,
                        loaders: vec![],
                        sha256: Default::default(),
                    };
                    let wait = || {
                        barrier.wait();
                        Ok(())
                    };
                    save_sharded(
                        run_dir,
                        plan,
                        (rank == 0).then_some(&params[..]),
                        &shard,
                        state,
                        &wait,
                    )
                    .unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(paths[1..].iter().all(|p| p.is_none()));
    paths[0].clone().unwrap()
}

#[test]
fn sharded_checkpoint_loads_whole_and_reshards_to_any_world() {
    use crate::distributed::flat_layout::FlatLayout;
    let plan = plan(1, 4, "zero1");
    let dir = tempfile::tempdir().unwrap();
    let ck_dir = save_from_ranks(&plan, 4, 4, dir.path());
    let names: Vec<String> = std::fs::read_dir(&ck_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for f in [
        "model.safetensors",
        "state.json",
        "optimizer.exp_avg.manifest.json",
        "optimizer.exp_avg_sq.shard-00003-of-00004.bin",
    ] {
        assert!(names.iter().any(|n| n == f), "{f} missing from {names:?}");
    }
    assert!(
        !names.iter().any(|n| n.contains("sha256.json")),
        "{names:?}"
    );

    let ck = crate::checkpoint::load(&ck_dir, &plan).unwrap();
    assert_eq!(ck.params, full_tensors(&plan, 1));
    assert_eq!(ck.optimizer.step, 7);
    let (m, v) = (full_tensors(&plan, 2), full_tensors(&plan, 3));
    for (i, p) in plan.params.iter().enumerate() {
        let get = |suffix: &str| {
            let name = format!("{}.{suffix}", p.name);
            ck.optimizer
                .tensors
                .iter()
                .find(|(n, _)| *n == name)
                .unwrap()
                .1
                .clone()
        };
        assert_eq!(get("exp_avg"), m[i], "{}", p.name);
        assert_eq!(get("exp_avg_sq"), v[i], "{}", p.name);
    }
    // what a rank of a 3-GPU world keeps equals cutting the original state directly
    let refs: Vec<&[f32]> = m.iter().map(|x| x.as_slice()).collect();
    let loaded: Vec<Vec<f32>> = plan
        .params
        .iter()
        .map(|p| {
            let name = format!("{}.exp_avg", p.name);
            ck.optimizer
                .tensors
                .iter()
                .find(|(n, _)| *n == name)
                .unwrap()
                .1
                .clone()
        })
        .collect();
    let loaded_refs: Vec<&[f32]> = loaded.iter().map(|x| x.as_slice()).collect();
    for rank in 0..3 {
        let l = FlatLayout::new(&plan, 3, rank).unwrap();
        assert_eq!(
            l.local_from_full(&loaded_refs).unwrap(),
            l.local_from_full(&refs).unwrap()
        );
    }
}

#[test]
fn a_corrupt_or_missing_optimizer_shard_is_named() {
    let plan = plan(1, 2, "zero3");
    let dir = tempfile::tempdir().unwrap();
    let ck_dir = save_from_ranks(&plan, 2, 2, dir.path());
    let shard = ck_dir.join("optimizer.exp_avg.shard-00001-of-00002.bin");
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes[5] ^= 0x40;
    std::fs::write(&shard, &bytes).unwrap();
    let err = crate::checkpoint::load(&ck_dir, &plan)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("shard-00001-of-00002.bin") && err.contains("corrupt"),
        "{err}"
    );
    std::fs::remove_file(&shard).unwrap();
    let err = crate::checkpoint::load(&ck_dir, &plan)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("shard-00001-of-00002.bin"), "{err}");
}

#[test]
fn a_resume_on_the_same_layout_reads_only_its_own_shard() {
    use crate::checkpoint::{load_with, Checkpoint, OptimizerRead};
    use crate::distributed::flat_layout::FlatLayout;
    let plan = plan(1, 4, "zero1");
    let dir = tempfile::tempdir().unwrap();
    let ck_dir = save_from_ranks(&plan, 4, 4, dir.path());
    // the checkpoint as rank `rank` of a layout cut into `shards` chunks loads it
    let load_as = |shards: usize, rank: usize| -> crate::Result<Checkpoint> {
        let ours = FlatLayout::new(&plan, shards, rank).unwrap().manifest(
            plan.layout.sharding,
            shards,
            "optimizer",
        );
        let read = OptimizerRead::Shard {
            ours: &ours,
            chunk: rank,
        };
        load_with(&ck_dir, &plan, read)
    };
    let (m, v) = (full_tensors(&plan, 2), full_tensors(&plan, 3));
    fn slices(t: &[Vec<f32>]) -> Vec<&[f32]> {
        t.iter().map(|x| x.as_slice()).collect()
    }
    for rank in 0..4 {
        let layout = FlatLayout::new(&plan, 4, rank).unwrap();
        let ck = load_as(4, rank).unwrap();
        let shard = ck.optimizer_shard.expect("own shard");
        assert!(ck.optimizer.tensors.is_empty());
        assert_eq!(shard.step, 7);
        assert_eq!(shard.exp_avg, layout.local_from_full(&slices(&m)).unwrap());
        assert_eq!(
            shard.exp_avg_sq,
            layout.local_from_full(&slices(&v)).unwrap()
        );
    }
    // a layout cut another way (2 shards) reads the whole state instead
    let ck = load_as(2, 1).unwrap();
    assert!(ck.optimizer_shard.is_none());
    assert_eq!(ck.optimizer.tensors.len(), 2 * plan.params.len());
    // parameters only
    let ck = load_with(&ck_dir, &plan, OptimizerRead::Nothing).unwrap();
    assert!(ck.optimizer.tensors.is_empty() && ck.optimizer_shard.is_none());
    assert_eq!(ck.params, full_tensors(&plan, 1));
    // a corrupt shard of another rank does not concern this one; its own is named
    let other = ck_dir.join("optimizer.exp_avg_sq.shard-00002-of-00004.bin");
    let mut bytes = std::fs::read(&other).unwrap();
    bytes[9] ^= 0x10;
    std::fs::write(&other, &bytes).unwrap();
    assert!(load_as(4, 1).is_ok());
    let err = load_as(4, 2).err().unwrap().to_string();
    assert!(
        err.contains("shard-00002-of-00004.bin") && err.contains("corrupt"),
        "{err}"
    );
}

#[test]
fn hybrid_shard_replicas_write_nothing_and_the_checkpoint_loads_whole() {
    let plan = plan(2, 2, "hybrid_shard");
    let dir = tempfile::tempdir().unwrap();
    let ck_dir = save_from_ranks(&plan, 4, 2, dir.path());
    let mut names: Vec<String> = std::fs::read_dir(&ck_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "model.safetensors",
            "optimizer.exp_avg.manifest.json",
            "optimizer.exp_avg.shard-00000-of-00002.bin",
            "optimizer.exp_avg.shard-00001-of-00002.bin",
            "optimizer.exp_avg_sq.manifest.json",
            "optimizer.exp_avg_sq.shard-00000-of-00002.bin",
            "optimizer.exp_avg_sq.shard-00001-of-00002.bin",
            "state.json"
        ]
    );
    let ck = crate::checkpoint::load(&ck_dir, &plan).unwrap();
    let m = full_tensors(&plan, 2);
    for (i, p) in plan.params.iter().enumerate() {
        let name = format!("{}.exp_avg", p.name);
        let t = &ck
            .optimizer
            .tensors
            .iter()
            .find(|(n, _)| *n == name)
            .unwrap()
            .1;
        assert_eq!(t, &m[i], "{}", p.name);
    }
}

#[test]
fn a_sharded_muon_momentum_loads_under_the_name_one_gpu_and_the_cpu_use() {
    use archscale_compiler::plan::OptimizerKind;
    let plan = plan_with_optimizer(1, 4, "zero1", "muon");
    let dir = tempfile::tempdir().unwrap();
    let ck_dir = save_from_ranks(&plan, 4, 4, dir.path());
    let ck = crate::checkpoint::load(&ck_dir, &plan).unwrap();
    let (m, v) = (full_tensors(&plan, 2), full_tensors(&plan, 3));
    let get = |name: String| {
        ck.optimizer
            .tensors
            .iter()
            .find(|(n, _)| *n == name)
            .map(|t| t.1.clone())
    };
    let mut muon = 0;
    for (i, p) in plan.params.iter().enumerate() {
        if plan.optimizer.groups[p.group].optimizer == OptimizerKind::Muon {
            muon += 1;
            assert_eq!(
                get(format!("{}.momentum_buffer", p.name)),
                Some(m[i].clone())
            );
            assert_eq!(get(format!("{}.exp_avg", p.name)), None, "{}", p.name);
            assert_eq!(get(format!("{}.exp_avg_sq", p.name)), None, "{}", p.name);
        } else {
            assert_eq!(get(format!("{}.exp_avg", p.name)), Some(m[i].clone()));
            assert_eq!(get(format!("{}.exp_avg_sq", p.name)), Some(v[i].clone()));
        }
    }
    assert_eq!(muon, 4 * plan.model.n_layer);
}
