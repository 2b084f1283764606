// The fused kernel behind edgeattn's custom op (see attention.hpp).  Plain C++17: the loops over 16 keys and over
// the head dimension are written so that the compiler vectorizes them (AVX-512 or AVX2 through target_clones).
#include "attention.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
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
const std::vector<int64_t> kNoChunks;

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
// result is 0 (e^-87 is about the smallest normal float; masked keys come in as -inf).
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
// `add`, when given, is the row's mask and bias in one: bias (or 0) where a key is allowed, -inf elsewhere.
struct Row {
    const float* q;
    const uint8_t* mask;
    const float* bias;
    float* out;
    const float* add = nullptr;
};

struct Scratch {
    std::vector<float> kt;        // (D, Kc): the tile's keys, transposed and zero-padded to whole chunks
    std::vector<float> s;         // (R, Kc): scores, then probabilities (0 for masked keys)
    std::vector<int64_t> chunks;  // the live chunks
    std::vector<Row> rows;        // the rows of the tile being computed
};

// Transposes 16 rows of 16 floats in registers: four butterfly stages of two-input shuffles (blocks of 8, 4, 2, 1).
template <int B, int... E>
constexpr vi low_mask(std::integer_sequence<int, E...>) {
    return vi{((E / B) % 2 == 0 ? E : 16 + E - B)...};
}
template <int B, int... E>
constexpr vi high_mask(std::integer_sequence<int, E...>) {
    return vi{((E / B) % 2 == 0 ? E + B : 16 + E)...};
}

template <int B>
EA_INLINE void butterfly(vf* rows) {
    constexpr vi lo = low_mask<B>(std::make_integer_sequence<int, 16>{});
    constexpr vi hi = high_mask<B>(std::make_integer_sequence<int, 16>{});
    for (int i = 0; i < 16; ++i) {
        if ((i / B) % 2) continue;
        const vf a = rows[i], b = rows[i + B];
        rows[i] = __builtin_shuffle(a, b, lo);
        rows[i + B] = __builtin_shuffle(a, b, hi);
    }
}

EA_INLINE void transpose16(vf* rows) {
    butterfly<8>(rows);
    butterfly<4>(rows);
    butterfly<2>(rows);
    butterfly<1>(rows);
}

// The sum and the maximum of a vector's 16 lanes, in four halving steps.
constexpr vi kHalves[4] = {{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7},
                           {4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11},
                           {2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13},
                           {1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14}};
EA_INLINE float lane_sum(vf v) {
    for (const vi& half : kHalves) v += __builtin_shuffle(v, half);
    return v[0];
}
EA_INLINE float lane_max(vf v) {
    for (const vi& half : kHalves) {
        const vf other = __builtin_shuffle(v, half);
        v = v > other ? v : other;
    }
    return v[0];
}

// 16 entries of an additive row from j0: the last chunk of a row ends at K, the rest is -inf.
EA_INLINE vf additive_chunk(const float* add, int64_t j0, int64_t K, bool whole) {
    if (whole) return load(add + j0);
    vf v = splat(kNegInf);
    for (int64_t j = j0; j < K; ++j) v[j - j0] = add[j];
    return v;
}

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
                             const float* values, int64_t Dv, int64_t e0, int64_t width, const float* inv, const Row* rg,
                             int64_t n) {
    vf a[R][NE] = {};
    for (int64_t c : live) {
        for (int64_t j = c * C, end = std::min(K, c * C + C); j < end; ++j) {
            const float* value = values + (ids ? ids[j] : j) * Dv + e0;
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
EA_CLONES void tile(const Qkv& x, const float* kb, const float* values, const int64_t* ids, int64_t K, const Row* rows,
                    int64_t nrows, Scratch& w) {
    const int64_t D = x.D, Dv = x.Dv, chunks = (K + C - 1) / C, Kc = chunks * C;
    // pack the keys transposed, 16 keys x 16 channels at a time through registers, the rest one by one
    w.kt.resize(D * Kc);
    float* packed = w.kt.data();
    const int64_t D16 = D - D % C;
    for (int64_t j0 = 0; j0 < Kc; j0 += C) {
        const float* key[C];
        const int64_t valid = std::min(C, K - j0);
        for (int64_t jj = 0; jj < C; ++jj) key[jj] = jj < valid ? kb + (ids ? ids[j0 + jj] : j0 + jj) * D : nullptr;
        for (int64_t d0 = 0; d0 < D16; d0 += C) {
            vf block[C];
            for (int64_t jj = 0; jj < C; ++jj) block[jj] = key[jj] ? load(key[jj] + d0) : vf{};
            transpose16(block);
            for (int64_t dd = 0; dd < C; ++dd) store(packed + (d0 + dd) * Kc + j0, block[dd]);
        }
        for (int64_t d = D16; d < D; ++d)
            for (int64_t jj = 0; jj < C; ++jj) packed[d * Kc + j0 + jj] = key[jj] ? key[jj][d] : 0.0f;
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
        //    over the head dimension; rows with an additive table (and no softcap) get it added here, and their
        //    running maximum taken, so that step 2 is their exponentials alone
        const bool fused = !cap && rg[0].add;
        const float* add[R];
        for (int64_t r = 0; r < R; ++r) add[r] = rg[std::min(r, n - 1)].add;
        vf top[R] = {splat(kNegInf), splat(kNegInf), splat(kNegInf), splat(kNegInf)};
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
            vf a[R] = {a0 * x.scale, a1 * x.scale, a2 * x.scale, a3 * x.scale};
            if (fused) {
                for (int64_t r = 0; r < R; ++r) {
                    a[r] += additive_chunk(add[r], c * C, K, c < full);  // -inf + a finite score is -inf
                    top[r] = top[r] > a[r] ? top[r] : a[r];
                }
            }
            for (int64_t r = 0; r < R; ++r) store(s + r * Kc + c * C, a[r]);
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
            for (int64_t c : fused ? kNoChunks : w.chunks) {
                const int64_t j0 = c * C;
                vf v = load(sr + j0);
                if (cap)
                    for (int64_t jj = 0; jj < C; ++jj) v[jj] = x.softcap * std::tanh(v[jj] / x.softcap);
                if (rg[r].add) {
                    v += additive_chunk(rg[r].add, j0, K, c < full);
                    store(sr + j0, v);
                    top[r] = top[r] > v ? top[r] : v;
                    continue;
                }
                vb m;
                vf bias{};
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
                v = __builtin_convertvector(m, vi) != 0 ? v + bias : splat(kNegInf);
                store(sr + j0, v);
                top[r] = top[r] > v ? top[r] : v;
            }
            const float best = lane_max(top[r]);
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
            inv[r] = 1.0f / lane_sum(sum);
        }

        // 3. probabilities x v, up to 64 output channels per pass over the keys, then the last Dv % 16 channels
        int64_t e0 = 0;
        for (; Dv - e0 >= C; e0 += 4 * C) {
            switch (std::min<int64_t>(4, (Dv - e0) / C)) {
                case 4: probs_times_v<4>(s, Kc, w.chunks, K, ids, values, Dv, e0, C, inv, rg, n); break;
                case 3: probs_times_v<3>(s, Kc, w.chunks, K, ids, values, Dv, e0, C, inv, rg, n); break;
                case 2: probs_times_v<2>(s, Kc, w.chunks, K, ids, values, Dv, e0, C, inv, rg, n); break;
                default: probs_times_v<1>(s, Kc, w.chunks, K, ids, values, Dv, e0, C, inv, rg, n); break;
            }
        }
        e0 = Dv - Dv % C;
        if (e0 < Dv) probs_times_v<1>(s, Kc, w.chunks, K, ids, values, Dv, e0, Dv - e0, inv, rg, n);
    }
}

bool in_range(const int64_t* ids, int64_t count, int64_t limit) {
    for (int64_t i = 0; i < count; ++i)
        if (ids[i] < 0 || ids[i] >= limit) return false;
    return true;
}

// Runs work(item, scratch) for items 0..count-1, worker w taking items w, w + workers, ... (neighbouring tiles cost
// alike, so interleaving balances tables whose rows differ in length, as causal ones do).
template <class Work>
void parallel(int64_t count, const Parallel& run, Work work) {
    run([&](int worker, int workers) {
        if (workers < 1) workers = 1;
        Scratch scratch;
        for (int64_t item = worker; item < count; item += workers) work(item, scratch);
    });
}

}  // namespace

std::vector<float> additive_table(const Blocked& t) {
    const int64_t heads = std::max(t.mh, t.bias ? t.bh : 1);
    if (t.P * heads * t.tq * t.K * sizeof(float) > (size_t{4} << 20)) return {};
    std::vector<float> add(t.P * heads * t.tq * t.K);
    for (int64_t p = 0; p < t.P; ++p)
        for (int64_t h = 0; h < heads; ++h)
            for (int64_t i = 0; i < t.tq; ++i) {
                const uint8_t* mask = t.bank + ((p * t.mh + (t.mh > 1 ? h : 0)) * t.tq + i) * t.K;
                const float* bias = t.bias ? t.bias + ((p * t.bh + (t.bh > 1 ? h : 0)) * t.tq + i) * t.K : nullptr;
                float* out = add.data() + ((p * heads + h) * t.tq + i) * t.K;
                for (int64_t j = 0; j < t.K; ++j) out[j] = mask[j] ? (bias ? bias[j] : 0.0f) : kNegInf;
            }
    return add;
}

int blocked_attention(const Qkv& x, const Blocked& t, const Parallel& run) {
    if (x.Hk <= 0 || x.H % x.Hk || (t.mh != 1 && t.mh != x.H) || (t.bias && t.bh != 1 && t.bh != x.H)) return 1;
    if (!in_range(t.q_index, t.T * t.tq, x.Nq) || !in_range(t.kv_index, t.T * t.K, x.Nk) ||
        !in_range(t.q_pos, t.M, t.T * t.tq) || !in_range(t.block, t.T, t.P))
        return 2;
    const int64_t group = x.H / x.Hk;
    // the output row of each tile row (-1: a padding row, or one no output row reads); an output row reading a
    // tile row another one already reads is copied from it at the end
    std::vector<int64_t> row_of(t.T * t.tq, -1);
    std::vector<std::pair<int64_t, int64_t>> copies;
    for (int64_t m = 0; m < t.M; ++m) {
        int64_t& first = row_of[t.q_pos[m]];
        if (first < 0)
            first = m;
        else
            copies.emplace_back(m, first);
    }
    std::vector<float> built;
    const float* add = t.add;
    if (!add) {
        built = additive_table(t);
        add = built.empty() ? nullptr : built.data();
    }
    const int64_t heads = std::max(t.mh, t.bias ? t.bh : 1);
    parallel(x.B * x.H * t.T, run, [&](int64_t item, Scratch& w) {
        const int64_t tile_id = item % t.T, bh = item / t.T, h = bh % x.H, b = bh / x.H;
        const int64_t kvh = b * x.Hk + h / group;
        std::vector<Row>& rows = w.rows;
        rows.clear();
        const int64_t p = t.block[tile_id];
        for (int64_t i = 0; i < t.tq; ++i) {
            const int64_t flat = tile_id * t.tq + i, query = t.q_index[flat], m = row_of[flat];
            if (m < 0) continue;
            const int64_t mrow = ((p * t.mh + (t.mh > 1 ? h : 0)) * t.tq + i) * t.K;
            const int64_t brow = ((p * t.bh + (t.bh > 1 ? h : 0)) * t.tq + i) * t.K;
            const float* add_row = add ? add + ((p * heads + (heads > 1 ? h : 0)) * t.tq + i) * t.K : nullptr;
            rows.push_back(Row{x.q + (bh * x.Nq + query) * x.D, t.bank + mrow, t.bias ? t.bias + brow : nullptr,
                               x.out + (bh * t.M + m) * x.Dv, add_row});
        }
        tile(x, x.k + kvh * x.Nk * x.D, x.v + kvh * x.Nk * x.Dv, t.kv_index + tile_id * t.K, t.K, rows.data(),
             static_cast<int64_t>(rows.size()), w);
    });
    for (const auto& [m, first] : copies)
        for (int64_t bh = 0; bh < x.B * x.H; ++bh)
            std::memcpy(x.out + (bh * t.M + m) * x.Dv, x.out + (bh * t.M + first) * x.Dv, x.Dv * sizeof(float));
    return 0;
}

int dense_attention(const Qkv& x, const Dense& t, const Parallel& run) {
    if (x.Hk <= 0 || x.H % x.Hk || (t.mh != 1 && t.mh != x.H) || (t.bias && t.bh != 1 && t.bh != x.H)) return 1;
    if ((t.mb != 1 && t.mb != x.B) || (t.bias && t.bb != 1 && t.bb != x.B)) return 1;
    constexpr int64_t tq = 64;
    const int64_t tiles = (x.Nq + tq - 1) / tq, group = x.H / x.Hk;
    parallel(x.B * x.H * tiles, run, [&](int64_t item, Scratch& w) {
        const int64_t tile_id = item % tiles, bh = item / tiles, h = bh % x.H, b = bh / x.H;
        const int64_t kvh = b * x.Hk + h / group;
        Row rows[tq];
        const int64_t first = tile_id * tq, n = std::min(tq, x.Nq - first);
        for (int64_t i = 0; i < n; ++i) {
            const int64_t query = first + i;
            const int64_t mrow = (((t.mb > 1 ? b : 0) * t.mh + (t.mh > 1 ? h : 0)) * x.Nq + query) * x.Nk;
            const int64_t brow = (((t.bb > 1 ? b : 0) * t.bh + (t.bh > 1 ? h : 0)) * x.Nq + query) * x.Nk;
            rows[i] = Row{x.q + (bh * x.Nq + query) * x.D, t.mask + mrow, t.bias ? t.bias + brow : nullptr,
                          x.out + (bh * x.Nq + query) * x.Dv};
        }
        tile(x, x.k + kvh * x.Nk * x.D, x.v + kvh * x.Nk * x.Dv, nullptr, x.Nk, rows, n, w);
    });
    return 0;
}

}  // namespace edgeattn
