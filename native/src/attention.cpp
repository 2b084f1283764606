// The fused kernel behind edgeattn's custom op (see attention.hpp).  Plain C++17: the loops over 16 keys and over
// the head dimension are written so that the compiler vectorizes them (AVX-512 or AVX2 through target_clones).
#include "attention.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__) && !defined(EA_NOCLONE)
#define EA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define EA_CLONES
#endif
// helpers are inlined into each clone, so they are compiled for its instruction set
#define EA_INLINE inline __attribute__((always_inline))

namespace edgeattn {
namespace {

constexpr int64_t C = 16;  // keys per chunk: one AVX-512 register of scores
constexpr int64_t R = 4;   // query rows scored together: each packed key chunk is loaded once for four rows
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// 16 floats: GCC and Clang lower each operation to one AVX-512 instruction, two AVX2 or four SSE ones.
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint8_t vb __attribute__((vector_size(16)));

EA_INLINE vf load(const float* p) {
    vf v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
EA_INLINE void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
EA_INLINE vf splat(float x) { return vf{} + x; }

// exp(x) for x <= 0 (a softmax's shifted scores) on 16 lanes, branch-free: x = n ln2 + r with |r| <= ln2/2, e^r by
// its Taylor series to r^7 (relative error below 1e-8 there), 2^n put into the exponent bits.  Below -87 the
// result is 0 (e^-87 is a denormal, and masked keys come in as -inf).
EA_INLINE vf exp_nonpositive(vf x) {
    const vf xc = x < -87.0f ? splat(-87.0f) : x;
    const vf t = xc * 1.44269504088896341f;
    const vf n = (t + 12582912.0f) - 12582912.0f;  // round to nearest: adding 1.5 * 2^23 drops the fraction
    const vf r = (xc - n * 0.693145751953125f) - n * 1.428606765330187e-06f;  // ln2 in two parts
    vf p = splat(1.0f / 5040.0f);
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
    vf two_n;
    std::memcpy(&two_n, &bits, sizeof two_n);
    return x < -87.0f ? splat(0.0f) : p * two_n;
}

// One query row of a tile: where its q, mask row, bias row (or null) and output row are.
struct Row {
    const float* q;
    const uint8_t* mask;
    const float* bias;
    float* out;
};

struct Scratch {
    std::vector<float> kt;        // (D, Kc): the tile's keys, transposed and zero-padded to whole chunks
    std::vector<float> s;         // (R, Kc): scores, then probabilities (0 for masked keys)
    std::vector<int64_t> chunks;  // the live chunks
};

EA_INLINE bool any_byte(const uint8_t* p) {
    vb m;
    std::memcpy(&m, p, sizeof m);
    uint64_t lanes[2];
    std::memcpy(lanes, &m, sizeof lanes);
    return (lanes[0] | lanes[1]) != 0;
}

// out[r] = (sum over the live chunks' keys j of p[r][j] v[j]) * inv[r] for the n rows of a group, on NE x 16 output
// channels from e0 (the last `width` of them when width < 16: a v shorter than 16 channels), held in registers
// (4 rows x NE accumulators).
template <int NE>
EA_INLINE void probs_times_v(const float* s, int64_t Kc, const std::vector<int64_t>& live, int64_t K, const int64_t* ids,
                             const float* vb_, int64_t Dv, int64_t e0, int64_t width, const float* inv, const Row* rg,
                             int64_t n) {
    vf a[R][NE] = {};
    for (int64_t c : live) {
        for (int64_t j = c * C, end = std::min(K, c * C + C); j < end; ++j) {
            const float* value = vb_ + (ids ? ids[j] : j) * Dv + e0;
            vf vv[NE];
            if (width == C) {
                for (int e = 0; e < NE; ++e) vv[e] = load(value + e * C);
            } else {
                vv[0] = vf{};
                for (int64_t e = 0; e < width; ++e) vv[0][e] = value[e];
            }
            for (int64_t r = 0; r < R; ++r) {
                const float p = s[r * Kc + j];
                for (int e = 0; e < NE; ++e) a[r][e] += p * vv[e];
            }
        }
    }
    for (int64_t r = 0; r < n; ++r)
        for (int e = 0; e < NE; ++e)
            for (int64_t lane = 0; lane < width; ++lane) rg[r].out[e0 + e * C + lane] = a[r][e][lane] * inv[r];
}

// Attention of `nrows` rows over the K keys `ids` (null: keys 0..K-1) of one (batch, head).
EA_CLONES void tile(const Qkv& x, const float* kb, const float* vb_, const int64_t* ids, int64_t K, const Row* rows,
                    int64_t nrows, Scratch& w) {
    const int64_t D = x.D, Dv = x.Dv, chunks = (K + C - 1) / C, Kc = chunks * C;
    w.kt.assign(D * Kc, 0.0f);
    for (int64_t j = 0; j < K; ++j) {
        const float* key = kb + (ids ? ids[j] : j) * D;
        for (int64_t d = 0; d < D; ++d) w.kt[d * Kc + j] = key[d];
    }
    w.s.resize(R * Kc);
    const float* kt = w.kt.data();
    float* s = w.s.data();
    const bool cap = x.softcap > 0.0f;
    const int64_t full = K / C;  // chunks without padding keys

    for (int64_t g = 0; g < nrows; g += R) {
        const int64_t n = std::min(R, nrows - g);
        const Row* rg = rows + g;
        const float* q[R];
        for (int64_t r = 0; r < R; ++r) q[r] = rg[std::min(r, n - 1)].q;  // a short group repeats its last row

        // 1. the chunks where some row of the group allows a key, and their scores: 4 rows x 16 keys per pass
        //    over the head dimension
        w.chunks.clear();
        for (int64_t c = 0; c < chunks; ++c) {
            bool any = false;
            for (int64_t r = 0; r < n && !any; ++r) {
                if (c < full) {
                    any = any_byte(rg[r].mask + c * C);
                } else {
                    for (int64_t j = c * C; j < K; ++j) any = any || rg[r].mask[j];
                }
            }
            if (!any) continue;
            w.chunks.push_back(c);
            vf a0{}, a1{}, a2{}, a3{};
            for (int64_t d = 0; d < D; ++d) {
                const vf kd = load(kt + d * Kc + c * C);
                a0 += q[0][d] * kd;
                a1 += q[1][d] * kd;
                a2 += q[2][d] * kd;
                a3 += q[3][d] * kd;
            }
            store(s + 0 * Kc + c * C, a0 * x.scale);
            store(s + 1 * Kc + c * C, a1 * x.scale);
            store(s + 2 * Kc + c * C, a2 * x.scale);
            store(s + 3 * Kc + c * C, a3 * x.scale);
        }

        // 2. softcap, bias, mask and softmax in place, unnormalized (the output is scaled by inv at the end); a
        //    masked key's probability is exactly 0, and so is every probability of a row allowing no key
        float inv[R] = {};
        for (int64_t r = 0; r < R; ++r) {
            float* sr = s + r * Kc;
            if (r >= n) {
                for (int64_t c : w.chunks) store(sr + c * C, splat(0.0f));
                continue;
            }
            vf top = splat(kNegInf);
            for (int64_t c : w.chunks) {
                const int64_t j0 = c * C;
                vb m;
                vf v = load(sr + j0), bias{};
                if (c < full) {
                    std::memcpy(&m, rg[r].mask + j0, sizeof m);
                    if (rg[r].bias) bias = load(rg[r].bias + j0);
                } else {  // the last chunk's padding keys: masked, no bias read past the row
                    m = vb{};
                    for (int64_t j = j0; j < K; ++j) {
                        m[j - j0] = rg[r].mask[j];
                        if (rg[r].bias) bias[j - j0] = rg[r].bias[j];
                    }
                }
                if (cap)
                    for (int64_t jj = 0; jj < C; ++jj) v[jj] = x.softcap * std::tanh(v[jj] / x.softcap);
                v = __builtin_convertvector(m, vi) != 0 ? v + bias : splat(kNegInf);
                store(sr + j0, v);
                top = top > v ? top : v;
            }
            float best = kNegInf;
            for (int64_t jj = 0; jj < C; ++jj) best = std::max(best, top[jj]);
            if (best == kNegInf) {  // no allowed key: zeros, as torch gives
                for (int64_t c : w.chunks) store(sr + c * C, splat(0.0f));
                continue;
            }
            vf sum{};
            for (int64_t c : w.chunks) {
                const vf p = exp_nonpositive(load(sr + c * C) - best);
                store(sr + c * C, p);
                sum += p;
            }
            float total = 0.0f;
            for (int64_t jj = 0; jj < C; ++jj) total += sum[jj];
            inv[r] = 1.0f / total;
        }

        // 3. probabilities x v, up to 64 output channels per pass over the keys, then the last Dv % 16 channels
        int64_t e0 = 0;
        for (; Dv - e0 >= C; e0 += 4 * C) {
            switch (std::min<int64_t>(4, (Dv - e0) / C)) {
                case 4: probs_times_v<4>(s, Kc, w.chunks, K, ids, vb_, Dv, e0, C, inv, rg, n); break;
                case 3: probs_times_v<3>(s, Kc, w.chunks, K, ids, vb_, Dv, e0, C, inv, rg, n); break;
                case 2: probs_times_v<2>(s, Kc, w.chunks, K, ids, vb_, Dv, e0, C, inv, rg, n); break;
                default: probs_times_v<1>(s, Kc, w.chunks, K, ids, vb_, Dv, e0, C, inv, rg, n); break;
            }
        }
        e0 = Dv - Dv % C;
        if (e0 < Dv) probs_times_v<1>(s, Kc, w.chunks, K, ids, vb_, Dv, e0, Dv - e0, inv, rg, n);
    }
}

bool in_range(const int64_t* ids, int64_t count, int64_t limit) {
    for (int64_t i = 0; i < count; ++i)
        if (ids[i] < 0 || ids[i] >= limit) return false;
    return true;
}

int max_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

// Runs work(item, scratch) for items 0..count-1 over `threads` threads (0: OpenMP's default).
template <class Work>
void parallel(int64_t count, int threads, Work work) {
#pragma omp parallel num_threads(threads > 0 ? threads : max_threads())
    {
        Scratch scratch;
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < count; ++item) work(item, scratch);
    }
}

}  // namespace

int blocked_attention(const Qkv& x, const Blocked& t, int threads) {
    if (x.Hk <= 0 || x.H % x.Hk || (t.mh != 1 && t.mh != x.H) || (t.bias && t.bh != 1 && t.bh != x.H)) return 1;
    if (!in_range(t.q_index, t.T * t.tq, x.Nq) || !in_range(t.kv_index, t.T * t.K, x.Nk) ||
        !in_range(t.q_pos, x.Nq, t.T * t.tq) || !in_range(t.block, t.T, t.P))
        return 2;
    const int64_t group = x.H / x.Hk;
    parallel(x.B * x.H * t.T, threads, [&](int64_t item, Scratch& w) {
        const int64_t tile_id = item % t.T, bh = item / t.T, h = bh % x.H, b = bh / x.H;
        const int64_t kvh = b * x.Hk + h / group;
        std::vector<Row> rows;
        rows.reserve(t.tq);
        const int64_t p = t.block[tile_id];
        for (int64_t i = 0; i < t.tq; ++i) {
            const int64_t flat = tile_id * t.tq + i, query = t.q_index[flat];
            if (t.q_pos[query] != flat) continue;  // a padding row repeating a query computed elsewhere
            const int64_t mrow = ((p * t.mh + (t.mh > 1 ? h : 0)) * t.tq + i) * t.K;
            const int64_t brow = ((p * t.bh + (t.bh > 1 ? h : 0)) * t.tq + i) * t.K;
            rows.push_back(Row{x.q + (bh * x.Nq + query) * x.D, t.bank + mrow, t.bias ? t.bias + brow : nullptr,
                               x.out + (bh * x.Nq + query) * x.Dv});
        }
        tile(x, x.k + kvh * x.Nk * x.D, x.v + kvh * x.Nk * x.Dv, t.kv_index + tile_id * t.K, t.K, rows.data(),
             static_cast<int64_t>(rows.size()), w);
    });
    return 0;
}

int dense_attention(const Qkv& x, const Dense& t, int threads) {
    if (x.Hk <= 0 || x.H % x.Hk || (t.mh != 1 && t.mh != x.H) || (t.bias && t.bh != 1 && t.bh != x.H)) return 1;
    constexpr int64_t tq = 64;
    const int64_t tiles = (x.Nq + tq - 1) / tq, group = x.H / x.Hk;
    parallel(x.B * x.H * tiles, threads, [&](int64_t item, Scratch& w) {
        const int64_t tile_id = item % tiles, bh = item / tiles, h = bh % x.H, b = bh / x.H;
        const int64_t kvh = b * x.Hk + h / group;
        Row rows[tq];
        const int64_t first = tile_id * tq, n = std::min(tq, x.Nq - first);
        for (int64_t i = 0; i < n; ++i) {
            const int64_t query = first + i;
            rows[i] = Row{x.q + (bh * x.Nq + query) * x.D, t.mask + ((t.mh > 1 ? h : 0) * x.Nq + query) * x.Nk,
                          t.bias ? t.bias + ((t.bh > 1 ? h : 0) * x.Nq + query) * x.Nk : nullptr,
                          x.out + (bh * x.Nq + query) * x.Dv};
        }
        tile(x, x.k + kvh * x.Nk * x.D, x.v + kvh * x.Nk * x.Dv, nullptr, x.Nk, rows, n, w);
    });
    return 0;
}

}  // namespace edgeattn
