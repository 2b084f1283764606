// A C entry point for each layout, for callers without C++ (Python's ctypes: tests and benchmarks run the kernel
// on torch tensors through it).
#include "attention.hpp"

extern "C" {

int edgeattn_blocked_attention(const float* q, const float* k, const float* v, float* out, const int64_t* dims,
                               float scale, float softcap, const int64_t* q_index, const int64_t* kv_index,
                               const int64_t* q_pos, const uint8_t* bank, const int64_t* block, const float* bias,
                               const int64_t* table_dims, int threads) {
    // dims: B, H, Hk, Nq, Nk, D, Dv; table_dims: T, tq, K, P, mask heads, bias heads
    edgeattn::Qkv x{q, k, v, out, dims[0], dims[1], dims[2], dims[3], dims[4], dims[5], dims[6], scale, softcap};
    edgeattn::Blocked t{q_index,       kv_index,      q_pos,         bank,          block,        bias,
                        table_dims[0], table_dims[1], table_dims[2], table_dims[3], table_dims[4], table_dims[5]};
    return edgeattn::blocked_attention(x, t, threads);
}

int edgeattn_dense_attention(const float* q, const float* k, const float* v, float* out, const int64_t* dims,
                             float scale, float softcap, const uint8_t* mask, const float* bias, int64_t mask_heads,
                             int64_t bias_heads, int threads) {
    edgeattn::Qkv x{q, k, v, out, dims[0], dims[1], dims[2], dims[3], dims[4], dims[5], dims[6], scale, softcap};
    edgeattn::Dense t{mask, bias, mask_heads, bias_heads};
    return edgeattn::dense_attention(x, t, threads);
}
}
