/* y = x W^T (+ bias) with W held in a GGUF block format, for the few rows of a decode step.
 *
 * A batch-1 decode step reads every weight once and does two flops with it: its time is the time
 * to stream the weights. SmolLM2's GGUF stores them in Q4_1 (20 bytes per 32 weights) and its
 * embedding in Q8_0 (34 bytes); as fp32 they are 5-7x the bytes. This kernel reads the blocks
 * and converts each one in registers, once for all `rows` rows, so W never exists in fp32.
 *
 * Formats (ggml's; one row of W is `in / 32` consecutive blocks):
 *   Q4_1: fp16 d, fp16 m, 16 bytes of nibbles: w[j] = d * (qs[j] & 15) + m, w[j + 16] = d * (qs[j] >> 4) + m
 *   Q8_0: fp16 d, 32 int8: w[j] = d * qs[j]
 * A block's dot product is d * sum(x q) (+ m * sum(x), with x's block sums taken once per call):
 * the same products as x against the dequantized fp32 weights, rounded in another order.
 *
 * Work: output rows split over OpenMP threads; input rows in groups of four.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_vec8.h"

typedef uint8_t u8x16 __attribute__((vector_size(16), aligned(1), may_alias));
typedef uint8_t u8x8 __attribute__((vector_size(8), aligned(1), may_alias));
typedef int8_t i8x8 __attribute__((vector_size(8), aligned(1), may_alias));

static inline float half_to_float(const uint8_t *p) {
    _Float16 h;
    memcpy(&h, p, 2);
    return (float)h;
}

/* through 32-bit ints: GCC widens bytes with vpmovzxbd / vpmovsxbd, but converts bytes straight to
 * floats one element at a time */
static inline v8 u8_to_v8(u8x8 q) {
    return __builtin_convertvector(__builtin_convertvector(q, v8i), v8);
}

static inline v8 i8_to_v8(i8x8 q) {
    return __builtin_convertvector(__builtin_convertvector(q, v8i), v8);
}

/* A block's 32 weights, scaled by d, as four 8-float vectors; Q4_1 also gives its minimum m. */
static inline void q4_1_weights(const uint8_t *blk, v8 *w, float *m) {
    const float d = half_to_float(blk);
    *m = half_to_float(blk + 2);
    const u8x16 qs = *(const u8x16 *)(blk + 4);
    const u8x16 lo = qs & 15, hi = qs >> 4;
    w[0] = d * u8_to_v8(__builtin_shufflevector(lo, lo, 0, 1, 2, 3, 4, 5, 6, 7));
    w[1] = d * u8_to_v8(__builtin_shufflevector(lo, lo, 8, 9, 10, 11, 12, 13, 14, 15));
    w[2] = d * u8_to_v8(__builtin_shufflevector(hi, hi, 0, 1, 2, 3, 4, 5, 6, 7));
    w[3] = d * u8_to_v8(__builtin_shufflevector(hi, hi, 8, 9, 10, 11, 12, 13, 14, 15));
}

static inline void q8_0_weights(const uint8_t *blk, v8 *w) {
    const float d = half_to_float(blk);
    const i8x8 *qs = (const i8x8 *)(blk + 2);
    for (int k = 0; k < 4; ++k) w[k] = d * i8_to_v8(qs[k]);
}

/* One output row against R input rows (R <= 4 and the format: compile-time constants once inlined):
 * each block's weights are converted once, then fed to R rows' accumulators, two per row (four for
 * one row) so consecutive blocks' FMAs do not wait on each other. */
static inline __attribute__((always_inline)) void dot_row(const float *x, int64_t in, const uint8_t *row,
                                                           int64_t nb, const float *sums, int q4, int R,
                                                           float *dot) {
    v8 acc[4][2] = {{{0}}}, acc1b[2] = {{0}};
    float extra[4] = {0};
    for (int64_t b = 0; b < nb; ++b) {
        v8 w[4];
        float m = 0.f;
        if (q4)
            q4_1_weights(row + b * 20, w, &m);
        else
            q8_0_weights(row + b * 34, w);
        for (int r = 0; r < R; ++r) {
            const float *xb = x + r * in + b * 32;
            if (R == 1) {
                acc[0][0] += *(const v8 *)xb * w[0];
                acc[0][1] += *(const v8 *)(xb + 8) * w[1];
                acc1b[0] += *(const v8 *)(xb + 16) * w[2];
                acc1b[1] += *(const v8 *)(xb + 24) * w[3];
            } else {
                acc[r][0] += *(const v8 *)xb * w[0] + *(const v8 *)(xb + 16) * w[2];
                acc[r][1] += *(const v8 *)(xb + 8) * w[1] + *(const v8 *)(xb + 24) * w[3];
            }
            if (q4) extra[r] += m * sums[r * nb + b];
        }
    }
    for (int r = 0; r < R; ++r) {
        v8 a = acc[r][0] + acc[r][1];
        if (R == 1) a += acc1b[0] + acc1b[1];
        dot[r] = hsum(a) + extra[r];
    }
}

/* x's block sums, for Q4_1's m terms: sums[r * nb + b] */
static float *block_sums(const float *x, int64_t rows, int64_t in) {
    const int64_t nb = in / 32;
    float *sums = malloc(sizeof(float) * rows * nb);
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t b = 0; b < nb; ++b) {
            const float *xb = x + r * in + b * 32;
            sums[r * nb + b] = hsum(*(const v8 *)xb + *(const v8 *)(xb + 8) + *(const v8 *)(xb + 16) +
                                    *(const v8 *)(xb + 24));
        }
    return sums;
}

/* Rows go four at a time (the row's blocks stay in L1 between groups); each group size is its own
 * inlined copy, so accumulators live in registers. */
#define FOR_ROW_GROUPS(CALL)                                                         \
    for (int64_t r0 = 0; r0 < rows; r0 += 4) {                                       \
        const int64_t left = rows - r0;                                              \
        float dot[4];                                                                \
        const float *xr = x + r0 * in;                                               \
        switch (left >= 4 ? 4 : left) {                                              \
        case 1: CALL(1); break;                                                      \
        case 2: CALL(2); break;                                                      \
        case 3: CALL(3); break;                                                      \
        default: CALL(4); break;                                                     \
        }                                                                            \
        const float bo = bias ? bias[o] : 0.f;                                       \
        for (int64_t r = 0; r < (left >= 4 ? 4 : left); ++r) y[(r0 + r) * out + o] = dot[r] + bo; \
    }

void q4_1_linear(const float *x, int64_t rows, int64_t in, const uint8_t *w, int64_t out, const float *bias,
                 float *y) {
    const int64_t nb = in / 32;
    float *sums = block_sums(x, rows, in);
#define Q4_CALL(R) dot_row(xr, in, w + o * nb * 20, nb, sums + r0 * nb, 1, R, dot)
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < out; ++o) {
        FOR_ROW_GROUPS(Q4_CALL)
    }
    free(sums);
}

void q8_0_linear(const float *x, int64_t rows, int64_t in, const uint8_t *w, int64_t out, const float *bias,
                 float *y) {
    const int64_t nb = in / 32;
#define Q8_CALL(R) dot_row(xr, in, w + o * nb * 34, nb, NULL, 0, R, dot)
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < out; ++o) {
        FOR_ROW_GROUPS(Q8_CALL)
    }
}
