/* Corral's CPU kernels for GGUF's K-quant weights (Q4_K, Q5_K, Q6_K), read in the file's own layout.

   A K-quant row is blocks of 256 weights (ggml-common.h):
     Q4_K (144 B): fp16 d | fp16 dmin | 12 bytes of 6-bit scales sc[8] and mins mn[8] | qs[128]
                   w = d * sc[j] * q - dmin * mn[j] for sub-block j of 32 weights, q in 0..15;
                   qs byte 32c + l holds weight l of sub-block 2c (low nibble) and of 2c + 1 (high nibble).
     Q5_K (176 B): as Q4_K with qh[32] before qs: bit j of qh[l] is the fifth bit of weight l of sub-block j.
     Q6_K (210 B): ql[128] | qh[64] | int8 sc[16] | fp16 d.  w = d * sc[s] * (q - 32), q in 0..63, sub-blocks s
                   of 16. Half h (128 weights) takes ql + 64h, qh + 32h; its group g of 32 weights has the low
                   4 bits in nibble g / 2 of ql[32 (g % 2) + l] and the top 2 bits at qh[l] >> 2g.
   Activations are quantised like llama.cpp's Q8_K, but symmetric: per 256 values xd = max|x| / 127,
   xq = round-half-even(x / xd) in -127..127, and bsum[16] = the sums of each 16 xq. A block then adds
     Q4_K/Q5_K: xd * (d * sum_j sc[j] sum_l q xq  -  dmin * sum_j mn[j] (bsum[2j] + bsum[2j+1]))
     Q6_K:      xd * d * (sum_s sc[s] sum_l q xq  -  32 sum_s sc[s] bsum[s])
   with every sum an exact int32 and one fp32 step per block.

   The weights are not repacked: rows are read where the mapped file holds them, so loading copies nothing
   and two processes share the page cache. Batched calls run tiles of 8 weight rows against passes of up to
   8 activation rows: a block of a weight row is read once from memory for the 8 rows and then from L1.
   A (weight row, activation row) pair is computed with the same arithmetic whatever the other rows, so a
   token's logits are the same bits alone or in a batch.

   One module may hold several parts (q|k|v with v in Q6_K and q, k in Q4_K, as Q4_K_M files have them):
   desc = {KIND_KQ, K, N, nparts, 0, 0, min_work, (type, rows, address) x nparts}, parts stacked along N. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef void (*corral_job_fn)(void *arg, int64_t chunk, int slot);
void corral_parallel(corral_job_fn fn, void *arg, int64_t nchunks, int nthreads); /* pool.c */

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define KQ_AVX2 1
#include <immintrin.h>
#else
#define KQ_AVX2 0
#endif

#define QKK 256      /* weights per K-quant block */
#define KQ_TR 8      /* weight rows per tile */
#define KQ_MX 8      /* activation rows per pass */
#define KQ_MAXPARTS 4
#define KQ_L2 262144 /* bytes of quantised activations per pass over a thread's tiles (about L2) */
#define UNROLL_KQ _Pragma("GCC unroll 8")

enum { T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14 };

typedef struct {
    int type;
    int64_t rows, row_bytes;
    const uint8_t *data;
} kpart;

typedef struct {
    int64_t K, N, nb;
    int nparts;
    kpart parts[KQ_MAXPARTS];
} kweights;

typedef struct {
    int64_t M, K, nb;
    const int8_t *q;   /* (M, K) */
    const float *d;    /* (M, nb) */
    const int16_t *bs; /* (M, nb, 16) */
    float *y;          /* (M, N) */
} kacts;

static float kq_half(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu, bits;
    float f;
    if (exp == 0) {
        f = (float)man * 5.9604644775390625e-8f;
        return sign ? -f : f;
    }
    bits = exp == 31 ? (sign | 0x7F800000u | (man << 13)) : (sign | ((exp + 112u) << 23) | (man << 13));
    memcpy(&f, &bits, sizeof f);
    return f;
}

static uint16_t kq_u16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

int64_t corral_kq_block_bytes(int type) {
    return type == T_Q4_K ? 144 : type == T_Q5_K ? 176 : type == T_Q6_K ? 210 : 0;
}

/* Q4_K/Q5_K 12 scale bytes -> sc[8] and mn[8] (6 bits each; sub-blocks 4-7 split over two places). */
static void kq_scales(const uint8_t *s, uint8_t *sc, uint8_t *mn) {
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 6) << 4);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
}

/* ---------------------------------------------------------------- activations */

static void kq_quant_block(const float *x, int8_t *q, float *xd, int16_t *bs, int simd) {
    float amax = 0.0f;
    int i = 0;
#if KQ_AVX2
    if (simd) {
        const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
        __m256 a = _mm256_setzero_ps();
        for (; i < QKK; i += 8) a = _mm256_max_ps(a, _mm256_and_ps(_mm256_loadu_ps(x + i), absmask));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        amax = _mm_cvtss_f32(h);
    }
#endif
    for (; i < QKK; i++) amax = fmaxf(amax, fabsf(x[i]));
    const float d = amax / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
    i = 0;
#if KQ_AVX2
    if (simd) {
        const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        const __m256 vid = _mm256_set1_ps(id);
        for (; i < QKK; i += 32) { /* cvtps rounds half to even, as nearbyintf does */
            __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i), vid));
            __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8), vid));
            __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 16), vid));
            __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 24), vid));
            __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
            _mm256_storeu_si256((__m256i *)(q + i), _mm256_permutevar8x32_epi32(p, order));
        }
    }
#endif
    for (; i < QKK; i++) q[i] = (int8_t)nearbyintf(x[i] * id);
    for (int s = 0; s < 16; s++) {
        int sum = 0;
        for (int l = 0; l < 16; l++) sum += q[16 * s + l];
        bs[s] = (int16_t)sum;
    }
    *xd = d;
}

void corral_kq_quantize_rows(const float *x, int64_t M, int64_t K, int8_t *q, float *xd, int16_t *bs, int simd) {
    const int64_t nb = K / QKK;
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < nb; b++)
            kq_quant_block(x + m * K + b * QKK, q + m * K + b * QKK, xd + m * nb + b, bs + (m * nb + b) * 16, simd);
}

/* ---------------------------------------------------------------- scalar path (the reference arithmetic) */

static float kq_dot_scalar(int type, const uint8_t *w, int64_t nb, const int8_t *xq, const float *xd, const int16_t *bs) {
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; b++, xq += QKK, bs += 16) {
        const float dx = xd[b];
        int32_t sumi = 0, corr = 0;
        float d, dmin = 0.0f;
        if (type == T_Q6_K) {
            const uint8_t *blk = w + b * 210, *ql = blk, *qh = blk + 128;
            const int8_t *sc = (const int8_t *)(blk + 192);
            d = kq_half(kq_u16(blk + 208));
            for (int h = 0; h < 2; h++)
                for (int g = 0; g < 4; g++)
                    for (int l = 0; l < 32; l++) {
                        int lo = ql[64 * h + 32 * (g % 2) + l], q = ((g < 2 ? lo : lo >> 4) & 15) |
                                                                    (((qh[32 * h + l] >> (2 * g)) & 3) << 4);
                        sumi += sc[8 * h + 2 * g + l / 16] * q * xq[128 * h + 32 * g + l];
                    }
            for (int s = 0; s < 16; s++) corr += 32 * sc[s] * bs[s];
        } else {
            const int five = type == T_Q5_K;
            const uint8_t *blk = w + b * (five ? 176 : 144), *qs = blk + (five ? 48 : 16), *qh = blk + 16;
            uint8_t sc[8], mn[8];
            kq_scales(blk + 4, sc, mn);
            d = kq_half(kq_u16(blk));
            dmin = kq_half(kq_u16(blk + 2));
            for (int j = 0; j < 8; j++) {
                int32_t s = 0;
                for (int l = 0; l < 32; l++) {
                    int q = (qs[32 * (j / 2) + l] >> (4 * (j % 2))) & 15;
                    if (five) q |= ((qh[l] >> j) & 1) << 4;
                    s += q * xq[32 * j + l];
                }
                sumi += sc[j] * s;
                corr += mn[j] * (bs[2 * j] + bs[2 * j + 1]);
            }
        }
        acc = fmaf((float)sumi, d * dx, acc);
        if (type == T_Q6_K)
            acc = fmaf(-(float)corr, d * dx, acc);
        else
            acc = fmaf(-(float)corr, dmin * dx, acc);
    }
    return acc;
}

/* ---------------------------------------------------------------- AVX2 path */
#if KQ_AVX2

static inline float kq_hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Sum over 8 groups of 32 codes: (unsigned codes . int8 activations) in int16 pairs, times each lane's int16
   scale, in int32 lanes. Q4_K, Q5_K and Q6_K differ only in how q and sc were unpacked. */
static inline __attribute__((always_inline)) __m256i kq_dot8(const __m256i *q, const __m256i *sc, const int8_t *xq) {
    __m256i sumi = _mm256_setzero_si256();
    UNROLL_KQ for (int g = 0; g < 8; g++) {
        __m256i prod = _mm256_maddubs_epi16(q[g], _mm256_loadu_si256((const __m256i *)(xq + 32 * g)));
        sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(prod, sc[g]));
    }
    return sumi;
}

/* The weights of one Q4_K/Q5_K block ready for any number of activation rows: codes as 8 vectors of 32 bytes
   (sub-block j in q[j]), scales as int16 lanes, mins duplicated per 16 (matching bsum's pairs). */
typedef struct {
    __m256i q[8];
    __m256i sc[8]; /* sub-block j's scale in every int16 lane */
    __m256i mn;
    float d, dmin;
} kq45_prep;

static inline __attribute__((always_inline)) void kq45_load(const uint8_t *blk, int five, kq45_prep *p) {
    const __m256i low = _mm256_set1_epi8(0x0F), one = _mm256_set1_epi8(1);
    uint8_t sc[8], mn[8];
    kq_scales(blk + 4, sc, mn);
    const uint8_t *qs = blk + (five ? 48 : 16);
    __m256i hb = five ? _mm256_loadu_si256((const __m256i *)(blk + 16)) : _mm256_setzero_si256();
    UNROLL_KQ for (int c = 0; c < 4; c++) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
        p->q[2 * c] = _mm256_and_si256(v, low);
        p->q[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        if (five) { /* bit j of each qh byte, moved to bit 4 (the & one keeps the shift inside each byte) */
            p->q[2 * c] = _mm256_or_si256(p->q[2 * c],
                                          _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2 * c), one), 4));
            p->q[2 * c + 1] = _mm256_or_si256(
                p->q[2 * c + 1], _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2 * c + 1), one), 4));
        }
    }
    int16_t m2[16];
    for (int j = 0; j < 8; j++) {
        p->sc[j] = _mm256_set1_epi16(sc[j]);
        m2[2 * j] = m2[2 * j + 1] = mn[j];
    }
    p->mn = _mm256_loadu_si256((const __m256i *)m2);
    p->d = kq_half(kq_u16(blk));
    p->dmin = kq_half(kq_u16(blk + 2));
}

static inline __attribute__((always_inline)) __m256 kq45_dot(const kq45_prep *p, const int8_t *xq, const int16_t *bs,
                                                            float dx, __m256 acc) {
    __m256i sumi = kq_dot8(p->q, p->sc, xq);
    __m256i corr = _mm256_madd_epi16(p->mn, _mm256_loadu_si256((const __m256i *)bs));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi), _mm256_set1_ps(p->d * dx), acc);
    return _mm256_fnmadd_ps(_mm256_cvtepi32_ps(corr), _mm256_set1_ps(p->dmin * dx), acc);
}

typedef struct {
    __m256i q[8];      /* group g of half h in q[4h + g], values 0..63 */
    __m256i sc[8];     /* int16: [sc first 16 x8 | sc second 16 x8] for each group */
    __m256i sc16;      /* the 16 scales as int16, for the -32 correction */
    float d;
} kq6_prep;

static inline __attribute__((always_inline)) void kq6_load(const uint8_t *blk, kq6_prep *p) {
    const __m256i low = _mm256_set1_epi8(0x0F), three = _mm256_set1_epi8(3);
    const int8_t *sc = (const int8_t *)(blk + 192);
    UNROLL_KQ for (int h = 0; h < 2; h++) {
        __m256i l0 = _mm256_loadu_si256((const __m256i *)(blk + 64 * h));
        __m256i l1 = _mm256_loadu_si256((const __m256i *)(blk + 64 * h + 32));
        __m256i hi = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * h));
        __m256i lows[4] = {_mm256_and_si256(l0, low), _mm256_and_si256(l1, low),
                           _mm256_and_si256(_mm256_srli_epi16(l0, 4), low),
                           _mm256_and_si256(_mm256_srli_epi16(l1, 4), low)};
        UNROLL_KQ for (int g = 0; g < 4; g++) {
            __m256i top = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hi, 2 * g), three), 4);
            p->q[4 * h + g] = _mm256_or_si256(lows[g], top);
            int s0 = sc[8 * h + 2 * g], s1 = sc[8 * h + 2 * g + 1];
            p->sc[4 * h + g] = _mm256_setr_epi16(s0, s0, s0, s0, s0, s0, s0, s0, s1, s1, s1, s1, s1, s1, s1, s1);
        }
    }
    p->sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)sc));
    p->d = kq_half(kq_u16(blk + 208));
}

static inline __attribute__((always_inline)) __m256 kq6_dot(const kq6_prep *p, const int8_t *xq, const int16_t *bs,
                                                           float dx, __m256 acc) {
    __m256i sumi = kq_dot8(p->q, p->sc, xq);
    __m256i corr = _mm256_madd_epi16(p->sc16, _mm256_loadu_si256((const __m256i *)bs));
    sumi = _mm256_sub_epi32(sumi, _mm256_slli_epi32(corr, 5));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi), _mm256_set1_ps(p->d * dx), acc);
}

/* One weight row (nb blocks at w) against activation rows m..m+mx-1; out[i] = their dot products. */
static inline __attribute__((always_inline)) void kq_row_avx2(int type, const uint8_t *w, const kacts *a, int64_t m,
                                                              int mx, float *out) {
    const int64_t nb = a->nb, K = a->K;
    __m256 acc[KQ_MX];
    UNROLL_KQ for (int i = 0; i < mx; i++) acc[i] = _mm256_setzero_ps();
    const int8_t *xq = a->q + m * K;
    const float *xd = a->d + m * nb;
    const int16_t *bs = a->bs + m * nb * 16;
    if (type == T_Q6_K) {
        for (int64_t b = 0; b < nb; b++) {
            kq6_prep p;
            kq6_load(w + b * 210, &p);
            UNROLL_KQ for (int i = 0; i < mx; i++)
                acc[i] = kq6_dot(&p, xq + i * K + b * QKK, bs + (i * nb + b) * 16, xd[i * nb + b], acc[i]);
        }
    } else {
        const int five = type == T_Q5_K;
        const int64_t size = five ? 176 : 144;
        for (int64_t b = 0; b < nb; b++) {
            kq45_prep p;
            kq45_load(w + b * size, five, &p);
            UNROLL_KQ for (int i = 0; i < mx; i++)
                acc[i] = kq45_dot(&p, xq + i * K + b * QKK, bs + (i * nb + b) * 16, xd[i * nb + b], acc[i]);
        }
    }
    UNROLL_KQ for (int i = 0; i < mx; i++) out[i] = kq_hsum(acc[i]);
}

#define KQ_ROWS(T, MX) \
    static void kq_row_##T##_##MX(const uint8_t *w, const kacts *a, int64_t m, float *out) { kq_row_avx2(T, w, a, m, MX, out); }
KQ_ROWS(T_Q4_K, 1) KQ_ROWS(T_Q4_K, 2) KQ_ROWS(T_Q4_K, 4) KQ_ROWS(T_Q4_K, 8)
KQ_ROWS(T_Q5_K, 1) KQ_ROWS(T_Q5_K, 2) KQ_ROWS(T_Q5_K, 4) KQ_ROWS(T_Q5_K, 8)
KQ_ROWS(T_Q6_K, 1) KQ_ROWS(T_Q6_K, 2) KQ_ROWS(T_Q6_K, 4) KQ_ROWS(T_Q6_K, 8)
#endif /* KQ_AVX2 */

typedef void (*kq_row_fn)(const uint8_t *, const kacts *, int64_t, float *);

/* Weight rows n0..n1 (one part) against activation rows m..mend. */
static void kq_rows(const kpart *part, int64_t pn0, int64_t n0, int64_t n1, const kacts *a, int64_t N, int64_t m,
                    int64_t mend, int simd) {
    float out[KQ_MX];
#if KQ_AVX2
    if (simd) {
        static const kq_row_fn q4[KQ_MX + 1] = {NULL, kq_row_T_Q4_K_1, kq_row_T_Q4_K_2, NULL, kq_row_T_Q4_K_4,
                                                NULL, NULL, NULL, kq_row_T_Q4_K_8};
        static const kq_row_fn q5[KQ_MX + 1] = {NULL, kq_row_T_Q5_K_1, kq_row_T_Q5_K_2, NULL, kq_row_T_Q5_K_4,
                                                NULL, NULL, NULL, kq_row_T_Q5_K_8};
        static const kq_row_fn q6[KQ_MX + 1] = {NULL, kq_row_T_Q6_K_1, kq_row_T_Q6_K_2, NULL, kq_row_T_Q6_K_4,
                                                NULL, NULL, NULL, kq_row_T_Q6_K_8};
        const kq_row_fn *fn = part->type == T_Q4_K ? q4 : part->type == T_Q5_K ? q5 : q6;
        for (int64_t i = m; i < mend;) {
            int64_t left = mend - i, mx = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
            for (int64_t n = n0; n < n1; n++) {
                fn[mx](part->data + (n - pn0) * part->row_bytes, a, i, out);
                for (int64_t r = 0; r < mx; r++) a->y[(i + r) * N + n] = out[r];
            }
            i += mx;
        }
        return;
    }
#endif
    (void)out;
    (void)simd;
    for (int64_t i = m; i < mend; i++)
        for (int64_t n = n0; n < n1; n++)
            a->y[i * N + n] = kq_dot_scalar(part->type, part->data + (n - pn0) * part->row_bytes, a->nb, a->q + i * a->K,
                                            a->d + i * a->nb, a->bs + i * a->nb * 16);
}

/* One call's work in chunks (pool.c): rows of activations to quantise, then ranges of weight tiles against
   every row, in passes of activation rows that stay in L2 while the tiles stream past. */
typedef struct {
    const kweights *w;
    const float *x;
    const kacts *a;
    int simd;
    int64_t rows_per_chunk, tiles_per_chunk;
} kq_job;

static void kq_quantize_chunk(void *arg, int64_t k, int slot) {
    const kq_job *j = arg;
    const kweights *w = j->w;
    int64_t m0 = k * j->rows_per_chunk, m1 = m0 + j->rows_per_chunk < j->a->M ? m0 + j->rows_per_chunk : j->a->M;
    (void)slot;
    corral_kq_quantize_rows(j->x + m0 * w->K, m1 - m0, w->K, (int8_t *)j->a->q + m0 * w->K,
                            (float *)j->a->d + m0 * w->nb, (int16_t *)j->a->bs + m0 * w->nb * 16, j->simd);
}

static void kq_tiles_chunk(void *arg, int64_t k, int slot) {
    const kq_job *j = arg;
    const kweights *w = j->w;
    const kacts *a = j->a;
    const int64_t T = (w->N + KQ_TR - 1) / KQ_TR, t0 = k * j->tiles_per_chunk;
    const int64_t t1 = t0 + j->tiles_per_chunk < T ? t0 + j->tiles_per_chunk : T;
    int64_t pass = (KQ_L2 / w->K) & ~(int64_t)7;
    pass = pass < 8 ? 8 : pass;
    (void)slot;
    for (int64_t mc = 0; mc < a->M; mc += pass) {
        int64_t mend = mc + pass < a->M ? mc + pass : a->M;
        for (int64_t t = t0; t < t1; t++) {
            int64_t n = t * KQ_TR, nend = n + KQ_TR < w->N ? n + KQ_TR : w->N, base = 0;
            for (int p = 0; p < w->nparts && n < nend; base += w->parts[p].rows, p++) {
                int64_t pend = base + w->parts[p].rows;
                if (n >= pend) continue;
                int64_t e = nend < pend ? nend : pend;
                for (int64_t i = mc; i < mend; i += KQ_MX) /* a tile's rows against 8 activation rows at a time */
                    kq_rows(&w->parts[p], base, n, e, a, w->N, i, i + KQ_MX < mend ? i + KQ_MX : mend, j->simd);
                n = e;
            }
        }
    }
}

/* y (M, N) = x (M, K) @ w.T for a K-quant descriptor (layout at the top). Returns 0, -1 (no memory) or
   -2 (a bad descriptor). */
int corral_kq_linear(const int64_t *desc, const float *x, int64_t M, float *y, int nthreads, int simd) {
    kweights w;
    w.K = desc[1];
    w.N = desc[2];
    w.nb = w.K / QKK;
    w.nparts = (int)desc[3];
    if (w.nparts < 1 || w.nparts > KQ_MAXPARTS || w.K % QKK) return -2;
    int64_t total = 0;
    for (int p = 0; p < w.nparts; p++) {
        const int64_t *pd = desc + 7 + 3 * p;
        w.parts[p].type = (int)pd[0];
        w.parts[p].rows = pd[1];
        w.parts[p].data = (const uint8_t *)(intptr_t)pd[2];
        w.parts[p].row_bytes = w.nb * corral_kq_block_bytes((int)pd[0]);
        if (!w.parts[p].row_bytes) return -2;
        total += pd[1];
    }
    if (total != w.N) return -2;
#if KQ_AVX2
    simd = simd != 0;
#else
    simd = 0;
#endif
    const int64_t T = (w.N + KQ_TR - 1) / KQ_TR, min_work = desc[6];
    int64_t work = M * w.N * w.K, nt = nthreads < 1 ? 1 : nthreads;
    if (min_work > 0 && work / min_work < nt) nt = work / min_work;
    if (nt > T) nt = T;
    if (nt < 1) nt = 1;
    size_t q_bytes = ((size_t)(M * w.K) + 63) & ~(size_t)63, d_bytes = sizeof(float) * (size_t)(M * w.nb);
    char *buf = malloc(q_bytes + d_bytes + sizeof(int16_t) * 16 * (size_t)(M * w.nb));
    if (!buf) return -1;
    kacts a = {M, w.K, w.nb, (const int8_t *)buf, (const float *)(buf + q_bytes),
               (const int16_t *)(buf + q_bytes + d_bytes), y};
    int64_t chunks = nt == 1 ? 1 : (4 * nt < T ? 4 * nt : T); /* a few per thread: a slow thread's share is taken */
    kq_job job = {&w, x, &a, simd, (M + nt - 1) / nt, (T + chunks - 1) / chunks};
    corral_parallel(kq_quantize_chunk, &job, (M + job.rows_per_chunk - 1) / job.rows_per_chunk, (int)nt);
    corral_parallel(kq_tiles_chunk, &job, (T + job.tiles_per_chunk - 1) / job.tiles_per_chunk, (int)nt);
    free(buf);
    return 0;
}

/* Rows `ids` (n of them) of a K-quant table with K columns, widened to fp32 into out (n, K): a token
   embedding lookup reads only the rows it takes. */
void corral_kq_dequant_rows(int type, const uint8_t *data, int64_t K, const int64_t *ids, int64_t n, float *out) {
    const int64_t nb = K / QKK, row_bytes = nb * corral_kq_block_bytes(type);
    for (int64_t r = 0; r < n; r++) {
        const uint8_t *row = data + ids[r] * row_bytes;
        float *o = out + r * K;
        for (int64_t b = 0; b < nb; b++, o += QKK) {
            if (type == T_Q6_K) {
                const uint8_t *blk = row + b * 210, *ql = blk, *qh = blk + 128;
                const int8_t *sc = (const int8_t *)(blk + 192);
                const float d = kq_half(kq_u16(blk + 208));
                for (int h = 0; h < 2; h++)
                    for (int g = 0; g < 4; g++)
                        for (int l = 0; l < 32; l++) {
                            int lo = ql[64 * h + 32 * (g % 2) + l];
                            int q = ((g < 2 ? lo : lo >> 4) & 15) | (((qh[32 * h + l] >> (2 * g)) & 3) << 4);
                            o[128 * h + 32 * g + l] = d * (float)sc[8 * h + 2 * g + l / 16] * (float)(q - 32);
                        }
            } else {
                const int five = type == T_Q5_K;
                const uint8_t *blk = row + b * (five ? 176 : 144), *qs = blk + (five ? 48 : 16), *qh = blk + 16;
                uint8_t sc[8], mn[8];
                kq_scales(blk + 4, sc, mn);
                const float d = kq_half(kq_u16(blk)), dmin = kq_half(kq_u16(blk + 2));
                for (int j = 0; j < 8; j++) {
                    const float ds = d * (float)sc[j], dm = dmin * (float)mn[j];
                    for (int l = 0; l < 32; l++) {
                        int q = (qs[32 * (j / 2) + l] >> (4 * (j % 2))) & 15;
                        if (five) q |= ((qh[l] >> j) & 1) << 4;
                        o[32 * j + l] = ds * (float)q - dm;
                    }
                }
            }
        }
    }
}
