//! Multi-GPU training: who this process is (rank environment from torchrun or Slurm),
//! where every parameter lives in the flat buffers and which chunk of each unit a rank owns
//! under ZeRO (`flat_layout`), the manifest of a sharded checkpoint that any world size can
//! read (`manifest`), and communication (`nccl`: bootstrap, all-reduce, reduce-scatter,
//! all-gather, sub-communicators for hybrid shard).

pub mod flat_layout;
pub mod manifest;
pub mod nccl;
pub mod watchdog;

use crate::{Result, RuntimeError};
use archscale_compiler::plan::ParallelLayout;
use std::collections::HashMap;

/// Port used when neither `MASTER_PORT` nor the scheduler names one (torchrun's default).
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// Where the rank environment came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EnvSource {
    /// No launcher variables: one process, rank 0 of 1.
    Single,
    /// torchrun (or any launcher setting `RANK`/`WORLD_SIZE`).
    Torchrun,
    /// `srun` under Slurm (`SLURM_PROCID`/`SLURM_NTASKS`).
    Slurm,
}

/// This process's place in the job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankEnv {
    pub rank: usize,
    pub world: usize,
    /// Index of this process on its node (its GPU).
    pub local_rank: usize,
    /// Processes per node.
    pub local_world: usize,
    /// Rendezvous address of rank 0 and its port.
    pub master_addr: String,
    pub master_port: u16,
    pub source: EnvSource,
}

impl RankEnv {
    /// Reads the process environment (see [`RankEnv::from_map`]).
    pub fn from_env() -> Result<Self> {
        Self::from_map(&std::env::vars().collect())
    }

    /// The rank environment from launcher variables: torchrun's `RANK`, `WORLD_SIZE`,
    /// `LOCAL_RANK`, `LOCAL_WORLD_SIZE` first, else Slurm's `SLURM_PROCID`, `SLURM_NTASKS`,
    /// `SLURM_LOCALID`, `SLURM_NTASKS_PER_NODE` (or tasks / `SLURM_JOB_NUM_NODES`), else a
    /// single process. The master is `MASTER_ADDR`/`MASTER_PORT`; under Slurm without
    /// `MASTER_ADDR`, `SLURM_LAUNCH_NODE_IPADDR` or the first host of `SLURM_JOB_NODELIST`.
    pub fn from_map(env: &HashMap<String, String>) -> Result<Self> {
        let get = |k: &str| env.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
        let port = match get("MASTER_PORT") {
            Some(p) => p
                .parse::<u16>()
                .map_err(|_| msg(format!("MASTER_PORT={p} is not a port number (0-65535)")))?,
            None => DEFAULT_MASTER_PORT,
        };
        let env_ = if get("RANK").is_some() || get("WORLD_SIZE").is_some() {
            let rank = required(env, "RANK", "WORLD_SIZE")?;
            let world = required(env, "WORLD_SIZE", "RANK")?;
            let local_rank = optional(env, "LOCAL_RANK")?.unwrap_or(rank);
            let local_world = optional(env, "LOCAL_WORLD_SIZE")?.unwrap_or(world);
            RankEnv {
                rank,
                world,
                local_rank,
                local_world,
                master_addr: get("MASTER_ADDR").unwrap_or("127.0.0.1").to_string(),
                master_port: port,
                source: EnvSource::Torchrun,
            }
        } else if get("SLURM_PROCID").is_some() || get("SLURM_NTASKS").is_some() {
            let rank = required(env, "SLURM_PROCID", "SLURM_NTASKS")?;
            let world = required(env, "SLURM_NTASKS", "SLURM_PROCID")?;
            let local_rank = optional(env, "SLURM_LOCALID")?.unwrap_or(0);
            let local_world = match get("SLURM_NTASKS_PER_NODE") {
                // Slurm writes `8` or `8(x2)` (8 tasks on each of 2 nodes); heterogeneous
                // lists like `8(x2),4` cannot be one layout.
                Some(v) => {
                    let first = v.split('(').next().unwrap_or(v);
                    if v.contains(',') {
                        return Err(msg(format!(
                            "SLURM_NTASKS_PER_NODE={v}: nodes run different task counts; every node must run the same number of GPUs"
                        )));
                    }
                    first.parse::<usize>().map_err(|_| {
                        msg(format!("SLURM_NTASKS_PER_NODE={v} is not a task count"))
                    })?
                }
                None => match optional(env, "SLURM_JOB_NUM_NODES")? {
                    Some(0) => return Err(msg("SLURM_JOB_NUM_NODES=0: a job needs at least one node".into())),
                    Some(n) if world.is_multiple_of(n) => world / n,
                    Some(n) => {
                        return Err(msg(format!(
                            "SLURM_NTASKS={world} is not a multiple of SLURM_JOB_NUM_NODES={n}: every node must run the same number of tasks"
                        )))
                    }
                    None => world,
                },
            };
            let master_addr = match (get("MASTER_ADDR"), get("SLURM_LAUNCH_NODE_IPADDR"), get("SLURM_JOB_NODELIST")) {
                (Some(a), _, _) | (None, Some(a), _) => a.to_string(),
                (None, None, Some(list)) => first_host(list).ok_or_else(|| {
                    msg(format!("SLURM_JOB_NODELIST={list}: cannot read its first host; set MASTER_ADDR"))
                })?,
                (None, None, None) => {
                    return Err(msg(
                        "under Slurm, set MASTER_ADDR or run inside a job (SLURM_LAUNCH_NODE_IPADDR / SLURM_JOB_NODELIST unset)".into(),
                    ))
                }
            };
            RankEnv {
                rank,
                world,
                local_rank,
                local_world,
                master_addr,
                master_port: port,
                source: EnvSource::Slurm,
            }
        } else {
            RankEnv {
                rank: 0,
                world: 1,
                local_rank: 0,
                local_world: 1,
                master_addr: get("MASTER_ADDR").unwrap_or("127.0.0.1").to_string(),
                master_port: port,
                source: EnvSource::Single,
            }
        };
        env_.check()?;
        Ok(env_)
    }

    /// Names of the variables this environment was read from: (rank, world, local rank, local world).
    fn names(&self) -> [&'static str; 4] {
        match self.source {
            EnvSource::Slurm => [
                "SLURM_PROCID",
                "SLURM_NTASKS",
                "SLURM_LOCALID",
                "SLURM_NTASKS_PER_NODE",
            ],
            _ => ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"],
        }
    }

    fn check(&self) -> Result<()> {
        let [rank, world, local_rank, local_world] = self.names();
        if self.world == 0 {
            return Err(msg(format!("{world}=0: a job needs at least one process")));
        }
        if self.rank >= self.world {
            return Err(msg(format!(
                "{rank}={} is not below {world}={}",
                self.rank, self.world
            )));
        }
        if self.local_world == 0 || !self.world.is_multiple_of(self.local_world) {
            return Err(msg(format!(
                "{world}={} is not a multiple of {local_world}={}: every node must run the same number of processes",
                self.world, self.local_world
            )));
        }
        if self.local_rank >= self.local_world {
            return Err(msg(format!(
                "{local_rank}={} is not below {local_world}={}",
                self.local_rank, self.local_world
            )));
        }
        Ok(())
    }

    /// Node index of this process (ranks are numbered node-major, as torchrun and srun do).
    pub fn node_rank(&self) -> usize {
        self.rank / self.local_world
    }

    /// Errors unless this job matches the plan's layout (world and processes per node).
    pub fn check_layout(&self, layout: &ParallelLayout) -> Result<()> {
        let [_, world, _, local_world] = self.names();
        if self.world != layout.world {
            return Err(msg(format!(
                "{world}={} but the plan's world is {} ({} nodes x {} GPUs); launch it with `archscale launch` or set cluster.nodes / cluster.gpus_per_node",
                self.world, layout.world, layout.nodes, layout.gpus_per_node
            )));
        }
        if self.local_world != layout.gpus_per_node {
            return Err(msg(format!(
                "{local_world}={} but the plan runs {} GPUs per node",
                self.local_world, layout.gpus_per_node
            )));
        }
        Ok(())
    }
}

fn msg(text: String) -> RuntimeError {
    RuntimeError::Message(text)
}

fn optional(env: &HashMap<String, String>, key: &str) -> Result<Option<usize>> {
    match env.get(key).map(|v| v.trim()).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v) => v
            .parse::<usize>()
            .map(Some)
            .map_err(|_| msg(format!("{key}={v} is not a non-negative integer"))),
    }
}

fn required(env: &HashMap<String, String>, key: &str, partner: &str) -> Result<usize> {
    optional(env, key)?.ok_or_else(|| {
        msg(format!(
            "{partner} is set but {key} is not; a launcher sets both"
        ))
    })
}

/// The first host of a Slurm node list: `gpu-[03-05,9],cpu1` -> `gpu-03`.
pub fn first_host(list: &str) -> Option<String> {
    let list = list.trim();
    let (head, rest) = match list.find('[') {
        Some(open) if !list[..open].contains(',') => (&list[..open], &list[open + 1..]),
        _ => {
            return list
                .split(',')
                .next()
                .map(str::to_string)
                .filter(|h| !h.is_empty())
        }
    };
    let close = rest.find(']')?;
    let first = rest[..close].split([',', '-']).next()?.trim();
    // A suffix after the bracket belongs to every host (`node[1-2]-ib` -> `node1-ib`).
    let suffix = rest[close + 1..].split(',').next().unwrap_or("");
    if first.is_empty() {
        return None;
    }
    Some(format!("{head}{first}{suffix}"))
}

#[cfg(test)]
mod tests;
