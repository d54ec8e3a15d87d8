/* Corral's CPU kernels for weights in blocks of 32 (GGUF's Q4_0, Q4_1 and Q8_0 arithmetic).

   y[m, n] = sum_k x[m, k] * w[n, k], with w in blocks of QK = 32 along k:
     Q4 (Q4_0, Q4_1): w = d * q + mn, q in 0..15   (Q4_0 stores no mins: mn = -8 d)
     Q8 (Q8_0):       w = d * q,      q in -127..127
   Each activation row is quantised per block of 32 like Q8_0: xd = max|x| / 127, xq = round(x / xd),
   so one block adds   d * xd * sum(q * xq)  +  mn * xd * sum(xq).
   The integer dot runs in SIMD lanes (maddubs: u8 x s8 -> s16 pairs, madd: -> s32), the rest in fp32.

   Weight layout, repacked at load by corral/kernels/linear.py: rows in tiles of TR = 8, and a row's
   block cut into 4-byte chunks; chunk c of the tile's eight rows side by side is one 32-byte vector:
     Q4 qs [T][nb][4 chunks][TR][4]  bytes. A row's block is 16 bytes as in GGUF (byte j: element j in the
                                     low nibble, element j + 16 in the high one), so chunk c holds
                                     elements 4c..4c+3 (low nibbles) and 16+4c..16+4c+3 (high nibbles).
     Q8 qs [T][nb][8 chunks][TR][4]  int8: chunk c holds elements 4c..4c+3.
     d, mn [T][nb][TR]               fp16
   A chunk vector times the matching 4 activation bytes broadcast (maddubs, then madd) leaves one
   int32 lane per weight row, so a tile's eight dot products finish in eight lanes with no
   horizontal sums, and the activations are read as they are (no copies per row).
   Rows past N in the last tile are zero blocks with zero scales.

   Threads: the kernels' own pool (pool.c), the same from any calling thread: a call is cut into chunks of
   independent work (rows to quantise, ranges of tiles, heads) that the caller and the awake workers take. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef void (*corral_job_fn)(void *arg, int64_t chunk, int slot);
void corral_parallel(corral_job_fn fn, void *arg, int64_t nchunks, int nthreads); /* pool.c */

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define CORRAL_AVX2 1
#include <immintrin.h>
#else
#define CORRAL_AVX2 0
#endif

#define QK 32          /* elements per block */
#define TR 8           /* weight rows per tile */
#define MXQ4 8         /* the most activation rows per pass over a Q4 tile */
#define MXQ8 8         /* and over a Q8 tile (measured: 1.06-1.15x faster than 4 at 8 rows) */
#define XCHUNK 16384   /* bytes of int8 activations per pass over the weights (stays in L1) */
/* loops over a tile's activation rows and chunks: unrolled, so the accumulators stay in registers */
#define UNROLL _Pragma("GCC unroll 8")

enum { KIND_Q4 = 0, KIND_Q8 = 1, KIND_KQ = 2 }; /* KIND_KQ: K-quant weights, kquant.c */

typedef struct {
    int kind;
    int64_t K, N, nb, T;
    const uint8_t *qs;
    const uint16_t *d, *mn; /* mn NULL: Q4_0 (mn = -8 d) or Q8 */
} weights;

typedef struct {
    int64_t M;
    const int8_t *xq; /* (M, K) */
    const float *xd;  /* (M, nb) activation block scales */
    const float *xsd; /* (M, nb) xd * sum(xq) of each block: what a block's Q4 min multiplies */
    float *y;         /* (M, N) */
} acts;

int corral_kernels_simd(void) { return CORRAL_AVX2; }

int corral_kernels_openmp(void) { return 0; } /* threads come from pool.c since the kernels left OpenMP */

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu, bits;
    float f;
    if (exp == 0) { /* zero or subnormal: man * 2^-24 */
        f = (float)man * 5.9604644775390625e-8f;
        return sign ? -f : f;
    }
    bits = exp == 31 ? (sign | 0x7F800000u | (man << 13)) : (sign | ((exp + 112u) << 23) | (man << 13));
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* ---------------------------------------------------------------- scalar reference path */

static void quant_row_scalar(const float *x, int64_t nb, int8_t *q, float *xd, float *xs) {
    for (int64_t b = 0; b < nb; b++) {
        const float *xb = x + b * QK;
        float amax = 0.0f;
        for (int i = 0; i < QK; i++) amax = fmaxf(amax, fabsf(xb[i]));
        float d = amax / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
        int sum = 0;
        for (int i = 0; i < QK; i++) {
            int v = (int)nearbyintf(xb[i] * id);
            q[b * QK + i] = (int8_t)v;
            sum += v;
        }
        xd[b] = d;
        xs[b] = (float)sum;
    }
}

/* One weight row (tile t, row r) against one activation row, with the SIMD path's arithmetic. */
static float dot_row_scalar(const weights *w, int64_t t, int r, const int8_t *xq, const float *xd, const float *xsd) {
    float acc = 0.0f;
    const int chunks = w->kind == KIND_Q4 ? 4 : 8;
    for (int64_t b = 0; b < w->nb; b++) {
        int64_t s = (t * w->nb + b) * TR + r;
        const uint8_t *p = w->qs + (t * w->nb + b) * TR * 4 * chunks + r * 4; /* chunk c at p + c * 32 */
        const int8_t *xb = xq + b * QK;
        int isum = 0;
        for (int c = 0; c < chunks; c++)
            for (int j = 0; j < 4; j++) {
                uint8_t v = p[c * TR * 4 + j];
                if (w->kind == KIND_Q4)
                    isum += (v & 0x0F) * xb[4 * c + j] + (v >> 4) * xb[16 + 4 * c + j];
                else
                    isum += (int8_t)v * xb[4 * c + j];
            }
        float d = half_to_float(w->d[s]);
        acc = fmaf((float)isum, d * xd[b], acc);
        if (w->kind == KIND_Q4) acc = fmaf(w->mn ? half_to_float(w->mn[s]) : -8.0f * d, xsd[b], acc);
    }
    return acc;
}

static void tile_scalar(const weights *w, int64_t t, const acts *a, int64_t m) {
    for (int r = 0; r < TR && t * TR + r < w->N; r++)
        a->y[m * w->N + t * TR + r] = dot_row_scalar(w, t, r, a->xq + m * w->K, a->xd + m * w->nb,
                                                     a->xsd + m * w->nb);
}

/* ---------------------------------------------------------------- AVX2 path */
#if CORRAL_AVX2

static void quant_row_avx2(const float *x, int64_t nb, int8_t *q, float *xd, float *xs) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7); /* undo the lane interleave of packs */
    for (int64_t b = 0; b < nb; b++) {
        const float *xb = x + b * QK;
        __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8);
        __m256 v2 = _mm256_loadu_ps(xb + 16), v3 = _mm256_loadu_ps(xb + 24);
        __m256 a = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v0, absmask), _mm256_and_ps(v1, absmask)),
                                 _mm256_max_ps(_mm256_and_ps(v2, absmask), _mm256_and_ps(v3, absmask)));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        float d = _mm_cvtss_f32(h) / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
        __m256 vid = _mm256_set1_ps(id);
        /* cvtps rounds to nearest even, as nearbyintf does in the scalar path */
        __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, vid)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, vid));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, vid)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, vid));
        __m256i s = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        s4 = _mm_hadd_epi32(s4, s4);
        s4 = _mm_hadd_epi32(s4, s4);
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        _mm256_storeu_si256((__m256i *)(q + b * QK), _mm256_permutevar8x32_epi32(p, order));
        xd[b] = d;
        xs[b] = (float)_mm_cvtsi128_si32(s4);
    }
}

/* y[m + i][n0 .. n0 + 7] = acc (fewer in the last tile) */
static inline __attribute__((always_inline)) void store_tile(const acts *a, int64_t N, int64_t row, int64_t n0, __m256 acc) {
    float *yrow = a->y + row * N + n0;
    if (n0 + TR <= N) {
        _mm256_storeu_ps(yrow, acc);
    } else {
        float tmp[TR];
        _mm256_storeu_ps(tmp, acc);
        for (int r = 0; n0 + r < N; r++) yrow[r] = tmp[r];
    }
}

/* 4 activation bytes (elements 4c..4c+3 of a block) in every lane */
static inline __attribute__((always_inline)) __m256i x4(const int8_t *xb, int c) {
    int32_t v;
    memcpy(&v, xb + 4 * c, sizeof v);
    return _mm256_set1_epi32(v);
}

/* One Q4 tile (8 weight rows) against mx activation rows from row m. mx is a constant after inlining, so
   the loops unroll and the accumulators stay in registers. Per block and x row: 8 maddubs whose int16
   sums add without overflow (8 x 2 x 15 x 127 < 32767), one madd, one convert, two fma. */
static inline __attribute__((always_inline)) void tile_q4(const weights *w, int64_t t, const acts *a, int64_t m,
                                                          int mx) {
    const int64_t nb = w->nb, K = w->K;
    const __m256i ones = _mm256_set1_epi16(1), low = _mm256_set1_epi8(0x0F);
    const uint16_t *dt = w->d + t * nb * TR, *mt = w->mn ? w->mn + t * nb * TR : NULL;
    const uint8_t *q = w->qs + t * nb * TR * 16;
    const int8_t *xq = a->xq + m * K;
    const float *xd = a->xd + m * nb, *xsd = a->xsd + m * nb;
    __m256 acc[MXQ4];
    UNROLL for (int i = 0; i < mx; i++) acc[i] = _mm256_setzero_ps();
    const char *next = (const char *)(q + nb * TR * 16); /* the next tile's codes: fetched while this one runs */
    for (int64_t b = 0; b < nb; b++) {
        _mm_prefetch(next + b * TR * 16, _MM_HINT_T0);
        _mm_prefetch(next + b * TR * 16 + 64, _MM_HINT_T0);
        const __m256i *qb = (const __m256i *)(q + b * TR * 16);
        __m256i lo[4], hi[4];
        UNROLL for (int c = 0; c < 4; c++) {
            __m256i v = _mm256_loadu_si256(qb + c);
            lo[c] = _mm256_and_si256(v, low);
            hi[c] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        }
        __m256 d8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dt + b * TR)));
        __m256 m8 = mt ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(mt + b * TR)))
                       : _mm256_mul_ps(d8, _mm256_set1_ps(-8.0f));
        UNROLL for (int i = 0; i < mx; i++) {
            const int8_t *xb = xq + i * K + b * QK;
            __m256i p = _mm256_add_epi16(
                _mm256_add_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo[0], x4(xb, 0)), _mm256_maddubs_epi16(hi[0], x4(xb, 4))),
                                 _mm256_add_epi16(_mm256_maddubs_epi16(lo[1], x4(xb, 1)), _mm256_maddubs_epi16(hi[1], x4(xb, 5)))),
                _mm256_add_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo[2], x4(xb, 2)), _mm256_maddubs_epi16(hi[2], x4(xb, 6))),
                                 _mm256_add_epi16(_mm256_maddubs_epi16(lo[3], x4(xb, 3)), _mm256_maddubs_epi16(hi[3], x4(xb, 7)))));
            __m256 f = _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
            acc[i] = _mm256_fmadd_ps(f, _mm256_mul_ps(d8, _mm256_set1_ps(xd[i * nb + b])), acc[i]);
            acc[i] = _mm256_fmadd_ps(m8, _mm256_set1_ps(xsd[i * nb + b]), acc[i]);
        }
    }
    UNROLL for (int i = 0; i < mx; i++) store_tile(a, w->N, m + i, t * TR, acc[i]);
}

/* One Q8 tile: maddubs takes unsigned x signed, so each chunk's weights go in as |w| and their signs move
   onto the activations. A pair sum reaches 2 x 127 x 127, so every maddubs widens (madd) at once. */
static inline __attribute__((always_inline)) void tile_q8(const weights *w, int64_t t, const acts *a, int64_t m,
                                                          int mx) {
    const int64_t nb = w->nb, K = w->K;
    const __m256i ones = _mm256_set1_epi16(1);
    const uint16_t *dt = w->d + t * nb * TR;
    const uint8_t *q = w->qs + t * nb * TR * 32;
    const int8_t *xq = a->xq + m * K;
    const float *xd = a->xd + m * nb;
    __m256 acc[MXQ8];
    UNROLL for (int i = 0; i < mx; i++) acc[i] = _mm256_setzero_ps();
    const char *next = (const char *)(q + nb * TR * 32);
    for (int64_t b = 0; b < nb; b++) {
        UNROLL for (int line = 0; line < 4; line++) _mm_prefetch(next + b * TR * 32 + line * 64, _MM_HINT_T0);
        const __m256i *qb = (const __m256i *)(q + b * TR * 32);
        __m256i wv[8], aw[8];
        UNROLL for (int c = 0; c < 8; c++) {
            wv[c] = _mm256_loadu_si256(qb + c);
            aw[c] = _mm256_sign_epi8(wv[c], wv[c]);
        }
        __m256 d8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dt + b * TR)));
        UNROLL for (int i = 0; i < mx; i++) {
            const int8_t *xb = xq + i * K + b * QK;
            __m256i s[8];
            UNROLL for (int c = 0; c < 8; c++)
                s[c] = _mm256_madd_epi16(_mm256_maddubs_epi16(aw[c], _mm256_sign_epi8(x4(xb, c), wv[c])), ones);
            __m256i sum = _mm256_add_epi32(_mm256_add_epi32(_mm256_add_epi32(s[0], s[1]), _mm256_add_epi32(s[2], s[3])),
                                           _mm256_add_epi32(_mm256_add_epi32(s[4], s[5]), _mm256_add_epi32(s[6], s[7])));
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(d8, _mm256_set1_ps(xd[i * nb + b])), acc[i]);
        }
    }
    UNROLL for (int i = 0; i < mx; i++) store_tile(a, w->N, m + i, t * TR, acc[i]);
}

static void tile_q4_1(const weights *w, int64_t t, const acts *a, int64_t m) { tile_q4(w, t, a, m, 1); }
static void tile_q4_2(const weights *w, int64_t t, const acts *a, int64_t m) { tile_q4(w, t, a, m, 2); }
static void tile_q4_3(const weights *w, int64_t t, const acts *a, int64_t m) { tile_q4(w, t, a, m, 3); }
static void tile_q4_4(const weights *w, int64_t t, const acts *a, int64_t m) { tile_q4(w, t, a, m, 4); }
static void tile_q4_8(const weights *w, int64_t t, const acts *a, int64_t m) { tile_q4(w, t, a, m, 8); }
static void tile_q8_1(const weights *w, int64_t t, const acts *a, int64_t m) { tile_q8(w, t, a, m, 1); }
static void tile_q8_2(const weights *w, int64_t t, const acts *a, int64_t m) { tile_q8(w, t, a, m, 2); }
static void tile_q8_3(const weights *w, int64_t t, const acts *a, int64_t m) { tile_q8(w, t, a, m, 3); }
static void tile_q8_4(const weights *w, int64_t t, const acts *a, int64_t m) { tile_q8(w, t, a, m, 4); }
static void tile_q8_8(const weights *w, int64_t t, const acts *a, int64_t m) { tile_q8(w, t, a, m, 8); }
#endif /* CORRAL_AVX2 */

/* ---------------------------------------------------------------- driver */

void corral_quantize_rows(const float *x, int64_t M, int64_t K, int8_t *q, float *xd, float *xs, int simd) {
    int64_t nb = K / QK;
    for (int64_t m = 0; m < M; m++) {
#if CORRAL_AVX2
        if (simd) {
            quant_row_avx2(x + m * K, nb, q + m * K, xd + m * nb, xs + m * nb);
            continue;
        }
#endif
        (void)simd;
        quant_row_scalar(x + m * K, nb, q + m * K, xd + m * nb, xs + m * nb);
    }
}

typedef void (*tile_fn)(const weights *, int64_t, const acts *, int64_t);

/* Rows m..mend of one tile, in passes of the widest unrolled kernel that fits. */
static void tile_rows(const weights *w, int64_t t, const acts *a, int64_t m, int64_t mend, int simd) {
#if CORRAL_AVX2
    if (simd) {
        static const tile_fn q4[MXQ4 + 1] = {NULL, tile_q4_1, tile_q4_2, tile_q4_3, tile_q4_4,
                                             tile_q4_4, tile_q4_4, tile_q4_4, tile_q4_8};
        static const tile_fn q8[MXQ8 + 1] = {NULL, tile_q8_1, tile_q8_2, tile_q8_3, tile_q8_4, tile_q8_4, tile_q8_4, tile_q8_4, tile_q8_8};
        const tile_fn *fn = w->kind == KIND_Q4 ? q4 : q8;
        const int64_t widest = w->kind == KIND_Q4 ? MXQ4 : MXQ8;
        while (m < mend) {
            int64_t n = mend - m < widest ? mend - m : widest;
            n = n > 4 && n < 8 ? 4 : n; /* 5..7 rows: a pass of 4, then the rest */
            fn[n](w, t, a, m);
            m += n;
        }
        return;
    }
#endif
    (void)simd;
    for (; m < mend; m++) tile_scalar(w, t, a, m);
}

/* One call's work in chunks: first rows of activations to quantise, then ranges of weight tiles against all
   rows, in passes of rows small enough to stay in L1. */
typedef struct {
    const weights *w;
    const float *x;
    const acts *a;
    int simd;
    int64_t rows_per_chunk, tiles_per_chunk;
} matmul_job;

static void quantize_chunk(void *arg, int64_t k, int slot) {
    const matmul_job *j = arg;
    const acts *a = j->a;
    int64_t nb = j->w->nb, m0 = k * j->rows_per_chunk, m1 = m0 + j->rows_per_chunk < a->M ? m0 + j->rows_per_chunk : a->M;
    float *xsd = (float *)a->xsd;
    (void)slot;
    corral_quantize_rows(j->x + m0 * j->w->K, m1 - m0, j->w->K, (int8_t *)a->xq + m0 * j->w->K, (float *)a->xd + m0 * nb,
                         xsd + m0 * nb, j->simd);
    for (int64_t i = m0 * nb; i < m1 * nb; i++) xsd[i] *= a->xd[i]; /* sums -> xd * sum */
}

static void tiles_chunk(void *arg, int64_t k, int slot) {
    const matmul_job *j = arg;
    const weights *w = j->w;
    const acts *a = j->a;
    int64_t t0 = k * j->tiles_per_chunk, t1 = t0 + j->tiles_per_chunk < w->T ? t0 + j->tiles_per_chunk : w->T;
    int64_t rows = (XCHUNK / w->K) & ~(int64_t)7;
    rows = rows < 8 ? 8 : rows;
    (void)slot;
    for (int64_t mc = 0; mc < a->M; mc += rows) {
        int64_t mend = mc + rows < a->M ? mc + rows : a->M;
        for (int64_t t = t0; t < t1; t++) tile_rows(w, t, a, mc, mend, j->simd);
    }
}

/* y (M, N) = x (M, K) @ w.T. kind: 0 = Q4 (mn NULL means Q4_0), 1 = Q8. nthreads: the most threads to use
   (the caller passes torch.get_num_threads()); small products run on one, where waking a second costs
   more than it saves. simd: 0 forces the scalar path. Returns 0, or -1 if memory ran out. */
int corral_matmul(int kind, const float *x, int64_t M, int64_t K, int64_t N, const uint8_t *qs, const uint16_t *d,
                  const uint16_t *mn, float *y, int nthreads, int simd, int64_t min_work_per_thread) {
    int64_t nb = K / QK, T = (N + TR - 1) / TR;
    weights w = {kind, K, N, nb, T, qs, d, kind == KIND_Q4 ? mn : NULL};
    int64_t work = M * N * K, nt = nthreads < 1 ? 1 : nthreads;
    if (min_work_per_thread > 0 && work / min_work_per_thread < nt) nt = work / min_work_per_thread;
    if (nt > T) nt = T;
    if (nt < 1) nt = 1;
#if CORRAL_AVX2
    simd = simd != 0;
#else
    simd = 0;
#endif
    /* one allocation: xq (M, K) int8 | xd, xsd (M, nb) fp32 */
    size_t xq_bytes = ((size_t)(M * K) + 63) & ~(size_t)63;
    char *buf = malloc(xq_bytes + sizeof(float) * 2 * (size_t)(M * nb));
    if (!buf) return -1;
    float *xd = (float *)(buf + xq_bytes), *xsd = xd + M * nb;
    acts a = {M, (const int8_t *)buf, xd, xsd, y};
    /* a few chunks per thread, so a thread that lost its core leaves its share to the others */
    int64_t chunks = nt == 1 ? 1 : (4 * nt < T ? 4 * nt : T);
    matmul_job job = {&w, x, &a, simd, (M + nt - 1) / nt, (T + chunks - 1) / chunks};
    corral_parallel(quantize_chunk, &job, (M + job.rows_per_chunk - 1) / job.rows_per_chunk, (int)nt);
    corral_parallel(tiles_chunk, &job, (T + job.tiles_per_chunk - 1) / job.tiles_per_chunk, (int)nt);
    free(buf);
    return 0;
}

/* The same for a module's weights described once: desc = {kind, K, N, qs, d, mn, min_work_per_thread}
   (pointers as integers; KIND_KQ descriptors go to kquant.c). Six arguments instead of twelve: ctypes converts each one on every call. */
int corral_kq_linear(const int64_t *desc, const float *x, int64_t M, float *y, int nthreads, int simd); /* kquant.c */

int corral_linear(const int64_t *desc, const float *x, int64_t M, float *y, int nthreads, int simd) {
    if (desc[0] == KIND_KQ) return corral_kq_linear(desc, x, M, y, nthreads, simd);
    return corral_matmul((int)desc[0], x, M, desc[1], desc[2], (const uint8_t *)(intptr_t)desc[3],
                         (const uint16_t *)(intptr_t)desc[4], (const uint16_t *)(intptr_t)desc[5], y, nthreads,
                         simd, desc[6]);
}

/* ---- one decode step of grouped-query attention (one sequence, one new token, fp32) ---------------------
   At batch 1 the attention of a small model is a dozen tiny torch ops per layer (rotate, transpose, cache
   write, SDPA, reshape), each costing more in dispatch than in arithmetic; this does the step in one call.
   qkv: [n_heads*hd | n_kv*hd | n_kv*hd], the fused projection of the token. cs, sn: the hd/2 cos and sin of
   its angles. kc, vc: the layer's cache for this sequence, n_kv heads `head_stride` floats apart, one position
   every hd floats. Rotates q and k by adjacent pairs (Meta's layout), stores k and v at `pos`, and writes
   y[h*hd + d] = sum_{s<=pos} softmax_s(q_h . k_{g,s} / sqrt(hd)) v_{g,s}[d] with g = h / (n_heads / n_kv). */
static float dot_f32(const float *a, const float *b, int n) {
    int i = 0;
    float sum = 0.0f;
#if CORRAL_AVX2
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    sum = _mm_cvtss_f32(lo);
#endif
    for (; i < n; i++)
        sum += a[i] * b[i];
    return sum;
}

static void rotate_pairs(const float *x, const float *cs, const float *sn, int hd, float *out) {
    for (int i = 0; i < hd / 2; i++) {
        float a = x[2 * i], b = x[2 * i + 1];
        out[2 * i] = a * cs[i] - b * sn[i];
        out[2 * i + 1] = a * sn[i] + b * cs[i];
    }
}

/* Cached keys and values are float32 (kv_half 0) or float16 (kv_half 1, AVX2 builds only: half the bytes to
   read, which is what batched decode over a long context is bound by). Offsets below count elements. */
static inline float kv_at(const void *base, int64_t i, int kv_half) {
#if CORRAL_AVX2
    if (kv_half)
        return _cvtsh_ss(((const uint16_t *)base)[i]);
#endif
    return ((const float *)base)[i];
}

#if CORRAL_AVX2
static inline __m256 kv_load8(const void *base, int64_t i, int kv_half) {
    if (kv_half)
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)base + i)));
    return _mm256_loadu_ps((const float *)base + i);
}
#endif

static void kv_store(void *base, int64_t i, const float *x, int n, int kv_half) {
#if CORRAL_AVX2
    if (kv_half) {
        int j = 0;
        for (; j + 8 <= n; j += 8)
            _mm_storeu_si128((__m128i *)((uint16_t *)base + i + j), _mm256_cvtps_ph(_mm256_loadu_ps(x + j), 0));
        for (; j < n; j++)
            ((uint16_t *)base)[i + j] = _cvtss_sh(x[j], 0);
        return;
    }
#endif
    memcpy((float *)base + i, x, sizeof(float) * n);
}

/* q . k_t / sqrt(hd) for t in [0, n): four keys per pass share one horizontal reduction. */
static void scores_kv(const float *q, const void *k, int64_t n, int hd, float scale, int kv_half, float *s) {
    int64_t t = 0;
#if CORRAL_AVX2
    if (hd % 8 == 0) {
        for (; t + 4 <= n; t += 4) {
            const int64_t k0 = t * hd;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int i = 0; i < hd; i += 8) {
                __m256 qv = _mm256_loadu_ps(q + i);
                a0 = _mm256_fmadd_ps(qv, kv_load8(k, k0 + i, kv_half), a0);
                a1 = _mm256_fmadd_ps(qv, kv_load8(k, k0 + hd + i, kv_half), a1);
                a2 = _mm256_fmadd_ps(qv, kv_load8(k, k0 + 2 * hd + i, kv_half), a2);
                a3 = _mm256_fmadd_ps(qv, kv_load8(k, k0 + 3 * hd + i, kv_half), a3);
            }
            __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
            __m128 sum = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
            _mm_storeu_ps(s + t, _mm_mul_ps(sum, _mm_set1_ps(scale)));
        }
    }
#endif
    for (; t < n; t++) {
        float acc = 0.0f;
        for (int i = 0; i < hd; i++)
            acc += q[i] * kv_at(k, t * hd + i, kv_half);
        s[t] = acc * scale;
    }
}

/* out = sum_t p[t] v_t; for head_dim 64 the eight output vectors stay in registers across all keys. */
static void weighted_sum_kv(const float *p, const void *v, int64_t n, int hd, int kv_half, float *out) {
#if CORRAL_AVX2
    if (hd == 64) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
        for (int64_t t = 0; t < n; t++) {
            const int64_t o = t * 64;
            __m256 w = _mm256_set1_ps(p[t]);
            a0 = _mm256_fmadd_ps(w, kv_load8(v, o, kv_half), a0);
            a1 = _mm256_fmadd_ps(w, kv_load8(v, o + 8, kv_half), a1);
            a2 = _mm256_fmadd_ps(w, kv_load8(v, o + 16, kv_half), a2);
            a3 = _mm256_fmadd_ps(w, kv_load8(v, o + 24, kv_half), a3);
            a4 = _mm256_fmadd_ps(w, kv_load8(v, o + 32, kv_half), a4);
            a5 = _mm256_fmadd_ps(w, kv_load8(v, o + 40, kv_half), a5);
            a6 = _mm256_fmadd_ps(w, kv_load8(v, o + 48, kv_half), a6);
            a7 = _mm256_fmadd_ps(w, kv_load8(v, o + 56, kv_half), a7);
        }
        _mm256_storeu_ps(out, a0);
        _mm256_storeu_ps(out + 8, a1);
        _mm256_storeu_ps(out + 16, a2);
        _mm256_storeu_ps(out + 24, a3);
        _mm256_storeu_ps(out + 32, a4);
        _mm256_storeu_ps(out + 40, a5);
        _mm256_storeu_ps(out + 48, a6);
        _mm256_storeu_ps(out + 56, a7);
        return;
    }
#endif
    memset(out, 0, sizeof(float) * hd);
    for (int64_t t = 0; t < n; t++)
        for (int i = 0; i < hd; i++)
            out[i] += p[t] * kv_at(v, t * hd + i, kv_half);
}

/* e^x for eight lanes (Cephes' expf polynomial after x = n ln2 + r, |r| <= ln2 / 2; within 2 ulp of expf).
   A block's SwiGLU and every softmax call it per element, and scalar expf cost as much as the attention
   arithmetic of a short batched decode. x is clamped to [-87.3, 88.37]: the result stays normal and finite. */
#if CORRAL_AVX2
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.37f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

/* s[t] = e^(s[t] - best) for t < n; returns their sum. */
static float exp_shifted(float *s, int64_t n, float best) {
    int64_t t = 0;
    float total = 0.0f;
#if CORRAL_AVX2
    __m256 acc = _mm256_setzero_ps(), b = _mm256_set1_ps(best);
    for (; t + 8 <= n; t += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), b));
        _mm256_storeu_ps(s + t, e);
        acc = _mm256_add_ps(acc, e);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, acc);
    for (int i = 0; i < 8; i++)
        total += lanes[i];
#endif
    for (; t < n; t++) {
        s[t] = expf(s[t] - best);
        total += s[t];
    }
    return total;
}

/* x[i] = e^x[i] in place, as the softmax computes it; returns the sum (exposed for the tests). */
float corral_exp_inplace(float *x, int64_t n) { return exp_shifted(x, n, 0.0f); }

/* out[i] = silu(gate[i]) * up[i] = gate / (1 + e^-gate) * up */
static void swiglu(const float *gate, const float *up, int64_t n, float *out) {
    int64_t i = 0;
#if CORRAL_AVX2
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        __m256 g = _mm256_loadu_ps(gate + i);
        __m256 sig = _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, g)));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(g, sig), _mm256_loadu_ps(up + i)));
    }
#endif
    for (; i < n; i++)
        out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

/* One head of one row: rotate q, score every cached position, softmax, weighted sum of values. */
static void attend_head(const float *q, const float *cs, const float *sn, const void *kh, const void *vh, int hd,
                        int64_t pos, float scale, int kv_half, float *s, float *qh, float *out) {
    rotate_pairs(q, cs, sn, hd, qh);
    scores_kv(qh, kh, pos + 1, hd, scale, kv_half, s);
    float best = -INFINITY;
    for (int64_t t = 0; t <= pos; t++)
        best = s[t] > best ? s[t] : best;
    const float inv = 1.0f / exp_shifted(s, pos + 1, best);
    for (int64_t t = 0; t <= pos; t++)
        s[t] *= inv;
    weighted_sum_kv(s, vh, pos + 1, hd, kv_half, out);
}

/* The heads of a decode step in chunks of ATTN_CHUNK (row b = j / n_heads, head h = j % n_heads). */
#define ATTN_CHUNK 8
typedef struct {
    const float *qkv, *cs, *sn;
    void *kc, *vc;
    int64_t row_stride, head_stride;
    int n_heads, hd, group, half;
    int64_t qkv_len;
    float scale;
    const int64_t *pos;
    float *y;
    int kv_half;
    float *scratch;
    int64_t per, jobs;
} attn_job;

static void attn_chunk(void *arg, int64_t k, int slot) {
    const attn_job *p = arg;
    float *s = p->scratch + (int64_t)slot * p->per;
    const int n_heads = p->n_heads, hd = p->hd;
    for (int64_t j = k * ATTN_CHUNK; j < p->jobs && j < (k + 1) * ATTN_CHUNK; j++) {
        int64_t b = j / n_heads;
        int h = (int)(j % n_heads);
        float *out = p->y + b * n_heads * hd + (int64_t)h * hd;
        if (p->pos[b] < 0) {
            memset(out, 0, sizeof(float) * hd);
            continue;
        }
        const int64_t at = b * p->row_stride + (h / p->group) * p->head_stride;
        const void *kh = p->kv_half ? (const void *)((const uint16_t *)p->kc + at) : (const void *)((const float *)p->kc + at);
        const void *vh = p->kv_half ? (const void *)((const uint16_t *)p->vc + at) : (const void *)((const float *)p->vc + at);
        attend_head(p->qkv + b * p->qkv_len + (int64_t)h * hd, p->cs + b * p->half, p->sn + b * p->half, kh, vh, hd,
                    p->pos[b], p->scale, p->kv_half, s + hd, s, out);
    }
}

/* B rows (sequences), one new token each, row b at position pos[b] (pos[b] < 0: an idle row, output zeros).
   Row b's qkv, cos/sin and y are at qkv + b * qkv_len, cs/sn + b * hd/2, y + b * n_heads * hd; its cache rows at
   kc/vc + b * row_stride. Each row's arithmetic does not depend on the others, so a sequence decodes to the
   same bits alone or in a batch. */
int corral_attn_decode(const float *qkv, const float *cs, const float *sn, void *kc, void *vc, int64_t row_stride,
                       int64_t head_stride, int n_heads, int n_kv, int hd, const int64_t *pos, int64_t B, float *y,
                       int nthreads, int kv_half) {
#if !CORRAL_AVX2
    if (kv_half)
        return -2; /* float16 caches need F16C; the Python side never asks a scalar build for them */
#endif
    if (hd > 512)
        return -2;
    const int group = n_heads / n_kv, half = hd / 2;
    const int64_t qkv_len = (int64_t)(n_heads + 2 * n_kv) * hd;
    const float scale = 1.0f / sqrtf((float)hd);
    int64_t longest = 0, work = 0;
    for (int64_t b = 0; b < B; b++) {
        if (pos[b] < 0)
            continue;
        longest = pos[b] > longest ? pos[b] : longest;
        work += (int64_t)n_heads * (pos[b] + 1) * hd;
        const float *k = qkv + b * qkv_len + (int64_t)n_heads * hd, *v = k + (int64_t)n_kv * hd;
        for (int g = 0; g < n_kv; g++) {
            float rotated[512];
            const int64_t at = b * row_stride + g * head_stride + pos[b] * hd;
            rotate_pairs(k + (int64_t)g * hd, cs + b * half, sn + b * half, hd, rotated);
            kv_store(kc, at, rotated, hd, kv_half);
            kv_store(vc, at, v + (int64_t)g * hd, hd, kv_half);
        }
    }
    const int64_t jobs = B * n_heads, per = longest + 1 + hd; /* scratch per thread: q rotated, then scores */
    int nt = work > (1 << 18) && nthreads > 1 ? nthreads : 1;
    float *scratch = malloc(sizeof(float) * (size_t)nt * (size_t)per);
    if (!scratch)
        return -1;
    attn_job job = {qkv, cs, sn, kc, vc, row_stride, head_stride, n_heads, hd, group, half, qkv_len, scale, pos, y,
                    kv_half, scratch, per, jobs};
    corral_parallel(attn_chunk, &job, (jobs + ATTN_CHUNK - 1) / ATTN_CHUNK, nt);
    free(scratch);
    return 0;
}

/* ---- one transformer block for cached steps (decode rows, or one sequence's tokens), fp32 --------------------
   Between its six matmuls a Llama block is a handful of row-wise steps (two RMSNorms, attention, SwiGLU, two
   residual adds). At batch 1 torch dispatches each as its own op; here the whole block is one call, the same
   arithmetic for every row whatever the batch. h (R, dim) is updated in place. Rows r: token at pos[r] of the
   cache row at kc/vc + r * row_stride (row_stride 0: all R tokens belong to one sequence), angles cs/sn + r * hd/2. */
static void rms_norm_rows(const float *x, const float *w, int64_t R, int dim, float eps, float *out) {
    for (int64_t r = 0; r < R; r++) {
        const float *xr = x + r * dim;
        float ss = dot_f32(xr, xr, dim);
        float inv = 1.0f / sqrtf(ss / (float)dim + eps);
        float *o = out + r * dim;
        for (int i = 0; i < dim; i++)
            o[i] = xr[i] * inv * w[i];
    }
}

int corral_block_step(float *h, int64_t R, int dim, const float *attn_norm, const float *ffn_norm, float eps,
                      const int64_t *wqkv, const int64_t *wo, const int64_t *w13, const int64_t *w2, const float *cs,
                      const float *sn, void *kc, void *vc, int64_t row_stride, int64_t head_stride, int n_heads,
                      int n_kv, int hd, const int64_t *pos, int hidden, int nthreads, int simd, int kv_half) {
    if (hd > 512)
        return -2;
    const int64_t qkv_len = (int64_t)(n_heads + 2 * n_kv) * hd, att = (int64_t)n_heads * hd;
    float *buf = malloc(sizeof(float) * (size_t)R * (size_t)(dim + qkv_len + att + 3 * (int64_t)hidden));
    if (!buf)
        return -1;
    float *xn = buf, *qkv = xn + R * dim, *y = qkv + R * qkv_len, *g = y + R * att, *a = g + R * 2 * hidden;
    int rc = 0;
    rms_norm_rows(h, attn_norm, R, dim, eps, xn);
    rc |= corral_linear(wqkv, xn, R, qkv, nthreads, simd);
    rc |= corral_attn_decode(qkv, cs, sn, kc, vc, row_stride, head_stride, n_heads, n_kv, hd, pos, R, y, nthreads,
                             kv_half);
    rc |= corral_linear(wo, y, R, xn, nthreads, simd);
    for (int64_t i = 0; i < R * dim; i++)
        h[i] += xn[i];
    rms_norm_rows(h, ffn_norm, R, dim, eps, xn);
    rc |= corral_linear(w13, xn, R, g, nthreads, simd);
    for (int64_t r = 0; r < R; r++)
        swiglu(g + r * 2 * hidden, g + r * 2 * hidden + hidden, hidden, a + r * hidden);
    rc |= corral_linear(w2, a, R, xn, nthreads, simd);
    for (int64_t i = 0; i < R * dim; i++)
        h[i] += xn[i];
    free(buf);
    return rc ? -1 : 0;
}
