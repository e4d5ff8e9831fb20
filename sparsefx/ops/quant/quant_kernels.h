// The quantized row kernels of sparsefx/ops/quant, shared by that family's ops (quant.cpp) and the whole-step
// decode runtime (ops/decode/decode.cpp), which includes this header. Everything here is static: each extension
// gets its own copy. Builds are keyed by this file's content too (build.py: `depends`).
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstring>
#include <vector>

static inline uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

static inline __m256 lanes_to_ps(uint32_t v, __m256i shifts, int bits) {
  const __m256i lanes = _mm256_srlv_epi32(_mm256_set1_epi32((int)v), shifts);
  return _mm256_cvtepi32_ps(_mm256_and_si256(lanes, _mm256_set1_epi32((1 << bits) - 1)));
}

// Sixteen consecutive codes of a row's little-endian bit stream (2 * BITS bytes from p, which starts on a byte) as
// two fp32 vectors: each 32-bit word is broadcast to eight lanes, shifted per lane and masked. 3-bit codes take two
// 32-bit loads at p and p + 3, the second reaching one byte beyond the six; the caller passes `tail` = true where
// that byte could lie past the end of the buffer, and then it is not read.
template <int BITS>
static inline void codes16(const uint8_t* p, bool tail, __m256& q0, __m256& q1) {
  if constexpr (BITS == 8) {
    q0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
    q1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8))));
  } else if constexpr (BITS == 4) {
    const __m256i sh = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    q0 = lanes_to_ps(load_u32(p), sh, 4);
    q1 = lanes_to_ps(load_u32(p + 4), sh, 4);
  } else if constexpr (BITS == 2) {
    const uint32_t v = load_u32(p);
    q0 = lanes_to_ps(v, _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14), 2);
    q1 = lanes_to_ps(v, _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30), 2);
  } else {  // 3 bits: eight codes per three bytes
    const __m256i sh = _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21);
    const uint32_t hi = tail ? (uint32_t)p[3] | ((uint32_t)p[4] << 8) | ((uint32_t)p[5] << 16) : load_u32(p + 3);
    q0 = lanes_to_ps(load_u32(p), sh, 3);
    q1 = lanes_to_ps(hi, sh, 3);
  }
}

// Thirty-two consecutive codes (4 * BITS bytes from p) as four fp32 vectors, in the order `chunk_order` gives:
// 4- and 2-bit codes are split into bit planes of whole bytes (a mask and a shift per plane, then a zero-extension
// per eight bytes: no per-lane shifts), so the vectors hold the codes interleaved and x is permuted to match once per
// call. 8- and 3-bit codes come in order.
template <int BITS>
static inline void codes32(const uint8_t* p, bool tail, __m256* q) {
  if constexpr (BITS == 8) {
    for (int i = 0; i < 4; ++i)
      q[i] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * i))));
  } else if constexpr (BITS == 4) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(b, mask), hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
    q[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    q[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    q[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    q[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
  } else if constexpr (BITS == 2) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    const __m128i mask = _mm_set1_epi8(0x03);
    q[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(b, mask)));
    q[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 2), mask)));
    q[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), mask)));
    q[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 6), mask)));
  } else {
    codes16<3>(p, false, q[0], q[1]);
    codes16<3>(p + 6, tail, q[2], q[3]);
  }
}

// Which code of a 32-code chunk lands in lane j of codes32's four vectors (x is permuted the same way).
static inline int chunk_order(int bits, int j) {
  if (bits == 4) return j < 16 ? 2 * (j % 8) + 16 * (j / 8) : 2 * (j % 8) + 16 * ((j - 16) / 8) + 1;
  if (bits == 2) return 4 * (j % 8) + j / 8;
  return j;
}

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// y[m, o] for o in [o0, o1) and M rows of x (x: [M, in], xsum: [M, groups]).
template <int BITS, int M>
static void rows(const float* x, const float* xsum, const uint8_t* packed, const at::Half* scales,
                 const uint8_t* zeros, float zero_sym, int64_t in, int64_t gs, float* y, int64_t out,
                 int64_t o0, int64_t o1) {
  const int64_t groups = in / gs, row_bytes = in * BITS / 8, group_bytes = gs * BITS / 8;
  const uint8_t* safe_end = packed + out * row_bytes - 4;   // a 32-bit load from p <= safe_end stays in the buffer
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* prow = packed + o * row_bytes;
    __m256 acc[M];          // sum over groups of scale * (codes . x), kept in lanes: one horizontal sum per row
    float zero_part[M];     // sum over groups of scale * zero * sum(x in group)
    for (int m = 0; m < M; ++m) { acc[m] = _mm256_setzero_ps(); zero_part[m] = 0.0f; }
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* p = prow + g * group_bytes;
      const float* xg = x + g * gs;
      __m256 d0[M], d1[M];   // two chains per row of x: FMA latency, not throughput, would bound one
      for (int m = 0; m < M; ++m) d0[m] = d1[m] = _mm256_setzero_ps();
      for (int64_t j = 0; j < gs; j += 32, p += 4 * BITS) {   // gs is a multiple of 32
        __m256 q[4];
        codes32<BITS>(p, p + 4 * BITS - 1 > safe_end, q);
        for (int m = 0; m < M; ++m) {
          const float* xm = xg + m * in + j;
          d0[m] = _mm256_fmadd_ps(q[0], _mm256_loadu_ps(xm), d0[m]);
          d1[m] = _mm256_fmadd_ps(q[1], _mm256_loadu_ps(xm + 8), d1[m]);
          d0[m] = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(xm + 16), d0[m]);
          d1[m] = _mm256_fmadd_ps(q[3], _mm256_loadu_ps(xm + 24), d1[m]);
        }
      }
      const float s = _cvtsh_ss(scales[o * groups + g].x);
      const float z = zeros ? (float)zeros[o * groups + g] : zero_sym;
      const __m256 vs = _mm256_set1_ps(s);
      for (int m = 0; m < M; ++m) {
        acc[m] = _mm256_fmadd_ps(vs, _mm256_add_ps(d0[m], d1[m]), acc[m]);
        zero_part[m] += s * z * xsum[m * groups + g];
      }
    }
    for (int m = 0; m < M; ++m) y[m * out + o] = hsum(acc[m]) - zero_part[m];
  }
}

template <int BITS>
static void rows_any(int64_t M, const float* x, const float* xsum, const uint8_t* packed, const at::Half* scales,
                     const uint8_t* zeros, float zero_sym, int64_t in, int64_t gs, float* y, int64_t out,
                     int64_t o0, int64_t o1) {
  const int64_t groups = in / gs;
  for (int64_t m0 = 0; m0 < M; m0 += 4) {   // blocks of up to four rows of x share each decoded code
    const float* xb = x + m0 * in;
    const float* sb = xsum + m0 * groups;
    float* yb = y + m0 * out;
    switch (std::min<int64_t>(4, M - m0)) {
      case 1: rows<BITS, 1>(xb, sb, packed, scales, zeros, zero_sym, in, gs, yb, out, o0, o1); break;
      case 2: rows<BITS, 2>(xb, sb, packed, scales, zeros, zero_sym, in, gs, yb, out, o0, o1); break;
      case 3: rows<BITS, 3>(xb, sb, packed, scales, zeros, zero_sym, in, gs, yb, out, o0, o1); break;
      default: rows<BITS, 4>(xb, sb, packed, scales, zeros, zero_sym, in, gs, yb, out, o0, o1); break;
    }
  }
}

static void check_packed(const torch::Tensor& packed, const torch::Tensor& scales, const torch::Tensor& zeros,
                         int64_t bits, int64_t gs, int64_t cols) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "bits must be 2, 3, 4 or 8");
  TORCH_CHECK(gs > 0 && gs % 32 == 0 && cols % gs == 0, "group_size must be a positive multiple of 32 dividing the "
              "packed width, got ", gs);
  TORCH_CHECK(packed.scalar_type() == torch::kByte && packed.dim() == 2 && packed.is_contiguous() &&
              packed.size(1) * 8 == cols * bits, "packed must be contiguous uint8 [rows, cols * bits / 8]");
  TORCH_CHECK(scales.scalar_type() == torch::kHalf && scales.is_contiguous() && scales.dim() == 2 &&
              scales.size(0) == packed.size(0) && scales.size(1) == cols / gs, "scales must be fp16 [rows, groups]");
  TORCH_CHECK(zeros.numel() == 0 || (zeros.scalar_type() == torch::kByte && zeros.is_contiguous() &&
              zeros.sizes() == scales.sizes()), "zeros must be uint8 like scales, or empty (symmetric)");
}

// x as the row kernels read it, prepared once per call: permuted into codes32's lane order chunk by chunk, and its
// per-group sums (for the zero points).
struct PreparedX {
  std::vector<float> xperm, xsum;
};

static PreparedX prepare_x(const float* x0, int64_t M, int64_t in, int64_t bits, int64_t gs) {
  const int64_t groups = in / gs;
  PreparedX px{std::vector<float>((size_t)(M * in)), std::vector<float>((size_t)(M * groups), 0.0f)};
  int order[32];
  for (int j = 0; j < 32; ++j) order[j] = chunk_order((int)bits, j);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t i = 0; i < in; ++i) px.xsum[m * groups + i / gs] += x0[m * in + i];
    for (int64_t c = 0; c < in; c += 32)
      for (int j = 0; j < 32; ++j) px.xperm[m * in + c + j] = x0[m * in + c + order[j]];
  }
  return px;
}

// A packed matrix's raw pointers (shapes checked by the caller with check_packed).
struct PackedRef {
  const uint8_t* codes;
  const at::Half* scales;
  const uint8_t* zeros;   // null: symmetric, zero point 2^(bits-1)
  int64_t bits, gs;
  float zero_sym;
};

static PackedRef packed_ref(const torch::Tensor& packed, const torch::Tensor& scales, const torch::Tensor& zeros,
                            int64_t bits, int64_t gs) {
  return {packed.data_ptr<uint8_t>(), scales.data_ptr<at::Half>(), zeros.numel() ? zeros.data_ptr<uint8_t>() : nullptr,
          bits, gs, (float)(1 << (bits - 1))};
}

// y[m, o] = x[m] . deq(W)[o] for o in [o0, o1): W packed [out, in * bits / 8].
static void rows_range(const PreparedX& px, int64_t M, int64_t in, const PackedRef& w, float* y, int64_t out,
                       int64_t o0, int64_t o1) {
  const float* xp = px.xperm.data();
  const float* sp = px.xsum.data();
  switch (w.bits) {
    case 2: rows_any<2>(M, xp, sp, w.codes, w.scales, w.zeros, w.zero_sym, in, w.gs, y, out, o0, o1); break;
    case 3: rows_any<3>(M, xp, sp, w.codes, w.scales, w.zeros, w.zero_sym, in, w.gs, y, out, o0, o1); break;
    case 4: rows_any<4>(M, xp, sp, w.codes, w.scales, w.zeros, w.zero_sym, in, w.gs, y, out, o0, o1); break;
    default: rows_any<8>(M, xp, sp, w.codes, w.scales, w.zeros, w.zero_sym, in, w.gs, y, out, o0, o1); break;
  }
}

// y[M, out] = x @ deq(W)^T for x: [M, in] fp32 (row-major), rows of the output split between threads.
static void matmul_into(const float* x0, int64_t M, int64_t in, const PackedRef& w, int64_t out, float* yp) {
  const PreparedX px = prepare_x(x0, M, in, w.bits, w.gs);
  at::parallel_for(0, out, 16, [&](int64_t o0, int64_t o1) { rows_range(px, M, in, w, yp, out, o0, o1); });
}

// ---- int8 activations (opt-in): x rounded to int8 per 32 inputs, codes multiplied as bytes ----
// The fp32 kernel above is bound by widening codes to fp32 lanes (four conversions and four FMAs per 32 codes).
// Here each 32-input block of x is rounded to int8 with its own scale (max |x| / 127, as llama.cpp's Q8_0 does),
// codes stay bytes and one vpmaddubsw (unsigned code x signed x, pairs summed to int16) plus one vpmaddwd (pairs
// summed to int32) take 32 of them. 4-bit codes: 15 * 127 * 2 fits int16; 8-bit codes are split into nibbles first.

// Thirty-two codes from p as 32 unsigned bytes in `chunk_order`'s lane order (8-bit codes: raw bytes). 3-bit codes
// (32 per 12 bytes) take a 16-byte load; `tail` = true where those 16 bytes could pass the buffer's end, and then
// only the 12 are read.
template <int BITS>
static inline __m256i codes_u8(const uint8_t* p, bool tail) {
  if constexpr (BITS == 8) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  } else if constexpr (BITS == 4) {   // low nibbles (codes 0, 2, ..., 30), then high nibbles (1, 3, ..., 31)
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b), _mm256_set1_epi8(0x0F));
  } else if constexpr (BITS == 2) {   // four bit planes of eight bytes
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    const __m128i lo = _mm_unpacklo_epi64(b, _mm_srli_epi16(b, 2));
    const __m128i hi = _mm_unpacklo_epi64(_mm_srli_epi16(b, 4), _mm_srli_epi16(b, 6));
    return _mm256_and_si256(_mm256_set_m128i(hi, lo), _mm256_set1_epi8(0x03));
  } else {   // 3 bits: 32-bit lane l takes the 12 bits of codes 4l..4l+3 (two bytes, shifted 0 or 4), then
             // spreads them to one code per byte with shifts and masks
    __m128i b;
    if (tail) {
      alignas(16) uint8_t buf[16] = {0};
      std::memcpy(buf, p, 12);
      b = _mm_load_si128(reinterpret_cast<const __m128i*>(buf));
    } else {
      b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    }
    const __m256i pick = _mm256_setr_epi8(0, 1, -1, -1, 1, 2, -1, -1, 3, 4, -1, -1, 4, 5, -1, -1,
                                          6, 7, -1, -1, 7, 8, -1, -1, 9, 10, -1, -1, 10, 11, -1, -1);
    __m256i v = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(b), pick);
    v = _mm256_srlv_epi32(v, _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4));
    v = _mm256_and_si256(_mm256_or_si256(v, _mm256_slli_epi32(v, 10)), _mm256_set1_epi32(0x003F003F));
    return _mm256_and_si256(_mm256_or_si256(v, _mm256_slli_epi32(v, 5)), _mm256_set1_epi32(0x07070707));
  }
}

// sum over the 32 lanes of codes * xq, as eight int32 partial sums
template <int BITS>
static inline __m256i dot_u8s8(__m256i codes, __m256i xq) {
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (BITS == 8) {
    const __m256i nib = _mm256_set1_epi8(0x0F);
    const __m256i lo = _mm256_maddubs_epi16(_mm256_and_si256(codes, nib), xq);
    const __m256i hi = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(codes, 4), nib), xq);
    return _mm256_add_epi32(_mm256_madd_epi16(lo, ones), _mm256_madd_epi16(hi, _mm256_set1_epi16(16)));
  } else {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(codes, xq), ones);
  }
}

// x rounded to int8 per 32 inputs, in codes_u8's lane order: q [M, in], dx [M, in / 32] (x ~ dx * q), and per group
// sum(dx * q) (the zero points' term, taken over the rounded x so that it cancels with the codes' term).
struct PreparedQ8 {
  std::vector<int8_t> q;
  std::vector<float> dx, xsum;
};

// Where rounded input j of 32-block c goes for 4-bit codes: rows_q8 reads two blocks per step from one 32-byte load
// (low nibbles: even codes of block c then of c + 1; high nibbles: the odd codes), so each pair of blocks keeps its
// 64 inputs as [even of c, even of c + 1, odd of c, odd of c + 1]; an odd last block keeps [even, odd].
static inline int64_t q4_pos(int64_t c, int j, int64_t blocks) {
  const int64_t k = j / 2, odd = j % 2;
  if ((c | 1) < blocks) return (c / 2) * 64 + odd * 32 + (c % 2) * 16 + k;
  return c * 32 + odd * 16 + k;
}

static PreparedQ8 prepare_q8(const float* x0, int64_t M, int64_t in, int64_t bits, int64_t gs) {
  const int64_t groups = in / gs, blocks = in / 32;
  PreparedQ8 px{std::vector<int8_t>((size_t)(M * in)), std::vector<float>((size_t)(M * blocks)),
                std::vector<float>((size_t)(M * groups), 0.0f)};
  int order[32];
  for (int j = 0; j < 32; ++j) order[j] = chunk_order((int)bits, j);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < blocks; ++c) {
      const float* xb = x0 + m * in + c * 32;
      float amax = 0.0f;
      for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(xb[j]));
      const float dx = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
      int sum = 0;
      if (bits == 4) {   // q4_pos: pairs of blocks interleaved for rows_q8's two-block step
        int8_t* qm = px.q.data() + m * in;
        for (int j = 0; j < 32; ++j) {
          const int8_t v = (int8_t)std::nearbyint(xb[j] * inv);
          qm[q4_pos(c, j, blocks)] = v;
          sum += v;
        }
      } else {
        int8_t* qb = px.q.data() + m * in + c * 32;
        for (int j = 0; j < 32; ++j) {
          qb[j] = (int8_t)std::nearbyint(xb[order[j]] * inv);
          sum += qb[j];
        }
      }
      px.dx[m * blocks + c] = dx;
      px.xsum[m * groups + c * 32 / gs] += dx * (float)sum;
    }
  return px;
}

// y[m, o] for o in [o0, o1) from int8 x (M rows of px), W packed [out, in * BITS / 8]. Per 32-code block the
// group's scale and the block's x scale are folded into one factor and one FMA, alternating between two accumulators
// (one chain would wait on FMA latency); a row's fp16 scales are widened eight at a time, and the zero points' term
// sum_g s_g z_g xsum_g is one vector dot per row rather than a scalar chain per group.
template <int BITS, int M>
static void rows_q8(const int8_t* q, const float* dx, const float* xsum, const uint8_t* packed,
                    const at::Half* scales, const uint8_t* zeros, float zero_sym, int64_t in, int64_t gs, float* y,
                    int64_t out, int64_t o0, int64_t o1) {
  const int64_t groups = in / gs, blocks = in / 32, row_bytes = in * BITS / 8, per_group = gs / 32;
  const uint8_t* end = packed + out * row_bytes;
  std::vector<float> sf_buf((size_t)(groups + 8));
  float* sf = sf_buf.data();
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* p = packed + o * row_bytes;
    const at::Half* srow = scales + o * groups;
    int64_t g8 = 0;
    for (; g8 + 8 <= groups; g8 += 8)
      _mm256_storeu_ps(sf + g8, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(srow + g8))));
    for (; g8 < groups; ++g8) sf[g8] = _cvtsh_ss(srow[g8].x);
    __m256 acc[2][M];
    for (int m = 0; m < M; ++m) acc[0][m] = acc[1][m] = _mm256_setzero_ps();
    if constexpr (BITS == 4) {
      // two blocks per step: one 32-byte load, low and high nibbles against the inputs q4_pos laid out for them;
      // the two products' int16 pair sums are added before widening (|sum| <= 2 * 2 * 15 * 127 fits int16), and
      // one FMA scales lanes 0-3 by block b's factor, lanes 4-7 by block b + 1's
      const __m256i nib = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
      int64_t b = 0, g = 0, k = 0;   // block b is block k of group g
      auto scale_then_step = [&]() {
        const float sg = sf[g];
        if (++k == per_group) { k = 0; ++g; }
        return sg;
      };
      for (; b + 2 <= blocks; b += 2, p += 32) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        const __m256i lo = _mm256_and_si256(v, nib), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
        const float s0 = scale_then_step(), s1 = scale_then_step();
        for (int m = 0; m < M; ++m) {
          const int8_t* xm = q + m * in + b * 32;
          const __m256i xl = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xm));
          const __m256i xh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xm + 32));
          const __m256i d = _mm256_madd_epi16(
              _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh)), ones);
          const __m256 f = _mm256_set_m128(_mm_set1_ps(s1 * dx[m * blocks + b + 1]),
                                           _mm_set1_ps(s0 * dx[m * blocks + b]));
          acc[(b >> 1) & 1][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), f, acc[(b >> 1) & 1][m]);
        }
      }
      if (b < blocks) {   // an odd last block, laid out [even, odd] as codes_u8 gives them
        const __m256i codes = codes_u8<4>(p, false);
        const float s = sf[g];
        for (int m = 0; m < M; ++m) {
          const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + m * in + b * 32));
          acc[0][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8<4>(codes, xq)),
                                      _mm256_set1_ps(s * dx[m * blocks + b]), acc[0][m]);
        }
      }
    } else
    for (int64_t g = 0, b = 0; g < groups; ++g) {
      const float s = sf[g];
      for (int64_t k = 0; k < per_group; ++k, ++b, p += 4 * BITS) {
        const __m256i codes = codes_u8<BITS>(p, BITS == 3 && p + 16 > end);
        for (int m = 0; m < M; ++m) {
          const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + m * in + b * 32));
          acc[b & 1][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8<BITS>(codes, xq)),
                                          _mm256_set1_ps(s * dx[m * blocks + b]), acc[b & 1][m]);
        }
      }
    }
    const uint8_t* zrow = zeros ? zeros + o * groups : nullptr;
    for (int m = 0; m < M; ++m) {
      const float* xs = xsum + m * groups;
      __m256 zacc = _mm256_setzero_ps();
      int64_t g = 0;
      for (; g + 8 <= groups; g += 8) {
        const __m256 z = zrow ? _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
                                    _mm_loadl_epi64(reinterpret_cast<const __m128i*>(zrow + g))))
                              : _mm256_set1_ps(zero_sym);
        zacc = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(sf + g), z), _mm256_loadu_ps(xs + g), zacc);
      }
      float zero_part = hsum(zacc);
      for (; g < groups; ++g) zero_part += sf[g] * (zrow ? (float)zrow[g] : zero_sym) * xs[g];
      y[m * out + o] = hsum(_mm256_add_ps(acc[0][m], acc[1][m])) - zero_part;
    }
  }
}

template <int BITS>
static void rows_q8_any(const PreparedQ8& px, int64_t M, int64_t in, const PackedRef& w, float* y, int64_t out,
                        int64_t o0, int64_t o1) {
  const int64_t groups = in / w.gs, blocks = in / 32;
  for (int64_t m0 = 0; m0 < M; m0 += 4) {   // blocks of up to four rows of x share each decoded code
    const int8_t* q = px.q.data() + m0 * in;
    const float* dx = px.dx.data() + m0 * blocks;
    const float* xs = px.xsum.data() + m0 * groups;
    float* yb = y + m0 * out;
    switch (std::min<int64_t>(4, M - m0)) {
      case 1: rows_q8<BITS, 1>(q, dx, xs, w.codes, w.scales, w.zeros, w.zero_sym, in, w.gs, yb, out, o0, o1); break;
      case 2: rows_q8<BITS, 2>(q, dx, xs, w.codes, w.scales, w.zeros, w.zero_sym, in, w.gs, yb, out, o0, o1); break;
      case 3: rows_q8<BITS, 3>(q, dx, xs, w.codes, w.scales, w.zeros, w.zero_sym, in, w.gs, yb, out, o0, o1); break;
      default: rows_q8<BITS, 4>(q, dx, xs, w.codes, w.scales, w.zeros, w.zero_sym, in, w.gs, yb, out, o0, o1); break;
    }
  }
}

// rows_range for int8 x: y[m, o] for o in [o0, o1).
static void rows_q8_range(const PreparedQ8& px, int64_t M, int64_t in, const PackedRef& w, float* y, int64_t out,
                          int64_t o0, int64_t o1) {
  switch (w.bits) {
    case 2: rows_q8_any<2>(px, M, in, w, y, out, o0, o1); break;
    case 3: rows_q8_any<3>(px, M, in, w, y, out, o0, o1); break;
    case 4: rows_q8_any<4>(px, M, in, w, y, out, o0, o1); break;
    default: rows_q8_any<8>(px, M, in, w, y, out, o0, o1); break;
  }
}

// y[M, out] = x @ deq(W)^T with x rounded to int8 per 32 inputs; rows of the output split between threads.
static void matmul_q8_into(const float* x0, int64_t M, int64_t in, const PackedRef& w, int64_t out, float* yp) {
  const PreparedQ8 px = prepare_q8(x0, M, in, w.bits, w.gs);
  at::parallel_for(0, out, 16, [&](int64_t o0, int64_t o1) { rows_q8_range(px, M, in, w, yp, out, o0, o1); });
}

