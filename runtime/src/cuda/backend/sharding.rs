//! How the CUDA backend spreads parameters, gradients and optimizer state over ranks
//! (data parallel, ZeRO-1, ZeRO-3, hybrid shard): per-unit gradient reduction overlapped
//! with the backward pass, and ZeRO-3's gather slots.

use super::*;

/// ZeRO-3 working buffers: a tied embedding's unit stays gathered for a whole micro-step (the
/// head reads it at the end of the forward and the start of the backward); every other unit
/// takes its turn in one shared slot.
pub(super) struct Zero3Slots {
    pub(super) embed_unit: Option<usize>,
    pub(super) e_f32: DeviceBuffer,
    pub(super) e_bf: DeviceBuffer,
    pub(super) e_grad: DeviceBuffer,
    pub(super) l_f32: DeviceBuffer,
    pub(super) l_bf: DeviceBuffer,
    pub(super) l_grad: DeviceBuffer,
    /// Unit whose parameters each slot holds now.
    pub(super) loaded_e: Cell<Option<usize>>,
    pub(super) loaded_l: Cell<Option<usize>>,
}

impl CudaBackend {
    /// Sums the accumulated gradients over ranks if the backward pass did not already
    /// (ZeRO-1: each rank ends with the sum of its own chunks).
    pub(super) fn reduce_grads(&mut self) -> Result<()> {
        let Some(comm) = &self.shard_comm else {
            return Ok(());
        };
        if self.grads_reduced.get() || self.mode == ShardMode::Zero3 {
            return Ok(());
        }
        let stream = self.gpu.raw_stream() as u64;
        match self.mode {
            ShardMode::Replicated => {
                comm.all_reduce_sum_f32_on(self.grads.ptr, self.numel, stream)?
            }
            ShardMode::Zero1 => {
                for (u, unit) in self.layout.units.iter().enumerate() {
                    let base = self.grads.ptr + (unit.start * F32) as u64;
                    comm.reduce_scatter_sum_f32(base, self.layout.chunk_len(u), stream)?;
                }
            }
            ShardMode::Zero3 => {}
        }
        self.grads_reduced.set(true);
        Ok(())
    }

    /// ZeRO-3: the slot holding unit `u` (fp32, bf16 and gradient bases, minus the unit's
    /// flat start so a flat offset indexes it directly).
    pub(super) fn slot(&self, u: usize) -> (u64, u64, u64, &Cell<Option<usize>>) {
        let z = self
            .zero3
            .as_ref()
            .expect("slot() is called in ZeRO-3 mode only");
        let start = self.layout.units[u].start as u64;
        let (f, b, g, cell) = if Some(u) == z.embed_unit {
            (&z.e_f32, &z.e_bf, &z.e_grad, &z.loaded_e)
        } else {
            (&z.l_f32, &z.l_bf, &z.l_grad, &z.loaded_l)
        };
        (
            f.ptr.wrapping_sub(start * F32 as u64),
            b.ptr.wrapping_sub(start * BF as u64),
            g.ptr.wrapping_sub(start * F32 as u64),
            cell,
        )
    }

    /// ZeRO-3: gathers unit `u`'s parameters into its slot (fp32, then a bf16 copy) unless
    /// they are there already. Other modes hold every parameter.
    pub(super) fn gather_unit(&self, u: usize) -> Result<()> {
        let (Some(_), Some(comm)) = (&self.zero3, &self.shard_comm) else {
            return Ok(());
        };
        let (f, b, _, cell) = self.slot(u);
        if cell.get() == Some(u) {
            return Ok(());
        }
        self.mark("zero3 gather")?;
        let unit = &self.layout.units[u];
        let chunk = self.layout.chunk_len(u);
        let base = f + (unit.start * F32) as u64;
        let own = base + (self.layout.rank * chunk * F32) as u64;
        self.gpu.copy_d2d(
            own,
            self.params.ptr + (unit.local_start * F32) as u64,
            chunk * F32,
        )?;
        comm.all_gather_f32(base, chunk, self.gpu.raw_stream() as u64)?;
        self.ops
            .cast_f32_bf16(base, b + (unit.start * BF) as u64, unit.len)?;
        cell.set(Some(u));
        Ok(())
    }

    /// ZeRO-3: forget what the slots hold (parameters changed).
    pub(super) fn invalidate_slots(&self) {
        if let Some(z) = &self.zero3 {
            z.loaded_e.set(None);
            z.loaded_l.set(None);
        }
    }

    /// Before unit `u`'s gradients are written. ZeRO-3: its slot gets zeros, except this
    /// rank's chunk, which gets the gradient accumulated so far; the reduce-scatter in
    /// [`Self::grads_done`] then sums new contributions onto it.
    pub(super) fn grads_begin(&self, u: usize) -> Result<()> {
        if self.zero3.is_none() {
            return Ok(());
        }
        let (_, _, g, _) = self.slot(u);
        let unit = &self.layout.units[u];
        let chunk = self.layout.chunk_len(u);
        let base = g + (unit.start * F32) as u64;
        self.gpu.memset_zero(base, unit.len * F32)?;
        // hybrid shard: every node holds the same sum so far; only node 0 contributes it
        // to the cross-node all-reduce
        if self.replica_comm.as_ref().is_some_and(|r| r.rank != 0) {
            return Ok(());
        }
        self.gpu.copy_d2d(
            base + (self.layout.rank * chunk * F32) as u64,
            self.grads.ptr + (unit.local_start * F32) as u64,
            chunk * F32,
        )?;
        Ok(())
    }

    /// Unit `u`'s gradients of this micro-step are complete. ZeRO-3: reduce-scatter them
    /// into this rank's chunk. Data parallel / ZeRO-1 on the step's last micro-step: start
    /// the all-reduce / reduce-scatter of the unit on the communication stream, overlapped
    /// with the backward pass of the units before it.
    pub(super) fn grads_done(&self, u: usize) -> Result<()> {
        let Some(comm) = &self.shard_comm else {
            return Ok(());
        };
        let unit = &self.layout.units[u];
        let chunk = self.layout.chunk_len(u);
        if self.zero3.is_some() {
            self.mark("zero3 reduce-scatter")?;
            let (_, _, g, _) = self.slot(u);
            let base = g + (unit.start * F32) as u64;
            comm.reduce_scatter_sum_f32(base, chunk, self.gpu.raw_stream() as u64)?;
            let own = base + (self.layout.rank * chunk * F32) as u64;
            if let Some(replicas) = &self.replica_comm {
                replicas.all_reduce_sum_f32_on(own, chunk, self.gpu.raw_stream() as u64)?;
            }
            self.gpu.copy_d2d(
                self.grads.ptr + (unit.local_start * F32) as u64,
                own,
                chunk * F32,
            )?;
            return Ok(());
        }
        if !self.sync_grads {
            return Ok(());
        }
        let cs = self
            .comm_stream
            .as_ref()
            .ok_or_else(|| err("CUDA backend: no communication stream"))?;
        cs.join(&self.gpu.stream)
            .map_err(|e| err(format!("CUDA: stream wait: {e:?}")))?;
        let base = self.grads.ptr + (unit.start * F32) as u64;
        let stream = cs.cu_stream() as u64;
        match self.mode {
            ShardMode::Zero1 => comm.reduce_scatter_sum_f32(base, chunk, stream)?,
            _ => comm.all_reduce_sum_f32_on(base, unit.len, stream)?,
        }
        Ok(())
    }

    /// End of the backward pass: the compute stream waits for the reductions in flight.
    pub(super) fn grads_all_done(&self) -> Result<()> {
        if self.comm.is_none() || self.zero3.is_some() || !self.sync_grads {
            return Ok(());
        }
        if let Some(cs) = &self.comm_stream {
            self.gpu
                .stream
                .join(cs)
                .map_err(|e| err(format!("CUDA: stream wait: {e:?}")))?;
            self.grads_reduced.set(true);
        }
        Ok(())
    }
}
