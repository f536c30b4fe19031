//! The Gated Memory Unit mixer (arch-spec §1.10): `out_proj(m ⊙ silu(in_proj(h)))`, where
//! `m` is the memory exported by an earlier layer (Mamba's pre-gate scan output, an
//! attention output before `proj`, or an MLP's up half). The memory's gradient is summed
//! (fp32) into the producer's `dmem`, which its own backward consumes.

use super::*;

/// Offsets of a GMU mixer's tensors (`attn.gmu.*`).
#[derive(Clone, Copy, Debug)]
pub(super) struct GmuParams {
    pub(super) in_proj: usize,
    pub(super) in_b: Option<usize>,
    pub(super) out_proj: usize,
    pub(super) out_b: Option<usize>,
}

impl CudaBackend {
    fn gmu_parts(&self, l: usize, lp: &LayerParams) -> Result<(GmuParams, usize)> {
        match (lp.gmu, self.dims.info[l].memory_from) {
            (Some(g), Some(src)) => Ok((g, src)),
            _ => Err(err(format!(
                "CUDA backend: GMU layer {l} without its parameters or memory"
            ))),
        }
    }

    /// `x_mid = x_in + rs · (m ⊙ silu(h·W_inᵀ + b_in))·W_outᵀ (+ rs·b_out)`; saves the gate
    /// input `g` in `sv.qkv` and its output in `sv.y` (the backward's out-projection input).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gmu_forward(
        &self,
        l: usize,
        lp: &LayerParams,
        sv: &Saved,
        batch: usize,
        seq: usize,
        x_in: u64,
        x_mid: u64,
        train: bool,
    ) -> Result<bool> {
        let (gp, src) = self.gmu_parts(l, lp)?;
        let (mem, dm) = self.memory_rows(src, train)?;
        let d = &self.dims;
        let rows = batch * seq;
        let n = d.n;
        let hops = self.hops()?;
        self.mark("gemm gmu in")?;
        self.lt.linear(
            &self.gpu,
            self.h.ptr,
            self.pbf(gp.in_proj),
            sv.qkv,
            0,
            rows,
            n,
            dm,
            OutType::Bf16,
            1.0,
            0.0,
        )?;
        if let Some(b) = gp.in_b {
            hops.bias_add_bf16(Rows::new(sv.qkv, dm), self.p32(b), rows, dm)?;
        }
        self.mark("gmu gate")?;
        hops.gmu_fwd(mem, Rows::new(sv.qkv, dm), Rows::new(sv.y, dm), rows, dm)?;
        self.mark("gemm gmu out")?;
        self.branch_output(sv.y, gp.out_proj, gp.out_b, x_in, x_mid, rows, dm)
    }

    /// Backward of [`Self::gmu_forward`] from `self.dres_bf`: adds the memory's gradient to
    /// the producer's `dmem`; with an RMSNorm also runs norm_1's backward and returns true,
    /// with a LayerNorm leaves `d norm_1 output` in `self.h` and returns false
    /// (`input_projection_backward`).
    pub(super) fn gmu_backward(
        &self,
        l: usize,
        lp: &LayerParams,
        sv: &Saved,
        batch: usize,
        seq: usize,
        x_in: u64,
    ) -> Result<bool> {
        let (gp, src) = self.gmu_parts(l, lp)?;
        let (mem, dm) = self.memory_rows(src, true)?;
        let d = &self.dims;
        let rows = batch * seq;
        let n = d.n;
        let (gpu, lt, rs) = (&self.gpu, &self.lt, d.residual_scale);
        let hops = self.hops()?;
        // the gate's output is the forward's (sv.y), not recomputed
        let (gate, dh, dg) = (sv.y, self.cross.gmu_dh, self.cross.gmu_dg);
        self.mark("gemm gmu out dW")?;
        lt.linear_grad_weight(
            gpu,
            self.dres_bf.ptr,
            gate,
            self.wgrad(gp.out_proj),
            rows,
            dm,
            n,
            rs,
            self.dw_beta(),
        )?;
        if let Some(b) = gp.out_b {
            hops.bias_grad(Rows::new(self.dres_bf.ptr, n), self.g32(b), rs, rows, n)?;
        }
        self.mark("gemm gmu out dx")?;
        lt.linear_grad_input(
            gpu,
            self.dres_bf.ptr,
            self.pbf(gp.out_proj),
            dh,
            rows,
            dm,
            n,
            OutType::Bf16,
            rs,
            0.0,
        )?;
        self.mark("gmu gate bwd")?;
        hops.gmu_bwd(
            mem,
            Rows::new(sv.qkv, dm),
            Rows::new(dh, dm),
            self.saved[src].dmem,
            Rows::new(dg, dm),
            rows,
            dm,
        )?;
        if let Some(b) = gp.in_b {
            hops.bias_grad(Rows::new(dg, dm), self.g32(b), 1.0, rows, dm)?;
        }
        self.input_projection_backward(
            lp,
            sv,
            x_in,
            dg,
            gp.in_proj,
            dm,
            rows,
            ["gemm gmu in dW", "gemm gmu in dx"],
        )
    }
}
