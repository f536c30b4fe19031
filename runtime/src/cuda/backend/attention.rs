//! The attention mixer of a CUDA backend layer: fused QKV projection, RoPE, flash attention
//! (causal or sliding window, GQA) and the output projection, forward and backward.

use super::*;

impl CudaBackend {
    /// Attention mixer of layer `l`: `x_mid = x_in + rs · proj(attn(rope(qkv(h))))`, where
    /// `self.h` holds `norm_1(x_in)`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention_forward(
        &self,
        l: usize,
        lp: &LayerParams,
        sv: &Saved,
        batch: usize,
        seq: usize,
        x_in: u64,
        x_mid: u64,
    ) -> Result<()> {
        let d = &self.dims;
        let rows = batch * seq;
        let (n, hs, qw, aw) = (d.n, d.hs, d.qkv_width(), d.attn_width());
        let ops = &self.ops;
        let gpu = &self.gpu;
        let rs = d.residual_scale;
        self.mark("gemm qkv")?;
        self.lt.linear(
            gpu,
            self.h.ptr,
            self.pbf(lp.qkv),
            sv.qkv,
            0,
            rows,
            n,
            qw,
            OutType::Bf16,
            1.0,
            0.0,
        )?;
        self.mark("rope")?;
        if d.rope[l] {
            ops.rope_qkv(
                sv.qkv,
                self.rope_cos.ptr,
                self.rope_sin.ptr,
                rows,
                seq,
                d.groups,
                d.heads / d.groups,
                hs,
                1.0,
            )?;
        }
        let al = AttnLayout::fused_qkv(
            batch,
            seq,
            d.heads,
            d.groups,
            hs,
            d.attn_scale,
            d.windows[l],
        );
        let (ko, vo) = (
            (al.fused_k_offset() * BF) as u64,
            (al.fused_v_offset() * BF) as u64,
        );
        self.mark("attn fwd")?;
        ops.flash_fwd(&al, sv.qkv, sv.qkv + ko, sv.qkv + vo, sv.y, sv.lse)?;
        self.mark("gemm proj")?;
        self.lt.linear(
            gpu,
            sv.y,
            self.pbf(lp.proj),
            x_mid,
            x_in,
            rows,
            aw,
            n,
            OutType::F32,
            rs,
            1.0,
        )?;
        Ok(())
    }

    /// Backward of the attention mixer from `self.dres_bf` (the residual gradient); leaves
    /// `d norm_1 output` in `self.h`.
    pub(super) fn attention_backward(
        &self,
        l: usize,
        lp: &LayerParams,
        sv: &Saved,
        batch: usize,
        seq: usize,
        x_in: u64,
    ) -> Result<()> {
        let d = &self.dims;
        let rows = batch * seq;
        let (n, hs, qw, aw) = (d.n, d.hs, d.qkv_width(), d.attn_width());
        let ops = &self.ops;
        let gpu = &self.gpu;
        let lt = &self.lt;
        let rs = d.residual_scale;
        // attention branch: out = rs · y·Woᵀ
        self.mark("gemm proj dW")?;
        lt.linear_grad_weight(
            gpu,
            self.dres_bf.ptr,
            sv.y,
            self.g32(lp.proj),
            rows,
            aw,
            n,
            rs,
            1.0,
        )?;
        self.mark("gemm proj dx")?;
        lt.linear_grad_input(
            gpu,
            self.dres_bf.ptr,
            self.pbf(lp.proj),
            self.dy.ptr,
            rows,
            aw,
            n,
            OutType::Bf16,
            rs,
            0.0,
        )?;
        let al = AttnLayout::fused_qkv(
            batch,
            seq,
            d.heads,
            d.groups,
            hs,
            d.attn_scale,
            d.windows[l],
        );
        let (ko, vo) = (
            (al.fused_k_offset() * BF) as u64,
            (al.fused_v_offset() * BF) as u64,
        );
        self.mark("attn bwd")?;
        ops.flash_bwd(
            &al,
            sv.qkv,
            sv.qkv + ko,
            sv.qkv + vo,
            sv.y,
            self.dy.ptr,
            sv.lse,
            self.dqkv.ptr,
            self.dqkv.ptr + ko,
            self.dqkv.ptr + vo,
            self.dq_acc.ptr,
            self.delta.ptr,
        )?;
        self.mark("rope")?;
        if d.rope[l] {
            ops.rope_qkv(
                self.dqkv.ptr,
                self.rope_cos.ptr,
                self.rope_sin.ptr,
                rows,
                seq,
                d.groups,
                d.heads / d.groups,
                hs,
                -1.0,
            )?;
        }
        self.mark("norm fwd")?;
        ops.rmsnorm_fwd(x_in, self.p32(lp.norm1), self.h.ptr, 0, rows, n, d.eps, 1.0)?;
        self.mark("gemm qkv dW")?;
        lt.linear_grad_weight(
            gpu,
            self.dqkv.ptr,
            self.h.ptr,
            self.g32(lp.qkv),
            rows,
            n,
            qw,
            1.0,
            1.0,
        )?;
        self.mark("gemm qkv dx")?;
        lt.linear_grad_input(
            gpu,
            self.dqkv.ptr,
            self.pbf(lp.qkv),
            self.h.ptr,
            rows,
            n,
            qw,
            OutType::Bf16,
            1.0,
            0.0,
        )?;
        Ok(())
    }
}
