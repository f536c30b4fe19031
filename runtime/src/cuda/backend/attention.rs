//! The attention mixer of a CUDA backend layer: fused QKV projection (+ bias), RoPE, flash
//! attention (causal or sliding window, GQA) and the output projection (+ bias), forward and
//! backward. YOCO cross-attention layers project Q only and attend to the K/V of the layer
//! that exports them; their dK/dV are summed into that layer's gradient (`kv_acc`) before
//! its own backward runs. Differential attention is in `diff_attention.rs`.

use super::*;
use archscale_kernels::ops::{RopeBackward, RopeTables};

impl CudaBackend {
    /// Flash layout of layer `l`: its fused QKV buffer, or (cross-attention) its Q-only
    /// buffer against the exporting layer's fused buffer.
    pub(super) fn attn_layout(&self, l: usize, batch: usize, seq: usize) -> AttnLayout {
        let d = &self.dims;
        let mut al = AttnLayout::fused_qkv(
            batch,
            seq,
            d.heads,
            d.groups,
            d.hs,
            d.attn_scale,
            d.windows[l],
        );
        if d.info[l].kv_from.is_some() {
            al.q_row_stride = d.attn_width();
            al.q_group_stride = al.qpg * d.hs;
        }
        al.with_seg(self.seg().unwrap_or(0))
    }

    /// The fused QKV buffer layer `l` reads K and V from (its own, or the exporter's).
    pub(super) fn kv_base(&self, l: usize, sv: &Saved, train: bool) -> u64 {
        match self.dims.info[l].kv_from {
            Some(src) => self.saved_of(src, train).qkv,
            None => sv.qkv,
        }
    }

    /// Attention mixer of layer `l`: `x_mid = x_in + rs · proj(attn(rope(qkv(h))))`, where
    /// `self.h` holds `norm_1(x_in)`. With `residual_in_norm` the product leaves its branch
    /// in bf16 in `self.h` and returns true: norm 2 then adds it (`norm_fwd_add`).
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
        train: bool,
    ) -> Result<bool> {
        let d = &self.dims;
        let rows = batch * seq;
        let (n, hs, aw) = (d.n, d.hs, d.attn_width());
        let qw = d.proj_in_width(l);
        let ops = &self.ops;
        let gpu = &self.gpu;
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
        if let Some(b) = lp.qkv_b {
            self.hops()?
                .bias_add_bf16(Rows::new(sv.qkv, qw), self.p32(b), rows, qw)?;
        }
        self.mark("rope")?;
        if d.rope[l] {
            // self-attention only: cross-attention with RoPE is refused in dims_of
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
        let kv = self.kv_base(l, sv, train);
        if lp.diff.is_some() {
            self.diff_forward(l, lp, sv, batch, seq, kv)?;
        } else {
            let al = self.attn_layout(l, batch, seq);
            let (ko, vo) = (
                (al.fused_k_offset() * BF) as u64,
                (al.fused_v_offset() * BF) as u64,
            );
            self.mark("attn fwd")?;
            ops.flash_fwd(&al, sv.qkv, kv + ko, kv + vo, sv.y, sv.lse)?;
        }
        self.mark("gemm proj")?;
        self.branch_output(sv.y, lp.proj, lp.proj_b, x_in, x_mid, rows, aw)
    }

    /// Backward of the attention mixer from `self.dres_bf` (the residual gradient); with an
    /// RMSNorm also runs norm_1's backward and returns true, with a LayerNorm leaves
    /// `d norm_1 output` in `self.h` and returns false (`input_projection_backward`).
    pub(super) fn attention_backward(
        &self,
        l: usize,
        lp: &LayerParams,
        sv: &Saved,
        batch: usize,
        seq: usize,
        x_in: u64,
    ) -> Result<bool> {
        let d = &self.dims;
        let info = d.info[l];
        let rows = batch * seq;
        let (n, hs, aw, fused) = (d.n, d.hs, d.attn_width(), d.qkv_width());
        let qw = d.proj_in_width(l);
        let cross = info.kv_from.is_some();
        let ops = &self.ops;
        let gpu = &self.gpu;
        let lt = &self.lt;
        let rs = d.residual_scale;
        // attention branch: out = rs · (y·Woᵀ + b)
        self.mark("gemm proj dW")?;
        lt.linear_grad_weight(
            gpu,
            self.dres_bf.ptr,
            sv.y,
            self.wgrad(lp.proj),
            rows,
            aw,
            n,
            rs,
            self.dw_beta(),
        )?;
        if let Some(b) = lp.proj_b {
            self.hops()?
                .bias_grad(Rows::new(self.dres_bf.ptr, n), self.g32(b), rs, rows, n)?;
        }
        // gmu_attn: y is also the GMU memory; its gradient joins the projection's
        let memory = matches!(info.memory, Some((MemorySource::Attention, _)));
        if memory {
            ops.cast_f32_bf16(sv.dmem, self.dy.ptr, rows * aw)?;
        }
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
            if memory { 1.0 } else { 0.0 },
        )?;
        let kv = self.kv_base(l, sv, true);
        // gradient of this layer's projection output: fused dQKV, or a cross layer's dQ
        // (its dK/dV land in `self.dqkv`, in the exporter's fused layout)
        let dsrc = if cross { self.cross.dq } else { self.dqkv.ptr };
        if cross {
            gpu.memset_zero(self.dqkv.ptr, rows * fused * BF)?;
        }
        // RoPE's backward runs inside the flash backward (dQ's conversion and dK's store
        // rotate) unless ARCHSCALE_ROPE_BWD=separate, or the cross-attention layers' dK join
        // this layer's after it (they need the rotation too), or the layer is differential
        // (its flash backward writes a gathered layout): then rope_qkv runs below.
        let fuse_rope = d.rope[l]
            && lp.diff.is_none()
            && !cross
            && !(info.exports_kv && d.any_cross())
            && ops.rope_backward() == RopeBackward::Fused;
        if lp.diff.is_some() {
            self.diff_backward(l, lp, sv, batch, seq, kv, dsrc)?;
        } else {
            let al = self.attn_layout(l, batch, seq);
            let (ko, vo) = (
                (al.fused_k_offset() * BF) as u64,
                (al.fused_v_offset() * BF) as u64,
            );
            self.mark("attn bwd")?;
            let rope = fuse_rope.then_some(RopeTables {
                cos: self.rope_cos.ptr,
                sin: self.rope_sin.ptr,
                len: self.rope_len,
            });
            ops.flash_bwd(
                &al,
                sv.qkv,
                kv + ko,
                kv + vo,
                sv.y,
                self.dy.ptr,
                sv.lse,
                dsrc,
                self.dqkv.ptr + ko,
                self.dqkv.ptr + vo,
                self.dq_acc.ptr,
                self.delta.ptr,
                rope,
            )?;
        }
        // The fused layout is one block per KV group, [its Q heads | K | V]: as rows of one
        // group, K and V are the last 2·hs columns.
        let qpg = d.heads / d.groups;
        let (group_rows, group_w, kv_at) = (rows * d.groups, (qpg + 2) * hs, qpg * hs);
        if cross {
            // dK/dV to the exporter's fp32 sum; the backward's first cross layer (the last
            // one) starts it
            self.mark("yoco kv grad")?;
            let first = (l + 1..d.layers).all(|k| d.info[k].kv_from.is_none());
            self.hops()?.kv_grad_add(
                self.dqkv.ptr,
                self.cross.kv_acc,
                group_w,
                kv_at,
                2 * hs,
                group_rows,
                if first {
                    KvGradMode::Overwrite
                } else {
                    KvGradMode::Add
                },
            )?;
        } else if info.exports_kv && d.any_cross() {
            // the cross-attention layers' dK/dV join this layer's own
            self.mark("yoco kv grad")?;
            self.hops()?.kv_grad_add(
                self.dqkv.ptr,
                self.cross.kv_acc,
                group_w,
                kv_at,
                2 * hs,
                group_rows,
                KvGradMode::Export,
            )?;
        }
        if !fuse_rope {
            self.mark("rope")?;
        }
        if d.rope[l] && !fuse_rope {
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
        if let Some(b) = lp.qkv_b {
            self.hops()?
                .bias_grad(Rows::new(dsrc, qw), self.g32(b), 1.0, rows, qw)?;
        }
        self.input_projection_backward(
            lp,
            sv,
            x_in,
            dsrc,
            lp.qkv,
            qw,
            rows,
            ["gemm qkv dW", "gemm qkv dx"],
        )
    }
}
