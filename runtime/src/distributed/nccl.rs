//! NCCL communicator for one process per GPU: bootstrap (rank 0 creates the unique id and
//! serves it over TCP on `MASTER_ADDR:MASTER_PORT`; the other ranks fetch it), fp32 sum
//! all-reduce of device buffers on a given stream, and a small host-value all-reduce.

use super::RankEnv;
use crate::{Result, RuntimeError};
use archscale_kernels::Gpu;
use cudarc::nccl::{result as nc, sys as ns};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long rank 0 waits for every peer to fetch the id, and a peer waits for rank 0.
pub const BOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(120);

const ID_BYTES: usize = 128;

fn msg(s: impl Into<String>) -> RuntimeError {
    RuntimeError::Message(s.into())
}

fn nccl(what: &str, e: nc::NcclError) -> RuntimeError {
    msg(format!("NCCL {what} failed: {e:?}"))
}

/// Errors unless the NCCL library can be loaded (it is loaded dynamically).
pub fn ensure_nccl() -> Result<()> {
    // SAFETY: only tries to open the shared library.
    if unsafe { ns::is_culib_present() } {
        Ok(())
    } else {
        Err(msg(
            "multi-GPU training needs the NCCL library (libnccl.so.2), which could not be loaded; install NCCL or add its directory to LD_LIBRARY_PATH",
        ))
    }
}

/// Serves `id` to `world - 1` peers on `addr:port`.
fn serve_id(env: &RankEnv, id: &[u8; ID_BYTES], timeout: Duration) -> Result<()> {
    let bind = format!("0.0.0.0:{}", env.master_port);
    let listener = TcpListener::bind(&bind).map_err(|e| {
        msg(format!(
            "rank 0 cannot listen on {bind} for the NCCL bootstrap: {e} (set MASTER_PORT to a free port)"
        ))
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|e| msg(format!("bootstrap socket: {e}")))?;
    let deadline = Instant::now() + timeout;
    let mut served = 0;
    while served < env.world - 1 {
        match listener.accept() {
            Ok((mut s, _)) => {
                let _ = s.set_nonblocking(false);
                let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
                s.write_all(id)
                    .map_err(|e| msg(format!("sending the NCCL id to a peer: {e}")))?;
                served += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err(msg(format!(
                        "rank 0 waited {}s on {bind}, but only {served} of {} peers arrived; check that every rank was launched with MASTER_ADDR={} MASTER_PORT={}",
                        timeout.as_secs(),
                        env.world - 1,
                        env.master_addr,
                        env.master_port
                    )));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(msg(format!("bootstrap accept on {bind}: {e}"))),
        }
    }
    Ok(())
}

/// Fetches the id from rank 0, retrying until `timeout`.
fn fetch_id(env: &RankEnv, timeout: Duration) -> Result<[u8; ID_BYTES]> {
    let target = format!("{}:{}", env.master_addr, env.master_port);
    let deadline = Instant::now() + timeout;
    loop {
        let attempt = (|| -> std::io::Result<[u8; ID_BYTES]> {
            let addr = target.to_socket_addrs()?.next().ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::NotFound, "address resolves to nothing")
            })?;
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            let mut id = [0u8; ID_BYTES];
            s.read_exact(&mut id)?;
            Ok(id)
        })();
        let last = match attempt {
            Ok(id) => return Ok(id),
            Err(e) => e.to_string(),
        };
        if Instant::now() > deadline {
            return Err(msg(format!(
                "rank {} could not get the NCCL id from rank 0 at {target} within {}s (last error: {last}); is rank 0 running, and MASTER_ADDR/MASTER_PORT the same on every rank?",
                env.rank,
                timeout.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One NCCL communicator over all ranks of the job; its device is `gpu`'s.
pub struct NcclComm {
    comm: ns::ncclComm_t,
    gpu: Arc<Gpu>,
    pub rank: usize,
    pub world: usize,
    scratch: archscale_kernels::DeviceBuffer,
}

impl NcclComm {
    /// Bootstraps the communicator for `env` on `gpu` (blocks until every rank joined).
    pub fn bootstrap(env: &RankEnv, gpu: Arc<Gpu>) -> Result<NcclComm> {
        ensure_nccl()?;
        let id_bytes = if env.rank == 0 {
            let id = nc::get_uniqueid().map_err(|e| nccl("ncclGetUniqueId", e))?;
            let bytes: [u8; ID_BYTES] = id.internal.map(|c| c as u8);
            serve_id(env, &bytes, BOOTSTRAP_TIMEOUT)?;
            bytes
        } else {
            fetch_id(env, BOOTSTRAP_TIMEOUT)?
        };
        let id = ns::ncclUniqueId {
            internal: id_bytes.map(|b| b as ::core::ffi::c_char),
        };
        gpu.bind().map_err(|e| msg(format!("{e}")))?;
        let mut comm = std::mem::MaybeUninit::uninit();
        // SAFETY: `comm` is written by ncclCommInitRank on success, read only then.
        let comm = unsafe {
            nc::comm_init_rank(comm.as_mut_ptr(), env.world as i32, id, env.rank as i32)
                .map_err(|e| nccl("ncclCommInitRank", e))?;
            comm.assume_init()
        };
        let scratch = gpu.alloc(64 * 8).map_err(|e| msg(format!("{e}")))?;
        Ok(NcclComm {
            comm,
            gpu,
            rank: env.rank,
            world: env.world,
            scratch,
        })
    }

    /// The communicator of the ranks that pass the same `color` (every rank must call it,
    /// collectively), ordered by `key`; `group_size` is how many share this rank's color.
    pub fn split(&self, color: usize, key: usize, group_size: usize) -> Result<NcclComm> {
        let mut comm = std::mem::MaybeUninit::uninit();
        // SAFETY: `self.comm` is valid; `comm` is written by ncclCommSplit on success, read
        // only then; a null config asks for the parent's configuration.
        let comm = unsafe {
            ns::ncclCommSplit(
                self.comm,
                color as i32,
                key as i32,
                comm.as_mut_ptr(),
                std::ptr::null_mut(),
            )
            .result()
            .map_err(|e| nccl("ncclCommSplit", e))?;
            comm.assume_init()
        };
        let scratch = self.gpu.alloc(64 * 8).map_err(|e| msg(format!("{e}")))?;
        Ok(NcclComm {
            comm,
            gpu: self.gpu.clone(),
            rank: key,
            world: group_size,
            scratch,
        })
    }

    /// In-place fp32 sum over ranks of `count` floats at `ptr`, on `gpu`'s stream.
    pub fn all_reduce_sum_f32(&self, gpu: &Gpu, ptr: u64, count: usize) -> Result<()> {
        self.all_reduce_sum_f32_on(ptr, count, gpu.raw_stream() as u64)
    }

    /// In-place fp32 sum over ranks of `count` floats at `ptr`, on `stream`.
    pub fn all_reduce_sum_f32_on(&self, ptr: u64, count: usize, stream: u64) -> Result<()> {
        // SAFETY: `ptr` is a device allocation of at least `count` f32 on this communicator's
        // device; the caller orders `stream` after the kernels that wrote it.
        unsafe {
            nc::all_reduce(
                ptr as *const _,
                ptr as *mut _,
                count,
                ns::ncclDataType_t::ncclFloat32,
                ns::ncclRedOp_t::ncclSum,
                self.comm,
                stream as _,
            )
        }
        .map(|_| ())
        .map_err(|e| nccl("ncclAllReduce", e))
    }

    /// In-place reduce-scatter (sum) of `world · chunk` fp32 at `base`: afterwards this
    /// rank's chunk `base + rank · chunk` holds the sum over ranks of that chunk.
    pub fn reduce_scatter_sum_f32(&self, base: u64, chunk: usize, stream: u64) -> Result<()> {
        let recv = base + (self.rank * chunk * 4) as u64;
        // SAFETY: `base` holds world·chunk f32 on this device; recvbuff = sendbuff +
        // rank·recvcount is NCCL's in-place form.
        unsafe {
            nc::reduce_scatter(
                base as *const _,
                recv as *mut _,
                chunk,
                ns::ncclDataType_t::ncclFloat32,
                ns::ncclRedOp_t::ncclSum,
                self.comm,
                stream as _,
            )
        }
        .map(|_| ())
        .map_err(|e| nccl("ncclReduceScatter", e))
    }

    /// In-place all-gather of `world · chunk` fp32 at `base`: every rank contributes its
    /// chunk `base + rank · chunk` and receives everyone's.
    pub fn all_gather_f32(&self, base: u64, chunk: usize, stream: u64) -> Result<()> {
        let send = base + (self.rank * chunk * 4) as u64;
        // SAFETY: `base` holds world·chunk f32; sendbuff = recvbuff + rank·sendcount is
        // NCCL's in-place form.
        unsafe {
            nc::all_gather(
                send as *const _,
                base as *mut _,
                chunk,
                ns::ncclDataType_t::ncclFloat32,
                self.comm,
                stream as _,
            )
        }
        .map(|_| ())
        .map_err(|e| nccl("ncclAllGather", e))
    }

    /// Sums `values` (at most 64) over ranks, in place; blocks until done.
    pub fn all_reduce_host_f64(&self, values: &mut [f64]) -> Result<()> {
        if values.len() > 64 {
            return Err(msg("all_reduce_host_f64: at most 64 values"));
        }
        let g = &self.gpu;
        let k = |e: archscale_kernels::KernelError| msg(format!("{e}"));
        g.upload(self.scratch.ptr, values).map_err(k)?;
        // SAFETY: scratch holds 64 f64 on this device.
        unsafe {
            nc::all_reduce(
                self.scratch.ptr as *const _,
                self.scratch.ptr as *mut _,
                values.len(),
                ns::ncclDataType_t::ncclFloat64,
                ns::ncclRedOp_t::ncclSum,
                self.comm,
                g.raw_stream() as _,
            )
        }
        .map_err(|e| nccl("ncclAllReduce", e))?;
        g.download(self.scratch.ptr, values).map_err(k)?;
        Ok(())
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // SAFETY: the communicator is valid and not used after this.
        unsafe {
            let _ = nc::comm_destroy(self.comm);
        }
    }
}

impl crate::train::Collective for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn sum(&self, values: &mut [f64]) -> Result<()> {
        self.all_reduce_host_f64(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(rank: usize, world: usize, port: u16) -> RankEnv {
        RankEnv {
            rank,
            world,
            local_rank: rank,
            local_world: world,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            source: super::super::EnvSource::Torchrun,
        }
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap()
    }

    #[test]
    fn peers_receive_the_id_rank_0_serves() {
        let port = free_port();
        let mut id = [0u8; ID_BYTES];
        for (i, b) in id.iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        let server =
            std::thread::spawn(move || serve_id(&env(0, 3, port), &id, Duration::from_secs(20)));
        let peers: Vec<_> = (1..3)
            .map(|r| {
                std::thread::spawn(move || fetch_id(&env(r, 3, port), Duration::from_secs(20)))
            })
            .collect();
        for p in peers {
            assert_eq!(p.join().unwrap().unwrap(), id);
        }
        server.join().unwrap().unwrap();
    }

    #[test]
    fn a_missing_rank_0_is_an_error_naming_the_address() {
        let port = free_port();
        let err = fetch_id(&env(1, 2, port), Duration::from_millis(300)).unwrap_err();
        assert!(
            err.to_string().contains(&format!("127.0.0.1:{port}")),
            "{err}"
        );
    }

    #[test]
    fn a_missing_peer_is_an_error_naming_the_address() {
        let port = free_port();
        let err =
            serve_id(&env(0, 2, port), &[0; ID_BYTES], Duration::from_millis(300)).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("only 0 of 1 peers"), "{text}");
        assert!(text.contains(&format!("MASTER_PORT={port}")), "{text}");
    }
}
