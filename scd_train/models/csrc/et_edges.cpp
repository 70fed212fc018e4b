// Fused per-edge part of one equivariant-transformer layer on CPU (forward and backward).
//
// For edge e = (src j -> dst i), channels c of head h (F channels, H heads), with the distance filters
//   dk[e] = silu(pre_k[e] + bias[0:F])   [dv1 | dv2 | dv3][e] = silu(pre_v[e] + bias[F:4F])
// (pre_k [E, F] and pre_v [E, 3F] are the distance projections without their bias):
//   s_h     = sum_{c in h} q[i,c] k[j,c] dk[e,c]           attn_h = silu(s_h) cut[e]
//   x[i,c] += v1[j,c] dv1[e,c] attn_h
//   v[i,d,c] += w (v3[j,c] dv3[e,c] unit[e,d] + vec[j,d,c] v2[j,c] dv2[e,c])   w = cut[e] or 1
// where qkv[n] = [q | k | v1 | v2 | v3] (5F).
// Nothing per edge is kept between forward and backward: the backward recomputes it from the inputs (its first
// pass keeps each edge's attention per head for its second). Each output row is written by one thread, summing
// its edges in a fixed (CSR) order, so results do not depend on the number of threads.
// Gradients flow to qkv, vec, pre_k and pre_v (the bias's are their column sums); none to cut or unit.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <vector>

namespace {

template <typename T>
inline T sigmoid(T x) { return T(1) / (T(1) + std::exp(-x)); }

// act = silu(pre + bias) over n channels and, when dact is given, dact = its derivative
template <typename T>
inline void silu_rows(const T* __restrict pre, const T* __restrict bias, int64_t n, T* __restrict act,
                      T* __restrict dact) {
  using Vec = at::vec::Vectorized<T>;
  const Vec one(T(1));
  int64_t c = 0;
  for (; c + Vec::size() <= n; c += Vec::size()) {
    const Vec x = Vec::loadu(pre + c) + Vec::loadu(bias + c);
    const Vec sg = one / (one + x.neg().exp_u20());  // ATen's fast exp (as in its softmax): a few ulp
    (x * sg).store(act + c);
    if (dact != nullptr) (sg * (one + x * (one - sg))).store(dact + c);
  }
  for (; c < n; ++c) {
    const T x = pre[c] + bias[c], sg = sigmoid(x);
    act[c] = x * sg;
    if (dact != nullptr) dact[c] = sg * (T(1) + x * (T(1) - sg));
  }
}

struct Graph {
  const int64_t* src;
  const int64_t* dst;
  const int64_t* dst_ptr;  // CSR over dst: edges of atom i are dst_order[dst_ptr[i] .. dst_ptr[i+1]]
  const int64_t* dst_order;
  const int64_t* src_ptr;  // CSR over src
  const int64_t* src_order;
  int64_t n_atoms, f, heads;
  bool has_vec, vector_cutoff;
};

template <typename T>
struct Inputs {
  const T* qkv;
  const T* vec;  // null without vectors (first layer)
  const T* pre_k;
  const T* pre_v;
  const T* bias;
  const T* cut;
  const T* unit;

  // the 4F filters of edge e ([dk | dv1 | dv2 | dv3]) and, when dact is given, their derivatives
  void filters(int64_t e, int64_t f, T* act, T* dact) const {
    silu_rows(pre_k + e * f, bias, f, act, dact);
    silu_rows(pre_v + e * 3 * f, bias + f, 3 * f, act + f, dact == nullptr ? nullptr : dact + f);
  }
};

// attention of edge e for all heads: attn[h] and dattn/ds[h] (both times cut)
template <typename T>
inline void attention(const Graph& g, const T* __restrict q, const T* __restrict k, const T* __restrict dk,
                      T cut, T* __restrict attn, T* __restrict dattn) {
  const int64_t dh = g.f / g.heads;
  for (int64_t h = 0; h < g.heads; ++h) {
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t c = h * dh; c < (h + 1) * dh; ++c) s += q[c] * k[c] * dk[c];
    const T sg = sigmoid(s);
    attn[h] = s * sg * cut;
    dattn[h] = sg * (T(1) + s * (T(1) - sg)) * cut;
  }
}

template <typename T>
void forward_impl(const Graph& g, const Inputs<T>& in, T* out_x, T* out_v) {
  const int64_t f = g.f, dh = f / g.heads;
  at::parallel_for(0, g.n_atoms, 16, [&](int64_t begin, int64_t end) {
    std::vector<T> attn(g.heads), dattn(g.heads), act(4 * f);
    const T* __restrict dk = act.data();
    const T* __restrict a1 = dk + f;
    const T* __restrict a2 = dk + 2 * f;
    const T* __restrict a3 = dk + 3 * f;
    for (int64_t i = begin; i < end; ++i) {
      T* __restrict ox = out_x + i * f;
      T* __restrict ov = out_v + i * 3 * f;
      std::fill(ox, ox + f, T(0));
      std::fill(ov, ov + 3 * f, T(0));
      const T* __restrict q = in.qkv + i * 5 * f;
      for (int64_t p = g.dst_ptr[i]; p < g.dst_ptr[i + 1]; ++p) {
        const int64_t e = g.dst_order[p], j = g.src[e];
        const T* __restrict k = in.qkv + j * 5 * f + f;
        const T* __restrict v1 = k + f;
        const T* __restrict v2 = k + 2 * f;
        const T* __restrict v3 = k + 3 * f;
        in.filters(e, f, act.data(), nullptr);
        attention(g, q, k, dk, in.cut[e], attn.data(), dattn.data());
        for (int64_t h = 0; h < g.heads; ++h) {
          const T at = attn[h];
#pragma omp simd
          for (int64_t c = h * dh; c < (h + 1) * dh; ++c) ox[c] += v1[c] * a1[c] * at;
        }
        const T w = g.vector_cutoff ? in.cut[e] : T(1);
        for (int64_t d = 0; d < 3; ++d) {
          const T u = in.unit[e * 3 + d];
          T* __restrict ovd = ov + d * f;
          if (g.has_vec) {
            const T* __restrict vj = in.vec + (j * 3 + d) * f;
#pragma omp simd
            for (int64_t c = 0; c < f; ++c) ovd[c] += w * (v3[c] * a3[c] * u + vj[c] * (v2[c] * a2[c]));
          } else {
#pragma omp simd
            for (int64_t c = 0; c < f; ++c) ovd[c] += w * (v3[c] * a3[c] * u);
          }
        }
      }
    }
  });
}

// pass 1, by dst: grad of q (summed into the dst row) and of pre_k, pre_v (one row per edge); keeps each edge's
// attention and the gradient of its score per head (edge_attn, edge_gs [E, H]) for pass 2
template <typename T>
void backward_dst(const Graph& g, const Inputs<T>& in, const T* gx, const T* gv, T* g_qkv, T* g_pre_k,
                  T* g_pre_v, T* edge_attn, T* edge_gs) {
  const int64_t f = g.f, dh = f / g.heads;
  at::parallel_for(0, g.n_atoms, 16, [&](int64_t begin, int64_t end) {
    std::vector<T> dattn(g.heads), act(4 * f), dact(4 * f);
    const T* __restrict dk = act.data();
    const T* __restrict a1 = dk + f;
    const T* __restrict ddk = dact.data();
    const T* __restrict da1 = ddk + f;
    const T* __restrict da2 = ddk + 2 * f;
    const T* __restrict da3 = ddk + 3 * f;
    for (int64_t i = begin; i < end; ++i) {
      const T* __restrict q = in.qkv + i * 5 * f;
      const T* __restrict gxi = gx + i * f;
      const T* __restrict gvi = gv + i * 3 * f;
      T* __restrict gq = g_qkv + i * 5 * f;
      std::fill(gq, gq + f, T(0));
      for (int64_t p = g.dst_ptr[i]; p < g.dst_ptr[i + 1]; ++p) {
        const int64_t e = g.dst_order[p], j = g.src[e];
        const T* __restrict k = in.qkv + j * 5 * f + f;
        const T* __restrict v1 = k + f;
        const T* __restrict v2 = k + 2 * f;
        const T* __restrict v3 = k + 3 * f;
        T* __restrict gk = g_pre_k + e * f;
        T* __restrict gp = g_pre_v + e * 3 * f;
        T* __restrict attn = edge_attn + e * g.heads;
        in.filters(e, f, act.data(), dact.data());
        attention(g, q, k, dk, in.cut[e], attn, dattn.data());
        for (int64_t h = 0; h < g.heads; ++h) {
          T ga = 0;
#pragma omp simd reduction(+ : ga)
          for (int64_t c = h * dh; c < (h + 1) * dh; ++c) ga += gxi[c] * v1[c] * a1[c];
          const T gs = ga * dattn[h], at = attn[h];
          edge_gs[e * g.heads + h] = gs;
#pragma omp simd
          for (int64_t c = h * dh; c < (h + 1) * dh; ++c) {
            gq[c] += gs * k[c] * dk[c];
            gk[c] = gs * q[c] * k[c] * ddk[c];
            gp[c] = gxi[c] * v1[c] * at * da1[c];
          }
        }
        const T w = g.vector_cutoff ? in.cut[e] : T(1);
        const T* __restrict u = in.unit + e * 3;
#pragma omp simd
        for (int64_t c = 0; c < f; ++c) {
          gp[2 * f + c] = (gvi[c] * u[0] + gvi[f + c] * u[1] + gvi[2 * f + c] * u[2]) * w * v3[c] * da3[c];
        }
        if (g.has_vec) {
          const T* __restrict vj = in.vec + j * 3 * f;
#pragma omp simd
          for (int64_t c = 0; c < f; ++c) {
            gp[f + c] =
                (gvi[c] * vj[c] + gvi[f + c] * vj[f + c] + gvi[2 * f + c] * vj[2 * f + c]) * w * v2[c] * da2[c];
          }
        } else {
          std::fill(gp + f, gp + 2 * f, T(0));
        }
      }
    }
  });
}

// pass 2, by src: grads of k, v1, v2, v3 and vec (summed into the src row)
template <typename T>
void backward_src(const Graph& g, const Inputs<T>& in, const T* gx, const T* gv, const T* edge_attn,
                  const T* edge_gs, T* g_qkv, T* g_vec) {
  const int64_t f = g.f, dh = f / g.heads;
  at::parallel_for(0, g.n_atoms, 16, [&](int64_t begin, int64_t end) {
    std::vector<T> act(4 * f);
    const T* __restrict dk = act.data();
    const T* __restrict a1 = dk + f;
    const T* __restrict a2 = dk + 2 * f;
    const T* __restrict a3 = dk + 3 * f;
    for (int64_t j = begin; j < end; ++j) {
      const T* __restrict v2 = in.qkv + j * 5 * f + 3 * f;
      const T* __restrict vj = g.has_vec ? in.vec + j * 3 * f : nullptr;
      T* __restrict gk = g_qkv + j * 5 * f + f;
      T* __restrict gv1 = gk + f;
      T* __restrict gv2 = gk + 2 * f;
      T* __restrict gv3 = gk + 3 * f;
      T* __restrict gvec = g.has_vec ? g_vec + j * 3 * f : nullptr;
      std::fill(gk, gk + 4 * f, T(0));
      if (g.has_vec) std::fill(gvec, gvec + 3 * f, T(0));
      for (int64_t p = g.src_ptr[j]; p < g.src_ptr[j + 1]; ++p) {
        const int64_t e = g.src_order[p], i = g.dst[e];
        const T* __restrict q = in.qkv + i * 5 * f;
        const T* __restrict gxi = gx + i * f;
        const T* __restrict gvi = gv + i * 3 * f;
        in.filters(e, f, act.data(), nullptr);
        for (int64_t h = 0; h < g.heads; ++h) {
          const T gs = edge_gs[e * g.heads + h], at = edge_attn[e * g.heads + h];
#pragma omp simd
          for (int64_t c = h * dh; c < (h + 1) * dh; ++c) {
            gk[c] += gs * q[c] * dk[c];
            gv1[c] += gxi[c] * a1[c] * at;
          }
        }
        const T w = g.vector_cutoff ? in.cut[e] : T(1);
        const T* __restrict u = in.unit + e * 3;
#pragma omp simd
        for (int64_t c = 0; c < f; ++c) {
          gv3[c] += (gvi[c] * u[0] + gvi[f + c] * u[1] + gvi[2 * f + c] * u[2]) * w * a3[c];
        }
        if (g.has_vec) {
#pragma omp simd
          for (int64_t c = 0; c < f; ++c) {
            const T m0 = gvi[c] * w, m1 = gvi[f + c] * w, m2 = gvi[2 * f + c] * w, s1 = v2[c] * a2[c];
            gv2[c] += (m0 * vj[c] + m1 * vj[f + c] + m2 * vj[2 * f + c]) * a2[c];
            gvec[c] += m0 * s1;
            gvec[f + c] += m1 * s1;
            gvec[2 * f + c] += m2 * s1;
          }
        }
      }
    }
  });
}

Graph make_graph(const torch::Tensor& edge_index, const torch::Tensor& dst_ptr, const torch::Tensor& dst_order,
                 const torch::Tensor& src_ptr, const torch::Tensor& src_order, const torch::Tensor& qkv,
                 int64_t heads, bool has_vec, bool vector_cutoff) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) % 5 == 0, "qkv must be [N, 5F]");
  const int64_t f = qkv.size(1) / 5;
  TORCH_CHECK(heads > 0 && f % heads == 0, "F must be divisible by heads");
  for (const auto* t : {&edge_index, &dst_ptr, &dst_order, &src_ptr, &src_order}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == torch::kInt64 && t->is_contiguous(),
                "indices must be contiguous int64 CPU tensors");
  }
  TORCH_CHECK(edge_index.dim() == 2 && edge_index.size(0) == 2, "edge_index must be [2, E]");
  const int64_t n = qkv.size(0), e = edge_index.size(1);
  TORCH_CHECK(dst_ptr.numel() == n + 1 && src_ptr.numel() == n + 1, "CSR rows != atoms + 1");
  TORCH_CHECK(dst_order.numel() == e && src_order.numel() == e && dst_ptr.data_ptr<int64_t>()[n] == e &&
                  src_ptr.data_ptr<int64_t>()[n] == e,
              "CSR does not cover the edges");
  return Graph{edge_index.data_ptr<int64_t>(), edge_index.data_ptr<int64_t>() + e, dst_ptr.data_ptr<int64_t>(),
               dst_order.data_ptr<int64_t>(), src_ptr.data_ptr<int64_t>(), src_order.data_ptr<int64_t>(),
               n, f, heads, has_vec, vector_cutoff};
}

template <typename T>
Inputs<T> make_inputs(const Graph& g, const torch::Tensor& qkv, const torch::Tensor& vec,
                      const torch::Tensor& pre_k, const torch::Tensor& pre_v, const torch::Tensor& bias,
                      const torch::Tensor& cut, const torch::Tensor& unit, int64_t n_edges) {
  const int64_t n = g.n_atoms, f = g.f;
  for (const auto* t : {&qkv, &vec, &pre_k, &pre_v, &bias, &cut, &unit}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == qkv.scalar_type(),
                "inputs must be contiguous CPU tensors of one floating dtype");
  }
  TORCH_CHECK(!g.has_vec || (vec.dim() == 3 && vec.size(0) == n && vec.size(1) == 3 && vec.size(2) == f),
              "vec must be [N, 3, F]");
  TORCH_CHECK(pre_k.dim() == 2 && pre_k.size(0) == n_edges && pre_k.size(1) == f, "pre_k must be [E, F]");
  TORCH_CHECK(pre_v.dim() == 2 && pre_v.size(0) == n_edges && pre_v.size(1) == 3 * f, "pre_v must be [E, 3F]");
  TORCH_CHECK(bias.numel() == 4 * f, "bias must be [4F]");
  TORCH_CHECK(cut.numel() == n_edges && unit.dim() == 2 && unit.size(0) == n_edges && unit.size(1) == 3,
              "cut must be [E] and unit [E, 3]");
  return Inputs<T>{qkv.data_ptr<T>(), g.has_vec ? vec.data_ptr<T>() : nullptr, pre_k.data_ptr<T>(),
                   pre_v.data_ptr<T>(), bias.data_ptr<T>(), cut.data_ptr<T>(), unit.data_ptr<T>()};
}

std::vector<torch::Tensor> et_edges_forward(torch::Tensor qkv, torch::Tensor vec, torch::Tensor pre_k,
                                            torch::Tensor pre_v, torch::Tensor bias, torch::Tensor cut,
                                            torch::Tensor unit, torch::Tensor edge_index, torch::Tensor dst_ptr,
                                            torch::Tensor dst_order, torch::Tensor src_ptr,
                                            torch::Tensor src_order, int64_t heads, bool has_vec,
                                            bool vector_cutoff) {
  const Graph g = make_graph(edge_index, dst_ptr, dst_order, src_ptr, src_order, qkv, heads, has_vec,
                             vector_cutoff);
  auto out_x = torch::empty({g.n_atoms, g.f}, qkv.options());
  auto out_v = torch::empty({g.n_atoms, 3, g.f}, qkv.options());
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "et_edges_forward", [&] {
    const auto in = make_inputs<scalar_t>(g, qkv, vec, pre_k, pre_v, bias, cut, unit, edge_index.size(1));
    forward_impl<scalar_t>(g, in, out_x.data_ptr<scalar_t>(), out_v.data_ptr<scalar_t>());
  });
  return {out_x, out_v};
}

std::vector<torch::Tensor> et_edges_backward(torch::Tensor gx, torch::Tensor gv, torch::Tensor qkv,
                                             torch::Tensor vec, torch::Tensor pre_k, torch::Tensor pre_v,
                                             torch::Tensor bias, torch::Tensor cut, torch::Tensor unit,
                                             torch::Tensor edge_index, torch::Tensor dst_ptr,
                                             torch::Tensor dst_order, torch::Tensor src_ptr,
                                             torch::Tensor src_order, int64_t heads, bool has_vec,
                                             bool vector_cutoff) {
  const Graph g = make_graph(edge_index, dst_ptr, dst_order, src_ptr, src_order, qkv, heads, has_vec,
                             vector_cutoff);
  TORCH_CHECK(gx.is_contiguous() && gv.is_contiguous() && gx.scalar_type() == qkv.scalar_type() &&
                  gv.scalar_type() == qkv.scalar_type() && gx.numel() == g.n_atoms * g.f &&
                  gv.numel() == g.n_atoms * 3 * g.f,
              "output gradients must be contiguous [N, F] and [N, 3, F]");
  const int64_t n_edges = edge_index.size(1);
  auto g_qkv = torch::empty_like(qkv);
  auto g_vec = has_vec ? torch::empty_like(vec) : torch::empty({0}, qkv.options());
  auto g_pre_k = torch::empty_like(pre_k);
  auto g_pre_v = torch::empty_like(pre_v);
  auto edge_attn = torch::empty({n_edges, heads}, qkv.options());  // pass 1 -> pass 2
  auto edge_gs = torch::empty({n_edges, heads}, qkv.options());
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "et_edges_backward", [&] {
    const auto in = make_inputs<scalar_t>(g, qkv, vec, pre_k, pre_v, bias, cut, unit, n_edges);
    backward_dst<scalar_t>(g, in, gx.data_ptr<scalar_t>(), gv.data_ptr<scalar_t>(), g_qkv.data_ptr<scalar_t>(),
                           g_pre_k.data_ptr<scalar_t>(), g_pre_v.data_ptr<scalar_t>(),
                           edge_attn.data_ptr<scalar_t>(), edge_gs.data_ptr<scalar_t>());
    backward_src<scalar_t>(g, in, gx.data_ptr<scalar_t>(), gv.data_ptr<scalar_t>(), edge_attn.data_ptr<scalar_t>(),
                           edge_gs.data_ptr<scalar_t>(), g_qkv.data_ptr<scalar_t>(),
                           has_vec ? g_vec.data_ptr<scalar_t>() : nullptr);
  });
  return {g_qkv, g_vec, g_pre_k, g_pre_v};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &et_edges_forward, "fused ET edge messages (forward)");
  m.def("backward", &et_edges_backward, "fused ET edge messages (backward)");
}
