/* Per-element passes of uniquified DKM on the CPU: 16-bit points keyed by their bit pattern.
 *
 * The torch twins are in `edkm.functional.table` (pattern_histogram + table_from_histogram,
 * segment_sum, gather_rows, element_grad). In torch form, for one group with 16-bit points
 * p (N,) (their int16 view), table keys (U,) (sorted distinct patterns, -1 padding) and
 * row(i) = the j with keys[j] == p[i]:
 *
 *     build:        keys, counts = unique(p, sorted=True, return_counts=True)
 *     segment_sum:  S[j]  = sum_{row(i) = j} grad[i]            (fp32 accumulation)
 *     gather_rows:  out[i] = rows16[row(i)]                      (rows already cast to 16 bits)
 *     element_grad: dW[i] = grad[i] * jac[row(i)] + s[i] * shared[row(i)]   (fp32 or bf16 out)
 *
 * Nothing per element is stored: every pass maps patterns to rows through a 65536-entry
 * lookup filled from the group's keys (256 KB per thread, cache-resident). Sums over the
 * points of a row run in point order, as torch's scatter_add does.
 *
 * Value kinds (the `kind` arguments): 0 fp32, 1 bf16, 2 fp16 (exact conversion to fp32).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "scratch.h"

#define N_PATTERNS 65536

static inline float bits_to_f32(uint32_t b) {
    float f;
    memcpy(&f, &b, sizeof f);
    return f;
}

/* fp16 bits -> fp32, exact (normals, subnormals, zeros, inf, nan). */
static inline float half_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
    if (exp == 0x1F) return bits_to_f32(sign | 0x7F800000u | (man << 13));
    if (exp != 0) return bits_to_f32(sign | ((exp + 112) << 23) | (man << 13));
    /* subnormal: man * 2^-24, exact in fp32 */
    float v = (float)man * 5.9604644775390625e-8f;
    return sign ? -v : v;
}

/* A 16-bit pattern of kind 1 (bf16) or 2 (fp16) as fp32, exact. */
static inline float bits16_to_f32(uint16_t b, int kind) {
    return kind == 1 ? bits_to_f32((uint32_t)b << 16) : half_to_f32(b);
}

static inline float load_value(const void* src, long i, int kind) {
    if (kind == 0) return ((const float*)src)[i];
    return bits16_to_f32(((const uint16_t*)src)[i], kind);
}

/* This thread's buffers (scratch.h): the table build's pattern counts (kept all zero between
 * calls), its two lists of distinct patterns, and the pattern -> row lookup of the passes
 * (filled from a group's keys before use; entries of absent patterns are never read). */
static _Thread_local Buf count_buf, seen_buf, tmp_buf, lookup_buf;

static int32_t* lookup_get(void) { return (int32_t*)buf_get(&lookup_buf, sizeof(int32_t) * N_PATTERNS, 0); }

/* Distinct patterns of each group of [g0, g1), sorted, with their counts, compacted into
 * ukeys / ucount (G, N) (the first n_rows[g] entries of row g); n_rows (G,). */
int edkm_unique_patterns(const uint16_t* pts, long G, long N, uint16_t* ukeys, int32_t* ucount, int64_t* n_rows,
                         long g0, long g1) {
    (void)G;
    size_t most = sizeof(uint16_t) * (size_t)(N < N_PATTERNS ? N : N_PATTERNS);
    int32_t* cnt = (int32_t*)buf_get(&count_buf, sizeof(int32_t) * N_PATTERNS, 1); /* all 0 between calls */
    uint16_t* seen = (uint16_t*)buf_get(&seen_buf, most, 0);
    uint16_t* tmp = (uint16_t*)buf_get(&tmp_buf, most, 0);
    if (!cnt || !seen || !tmp) return -1;
    for (long g = g0; g < g1; g++) {
        const uint16_t* p = pts + g * N;
        long u = 0;
        for (long i = 0; i < N; i++) { /* branch-free: a first occurrence is unpredictable */
            seen[u] = p[i];
            u += cnt[p[i]]++ == 0;
        }
        /* sort the u distinct patterns: LSD radix sort, two 8-bit digits */
        uint16_t *src = seen, *dst = tmp;
        for (int shift = 0; shift < 16; shift += 8) {
            long bucket[257] = {0};
            for (long j = 0; j < u; j++) bucket[((src[j] >> shift) & 0xFF) + 1]++;
            for (int b = 0; b < 256; b++) bucket[b + 1] += bucket[b];
            for (long j = 0; j < u; j++) dst[bucket[(src[j] >> shift) & 0xFF]++] = src[j];
            uint16_t* t = src;
            src = dst;
            dst = t;
        }
        for (long j = 0; j < u; j++) {
            ukeys[g * N + j] = src[j];
            ucount[g * N + j] = cnt[src[j]];
            cnt[src[j]] = 0;
        }
        n_rows[g] = u;
    }
    return 0;
}

/* Pad the compact lists of edkm_unique_patterns into the table of [g0, g1): keys (G, U) int64
 * (-1 padding), counts (G, U) fp32 (0 padding), values (G, U) fp32 of the patterns read as
 * `kind` (1 bf16, 2 fp16; 0 padding). Returns 0, or -3 if a present pattern is NaN / Inf. */
int edkm_fill_table(const uint16_t* ukeys, const int32_t* ucount, const int64_t* n_rows, long N, long U, int kind,
                    int64_t* keys, float* counts, float* values, long g0, long g1) {
    int bad = 0;
    for (long g = g0; g < g1; g++) {
        long u = n_rows[g];
        for (long j = 0; j < U; j++) {
            if (j < u) {
                uint16_t p = ukeys[g * N + j];
                float v = bits16_to_f32(p, kind);
                bad |= !(v - v == 0.0f); /* NaN or Inf */
                keys[g * U + j] = p;
                counts[g * U + j] = (float)ucount[g * N + j];
                values[g * U + j] = v;
            } else {
                keys[g * U + j] = -1;
                counts[g * U + j] = 0.0f;
                values[g * U + j] = 0.0f;
            }
        }
    }
    return bad ? -3 : 0;
}

/* Fill the lookup pattern -> row from one group's keys (int64, padding -1). */
static void fill_lookup(int32_t* lut, const int64_t* keys, long U) {
    for (long j = 0; j < U && keys[j] >= 0; j++) lut[keys[j]] = (int32_t)j;
}

/* S (G, U) fp32 = per-row sums of src (G, N) of `kind`. */
int edkm_segment_sum(const uint16_t* pts, const int64_t* keys, const void* src, int kind, float* out, long G, long N,
                     long U, long g0, long g1) {
    (void)G;
    int32_t* lut = lookup_get();
    if (!lut) return -1;
    for (long g = g0; g < g1; g++) {
        fill_lookup(lut, keys + g * U, U);
        float* s = out + g * U;
        memset(s, 0, sizeof(float) * (size_t)U);
        const uint16_t* p = pts + g * N;
        for (long i = 0; i < N; i++) s[lut[p[i]]] += load_value(src, g * N + i, kind);
    }
    return 0;
}

/* out (G, N) 16-bit = rows16 (G, U)[row(i)]. */
int edkm_gather_rows(const uint16_t* pts, const int64_t* keys, const uint16_t* rows16, uint16_t* out, long G, long N,
                     long U, long g0, long g1) {
    (void)G;
    int32_t* lut = lookup_get();
    if (!lut) return -1;
    for (long g = g0; g < g1; g++) {
        fill_lookup(lut, keys + g * U, U);
        const uint16_t* p = pts + g * N;
        const uint16_t* r = rows16 + g * U;
        uint16_t* o = out + g * N;
        for (long i = 0; i < N; i++) o[i] = r[lut[p[i]]];
    }
    return 0;
}

/* fp32 -> bf16 bits, round to nearest even (as torch); NaN stays a quiet NaN. */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t b;
    memcpy(&b, &f, sizeof b);
    if ((b & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((b >> 16) | 0x40);
    b += 0x7FFFu + ((b >> 16) & 1u);
    return (uint16_t)(b >> 16);
}

/* out (G, N) = grad * jac[row] + scale * shared[row]: fp32 (out_kind 0) or rounded once
 * to bf16 (out_kind 1); grad of `kind`; scale (G, N) of `scale_kind`, or NULL (1). */
int edkm_element_grad(const uint16_t* pts, const int64_t* keys, const void* grad, int kind, const float* jac,
                      const float* shared, const void* scale, int scale_kind, void* out, int out_kind, long G,
                      long N, long U, long g0, long g1) {
    (void)G;
    int32_t* lut = lookup_get();
    if (!lut) return -1;
    for (long g = g0; g < g1; g++) {
        fill_lookup(lut, keys + g * U, U);
        const uint16_t* p = pts + g * N;
        const float* J = jac + g * U;
        const float* R = shared + g * U;
        for (long i = 0; i < N; i++) {
            int32_t j = lut[p[i]];
            float sh = scale ? R[j] * load_value(scale, g * N + i, scale_kind) : R[j];
            float val = load_value(grad, g * N + i, kind) * J[j] + sh;
            if (out_kind == 1)
                ((uint16_t*)out)[g * N + i] = f32_to_bf16(val);
            else
                ((float*)out)[g * N + i] = val;
        }
    }
    return 0;
}

/* Nearest centroid of every point of [g0, g1): out[g, i] = the first k minimising
 * (x - c[g, k])^2, both in fp32, x = pts[g, i] read as `kind` (exact), c (G, K) fp32; as
 * torch's sq_dist(...).argmin(-1) (`edkm.functional.packing.nearest`), except that a NaN
 * distance never wins. Points run in blocks of 64 so the loop over k vectorises across
 * points. Returns -2 unless 1 <= K <= 256. */
#define NEAREST_BLOCK 64
int edkm_nearest(const void* pts, int kind, const float* cents, int64_t* out, long G, long N, long K, long g0,
                 long g1) {
    (void)G;
    if (K < 1 || K > 256) return -2;
    for (long g = g0; g < g1; g++) {
        const float* c = cents + g * K;
        for (long i0 = 0; i0 < N; i0 += NEAREST_BLOCK) {
            long n = N - i0 < NEAREST_BLOCK ? N - i0 : NEAREST_BLOCK;
            float x[NEAREST_BLOCK], best[NEAREST_BLOCK];
            int32_t idx[NEAREST_BLOCK];
            for (long j = 0; j < n; j++) {
                x[j] = load_value(pts, g * N + i0 + j, kind);
                float d = x[j] - c[0];
                best[j] = d * d;
                idx[j] = 0;
            }
            for (long k = 1; k < K; k++) {
                float ck = c[k];
                for (long j = 0; j < n; j++) {
                    float d = x[j] - ck;
                    d = d * d;
                    int take = d < best[j];
                    best[j] = take ? d : best[j];
                    idx[j] = take ? (int32_t)k : idx[j];
                }
            }
            for (long j = 0; j < n; j++) out[g * N + i0 + j] = idx[j];
        }
    }
    return 0;
}

/* One lazy block of compensate's column sweep (`edkm.compensate._sweep`, its torch twin and
 * spec), for the rows [r0, r0 + 64) of problem b, task t = b * ceil(out / 64) + chunk, for the
 * tasks [t0, t1). Wt (B, n, out): column j of every row contiguous (updated in place over the
 * block's columns); U (B, n, n) the upper inverse factor; Ct (B, K, out) each row's LUT;
 * Qt (B, n, out) receives the chosen values; E (B, bs, out) the scaled errors. For column j of
 * [b0, b1): key = w rounded to bf16 when round_kind is 1 (as is, 0); q = the first LUT entry
 * of least |key - c|; e = (w - q) / U[j, j]; every later column j' of the block loses
 * U[j, j'] * e (a product, then a difference: no fused multiply-add, as torch). */
#define OBS_ROWS 64
int edkm_obs_block(float* Wt, const float* U, const float* Ct, float* Qt, float* E, long B, long n, long out, long K,
                   long b0, long b1, int round_kind, long t0, long t1) {
    (void)B;
    if (K < 1 || K > 256 || b0 < 0 || b1 > n || b1 <= b0 || (round_kind != 0 && round_kind != 1)) return -2;
    long chunks = (out + OBS_ROWS - 1) / OBS_ROWS, bs = b1 - b0;
    for (long t = t0; t < t1; t++) {
        long b = t / chunks, r0 = (t % chunks) * OBS_ROWS;
        long m = out - r0 < OBS_ROWS ? out - r0 : OBS_ROWS;
        float* W = Wt + b * n * out + r0;
        const float* Ub = U + b * n * n;
        const float* C = Ct + b * K * out + r0;
        float* Q = Qt + b * n * out + r0;
        float* Eb = E + b * bs * out + r0;
        for (long j = b0; j < b1; j++) {
            float* w = W + j * out;
            float e[OBS_ROWS], key[OBS_ROWS], best[OBS_ROWS], q[OBS_ROWS];
            for (long r = 0; r < m; r++) {
                float x = w[r];
                if (round_kind == 1) {
                    uint16_t h = f32_to_bf16(x);
                    x = bits_to_f32((uint32_t)h << 16);
                }
                key[r] = x;
                best[r] = fabsf(x - C[r]);
                q[r] = C[r];
            }
            for (long k = 1; k < K; k++) {
                const float* ck = C + k * out;
                for (long r = 0; r < m; r++) {
                    float d = fabsf(key[r] - ck[r]);
                    int take = d < best[r];
                    best[r] = take ? d : best[r];
                    q[r] = take ? ck[r] : q[r];
                }
            }
            float ujj = Ub[j * n + j];
            for (long r = 0; r < m; r++) {
                Q[j * out + r] = q[r];
                e[r] = (w[r] - q[r]) / ujj;
                Eb[(j - b0) * out + r] = e[r];
            }
            for (long jj = j + 1; jj < b1; jj++) {
                float u = Ub[j * n + jj];
                float* wj = W + jj * out;
                for (long r = 0; r < m; r++) {
                    float p = u * e[r];
                    wj[r] = wj[r] - p;
                }
            }
        }
    }
    return 0;
}
