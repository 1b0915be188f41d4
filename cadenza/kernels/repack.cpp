// GGUF K-quant rows moved into the kernels' tiles (cadenza/kernels/layout.py, blocks.py) in one pass: written here
// because numpy's several passes per matrix moved a 26 GB Q4_K_M file at ~1.8 GB/s on 16 cores, most of a load.
//
// A tile holds 4 rows: a header (each field of the format for its 4 rows in turn: row 0's values, row 1's, ...;
// zero-padded to a multiple of 64 bytes), then per 128 columns a chunk: each piece of the format for the 4 rows in
// turn (q4_k: one 64-byte piece a row; q6_k: a 64-byte piece, then a 32-byte one). Source row r lands in tile
// r / rows_per_tile at slot slot0 + r % rows_per_tile (gate/up tiles: gate rows in slots 0, 1, up rows in 2, 3).
//
// Q4_K block (144 bytes / 256 columns): d, dmin (fp16), 12 bytes of 6-bit scales and mins, 128 bytes of nibbles
// (per 64 columns a 32-byte run: byte j holds column j in its low nibble, 32 + j in its high one). The tile's row
// bytes: per 128 columns, byte 2j = the first run's byte j, byte 2j + 1 = the second run's (16-bit word j holds
// columns j, 32 + j, 64 + j, 96 + j). Header fields: d [256], dmin [256], sc [32], m [32] (one byte each).
//
// Q6_K block (210 bytes / 256 columns): ql 128, qh 64, scales 16 (int8), d (fp16). Per 128 columns (half h): ql's
// 64 bytes (first 32, second 32) become 64 bytes: even byte j = first[j] & 15 | (second[j] & 15) << 4, odd byte
// j = first[j] >> 4 | second[j] & 0xF0; then qh's 32 bytes as they are. Header fields: d [256], sc [16].
#include <omp.h>

#include <cstdint>
#include <cstring>

namespace {

constexpr int Q4_K = 0, Q6_K = 1;

inline void q4_k_row(const uint8_t* src, int64_t ns, uint8_t* tile, int64_t hb, int slot) {
  const int64_t d_row = 2 * ns, sc_row = 8 * ns;
  uint8_t* d = tile + slot * d_row;
  uint8_t* dmin = tile + 4 * d_row + slot * d_row;
  uint8_t* sc = tile + 8 * d_row + slot * sc_row;
  uint8_t* m = tile + 8 * d_row + 4 * sc_row + slot * sc_row;
  uint8_t* body = tile + hb;
  for (int64_t b = 0; b < ns; ++b) {
    const uint8_t* blk = src + 144 * b;
    std::memcpy(d + 2 * b, blk, 2);
    std::memcpy(dmin + 2 * b, blk + 2, 2);
    const uint8_t* s = blk + 4;  // lo = s[0:4], hi = s[4:8], mix = s[8:12]
    for (int j = 0; j < 4; ++j) {
      sc[8 * b + j] = s[j] & 0x3F;
      sc[8 * b + 4 + j] = (s[8 + j] & 0x0F) | ((s[j] >> 2) & 0x30);
      m[8 * b + j] = s[4 + j] & 0x3F;
      m[8 * b + 4 + j] = (s[8 + j] >> 4) | ((s[4 + j] >> 2) & 0x30);
    }
    for (int half = 0; half < 2; ++half) {  // 128 columns: chunk 2b + half of the row, 4 rows x 64 bytes
      const uint8_t* first = blk + 16 + 64 * half;
      const uint8_t* second = first + 32;
      uint8_t* out = body + (2 * b + half) * 256 + 64 * slot;
      for (int j = 0; j < 32; ++j) {
        out[2 * j] = first[j];
        out[2 * j + 1] = second[j];
      }
    }
  }
}

inline void q6_k_row(const uint8_t* src, int64_t ns, uint8_t* tile, int64_t hb, int slot) {
  const int64_t d_row = 2 * ns, sc_row = 16 * ns;
  uint8_t* d = tile + slot * d_row;
  uint8_t* sc = tile + 4 * d_row + slot * sc_row;
  uint8_t* body = tile + hb;
  for (int64_t b = 0; b < ns; ++b) {
    const uint8_t* blk = src + 210 * b;
    std::memcpy(d + 2 * b, blk + 208, 2);
    std::memcpy(sc + 16 * b, blk + 192, 16);
    for (int half = 0; half < 2; ++half) {  // a chunk: 4 rows x 64 bytes of nibbles, then 4 rows x 32 of high bits
      const uint8_t* first = blk + 64 * half;
      const uint8_t* second = first + 32;
      uint8_t* chunk = body + (2 * b + half) * 384;
      uint8_t* lo = chunk + 64 * slot;
      for (int j = 0; j < 32; ++j) {
        lo[2 * j] = (first[j] & 0x0F) | ((second[j] & 0x0F) << 4);
        lo[2 * j + 1] = (first[j] >> 4) | (second[j] & 0xF0);
      }
      std::memcpy(chunk + 256 + 32 * slot, blk + 128 + 32 * half, 32);
    }
  }
}

}  // namespace

extern "C" {

// Rows [rows] of k columns of GGUF type `type` (0 Q4_K, 1 Q6_K), row r's blocks at src + r * src_stride, into
// tiles of tile_bytes (a header of hb bytes, its fields filling the first field_bytes of it); returns 0, or -1 for
// a type or shape this file does not move (the caller's numpy path does).
int cadenza_repack_rows(int type, const uint8_t* src, int64_t src_stride, int64_t rows, int64_t k, uint8_t* dst,
                        int64_t tile_bytes, int64_t hb, int64_t field_bytes, int rows_per_tile, int slot0,
                        int threads) {
  if ((type != Q4_K && type != Q6_K) || k % 256 != 0 || rows_per_tile < 1 || slot0 + rows_per_tile > 4) return -1;
  const int64_t ns = k / 256;
#pragma omp parallel for num_threads(threads) schedule(static, 16)
  for (int64_t r = 0; r < rows; ++r) {
    uint8_t* tile = dst + (r / rows_per_tile) * tile_bytes;
    const int slot = slot0 + static_cast<int>(r % rows_per_tile);
    if (slot == 0 && hb > field_bytes) std::memset(tile + field_bytes, 0, hb - field_bytes);
    if (type == Q4_K) {
      q4_k_row(src + r * src_stride, ns, tile, hb, slot);
    } else {
      q6_k_row(src + r * src_stride, ns, tile, hb, slot);
    }
  }
  return 0;
}
}
