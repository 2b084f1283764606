// edgeattn's fused CPU attention over static mask tables (fp32).
//
// One pass per (batch, head, query tile): the tile's keys are packed once, transposed, into a per-thread buffer
// (what a GEMM packs, not a gathered copy of k), then each group of up to four query rows scores only the 16-key
// chunks its mask rows allow, softmaxes in place and accumulates v rows straight from the input; scores never
// leave that buffer.  Semantics are edgeattn.attention's: scores = (q . k) * scale, then softcap * tanh(s / softcap)
// when softcap > 0, then + bias, masked keys excluded, and a query with no allowed key gets zeros.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

namespace edgeattn {

// q (B, H, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv), out (B, H, Nq, Dv) (a block table's M rows instead of Nq);
// Hk divides H (grouped heads); all contiguous.
struct Qkv {
    const float* q;
    const float* k;
    const float* v;
    float* out;
    int64_t B, H, Hk, Nq, Nk, D, Dv;
    float scale, softcap;
};

// A block table (edgeattn.tables.BlockTable): T tiles of tq queries over K keys; mask (P, mh, tq, K) as bytes,
// bias (P, bh, tq, K) or null; mh and bh are 1 or H.  The output has M rows, (B, H, M, Dv): row m is the tile row
// q_pos[m] (M = Nq for a whole table, fewer for one bucket of a bucketed table).
struct Blocked {
    const int64_t* q_index;   // (T, tq)
    const int64_t* kv_index;  // (T, K)
    const int64_t* q_pos;     // (M,)
    const uint8_t* bank;      // (P, mh, tq, K)
    const int64_t* block;     // (T,)
    const float* bias;        // (P, bh, tq, K) or null
    int64_t T, tq, K, P, mh, bh, M;
    const float* add = nullptr;  // additive_table(*this), when the caller keeps one; built per call otherwise
};

// The bank and its bias as one additive table, (P, max(mh, bh), tq, K): the bias (or 0) where a key is allowed,
// -inf elsewhere, which the kernel adds to the scores instead of reading mask bytes and bias.  Empty above 4 MB
// (a causal table's would cost more to read than the bytes it replaces).
std::vector<float> additive_table(const Blocked& t);

// A dense table: mask (mb, mh, Nq, Nk) as bytes, bias (bb, bh, Nq, Nk) or null; batches 1 or B (a mask computed in
// the graph, as Mask2Former's, carries the batch), heads 1 or H.
struct Dense {
    const uint8_t* mask;
    const float* bias;
    int64_t mh, bh, mb = 1, bb = 1;
};

// How the kernel gets its threads: run(body) calls body(worker, workers) once on each of `workers` threads (the
// host's pool: OpenVINO's TBB arena in the extension, so no second pool competes with it for the cores).
using Parallel = std::function<void(const std::function<void(int, int)>&)>;

// Returns 0, or a nonzero code when an index is out of range (nothing is read out of bounds).
int blocked_attention(const Qkv& x, const Blocked& t, const Parallel& run);
int dense_attention(const Qkv& x, const Dense& t, const Parallel& run);

}  // namespace edgeattn
