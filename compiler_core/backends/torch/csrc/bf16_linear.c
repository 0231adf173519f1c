/* y = x @ w.T (+ bias) for float32 rows x and a weight held as bfloat16 bits, accumulated in float32.
 *
 * A bfloat16 number is the top half of a float32, so widening a weight is one shift: the products
 * are those of the float32 weight, while the memory traffic (what bounds a few-row linear) halves.
 * Outputs are split across OpenMP threads; every thread streams its own slice of weight rows once
 * and applies each loaded weight vector to up to four input rows.
 */
#include <immintrin.h>
#include <stdint.h>

static inline __m256 widen8(const uint16_t *p) {
    __m128i half = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

static inline float widen1(uint16_t bits) {
    union { uint32_t u; float f; } v = { (uint32_t)bits << 16 };
    return v.f;
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Weight elements between a load and the prefetch issued for it: 4 KiB ahead, about two rows of a
 * 1024-wide layer, far enough for the request to land before the FMAs reach it. */
#define PREFETCH_AHEAD 2048

/* Dot products of one weight row with `nrows` (1..4) input rows. Two accumulators per row keep the
 * FMA latency chain from bounding a single-row (decode) product. Always inlined with a constant
 * `nrows`, so the row loops unroll and the accumulators stay in registers. */
static inline __attribute__((always_inline)) void dot_rows(const uint16_t *w, const float *x, int64_t k, int nrows, float *out) {
    __m256 even[4], odd[4];
    for (int r = 0; r < 4; r++)
        even[r] = odd[r] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= k; i += 32) {
        _mm_prefetch((const char *)(w + i + PREFETCH_AHEAD), _MM_HINT_T0);
        for (int j = 0; j < 32; j += 16) {
            __m256 w0 = widen8(w + i + j), w1 = widen8(w + i + j + 8);
            for (int r = 0; r < nrows; r++) {
                even[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + r * k + i + j), even[r]);
                odd[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + r * k + i + j + 8), odd[r]);
            }
        }
    }
    for (; i + 8 <= k; i += 8) {
        __m256 wv = widen8(w + i);
        for (int r = 0; r < nrows; r++)
            even[r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + r * k + i), even[r]);
    }
    for (int r = 0; r < nrows; r++) {
        float s = hsum(_mm256_add_ps(even[r], odd[r]));
        for (int64_t j = i; j < k; j++)
            s += widen1(w[j]) * x[r * k + j];
        out[r] = s;
    }
}

void bf16_linear(const float *x, const uint16_t *w, const float *bias, float *y,
                 int64_t rows, int64_t n_out, int64_t k, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < n_out; n++) {
        const uint16_t *wn = w + n * k;
        const float b = bias ? bias[n] : 0.0f;
        for (int64_t r0 = 0; r0 < rows; r0 += 4) {
            int nrows = rows - r0 < 4 ? (int)(rows - r0) : 4;
            float out[4];
            switch (nrows) {
            case 1: dot_rows(wn, x + r0 * k, k, 1, out); break;
            case 2: dot_rows(wn, x + r0 * k, k, 2, out); break;
            case 3: dot_rows(wn, x + r0 * k, k, 3, out); break;
            default: dot_rows(wn, x + r0 * k, k, 4, out); break;
            }
            for (int r = 0; r < nrows; r++)
                y[(r0 + r) * n_out + n] = out[r] + b;
        }
    }
}
