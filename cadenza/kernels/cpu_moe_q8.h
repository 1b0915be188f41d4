// cpu_moe.cpp's int8-activation path: the activations are quantized to int8 per 256 columns, as llama.cpp's q8_K
// does, and the products are integer dot products. K-quant tiles (q4_k, q5_k, q6_k): vpmaddubsw on the unsigned codes,
// vpdpwssd applying each group's integer scale, about half the instructions a weight of the vdpbf16ps path. int8 and
// q8_0 tiles: vpdpbusd on the codes flipped to unsigned (q + 128, the 128 taken back through the groups' sums of x),
// 64 products an instruction against 16 a conversion and an FMA on fp32 lanes. Approximate: each activation carries
// 8 bits (the weights' codes stay exact); the tests bound its error against the exact path. Included by cpu_moe.cpp
// after its common definitions (Args, Scales, Fmt).
//
// A staged Q8 row of Kp columns (Kp a multiple of 256): int8 q [Kp], where per 256 columns dx = max |x| / 127 and
// q = round(x * (127 / max |x|)) (to nearest even, in fp32), so x ~ q dx; then fp32 dx [Kp / 256]; then fp32 sums of
// q dx per 16, 32, 64 and 128 columns and over the row (Q8Row; integer sums times dx): what a group's offset or min
// multiplies (q6_k: sum (q - 32) s x = s sum q x - 32 s sum x; q4_k, q5_k: minus min sum x; int8: minus 128 s sum x).
//
// The tiles are the vdpbf16ps path's (cpu_moe.cpp's header): per 128 columns a row's 64 bytes hold 16-bit words j
// with columns 32 n + j in nibble n. The low and high nibbles of the bytes, put in column order by one two-source
// byte permute each (vpermt2b), give two registers of 64 codes in natural order; q5_k's 5th bits are a byte mask
// of the same columns, q6_k's high pairs one variable shift of its 32 bytes. Each 16-bit lane of vpmaddubsw's
// result is two neighbouring columns of one group, which vpdpwssd multiplies by that group's scale (int16: q4_k,
// q5_k 6-bit, q6_k int8) into int32 sums per super-block (256 columns), scaled by d dx in fp32 per super-block.

inline bool kquant_fmt(int fmt) { return fmt == Q4_K || fmt == Q5_K || fmt == Q6_K; }
inline bool q8_fmt(int fmt) { return kquant_fmt(fmt) || fmt == INT8 || fmt == Q8_0; }

inline int64_t q8_row_bytes(int64_t Kp) {
  return (Kp + 4 * (Kp / 256 + Kp / 16 + Kp / 32 + Kp / 64 + Kp / 128 + 16) + 63) / 64 * 64;
}

struct Q8Row {  // where a staged row's parts are
  const int8_t* q;
  const float *dx, *s16, *s32, *s64, *s128;
  float total;
  Q8Row(const void* row, int64_t Kp) {
    q = static_cast<const int8_t*>(row);
    dx = reinterpret_cast<const float*>(q + Kp);
    s16 = dx + Kp / 256;
    s32 = s16 + Kp / 16;
    s64 = s32 + Kp / 32;
    s128 = s64 + Kp / 64;
    total = s128[Kp / 128];
  }
  const float* sums(int cols) const { return cols == 16 ? s16 : cols == 32 ? s32 : cols == 64 ? s64 : s128; }
};

// x [Kp] fp32 -> a staged Q8 row (above). A block whose max is below 1e-30 stages as zeros (127 / max would overflow).
inline void q8_quantize(const float* x, int64_t Kp, uint8_t* row) {
  int8_t* q = reinterpret_cast<int8_t*>(row);
  float* dx = reinterpret_cast<float*>(row + Kp);
  float* s16 = dx + Kp / 256;
  float* s32 = s16 + Kp / 16;
  float* s64 = s32 + Kp / 32;
  float* s128 = s64 + Kp / 64;
  float total = 0.0f;
  const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  for (int64_t b = 0; b < Kp / 256; ++b) {
    const float* xb = x + 256 * b;
    __m512 mx = _mm512_setzero_ps();
    for (int i = 0; i < 256; i += 16) mx = _mm512_max_ps(mx, _mm512_and_ps(_mm512_loadu_ps(xb + i), sign));
    const float amax = _mm512_reduce_max_ps(mx);
    const bool zero = !(amax >= 1e-30f);
    const float d = zero ? 0.0f : amax / 127.0f;
    const __m512 inv = _mm512_set1_ps(zero ? 0.0f : 127.0f / amax);
    dx[b] = d;
    int32_t sums[16];
    for (int i = 0; i < 16; ++i) {
      const __m512i qi = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xb + 16 * i), inv));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 256 * b + 16 * i), _mm512_cvtsepi32_epi8(qi));
      sums[i] = _mm512_reduce_add_epi32(qi);
    }
    for (int i = 0; i < 16; ++i) s16[16 * b + i] = float(sums[i]) * d;
    for (int i = 0; i < 8; ++i) s32[8 * b + i] = float(sums[2 * i] + sums[2 * i + 1]) * d;
    for (int i = 0; i < 4; ++i) s64[4 * b + i] = float(sums[4 * i] + sums[4 * i + 1] + sums[4 * i + 2] + sums[4 * i + 3]) * d;
    int32_t half[2] = {0, 0};
    for (int i = 0; i < 16; ++i) half[i / 8] += sums[i];
    for (int i = 0; i < 2; ++i) s128[2 * b + i] = float(half[i]) * d;
    total += float(half[0] + half[1]) * d;
  }
  s128[Kp / 128] = total;
}

// A tile's fields for dot_q8, as flat arrays over its rows' groups (row r's group g at r ng + g): integer scales sc16
// (16 entries of slack after the last row: the kernel's 16-byte loads of a row's last chunk run past it), super-block
// scales D [ROWS ns] and per-group offsets M (q4_k, q5_k: dmin m; q6_k: 32 d sc). A super-block is 8 groups (q6_k:
// 16), so group G's super-block is G / 8 (G / 16) in the flat order too.
inline void Scales::load_q8(int fmt, const uint8_t* tile, int ng) {
  const int per = fmt == Q6_K ? 16 : 8;  // groups a super-block
  ns = ng / per;
  const int n = ROWS * ng, nb = ROWS * ns;
  if (int(sc16.size()) < n + 32) sc16.assign(n + 32, 0);
  if (int(buf.size()) < nb + n + 16) buf.resize(nb + n + 16);
  float* d = buf.data();
  float* m = d + nb;
  sc = d;  // (D)
  mn = m;  // (M)
  const uint16_t* h = reinterpret_cast<const uint16_t*>(tile);
  const uint8_t* scb = reinterpret_cast<const uint8_t*>(h + (fmt == Q6_K ? 1 : 2) * nb);
  int16_t* s16 = sc16.data();
  for (int i = 0; i < nb; ++i) d[i] = _cvtsh_ss(h[i]);
  for (int g = 0; g < n; g += 32) {  // widen the scales, 32 at a time (n is a multiple of 8)
    const __mmask32 k = n - g >= 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << (n - g)) - 1u);
    const __m256i b = _mm256_maskz_loadu_epi8(k, scb + g);
    _mm512_mask_storeu_epi16(s16 + g, k, fmt == Q6_K ? _mm512_cvtepi8_epi16(b) : _mm512_cvtepu8_epi16(b));
  }
  if (fmt == Q6_K) {  // M = 32 d sc: 16 groups are one super-block
    for (int b = 0; b < nb; ++b) {
      const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scb + 16 * b))));
      _mm512_storeu_ps(m + 16 * b, _mm512_mul_ps(v, _mm512_set1_ps(32.0f * d[b])));
    }
  } else {  // q4_k, q5_k: M = dmin m, dmin fp16 [ROWS ns] after d, m uint8 after sc; 16 groups: two super-blocks
    const uint16_t* dm = h + nb;
    const uint8_t* mb = scb + n;
    for (int g = 0; g < n; g += 16) {
      const int b = g / 8;
      const float d1 = b + 1 < nb ? _cvtsh_ss(dm[b + 1]) : 0.0f;
      const __m512 dmin = _mm512_mask_blend_ps(__mmask16(0xFF00), _mm512_set1_ps(_cvtsh_ss(dm[b])), _mm512_set1_ps(d1));
      const __mmask16 k = n - g >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - g)) - 1u);
      const __m512 mv = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, mb + g)));
      _mm512_storeu_ps(m + g, _mm512_mul_ps(mv, dmin));
    }
  }
}

// Index tables: the byte permutes that put a chunk's low (A) and high (B) nibbles in column order (A's even bytes
// are columns 0..31, its odd bytes 64..95; B's even bytes 32..63, odd 96..127), and the word permutes that spread a
// chunk's group scales over the 16-bit lanes of columns 0..63 and 64..127 (groups of 32: 16 lanes each; of 16: 8).
struct Q8Tables {
  alignas(64) uint8_t lo[64], hi[64];
  alignas(64) uint16_t g32[2][32], g16[2][32];
  alignas(64) uint16_t q6_shift[2][32];  // q6_k: where each half's high pairs sit (bits 0, 2 | 4, 6) -> bits 4, 5
  Q8Tables() {
    for (int i = 0; i < 64; ++i) {
      lo[i] = uint8_t(i < 32 ? 2 * i : 64 + 2 * (i - 32));
      hi[i] = uint8_t(lo[i] + 1);
    }
    for (int i = 0; i < 32; ++i) {
      g32[0][i] = uint16_t(i / 16);
      g32[1][i] = uint16_t(2 + i / 16);
      g16[0][i] = uint16_t(i / 8);
      g16[1][i] = uint16_t(4 + i / 8);
      q6_shift[0][i] = i < 16 ? 4 : 2;  // left: columns 0..31 from bits 0, 1; 32..63 from bits 2, 3
      q6_shift[1][i] = i < 16 ? 0 : 2;  // right: columns 64..95 from bits 4, 5; 96..127 from bits 6, 7
    }
  }
};
const Q8Tables q8t;

// out[r][t] = <row r, x[t]> with x[t] a staged Q8 row. Rows go 4 at a time up to 2 tokens, 2 at a time above (the
// int32 and fp32 accumulators of 4 rows x 4 tokens would not fit the 32 registers).
template <int NT, int FMT>
__attribute__((target("avx512vnni,avx512vbmi,avx512bw,avx512f"))) void dot_q8(const Args& a,
                                                                             float out[ROWS][MAX_NT]) {
  constexpr int RP = NT <= 2 ? ROWS : 2;
  constexpr int CB = FMT == Q6_K ? 384 : FMT == Q5_K ? 320 : 256;  // chunk bytes
  constexpr int GPC = FMT == Q6_K ? 8 : 4;                          // groups a chunk
  const Scales& s = *a.s;
  const int K = a.K, ks = a.ks, ng = a.ng, ns = s.ns;
  const __m512i low4 = _mm512_set1_epi8(0x0F), bits45 = _mm512_set1_epi8(0x30), five = _mm512_set1_epi8(0x10);
  const __m512i plo = _mm512_load_si512(q8t.lo), phi = _mm512_load_si512(q8t.hi);
  const __m512i g0 = _mm512_load_si512(FMT == Q6_K ? q8t.g16[0] : q8t.g32[0]);
  const __m512i g1 = _mm512_load_si512(FMT == Q6_K ? q8t.g16[1] : q8t.g32[1]);
  const __m512i sh0 = _mm512_load_si512(q8t.q6_shift[0]), sh1 = _mm512_load_si512(q8t.q6_shift[1]);
  const int8_t* xq[NT];
  const float* dx[NT];
  const float* gs[NT];  // the token's sums per group of this format (16 or 32 columns)
  for (int t = 0; t < NT; ++t) {
    const Q8Row row(a.x[t], ks);
    xq[t] = row.q;
    dx[t] = row.dx;
    gs[t] = row.sums(FMT == Q6_K ? 16 : 32);
  }
  for (int r0 = 0; r0 < ROWS; r0 += RP) {
    __m512 f[RP][NT];
    for (int i = 0; i < RP; ++i)
      for (int t = 0; t < NT; ++t) f[i][t] = _mm512_setzero_ps();
    for (int sb = 0; sb < K / 256; ++sb) {
      __m512i acc[RP][NT];
      for (int i = 0; i < RP; ++i)
        for (int t = 0; t < NT; ++t) acc[i][t] = _mm512_setzero_si512();
      for (int cc = 0; cc < 2; ++cc) {
        const int c = 2 * sb + cc;
        const uint8_t* p = a.data + int64_t(c) * CB;
        if (r0 == 0) {
          prefetch_chunk(p, a.pf);
          if (FMT != Q4_K && a.pf > 0) _mm_prefetch(reinterpret_cast<const char*>(p) + a.pf + 256, _MM_HINT_T0);
          if (FMT == Q6_K && a.pf > 0) _mm_prefetch(reinterpret_cast<const char*>(p) + a.pf + 320, _MM_HINT_T0);
        }
        __m512i x0[NT], x1[NT];
        for (int t = 0; t < NT; ++t) {
          x0[t] = _mm512_loadu_si512(xq[t] + c * 128);
          x1[t] = _mm512_loadu_si512(xq[t] + c * 128 + 64);
        }
        for (int i = 0; i < RP; ++i) {
          const int r = r0 + i;
          const __m512i v = _mm512_loadu_si512(p + 64 * r);
          const __m512i A = _mm512_and_si512(v, low4), B = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
          __m512i c0 = _mm512_permutex2var_epi8(A, plo, B), c1 = _mm512_permutex2var_epi8(A, phi, B);
          if constexpr (FMT == Q5_K) {  // 32-bit word n of the row's 16 bytes: columns 32 n + j at bit j
            uint64_t k[2];
            std::memcpy(k, p + 256 + 16 * r, 16);
            c0 = _mm512_mask_add_epi8(c0, __mmask64(k[0]), c0, five);
            c1 = _mm512_mask_add_epi8(c1, __mmask64(k[1]), c1, five);
          } else if constexpr (FMT == Q6_K) {  // byte j: columns 32 n + j at bits 2 n, 2 n + 1
            const __m512i h = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 256 + 32 * r)));
            c0 = _mm512_ternarylogic_epi32(c0, _mm512_sllv_epi16(h, sh0), bits45, 0xF8);  // c0 | (h' & 0x30)
            c1 = _mm512_ternarylogic_epi32(c1, _mm512_srlv_epi16(h, sh1), bits45, 0xF8);
          }
          const __m512i sv = _mm512_castsi128_si512(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(s.sc16.data() + r * ng + c * GPC)));
          const __m512i s0 = _mm512_permutexvar_epi16(g0, sv), s1 = _mm512_permutexvar_epi16(g1, sv);
          for (int t = 0; t < NT; ++t) {
            acc[i][t] = _mm512_dpwssd_epi32(acc[i][t], _mm512_maddubs_epi16(c0, x0[t]), s0);
            acc[i][t] = _mm512_dpwssd_epi32(acc[i][t], _mm512_maddubs_epi16(c1, x1[t]), s1);
          }
        }
      }
      for (int i = 0; i < RP; ++i)
        for (int t = 0; t < NT; ++t) {
          const float scale = s.sc[(r0 + i) * ns + sb] * dx[t][sb];
          f[i][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][t]), _mm512_set1_ps(scale), f[i][t]);
        }
    }
    for (int i = 0; i < RP; ++i)
      for (int t = 0; t < NT; ++t) {  // minus sum over groups of M * (the group's sum of x): ng is a multiple of 8
        const float* mr = s.mn + (r0 + i) * ng;
        __m512 m = _mm512_setzero_ps();
        for (int g = 0; g < ng; g += 16) {
          const __mmask16 k = ng - g >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (ng - g)) - 1u);
          m = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, mr + g), _mm512_maskz_loadu_ps(k, gs[t] + g), m);
        }
        out[r0 + i][t] = hsum(_mm512_sub_ps(f[i][t], m));
      }
  }
}

// int8 and q8_0 tiles (a chunk: 64 columns a row, in order; scales fp32 per row and group of G columns, G = 0 one per
// row, from Scales::load): sum q s x = s (sum (q + 128) x - 128 sum x), vpdpbusd taking q + 128 = q ^ 0x80 unsigned.
// G = 0 sums a super-block's 4 chunks in int32 (at most 4 x 4 x 255 x 127 a lane), then scales by dx.
template <int NT, int G>
__attribute__((target("avx512vnni,avx512bw,avx512f"))) void dot_q8w(const Args& a, float out[ROWS][MAX_NT]) {
  constexpr int RP = NT <= 2 ? ROWS : 2;
  const float* sc = a.s->sc;
  const int K = a.K, ks = a.ks, ng = a.ng;
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  const int8_t* xq[NT];
  const float* dx[NT];
  const float* gs[NT];
  float total[NT];
  for (int t = 0; t < NT; ++t) {
    const Q8Row row(a.x[t], ks);
    xq[t] = row.q;
    dx[t] = row.dx;
    gs[t] = row.sums(G > 0 ? G : 32);
    total[t] = row.total;
  }
  for (int r0 = 0; r0 < ROWS; r0 += RP) {
    __m512 f[RP][NT];
    for (int i = 0; i < RP; ++i)
      for (int t = 0; t < NT; ++t) f[i][t] = _mm512_setzero_ps();
    for (int sb = 0; sb < K / 256; ++sb) {
      __m512 d[NT];
      for (int t = 0; t < NT; ++t) d[t] = _mm512_set1_ps(dx[t][sb]);
      __m512i acc[RP][NT];
      if constexpr (G == 0)
        for (int i = 0; i < RP; ++i)
          for (int t = 0; t < NT; ++t) acc[i][t] = _mm512_setzero_si512();
      for (int cc = 0; cc < 4; ++cc) {
        const int c = 4 * sb + cc;
        const uint8_t* p = a.data + int64_t(c) * 256;
        if (r0 == 0) prefetch_chunk(p, a.pf);
        __m512i x[NT];
        for (int t = 0; t < NT; ++t) x[t] = _mm512_loadu_si512(xq[t] + 64 * c);
        for (int i = 0; i < RP; ++i) {
          const int r = r0 + i;
          const __m512i u = _mm512_xor_si512(_mm512_loadu_si512(p + 64 * r), flip);
          if constexpr (G == 0) {
            for (int t = 0; t < NT; ++t) acc[i][t] = _mm512_dpbusd_epi32(acc[i][t], u, x[t]);
          } else {
            const float* s = sc + r * ng + c * 64 / G;
            const __m512 sv = G == 32 ? _mm512_mask_blend_ps(__mmask16(0xFF00), _mm512_set1_ps(s[0]), _mm512_set1_ps(s[1]))
                                      : _mm512_set1_ps(s[0]);
            for (int t = 0; t < NT; ++t) {
              const __m512i v = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, x[t]);
              f[i][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), _mm512_mul_ps(sv, d[t]), f[i][t]);
            }
          }
        }
      }
      if constexpr (G == 0)
        for (int i = 0; i < RP; ++i)
          for (int t = 0; t < NT; ++t) f[i][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][t]), d[t], f[i][t]);
    }
    for (int i = 0; i < RP; ++i)
      for (int t = 0; t < NT; ++t) {
        const int r = r0 + i;
        if constexpr (G == 0) {
          out[r][t] = sc[r] * (hsum(f[i][t]) - 128.0f * total[t]);
        } else {  // minus 128 sum over groups of s * (the group's sum of x)
          __m512 m = _mm512_setzero_ps();
          for (int g = 0; g < ng; g += 16) {
            const __mmask16 k = ng - g >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (ng - g)) - 1u);
            m = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, sc + r * ng + g), _mm512_maskz_loadu_ps(k, gs[t] + g), m);
          }
          out[r][t] = hsum(_mm512_fnmadd_ps(m, _mm512_set1_ps(128.0f), f[i][t]));
        }
      }
  }
}

template <int G>
struct Q8W {
  template <int NT>
  struct F {
    static constexpr DotFn fn = dot_q8w<NT, G>;
  };
};

template <int FMT>
struct Q8F {
  template <int NT>
  struct F {
    static constexpr DotFn fn = dot_q8<NT, FMT>;
  };
};
