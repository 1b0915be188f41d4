// cadenza's CPU decode attention over a KV cache in host memory (`--kv-cache host`): one query per row, every row's
// keys and values read once, in place, at memory speed; written here because torch's CPU attention reads a bf16
// cache at a few GB/s (it converts and materialises), and the offline mode's decode steps are this read.
//
// For row b and KV head h, the G = N / K query heads n = h G + g that share the head are computed together, so each
// key and value row is read once for all of them (grouped-query attention). Positions [lo[b], hi[b]) are visible
// (causal, a sliding window or a chunk: always one run of positions at decode). Three passes per (b, h), all fp32
// (16 dot products at a time summed across lanes together; exp as a polynomial, ~1e-7 relative):
//   scores  s[g][j] = scale <q[b, n], k[b, h, lo + j]>
//   softmax p[g][j] = exp(s - m) / (sum_j exp(s - m) + exp(sink[n] - m)), m = max(max_j s, sink[n]) (gpt-oss's sink
//           logit joins the softmax and drops out; without sinks it is absent)
//   values  out[b, n] = sum_j p[g][j] v[b, h, lo + j]
// Keys and values are bf16 (widened exactly) or fp32; any head_dim (a masked load for the last partial 16).
// Plain C ABI through ctypes (which releases the GIL); OpenMP over the (b, h) pairs.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

inline __mmask16 lanes(int n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u); }

// (a full mask takes the plain load: masked ones cost more on some cores)
inline __m512 loadf(const float* p, __mmask16 m) {
  return m == 0xFFFF ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(m, p);
}

// 16 (or the mask's) elements at p, as fp32 lanes: bf16 widened by a shift (exact), fp32 as they are.
inline __m512 load16(const void* p, int64_t i, bool bf16, __mmask16 m) {
  if (bf16) {
    const auto* src = static_cast<const uint16_t*>(p) + i;
    const __m256i h = m == 0xFFFF ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src))
                                  : _mm256_maskz_loadu_epi16(m, src);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  return loadf(static_cast<const float*>(p) + i, m);
}

constexpr int MAX_G = 16;  // query heads per KV head (accumulators in registers)
// Key and value rows are prefetched this many positions ahead: each (row, head) reads two cold blocks of a few tens
// of KB, and the hardware's prefetcher alone left one thread at ~7 GB/s against its 15.5 on a plain read (the
// development machine's Xeon; 8 ahead took one thread 1.35-1.5x faster there, 4 and 16 about the same)
constexpr int PREFETCH_ROWS = 8;

// Every 64-byte line of `bytes` bytes at p, into the nearest cache.
inline void prefetch_row(const uint8_t* p, int bytes) {
  for (int c = 0; c < bytes; c += 64) _mm_prefetch(reinterpret_cast<const char*>(p + c), _MM_HINT_T0);
}

// e^x on 16 lanes (x <= 0 here): 2^n p(r), n = round(x / ln 2), r = x - n ln 2 in two parts, p Cephes' expf
// polynomial; relative error ~1e-7. Below -87 the result is 0 or a denormal, as expf's.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// r[i] = the sum of v[i]'s 16 lanes, for 16 vectors: pairs, then quads within 128-bit lanes, then across them.
inline __m512 reduce16(const __m512 v[16]) {
  __m512 w[8], x[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a0 + a2, b0 + b2, a1 + a3, b1 + b3]
    w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: [A, B, C, D], the partial sums of v[4i .. 4i + 3]
    const __m512d a = _mm512_castps_pd(w[2 * i]), b = _mm512_castps_pd(w[2 * i + 1]);
    x[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 t0 = _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], 0x88), _mm512_shuffle_f32x4(x[0], x[1], 0xDD));
  const __m512 t1 = _mm512_add_ps(_mm512_shuffle_f32x4(x[2], x[3], 0x88), _mm512_shuffle_f32x4(x[2], x[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(t0, t1, 0x88), _mm512_shuffle_f32x4(t0, t1, 0xDD));
}

// GT: the query heads per KV head as a constant (1, 2, 4, 8, 16: the accumulator arrays' indices are then constants
// and they live in registers), or 0: G at run time (other group sizes; slower, the arrays in memory). BF16: the
// cache's type as a constant, so the inner loops carry no branch on it.
template <int GT, bool BF16>
void one_head(int G_, int D, int Dv, const float* q, const uint8_t* k, const uint8_t* v,
              int64_t ks, int64_t vs, int lo, int hi, const float* sinks, float scale, float* out,
              std::vector<float>& sc) {
  constexpr bool bf16 = BF16;
  constexpr int esize = BF16 ? 2 : 4;
  const int G = GT ? GT : G_;
  const int S = hi - lo;
  constexpr int NPOS = GT ? 16 / GT : 16;  // positions per block of 16 dot products (bounds the unrolled loops)
  const int npos = GT ? NPOS : std::max(1, 16 / G);
  sc.resize(size_t(G) * S + 16);
  // scores: one pass over the keys, each row against the G queries; a block's npos x G sums reduced together
  for (int j0 = 0; j0 < S; j0 += npos) {
    const int n = std::min(npos, S - j0);
    __m512 acc[16];
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
    const uint8_t* k0 = k + int64_t(lo + j0) * ks * esize;
    for (int jj = 0; jj < npos && j0 + jj + PREFETCH_ROWS < S; ++jj)
      prefetch_row(k0 + int64_t(jj + PREFETCH_ROWS) * ks * esize, D * esize);
    // columns outer: the G queries' 16 columns are loaded once into registers for the block's npos rows (rows
    // inner took two loads a multiply-add, the load ports' limit); each sum still adds its columns in order
    for (int c = 0; c < D; c += 16) {
      const __mmask16 m = lanes(D - c);
      __m512 qv[GT ? GT : MAX_G];
      for (int g = 0; g < G; ++g) qv[g] = loadf(q + g * D + c, m);
      for (int jj = 0; jj < NPOS; ++jj) {
        if (jj >= n) break;
        const __m512 kv = load16(k0 + int64_t(jj) * ks * esize, c, bf16, m);
        for (int g = 0; g < G; ++g) acc[jj * G + g] = _mm512_fmadd_ps(qv[g], kv, acc[jj * G + g]);
      }
    }
    alignas(64) float r[16];
    _mm512_store_ps(r, _mm512_mul_ps(reduce16(acc), _mm512_set1_ps(scale)));
    for (int jj = 0; jj < n; ++jj)  // to the query heads' rows: s[g][j]
      for (int g = 0; g < G; ++g) sc[size_t(g) * S + j0 + jj] = r[jj * G + g];
  }
  for (int j = 0; j < std::min(S, PREFETCH_ROWS); ++j) prefetch_row(v + int64_t(lo + j) * vs * esize, Dv * esize);
  // softmax per query head (the sink, where given, in the denominator only)
  for (int g = 0; g < G; ++g) {
    float* s = sc.data() + size_t(g) * S;
    __m512 vmax = _mm512_set1_ps(sinks ? sinks[g] : -INFINITY);
    for (int j = 0; j < S; j += 16) vmax = _mm512_mask_max_ps(vmax, lanes(S - j), vmax, loadf(s + j, lanes(S - j)));
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
    __m512 vsum = _mm512_setzero_ps();
    for (int j = 0; j < S; j += 16) {
      const __mmask16 m = lanes(S - j);
      const __m512 e = exp16(_mm512_sub_ps(loadf(s + j, m), mx));
      _mm512_mask_storeu_ps(s + j, m, e);
      vsum = _mm512_mask_add_ps(vsum, m, vsum, e);
    }
    float sum = _mm512_reduce_add_ps(vsum);
    if (sinks) sum += std::exp(sinks[g] - _mm512_cvtss_f32(mx));
    const __m512 inv = _mm512_set1_ps(sum > 0 ? 1.0f / sum : 0.0f);
    for (int j = 0; j < S; j += 16)
      _mm512_mask_storeu_ps(s + j, lanes(S - j), _mm512_mul_ps(loadf(s + j, lanes(S - j)), inv));
  }
  // values: per block of columns whose G outputs fit 16 registers, one sweep over the rows (the head's values stay
  // in cache between sweeps)
  const int cb = 16 * npos;  // columns per block
  for (int c0 = 0; c0 < Dv; c0 += cb) {
    const int nc = (std::min(cb, Dv - c0) + 15) / 16;  // 16-column pieces in this block
    __m512 acc[16];
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
    for (int j = 0; j < S; ++j) {
      const uint8_t* vr = v + int64_t(lo + j) * vs * esize;
      if (c0 == 0 && j + PREFETCH_ROWS < S) prefetch_row(vr + int64_t(PREFETCH_ROWS) * vs * esize, Dv * esize);
      const float* p = sc.data() + j;  // p[g S]: head g's weight of row j
      __m512 pv[GT ? GT : MAX_G];  // broadcast once a row for all the block's column pieces
      for (int g = 0; g < G; ++g) pv[g] = _mm512_set1_ps(p[size_t(g) * S]);
      for (int ci = 0; ci < NPOS; ++ci) {
        if (ci >= nc) break;
        const int c = c0 + 16 * ci;
        const __m512 vv = load16(vr, c, bf16, lanes(Dv - c));
        for (int g = 0; g < G; ++g) acc[ci * G + g] = _mm512_fmadd_ps(pv[g], vv, acc[ci * G + g]);
      }
    }
    for (int ci = 0; ci < NPOS; ++ci) {
      if (ci >= nc) break;
      for (int g = 0; g < G; ++g) {
        const int c = c0 + 16 * ci;
        _mm512_mask_storeu_ps(out + g * Dv + c, lanes(Dv - c), acc[ci * G + g]);
      }
    }
  }
}

using HeadFn = void (*)(int, int, int, const float*, const uint8_t*, const uint8_t*, int64_t, int64_t, int,
                        int, const float*, float, float*, std::vector<float>&);

template <bool BF16>
HeadFn head_fn(int G) {
  switch (G) {
    case 1: return one_head<1, BF16>;
    case 2: return one_head<2, BF16>;
    case 4: return one_head<4, BF16>;
    case 8: return one_head<8, BF16>;
    case 16: return one_head<16, BF16>;
    default: return one_head<0, BF16>;
  }
}

}  // namespace

extern "C" {

// q [B, N, D] fp32 contiguous; k, v: element strides per row (kb, vb), head (kh, vh) and position (ks, vs), the
// last dimension contiguous, bf16 (kv_bf16 = 1) or fp32; lo, hi [B]: each row's visible positions; sinks [N] fp32
// or null; out [B, N, Dv] fp32. Returns 0, or -1 for shapes it does not take (N not a multiple of K, G > 16).
int cadenza_decode_attention(int B, int N, int K, int D, int Dv, const float* q, const void* k, const void* v,
                             int kv_bf16, int64_t kb, int64_t kh, int64_t ks, int64_t vb, int64_t vh, int64_t vs,
                             const int32_t* lo, const int32_t* hi, const float* sinks, float scale, int nthreads,
                             float* out) {
  if (B <= 0 || K <= 0 || N % K != 0 || N / K > MAX_G || D <= 0 || Dv <= 0) return -1;
  const int G = N / K;
  const int esize = kv_bf16 ? 2 : 4;
  if (nthreads <= 0) nthreads = omp_get_max_threads();
  const auto* kp = static_cast<const uint8_t*>(k);
  const auto* vp = static_cast<const uint8_t*>(v);
  const HeadFn fn = kv_bf16 ? head_fn<true>(G) : head_fn<false>(G);
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<float> sc;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < int64_t(B) * K; ++i) {
      const int b = int(i / K), h = int(i % K);
      fn(G, D, Dv, q + (int64_t(b) * N + int64_t(h) * G) * D, kp + (b * kb + h * kh) * esize,
               vp + (b * vb + h * vh) * esize, ks, vs, lo[b], hi[b],
               sinks ? sinks + int64_t(h) * G : nullptr, scale, out + (int64_t(b) * N + int64_t(h) * G) * Dv, sc);
    }
  }
  return 0;
}

}  // extern "C"
