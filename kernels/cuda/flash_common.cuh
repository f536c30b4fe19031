// Prepended to flash.cu and flash_sm90_ws.cu: what both flash implementations share (mask
// bounds, epilogues). Query t of a row sees key j iff flash_key_lo(seg, t, window) <= j <= t.
// Accumulators are in the mma/wgmma fragment layout: element 4 dt + 2 r + {0, 1} of a thread
// is column 8 dt + 2 (lane & 3) + {0, 1} of its row r (r = 0: row_a, 1: row_a + 8).

__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
    bf162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<u32*>(&v);
}

// First key row `row` (< T) may see; nondecreasing in row. `seg_row`: the row's document
// starts (null without varlen); window 0 = full causal.
__device__ __forceinline__ int flash_key_lo(const int* seg_row, int row, int window) {
    int lo = seg_row ? seg_row[row] : 0;
    if (window > 0) lo = max(lo, row - window + 1);
    return lo;
}

// End (exclusive) of the queries that may see a key at or below k_last, the last key of a
// block: the window's reach and, with varlen, the first query past k_last whose document starts
// after it.
__device__ __forceinline__ int flash_query_end(const int* seg_row, int k_last, int window, int T) {
    int q_hi = window > 0 ? min(T, k_last + window) : T;
    if (seg_row) {
        int lo = min(k_last + 1, q_hi), hi = q_hi;
        while (lo < hi) {
            const int mid = (lo + hi) >> 1;
            if (seg_row[mid] > k_last) hi = mid; else lo = mid + 1;
        }
        q_hi = lo;
    }
    return q_hi;
}

// The forward's epilogue for this thread's rows row_a, row_a + 8 of head h (rows at or past T
// skipped): the row sums summed over the quad, O = acc / l, lse = (m + log2 l)·ln 2 (m, the
// row max, in log2 units).
template <int D>
__device__ __forceinline__ void flash_store_o(bf16* o, float* lse, const float* acc, const float (&mrow)[2],
                                              float (&lrow)[2], int row_a, int b, int h, int T, int H, int o_rs,
                                              int lane) {
#pragma unroll
    for (int r = 0; r < 2; r++) {
        lrow[r] += __shfl_xor_sync(0xffffffffu, lrow[r], 1);
        lrow[r] += __shfl_xor_sync(0xffffffffu, lrow[r], 2);
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int i = row_a + r * 8;
        if (i >= T) continue;
        const float inv = lrow[r] > 0.f ? 1.f / lrow[r] : 0.f;
        bf16* orow = o + ((long long)b * T + i) * o_rs + h * D;
#pragma unroll
        for (int dt = 0; dt < D / 8; dt++) {
            *reinterpret_cast<u32*>(orow + dt * 8 + (lane & 3) * 2) =
                pack_bf16(acc[dt * 4 + 2 * r] * inv, acc[dt * 4 + 2 * r + 1] * inv);
        }
        if ((lane & 3) == 0) lse[((long long)b * H + h) * T + i] = (mrow[r] + log2f(lrow[r])) * 0.69314718055994530942f;
    }
}

// The inverse RoPE rotation (the rotate-half pair x1 = column p, x2 = column p + D/2) with the
// bf16 table values c, s of the position: x1' = x1 c + x2 s, x2' = x2 c - x1 s, in fp32. Applied
// where dQ and dK are first rounded, it replaces elementwise.cu's rope_qkv(sign = -1) pass, and
// rounds to bf16 once where that path rounded twice (the conversion, then the rotation).
__device__ __forceinline__ void rope_bwd_pair(float& x1, float& x2, float c, float s) {
    const float a = x1 * c + x2 * s, b = x2 * c - x1 * s;
    x1 = a;
    x2 = b;
}

// The backward's epilogue: dK (times scale) and dV of this thread's keys key_a, key_a + 8 (at
// or past T skipped) into the group's rows at dkg, dvg (row stride kv_rs). With cos_t, sin_t
// (bf16 [>= T][D/2], null: none) dK leaves inverse-rotated at position `key`: the pair partner
// of column dt 8 + c is dt + D/16's, in the same thread.
template <int D>
__device__ __forceinline__ void flash_store_dkdv(bf16* dkg, bf16* dvg, int kv_rs, const float* dk_acc,
                                                 const float* dv_acc, float scale, int key_a, int T, int lane,
                                                 const bf16* __restrict__ cos_t, const bf16* __restrict__ sin_t) {
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int key = key_a + r * 8;
        if (key >= T) continue;
        if (cos_t) {
            const bf16* ct = cos_t + (long long)key * (D / 2);
            const bf16* st = sin_t + (long long)key * (D / 2);
#pragma unroll
            for (int dt = 0; dt < D / 16; dt++) {
                const int col = dt * 8 + (lane & 3) * 2;
                const float2 c = __bfloat1622float2(*reinterpret_cast<const bf162*>(ct + col));
                const float2 s = __bfloat1622float2(*reinterpret_cast<const bf162*>(st + col));
                const int e1 = dt * 4 + 2 * r, e2 = (dt + D / 16) * 4 + 2 * r;
                float a0 = dk_acc[e1] * scale, a1 = dk_acc[e1 + 1] * scale;
                float b0 = dk_acc[e2] * scale, b1 = dk_acc[e2 + 1] * scale;
                rope_bwd_pair(a0, b0, c.x, s.x);
                rope_bwd_pair(a1, b1, c.y, s.y);
                *reinterpret_cast<u32*>(dkg + (long long)key * kv_rs + col) = pack_bf16(a0, a1);
                *reinterpret_cast<u32*>(dkg + (long long)key * kv_rs + col + D / 2) = pack_bf16(b0, b1);
            }
        } else {
#pragma unroll
            for (int dt = 0; dt < D / 8; dt++) {
                const int col = dt * 8 + (lane & 3) * 2;
                *reinterpret_cast<u32*>(dkg + (long long)key * kv_rs + col) =
                    pack_bf16(dk_acc[dt * 4 + 2 * r] * scale, dk_acc[dt * 4 + 2 * r + 1] * scale);
            }
        }
#pragma unroll
        for (int dt = 0; dt < D / 8; dt++) {
            const int col = dt * 8 + (lane & 3) * 2;
            *reinterpret_cast<u32*>(dvg + (long long)key * kv_rs + col) =
                pack_bf16(dv_acc[dt * 4 + 2 * r], dv_acc[dt * 4 + 2 * r + 1]);
        }
    }
}
