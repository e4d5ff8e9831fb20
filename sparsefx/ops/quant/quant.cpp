// The C++ CPU kernels of sparsefx/ops/quant (built by cpu.py with torch.utils.cpp_extension.load; the
// build is keyed by this file's content, so an edit here rebuilds it).

#include "quant_kernels.h"

static void check_x(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x must be contiguous fp32 [M, in]");
}

// y = x @ deq(W)^T. x: [M, in] fp32 contiguous; W packed [out, in * bits / 8], scales fp16 [out, in / gs],
// zeros uint8 [out, in / gs] or empty (symmetric: zero 2^(bits-1)). Returns y: [M, out] fp32.
torch::Tensor quant_matmul(torch::Tensor x, torch::Tensor packed, torch::Tensor scales, torch::Tensor zeros,
                           int64_t bits, int64_t gs) {
  check_x(x);
  check_packed(packed, scales, zeros, bits, gs, x.size(1));
  auto y = torch::empty({x.size(0), packed.size(0)}, x.options());
  matmul_into(x.data_ptr<float>(), x.size(0), x.size(1), packed_ref(packed, scales, zeros, bits, gs), packed.size(0),
              y.data_ptr<float>());
  return y;
}

// quant_matmul with x rounded to int8 per 32 inputs (the int8-activation kernel). Returns y: [M, out] fp32.
torch::Tensor quant_matmul_q8(torch::Tensor x, torch::Tensor packed, torch::Tensor scales, torch::Tensor zeros,
                              int64_t bits, int64_t gs) {
  check_x(x);
  check_packed(packed, scales, zeros, bits, gs, x.size(1));
  auto y = torch::empty({x.size(0), packed.size(0)}, x.options());
  matmul_q8_into(x.data_ptr<float>(), x.size(0), x.size(1), packed_ref(packed, scales, zeros, bits, gs),
                 packed.size(0), y.data_ptr<float>());
  return y;
}

// y[m, o0:o1] += sum_k u[m, k] * deq(At)[k, o0:o1] for At packed [r, out * bits / 8] with groups along out.
template <int BITS>
static void cols(int64_t M, const float* u, int64_t r, const uint8_t* packed, const at::Half* scales,
                 const uint8_t* zeros, float zero_sym, int64_t out, int64_t gs, float* y, int64_t g0, int64_t g1) {
  const int64_t groups = out / gs, row_bytes = out * BITS / 8, group_bytes = gs * BITS / 8;
  const uint8_t* safe_end = packed + r * row_bytes - 4;
  for (int64_t k = 0; k < r; ++k) {
    for (int64_t g = g0; g < g1; ++g) {
      const float s = _cvtsh_ss(scales[k * groups + g].x);
      const __m256 vs = _mm256_set1_ps(s);
      const __m256 vz = _mm256_set1_ps(zeros ? (float)zeros[k * groups + g] : zero_sym);
      const uint8_t* p = packed + k * row_bytes + g * group_bytes;
      for (int64_t j = 0; j < gs; j += 16, p += 2 * BITS) {
        __m256 q0, q1;
        codes16<BITS>(p, p + 2 * BITS - 1 > safe_end, q0, q1);
        const __m256 w0 = _mm256_mul_ps(_mm256_sub_ps(q0, vz), vs), w1 = _mm256_mul_ps(_mm256_sub_ps(q1, vz), vs);
        for (int64_t m = 0; m < M; ++m) {
          float* yo = y + m * out + g * gs + j;
          const __m256 um = _mm256_set1_ps(u[m * r + k]);
          _mm256_storeu_ps(yo, _mm256_fmadd_ps(um, w0, _mm256_loadu_ps(yo)));
          _mm256_storeu_ps(yo + 8, _mm256_fmadd_ps(um, w1, _mm256_loadu_ps(yo + 8)));
        }
      }
    }
  }
}

// y[:, g0 * gs : g1 * gs] += u @ deq(At)[:, same columns] for u: [M, r] fp32 (row-major), At packed
// [r, out * bits / 8] with groups along out.
static void cols_range(const float* up, int64_t M, int64_t r, const PackedRef& w, float* yp, int64_t out, int64_t g0,
                       int64_t g1) {
  switch (w.bits) {
    case 2: cols<2>(M, up, r, w.codes, w.scales, w.zeros, w.zero_sym, out, w.gs, yp, g0, g1); break;
    case 3: cols<3>(M, up, r, w.codes, w.scales, w.zeros, w.zero_sym, out, w.gs, yp, g0, g1); break;
    case 4: cols<4>(M, up, r, w.codes, w.scales, w.zeros, w.zero_sym, out, w.gs, yp, g0, g1); break;
    default: cols<8>(M, up, r, w.codes, w.scales, w.zeros, w.zero_sym, out, w.gs, yp, g0, g1); break;
  }
}

// DAM's linear for M fp32 rows of x, all parts packed: y = x @ deq(Q)^T + ((x @ deq(B)^T) * d) @ deq(At), main null =
// no main weight. u = (x B^T) d is r wide, so it is computed first; then one parallel region splits the outputs by
// At's groups, and each thread writes its outputs' main rows and adds their low-rank columns while they are in cache
// (one fork/join per linear instead of two). x: contiguous fp32 [M, in]; d: contiguous fp32 [r]; every part checked
// by the caller. With q8, x is rounded to int8 per 32 inputs for both products that read it (x B^T and the main
// rows), as quant_matmul_q8 does; u stays fp32. Returns y: [M, out] fp32.
static torch::Tensor lowrank_decode(const torch::Tensor& x_, const PackedRef* main, const PackedRef& at_,
                                    const torch::Tensor& d_, const PackedRef& b, int64_t out, bool q8) {
  const int64_t M = x_.size(0), in = x_.size(1), r = d_.numel();
  const float* x = x_.data_ptr<float>();
  const float* d = d_.data_ptr<float>();
  auto y_ = torch::empty({M, out}, x_.options());
  float* y = y_.data_ptr<float>();
  std::vector<float> u((size_t)(M * r));
  (q8 ? matmul_q8_into : matmul_into)(x, M, in, b, r, u.data());
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < r; ++k) u[m * r + k] *= d[k];
  PreparedX px;
  PreparedQ8 pq;
  if (main && q8) pq = prepare_q8(x, M, in, main->bits, main->gs);
  else if (main) px = prepare_x(x, M, in, main->bits, main->gs);
  at::parallel_for(0, out / at_.gs, 1, [&](int64_t g0, int64_t g1) {
    const int64_t o0 = g0 * at_.gs, o1 = g1 * at_.gs;
    if (main) {
      if (q8) rows_q8_range(pq, M, in, *main, y, out, o0, o1);
      else rows_range(px, M, in, *main, y, out, o0, o1);
    } else {
      for (int64_t m = 0; m < M; ++m) std::fill(y + m * out + o0, y + m * out + o1, 0.0f);
    }
    cols_range(u.data(), M, r, at_, y, out, g0, g1);
  });
  return y_;
}

// y += u @ deq(At): u [M, r] fp32, At packed [r, out * bits / 8] (groups along out), y [M, out] fp32 (in place).
void quant_gemv_t(torch::Tensor u, torch::Tensor packed, torch::Tensor scales, torch::Tensor zeros, int64_t bits,
                  int64_t gs, torch::Tensor y) {
  TORCH_CHECK(u.dim() == 2 && u.scalar_type() == torch::kFloat && u.is_contiguous() && u.size(1) == packed.size(0),
              "u must be contiguous fp32 [M, r]");
  check_packed(packed, scales, zeros, bits, gs, y.size(1));
  TORCH_CHECK(y.dim() == 2 && y.size(0) == u.size(0) && y.scalar_type() == torch::kFloat && y.is_contiguous(),
              "y must be contiguous fp32 [M, out]");
  const PackedRef w = packed_ref(packed, scales, zeros, bits, gs);
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, y.size(1) / gs, 4, [&](int64_t g0, int64_t g1) {
    cols_range(u.data_ptr<float>(), u.size(0), u.size(1), w, yp, y.size(1), g0, g1);
  });
}

// DAM's whole linear in one call: y = x @ deq(Q)^T + ((x @ deq(B)^T) * d) @ deq(At), factors packed with
// factor_bits / factor_group; an empty `packed` means no main weight; q8: x rounded to int8 per 32 inputs. Returns
// y: [M, out] fp32.
torch::Tensor lowrank_quant_matmul(torch::Tensor x, torch::Tensor packed, torch::Tensor scales, torch::Tensor zeros,
                                   int64_t bits, int64_t gs, torch::Tensor at_packed, torch::Tensor at_scales,
                                   torch::Tensor at_zeros, torch::Tensor d, torch::Tensor b_packed,
                                   torch::Tensor b_scales, torch::Tensor b_zeros, int64_t fbits, int64_t fgs, bool q8) {
  check_x(x);
  const int64_t in = x.size(1), r = b_packed.size(0), out = at_packed.size(1) * 8 / fbits;
  check_packed(b_packed, b_scales, b_zeros, fbits, fgs, in);
  check_packed(at_packed, at_scales, at_zeros, fbits, fgs, out);
  TORCH_CHECK(at_packed.size(0) == r && d.numel() == r && d.scalar_type() == torch::kFloat && d.is_contiguous(),
              "factors and d must share the rank (d fp32 [r])");
  const bool main = packed.numel() > 0;
  if (main) {
    check_packed(packed, scales, zeros, bits, gs, in);
    TORCH_CHECK(packed.size(0) == out, "main weight and factors disagree on out_features");
  }
  const PackedRef main_ref = main ? packed_ref(packed, scales, zeros, bits, gs) : PackedRef{};
  return lowrank_decode(x, main ? &main_ref : nullptr, packed_ref(at_packed, at_scales, at_zeros, fbits, fgs), d,
                        packed_ref(b_packed, b_scales, b_zeros, fbits, fgs), out, q8);
}

// w[o0:o1, :] = deq(W) rows as fp32: (q - zero) * scale, sixteen codes at a time (the op's default math, in C++).
template <int BITS>
static void dequant_rows(const uint8_t* packed, const at::Half* scales, const uint8_t* zeros, float zero_sym,
                         int64_t out, int64_t in, int64_t gs, float* w, int64_t o0, int64_t o1) {
  const int64_t groups = in / gs, row_bytes = in * BITS / 8, group_bytes = gs * BITS / 8;
  const uint8_t* safe_end = packed + out * row_bytes - 4;
  for (int64_t o = o0; o < o1; ++o)
    for (int64_t g = 0; g < groups; ++g) {
      const __m256 vs = _mm256_set1_ps(_cvtsh_ss(scales[o * groups + g].x));
      const __m256 vz = _mm256_set1_ps(zeros ? (float)zeros[o * groups + g] : zero_sym);
      const uint8_t* p = packed + o * row_bytes + g * group_bytes;
      float* wo = w + o * in + g * gs;
      for (int64_t j = 0; j < gs; j += 16, p += 2 * BITS) {
        __m256 q0, q1;
        codes16<BITS>(p, p + 2 * BITS - 1 > safe_end, q0, q1);
        _mm256_storeu_ps(wo + j, _mm256_mul_ps(_mm256_sub_ps(q0, vz), vs));
        _mm256_storeu_ps(wo + j + 8, _mm256_mul_ps(_mm256_sub_ps(q1, vz), vs));
      }
    }
}

// deq(W) as an fp32 [rows, cols] tensor, rows split between threads (the ops' default math, in C++).
static torch::Tensor dequantize(const torch::Tensor& packed, const torch::Tensor& scales, const torch::Tensor& zeros,
                                int64_t bits, int64_t gs) {
  const int64_t rows = packed.size(0), cols = packed.size(1) * 8 / bits;
  auto w = torch::empty({rows, cols}, packed.options().dtype(torch::kFloat));
  const PackedRef p = packed_ref(packed, scales, zeros, bits, gs);
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t o0, int64_t o1) {
    switch (bits) {
      case 2: dequant_rows<2>(p.codes, p.scales, p.zeros, p.zero_sym, rows, cols, gs, wp, o0, o1); break;
      case 3: dequant_rows<3>(p.codes, p.scales, p.zeros, p.zero_sym, rows, cols, gs, wp, o0, o1); break;
      case 4: dequant_rows<4>(p.codes, p.scales, p.zeros, p.zero_sym, rows, cols, gs, wp, o0, o1); break;
      default: dequant_rows<8>(p.codes, p.scales, p.zeros, p.zero_sym, rows, cols, gs, wp, o0, o1); break;
    }
  });
  return w;
}

static torch::Tensor zeros_or_empty(const std::optional<torch::Tensor>& zeros, const torch::Tensor& like) {
  return zeros.has_value() ? zeros->contiguous() : torch::empty({0}, like.options());
}

// y: [M, out] -> x's leading dimensions with out last, plus the bias.
static torch::Tensor finish(torch::Tensor y, const torch::Tensor& x, int64_t out,
                            const std::optional<torch::Tensor>& bias) {
  auto sizes = x.sizes().vec();
  sizes.back() = out;
  y = y.reshape(sizes);
  return bias.has_value() ? y + *bias : y;
}

// The compiled graph's ops below: sparsefx::quant_linear and sparsefx::lowrank_quant_linear with their CPU kernels,
// registered in C++ so that a compiled graph reaches them without a Python call per linear. Up to MAX_ROWS fp32 rows
// (decode, small batches) multiply from the packed codes; more rows (prefill) or other dtypes dequantize once and
// run GEMMs — what the ops' default math does.
static constexpr int64_t kMaxRows = SPARSEFX_MAX_ROWS;   // -DSPARSEFX_MAX_ROWS=... (cpu.py MAX_ROWS)

static bool decode_rows(const torch::Tensor& x, int64_t M) {
  return x.scalar_type() == torch::kFloat && M > 0 && M <= kMaxRows;
}

static void check_bits(int64_t bits, const char* op, const char* what) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, op, ": ", what, " must be 2, 3, 4 or 8, got ", bits);
}

static torch::Tensor quant_linear_impl(const torch::Tensor& x, const torch::Tensor& packed_,
                                       const torch::Tensor& scales_, const std::optional<torch::Tensor>& zeros_,
                                       const std::optional<torch::Tensor>& bias, int64_t bits, int64_t gs, bool q8) {
  const auto packed = packed_.contiguous(), scales = scales_.contiguous(), zeros = zeros_or_empty(zeros_, packed);
  check_bits(bits, "quant_linear", "bits");
  const int64_t out = packed.size(0), in = packed.size(1) * 8 / bits;
  check_packed(packed, scales, zeros, bits, gs, in);
  TORCH_CHECK(x.size(-1) == in, "quant_linear: x has ", x.size(-1), " features, the packed weight ", in);
  const int64_t M = x.numel() / in;
  const auto x2 = x.reshape({M, in});
  torch::Tensor y;
  if (!decode_rows(x, M))
    y = at::linear(x2, dequantize(packed, scales, zeros, bits, gs).to(x.scalar_type()));
  else
    y = (q8 ? quant_matmul_q8 : quant_matmul)(x2.contiguous(), packed, scales, zeros, bits, gs);
  return finish(y, x, out, bias);
}

torch::Tensor quant_linear_cpu(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
                               const std::optional<torch::Tensor>& zeros, const std::optional<torch::Tensor>& bias,
                               int64_t bits, int64_t gs) {
  return quant_linear_impl(x, packed, scales, zeros, bias, bits, gs, false);
}

// quant_linear with decode rows of x rounded to int8 per 32 inputs (prefill as quant_linear: dequantize + GEMM)
torch::Tensor quant_linear_q8_cpu(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
                                  const std::optional<torch::Tensor>& zeros, const std::optional<torch::Tensor>& bias,
                                  int64_t bits, int64_t gs) {
  return quant_linear_impl(x, packed, scales, zeros, bias, bits, gs, true);
}

static torch::Tensor lowrank_quant_linear_impl(
    const torch::Tensor& x, const std::optional<torch::Tensor>& packed_, const std::optional<torch::Tensor>& scales_,
    const std::optional<torch::Tensor>& zeros_, const torch::Tensor& at_packed_,
    const std::optional<torch::Tensor>& at_scales_, const std::optional<torch::Tensor>& at_zeros_,
    const torch::Tensor& d_, const torch::Tensor& b_packed_, const std::optional<torch::Tensor>& b_scales_,
    const std::optional<torch::Tensor>& b_zeros_, const std::optional<torch::Tensor>& bias, int64_t bits, int64_t gs,
    int64_t fbits, int64_t fgs, bool q8) {
  const char* op = "lowrank_quant_linear";
  const int64_t in = x.size(-1), M = x.numel() / std::max<int64_t>(in, 1), r = d_.numel();
  const auto at_packed = at_packed_.contiguous(), b_packed = b_packed_.contiguous();
  const auto d = d_.to(torch::kFloat).contiguous();
  const bool fp16_factors = fbits == 16;
  if (!fp16_factors) check_bits(fbits, op, "factor_bits (or 16 for fp16 factors)");
  TORCH_CHECK(at_packed.dim() == 2 && b_packed.dim() == 2 && at_packed.size(0) == r && b_packed.size(0) == r, op,
              ": A^T and B must be [r, ...] with r = d.numel() = ", r, "; got ", at_packed.sizes(), " and ",
              b_packed.sizes());
  const int64_t out = fp16_factors ? at_packed.size(1) : at_packed.size(1) * 8 / fbits;
  torch::Tensor at_scales, at_zeros, b_scales, b_zeros;
  if (fp16_factors) {
    TORCH_CHECK(at_packed.scalar_type() == torch::kHalf && b_packed.scalar_type() == torch::kHalf &&
                b_packed.size(1) == in, op, ": factor_bits 16 takes fp16 A^T [r, out] and B [r, in] (B is ",
                b_packed.sizes(), ", x has ", in, " features)");
  } else {
    TORCH_CHECK(at_scales_.has_value() && b_scales_.has_value(), op, ": packed factors need their scales");
    TORCH_CHECK(b_packed.size(1) * 8 == in * fbits, op, ": x has ", in, " features, B packs ",
                b_packed.size(1) * 8 / fbits);
    at_scales = at_scales_->contiguous(), b_scales = b_scales_->contiguous();
    at_zeros = zeros_or_empty(at_zeros_, at_packed), b_zeros = zeros_or_empty(b_zeros_, b_packed);
    check_packed(at_packed, at_scales, at_zeros, fbits, fgs, out);
    check_packed(b_packed, b_scales, b_zeros, fbits, fgs, in);
  }
  const bool main = packed_.has_value();
  torch::Tensor packed, scales, zeros;
  if (main) {
    check_bits(bits, op, "bits");
    TORCH_CHECK(scales_.has_value(), op, ": the packed main weight needs its scales");
    packed = packed_->contiguous(), scales = scales_->contiguous(), zeros = zeros_or_empty(zeros_, packed);
    check_packed(packed, scales, zeros, bits, gs, in);
    TORCH_CHECK(packed.size(0) == out, op, ": the main weight has ", packed.size(0), " rows, the factors ", out);
  }
  const auto x2 = x.reshape({M, in});
  torch::Tensor y;
  if (decode_rows(x, M) && !fp16_factors) {          // the whole linear from the packed codes, one parallel region
    const PackedRef main_ref = main ? packed_ref(packed, scales, zeros, bits, gs) : PackedRef{};
    y = lowrank_decode(x2.contiguous(), main ? &main_ref : nullptr, packed_ref(at_packed, at_scales, at_zeros, fbits,
                       fgs), d, packed_ref(b_packed, b_scales, b_zeros, fbits, fgs), out, q8);
  } else {                                            // fp16 factors (small), or prefill: the default math's GEMMs
    const auto dt = x.scalar_type();
    const auto a = fp16_factors ? at_packed.to(dt) : dequantize(at_packed, at_scales, at_zeros, fbits, fgs).to(dt);
    const auto b = fp16_factors ? b_packed.to(dt) : dequantize(b_packed, b_scales, b_zeros, fbits, fgs).to(dt);
    y = at::matmul(at::linear(x2, b) * d.to(dt), a);
    if (main)
      y += decode_rows(x, M) ? (q8 ? quant_matmul_q8 : quant_matmul)(x2.contiguous(), packed, scales, zeros, bits, gs)
                             : at::linear(x2, dequantize(packed, scales, zeros, bits, gs).to(dt));
  }
  return finish(y, x, out, bias);
}

// The op's arguments and schema, shared by its fp32 and int8-activation registrations.
#define LOWRANK_OP_SCHEMA                                                                                      \
  "(Tensor x, Tensor? packed, Tensor? scales, Tensor? zeros, Tensor at_packed, Tensor? at_scales, "            \
  "Tensor? at_zeros, Tensor d, Tensor b_packed, Tensor? b_scales, Tensor? b_zeros, Tensor? bias, int bits, "  \
  "int group_size, int factor_bits, int factor_group) -> Tensor"
#define LOWRANK_OP_ARGS                                                                                            \
  const torch::Tensor& x, const std::optional<torch::Tensor>& packed, const std::optional<torch::Tensor>& scales, \
  const std::optional<torch::Tensor>& zeros, const torch::Tensor& at_packed,                                      \
  const std::optional<torch::Tensor>& at_scales, const std::optional<torch::Tensor>& at_zeros,                    \
  const torch::Tensor& d, const torch::Tensor& b_packed, const std::optional<torch::Tensor>& b_scales,            \
  const std::optional<torch::Tensor>& b_zeros, const std::optional<torch::Tensor>& bias, int64_t bits,            \
  int64_t gs, int64_t fbits, int64_t fgs

torch::Tensor lowrank_quant_linear_cpu(LOWRANK_OP_ARGS) {
  return lowrank_quant_linear_impl(x, packed, scales, zeros, at_packed, at_scales, at_zeros, d, b_packed, b_scales,
                                   b_zeros, bias, bits, gs, fbits, fgs, false);
}

// lowrank_quant_linear with decode rows of x rounded to int8 per 32 inputs (fp16 factors: the main weight's only)
torch::Tensor lowrank_quant_linear_q8_cpu(LOWRANK_OP_ARGS) {
  return lowrank_quant_linear_impl(x, packed, scales, zeros, at_packed, at_scales, at_zeros, d, b_packed, b_scales,
                                   b_zeros, bias, bits, gs, fbits, fgs, true);
}

TORCH_LIBRARY_FRAGMENT(sparsefx_cpu, m) {
  m.def("quant_linear(Tensor x, Tensor packed, Tensor scales, Tensor? zeros, Tensor? bias, int bits, int group_size) "
        "-> Tensor");
  m.def("quant_linear_q8(Tensor x, Tensor packed, Tensor scales, Tensor? zeros, Tensor? bias, int bits, "
        "int group_size) -> Tensor");
  m.def("lowrank_quant_linear" LOWRANK_OP_SCHEMA);
  m.def("lowrank_quant_linear_q8" LOWRANK_OP_SCHEMA);
}

TORCH_LIBRARY_IMPL(sparsefx_cpu, CPU, m) {
  m.impl("quant_linear", &quant_linear_cpu);
  m.impl("quant_linear_q8", &quant_linear_q8_cpu);
  m.impl("lowrank_quant_linear", &lowrank_quant_linear_cpu);
  m.impl("lowrank_quant_linear_q8", &lowrank_quant_linear_q8_cpu);
}

// The kernels cpu.py calls directly (the ops above are what the compiled graphs call).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quant_matmul", torch::wrap_pybind_function(quant_matmul), "quant_matmul");
  m.def("quant_matmul_q8", torch::wrap_pybind_function(quant_matmul_q8), "quant_matmul_q8");
  m.def("quant_gemv_t", torch::wrap_pybind_function(quant_gemv_t), "quant_gemv_t");
  m.def("lowrank_quant_matmul", torch::wrap_pybind_function(lowrank_quant_matmul), "lowrank_quant_matmul");
}
