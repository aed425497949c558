// Fused batch norm + residual + activation: statistics, apply, and the two backward kernels, for
// (N, C, S) views in NCS layout (per (n, c) a contiguous run of S) or channels-last (rows of C).
// All arrays of one call share the layout, so one flat offset addresses an element in each.
// Contract: dlkernels/batchnorm/op.py.
#include "conv_common.h"

#include <cmath>
#include <cstring>
#include <type_traits>

namespace dlk {
namespace {

enum class Act { None, Relu, Silu };

Act parse_act(const std::string& a) {
  if (a.empty() || a == "none") return Act::None;
  if (a == "relu") return Act::Relu;
  if (a == "silu") return Act::Silu;
  throw std::invalid_argument("dlkernels._C: activation must be '', 'relu' or 'silu', got '" + a + "'");
}

struct Bn3 {
  int64_t N, C, S;
  bool cl;
};

// Runs f(std::integral_constant<Act, A>, std::bool_constant<RES>) for the runtime act / residual,
// so that each combination compiles to its own branch-free inner loop.
template <class F>
void dispatch_act(Act act, bool has_res, F&& f) {
  auto with_res = [&](auto a) {
    if (has_res)
      f(a, std::true_type{});
    else
      f(a, std::false_type{});
  };
  switch (act) {
    case Act::None: return with_res(std::integral_constant<Act, Act::None>{});
    case Act::Relu: return with_res(std::integral_constant<Act, Act::Relu>{});
    case Act::Silu: return with_res(std::integral_constant<Act, Act::Silu>{});
  }
}

// exp that vectorizes inside the kernels' simd loops (a libm call does not): Cephes' expf
// reduction and polynomial, ~1 ulp. Branch- and select-free on purpose (GCC keeps compares that
// may trap as branches, which stops vectorization): the input is clamped to the finite range, so
// exp(+-large) saturates at ~3.4e38 / ~1.2e-38 instead of inf / 0; NaN propagates. double keeps
// std::exp.
#define DLK_INLINE inline __attribute__((always_inline))

DLK_INLINE float vexp(float x) {
  const float xc = std::min(std::max(x, -87.3365447504f), 88.3762626647949f);
  constexpr float round_magic = 12582912.0f;  // 1.5 * 2^23: adding and subtracting rounds to an integer
  const float t = xc * 1.44269504088896341f + round_magic;
  const float fx = t - round_magic;
  const float r = xc - fx * 0.693359375f + fx * 2.12194440e-4f;
  const float z = r * r;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * z + r + 1.0f;
  int32_t tb, mb;  // t's low mantissa bits hold the integer fx: 2^fx is built without a float->int conversion
  std::memcpy(&tb, &t, sizeof tb);
  std::memcpy(&mb, &round_magic, sizeof mb);
  const int32_t bits = (tb - mb + 127) << 23;
  float p;
  std::memcpy(&p, &bits, sizeof p);
  return y * p;
}
DLK_INLINE double vexp(double x) { return std::exp(x); }

template <class T>
DLK_INLINE T sigmoid(T z) { return T(1) / (T(1) + vexp(-z)); }

template <Act A, class T>
DLK_INLINE T activate(T z) {
  if constexpr (A == Act::Relu) return z < T(0) ? T(0) : z;  // keeps NaN, as torch.relu
  else if constexpr (A == Act::Silu) return z * sigmoid(z);
  else return z;
}

// grad of act at z = x*scale + shift + residual; relu masks with the saved output y as PyTorch's
// threshold_backward does (y <= 0 -> 0, so a NaN output passes its gradient through).
template <Act A, class T>
DLK_INLINE T act_grad(T gy, T y, T z) {
  if constexpr (A == Act::Relu) return y <= T(0) ? T(0) : gy;
  else if constexpr (A == Act::Silu) {
    const T s = sigmoid(z);
    return gy * s * (T(1) + z * (T(1) - s));
  } else return gy;
}

// Per-channel sums of two per-element values: f(i, c, a, b) sets a and b for the element at flat
// offset i in channel c. Short runs are summed in T (vectorized), runs are accumulated per thread in
// double, threads merged at the end in a fixed order: accurate for large N*S and deterministic.
template <class T, class F>
void channel_sums2(const Bn3& d, F f, double* sum_a, double* sum_b) {
  constexpr int64_t RUN = 2048;  // elements (NCS) or rows (channels-last) summed in T at a time
  ThreadPartials<double> part(2 * d.C);
  if (!d.cl) {
    const int64_t chunks = ceil_div(d.S, RUN), tasks = d.N * d.C * chunks;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t nc = t / chunks, k = t % chunks, c = nc % d.C;
      const int64_t base = nc * d.S, s0 = k * RUN, s1 = std::min(d.S, s0 + RUN);
      // Lane-wise partial sums (independent adds vectorize without reassociating a reduction).
      constexpr int BL = 64;
      T pa[BL] = {}, pb[BL] = {};
      int64_t s = s0;
      for (; s + BL <= s1; s += BL)
#pragma omp simd
        for (int k = 0; k < BL; ++k) {
          T a, b;
          f(base + s + k, c, a, b);
          pa[k] += a;
          pb[k] += b;
        }
      for (int k = 0; s < s1; ++s, ++k) {
        T a, b;
        f(base + s, c, a, b);
        pa[k] += a;
        pb[k] += b;
      }
      T sa = 0, sb = 0;
      for (int k = 0; k < BL; ++k) {
        sa += pa[k];
        sb += pb[k];
      }
      double* acc = part.mine();
      acc[c] += sa;
      acc[d.C + c] += sb;
    }
  } else {
    const int64_t rows = d.N * d.S, rb = std::max<int64_t>(1, std::min<int64_t>(RUN, 65536 / d.C + 1));
    const int64_t blocks = ceil_div(rows, rb);
#pragma omp parallel
    {
      std::vector<T> ra(d.C), rbuf(d.C);
      double* acc = part.mine();
#pragma omp for schedule(static)
      for (int64_t blk = 0; blk < blocks; ++blk) {
        std::fill(ra.begin(), ra.end(), T(0));
        std::fill(rbuf.begin(), rbuf.end(), T(0));
        T* pa = ra.data();
        T* pb = rbuf.data();
        for (int64_t r = blk * rb; r < std::min(rows, (blk + 1) * rb); ++r) {
#pragma omp simd
          for (int64_t c = 0; c < d.C; ++c) {
            T a, b;
            f(r * d.C + c, c, a, b);
            pa[c] += a;
            pb[c] += b;
          }
        }
        for (int64_t c = 0; c < d.C; ++c) {
          acc[c] += pa[c];
          acc[d.C + c] += pb[c];
        }
      }
    }
  }
  for (int64_t c = 0; c < d.C; ++c) {
    sum_a[c] = part.sum(c);
    sum_b[c] = part.sum(d.C + c);
  }
}

// Runs f(i, c) for every element (flat offset i, channel c), vectorized along the contiguous axis.
template <class F>
void channel_map(const Bn3& d, F f) {
  if (!d.cl) {
#pragma omp parallel for schedule(static)
    for (int64_t nc = 0; nc < d.N * d.C; ++nc) {
      const int64_t c = nc % d.C, base = nc * d.S;
#pragma omp simd
      for (int64_t s = 0; s < d.S; ++s) f(base + s, c);
    }
  } else {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < d.N * d.S; ++r) {
#pragma omp simd
      for (int64_t c = 0; c < d.C; ++c) f(r * d.C + c, c);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// argument checks
// ---------------------------------------------------------------------------------------------
Bn3 dims_of(const py::array& x3, bool cl) {
  require(x3.ndim() == 3, "batch norm: 3-D (N, C, S) views expected");
  return {x3.shape(0), x3.shape(1), x3.shape(2), cl};
}

template <class T>
const T* in3(const py::array& a, const char* name, const Bn3& d) {
  check_dense<T>(a, name, {d.N, d.C, d.S}, strides3(d.C, d.S, d.cl), false);
  return cptr<T>(a);
}
template <class T>
const T* in3_opt(const py::object& a, const char* name, const Bn3& d) {
  return a.is_none() ? nullptr : in3<T>(a.cast<py::array>(), name, d);
}
template <class T>
T* out3(py::array& a, const char* name, const Bn3& d) {
  check_dense<T>(a, name, {d.N, d.C, d.S}, strides3(d.C, d.S, d.cl), true);
  return mptr<T>(a);
}
template <class T>
const T* vec(const py::array& a, const char* name, const Bn3& d) {
  check_dense<T>(a, name, {d.C}, {1}, false);
  return cptr<T>(a);
}
template <class T>
T* out_vec(py::array& a, const char* name, const Bn3& d) {
  check_dense<T>(a, name, {d.C}, {1}, true);
  return mptr<T>(a);
}

// ---------------------------------------------------------------------------------------------
// kernels
// ---------------------------------------------------------------------------------------------
void py_stats(const py::array& x3, py::array& mean, py::array& var, bool cl) {
  const Bn3 d = dims_of(x3, cl);
  dispatch_float(x3, "bn_stats", [&](auto tag) {
    using T = decltype(tag);
    const T* x = in3<T>(x3, "x3", d);
    T* mo = out_vec<T>(mean, "mean", d);
    T* vo = out_vec<T>(var, "var", d);
    py::gil_scoped_release nogil;
    // Sums of x - K[c] with K[c] a sample of channel c: no cancellation for a large mean with a
    // small spread, which E[x^2] - E[x]^2 on raw values would suffer.
    std::vector<T> shift(d.C, T(0));
    if (d.N * d.S > 0)
      for (int64_t c = 0; c < d.C; ++c) shift[c] = x[d.cl ? c : c * d.S];
    const T* K = shift.data();
    std::vector<double> sa(d.C), sb(d.C);
    channel_sums2<T>(d, [=](int64_t i, int64_t c, T& a, T& b) {
      a = x[i] - K[c];
      b = a * a;
    }, sa.data(), sb.data());
    const double cnt = static_cast<double>(d.N * d.S);
    for (int64_t c = 0; c < d.C; ++c) {
      const double m1 = sa[c] / cnt;
      mo[c] = static_cast<T>(K[c] + m1);
      vo[c] = static_cast<T>(std::max(0.0, sb[c] / cnt - m1 * m1));
    }
  });
}

void py_apply(const py::array& x3, const py::object& res3, const py::array& scale, const py::array& shift,
              const std::string& activation, py::array& y3, bool cl) {
  const Bn3 d = dims_of(x3, cl);
  const Act act = parse_act(activation);
  dispatch_float(x3, "bn_apply", [&](auto tag) {
    using T = decltype(tag);
    const T* x = in3<T>(x3, "x3", d);
    const T* r = in3_opt<T>(res3, "residual3", d);
    const T* sc = vec<T>(scale, "scale", d);
    const T* sh = vec<T>(shift, "shift", d);
    T* y = out3<T>(y3, "y3", d);
    py::gil_scoped_release nogil;
    dispatch_act(act, r != nullptr, [&](auto A, auto R) {
      constexpr Act AV = decltype(A)::value;
      constexpr bool RV = decltype(R)::value;
      channel_map(d, [=](int64_t i, int64_t c) {
        T z = x[i] * sc[c] + sh[c];
        if constexpr (RV) z += r[i];
        y[i] = activate<AV>(z);
      });
    });
  });
}

// The per-element pieces both backward kernels share.
template <class T>
struct BwdInputs {
  const T *gy, *y, *x, *r, *mean, *invstd, *scale, *shift;
};

template <class T>
BwdInputs<T> bwd_inputs(const py::array& gy3, const py::object& y3, const py::array& x3, const py::object& res3,
                        const py::array& mean, const py::array& invstd, const py::array& scale,
                        const py::array& shift, Act act, const Bn3& d) {
  BwdInputs<T> b{in3<T>(gy3, "grad_y3", d), in3_opt<T>(y3, "y3", d),  in3<T>(x3, "x3", d),
                 in3_opt<T>(res3, "residual3", d), vec<T>(mean, "mean", d), vec<T>(invstd, "invstd", d),
                 vec<T>(scale, "scale", d),  vec<T>(shift, "shift", d)};
  require(act != Act::Relu || b.y, "bn backward: relu needs y3");
  return b;
}

template <Act A, bool RES, class T>
DLK_INLINE T dz_at(const BwdInputs<T>& b, int64_t i, int64_t c) {
  T z = 0;
  if constexpr (A == Act::Silu) {
    z = b.x[i] * b.scale[c] + b.shift[c];
    if constexpr (RES) z += b.r[i];
  }
  return act_grad<A>(b.gy[i], A == Act::Relu ? b.y[i] : T(0), z);
}

void py_bwd_reduce(const py::array& gy3, const py::object& y3, const py::array& x3, const py::object& res3,
                   const py::array& mean, const py::array& invstd, const py::array& scale, const py::array& shift,
                   const std::string& activation, py::array& sum_dz, py::array& sum_dz_xhat, bool cl) {
  const Bn3 d = dims_of(x3, cl);
  const Act act = parse_act(activation);
  dispatch_float(x3, "bn_backward_reduce", [&](auto tag) {
    using T = decltype(tag);
    const BwdInputs<T> b = bwd_inputs<T>(gy3, y3, x3, res3, mean, invstd, scale, shift, act, d);
    T* o_dz = out_vec<T>(sum_dz, "sum_dz", d);
    T* o_dzx = out_vec<T>(sum_dz_xhat, "sum_dz_xhat", d);
    py::gil_scoped_release nogil;
    std::vector<double> sa(d.C), sb(d.C);
    dispatch_act(act, b.r != nullptr, [&](auto A, auto R) {
      constexpr Act AV = decltype(A)::value;
      constexpr bool RV = decltype(R)::value;
      channel_sums2<T>(d, [=](int64_t i, int64_t c, T& a, T& s) {
        a = dz_at<AV, RV>(b, i, c);
        s = a * (b.x[i] - b.mean[c]);
      }, sa.data(), sb.data());
    });
    for (int64_t c = 0; c < d.C; ++c) {
      o_dz[c] = static_cast<T>(sa[c]);
      o_dzx[c] = static_cast<T>(sb[c] * b.invstd[c]);
    }
  });
}

void py_bwd_apply(const py::array& gy3, const py::object& y3, const py::array& x3, const py::object& res3,
                  const py::array& mean, const py::array& invstd, const py::array& scale, const py::array& shift,
                  const py::array& c_dz, const py::array& c_xhat, const std::string& activation, py::array& gx3,
                  const py::object& gr3, bool cl) {
  const Bn3 d = dims_of(x3, cl);
  const Act act = parse_act(activation);
  dispatch_float(x3, "bn_backward_apply", [&](auto tag) {
    using T = decltype(tag);
    const BwdInputs<T> b = bwd_inputs<T>(gy3, y3, x3, res3, mean, invstd, scale, shift, act, d);
    const T* cdz = vec<T>(c_dz, "c_dz", d);
    const T* cxh = vec<T>(c_xhat, "c_xhat", d);
    T* gx = out3<T>(gx3, "grad_x3", d);
    T* gr = nullptr;
    py::array gra;
    if (!gr3.is_none()) {
      gra = gr3.cast<py::array>();
      gr = out3<T>(gra, "grad_residual3", d);
    }
    py::gil_scoped_release nogil;
    std::vector<T> coef(d.C);  // invstd * c_xhat: xhat * c_xhat = (x - mean) * coef
    for (int64_t c = 0; c < d.C; ++c) coef[c] = b.invstd[c] * cxh[c];
    const T* cx = coef.data();
    dispatch_act(act, b.r != nullptr, [&](auto A, auto R) {
      constexpr Act AV = decltype(A)::value;
      constexpr bool RV = decltype(R)::value;
      if (gr)
        channel_map(d, [=](int64_t i, int64_t c) {
          const T dz = dz_at<AV, RV>(b, i, c);
          gx[i] = b.scale[c] * (dz - cdz[c] - (b.x[i] - b.mean[c]) * cx[c]);
          gr[i] = dz;
        });
      else
        channel_map(d, [=](int64_t i, int64_t c) {
          const T dz = dz_at<AV, RV>(b, i, c);
          gx[i] = b.scale[c] * (dz - cdz[c] - (b.x[i] - b.mean[c]) * cx[c]);
        });
    });
  });
}

}  // namespace

void init_batchnorm(py::module_& m) {
  using namespace pybind11::literals;
  m.def("bn_stats", &py_stats, "x3"_a, "mean"_a, "var"_a, "channels_last"_a,
        "per-channel mean and biased variance of x3 (N, C, S), written into mean and var");
  m.def("bn_apply", &py_apply, "x3"_a, "residual3"_a.none(true), "scale"_a, "shift"_a, "activation"_a, "y3"_a,
        "channels_last"_a, "y3 = act(x3 * scale[c] + shift[c] + residual3)");
  m.def("bn_backward_reduce", &py_bwd_reduce, "grad_y3"_a, "y3"_a.none(true), "x3"_a, "residual3"_a.none(true),
        "mean"_a, "invstd"_a, "scale"_a, "shift"_a, "activation"_a, "sum_dz"_a, "sum_dz_xhat"_a, "channels_last"_a,
        "per-channel sums of dz and dz * xhat");
  m.def("bn_backward_apply", &py_bwd_apply, "grad_y3"_a, "y3"_a.none(true), "x3"_a, "residual3"_a.none(true),
        "mean"_a, "invstd"_a, "scale"_a, "shift"_a, "c_dz"_a, "c_xhat"_a, "activation"_a, "grad_x3"_a,
        "grad_residual3"_a.none(true), "channels_last"_a, "grad_x3 (and grad_residual3 unless None)");
}

}  // namespace dlk
