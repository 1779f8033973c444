/* 8-float vectors for the CPU kernels: GNU C vector types, so one source compiles to AVX2 + FMA
 * on x86-64-v3 and to pairs of SSE registers elsewhere. Header-only (static inline). */
#ifndef KVSERVE_CPU_VEC8_H
#define KVSERVE_CPU_VEC8_H

#include <stdint.h>

/* 8 floats (and 8 ints), unaligned and free to alias float */
typedef float v8 __attribute__((vector_size(32), aligned(4), may_alias));
typedef int32_t v8i __attribute__((vector_size(32), aligned(4), may_alias));

static inline float hsum(v8 v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

/* exp(x) for x <= 0 (scores minus their max), 8 at a time: Cody-Waite range reduction and
 * Cephes' degree-6 polynomial, < 2 ulp (libm's expf is one call per score). */
static inline v8 exp_nonpos(v8 x) {
    const v8 floor_ = {-87.f, -87.f, -87.f, -87.f, -87.f, -87.f, -87.f, -87.f};
    const v8i below = x < floor_; /* lanes of -1 where true: blend without branches */
    x = (v8)(((v8i)x & ~below) | ((v8i)floor_ & below));
    const v8 y = x * 1.44269504f + 0.5f;
    v8 n = __builtin_convertvector(__builtin_convertvector(y, v8i), v8);
    n += __builtin_convertvector(n > y, v8); /* truncation rounded up for y < 0: -1 makes it floor */
    const v8 r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    v8 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    const v8i two_n = (__builtin_convertvector(n, v8i) + 127) << 23;
    return p * (v8)two_n;
}

#endif
