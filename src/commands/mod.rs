//! One module per subcommand: argument struct and `run`. Domain logic lives in the crates.
//! `run` returns the exit code: 0 success, 2 invalid input (nothing written), 1 other failure.

pub mod bench;
pub mod eval;
pub mod export;
pub mod fit;
pub mod generate;
pub mod import_archscale;
pub mod launch;
pub mod plan;
pub mod plot;
pub mod prepare;
pub mod run;
pub mod schema;
pub mod selftest;
pub mod validate;
