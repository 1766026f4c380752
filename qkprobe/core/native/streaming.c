/* Streaming state updates (CPU): dataset aggregates and top-k samples, in place.
 *
 * Both read a batch x viewed as (B, L, G, S) with arbitrary strides xs[4] (L: layers updated
 * together, G: heads x modes, S: statistics).
 *
 * qkprobe_aggregate: fold the columns cols[0..C) of x into per-element count, mean, M2, min, max
 * and nonfinite, each (L, G, C) contiguous (float64 / int64). Per element, the batch's finite
 * values give n_b, mean_b and M2_b (two passes), merged by Chan et al.:
 *     n = n_a + n_b,  d = mean_b - mean_a,  mean = mean_a + d n_b / n,  M2 = M2_a + M2_b + d^2 n_a n_b / n.
 * Non-finite values are skipped and counted.
 *
 * qkprobe_topk_update: fold the scores in columns pos and neg of x, with sample indices (B,), into
 * the state scores (L, G, 2, K) float32 / index (L, G, 2, K) int64, each row sorted by score
 * descending, ties to the lower index; empty slots hold (-inf, -1). Non-finite scores are empty
 * slots, so they are skipped. Each candidate is inserted by shifting the worse entries down.
 */
#include <math.h>
#include <stdint.h>

void qkprobe_aggregate(const float *x, int64_t B, int64_t L, int64_t G, const int64_t *xs,
                       const int64_t *cols, int64_t C, int64_t *count, double *mean, double *m2,
                       double *mn, double *mx, int64_t *nonfinite)
{
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t l = 0; l < L; l++) {
        for (int64_t g = 0; g < G; g++) {
            for (int64_t c = 0; c < C; c++) {
                const float *v0 = x + l * xs[1] + g * xs[2] + cols[c] * xs[3];
                const int64_t e = (l * G + g) * C + c;
                int64_t n = 0;
                double sum = 0.0, lo = INFINITY, hi = -INFINITY;
                for (int64_t b = 0; b < B; b++) {
                    const double v = v0[b * xs[0]];
                    if (!isfinite(v))
                        continue;
                    n++;
                    sum += v;
                    lo = v < lo ? v : lo;
                    hi = v > hi ? v : hi;
                }
                nonfinite[e] += B - n;
                if (n == 0)
                    continue;
                const double mean_b = sum / (double)n;
                double m2_b = 0.0;
                for (int64_t b = 0; b < B; b++) {
                    const double v = v0[b * xs[0]];
                    if (isfinite(v))
                        m2_b += (v - mean_b) * (v - mean_b);
                }
                const double na = (double)count[e], nb = (double)n, total = na + nb;
                const double delta = mean_b - mean[e];
                mean[e] += delta * (nb / total);
                m2[e] += m2_b + delta * delta * (na * nb / total);
                count[e] += n;
                mn[e] = lo < mn[e] ? lo : mn[e];
                mx[e] = hi > mx[e] ? hi : mx[e];
            }
        }
    }
}

static inline int better(float s, int64_t i, float t, int64_t j)
{
    return s > t || (s == t && i < j);
}

void qkprobe_topk_update(const float *x, int64_t B, int64_t L, int64_t G, const int64_t *xs, int64_t pos,
                         int64_t neg, const int64_t *sample_index, float *scores, int64_t *index, int64_t K)
{
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t l = 0; l < L; l++) {
        for (int64_t g = 0; g < G; g++) {
            for (int sign = 0; sign < 2; sign++) {
                const float *v0 = x + l * xs[1] + g * xs[2] + (sign ? neg : pos) * xs[3];
                float *S = scores + ((l * G + g) * 2 + sign) * K;
                int64_t *I = index + ((l * G + g) * 2 + sign) * K;
                for (int64_t b = 0; b < B; b++) {
                    const float s = v0[b * xs[0]];
                    const int64_t i = sample_index[b];
                    if (!isfinite(s) || !better(s, i, S[K - 1], I[K - 1]))
                        continue;
                    int64_t p = K - 1;
                    while (p > 0 && better(s, i, S[p - 1], I[p - 1])) {
                        S[p] = S[p - 1];
                        I[p] = I[p - 1];
                        p--;
                    }
                    S[p] = s;
                    I[p] = i;
                }
            }
        }
    }
}
