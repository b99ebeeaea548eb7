/* Matrix products over llama.cpp weight blocks that reproduce their bf16 dequantization bit for bit.
 *
 * A block holds 32 consecutive weights of a row, in ggml's layouts, except that Q4_1's fp16 scale and minimum
 * are widened to fp32 when the layer is built (gguf_blocks.py's `packed`: broadcast straight from memory, they
 * save the decoder layers ~7% of their time per token; Q8_0's two more bytes a block cost more than they save):
 *   Q4_1 (24 bytes): fp32 scale d, fp32 minimum m, 16 bytes whose low nibbles are weights 0-15 and high nibbles
 *                    16-31; a weight is d * q + m.
 *   Q8_0 (34 bytes): fp16 scale d, then 32 int8 q; a weight is q * d.
 * The dequantizer that made the served bf16 weights (gguf-py, then torch) computed these in fp32 and
 * rounded to bf16 (nearest even): this file does the same, compiled with -ffp-contract=off so that
 * d * q + m stays two roundings, so the weights it multiplies are exactly the bf16 ones, read at 5 or
 * 8.5 bits each instead of 16. Sums are fp32 (exact bf16 products, fused multiply-adds).
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))

enum { Q4_1 = 0, Q8_0 = 1 };

INLINE int64_t block_bytes(const int fmt) { return fmt == Q4_1 ? 24 : 34; }

INLINE __m512 round_bf16(__m512 v) {
    __m512i b = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    b = _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    return _mm512_castsi512_ps(_mm512_and_si512(b, _mm512_set1_epi32((int)0xFFFF0000u)));
}

INLINE uint16_t to_bf16(float f) {
    uint32_t b;
    memcpy(&b, &f, 4);
    b += 0x7FFFu + ((b >> 16) & 1u);
    return (uint16_t)(b >> 16);
}

INLINE float float_at(const uint8_t *p) {
    float f;
    memcpy(&f, p, 4);
    return f;
}

INLINE float half_at(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* A block's 32 weights as two vectors of 16, exactly as the dequantizer rounded them. */
INLINE void block_weights(const int fmt, const uint8_t *block, __m512 *w0, __m512 *w1) {
    if (fmt == Q4_1) {
        /* The 16 values the block can hold, bf16(d * q + m) for q = 0..15; a permute picks each
           weight's by its nibble (it reads the low 4 bits of each index). */
        const __m512 q = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        const __m512 values = round_bf16(
            _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(float_at(block)), q), _mm512_set1_ps(float_at(block + 4))));
        const __m512i nibbles = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(block + 8)));
        *w0 = _mm512_permutexvar_ps(nibbles, values);
        *w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(nibbles, 4), values);
    } else {
        const __m512 d = _mm512_set1_ps(half_at(block));
        const __m128i *q = (const __m128i *)(block + 2);
        *w0 = round_bf16(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q))), d));
        *w1 = round_bf16(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q + 1))), d));
    }
}

/* A tile reads NB rows of blocks at once, more streams than the hardware prefetcher keeps ahead of: each read
 * also asks for the block this far along its row (past the row's end, the next rows': a tile's successors).
 * Measured on the bundled model's 210 products per token: 22% less time at batch 1, 21% at 8; 32 to 72
 * blocks ahead do about as well. */
enum { PREFETCH_BLOCKS = 48 };

/* NB output columns x R activation rows (NB * R <= 16). Each output is summed in the same order whatever NB and R
 * are, so a row's result does not depend on the batch it runs in. */
INLINE void tile(const int fmt, const float *x, int64_t K, const uint8_t *w, int64_t N, uint16_t *y, int64_t n0,
                 int64_t r0, const int NB, const int R) {
    const int64_t G = K / 32;
    __m512 acc[4][8][2];
    for (int b = 0; b < NB; b++)
        for (int r = 0; r < R; r++) acc[b][r][0] = acc[b][r][1] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        for (int b = 0; b < NB; b++) {
            const uint8_t *block = w + ((n0 + b) * G + g) * block_bytes(fmt);
            _mm_prefetch((const char *)(block + PREFETCH_BLOCKS * block_bytes(fmt)), _MM_HINT_T0);
            __m512 w0, w1;
            block_weights(fmt, block, &w0, &w1);
            for (int r = 0; r < R; r++) {
                const float *xr = x + (r0 + r) * K + g * 32;
                acc[b][r][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr), acc[b][r][0]);
                acc[b][r][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr + 16), acc[b][r][1]);
            }
        }
    }
    for (int b = 0; b < NB; b++)
        for (int r = 0; r < R; r++)
            y[(r0 + r) * N + n0 + b] = to_bf16(_mm512_reduce_add_ps(_mm512_add_ps(acc[b][r][0], acc[b][r][1])));
}

INLINE void gemm(const int fmt, const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, uint16_t *y,
                 int threads) {
    if (M <= 2) {
        /* Few rows: four columns at a time keep eight independent sums in flight. */
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t n0 = 0; n0 < N; n0 += 4) {
            if (M == 1) tile(fmt, x, K, w, N, y, n0, 0, 4, 1);
            else tile(fmt, x, K, w, N, y, n0, 0, 4, 2);
        }
        return;
    }
    /* More rows: each expanded block serves up to eight of them (sixteen sums in flight), then the
       rest four at a time. */
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n0 = 0; n0 < N; n0 += 2) {
        int64_t r0 = 0;
        for (; r0 + 8 <= M; r0 += 8) {
            tile(fmt, x, K, w, N, y, n0, r0, 1, 8);
            tile(fmt, x, K, w, N, y, n0 + 1, r0, 1, 8);
        }
        for (; r0 + 4 <= M; r0 += 4) tile(fmt, x, K, w, N, y, n0, r0, 2, 4);
        switch (M - r0) {
            case 3: tile(fmt, x, K, w, N, y, n0, r0, 2, 3); break;
            case 2: tile(fmt, x, K, w, N, y, n0, r0, 2, 2); break;
            case 1: tile(fmt, x, K, w, N, y, n0, r0, 2, 1); break;
        }
    }
}

/* y[M,N] = x[M,K] @ W[N,K]^T with x and y bf16 and W as blocks [N, K/32, bytes] of format fmt; needs
 * N % 4 == 0 and K % 32 == 0. Returns 0, or -1 if memory for the fp32 copy of x cannot be had. */
int blocks_linear(int fmt, const uint16_t *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, uint16_t *y,
                  int threads) {
    float *xf = malloc(sizeof(float) * M * K);
    if (!xf) return -1;
    for (int64_t i = 0; i < M * K; i++) {
        const uint32_t bits = (uint32_t)x[i] << 16;
        memcpy(xf + i, &bits, 4);
    }
    if (fmt == Q4_1) gemm(Q4_1, xf, M, K, w, N, y, threads);
    else gemm(Q8_0, xf, M, K, w, N, y, threads);
    free(xf);
    return 0;
}

INLINE void expand(const int fmt, const uint8_t *w, int64_t blocks, uint16_t *out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < blocks; i++) {
        __m512 w0, w1;
        _mm_prefetch((const char *)(w + (i + PREFETCH_BLOCKS) * block_bytes(fmt)), _MM_HINT_T0);
        block_weights(fmt, w + i * block_bytes(fmt), &w0, &w1);
        _mm256_storeu_si256((__m256i *)(out + i * 32),
                            _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(w0), 16)));
        _mm256_storeu_si256((__m256i *)(out + i * 32 + 16),
                            _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(w1), 16)));
    }
}

/* W[N,K] as bf16 (exactly the dequantizer's values) from its blocks of format fmt. */
void blocks_dequantize(int fmt, const uint8_t *w, int64_t N, int64_t K, uint16_t *out, int threads) {
    if (fmt == Q4_1) expand(Q4_1, w, N * (K / 32), out, threads);
    else expand(Q8_0, w, N * (K / 32), out, threads);
}

/* ---- One Llama decoder layer at decode, in one call ------------------------------------------------------------
 *
 * transformers' LlamaDecoderLayer, for one new token per row, with the same bf16 roundings at the same places
 * (each PyTorch operator on bf16 computes in fp32 and rounds its result): RMSNorm, q/k/v projections, rotary
 * embedding, attention over the KV cache (the new column written in place), o projection, residual; RMSNorm,
 * SiLU(gate) * up, down projection, residual. Sums are fp32 in this file's order, so results are within a few
 * bf16 ulps of PyTorch's, not bit-identical. What it saves is not arithmetic but the ~40 PyTorch operators
 * (and their Python) per layer and token that cost more than the weights' reads at batch 1.
 */

typedef struct {
    int64_t rows, hidden, heads, kv_heads, head_dim, intermediate;
    float eps, scale;
    const uint16_t *input_norm, *post_norm; /* [hidden] bf16 */
    const uint8_t *proj[7];                 /* q, k, v, o, gate, up, down as blocks */
    int32_t fmt[7];
    const uint16_t *cos, *sin; /* [rows, head_dim] bf16 */
    uint16_t *keys, *values;   /* cache [rows, kv_heads, capacity, head_dim] bf16, both strided alike */
    int64_t row_stride, head_stride;
    int64_t column;      /* the new token's column; attention reads columns 0..column */
    const int64_t *mask; /* [rows, column + 1]: 0 on a row's left padding */
    int32_t threads;
} DecoderLayer;

enum { P_Q, P_K, P_V, P_O, P_GATE, P_UP, P_DOWN };

INLINE float bf(uint16_t h) {
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

INLINE float round_f(float f) { return bf(to_bf16(f)); }

INLINE void project(const DecoderLayer *a, int p, const float *x, int64_t K, int64_t N, uint16_t *y) {
    if (a->fmt[p] == Q4_1) gemm(Q4_1, x, a->rows, K, a->proj[p], N, y, a->threads);
    else gemm(Q8_0, x, a->rows, K, a->proj[p], N, y, a->threads);
}

/* LlamaRMSNorm: w * bf16(x * rsqrt(mean(x^2) + eps)), returned as the fp32 values of its bf16 result. */
static void rms_norm(const uint16_t *x, const uint16_t *w, int64_t n, float eps, float *out) {
    double squares = 0;
    for (int64_t i = 0; i < n; i++) squares += (double)bf(x[i]) * bf(x[i]);
    const float inv = 1.0f / sqrtf((float)(squares / (double)n) + eps);
    for (int64_t i = 0; i < n; i++) out[i] = round_f(bf(w[i]) * round_f(bf(x[i]) * inv));
}

/* apply_rotary_pos_emb on one head: x * cos + rotate_half(x) * sin, each operator rounded to bf16. */
static void rotate(uint16_t *x, const uint16_t *cos, const uint16_t *sin, int64_t d) {
    const int64_t half = d / 2;
    float r[512];
    for (int64_t i = 0; i < d; i++) {
        const float turned = i < half ? -bf(x[i + half]) : bf(x[i - half]);
        r[i] = round_f(round_f(bf(x[i]) * bf(cos[i])) + round_f(turned * bf(sin[i])));
    }
    for (int64_t i = 0; i < d; i++) x[i] = to_bf16(r[i]);
}

/* 16 bf16 values as fp32 (exact). */
INLINE __m512 load_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* e^x for 16 lanes: Cephes' expf (2^n times a degree-5 polynomial on |r| <= ln2/2), within 2 ulp of glibc's
 * and of PyTorch's vectorized exp; the callers round its results to bf16. */
INLINE __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.7f)), _mm512_set1_ps(-103.9f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(0.693359375f)));
    r = _mm512_sub_ps(r, _mm512_mul_ps(n, _mm512_set1_ps(-2.12194440e-4f)));
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(p, r), r), r), _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* PyTorch's CPU flash attention for one query: fp32 scores times the scale, softmax whose probabilities are
 * rounded to bf16 before they weight the values, fp32 sums divided by the (unrounded) total. */
static void attend(const DecoderLayer *a, int64_t r, int64_t h, const uint16_t *q, float *scores, uint16_t *out) {
    const int64_t d = a->head_dim, g = h / (a->heads / a->kv_heads);
    const uint16_t *keys = a->keys + r * a->row_stride + g * a->head_stride;
    const uint16_t *values = a->values + r * a->row_stride + g * a->head_stride;
    const int64_t *mask = a->mask + r * (a->column + 1);
    float qf[512], acc[512], top = -INFINITY, total = 0;
    for (int64_t i = 0; i < d; i++) qf[i] = bf(q[i]), acc[i] = 0;
    /* Scores 16 columns at a time, a lane per column, each summed over i in order as the scalar tail does (the
     * products are exact, so fused or not alike); two inputs per gathered 32 bits. */
    int64_t c = 0;
    const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32((int)(d * sizeof(uint16_t))));
    for (; c + 16 <= a->column + 1; c += 16) {
        __m512 sum = _mm512_setzero_ps();
        for (int64_t i = 0; i < d; i += 2) {
            const __m512i pair = _mm512_i32gather_epi32(rows, (const void *)(keys + c * d + i), 1);
            sum = _mm512_fmadd_ps(_mm512_set1_ps(qf[i]), _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16)), sum);
            sum = _mm512_fmadd_ps(_mm512_set1_ps(qf[i + 1]),
                                  _mm512_castsi512_ps(_mm512_and_si512(pair, _mm512_set1_epi32((int)0xFFFF0000u))), sum);
        }
        _mm512_storeu_ps(scores + c, _mm512_mul_ps(sum, _mm512_set1_ps(a->scale)));
    }
    for (; c <= a->column; c++) {
        float s = 0;
        for (int64_t i = 0; i < d; i++) s += qf[i] * bf(keys[c * d + i]);
        scores[c] = s * a->scale;
    }
    for (c = 0; c <= a->column; c++)
        if (mask[c] && scores[c] > top) top = scores[c];
    for (int64_t c = 0; c <= a->column; c++) {
        if (!mask[c]) continue;
        const float p = expf(scores[c] - top);
        total += p;
        /* Each acc[i] still sums over the columns in order: the products are exact, so fused or not alike. */
        const __m512 weight = _mm512_set1_ps(round_f(p));
        for (int64_t i = 0; i < d; i += 16)
            _mm512_storeu_ps(acc + i, _mm512_fmadd_ps(weight, load_bf16(values + c * d + i), _mm512_loadu_ps(acc + i)));
    }
    for (int64_t i = 0; i < d; i++) out[i] = to_bf16(acc[i] / total);
}

/* Runs layer a on x [rows, hidden] bf16 in place. Returns 0, or -1 if its buffers cannot be allocated. */
int llama_decode_layer(const DecoderLayer *a, uint16_t *x) {
    const int64_t R = a->rows, D = a->hidden, d = a->head_dim, F = a->intermediate;
    const int64_t Q = a->heads * d, KV = a->kv_heads * d, wide = F > Q ? F : Q;
    float *xf = malloc(sizeof(float) * R * (wide + D));
    uint16_t *qkv = malloc(sizeof(uint16_t) * R * (2 * Q + 2 * KV + 2 * F + D));
    float *scores = malloc(sizeof(float) * a->threads * (a->column + 1));
    if (!xf || !qkv || !scores || d > 512) {
        free(xf), free(qkv), free(scores);
        return -1;
    }
    uint16_t *q = qkv, *k = q + R * Q, *v = k + R * KV, *gate = v + R * KV, *up = gate + R * F, *out = up + R * F,
             *attn = out + R * D;

    for (int64_t r = 0; r < R; r++) rms_norm(x + r * D, a->input_norm, D, a->eps, xf + r * D);
    project(a, P_Q, xf, D, Q, q);
    project(a, P_K, xf, D, KV, k);
    project(a, P_V, xf, D, KV, v);
    for (int64_t r = 0; r < R; r++) {
        for (int64_t h = 0; h < a->heads; h++) rotate(q + r * Q + h * d, a->cos + r * d, a->sin + r * d, d);
        for (int64_t g = 0; g < a->kv_heads; g++) {
            rotate(k + r * KV + g * d, a->cos + r * d, a->sin + r * d, d);
            const int64_t at = r * a->row_stride + g * a->head_stride + a->column * d;
            memcpy(a->keys + at, k + r * KV + g * d, sizeof(uint16_t) * d);
            memcpy(a->values + at, v + r * KV + g * d, sizeof(uint16_t) * d);
        }
    }
#pragma omp parallel for num_threads(a->threads) schedule(static)
    for (int64_t i = 0; i < R * a->heads; i++) {
        const int64_t r = i / a->heads, h = i % a->heads;
        float *mine = scores + (int64_t)omp_get_thread_num() * (a->column + 1);
        attend(a, r, h, q + r * Q + h * d, mine, attn + r * Q + h * d);
    }
    for (int64_t i = 0; i < R * Q; i++) xf[i] = bf(attn[i]);
    project(a, P_O, xf, Q, D, out);
    for (int64_t i = 0; i < R * D; i++) x[i] = to_bf16(bf(x[i]) + bf(out[i]));

    for (int64_t r = 0; r < R; r++) rms_norm(x + r * D, a->post_norm, D, a->eps, xf + r * D);
    project(a, P_GATE, xf, D, F, gate);
    project(a, P_UP, xf, D, F, up);
    for (int64_t i = 0; i < R * F; i += 16) { /* F % 16 == 0: F % 32 == 0 for the down projection's blocks */
        const __m512 g = load_bf16(gate + i);
        const __m512 silu = round_bf16(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g)))));
        _mm512_storeu_ps(xf + i, round_bf16(_mm512_mul_ps(silu, load_bf16(up + i))));
    }
    project(a, P_DOWN, xf, F, D, out);
    for (int64_t i = 0; i < R * D; i++) x[i] = to_bf16(bf(x[i]) + bf(out[i]));
    free(xf), free(qkv), free(scores);
    return 0;
}
