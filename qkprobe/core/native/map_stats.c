/* Map statistics of mode coordinates in one pass over the tokens (CPU, float32).
 *
 * For one layer: a (B, H, Na, R) query-side and b (B, H, Nb, R) key-side mode coordinates, any
 * strides with a unit stride over R. For every item (sample, head) in [item_start, item_end)
 * (item = sample * H + head) and every mode r, over the map tokens p..N-1 of each side:
 *
 *   out[.., 0..4] = mean, max, min, mean of the k largest, mean of the k smallest   (of a)
 *   out[.., 5..9] = the same for b
 *   out[.., 10]   = max(a) * max(b),   out[.., 11] = min(a) * min(b)
 *
 * out is (B, H, R, S) with the given strides (S >= 12). Items run in parallel where the library
 * was built with OpenMP (it then shares torch's OpenMP runtime and thread count). Per block of LANES modes the k largest
 * values are kept sorted in k vector registers and every token is merged in by a compare-exchange
 * chain (max/min only, no branches), likewise the k smallest; the max is top[0], the min
 * bottom[0]. A mode with a NaN token gets NaN for all five statistics of that side (torch's
 * reductions propagate NaN too).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#define LANES 16
typedef __m512 vec;
#define VLOAD(p) _mm512_loadu_ps(p)
#define VSTORE(p, v) _mm512_storeu_ps(p, v)
#define VSET(x) _mm512_set1_ps(x)
#define VMAX(x, y) _mm512_max_ps(x, y)
#define VMIN(x, y) _mm512_min_ps(x, y)
#define VADD(x, y) _mm512_add_ps(x, y)
#elif defined(__AVX__)
#include <immintrin.h>
#define LANES 8
typedef __m256 vec;
#define VLOAD(p) _mm256_loadu_ps(p)
#define VSTORE(p, v) _mm256_storeu_ps(p, v)
#define VSET(x) _mm256_set1_ps(x)
#define VMAX(x, y) _mm256_max_ps(x, y)
#define VMIN(x, y) _mm256_min_ps(x, y)
#define VADD(x, y) _mm256_add_ps(x, y)
#else
#define LANES 1
typedef float vec;
#define VLOAD(p) (*(p))
#define VSTORE(p, v) (*(p) = (v))
#define VSET(x) (x)
#define VMAX(x, y) ((x) > (y) ? (x) : (y))
#define VMIN(x, y) ((x) < (y) ? (x) : (y))
#define VADD(x, y) ((x) + (y))
#endif

#define KMAX 64

/* Statistics of NB * LANES modes (w of them real) over the tokens of x (token stride sn) listed
 * in idx[0..cnt) (idx NULL: tokens n0 .. n0 + cnt - 1) into res[s * NB * LANES + l], s = mean,
 * max, min, top mean, bottom mean; the top/bottom means average the kk <= K extremes. NB = 2 runs two
 * independent compare-exchange chains side by side, which hides the max/min latency. NaN is
 * not tracked per token: a NaN token makes the sum NaN, and only then is the mode re-scanned. */
#define BLOCK_BODY(K, NB)                                                                    \
    vec hi[NB][KMAX > (K) ? (K) : KMAX], lo[NB][KMAX > (K) ? (K) : KMAX], sum[NB];           \
    for (int q = 0; q < (NB); q++) {                                                         \
        sum[q] = VSET(0.0f);                                                                 \
        for (int j = 0; j < (K); j++) { hi[q][j] = VSET(-INFINITY); lo[q][j] = VSET(INFINITY); } \
    }                                                                                        \
    float pad[LANES];                                                                        \
    for (int64_t t = 0; t < cnt; t++) {                                                      \
        const int64_t n = idx ? idx[t] : n0 + t;                                             \
        vec up[NB], down[NB];                                                                \
        for (int q = 0; q < (NB); q++) {                                                     \
            if (w >= (q + 1) * LANES) up[q] = VLOAD(x + n * sn + q * LANES);                 \
            else {                                                                           \
                for (int l = 0; l < LANES; l++)                                              \
                    pad[l] = q * LANES + l < w ? x[n * sn + q * LANES + l] : 0.0f;           \
                up[q] = VLOAD(pad);                                                          \
            }                                                                                \
            sum[q] = VADD(sum[q], up[q]);                                                    \
            down[q] = up[q];                                                                 \
        }                                                                                    \
        for (int j = 0; j < (K); j++) {                                                      \
            for (int q = 0; q < (NB); q++) {                                                 \
                const vec h = hi[q][j], d = lo[q][j];                                        \
                hi[q][j] = VMAX(h, up[q]); up[q] = VMIN(h, up[q]);                           \
                lo[q][j] = VMIN(d, down[q]); down[q] = VMAX(d, down[q]);                     \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
    for (int q = 0; q < (NB); q++) {                                                         \
        vec top = VSET(0.0f), bottom = VSET(0.0f);                                           \
        for (int j = 0; j < kk; j++) { top = VADD(top, hi[q][j]); bottom = VADD(bottom, lo[q][j]); } \
        float s[LANES], t[LANES], u[LANES], mx[LANES], mn[LANES];                            \
        VSTORE(s, sum[q]); VSTORE(t, top); VSTORE(u, bottom);                                \
        VSTORE(mx, hi[q][0]); VSTORE(mn, lo[q][0]);                                          \
        float *o = res + q * LANES;                                                          \
        for (int l = 0; l < LANES; l++) {                                                    \
            int nan = 0;                                                                     \
            if (s[l] != s[l] && q * LANES + l < w)                                           \
                for (int64_t t = 0; t < cnt; t++) {                                          \
                    const int64_t n = idx ? idx[t] : n0 + t;                                 \
                    nan |= x[n * sn + q * LANES + l] != x[n * sn + q * LANES + l];           \
                }                                                                            \
            o[l] = nan ? NAN : s[l] * inv_n;                                                 \
            o[(NB) * LANES + l] = nan ? NAN : mx[l];                                         \
            o[2 * (NB) * LANES + l] = nan ? NAN : mn[l];                                     \
            o[3 * (NB) * LANES + l] = nan ? NAN : t[l] / (float)kk;                          \
            o[4 * (NB) * LANES + l] = nan ? NAN : u[l] / (float)kk;                          \
        }                                                                                    \
    }

#define DEFINE_BLOCK(K)                                                                      \
    static void block1_k##K(const float *x, int64_t sn, int64_t n0, const int64_t *idx,     \
                            int64_t cnt, int64_t kk, int w, float inv_n, float *res)        \
    { BLOCK_BODY(K, 1) }                                                                     \
    static void block2_k##K(const float *x, int64_t sn, int64_t n0, const int64_t *idx,     \
                            int64_t cnt, int64_t kk, int w, float inv_n, float *res)        \
    { BLOCK_BODY(K, 2) }
DEFINE_BLOCK(1) DEFINE_BLOCK(2) DEFINE_BLOCK(3) DEFINE_BLOCK(4) DEFINE_BLOCK(5)
DEFINE_BLOCK(6) DEFINE_BLOCK(8) DEFINE_BLOCK(10) DEFINE_BLOCK(16)

static void block1_any(const float *x, int64_t sn, int64_t n0, const int64_t *idx, int64_t cnt,
                       int64_t kk, int w, float inv_n, float *res, int64_t k)
{
    BLOCK_BODY(k, 1)
}

typedef void (*block_fn)(const float *, int64_t, int64_t, const int64_t *, int64_t, int64_t, int, float,
                         float *);

/* One side: the map tokens are n0 .. n0 + cnt - 1, or those listed in idx (the real tokens of a
 * sample with a token mask); k <= KMAX extremes kept, their first kk = min(k, cnt) averaged. A
 * side with no tokens gets NaN. */
static void side_stats(const float *x, int64_t sn, int64_t n0, const int64_t *idx, int64_t cnt, int64_t R,
                       int64_t k, float *out, int64_t sr, int64_t ss)
{
    if (cnt == 0) {
        for (int64_t r = 0; r < R; r++)
            for (int s = 0; s < 5; s++) out[r * sr + s * ss] = NAN;
        return;
    }
    const float inv_n = 1.0f / (float)cnt;
    const int64_t kk = k < cnt ? k : cnt;
    float res[5 * 2 * LANES];
    block_fn one = 0, two = 0;
    switch (k) {
    case 1: one = block1_k1; two = block2_k1; break;
    case 2: one = block1_k2; two = block2_k2; break;
    case 3: one = block1_k3; two = block2_k3; break;
    case 4: one = block1_k4; two = block2_k4; break;
    case 5: one = block1_k5; two = block2_k5; break;
    case 6: one = block1_k6; two = block2_k6; break;
    case 8: one = block1_k8; two = block2_k8; break;
    case 10: one = block1_k10; two = block2_k10; break;
    case 16: one = block1_k16; two = block2_k16; break;
    }
    for (int64_t r0 = 0; r0 < R;) {
        const int64_t left = R - r0;
        const int nb = (two && left > LANES) ? 2 : 1;
        const int w = left < nb * LANES ? (int)left : nb * LANES;
        if (nb == 2) two(x + r0, sn, n0, idx, cnt, kk, w, inv_n, res);
        else if (one) one(x + r0, sn, n0, idx, cnt, kk, w, inv_n, res);
        else block1_any(x + r0, sn, n0, idx, cnt, kk, w, inv_n, res, k);
        for (int l = 0; l < w; l++)
            for (int s = 0; s < 5; s++)
                out[(r0 + l) * sr + s * ss] = res[s * nb * LANES + l];
        r0 += nb * LANES;
    }
}

/* mask: NULL, or (B, na) bytes, row stride ms (1 = real token; only with na == nb): the map tokens
 * of a sample are then its real tokens from p on, on both sides. */
int qkprobe_map_stats(const float *a, const int64_t *as, int64_t na,
                      const float *b, const int64_t *bs, int64_t nb,
                      int64_t H, int64_t R, int64_t p, int64_t k,
                      float *out, const int64_t *os, int64_t item_start, int64_t item_end,
                      const uint8_t *mask, int64_t ms)
{
    if (k < 1 || k > KMAX || p < 0 || p + k > na || p + k > nb || (mask && na != nb))
        return 1;
#pragma omp parallel for schedule(static)
    for (int64_t item = item_start; item < item_end; item++) {
        const int64_t s = item / H, h = item % H;
        float *o = out + s * os[0] + h * os[1];
        int64_t idx[mask ? na : 1], cnt_a = na - p, cnt_b = nb - p;
        const int64_t *list = 0;
        if (mask) {
            cnt_a = 0;
            for (int64_t n = p; n < na; n++)
                if (mask[s * ms + n]) idx[cnt_a++] = n;
            cnt_b = cnt_a;
            list = idx;
        }
        side_stats(a + s * as[0] + h * as[1], as[2], p, list, cnt_a, R, k, o, os[2], os[3]);
        side_stats(b + s * bs[0] + h * bs[1], bs[2], p, list, cnt_b, R, k, o + 5 * os[3], os[2], os[3]);
        for (int64_t r = 0; r < R; r++) {
            float *x = o + r * os[2];
            x[10 * os[3]] = x[os[3]] * x[6 * os[3]];
            x[11 * os[3]] = x[2 * os[3]] * x[7 * os[3]];
        }
    }
    return 0;
}

/* The attention-share statistics from the attended key coordinates pb = P b:
 *
 *   contrib[s, h, r] = scale * S[h, r] * (1/Na) * sum_i a_ir (pb_ir - mean_j b_jr)
 *                    = scale * S[h, r] * (sum_i a_ir pb_ir - (sum_i a_ir)(sum_j b_jr) / Nb) / Na
 *   share[s, h, r]   = contrib / sum_r' contrib  (0 where that sum is 0)
 *
 * over all tokens (prefix included); a (B, H, Na, R), pb (B, H, Na, R), b (B, H, Nb, R) with unit
 * stride over R, S (H, R) contiguous; written to out[s, h, r, col] and out[.., col + 1]. With a
 * mask ((B, Na) bytes, row stride ms, Na == Nb) the sums and counts run over the real tokens of
 * each sample (queries and keys); a sample with none gets NaN. */
void qkprobe_share(const float *a, const int64_t *as, int64_t na, const float *pb, const int64_t *ps,
                   const float *b, const int64_t *bs, int64_t nb, int64_t B, int64_t H, int64_t R,
                   const float *S, float scale, float *out, const int64_t *os, int64_t col,
                   const uint8_t *mask, int64_t ms)
{
#pragma omp parallel for schedule(static)
    for (int64_t item = 0; item < B * H; item++) {
        float dot[R], sa[R], sb[R];
        const int64_t s = item / H, h = item % H;
        const float *A = a + s * as[0] + h * as[1], *P = pb + s * ps[0] + h * ps[1], *K = b + s * bs[0] + h * bs[1];
        const uint8_t *m = mask ? mask + s * ms : 0;
        int64_t cq = 0, ck = 0;
        for (int64_t r = 0; r < R; r++) { dot[r] = 0.0f; sa[r] = 0.0f; sb[r] = 0.0f; }
        for (int64_t i = 0; i < na; i++) {
            if (m && !m[i]) continue;
            const float *x = A + i * as[2], *y = P + i * ps[2];
            for (int64_t r = 0; r < R; r++) { dot[r] += x[r] * y[r]; sa[r] += x[r]; }
            cq++;
        }
        for (int64_t j = 0; j < nb; j++) {
            if (m && !m[j]) continue;
            const float *z = K + j * bs[2];
            for (int64_t r = 0; r < R; r++) sb[r] += z[r];
            ck++;
        }
        float *o = out + s * os[0] + h * os[1] + col * os[3];
        float total = 0.0f;
        for (int64_t r = 0; r < R; r++) {
            const float c = cq == 0 ? NAN : scale * S[h * R + r] * (dot[r] - sa[r] * sb[r] / (float)ck) / (float)cq;
            o[r * os[2]] = c;
            total += c;
        }
        for (int64_t r = 0; r < R; r++)
            o[r * os[2] + os[3]] = total != 0.0f ? o[r * os[2]] / total : 0.0f;
    }
}
