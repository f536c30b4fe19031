//! `archscale import-archscale [--nodes N] [--gpus-per-node G] -- <pretrain.py arguments>`:
//! print the equivalent experiment TOML (settings decoded from `train_name`, name kept).

use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// Nodes (ArchScale reads NODE_COUNT from the environment).
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,
    /// GPUs per node (ArchScale uses torch.cuda.device_count()).
    #[arg(long = "gpus-per-node", default_value_t = 8)]
    pub gpus_per_node: usize,
    /// ArchScale `pretrain.py` arguments, after `--`.
    #[arg(last = true, required = true, allow_hyphen_values = true)]
    pub argv: Vec<String>,
}

pub fn run(args: Args) -> miette::Result<ExitCode> {
    if args.nodes == 0 || args.gpus_per_node == 0 {
        eprintln!("error: --nodes and --gpus-per-node must be at least 1");
        return Ok(ExitCode::from(2));
    }
    match archscale_spec::import::archscale_argv_to_toml(&args.argv, args.nodes, args.gpus_per_node)
    {
        Ok(toml) => {
            print!("{toml}");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("{:?}", miette::Report::new(e));
            Ok(ExitCode::from(2))
        }
    }
}
