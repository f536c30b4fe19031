//! ArchScale `setup()` and the training loop's schedule quantities (hp-spec §4, §9),
//! with Python's int/float semantics so every value matches bit for bit.

use crate::inputs::RunInputs;
use crate::pynum::{PyArithError, PyNum};

/// What `setup()` and `train()` compute before the first step.
#[derive(Clone, Debug, PartialEq)]
pub struct SetupValues {
    pub seq_len: usize,
    pub micro_batch: usize,
    pub num_extrapol: usize,
    pub world: usize,
    /// `mult` of the token rule (int or float, as ArchScale computes it).
    pub mult: PyNum,
    /// `mult * depth^3`.
    pub n_target: PyNum,
    /// A float when `max_tokens` is given.
    pub train_tokens: PyNum,
    /// Tokens per optimizer step across the cluster, `b`.
    pub batch_tokens: u64,
    /// Peak LR before group multipliers.
    pub learning_rate: f64,
    /// Sequences per optimizer step per node (ArchScale's misnamed `global_batch_size`).
    pub global_batch_size: u64,
    pub gas: u64,
    pub eval_iters: u64,
    pub warmup_iters: PyNum,
    pub max_iters: PyNum,
    pub max_steps: PyNum,
}

/// Why `setup()` would fail, and which input it concerns.
#[derive(Clone, Debug, PartialEq)]
pub enum SetupError {
    /// `b0` is smaller than one micro-batch on every rank: ArchScale asserts gas > 0.
    BatchTooSmall {
        b0: u64,
        multiple: u64,
    },
    /// varlen packs one document stream per rank: micro-batch must be 1.
    VarlenMicroBatch {
        micro: usize,
    },
    Arithmetic {
        what: &'static str,
        err: PyArithError,
    },
    ZeroSize {
        what: &'static str,
    },
}

impl std::fmt::Display for SetupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SetupError::BatchTooSmall { b0, multiple } => write!(
                f,
                "batch of {b0} tokens is smaller than one micro-batch on every rank \
                 (nodes x gpus x micro x seq_len = {multiple}); ArchScale asserts gradient_accumulation_steps > 0"
            ),
            SetupError::VarlenMicroBatch { micro } => {
                write!(
                    f,
                    "varlen training needs micro-batch 1 (one packed document stream per rank), got {micro}"
                )
            }
            SetupError::Arithmetic { what, err } => write!(f, "{what}: {err}"),
            SetupError::ZeroSize { what } => write!(f, "{what} must be positive"),
        }
    }
}

fn arith(what: &'static str) -> impl Fn(PyArithError) -> SetupError {
    move |err| SetupError::Arithmetic { what, err }
}

/// pretrain.py:157, 178-187: `(seq_len, micro_batch, num_extrapol)`. An explicit micro
/// batch from the spec replaces ArchScale's hard-coded choice.
pub fn sequence_and_micro(
    ctx_len: Option<usize>,
    varlen: bool,
    micro: Option<usize>,
) -> (usize, usize, usize) {
    let mut seq_len = ctx_len.unwrap_or(4096);
    let (rule_micro, num_extrapol) = if seq_len == 4096 {
        if varlen {
            seq_len = 8192;
            (1, 4)
        } else {
            (2, 4)
        }
    } else {
        (1, 2)
    };
    (seq_len, micro.unwrap_or(rule_micro), num_extrapol)
}

/// `mult * depth^3`: an int when `mult` is one.
pub fn n_target(inputs: &RunInputs) -> Result<(PyNum, PyNum), SetupError> {
    let mult = if inputs.arch.token_mult.is_int {
        PyNum::Int(inputs.arch.token_mult.value as i128)
    } else {
        PyNum::Float(inputs.arch.token_mult.value)
    };
    let d3 = PyNum::Int((inputs.arch.depth as i128).checked_pow(3).ok_or(
        SetupError::Arithmetic {
            what: "depth^3",
            err: PyArithError("overflow"),
        },
    )?);
    Ok((
        mult,
        mult.times(d3).map_err(arith("n_target = mult * depth^3"))?,
    ))
}

/// `n0 = n0_mult * d0^3`; an int unless `n0_mult` is a float (hp-spec §1.1).
pub fn n0(inputs: &RunInputs) -> Result<PyNum, SetupError> {
    let b = &inputs.base;
    let n0_mult = if b.n0_mult_is_float || b.n0_mult.fract() != 0.0 || b.n0_mult.abs() > 1e30 {
        PyNum::Float(b.n0_mult)
    } else {
        PyNum::Int(b.n0_mult as i128)
    };
    let d0_cubed = (b.d0 as i128)
        .checked_pow(3)
        .ok_or(SetupError::Arithmetic {
            what: "d0^3",
            err: PyArithError("overflow"),
        })?;
    n0_mult
        .times(PyNum::Int(d0_cubed))
        .map_err(arith("n0 = n0_mult * d0^3"))
}

pub fn setup(inputs: &RunInputs) -> Result<SetupValues, SetupError> {
    let base = &inputs.base;
    let (seq_len, micro, num_extrapol) =
        sequence_and_micro(inputs.ctx_len, inputs.varlen, inputs.micro_batch);
    if inputs.varlen && micro != 1 {
        return Err(SetupError::VarlenMicroBatch { micro });
    }
    for (what, v) in [
        ("seq_len", seq_len as u64),
        ("micro_batch", micro as u64),
        ("cluster.nodes", inputs.cluster.nodes as u64),
        ("cluster.gpus_per_node", inputs.cluster.gpus_per_node as u64),
        ("depth", inputs.arch.depth as u64),
        ("d0", base.d0),
    ] {
        if v == 0 {
            return Err(SetupError::ZeroSize { what });
        }
    }
    let nodes = inputs.cluster.nodes as u64;
    let devices = inputs.cluster.gpus_per_node as u64;
    let world = nodes.checked_mul(devices).ok_or(SetupError::Arithmetic {
        what: "nodes * gpus_per_node",
        err: PyArithError("overflow"),
    })?;

    // §4.3-4.4 token budget.
    let (mult, n_target) = n_target(inputs)?;
    let train_tokens = match inputs.max_tokens {
        Some(t) => PyNum::Float(t),
        None => {
            let t0 = PyNum::Int(base.t0 as i128);
            let n0 = n0(inputs)?;
            t0.times(n_target)
                .and_then(|x| x.truediv(n0))
                .and_then(PyNum::int)
                .map_err(arith("train_tokens = int(t0 * n_target / n0)"))?
        }
    };

    // §4.5 batch rounding and LR.
    let multiple = world
        .checked_mul(micro as u64)
        .and_then(|x| x.checked_mul(seq_len as u64))
        .ok_or(SetupError::Arithmetic {
            what: "nodes * gpus * micro * seq_len",
            err: PyArithError("overflow"),
        })?;
    if base.b0 == 0 {
        return Err(SetupError::ZeroSize { what: "b0" });
    }
    let b = (base.b0 / multiple) * multiple;
    let mut learning_rate =
        base.eta0 * crate::pynum::int_truediv(b as i128, base.b0 as i128).sqrt();
    let mup = inputs.parametrization != crate::plan::Parametrization::Sp;
    let original_mup = inputs.parametrization == crate::plan::Parametrization::Mup;
    if mup && !original_mup {
        learning_rate *=
            crate::pynum::int_truediv(base.d0 as i128, inputs.arch.depth as i128).sqrt();
    }

    // §4.6 bookkeeping.
    let global_batch_size = b / (seq_len as u64 * nodes);
    let batch_size = global_batch_size / devices;
    let gas = batch_size / micro as u64;
    if gas == 0 {
        return Err(SetupError::BatchTooSmall {
            b0: base.b0,
            multiple,
        });
    }
    let eval_iters = if micro == 1 {
        400 / micro as u64 / 2
    } else {
        400 / micro as u64
    };

    // §9 schedule quantities, in per-device micro-iterations.
    let world_n = PyNum::Int(world as i128);
    let tokens_per_iter = PyNum::Int(micro as i128 * seq_len as i128);
    let max_iters = train_tokens
        .floordiv(world_n)
        .and_then(|x| x.floordiv(tokens_per_iter))
        .map_err(arith("max_iters"))?;
    let max_steps = max_iters
        .floordiv(PyNum::Int(gas as i128))
        .map_err(arith("max_steps"))?;
    let warmup_iters = PyNum::Int(base.warmup_tokens0 as i128)
        .floordiv(world_n)
        .and_then(|x| x.floordiv(tokens_per_iter))
        .map_err(arith("warmup_iters"))?;

    Ok(SetupValues {
        seq_len,
        micro_batch: micro,
        num_extrapol,
        world: world as usize,
        mult,
        n_target,
        train_tokens,
        batch_tokens: b,
        learning_rate,
        global_batch_size,
        gas,
        eval_iters,
        warmup_iters,
        max_iters,
        max_steps,
    })
}
