// The C++ CPU kernels of sparsefx/ops/routed (built by cpu.py with torch.utils.cpp_extension.load; the
// build is keyed by this file's content, so an edit here rebuilds it).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

// Eight weights as fp32 lanes: fp32 rows load directly, fp16 rows (a reduced-precision medium tier) convert (F16C).
static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 load8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Kept rows are walked in channel order, so the rows one thread reads lie in one ascending span of the matrix, with
// gaps at the dropped channels. Short rows (a few hundred bytes to a few KiB) end before the hardware prefetcher has
// ramped up on them. Where rows are at most kSpanRowBytes and the kept ones fill at least kSpanDensity of that span
// (a banded matrix: the rows of every tier), whole-row walks prefetch the span by hand, gaps included, kSpanAhead bytes
// ahead of the row in use (bench/decode_e2e.py); sparser walks (one tier of several matrices) would fetch mostly
// unused rows that way and prefetch the next kPrefetchAhead kept rows instead, as do column blocks of wide rows
// (run_routed's LM-head path), when a row (block) is at most kPrefetchBytes. Longer rows are left to the hardware.
static constexpr int64_t kSpanAhead = 16384, kSpanRowBytes = 4096, kPrefetchBytes = 2048, kPrefetchAhead = 16;
static constexpr double kSpanDensity = 0.7;

struct SpanPrefetch {
  const char* next = nullptr;
  const char* end = nullptr;
  // rows idx[k0 .. k1) of wp ([in, out], whole rows); inactive when the walk reads column blocks or nothing
  template <typename T>
  SpanPrefetch(const T* wp, int64_t out, int64_t n, const int32_t* idx, int64_t k0, int64_t k1) {
    if (n != out || k0 >= k1 || out * (int64_t)sizeof(T) > kSpanRowBytes ||
        (double)(k1 - k0) < kSpanDensity * (double)(idx[k1 - 1] - idx[k0] + 1))
      return;
    next = reinterpret_cast<const char*>(wp + (int64_t)idx[k0] * out);
    end = reinterpret_cast<const char*>(wp + ((int64_t)idx[k1 - 1] + 1) * out);
  }
  bool active() const { return next != nullptr; }
  // prefetch up to kSpanAhead bytes past the start of `row`
  inline void ahead_of(const void* row) {
    const char* target = std::min(end, reinterpret_cast<const char*>(row) + kSpanAhead);
    for (; next < target; next += 64) _mm_prefetch(next, _MM_HINT_T0);
  }
};

template <typename T>
static inline void prefetch_rows(const T* wp, int64_t out, int64_t o0, int64_t n, const int32_t* idx, int64_t k,
                                 int64_t k1, int count) {
  for (int j = 0; j < count && k + j < k1; ++j) {
    const char* p = reinterpret_cast<const char*>(wp + (int64_t)idx[k + j] * out + o0);
    for (int64_t b = 0; b < n * (int64_t)sizeof(T); b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
  }
}

// yb[0:n] += sum over kept rows k in [k0, k1) of val[k] * wt[idx[k], o0 : o0 + n]
template <typename T>
static inline void accumulate(float* yb, const T* wp, int64_t out, int64_t o0, int64_t n,
                              const int32_t* idx, const float* val, int64_t k0, int64_t k1) {
  const int64_t nv = n & ~int64_t(7);
  SpanPrefetch span(wp, out, n, idx, k0, k1);
  const bool prefetch = !span.active() && n * (int64_t)sizeof(T) <= kPrefetchBytes;
  int64_t k = k0;
  if (prefetch) prefetch_rows(wp, out, o0, n, idx, k0, k1, (int)kPrefetchAhead);   // the first rows too
  // four kept rows per sweep: a quarter of the y loads/stores of one-row-at-a-time
  for (; k + 3 < k1; k += 4) {
    const T* w0 = wp + (int64_t)idx[k] * out + o0;
    if (span.active()) span.ahead_of(w0);
    if (prefetch) prefetch_rows(wp, out, o0, n, idx, k + kPrefetchAhead, k1, 4);
    const T* w1 = wp + (int64_t)idx[k + 1] * out + o0;
    const T* w2 = wp + (int64_t)idx[k + 2] * out + o0;
    const T* w3 = wp + (int64_t)idx[k + 3] * out + o0;
    const __m256 a0 = _mm256_set1_ps(val[k]), a1 = _mm256_set1_ps(val[k + 1]);
    const __m256 a2 = _mm256_set1_ps(val[k + 2]), a3 = _mm256_set1_ps(val[k + 3]);
    int64_t o = 0;
    for (; o < nv; o += 8) {
      __m256 acc = _mm256_loadu_ps(yb + o);
      acc = _mm256_fmadd_ps(a0, load8(w0 + o), acc);
      acc = _mm256_fmadd_ps(a1, load8(w1 + o), acc);
      acc = _mm256_fmadd_ps(a2, load8(w2 + o), acc);
      acc = _mm256_fmadd_ps(a3, load8(w3 + o), acc);
      _mm256_storeu_ps(yb + o, acc);
    }
    for (; o < n; ++o)
      yb[o] += val[k] * (float)w0[o] + val[k + 1] * (float)w1[o] + val[k + 2] * (float)w2[o] +
               val[k + 3] * (float)w3[o];
  }
  for (; k < k1; ++k) {
    const T* w0 = wp + (int64_t)idx[k] * out + o0;
    for (int64_t o = 0; o < n; ++o) yb[o] += val[k] * (float)w0[o];
  }
}

// Bitmask-packed rows (a pruned medium tier): row i's non-zeros, in column order, are values[offsets[i]:offsets[i+1]];
// bit (o % 8) of mask[i, o / 8] says whether column o has one. Expanding eight columns = one byte of mask: load the
// next eight values, move value j to the lane of the mask's j-th set bit (LUT + permute), zero the other lanes.
struct ExpandLut {
  alignas(32) int32_t idx[256][8];
  alignas(32) int32_t keep[256][8];
  ExpandLut() {
    for (int m = 0; m < 256; ++m)
      for (int j = 0, c = 0; j < 8; ++j) {
        const bool set = (m >> j) & 1;
        idx[m][j] = set ? c++ : 0;
        keep[m][j] = set ? -1 : 0;
      }
  }
};
static const ExpandLut kLut;

template <typename T>
static inline __m256 expand8(const T*& p, uint8_t m) {
  const __m256 v = load8(p);   // may read up to 7 values past the row: the packer pads the values' end
  const __m256 moved = _mm256_permutevar8x32_ps(v, _mm256_load_si256(reinterpret_cast<const __m256i*>(kLut.idx[m])));
  p += __builtin_popcount(m);
  return _mm256_and_ps(moved, _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(kLut.keep[m]))));
}

// yb[0 : 8 * nbytes] += sum over kept rows k in [k0, k1) of val[k] * (row idx[k] of the packed tier, expanded);
// yb is padded to a multiple of eight columns (the mask's bits past `out` are zero).
template <typename T>
static inline void accumulate_packed(float* yb, const uint8_t* mask, int64_t nbytes, const T* values,
                                     const int64_t* offsets, const int32_t* idx, const float* val, int64_t k0,
                                     int64_t k1) {
  int64_t k = k0;
  for (; k + 3 < k1; k += 4) {
    const uint8_t* m0 = mask + (int64_t)idx[k] * nbytes;
    const uint8_t* m1 = mask + (int64_t)idx[k + 1] * nbytes;
    const uint8_t* m2 = mask + (int64_t)idx[k + 2] * nbytes;
    const uint8_t* m3 = mask + (int64_t)idx[k + 3] * nbytes;
    const T* p0 = values + offsets[idx[k]];
    const T* p1 = values + offsets[idx[k + 1]];
    const T* p2 = values + offsets[idx[k + 2]];
    const T* p3 = values + offsets[idx[k + 3]];
    const __m256 a0 = _mm256_set1_ps(val[k]), a1 = _mm256_set1_ps(val[k + 1]);
    const __m256 a2 = _mm256_set1_ps(val[k + 2]), a3 = _mm256_set1_ps(val[k + 3]);
    for (int64_t b = 0; b < nbytes; ++b) {
      __m256 acc = _mm256_loadu_ps(yb + 8 * b);
      acc = _mm256_fmadd_ps(a0, expand8(p0, m0[b]), acc);
      acc = _mm256_fmadd_ps(a1, expand8(p1, m1[b]), acc);
      acc = _mm256_fmadd_ps(a2, expand8(p2, m2[b]), acc);
      acc = _mm256_fmadd_ps(a3, expand8(p3, m3[b]), acc);
      _mm256_storeu_ps(yb + 8 * b, acc);
    }
  }
  for (; k < k1; ++k) {
    const uint8_t* m0 = mask + (int64_t)idx[k] * nbytes;
    const T* p0 = values + offsets[idx[k]];
    const __m256 a0 = _mm256_set1_ps(val[k]);
    for (int64_t b = 0; b < nbytes; ++b)
      _mm256_storeu_ps(yb + 8 * b, _mm256_fmadd_ps(a0, expand8(p0, m0[b]), _mm256_loadu_ps(yb + 8 * b)));
  }
}

// Banded rows (ir/bandformat.py): fp16 weights whose two low mantissa bits are their band; a row routed to tier k
// multiplies the weights with band >= k. Compare the band bits with floor = k - 1 (16-bit lanes) and zero the lanes
// that fail, before converting: three integer ops on the one stream of weights, done sixteen weights at a time
// (256-bit) over eight rows per sweep, which an unrecorded probe found faster than four rows of 128-bit masks.
static inline __m128i banded8(const at::Half* p, __m128i floor) {
  const __m128i r = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm_and_si128(r, _mm_cmpgt_epi16(_mm_and_si128(r, _mm_set1_epi16(3)), floor));
}

static inline __m256i banded16(const at::Half* p, __m256i floor) {
  const __m256i r = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm256_and_si256(r, _mm256_cmpgt_epi16(_mm256_and_si256(r, _mm256_set1_epi16(3)), floor));
}

static inline float banded_scalar(const at::Half* p, int16_t floor) {
  const uint16_t bits = reinterpret_cast<const uint16_t*>(p)[0];
  return (int16_t)(bits & 3) > floor ? (float)p[0] : 0.0f;
}

// yb[0:n] += sum over j < R of val[j] * (banded row w[j][0:n] masked at floor[j])
template <int R>
static inline void banded_rows(float* yb, const at::Half* const* w, const float* val, const int16_t* floor,
                               int64_t n) {
  __m256 a[R];
  __m256i f[R];
  for (int j = 0; j < R; ++j) {
    a[j] = _mm256_set1_ps(val[j]);
    f[j] = _mm256_set1_epi16(floor[j]);
  }
  int64_t o = 0;
  for (; o + 15 < n; o += 16) {
    __m256 acc0 = _mm256_loadu_ps(yb + o), acc1 = _mm256_loadu_ps(yb + o + 8);
    for (int j = 0; j < R; ++j) {
      const __m256i r = banded16(w[j] + o, f[j]);
      acc0 = _mm256_fmadd_ps(a[j], _mm256_cvtph_ps(_mm256_castsi256_si128(r)), acc0);
      acc1 = _mm256_fmadd_ps(a[j], _mm256_cvtph_ps(_mm256_extracti128_si256(r, 1)), acc1);
    }
    _mm256_storeu_ps(yb + o, acc0);
    _mm256_storeu_ps(yb + o + 8, acc1);
  }
  if (o + 7 < n) {
    __m256 acc = _mm256_loadu_ps(yb + o);
    for (int j = 0; j < R; ++j)
      acc = _mm256_fmadd_ps(a[j], _mm256_cvtph_ps(banded8(w[j] + o, _mm256_castsi256_si128(f[j]))), acc);
    _mm256_storeu_ps(yb + o, acc);
    o += 8;
  }
  for (; o < n; ++o)
    for (int j = 0; j < R; ++j) yb[o] += val[j] * banded_scalar(w[j] + o, floor[j]);
}

// yb[0:n] += sum over kept rows k in [k0, k1) of val[k] * (row idx[k] of the banded wt, masked at floor[k])
static inline void accumulate_banded(float* yb, const at::Half* wp, int64_t out, int64_t o0, int64_t n,
                                     const int32_t* idx, const float* val, const int16_t* floor, int64_t k0,
                                     int64_t k1) {
  const at::Half* w[8];
  SpanPrefetch span(wp, out, n, idx, k0, k1);
  const bool prefetch = !span.active() && n * 2 <= kPrefetchBytes;
  int64_t k = k0;
  if (prefetch) prefetch_rows(wp, out, o0, n, idx, k0, k1, (int)kPrefetchAhead);   // the first rows too
  for (; k + 7 < k1; k += 8) {
    for (int j = 0; j < 8; ++j) w[j] = wp + (int64_t)idx[k + j] * out + o0;
    if (span.active()) span.ahead_of(w[0]);
    if (prefetch) prefetch_rows(wp, out, o0, n, idx, k + kPrefetchAhead, k1, 8);
    banded_rows<8>(yb, w, val + k, floor + k, n);
  }
  for (; k + 3 < k1; k += 4) {
    for (int j = 0; j < 4; ++j) w[j] = wp + (int64_t)idx[k + j] * out + o0;
    banded_rows<4>(yb, w, val + k, floor + k, n);
  }
  for (; k < k1; ++k) {
    w[0] = wp + (int64_t)idx[k] * out + o0;
    banded_rows<1>(yb, w, val + k, floor + k, n);
  }
}

// Kept rows of one tier: indices into its weight rows (fp32, or fp16 when half) and the matching x values.
// A packed tier (mask != nullptr) has its rows in the bitmask layout above, `w` being the values. A banded tier
// (banded) holds the kept rows of every tier of a banded matrix, in channel order, each with its floor.
struct Tier {
  const void* w;
  bool half;
  std::vector<int32_t> idx;
  std::vector<float> val;
  const uint8_t* mask = nullptr;
  const int64_t* offsets = nullptr;
  int64_t nbytes = 0;
  bool banded = false;
  std::vector<int16_t> floor;
};

static inline void run_tiers(float* yb, const Tier* tiers, int ntiers, int64_t out, int64_t o0, int64_t n,
                             int64_t part, int64_t nparts) {
  for (int t = 0; t < ntiers; ++t) {
    const int64_t nk = (int64_t)tiers[t].idx.size(), chunk = (nk + nparts - 1) / nparts;
    const int64_t k0 = std::min(nk, part * chunk), k1 = std::min(nk, k0 + chunk);
    if (k0 >= k1) continue;
    const Tier& tr = tiers[t];
    if (tr.banded) {
      accumulate_banded(yb, static_cast<const at::Half*>(tr.w), out, o0, n, tr.idx.data(), tr.val.data(),
                        tr.floor.data(), k0, k1);
    } else if (tr.mask != nullptr) {   // whole rows only (the caller never splits a packed tier into column blocks)
      if (tr.half)
        accumulate_packed(yb, tr.mask, tr.nbytes, static_cast<const at::Half*>(tr.w), tr.offsets, tr.idx.data(),
                          tr.val.data(), k0, k1);
      else
        accumulate_packed(yb, tr.mask, tr.nbytes, static_cast<const float*>(tr.w), tr.offsets, tr.idx.data(),
                          tr.val.data(), k0, k1);
    } else if (tiers[t].half)
      accumulate(yb, static_cast<const at::Half*>(tiers[t].w), out, o0, n, tiers[t].idx.data(), tiers[t].val.data(),
                 k0, k1);
    else
      accumulate(yb, static_cast<const float*>(tiers[t].w), out, o0, n, tiers[t].idx.data(), tiers[t].val.data(),
                 k0, k1);
  }
}

// The tier of |x| under descending thresholds th[0..n): k for th[k] <= |x| < th[k - 1], n when dropped.
static inline int tier_of(float a, const float* th, int n) {
  int k = 0;
  while (k < n && a < th[k]) ++k;
  return k;
}

// Accumulate the routed tiers' kept rows into y, fp32 with x's shape but its last dimension out (x holds one token:
// contiguous, in values).
static torch::Tensor run_routed(const torch::Tensor& x, const Tier* tiers, int ntiers, int64_t out);

// Route x's channels into the tiers by descending thresholds th[0..ntiers): tier k takes th[k] <= |x| < th[k - 1]
// (tier 0: |x| >= th[0], the full weights); below th[ntiers - 1] a channel is dropped. Run them (run_routed).
static torch::Tensor run_gemv(const torch::Tensor& x, Tier* tiers, int ntiers, int64_t out, const float* th) {
  const int64_t in = x.numel();
  const float* xp = x.data_ptr<float>();
  for (int t = 0; t < ntiers; ++t) { tiers[t].idx.reserve(in); tiers[t].val.reserve(in); }
  for (int64_t i = 0; i < in; ++i) {
    const int k = tier_of(std::fabs(xp[i]), th, ntiers);
    if (k < ntiers) { tiers[k].idx.push_back((int32_t)i); tiers[k].val.push_back(xp[i]); }
  }
  return run_routed(x, tiers, ntiers, out);
}

static torch::Tensor run_routed(const torch::Tensor& x, const Tier* tiers, int ntiers, int64_t out) {
  auto sizes = x.sizes().vec();
  sizes.back() = out;
  auto y = torch::zeros(sizes, x.options());
  float* yp = y.data_ptr<float>();
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  bool packed = false;
  for (int t = 0; t < ntiers; ++t) packed = packed || tiers[t].mask != nullptr;
  if (out > 16384 && !packed) {
    // Very wide outputs (e.g. an LM head): one column block per thread. Long contiguous runs of each kept row
    // keep the hardware prefetcher streaming (2 KiB runs measured at half the bandwidth); y's block stays in cache.
    int64_t block = (out + threads - 1) / threads;
    block = std::min<int64_t>(8192, (block + 63) & ~int64_t(63));
    at::parallel_for(0, (out + block - 1) / block, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t o0 = b * block;
        run_tiers(yp + o0, tiers, ntiers, out, o0, std::min(out, o0 + block) - o0, 0, 1);
      }
    });
  } else {
    // Split the kept rows between threads, each streaming whole rows into a private y (cache-resident up to 16384
    // outputs), then reduce. Measured ~10% faster than column blocks at 4096 x 11008. Rows padded to 8 columns
    // for a packed tier.
    const int64_t stride = packed ? (out + 7) & ~int64_t(7) : out;
    std::vector<float> partial((size_t)(threads * stride), 0.0f);
    at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        run_tiers(partial.data() + t * stride, tiers, ntiers, out, 0, out, t, threads);
    });
    for (int64_t t = 0; t < threads; ++t)
      for (int64_t o = 0; o < out; ++o) yp[o] += partial[t * stride + o];
  }
  return y;
}

static void check_decode_args(const torch::Tensor& x, const torch::Tensor& wt) {
  TORCH_CHECK(x.dim() == 1 && wt.dim() == 2 && x.size(0) == wt.size(0), "x must be [in], wt [in, out]");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && wt.scalar_type() == torch::kFloat, "x and wt must be fp32");
  TORCH_CHECK(x.is_contiguous() && wt.is_contiguous(), "x and wt must be contiguous");
}

// The tiers over raw rows: wt fp32 [in, out] row-major, wmt's data the same shape, fp32 or fp16 (checked by the caller).
static torch::Tensor tiered_run(const torch::Tensor& x, const float* wt, const torch::Tensor& wmt, int64_t out,
                                double t_high, double t_low) {
  Tier tiers[2];
  tiers[0].w = wt;
  tiers[0].half = false;
  tiers[1].w = wmt.data_ptr();
  tiers[1].half = wmt.scalar_type() == torch::kHalf;
  const float th[2] = {(float)t_high, (float)t_low};
  return run_gemv(x, tiers, 2, out, th);
}

// DAWS tiers for one token: y[o] = sum_{|x_i| >= t_high} x_i wt[i, o] + sum_{t_low <= |x_i| < t_high} x_i wmt[i, o]
// x: [in] fp32; wt, wmt: [in, out] row-major (W.T and W_medium.T), wt fp32, wmt fp32 or fp16; y: [out] fp32.
// One tier: pass t_low = t_high.
torch::Tensor tiered_gemv(torch::Tensor x, torch::Tensor wt, torch::Tensor wmt, double t_high, double t_low) {
  check_decode_args(x, wt);
  TORCH_CHECK(wmt.sizes() == wt.sizes() && wmt.is_contiguous(), "wmt must be contiguous with wt's shape");
  TORCH_CHECK(wmt.scalar_type() == torch::kFloat || wmt.scalar_type() == torch::kHalf, "wmt must be fp32 or fp16");
  return tiered_run(x, wt.data_ptr<float>(), wmt, wt.size(1), t_high, t_low);
}

// The tiers over raw rows: wt fp32 [in, out] row-major, each medium's data the same shape (checked by the caller).
static torch::Tensor multitier_run(const torch::Tensor& x, const float* wt, at::TensorList wmts, int64_t out,
                                   at::ArrayRef<double> thresholds) {
  std::vector<Tier> tiers(wmts.size() + 1);
  std::vector<float> th(thresholds.begin(), thresholds.end());
  tiers[0].w = wt;
  tiers[0].half = false;
  for (size_t k = 0; k < wmts.size(); ++k) {
    tiers[k + 1].w = wmts[k].data_ptr();
    tiers[k + 1].half = wmts[k].scalar_type() == torch::kHalf;
  }
  return run_gemv(x, tiers.data(), (int)tiers.size(), out, th.data());
}

// Several medium tiers (sparsefx::multitier_linear) for one token: wmts[k] ([in, out], fp32 or fp16) serves
// thresholds[k + 1] <= |x_i| < thresholds[k]; wt (fp32) serves |x_i| >= thresholds[0].
torch::Tensor multitier_gemv(torch::Tensor x, torch::Tensor wt, std::vector<torch::Tensor> wmts,
                             std::vector<double> thresholds) {
  check_decode_args(x, wt);
  TORCH_CHECK(thresholds.size() == wmts.size() + 1, "multitier_gemv: ", wmts.size(), " mediums need ",
              wmts.size() + 1, " thresholds, got ", thresholds.size());
  for (const auto& wm : wmts) {
    TORCH_CHECK(wm.sizes() == wt.sizes() && wm.is_contiguous(), "each medium tier must be contiguous with wt's shape");
    TORCH_CHECK(wm.scalar_type() == torch::kFloat || wm.scalar_type() == torch::kHalf,
                "each medium tier must be fp32 or fp16");
  }
  return multitier_run(x, wt.data_ptr<float>(), wmts, wt.size(1), thresholds);
}

// The banded GEMV over raw rows: wt fp16 [in, out] row-major, 2 to 4 thresholds (checked by the caller).
static torch::Tensor banded_run(const torch::Tensor& x, const at::Half* wt, int64_t out,
                                at::ArrayRef<double> thresholds) {
  const int n = (int)thresholds.size();
  const int64_t in = x.numel();
  std::vector<float> th(thresholds.begin(), thresholds.end());
  Tier tier;
  tier.w = wt;
  tier.half = true;
  tier.banded = true;
  const float* xp = x.data_ptr<float>();
  tier.idx.reserve(in);
  tier.val.reserve(in);
  tier.floor.reserve(in);
  for (int64_t i = 0; i < in; ++i) {
    const int k = tier_of(std::fabs(xp[i]), th.data(), n);
    if (k < n) { tier.idx.push_back((int32_t)i); tier.val.push_back(xp[i]); tier.floor.push_back((int16_t)(k - 1)); }
  }
  return run_routed(x, &tier, 1, out);
}

// sparsefx::banded_linear for one token: wt is the banded matrix transposed ([in, out] fp16, ir/bandformat.py);
// channel i in tier k (thresholds[k] <= |x_i| < thresholds[k - 1]; tier 0: |x_i| >= thresholds[0]) multiplies the
// weights of row i whose band is >= k. All kept rows stream in channel order from the one matrix.
torch::Tensor banded_gemv(torch::Tensor x, torch::Tensor wt, std::vector<double> thresholds) {
  TORCH_CHECK(x.dim() == 1 && wt.dim() == 2 && x.size(0) == wt.size(0), "x must be [in], wt [in, out]");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && wt.scalar_type() == torch::kHalf,
              "x must be fp32 and the banded wt fp16");
  TORCH_CHECK(x.is_contiguous() && wt.is_contiguous(), "x and wt must be contiguous");
  TORCH_CHECK(thresholds.size() >= 2 && thresholds.size() <= 4, "banded_linear: expected 2 to 4 thresholds (1 to 3 "
              "medium tiers), got ", thresholds.size());
  return banded_run(x, static_cast<const at::Half*>(wt.data_ptr()), wt.size(1), thresholds);
}

// A bitmask-packed medium tier (see accumulate_packed): mask uint8 [in, ceil(out / 8)], values
// fp32 or fp16 [>= offsets[in] + 8] (zero padded), offsets int64 [in + 1].
static void check_packed(const torch::Tensor& mask, const torch::Tensor& values, const torch::Tensor& offsets,
                         int64_t in, int64_t out) {
  TORCH_CHECK(mask.scalar_type() == torch::kByte && mask.dim() == 2 && mask.size(0) == in &&
              mask.size(1) == (out + 7) / 8 && mask.is_contiguous(), "mask must be contiguous uint8 [in, ceil(out/8)]");
  TORCH_CHECK(offsets.scalar_type() == torch::kLong && offsets.dim() == 1 && offsets.size(0) == in + 1 &&
              offsets.is_contiguous(), "offsets must be contiguous int64 [in + 1]");
  TORCH_CHECK((values.scalar_type() == torch::kFloat || values.scalar_type() == torch::kHalf) && values.dim() == 1 &&
              values.is_contiguous() && values.numel() >= offsets[in].item<int64_t>() + 8,
              "values must be contiguous fp32 or fp16 holding offsets[in] values and 8 of padding");
}

// The packed tiers over raw rows: wt fp32 [in, out] row-major (the packed medium checked by the caller).
static torch::Tensor packed_run(const torch::Tensor& x, const float* wt, const torch::Tensor& mask,
                                const torch::Tensor& values, const torch::Tensor& offsets, int64_t out, double t_high,
                                double t_low) {
  Tier tiers[2];
  tiers[0].w = wt;
  tiers[0].half = false;
  tiers[1].w = values.data_ptr();
  tiers[1].half = values.scalar_type() == torch::kHalf;
  tiers[1].mask = mask.data_ptr<uint8_t>();
  tiers[1].offsets = offsets.data_ptr<int64_t>();
  tiers[1].nbytes = mask.size(1);
  const float th[2] = {(float)t_high, (float)t_low};
  return run_gemv(x, tiers, 2, out, th);
}

torch::Tensor tiered_gemv_packed(torch::Tensor x, torch::Tensor wt, torch::Tensor mask, torch::Tensor values,
                                 torch::Tensor offsets, double t_high, double t_low) {
  check_decode_args(x, wt);
  check_packed(mask, values, offsets, wt.size(0), wt.size(1));
  return packed_run(x, wt.data_ptr<float>(), mask, values, offsets, wt.size(1), t_high, t_low);
}

// Whether w ([out, in]) is stored as W.T row-major (w.t() contiguous), read off the strides without making the view.
static bool rows_are_channels(const torch::Tensor& w) {
  return w.dim() == 2 && (w.size(0) <= 1 || w.stride(0) == 1) && (w.size(1) <= 1 || w.stride(1) == w.size(0));
}

// sparsefx_cpu::tiered_linear: sparsefx::tiered_linear with its CPU kernel, registered in C++ so that a compiled
// graph reaches the kernel through the C++ dispatcher alone (the Python-registered kernel costs tens of microseconds
// per call, as many as a small layer's GEMV). One token on transposed storage with a non-zero threshold takes
// tiered_gemv; everything else computes what the op's default implementation does (two masked GEMMs).
static bool takes_decode(const torch::Tensor& x, const torch::Tensor& weight, double t_high, double t_low) {
  return x.numel() == weight.size(1) && (t_high > 0 || t_low > 0) && x.scalar_type() == torch::kFloat &&
         weight.scalar_type() == torch::kFloat && rows_are_channels(weight);
}

// The ops' default math, for everything the decode kernels do not take: one masked GEMM per non-empty tier (tier 0:
// |x| >= thresholds[0]; tier k: thresholds[k] <= |x| < thresholds[k - 1]), tier k's weight being weight_of(k).
template <typename WeightOf>
static torch::Tensor tier_gemms(const torch::Tensor& x, at::ArrayRef<double> thresholds, WeightOf weight_of) {
  const auto a = x.abs();
  const auto zero = at::zeros({}, x.options());
  auto upper = a >= thresholds[0];
  auto y = at::linear(at::where(upper, x, zero), weight_of(0));
  for (size_t k = 1; k < thresholds.size(); ++k) {
    if (!(thresholds[k] < thresholds[k - 1])) continue;
    const auto here = a >= thresholds[k];
    y = y + at::linear(at::where(here.logical_and(upper.logical_not()), x, zero), weight_of(k));
    upper = here;
  }
  return y;
}

// multitier_linear's: the full weights, then mediums[k - 1] for tier k
static torch::Tensor multitier_math(const torch::Tensor& x, const torch::Tensor& weight, at::TensorList mediums,
                                    at::ArrayRef<double> thresholds) {
  return tier_gemms(x, thresholds, [&](size_t k) { return k == 0 ? weight : mediums[k - 1].to(x.scalar_type()); });
}

static torch::Tensor tiered_math(const torch::Tensor& x, const torch::Tensor& weight,
                                 const torch::Tensor& weight_medium, double t_high, double t_low) {
  const double thresholds[2] = {t_high, t_low};
  return multitier_math(x, weight, {weight_medium}, thresholds);
}

torch::Tensor tiered_linear_cpu(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& weight_medium,
                                const std::optional<torch::Tensor>& bias, double t_high, double t_low) {
  torch::Tensor y;
  if (takes_decode(x, weight, t_high, t_low) && rows_are_channels(weight_medium) &&
      (weight_medium.scalar_type() == torch::kFloat || weight_medium.scalar_type() == torch::kHalf))
    y = tiered_run(x.contiguous(), weight.data_ptr<float>(), weight_medium, weight.size(0), t_high, t_low);
  else
    y = tiered_math(x, weight, weight_medium, t_high, t_low);
  return bias.has_value() ? y + *bias : y;
}

// sparsefx_cpu::tiered_linear_packed: the same, where one token reads the medium tier from its bitmask-packed copy
// (codegen.cpu.pack_medium); other calls use the dense weight_medium.
torch::Tensor tiered_linear_packed_cpu(const torch::Tensor& x, const torch::Tensor& weight,
                                       const torch::Tensor& weight_medium, const torch::Tensor& medium_mask,
                                       const torch::Tensor& medium_values, const torch::Tensor& medium_offsets,
                                       const std::optional<torch::Tensor>& bias, double t_high, double t_low) {
  torch::Tensor y;
  if (takes_decode(x, weight, t_high, t_low)) {
    check_packed(medium_mask, medium_values, medium_offsets, weight.size(1), weight.size(0));
    y = packed_run(x.contiguous(), weight.data_ptr<float>(), medium_mask, medium_values, medium_offsets,
                   weight.size(0), t_high, t_low);
  } else
    y = tiered_math(x, weight, weight_medium, t_high, t_low);
  return bias.has_value() ? y + *bias : y;
}

// sparsefx_cpu::multitier_linear: sparsefx::multitier_linear with its CPU kernel (one token on transposed storage:
// multitier_gemv; anything else: one masked GEMM per tier, as the op's default implementation).
torch::Tensor multitier_linear_cpu(const torch::Tensor& x, const torch::Tensor& weight, at::TensorList mediums,
                                   const std::optional<torch::Tensor>& bias, at::ArrayRef<double> thresholds) {
  TORCH_CHECK(thresholds.size() == mediums.size() + 1, "multitier_linear: ", mediums.size(), " mediums need ",
              mediums.size() + 1, " thresholds, got ", thresholds.size());
  bool decode = takes_decode(x, weight, thresholds[0], thresholds.back());
  for (const auto& wm : mediums)
    decode = decode && rows_are_channels(wm) &&
             (wm.scalar_type() == torch::kFloat || wm.scalar_type() == torch::kHalf);
  torch::Tensor y;
  if (decode) {
    y = multitier_run(x.contiguous(), weight.data_ptr<float>(), mediums, weight.size(0), thresholds);
  } else {
    y = multitier_math(x, weight, mediums, thresholds);
  }
  return bias.has_value() ? y + *bias : y;
}

// banded_linear's default math (tier_gemms): tier k's weights are those with band >= k.
static torch::Tensor banded_math(const torch::Tensor& x, const torch::Tensor& weight, at::ArrayRef<double> thresholds) {
  const auto values = weight.to(x.scalar_type());
  const auto bands = weight.view(torch::kShort).bitwise_and(3);
  const auto zero = at::zeros({}, values.options());
  return tier_gemms(x, thresholds, [&](size_t k) {
    return k == 0 ? values : at::where(bands >= (int64_t)k, values, zero);
  });
}

// sparsefx_cpu::banded_linear: sparsefx::banded_linear with its CPU kernel (one token on transposed storage:
// banded_gemv; anything else: banded_math).
torch::Tensor banded_linear_cpu(const torch::Tensor& x, const torch::Tensor& weight,
                                const std::optional<torch::Tensor>& bias, at::ArrayRef<double> thresholds) {
  TORCH_CHECK(thresholds.size() >= 2 && thresholds.size() <= 4, "banded_linear: expected 2 to 4 thresholds (1 to 3 "
              "medium tiers), got ", thresholds.size());
  TORCH_CHECK(weight.scalar_type() == torch::kHalf, "banded_linear: the banded weight is fp16 (bands in its low "
              "bits), got ", weight.scalar_type());
  const int64_t in = weight.size(1);
  torch::Tensor y;
  if (x.numel() == in && (thresholds[0] > 0 || thresholds.back() > 0) && x.scalar_type() == torch::kFloat &&
      rows_are_channels(weight))
    y = banded_run(x.contiguous(), static_cast<const at::Half*>(weight.data_ptr()), weight.size(0), thresholds);
  else
    y = banded_math(x, weight, thresholds);
  return bias.has_value() ? y + *bias : y;
}

TORCH_LIBRARY(sparsefx_cpu, m) {
  m.def("tiered_linear(Tensor x, Tensor weight, Tensor weight_medium, Tensor? bias, float t_high, float t_low) "
        "-> Tensor");
  m.def("tiered_linear_packed(Tensor x, Tensor weight, Tensor weight_medium, Tensor medium_mask, "
        "Tensor medium_values, Tensor medium_offsets, Tensor? bias, float t_high, float t_low) -> Tensor");
  m.def("multitier_linear(Tensor x, Tensor weight, Tensor[] mediums, Tensor? bias, float[] thresholds) -> Tensor");
  m.def("banded_linear(Tensor x, Tensor weight, Tensor? bias, float[] thresholds) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparsefx_cpu, CPU, m) {
  m.impl("tiered_linear", &tiered_linear_cpu);
  m.impl("tiered_linear_packed", &tiered_linear_packed_cpu);
  m.impl("multitier_linear", &multitier_linear_cpu);
  m.impl("banded_linear", &banded_linear_cpu);
}

// The kernels cpu.py calls directly (the ops above are what the compiled graphs call).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("tiered_gemv", torch::wrap_pybind_function(tiered_gemv), "tiered_gemv");
  m.def("tiered_gemv_packed", torch::wrap_pybind_function(tiered_gemv_packed), "tiered_gemv_packed");
  m.def("multitier_gemv", torch::wrap_pybind_function(multitier_gemv), "multitier_gemv");
  m.def("banded_gemv", torch::wrap_pybind_function(banded_gemv), "banded_gemv");
}
