// cadenza's fused CPU MoE step: all of a layer's CPU experts, for all their tokens, in one OpenMP pass.
//
//   y[t] += sum over (t, slot) routed to a computed expert e of  w[t, slot] * down_e( act(gate_e x_t) * up_e x_t )
//
// The weights are walked in units of 4 rows (a gate/up unit j: gate rows 2j, 2j+1 and up rows 2j, 2j+1, giving
// h[2j], h[2j+1]; a down unit j: rows 4j .. 4j+3 of y). Phase 1 hands the (expert, gate/up unit) pairs to the
// threads in runs; phase 2 hands out runs of rows of y (the down matrices' output rows), so no two threads ever
// write the same y element (no atomics on y). A run is a share of what is left (`grab`: long contiguous reads
// first, short ones at the end, so a preempted thread delays little), so at one token a call is a run of GEMVs at
// DRAM bandwidth; with more tokens, each unit is applied to blocks of tokens while it is in cache. Two layouts, one code path (struct Mat says where a unit's rows are):
//
// Plain (cadenza_moe_forward_plain): a bf16 model's own stacked tensors, read in place: gate, up [E, I, H] and
// down [E, H, I], row-major; row r of expert e's gate at gate + (e I + r) H. Any H and I: a row's last partial
// 32-column chunk is a masked load (zeros past the row, nothing read beyond it).
//
// Tiled (written by cpu_moe.py's pack_layer; its dequantize_tiles is the reference reader): a matrix of R rows x
// K columns (both padded to multiples of 128) is R/4 tiles of 4 rows; a tile is [header][chunks], a chunk holds
// the same 64-byte piece of each of the 4 rows one after the other, so a run of tiles is one sequential stream.
//   bf16: a chunk is 32 columns per row; no header.
//   int8: a chunk is 64 columns per row; header: fp32 scales [4 rows][groups]; value = q * scale.
//   int4: a chunk is 128 columns per row: 16-bit word j holds columns 32n + j in its nibbles n = 0..3;
//         header: bf16 scales [4][groups], then uint8 zero points [4][groups]; value = (q - z) * scale.
//   block formats (cadenza/kernels/blocks.py, a file's blocks kept as they are): q4_0, q4_k, mxfp4 hold int4's
//         nibbles; q6_k 6-bit codes, a chunk of 384 bytes per 128 columns (the 4 rows' 64 bytes of low nibbles
//         in int4's words, then their 32 bytes of high bit pairs: byte j, columns 32n + j in bits 2n, 2n + 1),
//         code value q - 32; q5_k 5-bit codes, a chunk of 320 bytes per 128 columns (the 4 rows' 64 bytes of
//         low nibbles in int4's words, then their 16 bytes of 5th bits: 32-bit word n, column 32n + j at bit j),
//         code value q; value = code_value * scale - min per group of 32 (q6_k: 16), where (scale,
//         min) come from the header's fields (blocks.scales_and_mins) and code_value is the code (mxfp4: its e2m1
//         value); q8_0 holds int8's bytes with an fp16 scale per 32. A layer's gate/up and down matrices may
//         have different formats (Q4_K_M: q4_k and q6_k).
// Headers are padded to 64 bytes. gate and up share one matrix: tile j is gate/up unit j, so one stream yields
// h[2j], h[2j+1].
//
// Activations are staged per call (x by the threads, h by phase 1) in the form the weights want (a 64-byte piece
// of a bf16 row is the same 32 columns in both layouts); a staged row is always 4 Hp (or 4 Ip) bytes, Hp, Ip: H, I
// rounded up to 128, zero past H, I:
//   pair-split fp32 (bf16, int4, q6_k, q5_k without AVX512_BF16): per 32 columns, the 16 even ones then the 16 odd
//     ones, because a 32-bit lane of bf16 (or of int4 words) holds an even and an odd column;
//   natural fp32 (int8, q8_0);
//   bf16 hi, then bf16 lo = x - hi (bf16, int4, q6_k, q5_k with AVX512_BF16: vdpbf16ps multiplies the bf16 weights, or
//     the exact small integers q - z, with hi and lo, which together carry 16 bits of each activation; lo is
//     skipped when x arrives in bf16, as it does from a bf16 model).
//
// Plain C ABI (called through ctypes, which releases the GIL); no torch headers, so the build takes seconds.

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <ctime>
#include <vector>

namespace {

enum Fmt { BF16 = 0, INT8 = 1, INT4 = 2, Q4_0 = 3, Q4_K = 4, MXFP4 = 5, Q6_K = 6, Q8_0 = 7, Q5_K = 8 };  // layout.KERNEL_FORMATS
enum Act { SILU = 0, GELU_TANH = 1, GELU = 2, RELU = 3, CLAMPED_SWIGLU = 4 };
enum Stage { PAIR_SPLIT = 0, NATURAL = 1, HI_LO = 2, Q8 = 3 };  // Q8: cpu_moe_q8.h

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

// What gpt-oss's experts add to the plain ones (the entries' last argument; null: nothing): biases after gate, up
// and down (fp32 [E, I], [E, I], [E, H], each may be null), and CLAMPED_SWIGLU's alpha and limit.
struct Extra {
  const float* gate_bias = nullptr;
  const float* up_bias = nullptr;
  const float* down_bias = nullptr;
  float alpha = 0.0f, limit = 0.0f;
};

// h = the gated unit of gate output g and up output u.
inline float glu(float g, float u, int act, const Extra& ex) {
  if (act == CLAMPED_SWIGLU) {  // gpt-oss: (clamp(u) + 1) * g' * sigmoid(alpha g'), g' = min(g, limit)
    g = std::min(g, ex.limit);
    u = std::max(-ex.limit, std::min(u, ex.limit));
    return (u + 1.0f) * (g / (1.0f + std::exp(-ex.alpha * g)));
  }
  return activate(g, act) * u;
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

// Sums of a HI_LO staged row (hi + lo, n columns) per group of 32 columns: the per-group sum of x that a block
// format's min multiplies (sum (v s - m) x = s sum v x - m sum x), computed once per call, not per tile.
__attribute__((target("avx512bw,avx512f"))) inline void group_sums(const float* row, int64_t n, float* out) {
  const uint16_t* hl = reinterpret_cast<const uint16_t*>(row);
  for (int64_t g = 0; g < n / 32; ++g) {
    __m512 s = _mm512_setzero_ps();
    for (int64_t i = 32 * g; i < 32 * g + 32; i += 16)
      for (const uint16_t* half : {hl, hl + n}) {
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(half + i));
        s = _mm512_add_ps(s, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)));
      }
    out[g] = _mm512_reduce_add_ps(s);
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

inline bool nib_block(int fmt) { return fmt == Q4_0 || fmt == Q4_K || fmt == MXFP4; }
// nibble formats (and q5_k: nibbles and 5th bits) whose weights have a min
inline bool nib_min(int fmt) { return fmt == Q4_0 || fmt == Q4_K || fmt == Q5_K; }

// The 16 code values of a nibble: the code itself, or (mxfp4) its e2m1 value.
// As bf16 words, 32 entries (vpermw's 5-bit index: entries 16..31 repeat 0..15); every value is exact in bf16.
struct Bases {
  alignas(64) float q[16];
  alignas(64) float e2m1[16];
  alignas(64) uint16_t q16[32];
  alignas(64) uint16_t e2m1_16[32];
  alignas(64) uint16_t q6_16[64];  // q6_k: q - 32 for the 6-bit q (vpermt2w's table of two registers)
  alignas(64) float q5[32];        // q5_k: the 5-bit q (fp32 lanes: two registers)
  alignas(64) uint16_t q5_16[32];  // q5_k: the 5-bit q as bf16 (vpermw's 5-bit index)
  Bases() {
    const float mag[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
    for (int i = 0; i < 16; ++i) {
      q[i] = float(i);
      e2m1[i] = i < 8 ? mag[i] : -mag[i - 8];
    }
    for (int i = 0; i < 32; ++i) {
      q16[i] = bf16_rne(q[i & 15]);
      e2m1_16[i] = bf16_rne(e2m1[i & 15]);
    }
    for (int i = 0; i < 64; ++i) q6_16[i] = bf16_rne(float(i - 32));
    for (int i = 0; i < 32; ++i) {
      q5[i] = float(i);
      q5_16[i] = bf16_rne(float(i));
    }
  }
};
const Bases bases;

// A tile's scales: int8 reads its fp32 header in place; int4's bf16 scales are widened once per tile; block
// formats' fields become fp32 scale and min per (row, group), the products exact (d * sc: at most 17 bits).
struct Scales {
  std::vector<float> buf;
  const float* sc = nullptr;
  const float* mn = nullptr;
  const float* base = bases.q;
  const uint16_t* base16 = bases.q16;
  const uint8_t* z = nullptr;
  std::vector<int16_t> sc16;  // load_q8 (cpu_moe_q8.h): integer group scales; ns super-blocks a row
  int ns = 0;
  void load_q8(int fmt, const uint8_t* tile, int ng);
  void load(int fmt, const uint8_t* tile, int ng) {
    if (fmt == INT8) {
      sc = reinterpret_cast<const float*>(tile);
      return;
    }
    if (fmt == BF16) return;
    const int n = ROWS * ng;
    if (int(buf.size()) < 2 * n) buf.resize(2 * n);
    float* s = buf.data();
    float* m = s + n;
    sc = s;
    mn = m;
    const uint16_t* h = reinterpret_cast<const uint16_t*>(tile);
    if (fmt == INT4) {
      for (int i = 0; i < n; ++i) s[i] = bf16_to_f32(h[i]);
      z = tile + 2 * n;
    } else if (fmt == Q8_0 || fmt == Q4_0) {  // d fp16 [4][ng]: 16 at a time (n is a multiple of 16)
      const __m512 eight = _mm512_set1_ps(8.0f);
      for (int i = 0; i < n; i += 16) {
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + i)));
        _mm512_storeu_ps(s + i, d);
        _mm512_storeu_ps(m + i, fmt == Q4_0 ? _mm512_mul_ps(d, eight) : _mm512_setzero_ps());
      }
    } else if (fmt == MXFP4) {  // 2^(e - 127) from the bits; e = 0 is the denormal 2^-127
      for (int i = 0; i < n; i += 16) {
        const __m512i e = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tile + i)));
        const __mmask16 zero = _mm512_cmpeq_epi32_mask(e, _mm512_setzero_si512());
        const __m512i bits = _mm512_mask_mov_epi32(_mm512_slli_epi32(e, 23), zero, _mm512_set1_epi32(1 << 22));
        _mm512_storeu_ps(s + i, _mm512_castsi512_ps(bits));
        _mm512_storeu_ps(m + i, _mm512_setzero_ps());
      }
    } else if (fmt == Q4_K || fmt == Q5_K) {  // d, dmin fp16 [4][ng / 8]; sc, m uint8 [4][ng]: 8 groups a super-block
      const int ns = ng / 8;
      const uint16_t* dm = h + ROWS * ns;
      const uint8_t* scb = reinterpret_cast<const uint8_t*>(dm + ROWS * ns);
      for (int b = 0; b < ROWS * ns; ++b) {  // super-block b (row-major over rows): groups 8b .. 8b + 7
        const __m256 d = _mm256_set1_ps(_cvtsh_ss(h[b])), dmin = _mm256_set1_ps(_cvtsh_ss(dm[b]));
        const __m256 sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(scb + 8 * b))));
        const __m256 mc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(scb + n + 8 * b))));
        _mm256_storeu_ps(s + 8 * b, _mm256_mul_ps(d, sc));
        _mm256_storeu_ps(m + 8 * b, _mm256_mul_ps(dmin, mc));
      }
    } else if (fmt == Q6_K) {  // d fp16 [4][ng / 16]; sc int8 [4][ng]: 16 groups of 16 per super-block
      const int ns = ng / 16;
      const int8_t* scb = reinterpret_cast<const int8_t*>(h + ROWS * ns);
      for (int b = 0; b < ROWS * ns; ++b) {
        const __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scb + 16 * b))));
        _mm512_storeu_ps(s + 16 * b, _mm512_mul_ps(_mm512_set1_ps(_cvtsh_ss(h[b])), sc));
      }
    }
    base = fmt == MXFP4 ? bases.e2m1 : bases.q;
    base16 = fmt == MXFP4 ? bases.e2m1_16 : bases.q16;
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

struct Args {  // one micro-kernel call: 4 rows' weights, K columns, NT staged rows, the tile's scales
  const uint8_t* data;       // int8 / int4: the tile's data (after its header)
  const uint8_t* row[ROWS];  // bf16: each row's first 64-byte chunk (tiled: data + 64 r; plain: the matrix rows)
  int64_t cs;                // bf16: bytes from one chunk of a row to its next (tiled 256, plain 64)
  int K, ks, ng, pf;         // K: columns summed; ks: staged row length (where a hi/lo row's lo half starts)
  const float* const* x;
  const float* const* gs;    // block formats with a min: each token's sums of x per group of 32 (group_sums)
  const Scales* s;
};

// ---- micro-kernels: out[r][t] = <row r of one unit, x[t]> for the unit's 4 rows and NT tokens -----------------

// bf16 rows, tiled or plain, are read as chunks of 32 columns (64 bytes): K / 32 full ones, then, where K is not a
// multiple of 32 (plain rows of any length), one partial chunk whose missing columns load as zeros (a masked load
// never touches the bytes past the row). A 32-bit lane holds columns 2l, 2l + 1 in both layouts.
template <bool TAIL>
__attribute__((always_inline)) inline __m512i load_chunk(const uint8_t* p, __mmask32 m) {
  if constexpr (TAIL) return _mm512_maskz_loadu_epi16(m, p);
  else return _mm512_loadu_si512(p);
}

// Software prefetch of chunk c of the rows [P, P + NP, ..] (one pass, below).
template <int RG, int P>
inline void prefetch_rows(const Args& a, int c) {
  if (a.pf > 0)
    for (int i = 0; i < RG; ++i)
      _mm_prefetch(reinterpret_cast<const char*>(a.row[P + i * (ROWS / RG)] + c * a.cs + a.pf), _MM_HINT_T0);
}

inline __mmask32 tail_mask(int K) { return __mmask32((1u << (K % 32)) - 1u); }

// A bf16 micro-kernel sums its 4 rows in ROWS / RG passes of RG rows each, pass P taking rows P, P + NP, ..
// (NP = ROWS / RG). RG = 4: one pass (tiles: one stream; every row reuses each load of x). RG = 2 (plain gate/up
// at few tokens): gate row 2j with up row 2j, then gate 2j + 1 with up 2j + 1, so that gate and up are each read
// as one sequential stream.

// Chunks [c0, c1) of one pass on fp32 lanes (pair-split staged activations).
template <int NT, bool TAIL, int RG, int P>
__attribute__((always_inline)) inline void bf16_chunks(const Args& a, int c0, int c1, __mmask32 m,
                                                       __m512 (&a0)[ROWS][NT], __m512 (&a1)[ROWS][NT]) {
  constexpr bool TWO = NT <= 2;
  constexpr int NP = ROWS / RG;
  const __m512i hi = _mm512_set1_epi32(int(0xffff0000u));
  const int64_t cs = a.cs;
  for (int c = c0; c < c1; ++c) {
    if (!TAIL) prefetch_rows<RG, P>(a, c);
    __m512 xe[NT], xo[NT];
    for (int t = 0; t < NT; ++t) {
      xe[t] = _mm512_loadu_ps(a.x[t] + c * 32);
      xo[t] = _mm512_loadu_ps(a.x[t] + c * 32 + 16);
    }
    for (int i = 0; i < RG; ++i) {
      const int r = P + i * NP;
      const __m512i v = load_chunk<TAIL>(a.row[r] + c * cs, m);
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
}

// Small token counts get two accumulators per (row, token): more independent FMA chains.
template <int NT, int RG>
void dot_bf16(const Args& a, float out[ROWS][MAX_NT]) {
  constexpr bool TWO = NT <= 2;
  __m512 a0[ROWS][NT], a1[ROWS][NT];
  for (int r = 0; r < ROWS; ++r)
    for (int t = 0; t < NT; ++t) a0[r][t] = a1[r][t] = _mm512_setzero_ps();
  const int n = a.K / 32;
  const __mmask32 m = tail_mask(a.K);
  const bool tail = a.K % 32;
  bf16_chunks<NT, false, RG, 0>(a, 0, n, 0, a0, a1);
  if (tail) bf16_chunks<NT, true, RG, 0>(a, n, n + 1, m, a0, a1);
  if constexpr (RG == 2) {
    bf16_chunks<NT, false, RG, 1>(a, 0, n, 0, a0, a1);
    if (tail) bf16_chunks<NT, true, RG, 1>(a, n, n + 1, m, a0, a1);
  }
  for (int r = 0; r < ROWS; ++r)
    for (int t = 0; t < NT; ++t) out[r][t] = hsum(TWO ? _mm512_add_ps(a0[r][t], a1[r][t]) : a0[r][t]);
}

// Chunks [c0, c1) of one pass with vdpbf16ps on bf16 activations (hi, and lo unless x arrived in bf16).
template <int NT, bool LO, bool TAIL, int RG, int P>
__attribute__((target("avx512bf16,avx512bw,avx512f"), always_inline)) inline void bf16_dp_chunks(
    const Args& a, int c0, int c1, __mmask32 m, __m512 (&a0)[ROWS][NT], __m512 (&a1)[ROWS][NT]) {
  constexpr bool TWO = NT <= 2;
  constexpr int NP = ROWS / RG;
  const uint16_t* xs[NT];
  for (int t = 0; t < NT; ++t) xs[t] = reinterpret_cast<const uint16_t*>(a.x[t]);
  const int64_t cs = a.cs;
  const int ks = a.ks;
  for (int c = c0; c < c1; ++c) {
    if (!TAIL) prefetch_rows<RG, P>(a, c);
    __m512bh xh[NT], xl[NT];
    for (int t = 0; t < NT; ++t) {
      xh[t] = (__m512bh)_mm512_loadu_si512(xs[t] + c * 32);
      if (LO) xl[t] = (__m512bh)_mm512_loadu_si512(xs[t] + ks + c * 32);
    }
    for (int i = 0; i < RG; ++i) {
      const int r = P + i * NP;
      const __m512bh v = (__m512bh)load_chunk<TAIL>(a.row[r] + c * cs, m);
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
}

// bf16 weights with vdpbf16ps on bf16 activations: no conversions at all.
template <int NT, bool LO, int RG>
__attribute__((target("avx512bf16,avx512bw,avx512f"))) void dot_bf16_dp(const Args& a, float out[ROWS][MAX_NT]) {
  constexpr bool TWO = NT <= 2;
  __m512 a0[ROWS][NT], a1[ROWS][NT];
  for (int r = 0; r < ROWS; ++r)
    for (int t = 0; t < NT; ++t) a0[r][t] = a1[r][t] = _mm512_setzero_ps();
  const int n = a.K / 32;
  const __mmask32 m = tail_mask(a.K);
  const bool tail = a.K % 32;
  bf16_dp_chunks<NT, LO, false, RG, 0>(a, 0, n, 0, a0, a1);
  if (tail) bf16_dp_chunks<NT, LO, true, RG, 0>(a, n, n + 1, m, a0, a1);
  if constexpr (RG == 2) {
    bf16_dp_chunks<NT, LO, false, RG, 1>(a, 0, n, 0, a0, a1);
    if (tail) bf16_dp_chunks<NT, LO, true, RG, 1>(a, n, n + 1, m, a0, a1);
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

// ---- q6_k: 6-bit codes (cadenza/kernels/blocks.py) -------------------------------------------------------------
// A chunk is 384 bytes per 128 columns: the 4 rows' 64-byte pieces of low nibbles in int4's word layout (word j:
// column 32n + j in nibble n), then their 32-byte pieces of high bit pairs (byte j: columns 32n + j in bits 2n,
// 2n + 1). A column's 6-bit index q is one shift of each part and one bit select (vpternlog: the low 4 bits from
// the nibbles, the rest from the high part, whose bits 4, 5 are the pair); its value q - 32 comes from a 64-entry
// bf16 table (vpermt2w reads only the index's low 6 bits) or, on fp32 lanes, as (2^23 + q) - (2^23 + 32). The
// scales are per 16 columns: a 16-lane result spans two groups, lanes 0-7 and 8-15.

inline void prefetch_q6_chunk(const uint8_t* p, int pf) {
  if (pf > 0) {
    const char* q = reinterpret_cast<const char*>(p) + pf;
    for (int i = 0; i < 384; i += 64) _mm_prefetch(q + i, _MM_HINT_T0);
  }
}

// Row r's scales of groups g, g + 1 in lanes 0-7, 8-15.
inline __m512 q6_scale_pair(const float* sc) {
  return _mm512_mask_mov_ps(_mm512_set1_ps(sc[0]), __mmask16(0xFF00), _mm512_set1_ps(sc[1]));
}

// The high pair of nibble n moved to bits 4, 5 (lanes of 16 bits, each byte j zero-extended into word j).
template <int N>
__attribute__((always_inline)) inline __m512i q6_high16(__m512i h) {
  if constexpr (N == 0) return _mm512_slli_epi16(h, 4);
  else if constexpr (N == 1) return _mm512_slli_epi16(h, 2);
  else if constexpr (N == 2) return h;
  else return _mm512_srli_epi16(h, 2);
}

// q6_k with vdpbf16ps on bf16 activations (hi, and lo unless x arrived in bf16): nibble n of a row's 32 words
// gives columns 32n .. 32n + 31 in order, as the staged rows hold them. Per (row, n, token) the two groups'
// products sum exactly in fp32 (one or two vdpbf16ps from zero), then get their scales; small token counts
// alternate two accumulators per (row, token).
template <int N, int NT, bool LO>
__attribute__((target("avx512bf16,avx512bw,avx512f"), always_inline)) inline void q6_bf16_nibble(
    const __m512i (&v)[ROWS], const __m512i (&h)[ROWS], const uint16_t* const* xs, int at, int ks,
    const float* sc, int ng, int g, __m512i lut0, __m512i lut1, __m512 (&t0)[ROWS][NT], __m512 (&t1)[ROWS][NT]) {
  constexpr bool TWO = NT <= 2;
  const __m512i low4 = _mm512_set1_epi16(0x0F);
  __m512bh xh[NT], xl[NT];
  for (int t = 0; t < NT; ++t) {
    xh[t] = (__m512bh)_mm512_loadu_si512(xs[t] + at);
    if (LO) xl[t] = (__m512bh)_mm512_loadu_si512(xs[t] + ks + at);
  }
  for (int r = 0; r < ROWS; ++r) {
    const __m512i lo = N ? _mm512_srli_epi16(v[r], 4 * N) : v[r];
    const __m512i idx = _mm512_ternarylogic_epi32(low4, lo, q6_high16<N>(h[r]), 0xCA);  // low4 ? lo : high
    const __m512bh w = (__m512bh)_mm512_permutex2var_epi16(lut0, idx, lut1);
    const __m512 s = q6_scale_pair(sc + r * ng + g);
    for (int t = 0; t < NT; ++t) {
      __m512 acc = _mm512_dpbf16_ps(_mm512_setzero_ps(), w, xh[t]);
      if (LO) acc = _mm512_dpbf16_ps(acc, w, xl[t]);
      if (TWO && (N & 1))
        t1[r][t] = _mm512_fmadd_ps(acc, s, t1[r][t]);
      else
        t0[r][t] = _mm512_fmadd_ps(acc, s, t0[r][t]);
    }
  }
}

template <int NT, bool LO>
__attribute__((target("avx512bf16,avx512bw,avx512f"))) void dot_q6_bf16(const Args& a, float out[ROWS][MAX_NT]) {
  __m512 t0[ROWS][NT], t1[ROWS][NT];
  for (int r = 0; r < ROWS; ++r)
    for (int t = 0; t < NT; ++t) t0[r][t] = t1[r][t] = _mm512_setzero_ps();
  const float* sc = a.s->sc;
  const int ng = a.ng, K = a.K;
  const __m512i lut0 = _mm512_load_si512(bases.q6_16), lut1 = _mm512_load_si512(bases.q6_16 + 32);
  const uint16_t* xs[NT];
  for (int t = 0; t < NT; ++t) xs[t] = reinterpret_cast<const uint16_t*>(a.x[t]);
  const uint8_t* p = a.data;
  for (int c = 0; c < K / 128; ++c, p += 384) {
    prefetch_q6_chunk(p, a.pf);
    __m512i v[ROWS], h[ROWS];
    for (int r = 0; r < ROWS; ++r) {
      v[r] = _mm512_loadu_si512(p + 64 * r);
      h[r] = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 256 + 32 * r)));
    }
    const int g = c * 8;  // the chunk's first group of 16 columns
    q6_bf16_nibble<0, NT, LO>(v, h, xs, c * 128, a.ks, sc, ng, g, lut0, lut1, t0, t1);
    q6_bf16_nibble<1, NT, LO>(v, h, xs, c * 128 + 32, a.ks, sc, ng, g + 2, lut0, lut1, t0, t1);
    q6_bf16_nibble<2, NT, LO>(v, h, xs, c * 128 + 64, a.ks, sc, ng, g + 4, lut0, lut1, t0, t1);
    q6_bf16_nibble<3, NT, LO>(v, h, xs, c * 128 + 96, a.ks, sc, ng, g + 6, lut0, lut1, t0, t1);
  }
  for (int r = 0; r < ROWS; ++r)
    for (int t = 0; t < NT; ++t) out[r][t] = hsum(NT <= 2 ? _mm512_add_ps(t0[r][t], t1[r][t]) : t0[r][t]);
}

// q6_k on fp32 lanes (pair-split staged activations, as dot_int4_f32): a 32-bit lane holds words 2l, 2l + 1, so
// shifted right by 4s its low 4 bits are nibble s of word 2l (s < 4: column 32s + 2l) or s - 4 of word 2l + 1
// (column 32(s - 4) + 2l + 1); the high bytes widened from 16 to 32 bits hold that column's pair at bit 2s. The
// weight (q - 32) * scale is exact, as the reference's; lanes 0-7 and 8-15 are the two groups of 16 columns.
template <int NT>
void dot_q6_f32(const Args& a, float out[ROWS][MAX_NT]) {
  constexpr bool TWO = NT <= 2;
  __m512 a0[ROWS][NT], a1[ROWS][NT];
  for (int r = 0; r < ROWS; ++r)
    for (int t = 0; t < NT; ++t) a0[r][t] = a1[r][t] = _mm512_setzero_ps();
  const float* sc = a.s->sc;
  const int ng = a.ng;
  const __m512i low4 = _mm512_set1_epi32(15), six = _mm512_set1_epi32(63), magic = _mm512_set1_epi32(0x4B000000);
  const __m512 bias = _mm512_set1_ps(8388640.0f);  // 2^23 + 32
  const uint8_t* p = a.data;
  for (int c = 0; c < a.K / 128; ++c, p += 384) {
    prefetch_q6_chunk(p, a.pf);
    __m512i v[ROWS], h[ROWS];
    for (int r = 0; r < ROWS; ++r) {
      v[r] = _mm512_loadu_si512(p + 64 * r);
      h[r] = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 256 + 32 * r)));
    }
    __m512 s[ROWS];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      const int pos = (i >> 1) | ((i & 1) << 2);  // 0,4,1,5,2,6,3,7: a pair of groups' two positions together
      if ((i & 1) == 0)
        for (int r = 0; r < ROWS; ++r) s[r] = q6_scale_pair(sc + r * ng + c * 8 + 2 * (pos & 3));
      const int off = c * 128 + 32 * (pos & 3) + (pos >> 2) * 16;
      __m512 xv[NT];
      for (int t = 0; t < NT; ++t) xv[t] = _mm512_loadu_ps(a.x[t] + off);
      for (int r = 0; r < ROWS; ++r) {
        const __m512i lo = _mm512_srli_epi32(v[r], 4 * pos);
        const __m512i hi = pos < 2 ? _mm512_slli_epi32(h[r], 4 - 2 * pos) : _mm512_srli_epi32(h[r], 2 * pos - 4);
        const __m512i q = _mm512_ternarylogic_epi32(low4, lo, hi, 0xCA);          // low4 ? lo : hi
        const __m512i f = _mm512_ternarylogic_epi32(q, six, magic, 0xEA);         // (q & 63) | 2^23's bits
        const __m512 w = _mm512_mul_ps(_mm512_sub_ps(_mm512_castsi512_ps(f), bias), s[r]);
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

// int4 on fp32 lanes (CPUs without AVX512_BF16). A 32-bit lane holds words 2l, 2l+1; shifted right by 4s its low
// 4 bits are nibble s: column 32s + 2l (s < 4) or 32(s - 4) + 2l + 1, found in the pair-split row at 32s + l or
// 32(s - 4) + 16 + l. vpermps picks by those 4 bits from the group's 16 values (q - z) * scale: unpacking is one
// shift. Positions run 0,4,1,5,2,6,3,7 so that a 32-column group's two positions are neighbours.
// AFF (block formats, G = 32): the group's 16 values are base * scale - min (one rounding, as the reference).
// Q5 (q5_k, with AFF): chunks of 320 bytes, the 4 rows' 16 bytes of 5th bits after their nibbles (32-bit word n,
// bit j: column 32n + j); position s's lane l takes bit 2l (s < 4) or 2l + 1 (s >= 4) of word s & 3 as a mask
// that picks q + 16's value from a second register of 16 (bases.q5[16..31] * scale - min).
template <int NT, int G, bool AFF = false, bool Q5 = false>
void dot_int4_f32(const Args& a, float out[ROWS][MAX_NT]) {
  constexpr int CB = Q5 ? 320 : 256;  // chunk bytes
  constexpr bool TWO = NT <= 2;
  constexpr int PER_GROUP = 2 * G / 32;  // positions per group
  __m512 a0[ROWS][NT], a1[ROWS][NT];
  for (int r = 0; r < ROWS; ++r)
    for (int t = 0; t < NT; ++t) a0[r][t] = a1[r][t] = _mm512_setzero_ps();
  const float* sc = a.s->sc;
  const uint8_t* z = a.s->z;
  const int ng = a.ng;
  const uint8_t* p = a.data;
  const __m512i even = _mm512_sllv_epi32(_mm512_set1_epi32(1), _mm512_slli_epi32(
                                            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), 1));
  for (int c = 0; c < a.K / 128; ++c, p += CB) {
    prefetch_chunk(p, a.pf);
    if (Q5 && a.pf > 0) _mm_prefetch(reinterpret_cast<const char*>(p) + a.pf + 256, _MM_HINT_T0);
    __m512i v[ROWS];
    uint32_t hw[ROWS][4];
    for (int r = 0; r < ROWS; ++r) {
      v[r] = _mm512_loadu_si512(p + 64 * r);
      if (Q5) std::memcpy(hw[r], p + 256 + 16 * r, 16);
    }
    __m512 lut[ROWS], lut2[ROWS];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      const int s = (i >> 1) | ((i & 1) << 2);  // 0,4,1,5,2,6,3,7
      if (i % PER_GROUP == 0) {
        const int g = (c * 128 + 32 * (s & 3)) / G;
        for (int r = 0; r < ROWS; ++r) {
          if constexpr (Q5) {
            lut[r] = _mm512_fmsub_ps(_mm512_load_ps(bases.q5), _mm512_set1_ps(sc[r * ng + g]),
                                     _mm512_set1_ps(a.s->mn[r * ng + g]));
            lut2[r] = _mm512_fmsub_ps(_mm512_load_ps(bases.q5 + 16), _mm512_set1_ps(sc[r * ng + g]),
                                      _mm512_set1_ps(a.s->mn[r * ng + g]));
          } else if constexpr (AFF)
            lut[r] = _mm512_fmsub_ps(_mm512_load_ps(a.s->base), _mm512_set1_ps(sc[r * ng + g]),
                                     _mm512_set1_ps(a.s->mn[r * ng + g]));
          else
            lut[r] = _mm512_mul_ps(_mm512_load_ps(luts.f32[z[r * ng + g]]), _mm512_set1_ps(sc[r * ng + g]));
        }
      }
      const int off = c * 128 + 32 * (s & 3) + (s >> 2) * 16;
      __m512 xv[NT];
      for (int t = 0; t < NT; ++t) xv[t] = _mm512_loadu_ps(a.x[t] + off);
      for (int r = 0; r < ROWS; ++r) {
        const __m512i sh = _mm512_srli_epi32(v[r], 4 * s);
        __m512 w = _mm512_permutexvar_ps(sh, lut[r]);
        if constexpr (Q5) {
          const __m512i sel = s < 4 ? even : _mm512_slli_epi32(even, 1);
          const __mmask16 hk = _mm512_test_epi32_mask(_mm512_set1_epi32(int(hw[r][s & 3])), sel);
          w = _mm512_mask_permutexvar_ps(w, hk, sh, lut2[r]);
        }
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

// Block formats (groups of 32) with vdpbf16ps: a nibble indexes the bf16 code values; per group
// sum (v s - m) x = s sum v x - m sum x, where the groups' sums of x come with the call (Args::gs), so a row's
// min term is one short dot product over its groups, after its chunks (MIN: the format has a min; mxfp4 has
// none). Few tokens get an accumulator per group position (NA of them): each row's sum is then NA short chains,
// not one chain of a dependent FMA per group (latency-bound at one token). Q5 (q5_k): chunks of 320 bytes, each
// row's 16 bytes of 5th bits after the 4 rows' nibbles (32-bit word n: a 32-lane mask for columns 32n .. 32n + 31)
// set the index's bit 4, and the table is q = 0..31 (bases.q5_16).
template <int NT, bool LO, bool MIN, bool Q5 = false>
__attribute__((target("avx512bf16,avx512bw,avx512f"))) void dot_blk_bf16(const Args& a, float out[ROWS][MAX_NT]) {
  constexpr int CB = Q5 ? 320 : 256;  // chunk bytes
  const __m512i low4 = _mm512_set1_epi16(0x0F), bit4 = _mm512_set1_epi16(0x10);
  constexpr int NA = NT <= 2 ? 2 : 1;
  __m512 tot[ROWS][NT][NA];
  for (int r = 0; r < ROWS; ++r)
    for (int t = 0; t < NT; ++t)
      for (int i = 0; i < NA; ++i) tot[r][t][i] = _mm512_setzero_ps();
  const float* sc = a.s->sc;
  const int ng = a.ng, K = a.K;
  const __m512i lut = _mm512_load_si512(Q5 ? bases.q5_16 : a.s->base16);
  const uint16_t* xs[NT];
  for (int t = 0; t < NT; ++t) xs[t] = reinterpret_cast<const uint16_t*>(a.x[t]);
  const uint8_t* p = a.data;
  for (int c = 0; c < K / 128; ++c, p += CB) {
    prefetch_chunk(p, a.pf);
    if (Q5 && a.pf > 0) _mm_prefetch(reinterpret_cast<const char*>(p) + a.pf + 256, _MM_HINT_T0);
    __m512bh xh[4][NT], xl[4][NT];
    for (int gi = 0; gi < 4; ++gi)
      for (int t = 0; t < NT; ++t) {
        xh[gi][t] = (__m512bh)_mm512_loadu_si512(xs[t] + c * 128 + 32 * gi);
        if (LO) xl[gi][t] = (__m512bh)_mm512_loadu_si512(xs[t] + K + c * 128 + 32 * gi);
      }
    for (int r = 0; r < ROWS; ++r) {
      const __m512i v = _mm512_loadu_si512(p + 64 * r);
      uint32_t hw[4];
      if (Q5) std::memcpy(hw, p + 256 + 16 * r, 16);
#pragma GCC unroll 4
      for (int gi = 0; gi < 4; ++gi) {
        const int g = r * ng + c * 4 + gi;
        __m512i idx = _mm512_srli_epi16(v, 4 * gi);
        if constexpr (Q5)  // low4 ? nibble : the 5th bit
          idx = _mm512_ternarylogic_epi32(low4, idx, _mm512_maskz_mov_epi16(__mmask32(hw[gi]), bit4), 0xCA);
        const __m512bh w = (__m512bh)_mm512_permutexvar_epi16(idx, lut);
        const __m512 s = _mm512_set1_ps(sc[g]);
        for (int t = 0; t < NT; ++t) {
          __m512 acc = _mm512_dpbf16_ps(_mm512_setzero_ps(), w, xh[gi][t]);
          if (LO) acc = _mm512_dpbf16_ps(acc, w, xl[gi][t]);
          tot[r][t][gi % NA] = _mm512_fmadd_ps(acc, s, tot[r][t][gi % NA]);
        }
      }
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int t = 0; t < NT; ++t) {
      __m512 sum = tot[r][t][0];
      for (int i = 1; i < NA; ++i) sum = _mm512_add_ps(sum, tot[r][t][i]);
      if constexpr (MIN) {  // minus sum over groups of min * (sum of x): ng is a multiple of 4
        const float* mn = a.s->mn + r * ng;
        const float* gs = a.gs[t];
        __m512 m = _mm512_setzero_ps();
        for (int g = 0; g < ng; g += 16) {
          const __mmask16 k = ng - g >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (ng - g)) - 1u);
          m = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, mn + g), _mm512_maskz_loadu_ps(k, gs + g), m);
        }
        sum = _mm512_sub_ps(sum, m);
      }
      out[r][t] = hsum(sum);
    }
}

using DotFn = void (*)(const Args&, float[ROWS][MAX_NT]);

#include "cpu_moe_q8.h"

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
struct Q5F { template <int NT> struct F { static constexpr DotFn fn = dot_int4_f32<NT, 32, true, true>; }; };
template <bool LO>
struct Q5B { template <int NT> struct F { static constexpr DotFn fn = dot_blk_bf16<NT, LO, true, true>; }; };
template <int G> struct Int4F { template <int NT> struct F { static constexpr DotFn fn = dot_int4_f32<NT, G>; }; };
struct Nib32 { template <int NT> struct F { static constexpr DotFn fn = dot_int4_f32<NT, 32, true>; }; };
template <bool LO, bool MIN>
struct NibB { template <int NT> struct F { static constexpr DotFn fn = dot_blk_bf16<NT, LO, MIN>; }; };
template <int G, bool LO>
struct Int4B { template <int NT> struct F { static constexpr DotFn fn = dot_int4_bf16<NT, G, LO>; }; };
template <bool LO>
struct Q6B { template <int NT> struct F { static constexpr DotFn fn = dot_q6_bf16<NT, LO>; }; };
struct Q6F { template <int NT> struct F { static constexpr DotFn fn = dot_q6_f32<NT>; }; };
template <int RG> struct Bf16F { template <int NT> struct F { static constexpr DotFn fn = dot_bf16<NT, RG>; }; };
template <bool LO, int RG>
struct Bf16D { template <int NT> struct F { static constexpr DotFn fn = dot_bf16_dp<NT, LO, RG>; }; };



template <template <int> class F32, template <int> class F64, template <int> class F128>
DotFn by_group(int group, int nt) {
  return group == 32 ? by_nt<F32>(nt) : group == 64 ? by_nt<F64>(nt) : by_nt<F128>(nt);
}

// The micro-kernel for a format, group size, token count, staging kind and (bf16) rows per pass.
DotFn pick(int fmt, int group, int nt, int kind, bool lo, int rg) {
  if (kind == Q8) {
    if (fmt == INT8 || fmt == Q8_0)
      return group == 0 ? by_nt<Q8W<0>::F>(nt) : by_group<Q8W<32>::F, Q8W<64>::F, Q8W<128>::F>(group, nt);
    return fmt == Q6_K ? by_nt<Q8F<Q6_K>::F>(nt) : fmt == Q5_K ? by_nt<Q8F<Q5_K>::F>(nt) : by_nt<Q8F<Q4_K>::F>(nt);
  }
  if (nib_block(fmt)) {
    if (kind != HI_LO) return by_nt<Nib32::F>(nt);
    const bool min = nib_min(fmt);
    if (lo) return min ? by_nt<NibB<true, true>::F>(nt) : by_nt<NibB<true, false>::F>(nt);
    return min ? by_nt<NibB<false, true>::F>(nt) : by_nt<NibB<false, false>::F>(nt);
  }
  if (fmt == Q6_K) {
    if (kind != HI_LO) return by_nt<Q6F::F>(nt);
    return lo ? by_nt<Q6B<true>::F>(nt) : by_nt<Q6B<false>::F>(nt);
  }
  if (fmt == Q8_0) return by_nt<Int8G<32>::F>(nt);
  if (fmt == Q5_K) {
    if (kind != HI_LO) return by_nt<Q5F::F>(nt);
    return lo ? by_nt<Q5B<true>::F>(nt) : by_nt<Q5B<false>::F>(nt);
  }
  if (fmt == BF16) {
    if (kind != HI_LO) return rg == 2 ? by_nt<Bf16F<2>::F>(nt) : by_nt<Bf16F<4>::F>(nt);
    if (lo) return rg == 2 ? by_nt<Bf16D<true, 2>::F>(nt) : by_nt<Bf16D<true, 4>::F>(nt);
    return rg == 2 ? by_nt<Bf16D<false, 2>::F>(nt) : by_nt<Bf16D<false, 4>::F>(nt);
  }
  if (fmt == INT8) {
    if (group == 0) return by_nt<Int8G<0>::F>(nt);
    return by_group<Int8G<32>::F, Int8G<64>::F, Int8G<128>::F>(group, nt);
  }
  if (kind != HI_LO) return by_group<Int4F<32>::F, Int4F<64>::F, Int4F<128>::F>(group, nt);
  if (lo) return by_group<Int4B<32, true>::F, Int4B<64, true>::F, Int4B<128, true>::F>(group, nt);
  return by_group<Int4B<32, false>::F, Int4B<64, false>::F, Int4B<128, false>::F>(group, nt);
}

// One matrix as the kernel walks it: per expert, `units` units of 4 rows x K columns.
//   tiled: unit j of expert e is tile j, at base + e expert_stride + j tile_bytes; row r's chunk c at 64 r + 256 c
//     after the header.
//   plain (base == nullptr): the model's own stacked row-major bf16 matrices, read in place; unit j is rows
//     j per .. j per + per - 1 (per = 4 / nsrc) of each of the nsrc sources: gate/up: gate rows 2j, 2j + 1, then up
//     rows 2j, 2j + 1; down: rows 4j .. 4j + 3. Row i of expert e is at src + (e R + i) row_bytes; a row past R
//     (the last unit of an odd I, or of an H not a multiple of 4) repeats row R - 1, and its output is dropped.
struct Mat {
  int fmt = BF16, group = 0;  // this matrix's format and scale group
  const uint8_t* base = nullptr;
  int64_t expert_stride = 0, tile_bytes = 0, header_bytes = 0;
  const uint8_t* src[2] = {nullptr, nullptr};
  int nsrc = 1;
  int64_t R = 0, row_bytes = 0;
  int K = 0, ks = 0, ng = 1;  // columns summed, staged row length (padded), scale groups per row
  int64_t units = 0, unit_bytes = 0;  // units per expert, bytes a unit streams
  int rg = ROWS, seq_nt = 0;          // bf16: rows per pass (4 or 2, see dot_bf16) in calls of <= seq_nt tokens

  // Points a's rows at unit j of expert e; returns the tile (its header: the scales), or nullptr for plain rows.
  const uint8_t* unit(int e, int64_t j, Args& a) const {
    if (base) {
      const uint8_t* tile = base + e * expert_stride + j * tile_bytes;
      a.data = tile + header_bytes;
      for (int r = 0; r < ROWS; ++r) a.row[r] = a.data + 64 * r;
      a.cs = 64 * ROWS;
      return tile;
    }
    const int per = ROWS / nsrc;
    for (int r = 0; r < ROWS; ++r) {
      const int64_t i = std::min(R - 1, j * per + r % per);
      a.row[r] = src[r / per] + (int64_t(e) * R + i) * row_bytes;
    }
    a.data = a.row[0];
    a.cs = 64;
    return nullptr;
  }
};

inline int round_up(int n, int m) { return (n + m - 1) / m * m; }

// Token blocks small enough that their staged rows stay in L2 while a unit is reused across them.
inline int token_block(int K) {
  const int tb = int((640 * 1024) / (int64_t(K) * 4));
  return std::max(MAX_NT, std::min(64, tb / MAX_NT * MAX_NT));
}

// Applies unit j of expert e to n tokens (staged rows xrow(i)), calling emit(i, out[ROWS]) per token.
template <class XRow, class GRow, class Emit>
inline void apply_unit(const Mat& m, int e, int64_t j, int kind, bool lo, Scales& s, int n, XRow xrow, GRow grow,
                       Emit emit, int pf) {
  const int fmt = m.fmt, group = m.group;
  Args args{};
  const uint8_t* tile = m.unit(e, j, args);
  if (tile) {
    if (kind == Q8 && kquant_fmt(fmt))
      s.load_q8(fmt, tile, m.ng);
    else
      s.load(fmt, tile, m.ng);
  }
  args.K = m.K;
  args.ks = m.ks;
  args.ng = m.ng;
  args.pf = pf;
  args.s = &s;
  for (int t0 = 0; t0 < n; t0 += MAX_NT) {
    const int nt = std::min(MAX_NT, n - t0);
    const float* xs[MAX_NT];
    const float* gs[MAX_NT];
    for (int i = 0; i < nt; ++i) {
      xs[i] = xrow(t0 + i);
      gs[i] = grow(t0 + i);
    }
    float out[ROWS][MAX_NT];
    args.x = xs;
    args.gs = gs;
    pick(fmt, group, nt, kind, lo, nt <= m.seq_nt ? m.rg : ROWS)(args, out);
    for (int i = 0; i < nt; ++i) {
      float o[ROWS];
      for (int r = 0; r < ROWS; ++r) o[r] = out[r][i];
      emit(t0 + i, o);
    }
  }
}

// Per-call work buffers, kept by the calling thread (the engine's CPU worker) so decode allocates nothing.
struct Buffers {
  std::vector<float> xs, h, wp, gx, gh;  // (gx, gh: group sums of the staged x and h, where a format needs them)
  std::vector<uint8_t> x8, h8;           // Q8 rows of x and h
  std::vector<int32_t> tok;
};
thread_local Buffers tls;

// How a matrix of this format (K columns) wants its activations staged. dot: bit 0, the CPU has AVX512_BF16; bit 1,
// int8 activations for K-quant tiles; bit 2, for int8 and q8_0 tiles (cpu_moe_q8.h).
inline int stage_kind(int fmt, int dot, int K) {
  if (q8_fmt(fmt) && K % 256 == 0 && (dot & (kquant_fmt(fmt) ? 2 : 4))) return Q8;
  if (fmt == INT8 || fmt == Q8_0) return NATURAL;
  return (dot & 1) ? HI_LO : PAIR_SPLIT;  // bf16, int4 and the nibble formats; q6_k, q5_k (6-, 5-bit codes)
}

// The step for either layout: mg the gate/up matrix (unit j: h[2j], h[2j + 1]), md the down matrix (unit j: y
// rows 4j .. 4j + 3). Staged rows are mg.ks (x) and md.ks (h) long, zero past H and I; Q8 rows (x8, h8) are
// q8_row_bytes apart, quantized from fp32 rows (h: phase 1 writes h in fp32, then a pass quantizes it).

// A run [lo, hi) of `total` blocks from the shared counter `next`: a 1 / (2 threads) share of what is left, at
// least one block; false when none is left.
inline bool grab(std::atomic<int64_t>& next, int64_t total, int threads, int64_t& lo, int64_t& hi) {
  int64_t cur = next.load(std::memory_order_relaxed);
  while (cur < total) {
    const int64_t end = std::min(total, cur + std::max<int64_t>(1, (total - cur) / (2 * int64_t(threads))));
    if (next.compare_exchange_weak(cur, end, std::memory_order_relaxed)) {
      lo = cur;
      hi = end;
      return true;
    }
  }
  return false;
}

int forward(int E, int H, int I, const Mat& mg, const Mat& md, const void* x, int x_bf16, int T, const int64_t* ids,
            const float* w, int k, const uint8_t* mask, int act, int nthreads, int prefetch, int dot, float* y,
            const Extra& ex) {
  if (T <= 0) return 0;
  const int Hp = mg.ks, Ip = md.ks;
  const int kind = stage_kind(mg.fmt, dot, mg.K), kind_h = stage_kind(md.fmt, dot, md.K);
  const int put_h = kind_h == Q8 ? NATURAL : kind_h;  // how phase 1 writes h
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
  // block formats with a min read the groups' sums of their activations (dot_blk_bf16)
  const bool gsx = kind == HI_LO && nib_min(mg.fmt), gsh = kind_h == HI_LO && nib_min(md.fmt);
  b.gx.resize(gsx ? size_t(T) * (Hp / 32) : 0);
  b.gh.resize(gsh ? size_t(P) * (Ip / 32) : 0);
  float* gx = b.gx.data();
  float* gh = b.gh.data();
  const int64_t rbx = q8_row_bytes(Hp), rbh = q8_row_bytes(Ip);
  b.x8.resize(kind == Q8 ? size_t(T) * rbx : 0);
  b.h8.resize(kind_h == Q8 ? size_t(P) * rbh : 0);
  uint8_t* x8 = b.x8.data();
  uint8_t* h8 = b.h8.data();
  const int put_x = kind == Q8 ? NATURAL : kind;
  const int32_t* tok = b.tok.data();
  const float* wp = b.wp.data();

  // Both phases hand out runs of units from a counter, guided: each run a share of what is left (long sequential
  // reads while much is left, short ones at the end), rather than a fixed share per thread. A thread the OS
  // preempts (anything else runnable on a core: another process, a driver thread) then holds up one short run, not
  // a fifteenth of the layer while the others wait at the barrier (a fixed share measured 6x slower with one busy
  // process beside 16 threads on the box's 16 cores). Each output element is still computed by one thread in one
  // order (phase 1: a unit's h columns; phase 2: a block's y rows, experts in turn), so the bits do not change.
  // Runs are whole blocks: B1 gate/up units (16 h columns: a cache line of fp32 h), B2 down units (16 rows of y).
  constexpr int64_t B1 = 8, B2 = 4;
  const int A = int(active.size());
  const int64_t n1 = mg.units;  // 2 of h each
  const int64_t per1 = (n1 + B1 - 1) / B1, blocks1 = per1 * A;  // an expert's blocks, then the next's
  const int64_t n2 = md.units;  // 4 rows of y each
  const int64_t blocks2 = (n2 + B2 - 1) / B2;
  std::atomic<int64_t> next1{0}, next2{0};
  const int tb1 = token_block(Hp), tb2 = token_block(Ip);
  if (nthreads <= 0) nthreads = omp_get_max_threads();
  nthreads = int(std::max<int64_t>(1, std::min<int64_t>(nthreads, blocks1)));

  // Stage x (zero-padded to Hp), a row a token. A decode step's few rows are staged here, before the team starts:
  // a row takes a few microseconds on one core, less than the barrier a shared loop ends with (a decode layer's
  // job has ~0.2-0.5 ms in all; a thread that slept past GOMP_SPINCOUNT pays a wake-up at each barrier).
  auto stage = [&](int t) {
    float* dst = xs + int64_t(t) * Hp;
    for (int i = H; i < Hp; ++i) stage_put(put_x, dst, Hp, i, 0.0f);
    for (int i = 0; i < H; ++i) {
      const float v = x_bf16 ? bf16_to_f32(static_cast<const uint16_t*>(x)[int64_t(t) * H + i])
                             : static_cast<const float*>(x)[int64_t(t) * H + i];
      stage_put(put_x, dst, Hp, i, v);
    }
    if (gsx) group_sums(dst, Hp, gx + int64_t(t) * (Hp / 32));
    if (kind == Q8) q8_quantize(dst, Hp, x8 + t * rbx);
  };
  constexpr int STAGE_HERE = 4;  // tokens
  if (T <= STAGE_HERE)
    for (int t = 0; t < T; ++t) stage(t);

#pragma omp parallel num_threads(nthreads)
  {
    Scales s;

    if (T > STAGE_HERE) {
#pragma omp for schedule(static)
      for (int t = 0; t < T; ++t) stage(t);
    }  // implicit barrier

    // Phase 1: h[p] = act(gate x) * (up x), a run of (expert, units) at a time; h is zero past I
    // (tiled: zero rows give zeros; plain: repeated rows are dropped, the columns past the last unit cleared).
    for (int64_t b0, b1; grab(next1, blocks1, nthreads, b0, b1);) {
      for (int64_t b = b0; b < b1;) {  // the run, an expert at a time
        const int a = int(b / per1);
        const int64_t end = std::min(b1, (a + 1) * per1);
        const int64_t j0 = (b - a * per1) * B1, j1 = std::min(n1, (end - a * per1) * B1);
        b = end;
        const int e = active[a], n = count[e], p0 = start[e];
        for (int tb = 0; tb < n; tb += tb1) {
          const int nb = std::min(tb1, n - tb);
          for (int64_t j = j0; j < j1; ++j) {
            apply_unit(
                mg, e, j, kind, lo1, s, nb, [&](int i) {
                  return kind == Q8 ? reinterpret_cast<const float*>(x8 + tok[p0 + tb + i] * rbx)
                                    : xs + int64_t(tok[p0 + tb + i]) * Hp;
                },
                [&](int i) { return gsx ? gx + int64_t(tok[p0 + tb + i]) * (Hp / 32) : nullptr; },
                [&](int i, const float* o) {
                  float* hr = hb + int64_t(p0 + tb + i) * Ip;
                  float g[2] = {o[0], o[1]}, u[2] = {o[2], o[3]};
                  for (int c = 0; c < 2; ++c) {
                    const int64_t col = 2 * j + c;
                    if (col >= I) continue;
                    if (ex.gate_bias) g[c] += ex.gate_bias[int64_t(e) * I + col];
                    if (ex.up_bias) u[c] += ex.up_bias[int64_t(e) * I + col];
                  }
                  stage_put(put_h, hr, Ip, 2 * j, 2 * j < I ? glu(g[0], u[0], act, ex) : 0.0f);
                  stage_put(put_h, hr, Ip, 2 * j + 1, 2 * j + 1 < I ? glu(g[1], u[1], act, ex) : 0.0f);
                  if (j == n1 - 1)
                    for (int64_t col = 2 * n1; col < Ip; ++col) stage_put(put_h, hr, Ip, col, 0.0f);
                },
                prefetch);
          }
        }
      }
    }
#pragma omp barrier
    if (gsh) {
#pragma omp for schedule(static)
      for (int p = 0; p < P; ++p) group_sums(hb + int64_t(p) * Ip, Ip, gh + int64_t(p) * (Ip / 32));
    }  // implicit barrier
    if (kind_h == Q8) {
#pragma omp for schedule(static)
      for (int p = 0; p < P; ++p) q8_quantize(hb + int64_t(p) * Ip, Ip, h8 + p * rbh);
    }  // implicit barrier

    // Phase 2: a run owns down rows [4 q0, 4 q1) of y: every expert, every token, no sharing.
    for (int64_t b0, b1; grab(next2, blocks2, nthreads, b0, b1);) {
      const int64_t q0 = b0 * B2, q1 = std::min(n2, b1 * B2);
      for (int a = 0; a < A; ++a) {
        const int e = active[a], n = count[e], p0 = start[e];
        for (int tb = 0; tb < n; tb += tb2) {
          const int nb = std::min(tb2, n - tb);
          for (int64_t j = q0; j < q1; ++j) {
            const int64_t row0 = j * ROWS;
            apply_unit(
                md, e, j, kind_h, true, s, nb,
                [&](int i) {
                  return kind_h == Q8 ? reinterpret_cast<const float*>(h8 + (p0 + tb + i) * rbh)
                                      : hb + int64_t(p0 + tb + i) * Ip;
                },
                [&](int i) { return gsh ? gh + int64_t(p0 + tb + i) * (Ip / 32) : nullptr; },
                [&](int i, const float* o) {
                  const int p = p0 + tb + i;
                  float* yr = y + int64_t(tok[p]) * H;
                  const float wt = wp[p];
                  const float* db = ex.down_bias ? ex.down_bias + int64_t(e) * H : nullptr;
                  for (int r = 0; r < ROWS; ++r)
                    if (row0 + r < H) yr[row0 + r] += wt * (db ? o[r] + db[row0 + r] : o[r]);
                },
                prefetch);
          }
        }
      }
    }
  }
  return 0;
}

// Where a unit's rows are, for the tiled layout (gate/up tiles, down tiles of one layer).
void packed_mats(int gu_fmt, int gu_group, int dn_fmt, int dn_group, int Hp, int Ip, const uint8_t* gu,
                 int64_t gu_expert_stride, int64_t gu_tile_bytes, int64_t gu_header_bytes, const uint8_t* dn,
                 int64_t dn_expert_stride, int64_t dn_tile_bytes, int64_t dn_header_bytes, Mat& mg, Mat& md) {
  mg.fmt = gu_fmt;
  mg.group = gu_group;
  md.fmt = dn_fmt;
  md.group = dn_group;
  mg.base = gu;
  mg.expert_stride = gu_expert_stride;
  mg.tile_bytes = mg.unit_bytes = gu_tile_bytes;
  mg.header_bytes = gu_header_bytes;
  mg.K = mg.ks = Hp;
  mg.ng = gu_group > 0 ? Hp / gu_group : 1;
  mg.units = Ip / 2;
  md.base = dn;
  md.expert_stride = dn_expert_stride;
  md.tile_bytes = md.unit_bytes = dn_tile_bytes;
  md.header_bytes = dn_header_bytes;
  md.K = md.ks = Ip;
  md.ng = dn_group > 0 ? Ip / dn_group : 1;
  md.units = Hp / ROWS;
}

// The same for a bf16 model's own stacked gate, up [E, I, H] and down [E, H, I].
void plain_mats(int H, int I, const uint16_t* gate, const uint16_t* up, const uint16_t* down, Mat& mg, Mat& md) {
  mg.src[0] = reinterpret_cast<const uint8_t*>(gate);
  mg.src[1] = reinterpret_cast<const uint8_t*>(up);
  mg.nsrc = 2;
  mg.R = I;
  mg.row_bytes = 2 * int64_t(H);
  mg.K = H;
  mg.ks = round_up(H, 128);
  mg.units = (I + 1) / 2;
  mg.unit_bytes = ROWS * mg.row_bytes;
  // gate/up, up to 2 tokens: gate row 2j with up row 2j, then 2j + 1 with 2j + 1, two sequential streams (4 rows
  // at once, 4 streams of one row each, were slower at one token); from 3 tokens 4 rows at once, where the reuse
  // of each load of x counts more.
  mg.rg = 2;
  mg.seq_nt = 2;
  md.src[0] = reinterpret_cast<const uint8_t*>(down);
  md.nsrc = 1;
  md.R = H;
  md.row_bytes = 2 * int64_t(I);
  md.K = I;
  md.ks = round_up(I, 128);
  md.units = (H + ROWS - 1) / ROWS;
  md.unit_bytes = ROWS * md.row_bytes;
  // down: 4 rows at once, as tiles do (one row, or two, at a time were slower at one token)
}

struct Job {  // a layer's decode step for the stream (cadenza_job_*)
  int E, H, I;
  Mat mg, md;
  const void* x;
  int x_bf16, T;
  const int64_t* ids;
  const float* w;
  int k;
  const uint8_t* mask;
  int act, nthreads, prefetch, dot;
  float* y;
  int64_t* stats;
  int ring;
  Extra ex;
};

int64_t monotonic_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return int64_t(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

}  // namespace

extern "C" {

// Bit 0: built with the AVX-512 kernels (always, else the library does not load); bit 1: this build can use
// AVX512_BF16 (the caller still says whether the CPU has it); bit 2: the plain bf16 layout
// (cadenza_moe_forward_plain); bit 3: stream jobs (cadenza_job_*).
int cadenza_cpu_moe_features() { return 15; }

// y [T, H] fp32 (accumulated into) += the routed experts' weighted outputs, for the experts e with mask[e] != 0,
// from packed tiles. x [T, H]: fp32 (x_bf16 = 0) or bf16 (x_bf16 = 1); ids [T, k] int64; w [T, k] fp32.
// dot: bit 0, the CPU has AVX512_BF16 (bf16 and 4-bit tiles then multiply with vdpbf16ps); bit 1, the K-quant
// tiles (q4_k, q5_k, q6_k) multiply int8 activations with AVX512-VNNI (cpu_moe_q8.h; needs AVX512_VBMI too); bit 2,
// int8 and q8_0 tiles do.
int cadenza_moe_forward(int gu_fmt, int gu_group, int dn_fmt, int dn_group, int E, int H, int I, int Hp, int Ip,
                        const uint8_t* gu,
                        int64_t gu_expert_stride, int64_t gu_tile_bytes, int64_t gu_header_bytes, const uint8_t* dn,
                        int64_t dn_expert_stride, int64_t dn_tile_bytes, int64_t dn_header_bytes, const void* x,
                        int x_bf16, int T, const int64_t* ids, const float* w, int k, const uint8_t* mask, int act,
                        int nthreads, int prefetch, int dot, float* y, const Extra* ex) {
  Mat mg, md;
  packed_mats(gu_fmt, gu_group, dn_fmt, dn_group, Hp, Ip, gu, gu_expert_stride, gu_tile_bytes, gu_header_bytes, dn,
              dn_expert_stride, dn_tile_bytes, dn_header_bytes, mg, md);
  return forward(E, H, I, mg, md, x, x_bf16, T, ids, w, k, mask, act, nthreads, prefetch, dot, y,
                 ex ? *ex : Extra{});
}

// The same step on the model's own stacked bf16 weights, read in place: gate, up [E, I, H], down [E, H, I],
// row-major and contiguous; any H, I.
int cadenza_moe_forward_plain(int E, int H, int I, const uint16_t* gate, const uint16_t* up, const uint16_t* down,
                              const void* x, int x_bf16, int T, const int64_t* ids, const float* w, int k,
                              const uint8_t* mask, int act, int nthreads, int prefetch, int dot, float* y,
                              const Extra* ex) {
  if (H <= 0 || I <= 0) return -1;
  Mat mg, md;
  plain_mats(H, I, gate, up, down, mg, md);
  return forward(E, H, I, mg, md, x, x_bf16, T, ids, w, k, mask, act, nthreads, prefetch, dot, y,
                 ex ? *ex : Extra{});
}

// ---- a layer's CPU step as a job the CUDA stream runs (cadenza.moe.offload.streamed) --------------------------------
//
// cadenza_job_new_* fix everything a decode step of one layer needs: the layer's weights, pinned staging buffers
// the stream copies x, ids and w into (and y out of), the expert mask (mask[e] != 0: expert e is computed here,
// i.e. not resident on the GPU; the caller rewrites it between steps when residents change), and a stats array.
// cadenza_job_run(job) is a CUDA host function (cuLaunchHostFunc: void fn(void*)): it runs on the driver's
// callback thread, in stream order, so the host never waits on the GPU mid-step; it calls no CUDA API. It sets y
// to the sum over pairs routed to masked experts (zero when none is) and accounts in stats (int64):
//   [0] calls  [1] tokens  [2] pairs computed here  [3] pairs left to the GPU  [4] experts computed here (summed
//   over calls)  [5] busy ns  [6] last nonzero return code  [7] experts left to the GPU (summed)
//   [8, 8 + E)  routed pairs per expert (all of them: the live popularity)
// An id e + E (E <= id < 2E) names expert e computed elsewhere (the GPU reading it from host memory): counted as
// routed and left to the GPU, never computed here.
//   [8 + E, 8 + E + 2 ring)  the last `ring` calls' [start, end) in CLOCK_MONOTONIC ns (Python's perf_counter_ns)
// Stats only grow; a reader takes differences.

void* cadenza_job_new_packed(int gu_fmt, int gu_group, int dn_fmt, int dn_group, int E, int H, int I, int Hp, int Ip,
                             const uint8_t* gu,
                             int64_t gu_expert_stride, int64_t gu_tile_bytes, int64_t gu_header_bytes,
                             const uint8_t* dn, int64_t dn_expert_stride, int64_t dn_tile_bytes,
                             int64_t dn_header_bytes, const void* x, int x_bf16, int T, const int64_t* ids,
                             const float* w, int k, const uint8_t* mask, int act, int nthreads, int prefetch,
                             int dot, float* y, const Extra* ex, int64_t* stats, int ring) {
  Job* j = new Job{E, H, I, {}, {}, x, x_bf16, T, ids, w, k, mask, act, nthreads, prefetch, dot, y, stats, ring,
                   ex ? *ex : Extra{}};
  packed_mats(gu_fmt, gu_group, dn_fmt, dn_group, Hp, Ip, gu, gu_expert_stride, gu_tile_bytes, gu_header_bytes, dn,
              dn_expert_stride, dn_tile_bytes, dn_header_bytes, j->mg, j->md);
  return j;
}

void* cadenza_job_new_plain(int E, int H, int I, const uint16_t* gate, const uint16_t* up, const uint16_t* down,
                            const void* x, int x_bf16, int T, const int64_t* ids, const float* w, int k,
                            const uint8_t* mask, int act, int nthreads, int prefetch, int dot, float* y,
                            const Extra* ex, int64_t* stats, int ring) {
  if (H <= 0 || I <= 0) return nullptr;
  Job* j = new Job{E, H, I, {}, {}, x, x_bf16, T, ids, w, k, mask, act, nthreads, prefetch, dot, y, stats, ring,
                   ex ? *ex : Extra{}};
  plain_mats(H, I, gate, up, down, j->mg, j->md);
  return j;
}

void cadenza_job_free(void* j) { delete static_cast<Job*>(j); }

void cadenza_job_run(void* p) {
  Job& j = *static_cast<Job*>(p);
  const int64_t t0 = monotonic_ns();
  std::memset(j.y, 0, sizeof(float) * size_t(j.T) * j.H);
  int64_t here = 0, there = 0, experts = 0, resident = 0;
  std::vector<uint8_t> seen(j.E, 0);
  int64_t* per_expert = j.stats + 8;
  for (int64_t i = 0; i < int64_t(j.T) * j.k; ++i) {
    int64_t e = j.ids[i];
    const bool elsewhere = e >= j.E && e < 2 * int64_t(j.E);
    if (elsewhere) e -= j.E;
    if (e < 0 || e >= j.E) continue;
    ++per_expert[e];
    if (elsewhere || !j.mask[e]) {
      ++there;
      if (!seen[e]) ++resident;
      seen[e] = 1;
    } else {
      ++here;
      if (!seen[e]) ++experts;
      seen[e] = 1;
    }
  }
  int rc = 0;
  if (here)
    rc = forward(j.E, j.H, j.I, j.mg, j.md, j.x, j.x_bf16, j.T, j.ids, j.w, j.k, j.mask, j.act, j.nthreads,
                 j.prefetch, j.dot, j.y, j.ex);
  const int64_t t1 = monotonic_ns();
  int64_t* s = j.stats;
  if (j.ring > 0) {
    int64_t* slot = s + 8 + j.E + 2 * (s[0] % j.ring);
    slot[0] = t0;
    slot[1] = t1;
  }
  s[1] += j.T;
  s[2] += here;
  s[3] += there;
  s[4] += experts;
  s[5] += t1 - t0;
  if (rc) s[6] = rc;
  s[7] += resident;
  std::atomic_thread_fence(std::memory_order_release);
  s[0] += 1;  // last: a reader that sees the new count sees the rest
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
        } else if (fmt == Q6_K) {
          // per 128 columns: row r's 32 words of nibbles at 64 r, its 32 bytes of high pairs at 256 + 32 r
          for (int c = 0; c < K / 128; ++c)
            for (int half = 0; half < 2; ++half) {
              const uint8_t* lo = data + c * 384 + 64 * r + 32 * half;
              const uint8_t* hi = data + c * 384 + 256 + 32 * r + 16 * half;
              const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo)));
              const __m512i hv = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(hi)));
              for (int n = 0; n < 4; ++n) {
                const int kk = c * 128 + 32 * n + 16 * half;
                const __m512i q = _mm512_or_si512(
                    _mm512_and_si512(_mm512_srlv_epi32(v, _mm512_set1_epi32(4 * n)), low4),
                    _mm512_slli_epi32(_mm512_and_si512(_mm512_srlv_epi32(hv, _mm512_set1_epi32(2 * n)),
                                                       _mm512_set1_epi32(3)), 4));
                const __m512 qf = _mm512_cvtepi32_ps(_mm512_sub_epi32(q, _mm512_set1_epi32(32)));
                store(orow + kk, _mm512_mul_ps(qf, _mm512_set1_ps(s.sc[r * ng + kk / 16])));
              }
            }
        } else if (fmt == Q5_K) {
          // per 128 columns: row r's 32 words of nibbles at 64 r, its 4 words of 5th bits at 256 + 16 r
          for (int c = 0; c < K / 128; ++c) {
            uint32_t hw[4];
            std::memcpy(hw, data + c * 320 + 256 + 16 * r, 16);
            for (int half = 0; half < 2; ++half) {
              const uint8_t* lo = data + c * 320 + 64 * r + 32 * half;
              const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo)));
              for (int n = 0; n < 4; ++n) {
                const int kk = c * 128 + 32 * n + 16 * half, g = r * ng + kk / 32;
                const __m512i nib = _mm512_and_si512(_mm512_srlv_epi32(v, _mm512_set1_epi32(4 * n)), low4);
                const __m512i q = _mm512_mask_or_epi32(nib, __mmask16(hw[n] >> (16 * half)), nib, _mm512_set1_epi32(16));
                store(orow + kk,
                      _mm512_fmsub_ps(_mm512_cvtepi32_ps(q), _mm512_set1_ps(s.sc[g]), _mm512_set1_ps(s.mn[g])));
              }
            }
          }
        } else if (fmt == INT8 || fmt == Q8_0) {
          for (int c = 0; c < K / 64; ++c)
            for (int q = 0; q < 4; ++q) {
              const int kk = c * 64 + 16 * q;
              const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(data + (c * ROWS + r) * 64 + 16 * q));
              const int g = r * ng + (group > 0 ? kk / group : 0);
              store(orow + kk, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), _mm512_set1_ps(s.sc[g])));
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
                if (fmt == INT4) {
                  const __m512i qz = _mm512_sub_epi32(q, _mm512_set1_epi32(s.z[r * ng + g]));
                  store(orow + kk, _mm512_mul_ps(_mm512_cvtepi32_ps(qz), _mm512_set1_ps(s.sc[r * ng + g])));
                } else {  // block formats: base[q] * scale - min
                  const __m512 b = _mm512_permutexvar_ps(q, _mm512_load_ps(s.base));
                  store(orow + kk, _mm512_fmsub_ps(b, _mm512_set1_ps(s.sc[r * ng + g]), _mm512_set1_ps(s.mn[r * ng + g])));
                }
              }
            }
          }
        }
      }
    }
  }
  return 0;
}

// A measurement, not a kernel: the bytes a one-token call reads (n spans: each routed expert's gate/up and down
// tiles), split over nthreads in equal contiguous pieces and read with 64-byte loads and nothing else (one xor a
// line), as fast as these threads can pull them from memory: the ceiling the kernel's arithmetic is measured against
// (cadenza.bench.cpu_kernel's "read" rows). Returns the lines' xor, so that the loads are not optimised away.
uint64_t cadenza_read_spans(const uint8_t* const* spans, const int64_t* bytes, int n, int nthreads) {
  int64_t total = 0;
  for (int i = 0; i < n; ++i) total += bytes[i] / 64;
  if (nthreads <= 0) nthreads = omp_get_max_threads();
  uint64_t out = 0;
#pragma omp parallel num_threads(nthreads) reduction(^ : out)
  {
    const int nt = omp_get_num_threads(), id = omp_get_thread_num();
    const int64_t l0 = total * id / nt, l1 = total * (id + 1) / nt;  // this thread's lines of the concatenation
    __m512i acc0 = _mm512_setzero_si512(), acc1 = _mm512_setzero_si512();
    int64_t base = 0;
    for (int i = 0; i < n && base < l1; ++i) {
      const int64_t lines = bytes[i] / 64, a = std::max(l0, base), b = std::min(l1, base + lines);
      const uint8_t* p = spans[i];
      int64_t j = a - base;
      for (; j + 1 < b - base; j += 2) {  // two independent chains: the loads, not the xor, set the pace
        acc0 = _mm512_xor_si512(acc0, _mm512_loadu_si512(p + 64 * j));
        acc1 = _mm512_xor_si512(acc1, _mm512_loadu_si512(p + 64 * (j + 1)));
      }
      if (j < b - base) acc0 = _mm512_xor_si512(acc0, _mm512_loadu_si512(p + 64 * j));
      base += lines;
    }
    alignas(64) uint64_t lanes[8];
    _mm512_store_si512(lanes, _mm512_xor_si512(acc0, acc1));
    for (uint64_t v : lanes) out ^= v;
  }
  return out;
}

}  // extern "C"
