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
//
// Q5_K block (176 bytes / 256 columns): d, dmin, 12 bytes of scales and mins (as Q4_K), qh 32, qs 128 (as Q4_K's).
// Per 128 columns (half h): the nibbles as Q4_K's, then 16 bytes: for bit s = 4h .. 4h + 3 of qh's bytes, 4 bytes
// whose bit t of byte q is bit s of qh[8q + t] (column 32 s + 8q + t's fifth bit). Header fields as Q4_K's.
//
// Q8_0 block (34 bytes / 32 columns): d (fp16), 32 int8 codes, which are the row's bytes in column order (64-byte
// pieces: two blocks). Header: d [32].
// Q4_0 block (18 bytes / 32 columns): d (fp16), 16 bytes (byte j: column j low, 16 + j high); MXFP4 (17 bytes): an
// e8m0 scale byte, then the same. Per 128 columns (blocks n = 0..3), 16-bit word j (< 16) holds column j of blocks
// 0, 1 (low byte: low nibbles) and 2, 3 (high byte); word 16 + j their columns 16 + j. Header: d or e [32].
//
// `cadenza_dequant_rows` turns the same blocks into fp32 weights with gguf-py's arithmetic (its dequantize_blocks),
// so the values are equal bit for bit: scale products that are exact in fp32 (an fp16 times a 6- or 8-bit code),
// then one rounding per weight (Q4_K / Q5_K: code * scale - min; Q6_K: code * scale).
#include <omp.h>

#include <cstdint>
#include <cstring>

namespace {

constexpr int Q4_K = 0, Q6_K = 1, Q5_K = 2, Q8_0 = 3, Q4_0 = 4, MXFP4 = 5;

// Q4_K's and Q5_K's header fields for super-block b: d, dmin as they are, 6-bit scales and mins unpacked
inline void k_fields(const uint8_t* blk, const uint8_t* s, int64_t b, uint8_t* d, uint8_t* dmin, uint8_t* sc,
                     uint8_t* m) {
  std::memcpy(d + 2 * b, blk, 2);
  std::memcpy(dmin + 2 * b, blk + 2, 2);
  for (int j = 0; j < 4; ++j) {  // lo = s[0:4], hi = s[4:8], mix = s[8:12]
    sc[8 * b + j] = s[j] & 0x3F;
    sc[8 * b + 4 + j] = (s[8 + j] & 0x0F) | ((s[j] >> 2) & 0x30);
    m[8 * b + j] = s[4 + j] & 0x3F;
    m[8 * b + 4 + j] = (s[8 + j] >> 4) | ((s[4 + j] >> 2) & 0x30);
  }
}

// two 32-byte runs of nibbles -> a 64-byte piece: byte 2j = first[j], 2j + 1 = second[j]
inline void interleave(const uint8_t* first, const uint8_t* second, uint8_t* out) {
  for (int j = 0; j < 32; ++j) {
    out[2 * j] = first[j];
    out[2 * j + 1] = second[j];
  }
}

// Q4_K (qh null, 144-byte blocks, 64-byte chunk pieces) and Q5_K (176-byte blocks, a 16-byte piece of fifth bits)
inline void k_row(const uint8_t* src, int64_t ns, uint8_t* tile, int64_t hb, int slot, bool q5) {
  const int64_t d_row = 2 * ns, sc_row = 8 * ns, block = q5 ? 176 : 144, per = q5 ? 80 : 64;
  uint8_t* d = tile + slot * d_row;
  uint8_t* dmin = tile + 4 * d_row + slot * d_row;
  uint8_t* sc = tile + 8 * d_row + slot * sc_row;
  uint8_t* m = tile + 8 * d_row + 4 * sc_row + slot * sc_row;
  uint8_t* body = tile + hb;
  for (int64_t b = 0; b < ns; ++b) {
    const uint8_t* blk = src + block * b;
    k_fields(blk, blk + 4, b, d, dmin, sc, m);
    const uint8_t* qs = blk + (q5 ? 48 : 16);
    for (int half = 0; half < 2; ++half) {  // 128 columns: chunk 2b + half of the row
      uint8_t* chunk = body + (2 * b + half) * 4 * per;
      interleave(qs + 64 * half, qs + 64 * half + 32, chunk + 64 * slot);
      if (!q5) continue;
      const uint8_t* qh = blk + 16;
      uint8_t* high = chunk + 256 + 16 * slot;
      for (int s = 0; s < 4; ++s) {
        const int bit = 4 * half + s;
        for (int q = 0; q < 4; ++q) {
          uint8_t v = 0;
          for (int t = 0; t < 8; ++t) v |= ((qh[8 * q + t] >> bit) & 1) << t;
          high[4 * s + q] = v;
        }
      }
    }
  }
}

// Q8_0 (head 2, codes bytes), Q4_0 (head 2) and MXFP4 (head 1): 32 columns a block, one header field
inline void small_row(int type, const uint8_t* src, int64_t k, uint8_t* tile, int64_t hb, int slot) {
  const int head = type == MXFP4 ? 1 : 2, block = type == Q8_0 ? 34 : head + 16;
  const int64_t nb = k / 32;
  uint8_t* field = tile + slot * nb * head;
  uint8_t* body = tile + hb;
  for (int64_t n = 0; n < nb; ++n) std::memcpy(field + head * n, src + block * n, head);
  if (type == Q8_0) {  // 64-byte pieces: blocks 2c, 2c + 1
    for (int64_t c = 0; c < nb / 2; ++c) {
      uint8_t* out = body + c * 256 + 64 * slot;
      std::memcpy(out, src + block * 2 * c + 2, 32);
      std::memcpy(out + 32, src + block * (2 * c + 1) + 2, 32);
    }
    return;
  }
  for (int64_t c = 0; c < nb / 4; ++c) {  // 128 columns: blocks 4c .. 4c + 3
    const uint8_t* q[4];
    for (int i = 0; i < 4; ++i) q[i] = src + block * (4 * c + i) + head;
    uint8_t* out = body + c * 256 + 64 * slot;
    for (int j = 0; j < 16; ++j) {
      out[2 * j] = (q[0][j] & 0x0F) | (q[1][j] << 4);  // columns j of blocks 0, 1
      out[2 * j + 1] = (q[2][j] & 0x0F) | (q[3][j] << 4);  // of blocks 2, 3
      out[2 * (16 + j)] = (q[0][j] >> 4) | (q[1][j] & 0xF0);  // columns 16 + j
      out[2 * (16 + j) + 1] = (q[2][j] >> 4) | (q[3][j] & 0xF0);
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

inline float half_to_float(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
  uint32_t bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);  // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    int e = -1;
    uint32_t m = man;
    do {
      ++e;
      m <<= 1;
    } while ((m & 0x400) == 0);
    bits = sign | ((112 - e) << 23) | ((m & 0x3FF) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline void dequant_k(const uint8_t* blk, bool q5, float* y) {  // Q4_K, Q5_K: one super-block -> 256 weights
  const float d = half_to_float(blk), dmin = half_to_float(blk + 2);
  const uint8_t* s = blk + 4;
  const uint8_t* qh = blk + 16;
  const uint8_t* qs = blk + (q5 ? 48 : 16);
  for (int j = 0; j < 8; ++j) {  // sub-block j: nibble half j % 2 of the 32-byte run j / 2
    const int sc = j < 4 ? s[j] & 0x3F : (s[8 + j - 4] & 0x0F) | ((s[j - 4] >> 2) & 0x30);
    const int m = j < 4 ? s[4 + j] & 0x3F : (s[8 + j - 4] >> 4) | ((s[j] >> 2) & 0x30);
    const float scale = d * static_cast<float>(sc), mn = dmin * static_cast<float>(m);
    const uint8_t* run = qs + 32 * (j / 2);
    for (int i = 0; i < 32; ++i) {
      int q = (run[i] >> (4 * (j % 2))) & 0x0F;
      if (q5) q |= ((qh[i] >> j) & 1) << 4;
      y[32 * j + i] = scale * static_cast<float>(q) - mn;
    }
  }
}

inline void dequant_q6_k(const uint8_t* blk, float* y) {
  const uint8_t *ql = blk, *qh = blk + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
  const float d = half_to_float(blk + 208);
  for (int h = 0; h < 2; ++h) {
    for (int t = 0; t < 4; ++t) {  // 32 weights: ql run (t % 2) shifted by 4 (t / 2), qh shifted by 2t
      for (int i = 0; i < 32; ++i) {
        const int p = 128 * h + 32 * t + i;
        const int lo = (ql[64 * h + 32 * (t % 2) + i] >> (4 * (t / 2))) & 0x0F;
        const int hi = (qh[32 * h + i] >> (2 * t)) & 0x03;
        const float scale = d * static_cast<float>(sc[p / 16]);
        y[p] = scale * static_cast<float>((lo | (hi << 4)) - 32);
      }
    }
  }
}

}  // namespace

extern "C" {

// Rows [rows] of k columns of GGUF type `type` (0 Q4_K, 1 Q6_K, 2 Q5_K, 3 Q8_0, 4 Q4_0) -> fp32 y [rows, k], as
// gguf-py's dequantize gives them. Returns 0, or -1 for a type or length it does not take.
int cadenza_dequant_rows(int type, const uint8_t* src, int64_t src_stride, int64_t rows, int64_t k, float* y,
                         int threads) {
  const int64_t align = type <= Q5_K ? 256 : 32;
  if (type < Q4_K || type > Q4_0 || k % align != 0) return -1;
#pragma omp parallel for num_threads(threads) schedule(static, 16)
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = src + r * src_stride;
    float* out = y + r * k;
    if (type == Q4_K || type == Q5_K) {
      for (int64_t b = 0; b < k / 256; ++b) dequant_k(row + (type == Q5_K ? 176 : 144) * b, type == Q5_K, out + 256 * b);
    } else if (type == Q6_K) {
      for (int64_t b = 0; b < k / 256; ++b) dequant_q6_k(row + 210 * b, out + 256 * b);
    } else {
      const int block = type == Q8_0 ? 34 : 18;
      for (int64_t b = 0; b < k / 32; ++b) {
        const uint8_t* blk = row + block * b;
        const float d = half_to_float(blk);
        float* o = out + 32 * b;
        if (type == Q8_0) {
          for (int i = 0; i < 32; ++i) o[i] = static_cast<float>(static_cast<int8_t>(blk[2 + i])) * d;
        } else {
          for (int i = 0; i < 16; ++i) {
            o[i] = d * static_cast<float>((blk[2 + i] & 0x0F) - 8);
            o[16 + i] = d * static_cast<float>((blk[2 + i] >> 4) - 8);
          }
        }
      }
    }
  }
  return 0;
}

// Rows [rows] of k columns of GGUF type `type` (0 Q4_K, 1 Q6_K, 2 Q5_K, 3 Q8_0, 4 Q4_0, 5 MXFP4), row r's blocks
// at src + r * src_stride, into
// tiles of tile_bytes (a header of hb bytes, its fields filling the first field_bytes of it); returns 0, or -1 for
// a type or shape this file does not move (the caller's numpy path does).
int cadenza_repack_rows(int type, const uint8_t* src, int64_t src_stride, int64_t rows, int64_t k, uint8_t* dst,
                        int64_t tile_bytes, int64_t hb, int64_t field_bytes, int rows_per_tile, int slot0,
                        int threads) {
  const int64_t align = type <= Q5_K ? 256 : 128;  // whole super-blocks; no padding to 128 columns
  if (type < Q4_K || type > MXFP4 || k % align != 0 || rows_per_tile < 1 || slot0 + rows_per_tile > 4) return -1;
  const int64_t ns = k / 256;
#pragma omp parallel for num_threads(threads) schedule(static, 16)
  for (int64_t r = 0; r < rows; ++r) {
    uint8_t* tile = dst + (r / rows_per_tile) * tile_bytes;
    const int slot = slot0 + static_cast<int>(r % rows_per_tile);
    if (slot == 0 && hb > field_bytes) std::memset(tile + field_bytes, 0, hb - field_bytes);
    const uint8_t* row = src + r * src_stride;
    if (type == Q4_K || type == Q5_K) {
      k_row(row, ns, tile, hb, slot, type == Q5_K);
    } else if (type == Q6_K) {
      q6_k_row(row, ns, tile, hb, slot);
    } else {
      small_row(type, row, k, tile, hb, slot);
    }
  }
  return 0;
}
}
