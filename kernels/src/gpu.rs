//! One GPU: context, one stream, device memory, compiled modules and kernel launches.
//!
//! Memory is handled as raw device pointers (`u64`) into buffers allocated once; kernels
//! are launched on the single stream, so ordering is the stream's order.

use crate::error::{driver, KernelError, Result};
use cudarc::driver::{result as cu, sys, CudaContext, CudaStream};
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::Arc;

/// Checks that the driver library loads and a device exists, without panicking.
pub fn ensure_driver() -> Result<()> {
    if !unsafe { sys::is_culib_present() } {
        return Err(KernelError::LibraryMissing {
            library: "libcuda.so (NVIDIA driver)",
            hint: "no NVIDIA driver on the library path; is this a GPU machine?".into(),
        });
    }
    driver("cuInit", cu::init())?;
    let n = driver("cuDeviceGetCount", cu::device::get_count())?;
    if n == 0 {
        return Err(KernelError::NoDevice("cuDeviceGetCount returned 0".into()));
    }
    Ok(())
}

/// Number of CUDA devices this process sees (after `CUDA_VISIBLE_DEVICES`).
pub fn device_count() -> Result<usize> {
    ensure_driver()?;
    Ok(driver("cuDeviceGetCount", cu::device::get_count())? as usize)
}

/// The device a local rank trains on: device `local_rank`, or the only device when the
/// launcher gave each process one GPU (Slurm's per-task `CUDA_VISIBLE_DEVICES`).
pub fn device_for_local_rank(local_rank: usize, visible: usize) -> Result<usize> {
    match visible {
        0 => Err(KernelError::NoDevice("no CUDA device is visible".into())),
        1 => Ok(0),
        n if local_rank < n => Ok(local_rank),
        n => Err(KernelError::NoDevice(format!(
            "local rank {local_rank} needs device {local_rank}, but only {n} are visible \
             (CUDA_VISIBLE_DEVICES); give each local rank its own GPU or one visible GPU per process"
        ))),
    }
}

/// A device allocation, freed on drop.
pub struct DeviceBuffer {
    pub ptr: u64,
    pub bytes: usize,
}

impl DeviceBuffer {
    /// Pointer to element `index` of element size `elem` bytes.
    pub fn at(&self, index: usize, elem: usize) -> u64 {
        debug_assert!(index * elem <= self.bytes);
        self.ptr + (index * elem) as u64
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if self.ptr != 0 {
            let _ = unsafe { cu::free_sync(self.ptr) };
        }
    }
}

/// A loaded module and its functions.
struct Module {
    _module: sys::CUmodule,
    functions: HashMap<String, sys::CUfunction>,
}

/// A kernel handle: a function of a loaded module.
#[derive(Clone, Copy, Debug)]
pub struct Kernel {
    pub func: sys::CUfunction,
    pub name: &'static str,
}

pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub ordinal: usize,
    pub name: String,
    pub cc: (i32, i32),
    pub sm_count: i32,
    pub total_mem: usize,
    modules: std::sync::Mutex<HashMap<String, Module>>,
    /// Bytes currently allocated through `alloc`, and the high-water mark.
    allocated: std::sync::atomic::AtomicUsize,
    peak: std::sync::atomic::AtomicUsize,
}

impl Gpu {
    /// Opens device `ordinal` after checking that the driver is present.
    pub fn new(ordinal: usize) -> Result<Arc<Gpu>> {
        ensure_driver()?;
        let n = driver("cuDeviceGetCount", cu::device::get_count())? as usize;
        if ordinal >= n {
            return Err(KernelError::NoDevice(format!(
                "device {ordinal} requested, {n} present"
            )));
        }
        let ctx = driver("cuCtxCreate", CudaContext::new(ordinal))?;
        driver("cuCtxSetCurrent", ctx.bind_to_thread())?;
        let stream = driver("cuStreamCreate", ctx.new_stream())?;
        let name = driver("cuDeviceGetName", ctx.name())?;
        let cc = driver("cuDeviceGetAttribute", ctx.compute_capability())?;
        let sm_count = driver(
            "cuDeviceGetAttribute",
            ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT),
        )?;
        let total_mem = driver("cuDeviceTotalMem", ctx.total_mem())?;
        // One thread drives a Gpu (its modules hold raw CUDA handles); Arc is for the
        // backend's parts sharing it, not for sending it across threads.
        #[allow(clippy::arc_with_non_send_sync)]
        Ok(Arc::new(Gpu {
            ctx,
            stream,
            ordinal,
            name,
            cc,
            sm_count,
            total_mem,
            modules: std::sync::Mutex::new(HashMap::new()),
            allocated: 0.into(),
            peak: 0.into(),
        }))
    }

    /// NVRTC target for this device: `sm_90a` on Hopper (wgmma-capable), else `sm_XY`.
    pub fn arch(&self) -> String {
        arch_for(self.cc)
    }

    pub fn bind(&self) -> Result<()> {
        driver("cuCtxSetCurrent", self.ctx.bind_to_thread())
    }

    pub fn raw_stream(&self) -> sys::CUstream {
        self.stream.cu_stream()
    }

    /// Allocates `bytes` (rounded up to 256) of device memory.
    pub fn alloc(&self, bytes: usize) -> Result<DeviceBuffer> {
        use std::sync::atomic::Ordering;
        let bytes = bytes.max(1).div_ceil(256) * 256;
        let ptr = unsafe { cu::malloc_sync(bytes) }.map_err(|e| KernelError::Driver {
            call: format!("cuMemAlloc({bytes} bytes)"),
            message: format!("{e:?} (GPU memory exhausted?)"),
        })?;
        let now = self.allocated.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(now, Ordering::Relaxed);
        Ok(DeviceBuffer { ptr, bytes })
    }

    /// Releases `buf` and updates the allocation count.
    pub fn free(&self, buf: DeviceBuffer) {
        self.allocated
            .fetch_sub(buf.bytes, std::sync::atomic::Ordering::Relaxed);
        drop(buf);
    }

    /// Peak of bytes allocated through `alloc` since the start.
    pub fn peak_allocated(&self) -> usize {
        self.peak.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn allocated(&self) -> usize {
        self.allocated.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// (free, total) device memory as the driver sees it.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        driver("cuMemGetInfo", cu::mem_get_info())
    }

    pub fn upload<T: Copy>(&self, dst: u64, src: &[T]) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        unsafe {
            driver(
                "cuMemcpyHtoDAsync",
                cu::memcpy_htod_async(dst, src, self.raw_stream()),
            )
        }?;
        // The host slice may be dropped by the caller right after: wait for the copy.
        self.sync()
    }

    pub fn download<T: Copy>(&self, src: u64, dst: &mut [T]) -> Result<()> {
        if dst.is_empty() {
            return Ok(());
        }
        unsafe {
            driver(
                "cuMemcpyDtoHAsync",
                cu::memcpy_dtoh_async(dst, src, self.raw_stream()),
            )
        }?;
        self.sync()
    }

    pub fn download_vec<T: Copy + Default>(&self, src: u64, n: usize) -> Result<Vec<T>> {
        let mut v = vec![T::default(); n];
        self.download(src, &mut v)?;
        Ok(v)
    }

    pub fn memset_zero(&self, dst: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        unsafe {
            driver(
                "cuMemsetD8Async",
                cu::memset_d8_async(dst, 0, bytes, self.raw_stream()),
            )
        }
    }

    /// Fills `bytes` at `dst` with the byte `value` (0xFF poisons floats with NaN).
    pub fn memset_byte(&self, dst: u64, value: u8, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        unsafe {
            driver(
                "cuMemsetD8Async",
                cu::memset_d8_async(dst, value, bytes, self.raw_stream()),
            )
        }
    }

    pub fn copy_d2d(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        unsafe {
            driver(
                "cuMemcpyDtoDAsync",
                cu::memcpy_dtod_async(dst, src, bytes, self.raw_stream()),
            )
        }
    }

    pub fn sync(&self) -> Result<()> {
        unsafe {
            driver(
                "cuStreamSynchronize",
                cu::stream::synchronize(self.raw_stream()),
            )
        }
    }

    /// Kernel `name` of the built-in module `module` (kernels/cuda/<module>.cu), compiled or
    /// loaded from the cache on first use.
    pub fn module_kernel(&self, module: &str, name: &'static str) -> Result<Kernel> {
        let src = crate::module_source(module)
            .ok_or_else(|| KernelError::Unsupported(format!("unknown module {module}")))?;
        self.kernel(module, &src, name)
    }

    /// Loads (compiling if needed) module `module` from `source` and returns its kernel `name`.
    pub fn kernel(&self, module: &str, source: &str, name: &'static str) -> Result<Kernel> {
        let mut modules = self
            .modules
            .lock()
            .map_err(|_| KernelError::Unsupported("module table poisoned".into()))?;
        if !modules.contains_key(module) {
            let cubin = crate::nvrtc::compile_cubin(module, source, &self.arch(), &[])?;
            let m =
                unsafe { cu::module::load_data(cubin.as_ptr() as *const c_void) }.map_err(|e| {
                    KernelError::Driver {
                        call: format!("cuModuleLoadData({module})"),
                        message: format!("{e:?}"),
                    }
                })?;
            modules.insert(
                module.to_string(),
                Module {
                    _module: m,
                    functions: HashMap::new(),
                },
            );
        }
        let entry = modules
            .get_mut(module)
            .ok_or_else(|| KernelError::Unsupported(format!("module {module} missing")))?;
        if let Some(f) = entry.functions.get(name) {
            return Ok(Kernel { func: *f, name });
        }
        let cname = CString::new(name)
            .map_err(|_| KernelError::Unsupported(format!("bad kernel name {name}")))?;
        let f = unsafe { cu::module::get_function(entry._module, cname) }.map_err(|e| {
            KernelError::Driver {
                call: format!("cuModuleGetFunction({module}::{name})"),
                message: format!("{e:?}"),
            }
        })?;
        entry.functions.insert(name.to_string(), f);
        Ok(Kernel { func: f, name })
    }

    /// How many blocks of `threads` threads (with `smem` bytes of dynamic shared memory) of
    /// `k` are resident on one SM at once (at least 1).
    pub fn resident_blocks(&self, k: Kernel, threads: u32, smem: usize) -> Result<usize> {
        let n = unsafe {
            cu::occupancy::max_active_block_per_multiprocessor(k.func, threads as i32, smem)
        }
        .map_err(|e| KernelError::Driver {
            call: format!("cuOccupancyMaxActiveBlocksPerMultiprocessor({})", k.name),
            message: format!("{e:?}"),
        })?;
        Ok(n.max(1) as usize)
    }

    /// Raises a kernel's dynamic shared memory limit.
    pub fn set_max_dynamic_smem(&self, k: Kernel, bytes: usize) -> Result<()> {
        unsafe {
            cu::function::set_function_attribute(
                k.func,
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
        }
        .map_err(|e| KernelError::Driver {
            call: format!("cuFuncSetAttribute({}, smem {bytes})", k.name),
            message: format!("{e:?}"),
        })
    }

    /// Launches `k` with `args` (which must match the kernel's parameter list).
    pub fn launch(
        &self,
        k: Kernel,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
        args: &Args,
    ) -> Result<()> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        let mut params: Vec<*mut c_void> = args
            .slots
            .iter()
            .map(|s| match s {
                Slot::Word(w) => w as *const u64 as *mut c_void,
                Slot::TensorMap(m) => &**m as *const sys::CUtensorMap as *mut c_void,
            })
            .collect();
        unsafe { cu::launch_kernel(k.func, grid, block, smem, self.raw_stream(), &mut params) }
            .map_err(|e| KernelError::Driver {
                call: format!(
                    "cuLaunchKernel({}, grid {grid:?}, block {block:?}, smem {smem})",
                    k.name
                ),
                message: format!("{e:?}"),
            })
    }

    /// Device-side timer: records an event now.
    pub fn event(&self) -> Result<Event> {
        let e = driver(
            "cuEventCreate",
            cu::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT),
        )?;
        unsafe { driver("cuEventRecord", cu::event::record(e, self.raw_stream())) }?;
        Ok(Event(e))
    }
}

/// A recorded CUDA event.
pub struct Event(sys::CUevent);

impl Event {
    /// Milliseconds from `self` to `later` (waits for `later`).
    pub fn elapsed_ms(&self, later: &Event) -> Result<f32> {
        unsafe {
            driver("cuEventSynchronize", cu::event::synchronize(later.0))?;
            driver("cuEventElapsedTime", cu::event::elapsed(self.0, later.0))
        }
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        let _ = unsafe { cu::event::destroy(self.0) };
    }
}

/// NVRTC target for compute capability `cc`.
pub fn arch_for(cc: (i32, i32)) -> String {
    if cc == (9, 0) {
        "sm_90a".to_string()
    } else {
        format!("sm_{}{}", cc.0, cc.1)
    }
}

/// One kernel argument: an 8-byte word (pointer, `int`, `float`) or a tensor map.
enum Slot {
    Word(u64),
    /// A `CUtensorMap` (128 bytes; the kernel takes it as a `const __grid_constant__`
    /// 64-byte-aligned struct). Boxed so its address stays put until the launch.
    TensorMap(Box<sys::CUtensorMap>),
}

/// Kernel arguments in parameter order: 8-byte slots (pointers, `int`, `float`) and tensor
/// maps passed by value.
#[derive(Default)]
pub struct Args {
    slots: Vec<Slot>,
}

impl Args {
    pub fn new() -> Args {
        Args {
            slots: Vec::with_capacity(24),
        }
    }
    fn word(mut self, w: u64) -> Args {
        self.slots.push(Slot::Word(w));
        self
    }
    /// A device pointer (`T*` in the kernel).
    pub fn ptr(self, p: u64) -> Args {
        self.word(p)
    }
    pub fn i32(self, v: i32) -> Args {
        self.word(v as u32 as u64)
    }
    pub fn usize_as_i32(self, v: usize) -> Args {
        self.i32(v as i32)
    }
    pub fn i64(self, v: i64) -> Args {
        self.word(v as u64)
    }
    pub fn f32(self, v: f32) -> Args {
        self.word(v.to_bits() as u64)
    }
    /// A tensor map by value (`const __grid_constant__ CUtensorMap` or a 128-byte struct
    /// aligned to 64 in the kernel).
    pub fn tensor_map(mut self, m: crate::tensor_map::TensorMap) -> Args {
        self.slots.push(Slot::TensorMap(m.into_raw()));
        self
    }
}

#[cfg(test)]
mod tests {
    use super::device_for_local_rank;

    #[test]
    fn local_ranks_map_to_their_device_or_to_the_only_visible_one() {
        assert_eq!(device_for_local_rank(3, 8).unwrap(), 3);
        assert_eq!(device_for_local_rank(5, 1).unwrap(), 0);
        let e = device_for_local_rank(4, 2).unwrap_err().to_string();
        assert!(
            e.contains("local rank 4") && e.contains("2 are visible"),
            "{e}"
        );
        assert!(device_for_local_rank(0, 0).is_err());
    }
}
