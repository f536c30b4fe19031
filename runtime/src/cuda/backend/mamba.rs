//! The Mamba-1 mixer of a CUDA backend layer (arch-spec §1): in_proj, causal conv + SiLU,
//! x_proj, dt_proj, the fused selective scan with the z gate, out_proj; forward and backward
//! side by side. Kernels: `HybridOps` (kernels/cuda/mamba.cu).

use super::*;

/// Offsets of a Mamba-1 mixer's tensors (names as ArchScale's `attn.*`).
#[derive(Clone, Copy, Debug)]
pub(super) struct MambaParams {
    pub(super) in_proj: usize,
    pub(super) conv_w: usize,
    pub(super) conv_b: usize,
    pub(super) x_proj: usize,
    pub(super) dt_w: usize,
    pub(super) dt_b: usize,
    pub(super) a_log: usize,
    pub(super) d_skip: usize,
    pub(super) out_proj: usize,
}

/// A Mamba layer's saved activations: `xz` (in_proj output, x then z), `xc` (conv + SiLU),
/// `xproj` (x_proj output, rows `[dt | zeros | B | C]` of stride `MambaShape::xs`), `delta`
/// (dt_proj output), `gated` (scan output after the z gate) and the scan's fp32 state
/// checkpoints.
#[derive(Clone, Copy, Debug)]
pub(super) struct MambaSaved {
    pub(super) xz: u64,
    pub(super) xc: u64,
    pub(super) xproj: u64,
    pub(super) delta: u64,
    pub(super) gated: u64,
    pub(super) ckpt: u64,
}

/// Mamba scratch (one set, reused by every Mamba layer): the backward's activation
/// gradients (`dxproj` in x_proj's output layout) and the x_proj / dt_proj weights with the
/// dt rank padded (`HybridOps::mamba_pad_weights`, rebuilt before each layer's products).
#[derive(Clone, Copy, Debug)]
pub(super) struct MambaScratch {
    pub(super) dxz: u64,
    pub(super) dxc: u64,
    pub(super) ddelta: u64,
    pub(super) dxproj: u64,
    pub(super) bc_acc: u64,
    pub(super) dgated: u64,
    pub(super) wx_pad: u64,
    pub(super) wdt_pad: u64,
}

impl CudaBackend {
    pub(super) fn mamba_parts(
        &self,
        lp: &LayerParams,
        sv: &Saved,
    ) -> Result<(MambaParams, MambaSaved, MambaShape, &HybridOps)> {
        match (lp.mamba, sv.mamba, self.dims.mamba, &self.hops) {
            (Some(p), Some(s), Some(m), Some(h)) => Ok((p, s, m, h)),
            _ => Err(err("CUDA backend: Mamba layer without its buffers")),
        }
    }

    fn mamba_scratch(&self) -> Result<MambaScratch> {
        self.mamba_scratch
            .ok_or_else(|| err("CUDA backend: Mamba layer without scratch"))
    }

    /// Fills the scratch's padded x_proj and dt_proj weights from the layer's bf16 weights.
    fn pad_mamba_weights(
        &self,
        mp: &MambaParams,
        m: &MambaShape,
        hops: &HybridOps,
        sc: &MambaScratch,
    ) -> Result<()> {
        hops.mamba_pad_weights(
            self.pbf(mp.x_proj),
            self.pbf(mp.dt_w),
            sc.wx_pad,
            sc.wdt_pad,
            m.r,
            m.rp,
            m.ns,
            m.d,
        )?;
        Ok(())
    }

    /// The scan's inputs for a Mamba layer's saved activations.
    pub(super) fn scan_tensors(
        &self,
        mp: &MambaParams,
        ms: &MambaSaved,
        m: &MambaShape,
    ) -> ScanTensors {
        ScanTensors {
            x: Rows::new(ms.xc, m.d),
            delta: Rows::new(ms.delta, m.d),
            z: Some(Rows::new(ms.xz + (m.d * BF) as u64, 2 * m.d)),
            b: Rows::new(ms.xproj + (m.rp * BF) as u64, m.xs),
            c: Rows::new(ms.xproj + ((m.rp + m.ns) * BF) as u64, m.xs),
            delta_bias: self.p32(mp.dt_b),
            a_log: self.p32(mp.a_log),
            d_skip: self.p32(mp.d_skip),
            seg: self.seg(),
        }
    }

    /// Mamba-1 mixer (arch-spec §1): `xz = in_proj(h)`, `xc = silu(conv(x))`,
    /// `[dt, B, C] = x_proj(xc)` (one product with the padded weight, so `dt` comes with
    /// rp − r zero columns), `delta = dt_proj(dt)`, `y = scan(...) ⊙ silu(z)`,
    /// `x_mid = x_in + rs · out_proj(y)`; `self.h` holds `norm_1(x_in)`. With
    /// `residual_in_norm` the product leaves its branch in bf16 in `self.h` for the next norm
    /// to add, and this returns true (as [`Self::attention_forward`]).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn mamba_forward(
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
        let (mp, ms, m, hops) = self.mamba_parts(lp, sv)?;
        let sc = self.mamba_scratch()?;
        let d = &self.dims;
        let rows = batch * seq;
        let (n, dd) = (d.n, m.d);
        self.mark("gemm in_proj")?;
        self.lt.linear(
            &self.gpu,
            self.h.ptr,
            self.pbf(mp.in_proj),
            ms.xz,
            0,
            rows,
            n,
            2 * dd,
            OutType::Bf16,
            1.0,
            0.0,
        )?;
        self.mark("conv")?;
        hops.conv1d_silu_fwd(
            Rows::new(ms.xz, 2 * dd),
            self.p32(mp.conv_w),
            self.p32(mp.conv_b),
            self.seg(),
            Rows::new(ms.xc, dd),
            batch,
            seq,
            dd,
        )?;
        self.mark("gemm x_proj")?;
        self.pad_mamba_weights(&mp, &m, hops, &sc)?;
        self.lt.linear_ld(
            &self.gpu,
            ms.xc,
            dd,
            sc.wx_pad,
            ms.xproj,
            m.xs,
            0,
            rows,
            dd,
            m.xs,
            OutType::Bf16,
            1.0,
            0.0,
        )?;
        self.mark("gemm dt_proj")?;
        self.lt.linear_ld(
            &self.gpu,
            ms.xproj,
            m.xs,
            sc.wdt_pad,
            ms.delta,
            dd,
            0,
            rows,
            m.rp,
            dd,
            OutType::Bf16,
            1.0,
            0.0,
        )?;
        self.mark("scan fwd")?;
        let shape = ScanShape {
            batch,
            seq,
            d_inner: dd,
        };
        hops.selective_scan_fwd(
            &shape,
            &self.scan_tensors(&mp, &ms, &m),
            Rows::new(ms.gated, dd),
            // a memory exporter also keeps the pre-gate y for the GMU layers
            matches!(d.info[l].memory, Some((MemorySource::Mamba, _)))
                .then(|| Rows::new(sv.mem_y, dd)),
            train.then_some(ms.ckpt),
        )?;
        self.mark("gemm out_proj")?;
        self.branch_output(ms.gated, mp.out_proj, None, x_in, x_mid, rows, dd)
    }

    /// Backward of [`Self::mamba_forward`] from `self.dres_bf`; with an RMSNorm also runs
    /// norm_1's backward and returns true, with a LayerNorm leaves `d norm_1 output` in
    /// `self.h` and returns false (`input_projection_backward`).
    pub(super) fn mamba_backward(
        &self,
        l: usize,
        lp: &LayerParams,
        sv: &Saved,
        batch: usize,
        seq: usize,
        x_in: u64,
    ) -> Result<bool> {
        let (mp, ms, m, hops) = self.mamba_parts(lp, sv)?;
        let sc = self.mamba_scratch()?;
        let d = &self.dims;
        let rows = batch * seq;
        let (n, dd, r, ns) = (d.n, m.d, m.r, m.ns);
        let (gpu, lt, rs) = (&self.gpu, &self.lt, d.residual_scale);
        self.mark("gemm out_proj dW")?;
        lt.linear_grad_weight(
            gpu,
            self.dres_bf.ptr,
            ms.gated,
            self.wgrad(mp.out_proj),
            rows,
            dd,
            n,
            rs,
            self.dw_beta(),
        )?;
        self.mark("gemm out_proj dx")?;
        lt.linear_grad_input(
            gpu,
            self.dres_bf.ptr,
            self.pbf(mp.out_proj),
            sc.dgated,
            rows,
            dd,
            n,
            OutType::Bf16,
            rs,
            0.0,
        )?;
        self.mark("scan bwd")?;
        let shape = ScanShape {
            batch,
            seq,
            d_inner: dd,
        };
        let grads = ScanGrads {
            x: Rows::new(sc.dxc, dd),
            delta: Rows::new(sc.ddelta, dd),
            z: Some(Rows::new(sc.dxz + (dd * BF) as u64, 2 * dd)),
            b: Rows::new(sc.dxproj + (m.rp * BF) as u64, m.xs),
            c: Rows::new(sc.dxproj + ((m.rp + ns) * BF) as u64, m.xs),
            delta_bias: self.g32(mp.dt_b),
            a_log: self.g32(mp.a_log),
            d_skip: self.g32(mp.d_skip),
        };
        // a memory exporter's y also gets the GMU layers' gradient
        let dy_extra = if matches!(d.info[l].memory, Some((MemorySource::Mamba, _))) {
            self.ops
                .cast_f32_bf16(sv.dmem, self.cross.dmem_bf, rows * dd)?;
            Some(Rows::new(self.cross.dmem_bf, dd))
        } else {
            None
        };
        hops.selective_scan_bwd(
            &shape,
            &self.scan_tensors(&mp, &ms, &m),
            ms.ckpt,
            Rows::new(sc.dgated, dd),
            dy_extra,
            &grads,
            sc.bc_acc,
        )?;
        self.mark("gemm dt_proj dW/dx")?;
        self.pad_mamba_weights(&mp, &m, hops, &sc)?;
        lt.linear_grad_weight_ld(
            gpu,
            sc.ddelta,
            dd,
            ms.xproj,
            m.xs,
            self.wgrad(mp.dt_w),
            rows,
            r,
            dd,
            1.0,
            self.dw_beta(),
        )?;
        // dt's gradient fills columns 0..rp of dxproj (zeros past r: the padded weight's
        // columns are zero), beside the scan's dB and dC
        lt.linear_grad_input_ld(
            gpu,
            sc.ddelta,
            dd,
            sc.wdt_pad,
            sc.dxproj,
            m.xs,
            rows,
            m.rp,
            dd,
            OutType::Bf16,
            1.0,
            0.0,
        )?;
        self.mark("gemm x_proj dW/dx")?;
        lt.linear_grad_weight_ld(
            gpu,
            sc.dxproj,
            m.xs,
            ms.xc,
            dd,
            self.wgrad(mp.x_proj),
            rows,
            dd,
            r,
            1.0,
            self.dw_beta(),
        )?;
        lt.linear_grad_weight_ld(
            gpu,
            sc.dxproj + (m.rp * BF) as u64,
            m.xs,
            ms.xc,
            dd,
            self.wgrad_at(mp.x_proj, r * dd),
            rows,
            dd,
            2 * ns,
            1.0,
            self.dw_beta(),
        )?;
        // the scan's dx is in dxc already: add x_proj's (one product over dt, B and C)
        lt.linear_grad_input_ld(
            gpu,
            sc.dxproj,
            m.xs,
            sc.wx_pad,
            sc.dxc,
            dd,
            rows,
            dd,
            m.xs,
            OutType::Bf16,
            1.0,
            1.0,
        )?;
        self.mark("conv bwd")?;
        hops.conv1d_silu_bwd(
            Rows::new(ms.xz, 2 * dd),
            self.p32(mp.conv_w),
            self.p32(mp.conv_b),
            self.seg(),
            Rows::new(sc.dxc, dd),
            Rows::new(sc.dxz, 2 * dd),
            self.g32(mp.conv_w),
            self.g32(mp.conv_b),
            batch,
            seq,
            dd,
        )?;
        self.input_projection_backward(
            lp,
            sv,
            x_in,
            sc.dxz,
            mp.in_proj,
            2 * dd,
            rows,
            ["gemm in_proj dW", "gemm in_proj dx"],
        )
    }
}
