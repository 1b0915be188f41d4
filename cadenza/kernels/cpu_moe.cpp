// cadenza's fused CPU MoE step: all of a layer's CPU experts, for all their tokens, in one OpenMP pass.
//
//   y[t] += sum over (t, slot) routed to a computed expert e of  w[t, slot] * down_e( act(gate_e x_t) * up_e x_t )
//
// Phase 1 splits the (expert, gate/up tile) units over the threads by cost; phase 2 splits the rows of y (the
// down matrices' output rows) over the threads, so no two threads ever write the same y element (no atomics).
// Each thread streams a contiguous range of tiles, so at one token a call is a run of GEMVs at DRAM bandwidth;
// with more tokens, each tile is applied to blocks of tokens while it is in cache.
//
// Layout (written by cpu_moe.py's pack_layer; its dequantize_tiles is the reference reader): a matrix of R rows x
// K columns (both padded to multiples of 128) is R/4 tiles of 4 rows; a tile is [header][chunks], a chunk holds
// the same 64-byte piece of each of the 4 rows one after the other, so a run of tiles is one sequential stream.
//   bf16: a chunk is 32 columns per row; no header.
//   int8: a chunk is 64 columns per row; header: fp32 scales [4 rows][groups]; value = q * scale.
//   int4: a chunk is 128 columns per row: 16-bit word j holds columns 32n + j in its nibbles n = 0..3;
//         header: bf16 scales [4][groups], then uint8 zero points [4][groups]; value = (q - z) * scale.
// Headers are padded to 64 bytes. gate and up share one matrix: tile j holds gate rows 2j, 2j+1, up rows 2j, 2j+1,
// so one stream yields h[2j], h[2j+1].
//
// Activations are staged per call (x by the threads, h by phase 1) in the form the tiles want; a staged row is
// always 4 Hp (or 4 Ip) bytes:
//   pair-split fp32 (bf16, int4 without AVX512_BF16): per 32 columns, the 16 even ones then the 16 odd ones,
//     because a 32-bit lane of bf16 (or of int4 words) holds an even and an odd column;
//   natural fp32 (int8);
//   bf16 hi, then bf16 lo = x - hi (bf16 and int4 with AVX512_BF16: vdpbf16ps multiplies the bf16 weights, or
//     the exact small integers q - z, with hi and lo, which together carry 16 bits of each activation; lo is
//     skipped when x arrives in bf16, as it does from a bf16 model).
//
// Plain C ABI (called through ctypes, which releases the GIL); no torch headers, so the build takes seconds.

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

enum Fmt { BF16 = 0, INT8 = 1, INT4 = 2 };
enum Act { SILU = 0, GELU_TANH = 1, GELU = 2, RELU = 3 };
enum Stage { PAIR_SPLIT = 0, NATURAL = 1, HI_LO = 2 };

constexpr int ROWS = 4;    // rows per tile
constexpr int MAX_NT = 4;  // tokens per micro-kernel call

inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

inline float activate(float g, int act) {
  switch (act) {
    case SILU:
      return g / (1.0f + std::exp(-g));
    case GELU_TANH: {
      const float c = 0.7978845608028654f;  // sqrt(2 / pi)
      return 0.5f * g * (1.0f + std::tanh(c * (g + 0.044715f * g * g * g)));
    }
    case GELU:
      return 0.5f * g * (1.0f + std::erf(g * 0.7071067811865476f));
    default:
      return g > 0.0f ? g : 0.0f;
  }
}

inline uint16_t bf16_rne(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return uint16_t((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

inline float bf16_to_f32(uint16_t h) {
  const uint32_t b = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

// Writes value v of column i into a staged row (n columns) of the given kind.
inline void stage_put(int kind, float* row, int64_t n, int64_t i, float v) {
  if (kind == HI_LO) {
    uint16_t* hl = reinterpret_cast<uint16_t*>(row);
    const uint16_t hi = bf16_rne(v);
    hl[i] = hi;
    hl[n + i] = bf16_rne(v - bf16_to_f32(hi));
  } else if (kind == PAIR_SPLIT) {
    const int64_t r = i & 31;
    row[(i & ~int64_t(31)) + ((r & 1) << 4) + (r >> 1)] = v;
  } else {
    row[i] = v;
  }
}

inline void prefetch_chunk(const uint8_t* p, int pf) {
  if (pf > 0) {
    const char* q = reinterpret_cast<const char*>(p) + pf;
    _mm_prefetch(q, _MM_HINT_T0);
    _mm_prefetch(q + 64, _MM_HINT_T0);
    _mm_prefetch(q + 128, _MM_HINT_T0);
    _mm_prefetch(q + 192, _MM_HINT_T0);
  }
}

// A tile's scales: int8 reads its fp32 header in place; int4's bf16 scales are widened once per tile.
struct Scales {
  std::vector<float> buf;
  const float* sc = nullptr;
  const uint8_t* z = nullptr;
  void load(int fmt, const uint8_t* tile, int ng) {
    if (fmt == INT8) {
      sc = reinterpret_cast<const float*>(tile);
    } else if (fmt == INT4) {
      const int n = ROWS * ng;
      if (int(buf.size()) < n) buf.resize(n);
      const uint16_t* h = reinterpret_cast<const uint16_t*>(tile);
      for (int i = 0; i < n; ++i) buf[i] = bf16_to_f32(h[i]);
      sc = buf.data();
      z = tile + 2 * n;
    }
  }
};

// (q - z) for q = 0..15, per zero point z: as fp32 (16 lanes) and as bf16 words (32 lanes, vpermw's 5-bit index
// sees the next nibble's low bit as bit 4, so entries 16..31 repeat 0..15). Integers below 16: exact in bf16.
struct Luts {
  alignas(64) float f32[16][16];
  alignas(64) uint16_t bf16[16][32];
  Luts() {
    for (int z = 0; z < 16; ++z)
      for (int i = 0; i < 32; ++i) {
        const float v = float((i & 15) - z);
        if (i < 16) f32[z][i] = v;
        bf16[z][i] = bf16_rne(v);
      }
  }
};
const Luts luts;

struct Args {  // one micro-kernel call: a tile's data, K columns, NT staged rows, the tile's scales
  const uint8_t* data;
  int K, ng, pf;
  const float* const* x;
  const Scales* s;
};

// ---- micro-kernels: out[r][t] = <row r of one tile, x[t]> for the tile's 4 rows and NT tokens -----------------
// Small token counts get two accumulators per (row, token): more independent FMA chains.

template <int NT>
void dot_bf16(const Args& a, float out[ROWS][MAX_NT]) {
  constexpr bool TWO = NT <= 2;
  __m512 a0[ROWS][NT], a1[ROWS][NT];
  for (int r = 0; r < ROWS; ++r)
    for (int t = 0; t < NT; ++t) a0[r][t] = a1[r][t] = _mm512_setzero_ps();
  const __m512i hi = _mm512_set1_epi32(int(0xffff0000u));
  const uint8_t* p = a.data;
  for (int c = 0; c < a.K / 32; ++c, p += 256) {
    prefetch_chunk(p, a.pf);
    __m512 xe[NT], xo[NT];
    for (int t = 0; t < NT; ++t) {
      xe[t] = _mm512_loadu_ps(a.x[t] + c * 32);
      xo[t] = _mm512_loadu_ps(a.x[t] + c * 32 + 16);
    }
    for (int r = 0; r < ROWS; ++r) {
      const __m512i v = _mm512_loadu_si512(p + 64 * r);
      const __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      const __m512 wo = _mm512_castsi512_ps(_mm512_and_si512(v, hi));
      for (int t = 0; t < NT; ++t) {
        a0[r][t] = _mm512_fmadd_ps(we, xe[t], a0[r][t]);
        if (TWO)
          a1[r][t] = _mm512_fmadd_ps(wo, xo[t], a1[r][t]);
        else
          a0[r][t] = _mm512_fmadd_ps(wo, xo[t], a0[r][t]);
      }
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int t = 0; t < NT; ++t) out[r][t] = hsum(TWO ? _mm512_add_ps(a0[r][t], a1[r][t]) : a0[r][t]);
}

// bf16 weights with vdpbf16ps on bf16 activations (hi, and lo unless x arrived in bf16): no conversions at all.
template <int NT, bool LO>
__attribute__((target("avx512bf16,avx512bw,avx512f"))) void dot_bf16_dp(const Args& a, float out[ROWS][MAX_NT]) {
  constexpr bool TWO = NT <= 2;
  __m512 a0[ROWS][NT], a1[ROWS][NT];
  for (int r = 0; r < ROWS; ++r)
    for (int t = 0; t < NT; ++t) a0[r][t] = a1[r][t] = _mm512_setzero_ps();
  const int K = a.K;
  const uint16_t* xs[NT];
  for (int t = 0; t < NT; ++t) xs[t] = reinterpret_cast<const uint16_t*>(a.x[t]);
  const uint8_t* p = a.data;
  for (int c = 0; c < K / 32; ++c, p += 256) {
    prefetch_chunk(p, a.pf);
    __m512bh xh[NT], xl[NT];
    for (int t = 0; t < NT; ++t) {
      xh[t] = (__m512bh)_mm512_loadu_si512(xs[t] + c * 32);
      if (LO) xl[t] = (__m512bh)_mm512_loadu_si512(xs[t] + K + c * 32);
    }
    for (int r = 0; r < ROWS; ++r) {
      const __m512bh v = (__m512bh)_mm512_loadu_si512(p + 64 * r);
      for (int t = 0; t < NT; ++t) {
        if (TWO && !LO && (c & 1))
          a1[r][t] = _mm512_dpbf16_ps(a1[r][t], v, xh[t]);
        else
          a0[r][t] = _mm512_dpbf16_ps(a0[r][t], v, xh[t]);
        if (LO) {
          if (TWO)
            a1[r][t] = _mm512_dpbf16_ps(a1[r][t], v, xl[t]);
          else
            a0[r][t] = _mm512_dpbf16_ps(a0[r][t], v, xl[t]);
        }
      }
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int t = 0; t < NT; ++t) out[r][t] = hsum(TWO ? _mm512_add_ps(a0[r][t], a1[r][t]) : a0[r][t]);
}

// G: group size in columns, 0 = one scale per row (applied after the sum).
template <int NT, int G>
void dot_int8(const Args& a, float out[ROWS][MAX_NT]) {
  constexpr bool TWO = NT <= 2;
  __m512 a0[ROWS][NT], a1[ROWS][NT];
  for (int r = 0; r < ROWS; ++r)
    for (int t = 0; t < NT; ++t) a0[r][t] = a1[r][t] = _mm512_setzero_ps();
  const float* sc = a.s->sc;
  const uint8_t* p = a.data;
  for (int c = 0; c < a.K / 64; ++c, p += 256) {
    prefetch_chunk(p, a.pf);
    for (int q = 0; q < 4; ++q) {
      const int k = c * 64 + 16 * q;
      __m512 xv[NT];
      for (int t = 0; t < NT; ++t) xv[t] = _mm512_loadu_ps(a.x[t] + k);
      for (int r = 0; r < ROWS; ++r) {
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 64 * r + 16 * q));
        __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
        if constexpr (G > 0) w = _mm512_mul_ps(w, _mm512_set1_ps(sc[r * a.ng + k / G]));
        for (int t = 0; t < NT; ++t) {
          if (TWO && (q & 1))
            a1[r][t] = _mm512_fmadd_ps(w, xv[t], a1[r][t]);
          else
            a0[r][t] = _mm512_fmadd_ps(w, xv[t], a0[r][t]);
        }
      }
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    const float s = G > 0 ? 1.0f : sc[r];
    for (int t = 0; t < NT; ++t) out[r][t] = s * hsum(TWO ? _mm512_add_ps(a0[r][t], a1[r][t]) : a0[r][t]);
  }
}

// int4 on fp32 lanes (CPUs without AVX512_BF16). A 32-bit lane holds words 2l, 2l+1; shifted right by 4s its low
// 4 bits are nibble s: column 32s + 2l (s < 4) or 32(s - 4) + 2l + 1, found in the pair-split row at 32s + l or
// 32(s - 4) + 16 + l. vpermps picks by those 4 bits from the group's 16 values (q - z) * scale: unpacking is one
// shift. Positions run 0,4,1,5,2,6,3,7 so that a 32-column group's two positions are neighbours.
template <int NT, int G>
void dot_int4_f32(const Args& a, float out[ROWS][MAX_NT]) {
  constexpr bool TWO = NT <= 2;
  constexpr int PER_GROUP = 2 * G / 32;  // positions per group
  __m512 a0[ROWS][NT], a1[ROWS][NT];
  for (int r = 0; r < ROWS; ++r)
    for (int t = 0; t < NT; ++t) a0[r][t] = a1[r][t] = _mm512_setzero_ps();
  const float* sc = a.s->sc;
  const uint8_t* z = a.s->z;
  const int ng = a.ng;
  const uint8_t* p = a.data;
  for (int c = 0; c < a.K / 128; ++c, p += 256) {
    prefetch_chunk(p, a.pf);
    __m512i v[ROWS];
    for (int r = 0; r < ROWS; ++r) v[r] = _mm512_loadu_si512(p + 64 * r);
    __m512 lut[ROWS];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      const int s = (i >> 1) | ((i & 1) << 2);  // 0,4,1,5,2,6,3,7
      if (i % PER_GROUP == 0) {
        const int g = (c * 128 + 32 * (s & 3)) / G;
        for (int r = 0; r < ROWS; ++r)
          lut[r] = _mm512_mul_ps(_mm512_load_ps(luts.f32[z[r * ng + g]]), _mm512_set1_ps(sc[r * ng + g]));
      }
      const int off = c * 128 + 32 * (s & 3) + (s >> 2) * 16;
      __m512 xv[NT];
      for (int t = 0; t < NT; ++t) xv[t] = _mm512_loadu_ps(a.x[t] + off);
      for (int r = 0; r < ROWS; ++r) {
        const __m512 w = _mm512_permutexvar_ps(_mm512_srli_epi32(v[r], 4 * s), lut[r]);
        for (int t = 0; t < NT; ++t) {
          if (TWO && (i & 1))
            a1[r][t] = _mm512_fmadd_ps(w, xv[t], a1[r][t]);
          else
            a0[r][t] = _mm512_fmadd_ps(w, xv[t], a0[r][t]);
        }
      }
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int t = 0; t < NT; ++t) out[r][t] = hsum(TWO ? _mm512_add_ps(a0[r][t], a1[r][t]) : a0[r][t]);
}

// int4 with vdpbf16ps: a word's nibble n, shifted down, indexes vpermw's table of bf16 (q - z): 32 columns
// 32n .. 32n + 31 in natural order per shift + lookup; a group's products sum exactly in fp32, then get its scale.
template <int NT, int G, bool LO>
__attribute__((target("avx512bf16,avx512bw,avx512f"))) void dot_int4_bf16(const Args& a,
                                                                            float out[ROWS][MAX_NT]) {
  constexpr int NG = 128 / G, NPG = G / 32;  // groups per chunk, nibble positions per group
  __m512 tot[ROWS][NT];
  for (int r = 0; r < ROWS; ++r)
    for (int t = 0; t < NT; ++t) tot[r][t] = _mm512_setzero_ps();
  const float* sc = a.s->sc;
  const uint8_t* z = a.s->z;
  const int ng = a.ng, K = a.K;
  const uint16_t* xs[NT];
  for (int t = 0; t < NT; ++t) xs[t] = reinterpret_cast<const uint16_t*>(a.x[t]);
  const uint8_t* p = a.data;
  for (int c = 0; c < K / 128; ++c, p += 256) {
    prefetch_chunk(p, a.pf);
    for (int r = 0; r < ROWS; ++r) {
      const __m512i v = _mm512_loadu_si512(p + 64 * r);
#pragma GCC unroll 4
      for (int gi = 0; gi < NG; ++gi) {
        const int g = c * NG + gi;
        const __m512i lut = _mm512_load_si512(luts.bf16[z[r * ng + g]]);
        __m512bh w[NPG];
#pragma GCC unroll 4
        for (int j = 0; j < NPG; ++j)
          w[j] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4 * (gi * NPG + j)), lut);
        const __m512 s = _mm512_set1_ps(sc[r * ng + g]);
        for (int t = 0; t < NT; ++t) {
          __m512 acc = _mm512_setzero_ps();
          const uint16_t* xt = xs[t] + c * 128 + 32 * gi * NPG;
#pragma GCC unroll 4
          for (int j = 0; j < NPG; ++j) {
            acc = _mm512_dpbf16_ps(acc, w[j], (__m512bh)_mm512_loadu_si512(xt + 32 * j));
            if (LO) acc = _mm512_dpbf16_ps(acc, w[j], (__m512bh)_mm512_loadu_si512(xt + K + 32 * j));
          }
          tot[r][t] = _mm512_fmadd_ps(acc, s, tot[r][t]);
        }
      }
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int t = 0; t < NT; ++t) out[r][t] = hsum(tot[r][t]);
}

using DotFn = void (*)(const Args&, float[ROWS][MAX_NT]);

template <template <int> class F>
DotFn by_nt(int nt) {
  switch (nt) {
    case 1: return F<1>::fn;
    case 2: return F<2>::fn;
    case 3: return F<3>::fn;
    default: return F<4>::fn;
  }
}
template <int G> struct Int8G { template <int NT> struct F { static constexpr DotFn fn = dot_int8<NT, G>; }; };
template <int G> struct Int4F { template <int NT> struct F { static constexpr DotFn fn = dot_int4_f32<NT, G>; }; };
template <int G, bool LO>
struct Int4B { template <int NT> struct F { static constexpr DotFn fn = dot_int4_bf16<NT, G, LO>; }; };
template <int NT> struct Bf16F { static constexpr DotFn fn = dot_bf16<NT>; };
template <bool LO>
struct Bf16D { template <int NT> struct F { static constexpr DotFn fn = dot_bf16_dp<NT, LO>; }; };

template <template <int> class F32, template <int> class F64, template <int> class F128>
DotFn by_group(int group, int nt) {
  return group == 32 ? by_nt<F32>(nt) : group == 64 ? by_nt<F64>(nt) : by_nt<F128>(nt);
}

// The micro-kernel for a format, group size, token count and staging kind.
DotFn pick(int fmt, int group, int nt, int kind, bool lo) {
  if (fmt == BF16) {
    if (kind != HI_LO) return by_nt<Bf16F>(nt);
    return lo ? by_nt<Bf16D<true>::F>(nt) : by_nt<Bf16D<false>::F>(nt);
  }
  if (fmt == INT8) {
    if (group == 0) return by_nt<Int8G<0>::F>(nt);
    return by_group<Int8G<32>::F, Int8G<64>::F, Int8G<128>::F>(group, nt);
  }
  if (kind != HI_LO) return by_group<Int4F<32>::F, Int4F<64>::F, Int4F<128>::F>(group, nt);
  if (lo) return by_group<Int4B<32, true>::F, Int4B<64, true>::F, Int4B<128, true>::F>(group, nt);
  return by_group<Int4B<32, false>::F, Int4B<64, false>::F, Int4B<128, false>::F>(group, nt);
}

// One packed matrix: tiles of 4 rows x K columns.
struct Mat {
  const uint8_t* base;  // expert 0, tile 0
  int64_t expert_stride, tile_bytes, header_bytes;
  int K, ng;  // columns (padded), scale groups per row
};

// Token blocks small enough that their staged rows stay in L2 while a tile is reused across them.
inline int token_block(int K) {
  const int tb = int((640 * 1024) / (int64_t(K) * 4));
  return std::max(MAX_NT, std::min(64, tb / MAX_NT * MAX_NT));
}

// Applies a tile to n tokens (staged rows xrow(i)), calling emit(i, out[ROWS]) per token.
template <class XRow, class Emit>
inline void apply_tile(const Mat& m, int fmt, int group, int kind, bool lo, const uint8_t* tile, Scales& s, int n,
                       XRow xrow, Emit emit, int pf) {
  s.load(fmt, tile, m.ng);
  for (int t0 = 0; t0 < n; t0 += MAX_NT) {
    const int nt = std::min(MAX_NT, n - t0);
    const float* xs[MAX_NT];
    for (int i = 0; i < nt; ++i) xs[i] = xrow(t0 + i);
    float out[ROWS][MAX_NT];
    const Args args{tile + m.header_bytes, m.K, m.ng, pf, xs, &s};
    pick(fmt, group, nt, kind, lo)(args, out);
    for (int i = 0; i < nt; ++i) {
      float o[ROWS];
      for (int r = 0; r < ROWS; ++r) o[r] = out[r][i];
      emit(t0 + i, o);
    }
  }
}

// Per-call work buffers, kept by the calling thread (the engine's CPU worker) so decode allocates nothing.
struct Buffers {
  std::vector<float> xs, h, wp;
  std::vector<int32_t> tok;
};
thread_local Buffers tls;

}  // namespace

extern "C" {

// Bit 0: built with the AVX-512 kernels (always, else the library does not load); bit 1: this build can use
// AVX512_BF16 (the caller still says whether the CPU has it).
int cadenza_cpu_moe_features() { return 3; }

// y [T, H] fp32 (accumulated into) += the routed experts' weighted outputs, for the experts e with mask[e] != 0.
// x [T, H]: fp32 (x_bf16 = 0) or bf16 (x_bf16 = 1); ids [T, k] int64; w [T, k] fp32. use_bf16: the CPU has
// AVX512_BF16 (bf16 and int4 tiles then multiply with vdpbf16ps).
int cadenza_moe_forward(int fmt, int group, int E, int H, int I, int Hp, int Ip, const uint8_t* gu,
                        int64_t gu_expert_stride, int64_t gu_tile_bytes, int64_t gu_header_bytes, const uint8_t* dn,
                        int64_t dn_expert_stride, int64_t dn_tile_bytes, int64_t dn_header_bytes, const void* x,
                        int x_bf16, int T, const int64_t* ids, const float* w, int k, const uint8_t* mask, int act,
                        int nthreads, int prefetch, int use_bf16, float* y) {
  if (T <= 0) return 0;
  (void)I;
  const int ng1 = group > 0 ? Hp / group : 1, ng2 = group > 0 ? Ip / group : 1;
  const Mat mg{gu, gu_expert_stride, gu_tile_bytes, gu_header_bytes, Hp, ng1};
  const Mat md{dn, dn_expert_stride, dn_tile_bytes, dn_header_bytes, Ip, ng2};
  const int kind = fmt == INT8 ? NATURAL : use_bf16 ? HI_LO : PAIR_SPLIT;
  const bool lo1 = !x_bf16;  // bf16 inputs have no low part; h always has one

  // (token, slot) pairs of the computed experts, grouped by expert in token order.
  std::vector<int> count(E, 0), start(E + 1, 0);
  for (int64_t i = 0; i < int64_t(T) * k; ++i) {
    const int64_t e = ids[i];
    if (e >= 0 && e < E && mask[e]) ++count[e];
  }
  std::vector<int> active;
  for (int e = 0; e < E; ++e) {
    start[e + 1] = start[e] + count[e];
    if (count[e]) active.push_back(e);
  }
  const int P = start[E];
  if (P == 0) return 0;
  Buffers& b = tls;
  b.tok.resize(P);
  b.wp.resize(P);
  {
    std::vector<int> fill(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < int64_t(T) * k; ++i) {
      const int64_t e = ids[i];
      if (e >= 0 && e < E && mask[e]) {
        const int p = fill[e]++;
        b.tok[p] = int32_t(i / k);
        b.wp[p] = w[i];
      }
    }
  }
  b.xs.resize(size_t(T) * Hp);
  b.h.resize(size_t(P) * Ip);
  float* xs = b.xs.data();
  float* hb = b.h.data();
  const int32_t* tok = b.tok.data();
  const float* wp = b.wp.data();

  // Phase 1's units are (active expert, gate/up tile); cost = streaming the tile + its tokens' arithmetic.
  const int A = int(active.size());
  const int64_t n1 = Ip / 2;  // gate/up tiles per expert: 2 of h each
  std::vector<double> unit(A);
  double total = 0;
  for (int a = 0; a < A; ++a) {
    unit[a] = double(mg.tile_bytes) / 6.0 + double(count[active[a]]) * ROWS * Hp / 60.0;
    total += unit[a] * double(n1);
  }
  const int64_t n2 = Hp / ROWS;  // down tiles per expert
  const int tb1 = token_block(Hp), tb2 = token_block(Ip);
  if (nthreads <= 0) nthreads = omp_get_max_threads();
  nthreads = int(std::max<int64_t>(1, std::min<int64_t>(nthreads, n1 * A)));

#pragma omp parallel num_threads(nthreads)
  {
    const int nt = omp_get_num_threads(), id = omp_get_thread_num();
    Scales s;

    // Stage x (zero-padded to Hp).
#pragma omp for schedule(static)
    for (int t = 0; t < T; ++t) {
      float* dst = xs + int64_t(t) * Hp;
      for (int i = H; i < Hp; ++i) stage_put(kind, dst, Hp, i, 0.0f);
      for (int i = 0; i < H; ++i) {
        const float v = x_bf16 ? bf16_to_f32(static_cast<const uint16_t*>(x)[int64_t(t) * H + i])
                               : static_cast<const float*>(x)[int64_t(t) * H + i];
        stage_put(kind, dst, Hp, i, v);
      }
    }  // implicit barrier

    // Phase 1: h[p] = act(gate x) * (up x) for this thread's cost range of (expert, tile) units.
    {
      const double lo = total * id / nt, hi = total * (id + 1) / nt;
      double cum = 0;
      for (int a = 0; a < A; ++a) {
        const double c = unit[a], span = c * double(n1);
        if (cum + span > lo && cum < hi) {
          const int64_t j0 = std::max<int64_t>(0, std::min<int64_t>(n1, int64_t(std::ceil((lo - cum) / c))));
          const int64_t j1 = std::max<int64_t>(0, std::min<int64_t>(n1, int64_t(std::ceil((hi - cum) / c))));
          const int e = active[a], n = count[e], p0 = start[e];
          const uint8_t* base = mg.base + int64_t(e) * mg.expert_stride;
          for (int tb = 0; tb < n; tb += tb1) {
            const int nb = std::min(tb1, n - tb);
            for (int64_t j = j0; j < j1; ++j) {
              apply_tile(
                  mg, fmt, group, kind, lo1, base + j * mg.tile_bytes, s, nb,
                  [&](int i) { return xs + int64_t(tok[p0 + tb + i]) * Hp; },
                  [&](int i, const float* o) {
                    float* hr = hb + int64_t(p0 + tb + i) * Ip;
                    stage_put(kind, hr, Ip, 2 * j, activate(o[0], act) * o[2]);
                    stage_put(kind, hr, Ip, 2 * j + 1, activate(o[1], act) * o[3]);
                  },
                  prefetch);
            }
          }
        }
        cum += span;
      }
    }
#pragma omp barrier

    // Phase 2: this thread owns down rows [4 q0, 4 q1) of y: every expert, every token, no sharing.
    {
      const int64_t q0 = n2 * id / nt, q1 = n2 * (id + 1) / nt;  // neighbours share at most a line of y
      for (int a = 0; a < A && q0 < q1; ++a) {
        const int e = active[a], n = count[e], p0 = start[e];
        const uint8_t* base = md.base + int64_t(e) * md.expert_stride;
        for (int tb = 0; tb < n; tb += tb2) {
          const int nb = std::min(tb2, n - tb);
          for (int64_t j = q0; j < q1; ++j) {
            const int64_t row0 = j * ROWS;
            apply_tile(
                md, fmt, group, kind, true, base + j * md.tile_bytes, s, nb,
                [&](int i) { return hb + int64_t(p0 + tb + i) * Ip; },
                [&](int i, const float* o) {
                  const int p = p0 + tb + i;
                  float* yr = y + int64_t(tok[p]) * H;
                  const float wt = wp[p];
                  for (int r = 0; r < ROWS; ++r)
                    if (row0 + r < H) yr[row0 + r] += wt * o[r];
                },
                prefetch);
          }
        }
      }
    }
  }
  return 0;
}

// Dequantizes tiles [t0, t1) of one packed matrix into bf16 rows out [4 (t1 - t0), K] (tile row order): the
// large-token route hands these to a matrix-unit GEMM (oneDNN / AMX through torch.mm).
int cadenza_dequant_bf16(int fmt, int group, const uint8_t* tiles, int64_t tile_bytes, int64_t header_bytes, int K,
                         int64_t t0, int64_t t1, uint16_t* out, int nthreads) {
  const int ng = group > 0 ? K / group : 1;
  if (nthreads <= 0) nthreads = omp_get_max_threads();
  const __m512i round = _mm512_set1_epi32(0x7fff), one = _mm512_set1_epi32(1), low4 = _mm512_set1_epi32(15);
  auto store = [&](uint16_t* dst, __m512 v) {  // fp32 -> bf16, round to nearest even
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), one);
    const __m512i r = _mm512_add_epi32(bits, _mm512_add_epi32(round, odd));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
  };
#pragma omp parallel num_threads(nthreads)
  {
    Scales s;
#pragma omp for schedule(static)
    for (int64_t t = t0; t < t1; ++t) {
      const uint8_t* tile = tiles + t * tile_bytes;
      const uint8_t* data = tile + header_bytes;
      uint16_t* o = out + (t - t0) * ROWS * int64_t(K);
      s.load(fmt, tile, ng);
      for (int r = 0; r < ROWS; ++r) {
        uint16_t* orow = o + int64_t(r) * K;
        if (fmt == BF16) {
          for (int c = 0; c < K / 32; ++c) std::memcpy(orow + c * 32, data + (c * ROWS + r) * 64, 64);
        } else if (fmt == INT8) {
          for (int c = 0; c < K / 64; ++c)
            for (int q = 0; q < 4; ++q) {
              const int kk = c * 64 + 16 * q;
              const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(data + (c * ROWS + r) * 64 + 16 * q));
              const float sc = s.sc[r * ng + (group > 0 ? kk / group : 0)];
              store(orow + kk, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), _mm512_set1_ps(sc)));
            }
        } else {
          for (int c = 0; c < K / 128; ++c) {
            // word j of the chunk: columns 32n + j in nibble n; 16 words at a time, widened to 32-bit lanes
            for (int half = 0; half < 2; ++half) {
              const uint8_t* src = data + (c * ROWS + r) * 64 + 32 * half;
              const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
              for (int n = 0; n < 4; ++n) {
                const int kk = c * 128 + 32 * n + 16 * half, g = kk / group;
                const __m512i q = _mm512_and_si512(_mm512_srlv_epi32(v, _mm512_set1_epi32(4 * n)), low4);
                const __m512i qz = _mm512_sub_epi32(q, _mm512_set1_epi32(s.z[r * ng + g]));
                store(orow + kk, _mm512_mul_ps(_mm512_cvtepi32_ps(qz), _mm512_set1_ps(s.sc[r * ng + g])));
              }
            }
          }
        }
      }
    }
  }
  return 0;
}

}  // extern "C"
