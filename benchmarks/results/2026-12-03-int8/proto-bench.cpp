// prototype: q4_k-like 16-row interleaved dpbusd vs. per-row bf16 path cost, in cache, 1 thread
#include <immintrin.h>
#include <cstdint>
#include <cstdio>
#include <chrono>
#include <vector>
#include <cstring>
#ifndef NA
#define NA 2
#endif
// layout: per chunk (128 cols), 16 zmm: zmm m = words m of 16 rows (lane = row). word holds 8 nibbles
// nibble order like cadenza: low16 (col 2m) nibbles n0..3 -> cols 2m+32n ; high16 -> cols 2m+1+32n
// bytes after &0x0F: b0=col 2m (g0), b1=col 64+2m (g2), b2 = col 2m+1 (g0), b3=col 65+2m (g2)
// after >>4 &0x0F: cols 32+2m (g1), 96+2m (g3), 33+2m (g1), 97+2m(g3)
// staged activation per chunk: for word m: 4 quads (gA0: x2m,0,x2m+1,0), (gA2: 0,x64+2m,0,x65+2m), (g1..), (g3..) => 16 bytes per m
__attribute__((target("avx512vnni,avx512bw,avx512f")))
void dot16(const uint8_t* w, const int8_t* xq, const float* S, const float* M, const float* G, const float* dx, int K, float* out) {
  __m512 facc = _mm512_setzero_ps();
  const __m512i lo = _mm512_set1_epi8(0x0F);
  for (int c = 0; c < K / 128; ++c) {
    __m512i A[4][NA];
    for (int i = 0; i < 4; ++i) for (int j = 0; j < NA; ++j) A[i][j] = _mm512_setzero_si512();
    const uint8_t* p = w + c * 1024;
    const int8_t* xc = xq + c * 256;
#pragma GCC unroll 16
    for (int m = 0; m < 16; ++m) {
      __m512i v = _mm512_loadu_si512(p + 64 * m);
      __m512i b = _mm512_and_si512(v, lo);
      __m512i s = _mm512_and_si512(_mm512_srli_epi32(v, 4), lo);
      const int32_t* q = reinterpret_cast<const int32_t*>(xc + 16 * m);
      A[0][m % NA] = _mm512_dpbusd_epi32(A[0][m % NA], b, _mm512_set1_epi32(q[0]));
      A[2][m % NA] = _mm512_dpbusd_epi32(A[2][m % NA], b, _mm512_set1_epi32(q[1]));
      A[1][m % NA] = _mm512_dpbusd_epi32(A[1][m % NA], s, _mm512_set1_epi32(q[2]));
      A[3][m % NA] = _mm512_dpbusd_epi32(A[3][m % NA], s, _mm512_set1_epi32(q[3]));
    }
    __m512i a0 = A[0][0], a1 = A[1][0], a2 = A[2][0], a3 = A[3][0];
    for (int j = 1; j < NA; ++j) { a0 = _mm512_add_epi32(a0, A[0][j]); a1 = _mm512_add_epi32(a1, A[1][j]); a2 = _mm512_add_epi32(a2, A[2][j]); a3 = _mm512_add_epi32(a3, A[3][j]); }
    const __m512 d = _mm512_set1_ps(dx[c]);
    const float* Sc = S + c * 64; const float* Mc = M + c * 64; const float* Gc = G + c * 4;
    facc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a0), _mm512_mul_ps(_mm512_loadu_ps(Sc), d), facc);
    facc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a1), _mm512_mul_ps(_mm512_loadu_ps(Sc + 16), d), facc);
    facc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a2), _mm512_mul_ps(_mm512_loadu_ps(Sc + 32), d), facc);
    facc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a3), _mm512_mul_ps(_mm512_loadu_ps(Sc + 48), d), facc);
    facc = _mm512_fnmadd_ps(_mm512_loadu_ps(Mc), _mm512_set1_ps(Gc[0]), facc);
    facc = _mm512_fnmadd_ps(_mm512_loadu_ps(Mc + 16), _mm512_set1_ps(Gc[1]), facc);
    facc = _mm512_fnmadd_ps(_mm512_loadu_ps(Mc + 32), _mm512_set1_ps(Gc[2]), facc);
    facc = _mm512_fnmadd_ps(_mm512_loadu_ps(Mc + 48), _mm512_set1_ps(Gc[3]), facc);
  }
  _mm512_storeu_ps(out, facc);
}

__attribute__((target("avx512vnni,avx512bw,avx512f")))
void dot16i(const uint8_t* w, const int8_t* xq, const float* S, const float* M, const float* G, const float* dx, int K, float* out) {
  __m512 facc = _mm512_setzero_ps();
  const __m512i lo = _mm512_set1_epi8(0x0F);
  for (int c = 0; c < K / 128; ++c) {
    __m512i A[4][2];
    for (int i = 0; i < 4; ++i) for (int j = 0; j < 2; ++j) A[i][j] = _mm512_setzero_si512();
    const uint8_t* p = w + c * 1024;
    const int8_t* xc = xq + c * 128;
#pragma GCC unroll 16
    for (int m = 0; m < 16; ++m) {
      __m512i v = _mm512_loadu_si512(p + 64 * m);
      __m512i b = _mm512_and_si512(v, lo);
      __m512i s = _mm512_and_si512(_mm512_srli_epi32(v, 4), lo);
      const int32_t* q = reinterpret_cast<const int32_t*>(xc + 8 * m);
      A[m / 4][m % 2] = _mm512_dpbusd_epi32(A[m / 4][m % 2], b, _mm512_set1_epi32(q[0]));
      A[m / 4][m % 2] = _mm512_dpbusd_epi32(A[m / 4][m % 2], s, _mm512_set1_epi32(q[1]));
    }
    const __m512 d = _mm512_set1_ps(dx[c]);
    const float* Sc = S + c * 64; const float* Mc = M + c * 64; const float* Gc = G + c * 4;
    for (int g = 0; g < 4; ++g) {
      facc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(A[g][0], A[g][1])), _mm512_mul_ps(_mm512_loadu_ps(Sc + 16 * g), d), facc);
      facc = _mm512_fnmadd_ps(_mm512_loadu_ps(Mc + 16 * g), _mm512_set1_ps(Gc[g]), facc);
    }
  }
  _mm512_storeu_ps(out, facc);
}

// row-major, current words: permt2b to natural order, maddubs + dpwssd with int16 group scales, f32 per super-block
__attribute__((target("avx512vnni,avx512vbmi,avx512bw,avx512f")))
void dot4q8(const uint8_t* w, const int8_t* xq, const int16_t* sc16, const float* D, const float* dx, int K, float* out) {
  const __m512i lo = _mm512_set1_epi8(0x0F);
  alignas(64) uint8_t i0[64], i1[64];
  for (int i = 0; i < 64; ++i) { i0[i] = i < 32 ? 2 * i : 64 + 2 * (i - 32); i1[i] = i0[i] + 1; }
  const __m512i idx0 = _mm512_load_si512(i0), idx1 = _mm512_load_si512(i1);
  alignas(64) uint16_t s0[32], s1[32];
  for (int i = 0; i < 32; ++i) { s0[i] = i / 16; s1[i] = 2 + i / 16; }
  const __m512i sidx0 = _mm512_load_si512(s0), sidx1 = _mm512_load_si512(s1);
  __m512 f[4];
  for (int r = 0; r < 4; ++r) f[r] = _mm512_setzero_ps();
  for (int sb = 0; sb < K / 256; ++sb) {
    __m512i acc[4];
    for (int r = 0; r < 4; ++r) acc[r] = _mm512_setzero_si512();
    for (int cc = 0; cc < 2; ++cc) {
      const int c = 2 * sb + cc;
      const uint8_t* p = w + c * 256;
      const __m512i x0 = _mm512_loadu_si512(xq + c * 128), x1 = _mm512_loadu_si512(xq + c * 128 + 64);
      for (int r = 0; r < 4; ++r) {
        const __m512i v = _mm512_loadu_si512(p + 64 * r);
        const __m512i A = _mm512_and_si512(v, lo), B = _mm512_and_si512(_mm512_srli_epi16(v, 4), lo);
        const __m512i C0 = _mm512_permutex2var_epi8(A, idx0, B), C1 = _mm512_permutex2var_epi8(A, idx1, B);
        const __m512i sv = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc16 + r * 128 + 4 * c)));
        acc[r] = _mm512_dpwssd_epi32(acc[r], _mm512_maddubs_epi16(C0, x0), _mm512_permutexvar_epi16(sidx0, sv));
        acc[r] = _mm512_dpwssd_epi32(acc[r], _mm512_maddubs_epi16(C1, x1), _mm512_permutexvar_epi16(sidx1, sv));
      }
    }
    for (int r = 0; r < 4; ++r) f[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r]), _mm512_set1_ps(D[r * 16 + sb] * dx[sb]), f[r]);
  }
  for (int r = 0; r < 4; ++r) out[r] = _mm512_reduce_add_ps(f[r]);
}
// current style: 4-row tile, vpermw + dpbf16 per 32 cols
__attribute__((target("avx512bf16,avx512bw,avx512f")))
void dot4(const uint8_t* w, const uint16_t* x, const float* sc, int K, float* out, const uint16_t* lutp) {
  __m512 tot[4][2];
  for (int r = 0; r < 4; ++r) tot[r][0] = tot[r][1] = _mm512_setzero_ps();
  const __m512i lut = _mm512_loadu_si512(lutp);
  for (int c = 0; c < K / 128; ++c) {
    const uint8_t* p = w + c * 256;
    __m512bh xh[4];
    for (int gi = 0; gi < 4; ++gi) xh[gi] = (__m512bh)_mm512_loadu_si512(x + c * 128 + 32 * gi);
    for (int r = 0; r < 4; ++r) {
      const __m512i v = _mm512_loadu_si512(p + 64 * r);
#pragma GCC unroll 4
      for (int gi = 0; gi < 4; ++gi) {
        __m512i idx = _mm512_srli_epi16(v, 4 * gi);
        const __m512bh wv = (__m512bh)_mm512_permutexvar_epi16(idx, lut);
        const __m512 s = _mm512_set1_ps(sc[r * 128 + c * 4 + gi]);
        __m512 acc = _mm512_dpbf16_ps(_mm512_setzero_ps(), wv, xh[gi]);
        tot[r][gi & 1] = _mm512_fmadd_ps(acc, s, tot[r][gi & 1]);
      }
    }
  }
  for (int r = 0; r < 4; ++r) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(tot[r][0], tot[r][1]));
}

#include <omp.h>
#include <cstdlib>
__attribute__((target("avx512f"))) void readonly(const uint8_t* w, int K, float* out) {
  __m512i acc = _mm512_setzero_si512();
  for (int i = 0; i < K * 8; i += 64) acc = _mm512_xor_si512(acc, _mm512_loadu_si512(w + i));
  _mm512_storeu_si512(out, acc);
}
int main(int argc, char** argv) {
  const int K = 4096;
  const size_t unit = size_t(16) * K / 2;  // 16 rows of K cols, 4-bit: 32 KB
  std::vector<int8_t> xq(K * 2); for (int i = 0; i < K*2; ++i) xq[i] = (i * 37) % 255 - 127;
  std::vector<uint16_t> lutv(32); for (int i = 0; i < 32; ++i) lutv[i] = 0x3f80 + i * 0x10;
  std::vector<uint16_t> xb(K); for (int i = 0; i < K; ++i) xb[i] = 0x3f80 + (i % 7);
  std::vector<float> S(K, 0.5f), M(K, 0.1f), G(K / 32, 0.3f), dx(K / 128, 0.01f), sc(128 * 4, 1.0f);
  const char* names[5] = {"dot4_bf16(current)", "dot16_q8(same words)", "dot16i_q8(ideal bytes)", "read", "dot4q8(rows, permute)"};
  std::vector<int16_t> sc16(4 * 136, 3);
  int tlist[5] = {1, 1, 4, 8, omp_get_max_threads()};
  for (int ti = 0; ti < 5; ++ti) {
    int big = ti > 0; int threads = tlist[ti];
    size_t units = big ? size_t(4) << 30 >> 15 : 16;  // 4 GiB or 512 KB
    uint8_t* w = static_cast<uint8_t*>(aligned_alloc(64, units * unit));
#pragma omp parallel for num_threads(threads)
    for (size_t i = 0; i < units * unit; ++i) w[i] = uint8_t((i * 2654435761u) >> 13);
    for (int v = 0; v < 5; ++v) {
      double best = 0;
      for (int rep = 0; rep < 3; ++rep) {
        int it = big ? 2 : 400;
        double t0 = omp_get_wtime();
#pragma omp parallel num_threads(threads)
        {
          float out[16]; double sink = 0;
          for (int i = 0; i < it; ++i) {
#pragma omp for schedule(static) nowait
            for (size_t u = 0; u < units; ++u) {
              const uint8_t* p = w + u * unit;
              if (v == 0) for (int r = 0; r < 16; r += 4) dot4(p + size_t(r) * K / 2, xb.data(), sc.data(), K, out, lutv.data());
              else if (v == 1) dot16(p, xq.data(), S.data(), M.data(), G.data(), dx.data(), K, out);
              else if (v == 2) dot16i(p, xq.data(), S.data(), M.data(), G.data(), dx.data(), K, out);
              else if (v == 3) readonly(p, K, out);
              else for (int r = 0; r < 16; r += 4) dot4q8(p + size_t(r) * K / 2, xq.data(), sc16.data(), S.data(), dx.data(), K, out);
              sink += out[0];
            }
          }
          if (sink == 12345) printf("!");
        }
        double gbs = double(it) * units * unit / (omp_get_wtime() - t0) / 1e9;
        if (gbs > best) best = gbs;
      }
      printf("%s threads=%d %-24s %.1f GB/s\n", big ? "DRAM 4GiB" : "L2 512KB ", threads, names[v], best);
    }
    free(w);
  }
}
