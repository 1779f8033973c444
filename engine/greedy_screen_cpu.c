/* The tokens that can still be a row's argmax, given bf16 logits with a bound on their error.
 *
 * engine/greedy_screen.py computes a greedy step's vocabulary logits in bf16 (twice the fp32 GEMM
 * rate on CPUs with AVX512-BF16) and re-scores only the tokens this kernel returns in fp32. For
 * row r and token j the screen holds s_j (bf16, with bias[j] added here in fp32); the true fp32
 * logit lies within e_j = coef[r] * norms[j] + rel * (|s_j| + |bias[j]|) + 1e-6 of it (the caller
 * derives coef and rel). With L = max over j of (s_j - e_j), every j with s_j + e_j >= L can be the
 * argmax and no other can. Banned tokens (row r's are bans[ban_offsets[r] .. ban_offsets[r + 1]])
 * take no part: their screen values become -inf in place (the screen is the caller's scratch).
 *
 * Out: counts[r], the number of candidates, and the first min(counts[r], cap) of them in ascending
 * order in ids[r * cap ..]. A count of 0 (every value -inf or NaN) or over cap tells the caller to
 * take that row's fp32 logits whole.
 */
#include <math.h>
#include <stdint.h>

#include "cpu_vec8.h"

typedef uint16_t u16x8 __attribute__((vector_size(16), aligned(2), may_alias));
typedef uint32_t v8u __attribute__((vector_size(32)));

/* 8 bf16 values to floats: a bf16 is the upper half of the float with the same bits. */
static inline v8 load_bf16(const uint16_t *p) {
    return (v8)(__builtin_convertvector(*(const u16x8 *)p, v8u) << 16);
}

static inline float bf16_to_float(uint16_t h) {
    union { uint32_t u; float f; } x = {.u = (uint32_t)h << 16};
    return x.f;
}

static inline v8 vabs(v8 a) {
    return (v8)((v8i)a & 0x7fffffff);
}

static inline v8 vmax(v8 a, v8 b) {
    const v8i gt = a > b; /* NaN compares false: the other operand wins */
    return (v8)(((v8i)a & gt) | ((v8i)b & ~gt));
}

static void screen_row(uint16_t *s, const float *bias, const float *norms, int64_t vocab, float coef, float rel,
                       const int64_t *bans, int64_t num_bans, int64_t cap, int64_t *ids, int32_t *count) {
    for (int64_t b = 0; b < num_bans; ++b) s[bans[b]] = 0xff80; /* bf16 -inf */
    const v8 zero = {0};
    /* pass 1: the highest lower bound */
    v8 low8 = zero - INFINITY;
    int64_t j = 0;
    for (; j + 8 <= vocab; j += 8) {
        const v8 x = load_bf16(s + j), b = bias ? *(const v8 *)(bias + j) : zero;
        const v8 v = x + b, e = coef * *(const v8 *)(norms + j) + rel * (vabs(x) + vabs(b)) + 1e-6f;
        low8 = vmax(v - e, low8);
    }
    float low = -INFINITY;
    for (int k = 0; k < 8; ++k) low = low8[k] > low ? low8[k] : low;
    for (; j < vocab; ++j) {
        const float x = bf16_to_float(s[j]), b = bias ? bias[j] : 0.f;
        const float v = x + b, e = coef * norms[j] + rel * (fabsf(x) + fabsf(b)) + 1e-6f;
        low = v - e > low ? v - e : low;
    }
    int32_t n = 0;
    if (!(low > -INFINITY)) { /* every value -inf or NaN: the caller scores the row in fp32 */
        *count = 0;
        return;
    }
    /* pass 2: every token whose upper bound reaches it (-inf values never do: -inf + inf is NaN) */
    for (j = 0; j + 8 <= vocab; j += 8) {
        const v8 x = load_bf16(s + j), b = bias ? *(const v8 *)(bias + j) : zero;
        const v8 v = x + b, e = coef * *(const v8 *)(norms + j) + rel * (vabs(x) + vabs(b)) + 1e-6f;
        const v8i hit = v + e >= low;
        if ((hit[0] | hit[1] | hit[2] | hit[3] | hit[4] | hit[5] | hit[6] | hit[7]) == 0) continue;
        for (int k = 0; k < 8; ++k) {
            if (hit[k]) {
                if (n < cap) ids[n] = j + k;
                ++n;
            }
        }
    }
    for (; j < vocab; ++j) {
        const float x = bf16_to_float(s[j]), b = bias ? bias[j] : 0.f;
        const float v = x + b, e = coef * norms[j] + rel * (fabsf(x) + fabsf(b)) + 1e-6f;
        if (v + e >= low) {
            if (n < cap) ids[n] = j;
            ++n;
        }
    }
    *count = n;
}

void greedy_candidates(uint16_t *screen, int64_t row_stride, int32_t rows, int64_t vocab, const float *bias,
                       const float *norms, const float *coefs, float rel, const int64_t *ban_offsets,
                       const int64_t *bans, int64_t cap, int64_t *ids, int32_t *counts, int32_t num_threads) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int32_t r = 0; r < rows; ++r) {
        screen_row(screen + r * row_stride, bias, norms, vocab, coefs[r], rel, bans + ban_offsets[r],
                   ban_offsets[r + 1] - ban_offsets[r], cap, ids + r * cap, counts + r);
    }
}
