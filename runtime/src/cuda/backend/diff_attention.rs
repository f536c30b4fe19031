//! Differential attention (arch-spec §1.8) on flash attention, forward and backward.
//!
//! Pair `j < H/2` uses query heads `2j + s` (s = 0: q1, s = 1: q2) and KV heads `2jj + s`,
//! `jj = j / qpg`; `O_s = A_s·[v1 ‖ v2]` with `A_s = softmax(q_s·k_sᵀ)`. One flash call runs
//! all four products `A_s·v_v` as `2H` heads, head `(2s + v)·H/2 + j` against KV group
//! `(2s + v)·G/2 + jj`, on copies of Q, K and V gathered into that order (`copy_heads`).
//! Its output is regrouped into `O1`, `O2` (`[rows, H/2, 2hs]`), combined as
//! `RMSNorm(O1 − λ·O2; subln)·(1 − λ_init)` into `y`. The backward scatters the flash
//! gradients back into the fused (or, cross-attention, Q-only) projection layout, summing
//! the two products each Q, K and V vector took part in.

use super::*;

/// Offsets of a differential attention layer's extra tensors (`attn.da.*`).
#[derive(Clone, Copy, Debug)]
pub(super) struct DiffParams {
    pub(super) q1: usize,
    pub(super) k1: usize,
    pub(super) q2: usize,
    pub(super) k2: usize,
    pub(super) subln: usize,
    pub(super) lambda_init: f64,
}

/// Saved per differential attention layer: the flash output of the `2H` heads `[rows, 2H,
/// hs]` (its log-sum-exp is the layer's `lse`), the subln `rstd` (fp32 `[rows·H/2]`) and
/// λ (4 fp32: λ, exp(λq1·λk1), exp(λq2·λk2), dλ).
#[derive(Clone, Copy, Debug)]
pub(super) struct DiffSaved {
    pub(super) ob: u64,
    pub(super) rstd: u64,
    pub(super) lam: u64,
}

/// Index tables (device i32, element offsets) and scratch shared by every DA layer.
pub(super) struct DiffScratch {
    /// `t·hs` for t < 2H.
    ident: u64,
    /// `(v, j) -> j·2hs + v·hs` for the H heads `v·H/2 + j` (interleave into pair vectors).
    inter: u64,
    /// Flash head `(2s + v)·H/2 + j` -> offset of query head `2j + s` in the fused QKV row,
    /// and in a cross layer's Q-only row.
    q_fused: u64,
    q_cross: u64,
    /// Flash group `(2s + v)·G/2 + jj` -> offset of K head `2jj + s` / V head `2jj + v` in
    /// the fused row.
    k_tab: u64,
    v_tab: u64,
    // bf16 gathers and their gradients
    qd: u64,
    kd: u64,
    vd: u64,
    o1: u64,
    o2: u64,
    do1: u64,
    do2: u64,
    dob: u64,
    dqd: u64,
    dkd: u64,
    dvd: u64,
    /// flash backward scratch for 2H heads
    dq_acc: u64,
    delta: u64,
}

/// The index tables of [`DiffScratch`] for H heads, G KV groups of `hs`, concatenated,
/// and where each starts: ident, inter, q_fused, q_cross, k, v.
fn da_tables(h: usize, g: usize, hs: usize) -> Result<(Vec<i32>, [u64; 6])> {
    let qpg = h / g;
    let slots = qpg + 2;
    let fused_q = |head: usize| ((head / qpg) * slots + head % qpg) * hs;
    let mut tables: Vec<i32> = Vec::new();
    let mut table = |v: Vec<usize>| -> Result<u64> {
        let at = tables.len();
        for x in v {
            tables.push(
                i32::try_from(x).map_err(|_| err("CUDA backend: DA offset exceeds 32 bits"))?,
            );
        }
        Ok(at as u64)
    };
    let ident = table((0..2 * h).map(|t| t * hs).collect())?;
    let inter = table(
        (0..h)
            .map(|t| (t % (h / 2)) * 2 * hs + (t / (h / 2)) * hs)
            .collect(),
    )?;
    // flash head t = (2s + v)·H/2 + j
    let heads = |f: &dyn Fn(usize, usize) -> usize| -> Vec<usize> {
        (0..2 * h)
            .map(|t| f(t / (h / 2) / 2, t % (h / 2)))
            .collect()
    };
    let q_fused = table(heads(&|s, j| fused_q(2 * j + s)))?;
    let q_cross = table(heads(&|s, j| (2 * j + s) * hs))?;
    // flash group t = (2s + v)·G/2 + jj
    let groups = |f: &dyn Fn(usize, usize, usize) -> usize| -> Vec<usize> {
        (0..2 * g)
            .map(|t| {
                let quarter = t / (g / 2);
                f(quarter / 2, quarter % 2, t % (g / 2))
            })
            .collect()
    };
    let k_tab = table(groups(&|s, _, jj| ((2 * jj + s) * slots + qpg) * hs))?;
    let v_tab = table(groups(&|_, v, jj| ((2 * jj + v) * slots + qpg + 1) * hs))?;
    Ok((tables, [ident, inter, q_fused, q_cross, k_tab, v_tab]))
}

impl DiffScratch {
    pub(super) fn new(
        d: &Dims,
        cap_train: usize,
        cap_eval: usize,
        alloc: &dyn Fn(usize) -> Result<DeviceBuffer>,
        gpu: &Gpu,
        keep: &mut Vec<DeviceBuffer>,
    ) -> Result<DiffScratch> {
        let (h, g, hs) = (d.heads, d.groups, d.hs);
        let (tables, [ident, inter, q_fused, q_cross, k_tab, v_tab]) = da_tables(h, g, hs)?;
        let tbuf = alloc(tables.len() * 4)?;
        gpu.upload(tbuf.ptr, &tables)?;
        let base = tbuf.ptr;
        keep.push(tbuf);
        let mut buf = |bytes: usize| -> Result<u64> {
            let b = alloc(bytes.max(64))?;
            let p = b.ptr;
            keep.push(b);
            Ok(p)
        };
        let (ce, ct) = (cap_eval, cap_train);
        let aw = h * hs;
        Ok(DiffScratch {
            ident: base + ident * 4,
            inter: base + inter * 4,
            q_fused: base + q_fused * 4,
            q_cross: base + q_cross * 4,
            k_tab: base + k_tab * 4,
            v_tab: base + v_tab * 4,
            qd: buf(ce * 2 * aw * BF)?,
            kd: buf(ce * 2 * g * hs * BF)?,
            vd: buf(ce * 2 * g * hs * BF)?,
            o1: buf(ce * aw * BF)?,
            o2: buf(ce * aw * BF)?,
            do1: buf(ct * aw * BF)?,
            do2: buf(ct * aw * BF)?,
            dob: buf(ct * 2 * aw * BF)?,
            dqd: buf(ct * 2 * aw * BF)?,
            dkd: buf(ct * 2 * g * hs * BF)?,
            dvd: buf(ct * 2 * g * hs * BF)?,
            dq_acc: buf(ct * 2 * aw * F32)?,
            delta: buf(ct * 2 * h * F32)?,
        })
    }
}

impl CudaBackend {
    fn diff_parts(
        &self,
        lp: &LayerParams,
        sv: &Saved,
    ) -> Result<(DiffParams, DiffSaved, &DiffScratch)> {
        match (lp.diff, sv.diff, &self.diff) {
            (Some(p), Some(s), Some(x)) => Ok((p, s, x)),
            _ => Err(err(
                "CUDA backend: differential attention layer without its buffers",
            )),
        }
    }

    /// The `2H`-head flash layout over the gathered Q, K, V.
    fn diff_layout(&self, l: usize, batch: usize, seq: usize) -> AttnLayout {
        let d = &self.dims;
        let (h, g, hs) = (d.heads, d.groups, d.hs);
        AttnLayout {
            batch,
            seq,
            heads: 2 * h,
            qpg: h / g,
            head_dim: hs,
            q_row_stride: 2 * h * hs,
            q_group_stride: (h / g) * hs,
            kv_row_stride: 2 * g * hs,
            kv_group_stride: hs,
            o_row_stride: 2 * h * hs,
            scale: d.attn_scale,
            window: d.windows[l],
            seg: self.seg().unwrap_or(0),
        }
    }

    /// Gathers layer `l`'s queries (from `sv.qkv`) and K/V (from the fused buffer `kv`)
    /// into the flash order.
    fn diff_gather(&self, l: usize, sv: &Saved, kv: u64, rows: usize) -> Result<()> {
        let d = &self.dims;
        let (h, g, hs) = (d.heads, d.groups, d.hs);
        let ds = self
            .diff
            .as_ref()
            .ok_or_else(|| err("CUDA backend: no DA scratch"))?;
        let hops = self.hops()?;
        let cross = d.info[l].kv_from.is_some();
        let qtab = if cross { ds.q_cross } else { ds.q_fused };
        let (qw, fused) = (d.proj_in_width(l), d.qkv_width());
        self.mark("da gather")?;
        hops.copy_heads(
            Rows::new(sv.qkv, qw),
            qtab,
            Rows::new(ds.qd, 2 * h * hs),
            ds.ident,
            rows,
            2 * h,
            hs,
            false,
        )?;
        hops.copy_heads(
            Rows::new(kv, fused),
            ds.k_tab,
            Rows::new(ds.kd, 2 * g * hs),
            ds.ident,
            rows,
            2 * g,
            hs,
            false,
        )?;
        hops.copy_heads(
            Rows::new(kv, fused),
            ds.v_tab,
            Rows::new(ds.vd, 2 * g * hs),
            ds.ident,
            rows,
            2 * g,
            hs,
            false,
        )?;
        Ok(())
    }

    /// `O1`, `O2` (`[rows, H/2, 2hs]`) from the saved flash output.
    fn diff_regroup(&self, dsv: &DiffSaved, rows: usize) -> Result<()> {
        let d = &self.dims;
        let (h, hs) = (d.heads, d.hs);
        let ds = self
            .diff
            .as_ref()
            .ok_or_else(|| err("CUDA backend: no DA scratch"))?;
        for (s, dst) in [(0, ds.o1), (1, ds.o2)] {
            self.hops()?.copy_heads(
                Rows::new(dsv.ob + (s * h * hs * BF) as u64, 2 * h * hs),
                ds.ident,
                Rows::new(dst, h * hs),
                ds.inter,
                rows,
                h,
                hs,
                false,
            )?;
        }
        Ok(())
    }

    /// Differential attention of layer `l` from its projection output `sv.qkv` and the
    /// fused K/V buffer `kv` into `sv.y`.
    pub(super) fn diff_forward(
        &self,
        l: usize,
        lp: &LayerParams,
        sv: &Saved,
        batch: usize,
        seq: usize,
        kv: u64,
    ) -> Result<()> {
        let (dp, dsv, ds) = self.diff_parts(lp, sv)?;
        let d = &self.dims;
        let rows = batch * seq;
        let (h, hs) = (d.heads, d.hs);
        let hops = self.hops()?;
        self.diff_gather(l, sv, kv, rows)?;
        self.mark("attn fwd")?;
        self.ops.flash_fwd(
            &self.diff_layout(l, batch, seq),
            ds.qd,
            ds.kd,
            ds.vd,
            dsv.ob,
            sv.lse,
        )?;
        self.mark("da combine")?;
        hops.da_lambda_fwd(
            self.p32(dp.q1),
            self.p32(dp.k1),
            self.p32(dp.q2),
            self.p32(dp.k2),
            dsv.lam,
            hs,
            dp.lambda_init as f32,
        )?;
        self.diff_regroup(&dsv, rows)?;
        hops.diff_combine_fwd(
            ds.o1,
            ds.o2,
            dsv.lam,
            self.p32(dp.subln),
            sv.y,
            dsv.rstd,
            rows * h / 2,
            2 * hs,
            crate::cpu::ops::diff_attention::SUBLN_EPS as f32,
            (1.0 - dp.lambda_init) as f32,
        )?;
        Ok(())
    }

    /// Backward of [`Self::diff_forward`] from `self.dy`: writes the projection output's
    /// gradient — into `dq_dst` (the fused dQKV, `self.dqkv`, for self-attention; a cross
    /// layer's dQ, whose dK/dV go to `self.dqkv`, zeroed by the caller).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn diff_backward(
        &self,
        l: usize,
        lp: &LayerParams,
        sv: &Saved,
        batch: usize,
        seq: usize,
        kv: u64,
        dq_dst: u64,
    ) -> Result<()> {
        let (dp, dsv, ds) = self.diff_parts(lp, sv)?;
        let d = &self.dims;
        let rows = batch * seq;
        let (h, g, hs) = (d.heads, d.groups, d.hs);
        let (qw, fused) = (d.proj_in_width(l), d.qkv_width());
        let cross = d.info[l].kv_from.is_some();
        let hops = self.hops()?;
        self.mark("da combine bwd")?;
        self.diff_regroup(&dsv, rows)?;
        hops.diff_combine_bwd(
            ds.o1,
            ds.o2,
            dsv.lam,
            self.p32(dp.subln),
            dsv.rstd,
            self.dy.ptr,
            ds.do1,
            ds.do2,
            self.g32(dp.subln),
            rows * h / 2,
            2 * hs,
            (1.0 - dp.lambda_init) as f32,
        )?;
        hops.da_lambda_bwd(
            self.p32(dp.q1),
            self.p32(dp.k1),
            self.p32(dp.q2),
            self.p32(dp.k2),
            dsv.lam,
            [
                self.g32(dp.q1),
                self.g32(dp.k1),
                self.g32(dp.q2),
                self.g32(dp.k2),
            ],
            hs,
        )?;
        for (s, src) in [(0, ds.do1), (1, ds.do2)] {
            hops.copy_heads(
                Rows::new(src, h * hs),
                ds.inter,
                Rows::new(ds.dob + (s * h * hs * BF) as u64, 2 * h * hs),
                ds.ident,
                rows,
                h,
                hs,
                false,
            )?;
        }
        self.diff_gather(l, sv, kv, rows)?;
        self.mark("attn bwd")?;
        self.ops.flash_bwd(
            &self.diff_layout(l, batch, seq),
            ds.qd,
            ds.kd,
            ds.vd,
            dsv.ob,
            ds.dob,
            sv.lse,
            ds.dqd,
            ds.dkd,
            ds.dvd,
            ds.dq_acc,
            ds.delta,
            None,
        )?;
        // scatter-add into the projection layout, one quarter (s, v) per launch so no
        // launch writes a vector twice
        self.mark("da scatter")?;
        if !cross {
            self.gpu.memset_zero(self.dqkv.ptr, rows * fused * BF)?;
        } else {
            self.gpu.memset_zero(dq_dst, rows * qw * BF)?;
        }
        let qtab = if cross { ds.q_cross } else { ds.q_fused };
        for quarter in 0..4 {
            let (qh, kh) = (quarter * h / 2, quarter * g / 2);
            hops.copy_heads(
                Rows::new(ds.dqd + (qh * hs * BF) as u64, 2 * h * hs),
                ds.ident,
                Rows::new(dq_dst, qw),
                qtab + (qh * 4) as u64,
                rows,
                h / 2,
                hs,
                true,
            )?;
            for (src, tab) in [(ds.dkd, ds.k_tab), (ds.dvd, ds.v_tab)] {
                hops.copy_heads(
                    Rows::new(src + (kh * hs * BF) as u64, 2 * g * hs),
                    ds.ident,
                    Rows::new(self.dqkv.ptr, fused),
                    tab + (kh * 4) as u64,
                    rows,
                    g / 2,
                    hs,
                    true,
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The flash order must pair every query with the CPU model's K/V (arch-spec §1.8):
    /// pair j's head 2j+s meets KV head 2·(j/qpg)+s, and O_s takes V heads 2jj and 2jj+1.
    #[test]
    fn da_tables_pair_queries_with_the_cpu_models_kv_heads() {
        for (h, g) in [(4, 2), (8, 2), (40, 20), (8, 4)] {
            let hs = 1;
            let (t, [ident, inter, q_fused, q_cross, k_tab, v_tab]) = da_tables(h, g, hs).unwrap();
            let at = |base: u64, i: usize| t[base as usize + i] as usize;
            let (qpg, slots) = (h / g, h / g + 2);
            for i in 0..2 * h {
                assert_eq!(at(ident, i), i);
            }
            for head in 0..2 * h {
                let (quarter, j) = (head / (h / 2), head % (h / 2));
                let (s, v) = (quarter / 2, quarter % 2);
                let q = 2 * j + s;
                assert_eq!(at(q_fused, head), (q / qpg) * slots + q % qpg);
                assert_eq!(at(q_cross, head), q);
                // the flash kernel's GQA: head / qpg is the KV group it reads
                let group = head / qpg;
                let jj = j / qpg;
                assert_eq!(at(k_tab, group), (2 * jj + s) * slots + qpg);
                assert_eq!(at(v_tab, group), (2 * jj + v) * slots + qpg + 1);
            }
            // O_s pair vectors [A_s·v1 ‖ A_s·v2]
            for i in 0..h {
                let (v, j) = (i / (h / 2), i % (h / 2));
                assert_eq!(at(inter, i), j * 2 + v);
            }
        }
    }
}
