// The whole-model CPU decode runtime (sparsefx/runtime): one C++ call runs every decoder block of a llama-family
// model for M new tokens — embedding, RMSNorm, fused QKV, RoPE, a preallocated KV cache, attention, o_proj, fused
// gate/up, SiLU, down, the head — with no Python, no HF module calls and no per-op dispatch between them. The
// linears run the quant family's row kernels (quant_kernels.h: packed codes read directly, x rounded to int8 per
// 32 inputs when int8 activations are on) or an fp32 AVX2 row kernel for dense weights; each group of linears that
// read the same input (q/k/v, gate/up) runs in one parallel region over their concatenated output rows.
// Built by runtime/__init__.py with torch.utils.cpp_extension.load; registered as the TorchScript class
// torch.classes.sparsefx_cpu.DecodeRuntime.

#include "../ops/quant/quant_kernels.h"

#include <torch/custom_class.h>
#include <algorithm>
#include <limits>
#include <map>
#include <vector>

namespace {

struct Linear {
  bool set = false, quant = false;
  PackedRef q{};
  const float* w = nullptr;       // dense: [out, in] fp32
  const float* bias = nullptr;    // [out] fp32 or null
  int64_t in = 0, out = 0;
};

// y[m, o] = x[m] . w[o] for o in [o0, o1): dense fp32 rows, two FMA chains.
void dense_rows(const float* x, int64_t M, int64_t in, const float* w, float* y, int64_t out, int64_t o0,
                int64_t o1) {
  for (int64_t o = o0; o < o1; ++o) {
    const float* wr = w + o * in;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * in;
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      int64_t i = 0;
      for (; i + 16 <= in; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + i), _mm256_loadu_ps(xm + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + i + 8), _mm256_loadu_ps(xm + i + 8), a1);
      }
      float s = hsum(_mm256_add_ps(a0, a1));
      for (; i < in; ++i) s += wr[i] * xm[i];
      y[m * out + o] = s;
    }
  }
}

// One input's prepared forms, made once per (bits, group size) among the linears that read it.
struct Prepared {
  std::map<std::pair<int64_t, int64_t>, PreparedQ8> q8;
  std::map<std::pair<int64_t, int64_t>, PreparedX> f32;
};

}  // namespace

struct DecodeRuntime : torch::CustomClassHolder {
  enum Role { Q = 0, K, V, O, GATE, UP, DOWN, ROLES };

  int64_t L, H, nh, nkv, hd, inter, vocab, max_len;
  bool int8_act;
  double eps;
  at::Tensor embed, final_norm, cos, sin, k_cache, v_cache;
  std::vector<at::Tensor> norms;        // 2 per layer: input, post-attention
  std::vector<Linear> lin;              // ROLES per layer, then the head
  std::vector<at::Tensor> keep;         // the tensors the raw pointers above point into
  int64_t calls = 0;                    // forward calls (tests read it: proof the runtime ran)

  // ints: layers, hidden, heads, kv heads, head dim, intermediate, vocab, max positions, int8 activations (0/1)
  DecodeRuntime(std::vector<int64_t> ints, double eps_, at::Tensor embed_, at::Tensor final_norm_, at::Tensor cos_,
                at::Tensor sin_)
      : eps(eps_), embed(embed_), final_norm(final_norm_), cos(cos_), sin(sin_) {
    TORCH_CHECK(ints.size() == 9, "DecodeRuntime: expected 9 ints");
    L = ints[0]; H = ints[1]; nh = ints[2]; nkv = ints[3]; hd = ints[4]; inter = ints[5]; vocab = ints[6];
    max_len = ints[7]; int8_act = ints[8] != 0;
    TORCH_CHECK(nh % nkv == 0 && hd % 2 == 0, "heads must be a multiple of kv heads and head_dim even");
    check_f32(embed, {vocab, H}, "embed");
    check_f32(final_norm, {H}, "final norm");
    check_f32(cos, {max_len, hd}, "cos");
    check_f32(sin, {max_len, hd}, "sin");
    k_cache = torch::zeros({L, nkv, max_len, hd}, embed.options());
    v_cache = torch::zeros({L, nkv, max_len, hd}, embed.options());
    norms.resize(2 * L);
    lin.resize(ROLES * L + 1);
  }

  static void check_f32(const at::Tensor& t, std::vector<int64_t> shape, const char* what) {
    TORCH_CHECK(t.scalar_type() == torch::kFloat && t.is_contiguous() && t.sizes() == at::IntArrayRef(shape),
                "DecodeRuntime: ", what, " must be contiguous fp32 of shape ", at::IntArrayRef(shape), ", got ",
                t.sizes(), " ", t.scalar_type());
  }

  void set_norms(int64_t layer, at::Tensor input, at::Tensor post) {
    TORCH_CHECK(layer >= 0 && layer < L, "layer out of range");
    check_f32(input, {H}, "input norm");
    check_f32(post, {H}, "post-attention norm");
    norms[2 * layer] = input;
    norms[2 * layer + 1] = post;
  }

  int64_t slot_in(int64_t slot) const {
    if (slot == ROLES * L) return H;
    const int64_t r = slot % ROLES;
    return r == O ? nh * hd : r == DOWN ? inter : H;
  }
  int64_t slot_out(int64_t slot) const {
    if (slot == ROLES * L) return vocab;
    const int64_t r = slot % ROLES;
    return r == Q ? nh * hd : (r == K || r == V) ? nkv * hd : (r == GATE || r == UP) ? inter : H;
  }

  void set_bias(Linear& l, const at::Tensor& bias) {
    if (bias.numel() == 0) return;
    check_f32(bias, {l.out}, "bias");
    keep.push_back(bias);
    l.bias = bias.data_ptr<float>();
  }

  // slot = layer * 7 + role (q, k, v, o, gate, up, down), or layers * 7 for the head
  void set_dense(int64_t slot, at::Tensor weight, at::Tensor bias) {
    TORCH_CHECK(slot >= 0 && slot < (int64_t)lin.size(), "slot out of range");
    Linear& l = lin[slot];
    l = Linear{};
    l.in = slot_in(slot); l.out = slot_out(slot);
    check_f32(weight, {l.out, l.in}, "dense weight");
    keep.push_back(weight);
    l.w = weight.data_ptr<float>();
    set_bias(l, bias);
    l.set = true;
  }

  void set_quant(int64_t slot, at::Tensor packed, at::Tensor scales, at::Tensor zeros, at::Tensor bias, int64_t bits,
                 int64_t gs) {
    TORCH_CHECK(slot >= 0 && slot < (int64_t)lin.size(), "slot out of range");
    Linear& l = lin[slot];
    l = Linear{};
    l.in = slot_in(slot); l.out = slot_out(slot);
    check_packed(packed, scales, zeros, bits, gs, l.in);
    TORCH_CHECK(packed.size(0) == l.out, "packed weight has ", packed.size(0), " rows, expected ", l.out);
    keep.insert(keep.end(), {packed, scales, zeros});
    l.q = packed_ref(packed, scales, zeros, bits, gs);
    l.quant = true;
    set_bias(l, bias);
    l.set = true;
  }

  // ys[i] = x @ W_i^T (+ b_i) for linears that read the same x: [M, in]; one parallel region over all their rows.
  void linears(const float* x, int64_t M, std::initializer_list<std::pair<const Linear*, float*>> outs) const {
    Prepared prep;
    std::vector<std::pair<const Linear*, float*>> segs(outs);
    int64_t total = 0;
    for (auto& [l, y] : segs) {
      TORCH_CHECK(l->set, "DecodeRuntime: a linear was not set");
      if (l->quant) {
        const auto key = std::make_pair(l->q.bits, l->q.gs);
        if (int8_act && !prep.q8.count(key)) prep.q8.emplace(key, prepare_q8(x, M, l->in, l->q.bits, l->q.gs));
        if (!int8_act && !prep.f32.count(key)) prep.f32.emplace(key, prepare_x(x, M, l->in, l->q.bits, l->q.gs));
      }
      total += l->out;
    }
    at::parallel_for(0, total, 16, [&](int64_t b, int64_t e) {
      int64_t base = 0;
      for (auto& [l, y] : segs) {
        const int64_t o0 = std::max(b - base, (int64_t)0), o1 = std::min(e - base, l->out);
        if (o0 < o1) {
          if (!l->quant) {
            dense_rows(x, M, l->in, l->w, y, l->out, o0, o1);
          } else if (int8_act) {
            rows_q8_range(prep.q8.at({l->q.bits, l->q.gs}), M, l->in, l->q, y, l->out, o0, o1);
          } else {
            rows_range(prep.f32.at({l->q.bits, l->q.gs}), M, l->in, l->q, y, l->out, o0, o1);
          }
          if (l->bias)
            for (int64_t m = 0; m < M; ++m)
              for (int64_t o = o0; o < o1; ++o) y[m * l->out + o] += l->bias[o];
        }
        base += l->out;
      }
    });
  }

  void rmsnorm(const float* x, int64_t M, const float* w, float* y) const {
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * H;
      double ss = 0.0;
      for (int64_t i = 0; i < H; ++i) ss += (double)xm[i] * xm[i];
      const float r = 1.0f / std::sqrt((float)(ss / H) + (float)eps);
      for (int64_t i = 0; i < H; ++i) y[m * H + i] = w[i] * (xm[i] * r);
    }
  }

  // HF's rotate-half RoPE on n heads of one row, at position pos (cos/sin rows as HF computes them)
  void rope(float* v, int64_t n, int64_t pos) const {
    const float* c = cos.data_ptr<float>() + pos * hd;
    const float* s = sin.data_ptr<float>() + pos * hd;
    const int64_t half = hd / 2;
    for (int64_t h = 0; h < n; ++h) {
      float* p = v + h * hd;
      for (int64_t i = 0; i < half; ++i) {
        const float a = p[i], b = p[i + half];
        p[i] = a * c[i] - b * s[i];
        p[i + half] = b * c[i + half] + a * s[i + half];
      }
    }
  }

  // logits of the last of M tokens (all_logits: of every one) after writing their keys and values at pos..pos+M-1
  at::Tensor forward(at::Tensor tokens, int64_t pos, bool all_logits) {
    TORCH_CHECK(tokens.dim() == 1 && tokens.scalar_type() == torch::kLong && tokens.numel() > 0,
                "tokens must be a non-empty 1-D int64 tensor");
    const int64_t M = tokens.numel();
    TORCH_CHECK(pos >= 0 && pos + M <= max_len, "positions ", pos, "..", pos + M - 1, " pass the runtime's max_len ",
                max_len, " (make the runtime with a larger max_len)");
    ++calls;
    const auto tok = tokens.contiguous();
    const int64_t* t = tok.data_ptr<int64_t>();
    const int64_t qd = nh * hd, kvd = nkv * hd, group = nh / nkv;
    std::vector<float> x(M * H), h(M * H), q(M * qd), k(M * kvd), v(M * kvd), att(M * qd), o(M * H),
        g(M * inter), u(M * inter);
    const float* E = embed.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m) {
      TORCH_CHECK(t[m] >= 0 && t[m] < vocab, "token id ", t[m], " is outside the vocabulary (", vocab, ")");
      std::memcpy(&x[m * H], E + t[m] * H, H * sizeof(float));
    }
    const float scale = 1.0f / std::sqrt((float)hd);
    for (int64_t l = 0; l < L; ++l) {
      const Linear* W = &lin[l * ROLES];
      rmsnorm(x.data(), M, norms[2 * l].data_ptr<float>(), h.data());
      linears(h.data(), M, {{&W[Q], q.data()}, {&W[K], k.data()}, {&W[V], v.data()}});
      float* kc = k_cache.data_ptr<float>() + l * nkv * max_len * hd;
      float* vc = v_cache.data_ptr<float>() + l * nkv * max_len * hd;
      for (int64_t m = 0; m < M; ++m) {
        rope(&q[m * qd], nh, pos + m);
        rope(&k[m * kvd], nkv, pos + m);
        for (int64_t j = 0; j < nkv; ++j) {
          std::memcpy(kc + (j * max_len + pos + m) * hd, &k[m * kvd + j * hd], hd * sizeof(float));
          std::memcpy(vc + (j * max_len + pos + m) * hd, &v[m * kvd + j * hd], hd * sizeof(float));
        }
      }
      // causal attention: row m sees positions 0..pos+m; one task per (row, head)
      at::parallel_for(0, M * nh, 1, [&](int64_t b, int64_t e) {
        std::vector<float> sc(pos + M);
        for (int64_t i = b; i < e; ++i) {
          const int64_t m = i / nh, head = i % nh, j = head / group, n = pos + m + 1;
          const float* qh = &q[m * qd + head * hd];
          const float* K = kc + j * max_len * hd;
          const float* V = vc + j * max_len * hd;
          float mx = -std::numeric_limits<float>::infinity();
          for (int64_t s = 0; s < n; ++s) {
            __m256 a = _mm256_setzero_ps();
            int64_t d = 0;
            for (; d + 8 <= hd; d += 8)
              a = _mm256_fmadd_ps(_mm256_loadu_ps(qh + d), _mm256_loadu_ps(K + s * hd + d), a);
            float dot = hsum(a);
            for (; d < hd; ++d) dot += qh[d] * K[s * hd + d];
            sc[s] = dot * scale;
            mx = std::max(mx, sc[s]);
          }
          float sum = 0.0f;
          for (int64_t s = 0; s < n; ++s) { sc[s] = std::exp(sc[s] - mx); sum += sc[s]; }
          float* out = &att[m * qd + head * hd];
          std::fill(out, out + hd, 0.0f);
          const float inv = 1.0f / sum;
          for (int64_t s = 0; s < n; ++s) {
            const float p = sc[s] * inv;
            for (int64_t d = 0; d < hd; ++d) out[d] += p * V[s * hd + d];
          }
        }
      });
      linears(att.data(), M, {{&W[O], o.data()}});
      for (int64_t i = 0; i < M * H; ++i) x[i] += o[i];
      rmsnorm(x.data(), M, norms[2 * l + 1].data_ptr<float>(), h.data());
      linears(h.data(), M, {{&W[GATE], g.data()}, {&W[UP], u.data()}});
      for (int64_t i = 0; i < M * inter; ++i) g[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
      linears(g.data(), M, {{&W[DOWN], o.data()}});
      for (int64_t i = 0; i < M * H; ++i) x[i] += o[i];
    }
    const int64_t rows = all_logits ? M : 1;
    const float* last = x.data() + (M - rows) * H;
    rmsnorm(last, rows, final_norm.data_ptr<float>(), h.data());
    auto logits = torch::empty({rows, vocab}, embed.options());
    linears(h.data(), rows, {{&lin[ROLES * L], logits.data_ptr<float>()}});
    return logits;
  }

  int64_t forward_calls() const { return calls; }
  at::Tensor keys() const { return k_cache; }
  at::Tensor values() const { return v_cache; }
};

TORCH_LIBRARY_FRAGMENT(sparsefx_cpu, m) {
  m.class_<DecodeRuntime>("DecodeRuntime")
      .def(torch::init<std::vector<int64_t>, double, at::Tensor, at::Tensor, at::Tensor, at::Tensor>())
      .def("set_norms", &DecodeRuntime::set_norms)
      .def("set_dense", &DecodeRuntime::set_dense)
      .def("set_quant", &DecodeRuntime::set_quant)
      .def("forward", &DecodeRuntime::forward)
      .def("forward_calls", &DecodeRuntime::forward_calls)
      .def("keys", &DecodeRuntime::keys)
      .def("values", &DecodeRuntime::values);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
