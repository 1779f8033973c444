/* The k best log-probabilities of each row of logits, without writing log_softmax out.
 *
 * Beam search needs log_softmax(logits) only at each row's best few tokens. torch computes the
 * whole (rows, V) log_softmax (the row read three times, written once) and top-k reads it again:
 * at 64-256 beams over a 58k vocabulary ~10 % of a translation step. Here each row comes from
 * memory once: a max pass, then a sum-of-exp pass and a selection pass that find it in L2 (a 58k
 * row is 232 KB). log_softmax(x)_i = x_i - (max + log(sum exp(x - max))), as torch's kernel has it;
 * the sum's order and exp's last bit differ (< 2 ulp each), so values agree to ~1e-6.
 *
 * Banned tokens (row r's are bans[ban_offsets[r] .. ban_offsets[r + 1]]) count in the normaliser
 * and are then excluded, as HF's logits processors act on log-probs: their logits become -inf in
 * place (the caller's buffer is scratch). Selection keeps the best k sorted (ties: lower index
 * first, -inf included, so a row with fewer than k finite values still fills k slots); a block of
 * 64 values whose max cannot enter the list costs 8 vector maxes and one compare. Without
 * normalising, k = 1 is a row argmax that reads the row once (greedy decoding).
 */
#include <math.h>
#include <stdint.h>

#include "cpu_vec8.h"

#define BLOCK 64
#define MAX_K 128 /* the caller checks k */

static inline v8 vmax(v8 a, v8 b) {
    const v8i gt = a > b; /* NaN compares false: the other operand wins */
    return (v8)(((v8i)a & gt) | ((v8i)b & ~gt));
}

static inline float hmax(v8 v) {
    float m = v[0];
    for (int j = 1; j < 8; ++j) m = v[j] > m ? v[j] : m;
    return m;
}

/* Insert x (index i) into the sorted best n (n < capacity when growing, == k when full). */
static inline void insert(float *vals, int64_t *ids, int n, float x, int64_t i) {
    int j = n - 1;
    while (j > 0 && vals[j - 1] < x) {
        vals[j] = vals[j - 1];
        ids[j] = ids[j - 1];
        --j;
    }
    vals[j] = x;
    ids[j] = i;
}

/* log(sum(exp(x))) of one row: max, then the sum of exp(x - max) (the row is in L2 by then). */
static float row_logsumexp(const float *x, int64_t vocab) {
    const v8 neg_inf = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
    v8 m8 = neg_inf;
    int64_t i = 0;
    for (; i + 8 <= vocab; i += 8) m8 = vmax(*(const v8 *)(x + i), m8);
    float m = hmax(m8);
    for (; i < vocab; ++i) m = x[i] > m ? x[i] : m;
    v8 s8 = {0};
    for (i = 0; i + 8 <= vocab; i += 8) s8 += exp_nonpos(*(const v8 *)(x + i) - m);
    float sum = hsum(s8);
    for (; i < vocab; ++i) sum += expf(x[i] - m);
    return m + logf(sum);
}

static void row_top_logprobs(float *x, int64_t vocab, const int64_t *bans, int64_t num_bans, int k,
                             int normalize, float *out_vals, int64_t *out_ids) {
    float lse = 0.f;
    if (normalize) lse = row_logsumexp(x, vocab);
    for (int64_t b = 0; b < num_bans; ++b)
        if (bans[b] >= 0 && bans[b] < vocab) x[bans[b]] = -INFINITY;

    float vals[MAX_K];
    int64_t ids[MAX_K];
    int64_t i = 0;
    for (; i < k; ++i) insert(vals, ids, (int)i + 1, x[i], i);
    float thr = vals[k - 1];
    for (; i < vocab && i % BLOCK; ++i) /* up to a block boundary one by one */
        if (x[i] > thr) {
            insert(vals, ids, k, x[i], i);
            thr = vals[k - 1];
        }
    for (; i + BLOCK <= vocab; i += BLOCK) {
        v8 b8 = *(const v8 *)(x + i);
        for (int c = 8; c < BLOCK; c += 8) b8 = vmax(*(const v8 *)(x + i + c), b8);
        if (!(hmax(b8) > thr)) continue;
        for (int c = 0; c < BLOCK; ++c)
            if (x[i + c] > thr) {
                insert(vals, ids, k, x[i + c], i + c);
                thr = vals[k - 1];
            }
    }
    for (; i < vocab; ++i)
        if (x[i] > thr) {
            insert(vals, ids, k, x[i], i);
            thr = vals[k - 1];
        }
    for (int j = 0; j < k; ++j) {
        out_vals[j] = vals[j] - lse;
        out_ids[j] = ids[j];
    }
}

/* logits (rows, vocab) fp32 with a row stride (rows are modified: bans become -inf); out_vals and
 * out_ids (rows, k) contiguous; 1 <= k <= min(vocab, MAX_K). normalize 0: the best raw logits
 * (k = 1 is argmax, lowest index among equals, as torch's). */
void top_logprobs(float *logits, int64_t row_stride, int32_t rows, int64_t vocab, const int64_t *ban_offsets,
                  const int64_t *bans, int32_t k, int32_t normalize, float *out_vals, int64_t *out_ids,
                  int32_t num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int32_t r = 0; r < rows; ++r)
        row_top_logprobs(logits + r * row_stride, vocab, bans + ban_offsets[r], ban_offsets[r + 1] - ban_offsets[r],
                         k, normalize, out_vals + (int64_t)r * k, out_ids + (int64_t)r * k);
}
