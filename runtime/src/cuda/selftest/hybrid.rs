//! Self-test of the hybrid-family kernels (mamba.cu, hybrid.cu) against the CPU reference
//! ops, and the selective-scan benchmark.
//!
//! Activations live inside wider buffers where the model keeps them (x and z in `in_proj`'s
//! `[rows, 2D]` output, B and C in `x_proj`'s `[rows, R + 2N]` output), with every column the
//! kernel must not read poisoned with NaN.

use super::{push, rel_err, Check, Env, R, TOL_BF16};
use crate::cpu::ops;
use crate::cpu::ops::diff_attention::{lambda_full, Lambdas};
use crate::cpu::ops::selective_scan::{self as scan, ScanInputs};
use archscale_kernels::cublaslt::OutType;
use archscale_kernels::ops::{
    HybridOps, KvGradMode, Rows, ScanGrads, ScanShape, ScanTensors, SCAN_CKPT, SCAN_CKPT_EVERY,
    SCAN_D_STATE,
};
use archscale_kernels::KernelError;
use half::bf16;
use rand::Rng;

/// fp32 parameter gradients computed in fp32 from the same inputs as the f64 reference.
const TOL_F32_SUM: f64 = 1e-3;

fn hy(env: &Env) -> R<&HybridOps> {
    env.hy
        .as_ref()
        .ok_or_else(|| KernelError::Unsupported("hybrid kernels not loaded".into()))
}

/// Values exactly representable in f32 (fp32 parameters).
fn f32_exact(v: Vec<f64>) -> Vec<f64> {
    v.into_iter().map(|x| x as f32 as f64).collect()
}

/// Varlen document starts for `batch` rows of `seq` tokens with EOS at random positions.
fn random_segments(env: &mut Env, batch: usize, seq: usize, p_eos: f64) -> Vec<u32> {
    let tokens: Vec<u32> = (0..batch * seq)
        .map(|_| if env.rng.gen_bool(p_eos) { 2 } else { 5 })
        .collect();
    let mut seg = vec![0u32; batch * seq];
    ops::mask::segment_starts(&tokens, seq, 2, &mut seg);
    seg
}

impl Env {
    /// A bf16 buffer of `rows × stride` whose columns `col0..col0+width` hold `v`
    /// (`[rows, width]`) and every other element is NaN.
    fn bf16_cols(&mut self, v: &[f64], rows: usize, stride: usize, col0: usize) -> R<u64> {
        let width = v.len() / rows.max(1);
        assert!(col0 + width <= stride);
        let mut host = vec![0xFFFFu16; rows * stride];
        for r in 0..rows {
            for c in 0..width {
                host[r * stride + col0 + c] = bf16::from_f32(v[r * width + c] as f32).to_bits();
            }
        }
        let p = self.poisoned(host.len() * 2)?;
        self.gpu.upload(p, &host)?;
        Ok(p)
    }
    /// Columns `col0..col0+width` of a bf16 `rows × stride` buffer.
    fn read_bf16_cols(
        &self,
        p: u64,
        rows: usize,
        stride: usize,
        col0: usize,
        width: usize,
    ) -> R<Vec<f64>> {
        let all = self.read_bf16(p, rows * stride)?;
        Ok((0..rows)
            .flat_map(|r| all[r * stride + col0..r * stride + col0 + width].to_vec())
            .collect())
    }
    fn seg_buf(&mut self, seg: &Option<Vec<u32>>) -> R<Option<u64>> {
        match seg {
            Some(s) => Ok(Some(self.i32_buf(s)?)),
            None => Ok(None),
        }
    }
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}
fn silu_grad(x: f64) -> f64 {
    let s = 1.0 / (1.0 + (-x).exp());
    s * (1.0 + x * (1.0 - s))
}

pub(super) fn check_conv(env: &mut Env, out: &mut Vec<Check>) -> R<()> {
    // (batch, seq, channels, varlen, x/dx row stride − 2·channels). Even channels with even
    // strides take the kernels' two-channels-per-thread path, the rest one channel per
    // thread; seq 700 and 1000 give runs of batches without a sequence start (the path
    // without per-row first taps), seq 5 and 3 sequences shorter than a batch.
    for &(batch, seq, d, varlen, pad) in &[
        (2usize, 37usize, 24usize, false, 0usize),
        (1, 300, 130, true, 0),
        (3, 65, 7, true, 0),
        (2, 700, 64, false, 0),
        (1, 1000, 66, true, 0),
        (4, 5, 16, true, 0),
        (5, 3, 6, false, 0),
        (2, 300, 24, true, 1),
    ] {
        let shape = format!(
            "B{batch} T{seq} D{d}{}{}",
            if varlen { " varlen" } else { "" },
            if pad > 0 { " odd x stride" } else { "" }
        );
        let xs = 2 * d + pad;
        let rows = batch * seq;
        let k = 4;
        let x = env.randn_bf16(rows * d, 1.0);
        let w = f32_exact(env.randn(d * k, 0.5));
        let bias = f32_exact(env.randn(d, 0.5));
        let seg = varlen.then(|| random_segments(env, batch, seq, 0.05));
        let mut u = vec![0.0; rows * d];
        ops::conv1d::causal_conv1d_forward(&mut u, &x, &w, &bias, seq, d, k, seg.as_deref());
        let y_ref: Vec<f64> = u.iter().map(|&v| silu(v)).collect();

        let xp = env.bf16_cols(&x, rows, xs, 0)?;
        let (wp, bp) = (env.f32_buf(&w)?, env.f32_buf(&bias)?);
        let segp = env.seg_buf(&seg)?;
        let yp = env.poisoned(rows * d * 2)?;
        hy(env)?.conv1d_silu_fwd(
            Rows::new(xp, xs),
            wp,
            bp,
            segp,
            Rows::new(yp, d),
            batch,
            seq,
            d,
        )?;
        push(
            out,
            "mamba conv1d+silu fwd",
            shape.clone(),
            rel_err(&env.read_bf16(yp, rows * d)?, &y_ref),
            TOL_BF16,
        );

        let dy = env.randn_bf16(rows * d, 1.0);
        let du: Vec<f64> = dy.iter().zip(&u).map(|(&g, &v)| g * silu_grad(v)).collect();
        let dw0 = f32_exact(env.randn(d * k, 1.0));
        let db0 = f32_exact(env.randn(d, 1.0));
        let (mut dx_ref, mut dw_ref, mut db_ref) = (vec![0.0; rows * d], dw0.clone(), db0.clone());
        ops::conv1d::causal_conv1d_backward(
            &mut dx_ref,
            &mut dw_ref,
            &mut db_ref,
            &du,
            &x,
            &w,
            seq,
            d,
            k,
            seg.as_deref(),
        );
        let dyp = env.bf16_buf(&dy)?;
        let dxp = env.bf16_cols(&vec![0.0; rows * d], rows, xs, 0)?;
        let (dwp, dbp) = (env.f32_buf(&dw0)?, env.f32_buf(&db0)?);
        hy(env)?.conv1d_silu_bwd(
            Rows::new(xp, xs),
            wp,
            bp,
            segp,
            Rows::new(dyp, d),
            Rows::new(dxp, xs),
            dwp,
            dbp,
            batch,
            seq,
            d,
        )?;
        push(
            out,
            "mamba conv1d+silu bwd dx",
            shape.clone(),
            rel_err(&env.read_bf16_cols(dxp, rows, xs, 0, d)?, &dx_ref),
            TOL_BF16,
        );
        push(
            out,
            "mamba conv1d+silu bwd dw (+=)",
            shape.clone(),
            rel_err(&env.read_f32(dwp, d * k)?, &dw_ref),
            TOL_F32_SUM,
        );
        push(
            out,
            "mamba conv1d+silu bwd dbias (+=)",
            shape,
            rel_err(&env.read_f32(dbp, d)?, &db_ref),
            TOL_F32_SUM,
        );
    }
    Ok(())
}

/// One scan case: (batch, seq, d_inner, varlen, z gate, extra gradient on y, mean of the
/// dt bias: 0 gives dt ≈ 1, −4.6 gives dt ≈ 0.01 as Mamba's init, i.e. long memory).
type ScanCase = (usize, usize, usize, bool, bool, bool, f64);

pub(super) fn check_scan(env: &mut Env, out: &mut Vec<Check>) -> R<()> {
    let cases: [ScanCase; 7] = [
        (1, 40, 8, false, false, false, 0.0),
        // one channel (31 idle of a split block), T below one forward chunk
        (3, 23, 1, true, true, true, 0.0),
        (1, 161, 37, true, false, true, -4.6),
        (2, 100, 70, true, true, true, 0.0),
        (1, 257, 33, false, true, false, 0.0),
        (2, 96, 130, true, true, true, 0.0),
        // Samba d4's shape (31 channel blocks add into dB/dC) at Mamba's initial dt
        (2, 256, 976, false, true, false, -4.6),
    ];
    // The backward with its own T split rule (on an H200 every case with T > 32 splits: the
    // grids are small) and the same without a T split; the forward with 8 lanes per channel
    // (what these small grids get) and with 4 (what large grids get).
    let default_pct = hy(env)?.scan_tsplit_pct;
    let configs = [("split fwd8", default_pct, 8), ("split-1seg fwd4", 0, 4)];
    for (name, pct, lanes) in configs {
        for &case in &cases {
            check_scan_case(env, out, name, pct, lanes, case)?;
        }
    }
    Ok(())
}

fn check_scan_case(
    env: &mut Env,
    out: &mut Vec<Check>,
    name: &str,
    tsplit_pct: u32,
    fwd_lanes: usize,
    case: ScanCase,
) -> R<()> {
    let (batch, seq, d, varlen, gate, extra, dt_bias_mean) = case;
    let n = SCAN_D_STATE;
    let ks = ScanShape {
        batch,
        seq,
        d_inner: d,
    };
    let segments = hy(env)?.scan_bwd_segments(&ks, tsplit_pct).0;
    let shape = format!(
        "{name} B{batch} T{seq} D{d}{}{}{}",
        if varlen { " varlen" } else { "" },
        if gate { " z" } else { "" },
        if extra { " +dy" } else { "" }
    ) + if dt_bias_mean < 0.0 { " small-dt" } else { "" }
        + if segments > 1 { " 2seg" } else { "" };
    let rows = batch * seq;
    // x_proj output [rows, R + 2N] with an odd dt_rank R: B and C start unaligned.
    let dt_rank = 5;
    let xw = dt_rank + 2 * n;
    let x = env.randn_bf16(rows * d, 1.0);
    let mut delta = env.randn_bf16(rows * d, 1.0);
    let i3 = 3 % delta.len();
    delta[i3] = 24.0; // softplus(u) = u above 20
    let delta_bias = f32_exact(
        env.randn(d, 0.5)
            .into_iter()
            .map(|b| b + dt_bias_mean)
            .collect(),
    );
    let a_log = f32_exact(
        (0..d * n)
            .map(|i| (((i % n) + 1) as f64).ln())
            .zip(env.randn(d * n, 0.1))
            .map(|(a, e)| a + e)
            .collect(),
    );
    let d_skip = f32_exact(env.randn(d, 1.0));
    let bm = env.randn_bf16(rows * n, 1.0);
    let cm = env.randn_bf16(rows * n, 1.0);
    let z = env.randn_bf16(rows * d, 1.0);
    let seg = varlen.then(|| random_segments(env, batch, seq, 0.03));
    let s = scan::ScanShape {
        batch,
        seq,
        d_inner: d,
        d_state: n,
    };
    let inp = ScanInputs {
        x: &x,
        delta: &delta,
        delta_bias: &delta_bias,
        a_log: &a_log,
        b_mat: &bm,
        c_mat: &cm,
        d_skip: &d_skip,
        seg_start: seg.as_deref(),
    };
    let mut y_ref = vec![0.0; rows * d];
    scan::selective_scan_forward(&mut y_ref, &inp, &s);
    let out_ref: Vec<f64> = if gate {
        y_ref.iter().zip(&z).map(|(&y, &zv)| y * silu(zv)).collect()
    } else {
        y_ref.clone()
    };

    // Device tensors where the model keeps them.
    let xz: Vec<f64> = (0..rows)
        .flat_map(|r| {
            let mut row = x[r * d..(r + 1) * d].to_vec();
            row.extend_from_slice(&z[r * d..(r + 1) * d]);
            row
        })
        .collect();
    let xzp = env.bf16_cols(&xz, rows, 2 * d, 0)?;
    let bc: Vec<f64> = (0..rows)
        .flat_map(|r| {
            let mut row = bm[r * n..(r + 1) * n].to_vec();
            row.extend_from_slice(&cm[r * n..(r + 1) * n]);
            row
        })
        .collect();
    let xprojp = env.bf16_cols(&bc, rows, xw, dt_rank)?;
    let deltap = env.bf16_buf(&delta)?;
    let (dbp, alp, dsp) = (
        env.f32_buf(&delta_bias)?,
        env.f32_buf(&a_log)?,
        env.f32_buf(&d_skip)?,
    );
    let segp = env.seg_buf(&seg)?;
    let t = ScanTensors {
        x: Rows::new(xzp, 2 * d),
        delta: Rows::new(deltap, d),
        z: gate.then(|| Rows::new(xzp + (d * 2) as u64, 2 * d)),
        b: Rows::new(xprojp + (dt_rank * 2) as u64, xw),
        c: Rows::new(xprojp + ((dt_rank + n) * 2) as u64, xw),
        delta_bias: dbp,
        a_log: alp,
        d_skip: dsp,
        seg: segp,
    };
    let outp = env.poisoned(rows * d * 2)?;
    let yp = env.poisoned(rows * d * 2)?;
    let ckp = env.poisoned(ks.ckpt_len() * 4)?;
    hy(env)?.selective_scan_fwd_with(
        fwd_lanes,
        &ks,
        &t,
        Rows::new(outp, d),
        Some(Rows::new(yp, d)),
        Some(ckp),
    )?;
    push(
        out,
        if gate {
            "mamba scan fwd out=y·silu(z)"
        } else {
            "mamba scan fwd out=y"
        },
        shape.clone(),
        rel_err(&env.read_bf16(outp, rows * d)?, &out_ref),
        TOL_BF16,
    );
    push(
        out,
        "mamba scan fwd y (GMU memory)",
        shape.clone(),
        rel_err(&env.read_bf16(yp, rows * d)?, &y_ref),
        TOL_BF16,
    );

    // Backward: upstream gradient on the gated output, plus optionally on y.
    let dout = env.randn_bf16(rows * d, 1.0);
    let dy_extra = if extra {
        env.randn_bf16(rows * d, 0.5)
    } else {
        vec![0.0; rows * d]
    };
    let mut dy = vec![0.0; rows * d];
    let mut dz_ref = vec![0.0; rows * d];
    for i in 0..rows * d {
        if gate {
            dy[i] = dout[i] * silu(z[i]) + dy_extra[i];
            dz_ref[i] = dout[i] * y_ref[i] * silu_grad(z[i]);
        } else {
            dy[i] = dout[i] + dy_extra[i];
        }
    }
    let (gbias0, galog0, gdskip0) = (
        f32_exact(env.randn(d, 1.0)),
        f32_exact(env.randn(d * n, 1.0)),
        f32_exact(env.randn(d, 1.0)),
    );
    let (mut gx, mut gdelta, mut gb, mut gc) = (
        vec![0.0; rows * d],
        vec![0.0; rows * d],
        vec![0.0; rows * n],
        vec![0.0; rows * n],
    );
    let (mut gbias, mut galog, mut gdskip) = (gbias0.clone(), galog0.clone(), gdskip0.clone());
    scan::selective_scan_backward(
        scan::ScanGrads {
            x: &mut gx,
            delta: &mut gdelta,
            delta_bias: &mut gbias,
            a_log: &mut galog,
            b_mat: &mut gb,
            c_mat: &mut gc,
            d_skip: &mut gdskip,
        },
        &dy,
        &inp,
        &s,
    );
    let doutp = env.bf16_buf(&dout)?;
    let extrap = if extra {
        Some(Rows::new(env.bf16_buf(&dy_extra)?, d))
    } else {
        None
    };
    let dxzp = env.bf16_cols(&vec![0.0; rows * 2 * d], rows, 2 * d, 0)?;
    let ddeltap = env.poisoned(rows * d * 2)?;
    let dxprojp = env.bf16_cols(&vec![0.0; rows * 2 * n], rows, xw, dt_rank)?;
    let (gbp, galp, gdsp) = (
        env.f32_buf(&gbias0)?,
        env.f32_buf(&galog0)?,
        env.f32_buf(&gdskip0)?,
    );
    let accp = env.poisoned(ks.bc_acc_len() * 4)?;
    let g = ScanGrads {
        x: Rows::new(dxzp, 2 * d),
        delta: Rows::new(ddeltap, d),
        z: gate.then(|| Rows::new(dxzp + (d * 2) as u64, 2 * d)),
        b: Rows::new(dxprojp + (dt_rank * 2) as u64, xw),
        c: Rows::new(dxprojp + ((dt_rank + n) * 2) as u64, xw),
        delta_bias: gbp,
        a_log: galp,
        d_skip: gdsp,
    };
    hy(env)?.selective_scan_bwd_with(
        tsplit_pct,
        &ks,
        &t,
        ckp,
        Rows::new(doutp, d),
        extrap,
        &g,
        accp,
    )?;
    let dxz = env.read_bf16(dxzp, rows * 2 * d)?;
    let cols = |v: &[f64], w: usize, c0: usize, width: usize| -> Vec<f64> {
        (0..rows)
            .flat_map(|r| v[r * w + c0..r * w + c0 + width].to_vec())
            .collect()
    };
    push(
        out,
        "mamba scan bwd dx",
        shape.clone(),
        rel_err(&cols(&dxz, 2 * d, 0, d), &gx),
        TOL_BF16,
    );
    if gate {
        push(
            out,
            "mamba scan bwd dz",
            shape.clone(),
            rel_err(&cols(&dxz, 2 * d, d, d), &dz_ref),
            TOL_BF16,
        );
    }
    push(
        out,
        "mamba scan bwd ddelta (pre-softplus)",
        shape.clone(),
        rel_err(&env.read_bf16(ddeltap, rows * d)?, &gdelta),
        TOL_BF16,
    );
    let dxproj = env.read_bf16(dxprojp, rows * xw)?;
    push(
        out,
        "mamba scan bwd dB",
        shape.clone(),
        rel_err(&cols(&dxproj, xw, dt_rank, n), &gb),
        TOL_BF16,
    );
    push(
        out,
        "mamba scan bwd dC",
        shape.clone(),
        rel_err(&cols(&dxproj, xw, dt_rank + n, n), &gc),
        TOL_BF16,
    );
    // Columns of dx_proj the scan must not touch stay NaN-poisoned.
    let untouched = cols(&dxproj, xw, 0, dt_rank);
    push(
        out,
        "mamba scan bwd leaves dt_rank cols",
        shape.clone(),
        if untouched.iter().all(|v| v.is_nan()) {
            0.0
        } else {
            f64::INFINITY
        },
        0.0,
    );
    for (name, p, want, len) in [
        ("mamba scan bwd dA_log (+=)", galp, &galog, d * n),
        ("mamba scan bwd dD (+=)", gdsp, &gdskip, d),
        ("mamba scan bwd d dt_bias (+=)", gbp, &gbias, d),
    ] {
        push(
            out,
            name,
            shape.clone(),
            rel_err(&env.read_f32(p, len)?, want),
            TOL_F32_SUM,
        );
    }
    Ok(())
}

pub(super) fn check_layernorm(env: &mut Env, out: &mut Vec<Check>) -> R<()> {
    for &(rows, dim) in &[(64usize, 2560usize), (33, 100), (5, 7)] {
        let shape = format!("{rows}x{dim}");
        let x = f32_exact(env.randn(rows * dim, 1.0).iter().map(|v| v + 0.3).collect());
        let gamma = f32_exact(env.randn(dim, 0.2).iter().map(|v| 1.0 + v).collect());
        let beta = f32_exact(env.randn(dim, 0.2));
        let (mut y_ref, mut mean_ref, mut rstd_ref) =
            (vec![0.0; rows * dim], vec![0.0; rows], vec![0.0; rows]);
        ops::layernorm::layernorm_forward(
            &mut y_ref,
            &mut mean_ref,
            &mut rstd_ref,
            &x,
            &gamma,
            &beta,
            dim,
            1e-5,
        );
        let (xp, gp, bp) = (env.f32_buf(&x)?, env.f32_buf(&gamma)?, env.f32_buf(&beta)?);
        let yp = env.poisoned(rows * dim * 2)?;
        let (mp, rp) = (env.poisoned(rows * 4)?, env.poisoned(rows * 4)?);
        hy(env)?.layernorm_fwd(xp, gp, bp, yp, mp, rp, rows, dim, 1e-5)?;
        push(
            out,
            "layernorm fwd (bf16 out)",
            shape.clone(),
            rel_err(&env.read_bf16(yp, rows * dim)?, &y_ref),
            TOL_BF16,
        );
        push(
            out,
            "layernorm mean, rstd",
            shape.clone(),
            rel_err(
                &[env.read_f32(mp, rows)?, env.read_f32(rp, rows)?].concat(),
                &[mean_ref.clone(), rstd_ref.clone()].concat(),
            ),
            1e-5,
        );
        let dy = env.randn_bf16(rows * dim, 1.0);
        let dres0 = f32_exact(env.randn(rows * dim, 1.0));
        let (dg0, db0) = (
            f32_exact(env.randn(dim, 1.0)),
            f32_exact(env.randn(dim, 1.0)),
        );
        let (mut dx_ref, mut dg_ref, mut db_ref) = (dres0.clone(), dg0.clone(), db0.clone());
        ops::layernorm::layernorm_backward(
            &mut dx_ref,
            &mut dg_ref,
            &mut db_ref,
            &dy,
            &x,
            &gamma,
            &mean_ref,
            &rstd_ref,
            dim,
        );
        let dyp = env.bf16_buf(&dy)?;
        let dresp = env.f32_buf(&dres0)?;
        let dresb = env.poisoned(rows * dim * 2)?;
        let (dgp, dbp) = (env.f32_buf(&dg0)?, env.f32_buf(&db0)?);
        hy(env)?.layernorm_bwd(xp, gp, mp, rp, dyp, dresp, dresb, dgp, dbp, rows, dim, true)?;
        push(
            out,
            "layernorm bwd dx (fp32, +=)",
            shape.clone(),
            rel_err(&env.read_f32(dresp, rows * dim)?, &dx_ref),
            1e-4,
        );
        push(
            out,
            "layernorm bwd dx (bf16 copy)",
            shape.clone(),
            rel_err(&env.read_bf16(dresb, rows * dim)?, &dx_ref),
            TOL_BF16,
        );
        push(
            out,
            "layernorm bwd dgamma (+=)",
            shape.clone(),
            rel_err(&env.read_f32(dgp, dim)?, &dg_ref),
            1e-4,
        );
        push(
            out,
            "layernorm bwd dbeta (+=)",
            shape,
            rel_err(&env.read_f32(dbp, dim)?, &db_ref),
            1e-4,
        );
    }
    Ok(())
}

pub(super) fn check_gmu(env: &mut Env, out: &mut Vec<Check>) -> R<()> {
    // (rows, width, m row stride, m's first column, g row stride, row stride of out, dout
    // and dg); every other column is NaN. 16-byte-aligned rows take the kernels' 8-wide path
    // (width 44: a 4-element tail per row), the rest (odd strides, m at an 8-byte offset)
    // the element-wise one.
    for &(rows, width, ms, mc, gs, os) in &[
        (
            200usize, 3968usize, 7936usize, 3968usize, 3968usize, 3968usize,
        ),
        (37, 33, 66, 33, 33, 33),
        (19, 44, 112, 56, 48, 48),
        (23, 1984, 3968, 1984, 1984, 1984),
        (9, 40, 80, 40, 40, 40),
        (11, 48, 100, 50, 48, 48),
    ] {
        let path = if ms % 8 == 0 && mc % 8 == 0 && gs % 8 == 0 && os % 8 == 0 {
            "8-wide"
        } else {
            "element-wise"
        };
        let shape = format!("{rows}x{width} strides m {ms} g {gs} out {os} ({path})");
        let m = env.randn_bf16(rows * width, 1.0);
        let g = env.randn_bf16(rows * width, 2.0);
        let mut o_ref = vec![0.0; rows * width];
        ops::silu_gate::silu_gate_forward(&mut o_ref, &m, &g);
        let mp = env.bf16_cols(&m, rows, ms, mc)?;
        let gp = env.bf16_cols(&g, rows, gs, 0)?;
        let op = env.poisoned(rows * os * 2)?;
        let (mr, gr) = (Rows::new(mp + (mc * 2) as u64, ms), Rows::new(gp, gs));
        hy(env)?.gmu_fwd(mr, gr, Rows::new(op, os), rows, width)?;
        push(
            out,
            "gmu fwd m·silu(g)",
            shape.clone(),
            rel_err(&env.read_bf16_cols(op, rows, os, 0, width)?, &o_ref),
            TOL_BF16,
        );
        let dout = env.randn_bf16(rows * width, 1.0);
        let dm0 = f32_exact(env.randn(rows * width, 1.0));
        let (mut dm_ref, mut dg_ref) = (dm0.clone(), vec![0.0; rows * width]);
        ops::silu_gate::silu_gate_backward(&mut dm_ref, &mut dg_ref, &dout, &m, &g);
        let dop = env.bf16_cols(&dout, rows, os, 0)?;
        let dmp = env.f32_buf(&dm0)?;
        let dgp = env.poisoned(rows * os * 2)?;
        hy(env)?.gmu_bwd(
            mr,
            gr,
            Rows::new(dop, os),
            dmp,
            Rows::new(dgp, os),
            rows,
            width,
        )?;
        push(
            out,
            "gmu bwd dm (fp32, +=)",
            shape.clone(),
            rel_err(&env.read_f32(dmp, rows * width)?, &dm_ref),
            1e-5,
        );
        push(
            out,
            "gmu bwd dg",
            shape,
            rel_err(&env.read_bf16_cols(dgp, rows, os, 0, width)?, &dg_ref),
            TOL_BF16,
        );
    }
    Ok(())
}

pub(super) fn check_diff_attention(env: &mut Env, out: &mut Vec<Check>) -> R<()> {
    // (rows, pairs, head_size, layer)
    for &(rows, pairs, hs, layer) in &[
        (50usize, 2usize, 64usize, 3usize),
        (17, 3, 128, 20),
        (9, 1, 48, 0),
    ] {
        let shape = format!("{rows} rows, {pairs} pairs, hs{hs}, layer {layer}");
        let w = 2 * hs;
        let nv = rows * pairs;
        let lambda_init = 0.8 - 0.6 * (-0.3 * layer as f64).exp();
        let post = 1.0 - lambda_init;
        let lv: Vec<Vec<f64>> = (0..4).map(|_| f32_exact(env.randn(hs, 0.1))).collect();
        let l = Lambdas {
            q1: &lv[0],
            k1: &lv[1],
            q2: &lv[2],
            k2: &lv[3],
        };
        let (lambda, l1, l2) = lambda_full(&l, lambda_init);
        let o1 = env.randn_bf16(nv * w, 1.0);
        let o2 = env.randn_bf16(nv * w, 1.0);
        let gamma = f32_exact(env.randn(w, 0.2).iter().map(|v| 1.0 + v).collect());
        let diff: Vec<f64> = o1.iter().zip(&o2).map(|(a, b)| a - lambda * b).collect();
        let (mut o_ref, mut rstd_ref) = (vec![0.0; nv * w], vec![0.0; nv]);
        ops::rmsnorm::rmsnorm_forward(
            &mut o_ref,
            &mut rstd_ref,
            &diff,
            &gamma,
            w,
            ops::diff_attention::SUBLN_EPS,
        );
        o_ref.iter_mut().for_each(|v| *v *= post);

        let lp: Vec<u64> = lv.iter().map(|v| env.f32_buf(v)).collect::<R<Vec<u64>>>()?;
        let lamp = env.poisoned(16)?;
        let (o1p, o2p, gp) = (env.bf16_buf(&o1)?, env.bf16_buf(&o2)?, env.f32_buf(&gamma)?);
        let op = env.poisoned(nv * w * 2)?;
        let rp = env.poisoned(nv * 4)?;
        let hyo = hy(env)?;
        hyo.da_lambda_fwd(lp[0], lp[1], lp[2], lp[3], lamp, hs, lambda_init as f32)?;
        hyo.diff_combine_fwd(
            o1p,
            o2p,
            lamp,
            gp,
            op,
            rp,
            nv,
            w,
            ops::diff_attention::SUBLN_EPS as f32,
            post as f32,
        )?;
        let lam_gpu = env.read_f32(lamp, 3)?;
        push(
            out,
            "diff-attn λ, exp(λq1·λk1), exp(λq2·λk2)",
            shape.clone(),
            rel_err(&lam_gpu, &[lambda, l1, l2]),
            1e-5,
        );
        push(
            out,
            "diff-attn combine fwd (o1−λo2, subln, ·(1−λinit))",
            shape.clone(),
            rel_err(&env.read_bf16(op, nv * w)?, &o_ref),
            TOL_BF16,
        );
        push(
            out,
            "diff-attn subln rstd",
            shape.clone(),
            rel_err(&env.read_f32(rp, nv)?, &rstd_ref),
            1e-4,
        );

        // Backward as diff_attention_backward does it up to dO1 / dO2.
        let dout = env.randn_bf16(nv * w, 1.0);
        let dnormed: Vec<f64> = dout.iter().map(|g| g * post).collect();
        let mut ddiff = vec![0.0; nv * w];
        let dg0 = f32_exact(env.randn(w, 1.0));
        let mut dg_ref = dg0.clone();
        ops::rmsnorm::rmsnorm_backward(
            &mut ddiff,
            &mut dg_ref,
            &dnormed,
            &diff,
            &gamma,
            &rstd_ref,
            w,
        );
        let do2_ref: Vec<f64> = ddiff.iter().map(|v| -lambda * v).collect();
        let dlambda: f64 = -ddiff.iter().zip(&o2).map(|(a, b)| a * b).sum::<f64>();
        let dl0: Vec<Vec<f64>> = (0..4).map(|_| f32_exact(env.randn(hs, 1.0))).collect();
        let mut dl_ref = dl0.clone();
        for i in 0..hs {
            dl_ref[0][i] += dlambda * l1 * lv[1][i];
            dl_ref[1][i] += dlambda * l1 * lv[0][i];
            dl_ref[2][i] -= dlambda * l2 * lv[3][i];
            dl_ref[3][i] -= dlambda * l2 * lv[2][i];
        }
        let dop = env.bf16_buf(&dout)?;
        let (do1p, do2p) = (env.poisoned(nv * w * 2)?, env.poisoned(nv * w * 2)?);
        let dgp = env.f32_buf(&dg0)?;
        let dlp: Vec<u64> = dl0
            .iter()
            .map(|v| env.f32_buf(v))
            .collect::<R<Vec<u64>>>()?;
        let hyo = hy(env)?;
        hyo.diff_combine_bwd(
            o1p,
            o2p,
            lamp,
            gp,
            rp,
            dop,
            do1p,
            do2p,
            dgp,
            nv,
            w,
            post as f32,
        )?;
        hyo.da_lambda_bwd(
            lp[0],
            lp[1],
            lp[2],
            lp[3],
            lamp,
            [dlp[0], dlp[1], dlp[2], dlp[3]],
            hs,
        )?;
        push(
            out,
            "diff-attn combine bwd dO1",
            shape.clone(),
            rel_err(&env.read_bf16(do1p, nv * w)?, &ddiff),
            TOL_BF16,
        );
        push(
            out,
            "diff-attn combine bwd dO2",
            shape.clone(),
            rel_err(&env.read_bf16(do2p, nv * w)?, &do2_ref),
            TOL_BF16,
        );
        push(
            out,
            "diff-attn subln dγ (+=)",
            shape.clone(),
            rel_err(&env.read_f32(dgp, w)?, &dg_ref),
            1e-4,
        );
        push(
            out,
            "diff-attn dλ",
            shape.clone(),
            rel_err(&env.read_f32(lamp + 12, 1)?, &[dlambda]),
            1e-3,
        );
        let mut got = Vec::new();
        for p in &dlp {
            got.extend(env.read_f32(*p, hs)?);
        }
        push(
            out,
            "diff-attn dλq1,dλk1,dλq2,dλk2 (+=)",
            shape,
            rel_err(&got, &dl_ref.concat()),
            1e-4,
        );
    }
    Ok(())
}

/// `mamba_pad_weights`: the x_proj / dt_proj weights in the layouts with the dt rank padded
/// to a multiple of 8 by zeros, an exact copy (the outputs start poisoned with NaN).
pub(super) fn check_pad_weights(env: &mut Env, out: &mut Vec<Check>) -> R<()> {
    // (dt rank, d_state, d_inner): SambaY d8's rank and width, d16's rank, odd sizes
    for &(r, ns, d) in &[
        (62usize, 16usize, 1984usize),
        (124, 16, 72),
        (5, 3, 13),
        (8, 16, 24),
    ] {
        let rp = r.div_ceil(8) * 8;
        let shape = format!("r {r} -> {rp}, d_state {ns}, d_inner {d}");
        let wx = env.randn_bf16((r + 2 * ns) * d, 1.0);
        let wdt = env.randn_bf16(d * r, 1.0);
        let mut wx_want = vec![0.0; (rp + 2 * ns) * d];
        for row in 0..r + 2 * ns {
            let to = if row < r { row } else { row - r + rp };
            wx_want[to * d..(to + 1) * d].copy_from_slice(&wx[row * d..(row + 1) * d]);
        }
        let mut wdt_want = vec![0.0; d * rp];
        for c in 0..d {
            wdt_want[c * rp..c * rp + r].copy_from_slice(&wdt[c * r..(c + 1) * r]);
        }
        let (wxp, wdtp) = (env.bf16_buf(&wx)?, env.bf16_buf(&wdt)?);
        let (xo, dto) = (
            env.poisoned(wx_want.len() * 2)?,
            env.poisoned(wdt_want.len() * 2)?,
        );
        hy(env)?.mamba_pad_weights(wxp, wdtp, xo, dto, r, rp, ns, d)?;
        let got = env.read_bf16(xo, wx_want.len())?;
        push(
            out,
            "mamba_pad_weights x_proj",
            shape.clone(),
            rel_err(&got, &wx_want),
            0.0,
        );
        let got = env.read_bf16(dto, wdt_want.len())?;
        push(
            out,
            "mamba_pad_weights dt_proj",
            shape,
            rel_err(&got, &wdt_want),
            0.0,
        );
    }
    Ok(())
}

/// `kv_grad_add` in its three modes over the fused QKV layout (per KV group: its Q heads,
/// then K and V): only the K/V columns change.
pub(super) fn check_kv_grad(env: &mut Env, out: &mut Vec<Check>) -> R<()> {
    // (rows, KV groups, Q heads per group, head size): 16-byte rows take the 8-wide path,
    // head size 5 the element-wise one
    for &(rows, groups, qpg, hs) in &[
        (37usize, 2usize, 3usize, 64usize),
        (16, 1, 1, 40),
        (9, 3, 2, 5),
    ] {
        let w = (qpg + 2) * hs;
        let (n, kv_at) = (rows * groups * w, qpg * hs);
        let path = match HybridOps::kv_grad_elems_per_thread(w, kv_at, 2 * hs) {
            8 => "8-wide",
            _ => "element-wise",
        };
        let shape = format!("{rows} rows, {groups} groups x ({qpg} Q + K + V) x {hs} ({path})");
        let is_kv = |i: usize| i % w >= kv_at;
        let dqkv = env.randn_bf16(n, 1.0);
        let acc0: Vec<f64> = env.randn(n, 1.0).iter().map(|&v| v as f32 as f64).collect();
        let (dp, ap) = (env.bf16_buf(&dqkv)?, env.f32_buf(&acc0)?);
        let run = |env: &mut Env, mode| {
            hy(env)?.kv_grad_add(dp, ap, w, kv_at, 2 * hs, rows * groups, mode)
        };
        // overwrite, then add: acc = 2·dqkv on K/V, untouched on Q
        run(env, KvGradMode::Overwrite)?;
        run(env, KvGradMode::Add)?;
        let want: Vec<f64> = (0..n)
            .map(|i| if is_kv(i) { 2.0 * dqkv[i] } else { acc0[i] })
            .collect();
        push(
            out,
            "kv_grad_add overwrite + add (fp32)",
            shape.clone(),
            rel_err(&env.read_f32(ap, n)?, &want),
            1e-7,
        );
        // export: dqkv = bf16(dqkv + acc) on K/V, untouched on Q
        run(env, KvGradMode::Export)?;
        let want_q: Vec<f64> = (0..n)
            .map(|i| if is_kv(i) { 3.0 * dqkv[i] } else { dqkv[i] })
            .collect();
        push(
            out,
            "kv_grad_add export (bf16)",
            shape,
            rel_err(&env.read_bf16(dp, n)?, &want_q),
            TOL_BF16,
        );
    }
    Ok(())
}

pub(super) fn check_bias(env: &mut Env, out: &mut Vec<Check>) -> R<()> {
    for &(rows, d_in, d_out) in &[(37usize, 72usize, 136usize), (1000, 256, 77)] {
        let shape = format!("{rows}x{d_in}->{d_out}");
        let x = env.randn_bf16(rows * d_in, 1.0);
        let w = env.randn_bf16(d_out * d_in, 0.05);
        let b = f32_exact(env.randn(d_out, 1.0));
        let mut y_ref = vec![0.0; rows * d_out];
        ops::linear::linear_forward(&mut y_ref, &x, &w, Some(&b), rows, d_in, d_out);
        let (xp, wp, bp) = (env.bf16_buf(&x)?, env.bf16_buf(&w)?, env.f32_buf(&b)?);
        let yp = env.poisoned(rows * d_out * 2)?;
        env.lt.linear(
            &env.gpu,
            xp,
            wp,
            yp,
            0,
            rows,
            d_in,
            d_out,
            OutType::Bf16,
            1.0,
            0.0,
        )?;
        hy(env)?.bias_add_bf16(Rows::new(yp, d_out), bp, rows, d_out)?;
        push(
            out,
            "gemm + bias_add (bf16)",
            shape.clone(),
            rel_err(&env.read_bf16(yp, rows * d_out)?, &y_ref),
            TOL_BF16,
        );
        // fp32 residual: r += s·b
        let r0 = f32_exact(env.randn(rows * d_out, 1.0));
        let want: Vec<f64> = r0
            .iter()
            .enumerate()
            .map(|(i, v)| v + 0.25 * b[i % d_out])
            .collect();
        let rp = env.f32_buf(&r0)?;
        hy(env)?.bias_add_f32(rp, bp, 0.25, rows, d_out)?;
        push(
            out,
            "bias_add (fp32 residual, ·0.25)",
            shape.clone(),
            rel_err(&env.read_f32(rp, rows * d_out)?, &want),
            1e-6,
        );
        let dy = env.randn_bf16(rows * d_out, 1.0);
        let db0 = f32_exact(env.randn(d_out, 1.0));
        let mut dw = vec![0.0; d_out * d_in];
        let mut db_ref = db0.clone();
        ops::linear::linear_backward(
            None,
            &mut dw,
            Some(&mut db_ref),
            &dy,
            &x,
            &w,
            rows,
            d_in,
            d_out,
        );
        let dyp = env.bf16_cols(&dy, rows, d_out + 3, 1)?;
        let dbp = env.f32_buf(&db0)?;
        hy(env)?.bias_grad(Rows::new(dyp + 2, d_out + 3), dbp, 1.0, rows, d_out)?;
        push(
            out,
            "bias_grad Σ_rows dy (+=)",
            shape,
            rel_err(&env.read_f32(dbp, d_out)?, &db_ref),
            1e-5,
        );
    }
    Ok(())
}

/// Times the scan forward and backward at the SambaY-d16 shape (n_embd 1984, d_inner 3968,
/// N 16, 4 × 4096 = 16384 tokens) and the SambaY-d8 one (d_inner 1984, where the
/// backward splits T) with CUDA events, and states the bytes each must move; likewise the
/// conv1d + SiLU and the GMU gate kernels at width d_inner.
pub(super) fn bench_scan(env: &mut Env) -> R<Vec<String>> {
    let mut lines = bench_scan_shape(env, 1984)?;
    lines.extend(bench_scan_shape(env, 992)?);
    Ok(lines)
}

fn bench_scan_shape(env: &mut Env, n_embd: usize) -> R<Vec<String>> {
    let (batch, seq) = (4usize, 4096usize);
    let d = 2 * n_embd;
    let n = SCAN_D_STATE;
    let dt_rank = n_embd.div_ceil(16);
    let xw = dt_rank + 2 * n;
    let rows = batch * seq;
    let ks = ScanShape {
        batch,
        seq,
        d_inner: d,
    };
    // Cheap deterministic fill (the timing does not depend on the values' distribution
    // beyond staying finite): bf16 of a hashed uniform in [-1.5, 1.5].
    let fill_bf16 = |env: &mut Env, len: usize, salt: u64| -> R<u64> {
        let host: Vec<u16> = (0..len as u64)
            .map(|i| {
                let h = (i ^ salt)
                    .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    .rotate_left(29)
                    .wrapping_mul(0xBF58_476D_1CE4_E5B9);
                let u = (h >> 40) as f32 / (1u64 << 24) as f32;
                bf16::from_f32(3.0 * u - 1.5).to_bits()
            })
            .collect();
        let p = env.poisoned(len * 2)?;
        env.gpu.upload(p, &host)?;
        Ok(p)
    };
    let xzp = fill_bf16(env, rows * 2 * d, 1)?;
    let deltap = fill_bf16(env, rows * d, 2)?;
    let xprojp = fill_bf16(env, rows * xw, 3)?;
    let doutp = fill_bf16(env, rows * d, 4)?;
    // dt_proj bias as Mamba initialises it (dt ≈ 0.01), A_log = log(1..16), D = 1.
    let dt_bias = vec![(0.01f64.exp() - 1.0).ln(); d];
    let a_log: Vec<f64> = (0..d * n).map(|i| (((i % n) + 1) as f64).ln()).collect();
    let (dbp, alp, dsp) = (
        env.f32_buf(&dt_bias)?,
        env.f32_buf(&a_log)?,
        env.f32_buf(&vec![1.0; d])?,
    );
    let t = ScanTensors {
        x: Rows::new(xzp, 2 * d),
        delta: Rows::new(deltap, d),
        z: Some(Rows::new(xzp + (d * 2) as u64, 2 * d)),
        b: Rows::new(xprojp + (dt_rank * 2) as u64, xw),
        c: Rows::new(xprojp + ((dt_rank + n) * 2) as u64, xw),
        delta_bias: dbp,
        a_log: alp,
        d_skip: dsp,
        seg: None,
    };
    let outp = env.poisoned(rows * d * 2)?;
    let ckp = env.poisoned(ks.ckpt_len() * 4)?;
    let dxzp = env.poisoned(rows * 2 * d * 2)?;
    let ddeltap = env.poisoned(rows * d * 2)?;
    let dxprojp = env.poisoned(rows * xw * 2)?;
    let accp = env.poisoned(ks.bc_acc_len() * 4)?;
    let zeros_d = vec![0.0; d];
    let (gbp, gdsp) = (env.f32_buf(&zeros_d)?, env.f32_buf(&zeros_d)?);
    let galp = env.f32_buf(&vec![0.0; d * n])?;
    let g = ScanGrads {
        x: Rows::new(dxzp, 2 * d),
        delta: Rows::new(ddeltap, d),
        z: Some(Rows::new(dxzp + (d * 2) as u64, 2 * d)),
        b: Rows::new(dxprojp + (dt_rank * 2) as u64, xw),
        c: Rows::new(dxprojp + ((dt_rank + n) * 2) as u64, xw),
        delta_bias: gbp,
        a_log: galp,
        d_skip: gdsp,
    };
    // The causal conv + SiLU that feeds the scan, same shape (x inside in_proj's output).
    let convw = env.f32_buf(&vec![0.25; d * 4])?;
    let convb = env.f32_buf(&zeros_d)?;
    let convy = env.poisoned(rows * d * 2)?;
    let (cdw, cdb) = (env.f32_buf(&vec![0.0; d * 4])?, env.f32_buf(&zeros_d)?);
    // The GMU gate's output and gradients (its inputs reuse the conv output and delta).
    let gmu_out = env.poisoned(rows * d * 2)?;
    let gmu_dg = env.poisoned(rows * d * 2)?;
    let gmu_dm = env.poisoned(rows * d * 4)?;
    env.gpu.memset_zero(gmu_dm, rows * d * 4)?;
    let hyo = hy(env)?;
    let lanes = hyo.scan_fwd_lanes(&ks);
    let fwd_with = |l: usize| {
        move || hyo.selective_scan_fwd_with(l, &ks, &t, Rows::new(outp, d), None, Some(ckp))
    };
    let fwd = fwd_with(lanes);
    let bwd_of = |pct: u32| {
        move || hyo.selective_scan_bwd_with(pct, &ks, &t, ckp, Rows::new(doutp, d), None, &g, accp)
    };
    let gpu = env.gpu.clone();
    let time = |f: &dyn Fn() -> R<()>| time_ms(&gpu, f);
    let pct = hyo.scan_tsplit_pct;
    let fwd_ms = time(&fwd)?;
    let other_lanes = if lanes == 8 { 4 } else { 8 };
    let fwd_other_ms = time(&fwd_with(other_lanes))?;
    let mut bwd = vec![("split".to_string(), time(&bwd_of(pct))?)];
    let segments = hyo.scan_bwd_segments(&ks, pct).0;
    if segments > 1 {
        bwd.push(("split, one T segment".to_string(), time(&bwd_of(0))?));
        for other in [35u32, 40, 50, 55] {
            if other != pct {
                bwd.push((format!("split, T split {other}%"), time(&bwd_of(other))?));
            }
        }
    }
    // Twice, to show the run-to-run spread.
    let fwd_ms2 = time(&fwd)?;
    bwd.push(("split, again".to_string(), time(&bwd_of(pct))?));
    let conv_fwd = || {
        hyo.conv1d_silu_fwd(
            Rows::new(xzp, 2 * d),
            convw,
            convb,
            None,
            Rows::new(convy, d),
            batch,
            seq,
            d,
        )
    };
    let conv_bwd = || {
        hyo.conv1d_silu_bwd(
            Rows::new(xzp, 2 * d),
            convw,
            convb,
            None,
            Rows::new(doutp, d),
            Rows::new(dxzp, 2 * d),
            cdw,
            cdb,
            batch,
            seq,
            d,
        )
    };
    let (conv_fwd_ms, conv_bwd_ms) = (time(&conv_fwd)?, time(&conv_bwd)?);
    // The GMU gate at width d_inner (SambaY's GMU width): m = the conv output, g = delta.
    let (gmu_fwd_ms, gmu_bwd_ms) = {
        let (m, g) = (Rows::new(convy, d), Rows::new(deltap, d));
        let fwd = || hyo.gmu_fwd(m, g, Rows::new(gmu_out, d), rows, d);
        let bwd = || {
            hyo.gmu_bwd(
                m,
                g,
                Rows::new(doutp, d),
                gmu_dm,
                Rows::new(gmu_dg, d),
                rows,
                d,
            )
        };
        (time(&fwd)?, time(&bwd)?)
    };
    let out_all = env.read_bf16(outp, 1 << 20)?;
    let dx_all = env.read_bf16(dxzp, 1 << 20)?;
    let finite = out_all.iter().chain(dx_all.iter()).all(|v| v.is_finite());

    let td = (rows * d) as f64; // (token, channel) pairs
    let bc = (rows * 2 * n * 2) as f64; // B and C, bf16
    let ckpt_bytes = (ks.ckpt_len() * 4) as f64;
    let acc_bytes = (rows * 2 * n * 4 * 2) as f64;
    // Minimum traffic: fwd reads x, delta, z and writes out (bf16) + B, C;
    // bwd reads x, delta, z, dout and writes dx, ddelta, dz (bf16) + B, C and dB, dC.
    let fwd_min = 4.0 * 2.0 * td + bc;
    let bwd_min = 7.0 * 2.0 * td + 2.0 * bc;
    let roof = 4.3e12;
    let line = |name: &str, ms: f64, min: f64, extra: f64| {
        let gbs = min / (ms * 1e-3) / 1e9;
        format!(
            "{name}: {ms:.3} ms; must move {:.1} MB -> {gbs:.0} GB/s = {:.1}% of 4.3 TB/s \
             (floor {:.3} ms); with its checkpoint traffic {:.1} MB",
            min / 1e6,
            100.0 * gbs * 1e9 / roof,
            min / roof * 1e3,
            (min + extra) / 1e6
        )
    };
    let tag = format!("d_inner {d}");
    let mut lines = vec![format!(
        "scan bench: B{batch} T{seq} d_inner {d} N {n} ({rows} tokens), z gate, \
         checkpoints every {SCAN_CKPT_EVERY} steps, default bwd T segments {segments} \
         (T split {pct}%); outputs finite: {finite}"
    )];
    lines.push(line(
        &format!("scan fwd ({tag}, {lanes} lanes per channel)"),
        fwd_ms,
        fwd_min,
        ckpt_bytes,
    ));
    lines.push(line(
        &format!("scan fwd ({tag}, {other_lanes} lanes per channel)"),
        fwd_other_ms,
        fwd_min,
        ckpt_bytes,
    ));
    lines.push(line(
        &format!("scan fwd ({tag}, again)"),
        fwd_ms2,
        fwd_min,
        ckpt_bytes,
    ));
    for (name, ms) in &bwd {
        lines.push(line(
            &format!("scan bwd ({tag}, {name})"),
            *ms,
            bwd_min,
            ckpt_bytes + acc_bytes,
        ));
    }
    lines.extend(bench_scan_floor(env, td, fwd_min / roof * 1e3)?);
    // conv fwd reads x, writes y; bwd reads x, dy, writes dx (bf16).
    lines.push(line(
        &format!("conv1d+silu fwd ({tag})"),
        conv_fwd_ms,
        2.0 * 2.0 * td,
        0.0,
    ));
    lines.push(line(
        &format!("conv1d+silu bwd ({tag})"),
        conv_bwd_ms,
        3.0 * 2.0 * td,
        0.0,
    ));
    // GMU fwd reads m, g and writes out (bf16); bwd reads m, g, dout (bf16), reads and
    // writes dm (fp32) and writes dg (bf16).
    lines.push(line(
        &format!("gmu fwd ({tag})"),
        gmu_fwd_ms,
        3.0 * 2.0 * td,
        0.0,
    ));
    lines.push(line(
        &format!("gmu bwd ({tag})"),
        gmu_bwd_ms,
        (4.0 * 2.0 + 2.0 * 4.0) * td,
        0.0,
    ));
    Ok(lines)
}

/// Times mamba.cu's arithmetic floor probe of the scan forward (`scan_floor_fwd_p*`: the
/// forward's per-element and per-(t, c) arithmetic with no HBM traffic and a full GPU) over
/// `td` (t, c) pairs, with 0–6 of the 16 exponentials per step on the FMA pipe, against the
/// memory floor `mem_floor_ms` of the real forward. The forward's time cannot go below this.
fn bench_scan_floor(env: &mut Env, td: f64, mem_floor_ms: f64) -> R<Vec<String>> {
    const THREADS: usize = 128;
    // steps per thread: short walks give the probe enough warps to fill the GPU at any size
    let steps = 512usize;
    let threads = (td as usize).div_ceil(steps);
    let blocks = threads.div_ceil(THREADS);
    let n = SCAN_D_STATE;
    // One staged window (SCAN_CKPT steps × 128 channels) of bf16 (x, Δ), (z, 0) and B/C.
    let host: Vec<u32> = (0..SCAN_CKPT * THREADS * 2)
        .map(|i| {
            let xv = bf16::from_f32(((i % 7) as f32 - 3.0) * 0.25).to_bits() as u32;
            let hi = bf16::from_f32(((i % 5) as f32 - 2.0) * 0.5).to_bits() as u32;
            (hi << 16) | xv
        })
        .collect();
    let steps_in = env.poisoned(host.len() * 4)?;
    env.gpu.upload(steps_in, &host)?;
    let bc: Vec<f64> = (0..SCAN_CKPT * 2 * n)
        .map(|i| ((i % 9) as f64 - 4.0) * 0.1)
        .collect();
    let bcp = env.f32_buf(&bc)?;
    let a_log: Vec<f64> = (0..THREADS * n)
        .map(|i| (((i % n) + 1) as f64).ln())
        .collect();
    let alp = env.f32_buf(&a_log)?;
    let sink = env.poisoned(blocks * THREADS * 4)?;
    let elements = td * n as f64;
    let mut lines = Vec::new();
    for (npoly, name) in [
        (0, "scan_floor_fwd_p0"),
        (2, "scan_floor_fwd_p2"),
        (3, "scan_floor_fwd_p3"),
        (4, "scan_floor_fwd_p4"),
        (6, "scan_floor_fwd_p6"),
    ] {
        let k = env.gpu.module_kernel("mamba", name)?;
        let gpu = env.gpu.clone();
        let run = move || -> R<()> {
            let a = archscale_kernels::Args::new()
                .ptr(steps_in)
                .ptr(bcp)
                .ptr(alp)
                .ptr(sink)
                .i32(steps as i32);
            gpu.launch(k, (blocks as u32, 1, 1), (THREADS as u32, 1, 1), 0, &a)
        };
        let ms = time_ms(&env.gpu, &run)?;
        let sums = env.read_f32(sink, 1024)?;
        lines.push(format!(
            "scan fwd arithmetic floor (no HBM traffic, {npoly} of {n} exponentials per step by \
             polynomial): {ms:.3} ms for {:.2}e9 (t, c, n) = {:.1}% of the memory floor's \
             pace ({mem_floor_ms:.3} ms); finite: {}",
            elements / 1e9,
            100.0 * mem_floor_ms / ms,
            sums.iter().all(|v| v.is_finite())
        ));
    }
    Ok(lines)
}

/// Mean time of `f` over 10 launches after 2 warm-ups (CUDA events).
fn time_ms(gpu: &archscale_kernels::Gpu, f: &dyn Fn() -> R<()>) -> R<f64> {
    for _ in 0..2 {
        f()?;
    }
    gpu.sync()?;
    let iters = 10;
    let start = gpu.event()?;
    for _ in 0..iters {
        f()?;
    }
    let stop = gpu.event()?;
    Ok(stop_ms(&start, &stop)? / iters as f64)
}

fn stop_ms(start: &archscale_kernels::gpu::Event, stop: &archscale_kernels::gpu::Event) -> R<f64> {
    Ok(start.elapsed_ms(stop)? as f64)
}
