/* Paged decode attention on CPU: one query token per sequence, K/V read in place from the cache.
 *
 * The torch reference gathers each sequence's blocks into a padded tensor and runs SDPA on it:
 * K and V cross memory three times (read, write, read again) and SDPA's CPU kernel is built for
 * long queries, not one. Here every (sequence, kv head) pair is one work item that walks its block
 * table and reads each K and V row once, for all the query heads of its group (grouped-query
 * attention without repeating K/V). Scores are exact fp32 (max-subtracted softmax, two passes
 * over a scores buffer that stays in L1/L2), so the result matches the reference to rounding.
 *
 * Layouts (row-major, fp32): q and out (tokens, num_heads, head_dim) with a row stride; caches
 * (num_blocks, block_size, num_kv_heads, head_dim); tables (num_seqs, table_stride) int32;
 * seq_lens (num_seqs) int32, keys per sequence; rows (num_seqs) int64, the q/out row of each.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../cpu_vec8.h"

#define MAX_GROUP 8 /* query heads per kv head; head_dim a multiple of 8 (the caller checks both) */

/* The next block's rows of this head into cache while the current one computes: blocks are
 * scattered, so the hardware prefetcher cannot guess them. */
static inline void prefetch_block(const float *base, int64_t token_stride, int block_size, int width) {
    for (int t = 0; t < block_size; ++t)
        for (int c = 0; c < width; c += 16) __builtin_prefetch(base + t * token_stride + c);
}

/* Scores of n consecutive keys of one block for the G query heads of the group, two keys at a
 * time: 2G independent accumulator chains, K in registers, q read from L1 as FMA operands.
 * softcap > 0: each score becomes softcap * tanh(score / softcap) (Gemma 2). */
static inline __attribute__((always_inline)) void block_scores(
    float *scores, int64_t len, const float *qh, const float *kb, int64_t token_stride, int n,
    const int G, const int dim, float scale, float softcap, float *row_max) {
    for (int t = 0; t < n; t += 2) {
        const float *k0 = kb + t * token_stride;
        const float *k1 = t + 1 < n ? k0 + token_stride : k0; /* odd tail: key t twice, 2nd dropped */
        v8 a[MAX_GROUP][2];
        for (int j = 0; j < G; ++j) a[j][0] = a[j][1] = (v8){0};
        for (int c = 0; c < dim; c += 8) {
            const v8 x0 = *(const v8 *)(k0 + c), x1 = *(const v8 *)(k1 + c);
            for (int j = 0; j < G; ++j) {
                const v8 qv = *(const v8 *)(qh + j * dim + c);
                a[j][0] += qv * x0;
                a[j][1] += qv * x1;
            }
        }
        for (int j = 0; j < G; ++j) {
            float s0 = hsum(a[j][0]) * scale, s1 = hsum(a[j][1]) * scale;
            if (softcap > 0.f) {
                s0 = softcap * tanhf(s0 / softcap);
                s1 = softcap * tanhf(s1 / softcap);
            }
            scores[j * len + t] = s0;
            row_max[j] = s0 > row_max[j] ? s0 : row_max[j];
            if (t + 1 < n) {
                scores[j * len + t + 1] = s1;
                row_max[j] = s1 > row_max[j] ? s1 : row_max[j];
            }
        }
    }
}

/* exp(score - max) in place; returns the sum. */
static inline float softmax_numerators(float *s, int len, float m) {
    v8 sum8 = {0};
    int t = 0;
    for (; t + 8 <= len; t += 8) {
        const v8 e = exp_nonpos(*(v8 *)(s + t) - m);
        *(v8 *)(s + t) = e;
        sum8 += e;
    }
    float sum = hsum(sum8);
    for (; t < len; ++t) {
        v8 x = {0};
        x[0] = s[t] - m;
        s[t] = exp_nonpos(x)[0];
        sum += s[t];
    }
    return sum;
}

/* One (sequence, kv head) work item: scores over keys begin..len-1 (all of them, or a sliding
 * window's) through the block table, softmax, then the weighted sum of V. V is read once: `dim`
 * is cut in slices narrow enough that the accumulators of all G heads for one slice stay in
 * registers while the slice walks every key. Key t's score sits at scores[j * count + t - begin]. */
static inline __attribute__((always_inline)) void attend(
    float *out, const float *qh, const float *k_cache, const float *v_cache, const int32_t *table,
    int len, int begin, int64_t token_stride, int64_t block_stride, int block_size, const int G, const int dim,
    float scale, float softcap, float *scores, float *row_max) {
    const int count = len - begin;
    for (int j = 0; j < G; ++j) row_max[j] = -INFINITY;
    /* runs of keys within one block: the first may start mid-block (a window's first key) */
    for (int t0 = begin, n; t0 < len; t0 += n) {
        const int b = t0 / block_size, off = t0 % block_size;
        n = len - t0 < block_size - off ? len - t0 : block_size - off;
        if (t0 + n < len) prefetch_block(k_cache + table[b + 1] * block_stride, token_stride, block_size, dim);
        block_scores(scores + t0 - begin, count, qh, k_cache + table[b] * block_stride + off * token_stride,
                     token_stride, n, G, dim, scale, softcap, row_max);
    }
    for (int j = 0; j < G; ++j) row_max[j] = 1.f / softmax_numerators(scores + (int64_t)j * count, count, row_max[j]);
    /* vectors of 8 per slice: 4G (or 2G) accumulators plus operands fit 16 AVX registers */
    const int slice = G <= 3 && dim % 32 == 0 ? 4 : G <= 6 && dim % 16 == 0 ? 2 : 1;
    for (int c0 = 0; c0 < dim / 8; c0 += slice) {
        v8 acc[MAX_GROUP][4];
        for (int j = 0; j < G; ++j)
            for (int c = 0; c < slice; ++c) acc[j][c] = (v8){0};
        for (int t0 = begin, n; t0 < len; t0 += n) {
            const int b = t0 / block_size, off = t0 % block_size;
            const float *vb = v_cache + table[b] * block_stride + off * token_stride + 8 * c0;
            n = len - t0 < block_size - off ? len - t0 : block_size - off;
            if (t0 + n < len)
                prefetch_block(v_cache + table[b + 1] * block_stride + 8 * c0, token_stride, block_size, 8 * slice);
            for (int t = 0; t < n; ++t) {
                const float *v = vb + t * token_stride;
                for (int j = 0; j < G; ++j) {
                    const float p = scores[(int64_t)j * count + t0 - begin + t];
                    for (int c = 0; c < slice; ++c) acc[j][c] += p * *(const v8 *)(v + 8 * c);
                }
            }
        }
        for (int j = 0; j < G; ++j)
            for (int c = 0; c < slice; ++c) *(v8 *)(out + j * dim + 8 * (c0 + c)) = acc[j][c] * row_max[j];
    }
}

#define ATTEND(G, DIM) \
    attend(o, qh, kc, vc, table, len, begin, token_stride, block_stride, block_size, G, DIM, scale, softcap, scores, \
           row_max)
#define BY_GROUP(DIM)                                                                                   \
    switch (group) {                                                                                    \
    case 1: ATTEND(1, DIM); break;                                                                      \
    case 2: ATTEND(2, DIM); break;                                                                      \
    case 3: ATTEND(3, DIM); break;                                                                      \
    case 4: ATTEND(4, DIM); break;                                                                      \
    default: ATTEND(group, DIM); break;                                                                 \
    }

/* Head dims 64 and 128 and groups 1-4 get code of their own: loops of known length that the
 * compiler unrolls, accumulators it keeps in registers. Others run the same code, slower. */
void paged_decode_attention(float *out, int64_t out_stride, const float *q, int64_t q_stride,
                            const int64_t *rows, const float *k_cache, const float *v_cache,
                            const int32_t *tables, int64_t table_stride, const int32_t *seq_lens,
                            int32_t num_seqs, int32_t num_heads, int32_t num_kv_heads,
                            int32_t head_dim, int32_t block_size, float scale, int32_t window, float softcap,
                            int32_t num_threads) {
    const int group = num_heads / num_kv_heads, dim = head_dim;
    const int64_t token_stride = (int64_t)num_kv_heads * dim, block_stride = token_stride * block_size;
    const int64_t work = (int64_t)num_seqs * num_kv_heads;
#pragma omp parallel num_threads(num_threads)
    {
        float *scores = NULL;
        int64_t capacity = 0;
        float *row_max = malloc(sizeof(float) * group);
#pragma omp for schedule(dynamic, 1)
        for (int64_t w = 0; w < work; ++w) {
            const int s = (int)(w / num_kv_heads), h = (int)(w % num_kv_heads), len = seq_lens[s];
            const int begin = window > 0 && len > window ? len - window : 0; /* keys a sliding window keeps */
            if ((int64_t)group * len > capacity) {
                capacity = (int64_t)group * len;
                free(scores);
                scores = malloc(sizeof(float) * capacity);
            }
            const int64_t head = (int64_t)h * group * dim;
            float *o = out + rows[s] * out_stride + head;
            const float *qh = q + rows[s] * q_stride + head;
            const float *kc = k_cache + (int64_t)h * dim, *vc = v_cache + (int64_t)h * dim;
            const int32_t *table = tables + s * table_stride;
            if (dim == 64)
                BY_GROUP(64)
            else if (dim == 128)
                BY_GROUP(128)
            else
                BY_GROUP(dim)
        }
        free(scores);
        free(row_max);
    }
}
