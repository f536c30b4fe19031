//! TMA tensor maps (`CUtensorMap`, encoded by the driver's `cuTensorMapEncodeTiled`) for
//! kernels that load tiles with `cp.async.bulk.tensor`. A map is passed to the kernel by
//! value through [`crate::Args::tensor_map`].

use crate::error::{KernelError, Result};
use cudarc::driver::sys;

/// An encoded tensor map (128 bytes, aligned as the driver requires).
pub struct TensorMap(Box<sys::CUtensorMap>);

impl TensorMap {
    /// A bf16 tensor of `dims.len()` (1..=5) dimensions, dimension 0 contiguous, with byte
    /// strides `strides` for dimensions 1.. (any order: dimensions may overlap, as the heads of
    /// a fused QKV buffer do), read in boxes of `box_dims` elements into shared memory with the
    /// 128-byte swizzle. Elements outside `dims` load as zeros.
    ///
    /// The hardware's rules are checked first, so a layout it cannot express is an error
    /// naming the rule (global address and strides multiples of 16 bytes, strides < 2^40,
    /// dimensions 1..=2^32, boxes 1..=256 with at most 128 bytes in dimension 0).
    pub fn bf16_swizzle128(
        ptr: u64,
        dims: &[u64],
        strides: &[u64],
        box_dims: &[u32],
    ) -> Result<TensorMap> {
        check_bf16_swizzle128(ptr, dims, strides, box_dims)?;
        let rank = dims.len();
        let element_strides = [1u32; 5];
        // SAFETY: CUtensorMap is plain data (16 u64); the driver fills it.
        let mut map: Box<sys::CUtensorMap> = Box::new(unsafe { std::mem::zeroed() });
        let r = unsafe {
            sys::cuTensorMapEncodeTiled(
                &mut *map,
                sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
                rank as u32,
                ptr as *mut std::ffi::c_void,
                dims.as_ptr(),
                strides.as_ptr(),
                box_dims.as_ptr(),
                element_strides.as_ptr(),
                sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
                sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
        };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(KernelError::Driver {
                call: format!(
                    "cuTensorMapEncodeTiled(bf16, dims {dims:?}, byte strides {strides:?}, box {box_dims:?})"
                ),
                message: format!("{r:?}"),
            });
        }
        Ok(TensorMap(map))
    }

    pub(crate) fn into_raw(self) -> Box<sys::CUtensorMap> {
        self.0
    }
}

/// The rules of `cuTensorMapEncodeTiled` for a bf16 map with the 128-byte swizzle.
fn check_bf16_swizzle128(ptr: u64, dims: &[u64], strides: &[u64], box_dims: &[u32]) -> Result<()> {
    let rank = dims.len();
    let bad = |why: String| Err(KernelError::Unsupported(format!("TMA tensor map: {why}")));
    if !(1..=5).contains(&rank) || strides.len() + 1 != rank || box_dims.len() != rank {
        return bad(format!(
            "rank {rank} with {} strides and {} box dimensions (rank 1..=5, rank-1 strides)",
            strides.len(),
            box_dims.len()
        ));
    }
    if !ptr.is_multiple_of(16) {
        return bad(format!(
            "global address {ptr:#x} is not a multiple of 16 bytes"
        ));
    }
    if let Some(d) = dims.iter().find(|&&d| d == 0 || d > 1 << 32) {
        return bad(format!("dimension {d} outside 1..=2^32"));
    }
    if let Some(s) = strides.iter().find(|&&s| s % 16 != 0 || s >= 1 << 40) {
        return bad(format!(
            "stride {s} bytes is not a multiple of 16 below 2^40 (row and head strides must be multiples of 8 bf16 elements)"
        ));
    }
    if let Some(b) = box_dims.iter().find(|&&b| b == 0 || b > 256) {
        return bad(format!("box dimension {b} outside 1..=256"));
    }
    if box_dims[0] * 2 > 128 {
        return bad(format!(
            "box dimension 0 of {} bf16 is over the 128 bytes of the swizzle",
            box_dims[0]
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check_bf16_swizzle128;

    #[test]
    fn layouts_tma_cannot_express_are_errors_that_say_why() {
        let ok = check_bf16_swizzle128(
            0x1000,
            &[128, 4096, 8, 4],
            &[3072, 256, 4096 * 3072],
            &[64, 128, 1, 1],
        );
        assert!(ok.is_ok(), "{ok:?}");
        let e = check_bf16_swizzle128(0x1000, &[128, 4096], &[3080], &[64, 128]).unwrap_err();
        assert!(e.to_string().contains("stride 3080"), "{e}");
        let e = check_bf16_swizzle128(0x1008, &[128, 4096], &[3072], &[64, 128]).unwrap_err();
        assert!(e.to_string().contains("global address"), "{e}");
        let e = check_bf16_swizzle128(0x1000, &[128, 4096], &[3072], &[128, 128]).unwrap_err();
        assert!(e.to_string().contains("128 bytes"), "{e}");
        let e = check_bf16_swizzle128(0x1000, &[128, 4096], &[3072], &[64, 512]).unwrap_err();
        assert!(e.to_string().contains("box dimension 512"), "{e}");
        assert!(check_bf16_swizzle128(0x1000, &[1; 6], &[16; 5], &[1; 6]).is_err());
    }
}
