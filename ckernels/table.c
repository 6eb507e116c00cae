/* Table passes of uniquified DKM on the CPU (d = 1, fp32): the iterations with the row
 * values, and the backward through the final map and every iteration.
 *
 * The math is that of the torch twin, `edkm.functional.passes` (table_forward and
 * table_bwd), which is the spec the tests hold these kernels to. In torch form, for one
 * group with table rows v (U,), masses n (U,) and centroids C_t (K,):
 *
 *     a_t  = softmax(-(v[:, None] - C_{t-1})**2 / tau, dim=1)             # (U, K)
 *     C_t  = where(den >= MIN_MASS, (n a_t v).sum(0) / den, C_{t-1}),  den = (n a_t).sum(0)
 *     rows = a_T @ C_T                                                    # the final map is a_T
 *     backward: see kernels/table_bwd.py (the Triton kernel of the same math).
 *
 * How it runs: one call handles the groups [g0, g1) (the Python launcher spreads groups
 * over threads); rows go in blocks of LANES, the centroid loop outside and the lane loop
 * inside, so the compiler vectorises across rows without reordering any sum. exp is
 * `exp_neg` below. The map of the last iteration is kept in a (U, K) scratch per group
 * (the final map of the forward, the first map of the backward), so a forward evaluates T
 * maps and a backward T.
 *
 * Window: a softmax entry whose logit is more than EXP_FLOOR below its row's maximum is
 * exactly 0 here (exp_neg flushes it; the torch path gets 0 or an fp32 denormal, below
 * 1.2e-38 of the row's largest entry). Each pass sorts the K centroids (a permutation; the
 * results go back to the centroids' own order); with sorted centroids a row's non-zero
 * entries are consecutive, so a block of rows needs only the centroids from the first live
 * one of its smallest row to the last live one of its largest (see block_map), and the
 * distances, exps, sums and gradients run on that range. The table's rows are sorted by
 * value (16-bit patterns in order), so a block spans a small range: 82% of the map is
 * exactly 0 for SmolLM2 at 4 bits (bench.sparsity).
 *
 * Limits: K <= KMAX; fp32 contiguous arrays (the launcher checks).
 */
#include <float.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "scratch.h"

#define LANES 16
#define KMAX 256
#define MIN_MASS 1e-6f        /* edkm.functional.iterations.MIN_MASS */
#define EXP_FLOOR (-87.33f)   /* exp(x) < FLT_MIN (1.18e-38) below this: flushed to 0 */

/* exp(x) for x <= 0, within ~2 ulp of expf: 2^(x log2 e) = 2^n 2^f, |f| <= 1/2, with
 * 2^f = e^(f ln 2) as its degree-7 Taylor polynomial (truncation < 2e-9 relative). Below
 * EXP_FLOOR the result is 0. Branch-free, so loops of it vectorise. */
static inline float exp_neg(float x) {
    float y = (x < EXP_FLOOR ? EXP_FLOOR : x) * 1.44269504088896341f;
    float n = (y + 12582912.0f) - 12582912.0f; /* round to nearest: 1.5 * 2^23 */
    float t = (y - n) * 0.693147180559945309f;
    float p = 1.0f + t * (1.0f + t * (0.5f + t * (1.66666667e-1f + t * (4.16666667e-2f
              + t * (8.33333333e-3f + t * (1.38888889e-3f + t * 1.98412698e-4f))))));
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x < EXP_FLOOR ? 0.0f : p * scale;
}

/* Sort K centroids: cs = c[perm] in increasing order (insertion sort; K <= KMAX). */
static void sort_centroids(const float* c, long K, int perm[KMAX], float cs[KMAX]) {
    for (long k = 0; k < K; k++) {
        long i = k;
        while (i > 0 && c[perm[i - 1]] > c[k]) {
            perm[i] = perm[i - 1];
            i--;
        }
        perm[i] = (int)k;
    }
    for (long k = 0; k < K; k++) cs[k] = c[perm[k]];
}

/* Gather an original-order K-vector into sorted order: out[k] = src[perm[k]]. */
static void to_sorted(const float* src, const int perm[KMAX], long K, float out[KMAX]) {
    for (long k = 0; k < K; k++) out[k] = src[perm[k]];
}

/* The live range [lo, hi] of sorted centroids cs for one row x: entries whose logit is at
 * least EXP_FLOOR above the row's maximum. The maximum is at the nearest centroid (found by
 * bisection; |fl(x - c)| orders the logits as block_map computes them) and the live entries
 * are consecutive around it, so the scan stops at the first dead one on each side. */
static void live_range(float x, const float* cs, long K, float inv_tau, long* lo, long* hi) {
    long a = 0, b = K;
    while (a < b) { /* a: the first centroid >= x (K if none) */
        long mid = (a + b) / 2;
        if (cs[mid] < x) a = mid + 1;
        else b = mid;
    }
    long m = a == K || (a > 0 && x - cs[a - 1] <= cs[a] - x) ? a - 1 : a;
    float dm = x - cs[m], zmax = -(dm * dm) * inv_tau;
    long first = m, last = m;
    while (first > 0) {
        float d = x - cs[first - 1];
        if (-(d * d) * inv_tau - zmax < EXP_FLOOR) break;
        first--;
    }
    while (last < K - 1) {
        float d = x - cs[last + 1];
        if (-(d * d) * inv_tau - zmax < EXP_FLOOR) break;
        last++;
    }
    *lo = first;
    *hi = last;
}

/* One block of rows: load LANES rows from j0 (padding lanes repeat the last row), find the
 * block's window [*lo, *hi) of the sorted centroids cs and compute the map a[k][l] and
 * diff[k][l] = x_l - cs[k] on it (the map is exactly 0 outside).
 *
 * The window: with sorted centroids a row's live entries are consecutive and their range
 * moves right as the row's value grows (z_k - z_j is linear in x with slope 2 (c_k - c_j) /
 * tau; a centroid dead at x_min below the nearest one only falls further behind as x grows),
 * so every row of the block lives within [lo(x_min), hi(x_max)]. Rounding can move only an
 * entry whose logit is within a few ulp of EXP_FLOOR below its row's maximum, i.e. one of
 * ~1.2e-38 of the row's largest, which torch's expf turns into a denormal too. No margin
 * (a margin of one index on each side cost 20% of the table passes and changed no output
 * bit on a SmolLM2 step's captured tables). Each lane's maximum (at its nearest centroid) is
 * inside, so zmax, the exps and the normalisation are those of the full loop over K. */
static void block_map(const float* v, long U, long j0, long K, const float* cs, float inv_tau,
                      float x[LANES], float diff[restrict KMAX][LANES], float a[restrict KMAX][LANES], long* lo,
                      long* hi) {
    float zmax[LANES], s[LANES], xmin = FLT_MAX, xmax = -FLT_MAX;
    for (int l = 0; l < LANES; l++) {
        long j = j0 + l < U ? j0 + l : U - 1;
        x[l] = v[j];
        s[l] = 0.0f;
        xmin = x[l] < xmin ? x[l] : xmin;
        xmax = x[l] > xmax ? x[l] : xmax;
    }
    long lo_min, hi_min, lo_max, hi_max;
    live_range(xmin, cs, K, inv_tau, &lo_min, &hi_min);
    live_range(xmax, cs, K, inv_tau, &lo_max, &hi_max);
    long first = lo_min, last = hi_max;
    float xl[LANES]; /* a local copy: x may alias diff and a for all the compiler knows */
    memcpy(xl, x, sizeof xl);
    /* zmax = -(min_k d_k^2) / tau, the same float as max_k z_k (rounding is monotone). The
     * minimum runs on the bit patterns of d^2 >= 0, which order as the values do: an integer
     * min vectorises, a float select with IEEE semantics did not (GCC 12). */
    int32_t dmin[LANES];
    for (int l = 0; l < LANES; l++) dmin[l] = INT32_MAX;
    for (long k = first; k <= last; k++) {
        float ck = cs[k];
        for (int l = 0; l < LANES; l++) {
            float d = xl[l] - ck, dd = d * d;
            int32_t bits;
            memcpy(&bits, &dd, sizeof bits);
            diff[k][l] = d;
            a[k][l] = -dd * inv_tau;
            dmin[l] = bits < dmin[l] ? bits : dmin[l];
        }
    }
    for (int l = 0; l < LANES; l++) {
        float dd;
        memcpy(&dd, &dmin[l], sizeof dd);
        zmax[l] = -dd * inv_tau;
    }
    for (long k = first; k <= last; k++)
        for (int l = 0; l < LANES; l++) {
            float e = exp_neg(a[k][l] - zmax[l]);
            a[k][l] = e;
            s[l] += e;
        }
    for (int l = 0; l < LANES; l++) s[l] = 1.0f / s[l];
    for (long k = first; k <= last; k++)
        for (int l = 0; l < LANES; l++) a[k][l] *= s[l];
    *lo = first;
    *hi = last + 1;
}

/* Lane weights of a block: mass of rows j0.. (0 on padding lanes). */
static void block_load(const float* src, long U, long j0, float out[LANES]) {
    for (int l = 0; l < LANES; l++) out[l] = j0 + l < U ? src[j0 + l] : 0.0f;
}

/* Keep a block's map (window only) in the (blocks, K, LANES) scratch. */
static void keep_map(float* scratch, long b, long K, long lo, long hi, float a[KMAX][LANES], long* wlo, long* whi) {
    wlo[b] = lo;
    whi[b] = hi;
    for (long k = lo; k < hi; k++) memcpy(scratch + (b * K + k) * LANES, a[k], sizeof(float) * LANES);
}

static void load_map(const float* scratch, long b, long K, const long* wlo, const long* whi,
                     float a[KMAX][LANES], long* lo, long* hi) {
    *lo = wlo[b];
    *hi = whi[b];
    for (long k = *lo; k < *hi; k++) memcpy(a[k], scratch + (b * K + k) * LANES, sizeof(float) * LANES);
}

/* The (KMAX, LANES) block arrays of one call, on the heap (about 100 KB: more than some
 * platforms give a thread's stack, e.g. musl's 128 KB), one per thread (scratch.h). */
typedef struct {
    float diff[KMAX][LANES], a[KMAX][LANES], acc1[KMAX][LANES], acc2[KMAX][LANES], ga[KMAX][LANES];
} Work;

/* Scratch for one group's kept map: (blocks, K, LANES) floats and two window arrays. */
typedef struct {
    float* map;
    long* lo;
    long* hi;
} Scratch;

static _Thread_local Buf work_buf, map_buf, lo_buf, hi_buf;

/* This thread's Work and a scratch for U rows (scratch.h); NULL when out of memory. */
static Work* work_get(Scratch* s, long U, long K) {
    long blocks = (U + LANES - 1) / LANES;
    Work* w = (Work*)buf_get(&work_buf, sizeof(Work), 0);
    s->map = (float*)buf_get(&map_buf, sizeof(float) * (size_t)(blocks * K * LANES), 0);
    s->lo = (long*)buf_get(&lo_buf, sizeof(long) * (size_t)blocks, 0);
    s->hi = (long*)buf_get(&hi_buf, sizeof(long) * (size_t)blocks, 0);
    return w && s->map && s->lo && s->hi ? w : NULL;
}

static void work_trim(void) {
    buf_trim(&map_buf);
    buf_trim(&lo_buf);
    buf_trim(&hi_buf);
}

/* Forward: T iterations on groups [g0, g1) and, when rows is not NULL, the row values
 * rows = a_T @ C_T. values, mass (G, U); c0 (G, K); c_hist (G, T+1, K); den_hist (G, T, K);
 * rows (G, U). Returns 0, or -1 when scratch memory could not be allocated. */
int edkm_table_forward(const float* values, const float* mass, const float* c0, float* c_hist, float* den_hist,
                       float* rows, long g0, long g1, long U, long K, long T, float tau) {
    if (K > KMAX || K < 1 || T < 1) return -2;
    Scratch sc;
    Work* w = work_get(&sc, rows ? U : 1, K);
    if (!w) return -1;
    float inv_tau = 1.0f / tau;
    float x[LANES], m[LANES];
    float(*diff)[LANES] = w->diff, (*a)[LANES] = w->a;
    for (long g = g0; g < g1; g++) {
        const float* v = values + g * U;
        const float* n = mass + g * U;
        float* hist = c_hist + g * (T + 1) * K;
        memcpy(hist, c0 + g * K, sizeof(float) * K);
        int perm[KMAX];
        float cs[KMAX];
        for (long t = 0; t < T; t++) {
            const float* c = hist + t * K;
            sort_centroids(c, K, perm, cs);
            float(*num)[LANES] = w->acc1, (*den)[LANES] = w->acc2;
            memset(num, 0, sizeof(float) * K * LANES);
            memset(den, 0, sizeof(float) * K * LANES);
            int keep = rows && t == T - 1;
            for (long j0 = 0, b = 0; j0 < U; j0 += LANES, b++) {
                long lo, hi;
                block_map(v, U, j0, K, cs, inv_tau, x, diff, a, &lo, &hi);
                block_load(n, U, j0, m);
                for (long k = lo; k < hi; k++)
                    for (int l = 0; l < LANES; l++) {
                        float wt = a[k][l] * m[l];
                        num[k][l] += wt * x[l];
                        den[k][l] += wt;
                    }
                if (keep) keep_map(sc.map, b, K, lo, hi, a, sc.lo, sc.hi);
            }
            float* c_new = hist + (t + 1) * K;
            float* dh = den_hist + (g * T + t) * K;
            for (long k = 0; k < K; k++) { /* k: sorted index; perm[k]: the centroid's own */
                float nu = 0.0f, de = 0.0f;
                for (int l = 0; l < LANES; l++) {
                    nu += num[k][l];
                    de += den[k][l];
                }
                dh[perm[k]] = de;
                c_new[perm[k]] = de < MIN_MASS ? cs[k] : nu / de;
            }
        }
        if (!rows) continue;
        float c_last[KMAX]; /* C_T in the order the kept map (of C_{T-1}) was sorted */
        to_sorted(hist + T * K, perm, K, c_last);
        for (long j0 = 0, b = 0; j0 < U; j0 += LANES, b++) {
            long lo, hi;
            load_map(sc.map, b, K, sc.lo, sc.hi, a, &lo, &hi);
            float h[LANES] = {0};
            for (long k = lo; k < hi; k++)
                for (int l = 0; l < LANES; l++) h[l] += a[k][l] * c_last[k];
            for (int l = 0; l < LANES && j0 + l < U; l++) rows[g * U + j0 + l] = h[l];
        }
    }
    work_trim();
    return 0;
}

/* Backward on groups [g0, g1): jac = dh/dv per row with C_{T-1}, C_T fixed, and
 * shared = R / mass (R: the gradient through the centroids of every iteration; 0 where
 * mass is 0). values, mass, seg (G, U); c_hist (G, T+1, K); den_hist (G, T, K); jac,
 * shared (G, U). Returns 0, or -1 when scratch memory could not be allocated. */
int edkm_table_bwd(const float* values, const float* mass, const float* seg, const float* c_hist,
                   const float* den_hist, float* jac, float* shared, long g0, long g1, long U, long K, long T,
                   float tau) {
    if (K > KMAX || K < 1 || T < 1) return -2;
    Scratch sc;
    Work* w = work_get(&sc, U, K);
    if (!w) return -1;
    float inv_tau = 1.0f / tau, k2 = 2.0f / tau;
    float x[LANES], m[LANES], sv[LANES];
    float(*diff)[LANES] = w->diff, (*a)[LANES] = w->a;
    for (long g = g0; g < g1; g++) {
        const float* v = values + g * U;
        const float* n = mass + g * U;
        const float* hist = c_hist + g * (T + 1) * K;
        float* r = shared + g * U;
        float g_c[KMAX], g_map[KMAX];
        /* final map h = a(v; C_{T-1}) C_T: dL/dC_T, dL/dC_{T-1} through the map, jac */
        int perm[KMAX];
        float c_prev[KMAX], c_last[KMAX]; /* sorted by C_{T-1}; c_last in the same order */
        {
            sort_centroids(hist + (T - 1) * K, K, perm, c_prev);
            to_sorted(hist + T * K, perm, K, c_last);
            float(*gl)[LANES] = w->acc1, (*gm)[LANES] = w->acc2;
            memset(gl, 0, sizeof(float) * K * LANES);
            memset(gm, 0, sizeof(float) * K * LANES);
            for (long j0 = 0, b = 0; j0 < U; j0 += LANES, b++) {
                long lo, hi;
                block_map(v, U, j0, K, c_prev, inv_tau, x, diff, a, &lo, &hi);
                keep_map(sc.map, b, K, lo, hi, a, sc.lo, sc.hi);
                block_load(seg + g * U, U, j0, sv);
                float h[LANES] = {0}, acd[LANES] = {0}, ad[LANES] = {0};
                for (long k = lo; k < hi; k++)
                    for (int l = 0; l < LANES; l++) {
                        float ak = a[k][l];
                        h[l] += ak * c_last[k];
                        acd[l] += ak * c_last[k] * diff[k][l];
                        ad[l] += ak * diff[k][l];
                    }
                for (long k = lo; k < hi; k++)
                    for (int l = 0; l < LANES; l++) {
                        float sa = sv[l] * a[k][l];
                        gl[k][l] += sa;
                        gm[k][l] += sa * (c_last[k] - h[l]) * diff[k][l];
                    }
                for (int l = 0; l < LANES && j0 + l < U; l++) {
                    jac[g * U + j0 + l] = -k2 * (acd[l] - h[l] * ad[l]);
                    r[j0 + l] = 0.0f;
                }
            }
            for (long k = 0; k < K; k++) {
                float s1 = 0.0f, s2 = 0.0f;
                for (int l = 0; l < LANES; l++) {
                    s1 += gl[k][l];
                    s2 += gm[k][l];
                }
                g_c[perm[k]] = s1;
                g_map[perm[k]] = k2 * s2;
            }
        }
        /* iteration t = T..1: C_t = num / den of the map a(v; C_{t-1}) */
        for (long t = T; t >= 1; t--) {
            const float* den = den_hist + (g * T + t - 1) * K;
            float e_own[KMAX], e[KMAX], c_t[KMAX]; /* e: dL/dnum; dL/dden = -e C_t */
            for (long k = 0; k < K; k++) e_own[k] = den[k] >= MIN_MASS ? g_c[k] / den[k] : 0.0f;
            if (t < T) sort_centroids(hist + (t - 1) * K, K, perm, c_prev); /* t = T: sorted above */
            to_sorted(e_own, perm, K, e);
            to_sorted(hist + t * K, perm, K, c_t);
            float(*gp)[LANES] = w->acc1;
            memset(gp, 0, sizeof(float) * K * LANES);
            for (long j0 = 0, b = 0; j0 < U; j0 += LANES, b++) {
                long lo, hi;
                if (t == T) {
                    load_map(sc.map, b, K, sc.lo, sc.hi, a, &lo, &hi);
                    for (int l = 0; l < LANES; l++) x[l] = v[j0 + l < U ? j0 + l : U - 1];
                    for (long k = lo; k < hi; k++)
                        for (int l = 0; l < LANES; l++) diff[k][l] = x[l] - c_prev[k];
                } else {
                    block_map(v, U, j0, K, c_prev, inv_tau, x, diff, a, &lo, &hi);
                }
                block_load(n, U, j0, m);
                float aga[LANES] = {0}, ae[LANES] = {0}, gzd_sum[LANES] = {0};
                float(*ga)[LANES] = w->ga;
                for (long k = lo; k < hi; k++)
                    for (int l = 0; l < LANES; l++) {
                        float g_a = m[l] * e[k] * (x[l] - c_t[k]); /* dL/da = n e_k (v - C_t,k) */
                        ga[k][l] = g_a;
                        aga[l] += a[k][l] * g_a;
                        ae[l] += a[k][l] * e[k];
                    }
                for (long k = lo; k < hi; k++)
                    for (int l = 0; l < LANES; l++) {
                        float gzd = a[k][l] * (ga[k][l] - aga[l]) * diff[k][l]; /* softmax backward x diff */
                        gzd_sum[l] += gzd;
                        gp[k][l] += gzd;
                    }
                for (int l = 0; l < LANES && j0 + l < U; l++) r[j0 + l] += m[l] * ae[l] - k2 * gzd_sum[l];
            }
            for (long k = 0; k < K; k++) {
                float s = 0.0f;
                for (int l = 0; l < LANES; l++) s += gp[k][l];
                long o = perm[k];
                float pass = den[o] >= MIN_MASS ? 0.0f : g_c[o]; /* an empty centroid passes through */
                g_c[o] = k2 * s + pass + (t == T ? g_map[o] : 0.0f);
            }
        }
        for (long j = 0; j < U; j++) r[j] = n[j] > 0.0f ? r[j] / n[j] : r[j];
    }
    work_trim();
    return 0;
}
