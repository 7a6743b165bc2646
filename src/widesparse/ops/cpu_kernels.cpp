// widesparse.cpu_kernels: compiled on first use by torch.utils.cpp_extension.load_inline (see cpu_kernels.py).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

static inline float bf16_to_float(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

static inline uint16_t float_to_bf16(float f) {  // round to nearest even, NaN stays NaN (c10::BFloat16's rule)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // branch-free, so loops vectorize
  const uint32_t quiet_nan = (u >> 16) | 0x40u;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

// out[i] = bf16(float(grad[i]) * table[bits(z[i])]); grad, z: contiguous bfloat16 of one shape; table: 65536 floats
torch::Tensor table_mul_bf16(torch::Tensor grad, torch::Tensor z, torch::Tensor table) {
  TORCH_CHECK(grad.scalar_type() == at::kBFloat16 && z.scalar_type() == at::kBFloat16, "bfloat16 tensors expected");
  TORCH_CHECK(grad.sizes() == z.sizes(), "grad and z shapes differ: ", grad.sizes(), " vs ", z.sizes());
  TORCH_CHECK(table.scalar_type() == at::kFloat && table.numel() == 65536 && table.is_contiguous(),
              "table: 65536 contiguous floats expected");
  auto g = grad.contiguous();
  auto zc = z.contiguous();
  auto out = torch::empty_like(zc);
  const uint16_t* gp = reinterpret_cast<const uint16_t*>(g.data_ptr());
  const uint16_t* zp = reinterpret_cast<const uint16_t*>(zc.data_ptr());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  const float* tp = table.data_ptr<float>();
  at::parallel_for(0, zc.numel(), 16384, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) op[i] = float_to_bf16(bf16_to_float(gp[i]) * tp[zp[i]]);
  });
  return out;
}

// out[b, j] = x[b, idx[j]] for 2- or 4-byte elements: four rows per index load, faster than torch.gather's
// broadcast-index gather (docs/speed.md)
template <typename T, typename I>
static inline void gather_row_block(const T* xp, T* op, const I* ip, int64_t rows, int64_t n, int64_t m) {
  if (rows == 4) {
    const T *r0 = xp, *r1 = r0 + n, *r2 = r1 + n, *r3 = r2 + n;
    T *o0 = op, *o1 = o0 + m, *o2 = o1 + m, *o3 = o2 + m;
    for (int64_t j = 0; j < m; ++j) {
      const I k = ip[j];
      o0[j] = r0[k]; o1[j] = r1[k]; o2[j] = r2[k]; o3[j] = r3[k];
    }
    return;
  }
  for (int64_t b = 0; b < rows; ++b)
    for (int64_t j = 0; j < m; ++j) op[b * m + j] = xp[b * n + ip[j]];
}

template <typename T, typename I>
static void take_columns_rows(const T* xp, T* op, const I* ip, int64_t B, int64_t n, int64_t m) {
  at::parallel_for(0, (B + 3) / 4, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q)
      gather_row_block(xp + q * 4 * n, op + q * 4 * m, ip, std::min<int64_t>(4, B - q * 4), n, m);
  });
}

template <typename I>
static void check_index(const torch::Tensor& idx, int64_t n, const char* what) {
  const I* ip = idx.data_ptr<I>();
  for (int64_t j = 0; j < idx.numel(); ++j)
    TORCH_CHECK(ip[j] >= 0 && ip[j] < n, what, ": index ", ip[j], " out of range for ", n, " columns");
}

template <typename I>
static void take_columns_typed(const torch::Tensor& x, const torch::Tensor& idx, torch::Tensor& out) {
  const int64_t B = x.size(0), n = x.size(1), m = idx.numel();
  const I* ip = idx.data_ptr<I>();
  if (x.element_size() == 2) {
    take_columns_rows(reinterpret_cast<const uint16_t*>(x.data_ptr()), reinterpret_cast<uint16_t*>(out.data_ptr()),
                      ip, B, n, m);
  } else if (x.element_size() == 4) {
    take_columns_rows(reinterpret_cast<const uint32_t*>(x.data_ptr()), reinterpret_cast<uint32_t*>(out.data_ptr()),
                      ip, B, n, m);
  } else {
    TORCH_CHECK(false, "take_columns: 2- or 4-byte elements expected, got ", x.element_size());
  }
}

// x: contiguous (B, n); idx: contiguous 1-D int32 or int64 in [0, n) -> (B, idx.numel())
torch::Tensor take_columns(torch::Tensor x, torch::Tensor idx) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "take_columns: a contiguous 2-D x expected, got sizes ", x.sizes());
  TORCH_CHECK((idx.scalar_type() == at::kInt || idx.scalar_type() == at::kLong) && idx.dim() == 1 &&
                  idx.is_contiguous() && idx.device().is_cpu(),
              "take_columns: a contiguous 1-D int32 or int64 CPU index expected");
  auto out = torch::empty({x.size(0), idx.numel()}, x.options());
  if (idx.scalar_type() == at::kInt) {
    check_index<int32_t>(idx, x.size(1), "take_columns");
    take_columns_typed<int32_t>(x, idx, out);
  } else {
    check_index<int64_t>(idx, x.size(1), "take_columns");
    take_columns_typed<int64_t>(x, idx, out);
  }
  return out;
}

// y = x[..., perm] for a permutation perm of x's last axis, inv its inverse: a C++ autograd function (no Python
// per call, which at the small sizes of the tiny sweeps cost more than the gather) whose backward is the same
// function with perm and inv swapped, so it is differentiable to any order.
struct PermuteColumns : public torch::autograd::Function<PermuteColumns> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, torch::Tensor x, torch::Tensor perm,
                               torch::Tensor inv) {
    ctx->save_for_backward({perm, inv});
    const int64_t n = x.size(-1);
    return take_columns(x.contiguous().view({-1, n}), perm).view(x.sizes());
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    auto saved = ctx->get_saved_variables();
    return {PermuteColumns::apply(grads[0], saved[1], saved[0]), torch::Tensor(), torch::Tensor()};
  }
};

torch::Tensor permute_columns(torch::Tensor x, torch::Tensor perm, torch::Tensor inv) {
  TORCH_CHECK(x.dim() >= 1 && perm.dim() == 1 && perm.numel() == x.size(-1) && inv.sizes() == perm.sizes() &&
                  inv.scalar_type() == perm.scalar_type(),
              "permute_columns: perm and inv must be permutations of x's last axis (", x.size(-1), " entries)");
  return PermuteColumns::apply(x, perm.contiguous(), inv.contiguous());
}

// out = r + h[:, perm] on contiguous (B, n) matrices of one dtype: float32, or bfloat16 summed in float32 and rounded
// once (ATen's bfloat16 add): the RP-Mixer's J_2 and its residual add in one pass
template <typename T, typename Add>
static void take_columns_add_rows(const T* hp, const T* rp, T* op, const int64_t* ip, int64_t B, int64_t n, Add add) {
  at::parallel_for(0, (B + 3) / 4, 1, [&](int64_t q0, int64_t q1) {
    std::vector<T> tmp(4 * n);  // four gathered rows (L1), then one vectorised add pass per row
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t b0 = q * 4, rows = std::min<int64_t>(4, B - b0);
      gather_row_block(hp + b0 * n, tmp.data(), ip, rows, n, n);
      for (int64_t t = 0; t < rows; ++t) {
        const T* __restrict g = tmp.data() + t * n;
        const T* __restrict r = rp + (b0 + t) * n;
        T* __restrict o = op + (b0 + t) * n;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) o[j] = add(r[j], g[j]);
      }
    }
  });
}

struct PermuteAdd : public torch::autograd::Function<PermuteAdd> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, torch::Tensor h, torch::Tensor perm,
                               torch::Tensor inv, torch::Tensor r) {
    ctx->save_for_backward({perm, inv});
    const int64_t n = perm.numel();
    auto hc = h.contiguous();
    auto rc = r.contiguous();
    check_index<int64_t>(perm, n, "permute_add");
    auto out = torch::empty_like(rc);
    const int64_t B = rc.numel() / n;
    const int64_t* ip = perm.data_ptr<int64_t>();
    if (rc.scalar_type() == at::kFloat) {
      take_columns_add_rows(hc.data_ptr<float>(), rc.data_ptr<float>(), out.data_ptr<float>(), ip, B, n,
                            [](float a, float b) { return a + b; });
    } else {
      take_columns_add_rows(reinterpret_cast<const uint16_t*>(hc.data_ptr()),
                            reinterpret_cast<const uint16_t*>(rc.data_ptr()),
                            reinterpret_cast<uint16_t*>(out.data_ptr()), ip, B, n,
                            [](uint16_t a, uint16_t b) { return float_to_bf16(bf16_to_float(a) + bf16_to_float(b)); });
    }
    return out;
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    auto saved = ctx->get_saved_variables();
    auto g = grads[0];
    const int64_t n = saved[0].numel();
    auto gh = PermuteColumns::apply(g.reshape({-1, n}), saved[1], saved[0]);
    return {gh, torch::Tensor(), torch::Tensor(), g};
  }
};

// r + h.view(-1, n)[:, perm] shaped like r (n = perm.numel(); h and r of one dtype, float32 or bfloat16)
torch::Tensor permute_add(torch::Tensor h, torch::Tensor perm, torch::Tensor inv, torch::Tensor r) {
  TORCH_CHECK(perm.dim() == 1 && perm.scalar_type() == at::kLong && inv.sizes() == perm.sizes() &&
                  inv.scalar_type() == at::kLong && perm.numel() > 0 && h.numel() == r.numel() &&
                  r.numel() % perm.numel() == 0,
              "permute_add: int64 permutations over whole rows of h and r expected (", perm.numel(), " entries, ",
              h.numel(), " and ", r.numel(), " elements)");
  TORCH_CHECK(h.scalar_type() == r.scalar_type() &&
                  (r.scalar_type() == at::kFloat || r.scalar_type() == at::kBFloat16),
              "permute_add: h and r must both be float32 or both bfloat16");
  return PermuteAdd::apply(h.reshape({-1, perm.numel()}), perm.contiguous(), inv.contiguous(), r);
}

// LayerNorm over the last axis of a contiguous bfloat16 x (rows of N), float32 weight and bias, float32 statistics:
// y = bf16((x - mean) * rstd * w + b), two passes over the row in float32 (mean, then the centred sum of squares).
static constexpr int64_t LN_MAX = 4096;

#if defined(__AVX512F__)
static inline __m512 load_bf16x16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
static inline void store_bf16x16(uint16_t* p, __m512 v) {  // float_to_bf16 on 16 lanes
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
  _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
}
#endif

static void ln_row_forward(const uint16_t* __restrict xr, uint16_t* __restrict yr, const float* __restrict w,
                           const float* __restrict b, float* __restrict buf, int64_t N, float eps, float* mean,
                           float* rstd) {
  const float inv_n = 1.f / static_cast<float>(N);
#if defined(__AVX512F__)
  if (N % 16 == 0) {
    __m512 s = _mm512_setzero_ps();
    for (int64_t j = 0; j < N; j += 16) {
      const __m512 v = load_bf16x16(xr + j);
      _mm512_storeu_ps(buf + j, v);
      s = _mm512_add_ps(s, v);
    }
    const float mu = _mm512_reduce_add_ps(s) * inv_n;
    const __m512 vmu = _mm512_set1_ps(mu);
    __m512 q = _mm512_setzero_ps();
    for (int64_t j = 0; j < N; j += 16) {
      const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(buf + j), vmu);
      q = _mm512_fmadd_ps(d, d, q);
    }
    const float rs = 1.f / std::sqrt(_mm512_reduce_add_ps(q) * inv_n + eps);
    const __m512 vrs = _mm512_set1_ps(rs);
    for (int64_t j = 0; j < N; j += 16) {
      const __m512 h = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(buf + j), vmu), vrs);
      store_bf16x16(yr + j, _mm512_fmadd_ps(h, _mm512_loadu_ps(w + j), _mm512_loadu_ps(b + j)));
    }
    *mean = mu;
    *rstd = rs;
    return;
  }
#endif
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < N; ++j) {
    const float v = bf16_to_float(xr[j]);
    buf[j] = v;
    s += v;
  }
  const float mu = s * inv_n;
  float q = 0.f;
#pragma omp simd reduction(+ : q)
  for (int64_t j = 0; j < N; ++j) {
    const float d = buf[j] - mu;
    q += d * d;
  }
  const float rs = 1.f / std::sqrt(q * inv_n + eps);
#pragma omp simd
  for (int64_t j = 0; j < N; ++j) yr[j] = float_to_bf16((buf[j] - mu) * rs * w[j] + b[j]);
  *mean = mu;
  *rstd = rs;
}

static void check_ln(const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() >= 1, "layer_norm_bf16: a bfloat16 x expected");
  const int64_t N = x.size(-1);
  TORCH_CHECK(N >= 1 && N <= LN_MAX, "layer_norm_bf16: rows of 1 to ", LN_MAX, " elements, got ", N);
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == N,
              "layer_norm_bf16: ", N, " contiguous float32 weights expected, got ", w.numel());
}

// With `inv` (a permutation of the P = inv.numel() entries of each example, P a multiple of N): the output is the
// permuted (x.numel() / P, P) matrix out[g, j] = LN(x)[g].flatten()[perm[j]], written as out[g, inv[p]] = LN(x)[g][p]
// (the RP-Mixer's LayerNorm and J_1 in one pass).
static const int64_t* check_permutation(const std::optional<torch::Tensor>& inv, int64_t N, int64_t numel) {
  if (!inv.has_value()) return nullptr;
  const auto& t = *inv;
  TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 1 && t.is_contiguous() && t.numel() > 0 &&
                  t.numel() % N == 0 && numel % t.numel() == 0,
              "layer_norm_bf16: the permutation must be a contiguous int64 vector over whole rows of each example (",
              N, " per row, ", numel, " in all), got ", t.numel());
  check_index<int64_t>(t, t.numel(), "layer_norm_bf16");
  return t.data_ptr<int64_t>();
}

std::vector<torch::Tensor> layer_norm_bf16_forward(torch::Tensor x, torch::Tensor w, torch::Tensor b, double eps,
                                                   std::optional<torch::Tensor> inv) {
  check_ln(x, w);
  TORCH_CHECK(b.scalar_type() == at::kFloat && b.is_contiguous() && b.numel() == w.numel(),
              "layer_norm_bf16: float32 bias of the weight's size expected");
  auto xc = x.contiguous();
  const int64_t N = xc.size(-1), R = xc.numel() / N;
  auto y = torch::empty_like(xc);
  auto mean = torch::empty({R}, xc.options().dtype(at::kFloat));
  auto rstd = torch::empty({R}, xc.options().dtype(at::kFloat));
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr());
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  const float *wp = w.data_ptr<float>(), *bp = b.data_ptr<float>();
  float *mp = mean.data_ptr<float>(), *rp = rstd.data_ptr<float>();
  const int64_t* ip = check_permutation(inv, N, xc.numel());
  if (ip == nullptr) {
    at::parallel_for(0, R, 32, [&](int64_t r0, int64_t r1) {
      std::vector<float> buf(N);
      for (int64_t r = r0; r < r1; ++r)
        ln_row_forward(xp + r * N, yp + r * N, wp, bp, buf.data(), N, static_cast<float>(eps), mp + r, rp + r);
    });
    return {y, mean, rstd};
  }
  const int64_t P = inv->numel(), K = P / N;
  at::parallel_for(0, R / K, 1, [&](int64_t g0, int64_t g1) {  // whole examples per thread: no shared lines
    std::vector<float> buf(N);
    std::vector<uint16_t> row(N);
    for (int64_t g = g0; g < g1; ++g) {
      uint16_t* out = yp + g * P;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t r = g * K + k;
        ln_row_forward(xp + r * N, row.data(), wp, bp, buf.data(), N, static_cast<float>(eps), mp + r, rp + r);
        const int64_t* pos = ip + k * N;
        for (int64_t c = 0; c < N; ++c) out[pos[c]] = row[c];
      }
    }
  });
  return {y.view({R / K, P}), mean, rstd};
}

// dx = rstd * (g*w - mean(g*w) - xhat * mean(g*w*xhat)); dw = sum_rows g*xhat, db = sum_rows g, accumulated in float32
// per thread (ATen 2.13 accumulates these two in bfloat16 for a bfloat16 x: 17% error at 8192 rows of 128).
// With `inv`: gy is the gradient of the permuted output of layer_norm_bf16_forward(..., inv), read through inv.
std::vector<torch::Tensor> layer_norm_bf16_backward(torch::Tensor gy, torch::Tensor x, torch::Tensor mean,
                                                    torch::Tensor rstd, torch::Tensor w,
                                                    std::optional<torch::Tensor> inv) {
  check_ln(x, w);
  TORCH_CHECK(gy.scalar_type() == at::kBFloat16 && gy.numel() == x.numel() && (inv.has_value() || gy.sizes() == x.sizes()),
              "layer_norm_bf16: gy must be bfloat16 of x's shape");
  const int64_t* ip = check_permutation(inv, x.size(-1), x.numel());
  const int64_t P = ip == nullptr ? 0 : inv->numel();
  auto xc = x.contiguous();
  auto gc = gy.contiguous();
  const int64_t N = xc.size(-1), R = xc.numel() / N;
  TORCH_CHECK(mean.numel() == R && rstd.numel() == R, "layer_norm_bf16: one mean and rstd per row expected");
  auto gx = torch::empty_like(xc);
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), R / 32));
  auto acc = torch::zeros({parts, 2, N}, w.options());
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr());
  const uint16_t* gp = reinterpret_cast<const uint16_t*>(gc.data_ptr());
  uint16_t* op = reinterpret_cast<uint16_t*>(gx.data_ptr());
  const float* wp = w.data_ptr<float>();
  auto mc = mean.contiguous();
  auto rc = rstd.contiguous();
  const float *mp = mc.data_ptr<float>(), *rp = rc.data_ptr<float>();
  float* ap = acc.data_ptr<float>();
  const int64_t chunk = (R + parts - 1) / parts;
  const float inv_n = 1.f / static_cast<float>(N);
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> xh_v(N), gw_v(N);
    std::vector<uint16_t> g_row(N);
    float* __restrict xh = xh_v.data();
    float* __restrict gw = gw_v.data();
    const float* __restrict wr = wp;
    for (int64_t p = p0; p < p1; ++p) {
      float* __restrict dw = ap + p * 2 * N;
      float* __restrict db = dw + N;
      for (int64_t r = p * chunk; r < std::min(R, (p + 1) * chunk); ++r) {
        const uint16_t* __restrict xr = xp + r * N;
        const uint16_t* __restrict gr = gp + r * N;
        if (ip != nullptr) {  // row k of example e: its gradient entries sit at inv[k*N + c] of the example's P
          const int64_t e = r / (P / N), k = r % (P / N);
          const uint16_t* src = gp + e * P;
          const int64_t* pos = ip + k * N;
          for (int64_t c = 0; c < N; ++c) g_row[c] = src[pos[c]];
          gr = g_row.data();
        }
        uint16_t* __restrict orow = op + r * N;
        const float mu = mp[r], rs = rp[r];
        float a = 0.f, c = 0.f;
#pragma omp simd reduction(+ : a, c)
        for (int64_t j = 0; j < N; ++j) {
          const float h = (bf16_to_float(xr[j]) - mu) * rs;
          const float g = bf16_to_float(gr[j]);
          const float u = g * wr[j];
          xh[j] = h;
          gw[j] = u;
          db[j] += g;
          dw[j] += g * h;
          a += u;
          c += u * h;
        }
        a *= inv_n;
        c *= inv_n;
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) orow[j] = float_to_bf16(rs * (gw[j] - a - xh[j] * c));
      }
    }
  });
  auto sums = acc.sum(0);
  return {gx, sums[0], sums[1]};
}
