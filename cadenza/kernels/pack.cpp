// Float expert rows quantized into the kernels' tiles (cadenza/kernels/layout.py: bf16, int8, int4) in one pass on
// every core: written here because layout.pack_layer's torch ops (~15 small calls a chunk from Python threads) packed
// int4 at 0.67 GB/s with 16 threads on the H200 box, 4.2 s a Mixtral layer of a --experts int4 load. The arithmetic
// is layout._quantize_rows' (the reference), the same bytes:
//
// int4, per row and group of `group` columns: lo = min(min w, 0), hi = max(max w, 0), scale = bf16(rne((hi - lo) /
// 15)), s = float(scale), inv = s > 0 ? 1 / s : 0, z = clamp(round(-lo * inv), 0, 15), q = clamp(round(w * inv) +
// z, 0, 15), rounding half to even (torch.round; every value rounded is under 2^22 in
// magnitude: round_even). Per 128 columns, 16-bit word j = q[j] | q[32 + j] << 4 | q[64 + j]
// << 8 | q[96 + j] << 12. Header: the tile's 4 rows' bf16 scales (row 0's groups, row 1's, ...), then their uint8
// zero points, zero-padded to hb bytes.
// int8: scale = max(|max w|, |min w|) / 127 (fp32), q = clamp(round(w * inv), -127, 127); header: fp32 scales.
// bf16: w rounded to nearest even; no header.
//
// A tile holds 4 rows: its header, then per 64 bytes of a row a chunk of the 4 rows' 64 bytes in turn. Source row r
// lands in tile r / rows_per_tile at slot slot0 + r % rows_per_tile (gate/up tiles: gate rows in slots 0, 1, up rows
// in 2, 3). Rows past `rows` (up to the tiles' padded count) and columns past `cols` (up to kp) are zeros.
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int BF16 = 0, INT8 = 1, INT4 = 2;       // formats
constexpr int SRC_F32 = 0, SRC_BF16 = 1;          // source dtypes

inline float bf16_to_f32(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as torch's conversion (NaN kept a NaN)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// v rounded to an integer, half to even (torch.round), for |v| < 2^22: adding and taking back 1.5 * 2^23 leaves no
// fraction bits, and the default rounding mode rounds the sum to nearest even. Inline where std::nearbyint is a
// libm call on baseline x86-64 (no SSE4.1), which made this loop slower than torch's.
inline float round_even(float v) {
  constexpr float magic = 12582912.0f;  // kept as written: without -ffast-math compilers do not reassociate
  return (v + magic) - magic;
}

// min and max of x[0, n) (n a multiple of 16) starting from (lo, hi): 16 running values a side, which the compiler
// turns into vector min / max (a single running value is a chain of scalar compares); exact in any order.
inline void range(const float* x, int64_t n, float& lo, float& hi) {
  float mn[16], mx[16];
  for (int l = 0; l < 16; ++l) mn[l] = lo, mx[l] = hi;
  for (int64_t c = 0; c < n; c += 16)
    for (int l = 0; l < 16; ++l) {
      mn[l] = x[c + l] < mn[l] ? x[c + l] : mn[l];
      mx[l] = x[c + l] > mx[l] ? x[c + l] : mx[l];
    }
  for (int l = 0; l < 16; ++l) {
    lo = mn[l] < lo ? mn[l] : lo;
    hi = mx[l] > hi ? mx[l] : hi;
  }
}

// Source row r as fp32, zero past cols (and an all-zero row past rows), into buf[kp].
void load_row(const void* src, int src_dtype, int64_t stride, int64_t r, int64_t rows, int64_t cols, int64_t kp,
              float* buf) {
  int64_t n = r < rows ? cols : 0;
  if (src_dtype == SRC_F32) {
    const float* s = static_cast<const float*>(src) + r * stride;
    for (int64_t c = 0; c < n; ++c) buf[c] = s[c];
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(src) + r * stride;
    for (int64_t c = 0; c < n; ++c) buf[c] = bf16_to_f32(s[c]);
  }
  for (int64_t c = n; c < kp; ++c) buf[c] = 0.0f;
}

// One row (fp32 w[kp]) quantized: its bytes in row order into row[] and its header fields into the tile's header.
void quantize_row(int fmt, int group, const float* w, int64_t kp, uint8_t* row, uint8_t* header, int slot,
                  int32_t* q) {
  if (fmt == BF16) {
    uint16_t* out = reinterpret_cast<uint16_t*>(row);
    for (int64_t c = 0; c < kp; ++c) out[c] = f32_to_bf16(w[c]);
    return;
  }
  int64_t g = group ? group : kp, ng = kp / g;
  if (fmt == INT8) {
    float* scales = reinterpret_cast<float*>(header) + slot * ng;
    int8_t* q = reinterpret_cast<int8_t*>(row);
    for (int64_t j = 0; j < ng; ++j) {
      const float* x = w + j * g;
      float mn = x[0], mx = x[0];
      range(x, g, mn, mx);
      float amx = std::fabs(mx), amn = std::fabs(mn);
      float scale = (amx > amn ? amx : amn) / 127.0f;
      float inv = scale > 0 ? 1.0f / scale : 0.0f;
      scales[j] = scale;
      for (int64_t c = 0; c < g; ++c) {
        float v = round_even(x[c] * inv);
        v = v < -127.0f ? -127.0f : (v > 127.0f ? 127.0f : v);
        q[j * g + c] = static_cast<int8_t>(v);
      }
    }
    return;
  }
  // int4
  uint16_t* scales = reinterpret_cast<uint16_t*>(header) + slot * ng;
  uint8_t* zeros = header + 2 * 4 * ng + slot * ng;
  for (int64_t j = 0; j < ng; ++j) {
    const float* x = w + j * g;
    float mn = 0.0f, mx = 0.0f;  // the range widened to hold 0, as lo = min(min w, 0), hi = max(max w, 0)
    range(x, g, mn, mx);
    uint16_t sb = f32_to_bf16((mx - mn) / 15.0f);
    float s = bf16_to_f32(sb);
    float inv = s > 0 ? 1.0f / s : 0.0f;
    float z = round_even(-mn * inv);
    z = z < 0.0f ? 0.0f : (z > 15.0f ? 15.0f : z);
    scales[j] = sb;
    zeros[j] = static_cast<uint8_t>(z);
    int32_t* qj = q + j * g;
    for (int64_t c = 0; c < g; ++c) {
      float v = round_even(x[c] * inv) + z;
      v = v < 0.0f ? 0.0f : v;
      v = v > 15.0f ? 15.0f : v;
      qj[c] = static_cast<int32_t>(v);
    }
  }
  uint16_t* words = reinterpret_cast<uint16_t*>(row);
  for (int64_t b = 0; b < kp / 128; ++b) {
    const int32_t* p = q + b * 128;
    for (int j = 0; j < 32; ++j)
      words[b * 32 + j] = static_cast<uint16_t>(p[j] | p[32 + j] << 4 | p[64 + j] << 8 | p[96 + j] << 12);
  }
}

}  // namespace

extern "C" {

// Rows [0, rows) of src (row stride `stride` elements, `cols` columns; src_dtype SRC_F32 or SRC_BF16), padded to
// `padded_rows` rows and kp columns, quantized into tiles (uint8 [T, tile_bytes], hb header bytes a tile). Returns
// 0, or -1 for arguments it does not take.
int cadenza_pack_rows(int fmt, int group, int src_dtype, const void* src, int64_t stride, int64_t rows, int64_t cols,
                      int64_t padded_rows, int64_t kp, uint8_t* tiles, int64_t tile_bytes, int64_t hb,
                      int rows_per_tile, int slot0, int threads) {
  if (fmt < BF16 || fmt > INT4 || (src_dtype != SRC_F32 && src_dtype != SRC_BF16) || kp % 128 || cols > kp ||
      rows > padded_rows || padded_rows % rows_per_tile || (group && kp % group) || rows_per_tile < 1 ||
      slot0 + rows_per_tile > 4)
    return -1;
  const int64_t row_bytes = fmt == BF16 ? 2 * kp : (fmt == INT8 ? kp : kp / 2);
  const int64_t n_tiles = padded_rows / rows_per_tile;
  const int64_t ng = group ? kp / group : 1;
  const int64_t used = fmt == BF16 ? 0 : (fmt == INT8 ? 4 * 4 * ng : 3 * 4 * ng);  // header bytes the fields take
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> w(static_cast<size_t>(kp));
    std::vector<uint8_t> row(static_cast<size_t>(row_bytes));
    std::vector<int32_t> codes(static_cast<size_t>(kp));
#pragma omp for schedule(dynamic, 4)
    for (int64_t t = 0; t < n_tiles; ++t) {
      uint8_t* tile = tiles + t * tile_bytes;
      if (hb > used) std::memset(tile + used, 0, static_cast<size_t>(hb - used));  // the header's padding
      for (int s = 0; s < rows_per_tile; ++s) {
        int64_t r = t * rows_per_tile + s;
        int slot = slot0 + s;
        load_row(src, src_dtype, stride, r, rows, cols, kp, w.data());
        quantize_row(fmt, group, w.data(), kp, row.data(), tile, slot, codes.data());
        uint8_t* body = tile + hb;
        for (int64_t c = 0; c < row_bytes / 64; ++c)
          std::memcpy(body + c * 256 + slot * 64, row.data() + c * 64, 64);
      }
    }
  }
  return 0;
}

}  // extern "C"
