// Fused batch norm + residual + activation: statistics, apply, and the two backward kernels, for
// (N, C, S) views in NCS layout (per (n, c) a contiguous run of S) or channels-last (rows of C).
// All arrays of one call share the layout, so one flat offset addresses an element in each.
// Contract: dlkernels/batchnorm/op.py.
#include "conv_common.h"

#include <sys/mman.h>

#include <cmath>
#include <cstring>
#include <type_traits>

namespace dlk {
namespace {

// ReluGate: relu in a backward that reads the forward's gate bits (see store_gate) instead of y; never
// parsed from a name.
enum class Act { None, Relu, Silu, ReluGate };

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

// Runs f(std::bool_constant<b>) for a runtime b: one compiled branch each (the residual's presence,
// the training or the evaluation form of the backward's grad_x).
template <class F>
void with_bool(bool b, F&& f) {
  if (b)
    f(std::true_type{});
  else
    f(std::false_type{});
}

// Runs f(std::integral_constant<Act, A>, std::bool_constant<RES>) for the runtime act / residual,
// so that each combination compiles to its own branch-free inner loop.
template <class F>
void dispatch_act(Act act, bool has_res, F&& f) {
  auto with_res = [&](auto a) { with_bool(has_res, [&](auto r) { f(a, r); }); };
  switch (act) {
    case Act::None: return with_res(std::integral_constant<Act, Act::None>{});
    case Act::Relu: return with_res(std::integral_constant<Act, Act::Relu>{});
    case Act::Silu: return with_res(std::integral_constant<Act, Act::Silu>{});
    case Act::ReluGate: return with_res(std::integral_constant<Act, Act::ReluGate>{});
  }
}

// SiLU's sigmoid is computed run by run into a small per-thread buffer (SiluPrep below), in explicit
// vectors: the kernels' element loops rely on auto-vectorization, which GCC gave up on for an
// inlined exp in the LTO build (the silu kernels ran scalar, ~10x slower than relu). The vectors use
// GCC's vector extension, so they need neither LTO nor `omp simd` to stay vectorized. 16 lanes on
// AVX-512 builds, where at 8 the exp bounded the pass (silu, two threads, Zen5, against eager in the
// same run: NCHW evaluation 8x32x112x112 0.80x -> 1.50x, 8x672x14x14 0.82x -> 1.10x, 32x64x56x56
// 0.87x -> 1.82x; channels-last 8x16x112x112 0.74x -> 0.80x).
#if defined(__AVX2__) && defined(__GNUC__)
#define DLK_VEC_EXP 1
#if defined(__AVX512F__)
constexpr int kExpLanes = 16;
#else
constexpr int kExpLanes = 8;
#endif
typedef float vxf __attribute__((vector_size(4 * kExpLanes)));
typedef int32_t vxi __attribute__((vector_size(4 * kExpLanes)));

DLK_INLINE vxf splat(float c) { return vxf{} + c; }

// expf for kExpLanes lanes: Cephes' reduction and polynomial (~1 ulp), overflowing to +inf above
// ln(FLT_MAX) as expf does (so silu(-inf) = -inf / inf = nan and silu's gradient at +-inf is nan,
// as in PyTorch) and returning 0 below -86 (true results < 4.5e-38; exactness there does not matter
// for 1 / (1 + exp(-z))). NaN propagates through every step.
DLK_INLINE vxf vexp(vxf x) {
  const vxf lo = splat(-86.0f), hi = splat(88.7228390f);  // ln(FLT_MAX) = 88.72283906
  vxf xc = x < lo ? lo : x;  // selects, not min/max: a NaN lane stays NaN (the compare is false)
  xc = xc > hi ? hi : xc;
  const vxf magic = splat(12582912.0f);  // 1.5 * 2^23: adding and subtracting rounds to an integer
  const vxf t = xc * splat(1.44269504088896341f) + magic;
  const vxf fx = t - magic;
  const vxf r = xc - fx * splat(0.693359375f) + fx * splat(2.12194440e-4f);
  const vxf z = r * r;
  vxf y = splat(1.9875691500e-4f);
  y = y * r + splat(1.3981999507e-3f);
  y = y * r + splat(8.3334519073e-3f);
  y = y * r + splat(4.1665795894e-2f);
  y = y * r + splat(1.6666665459e-1f);
  y = y * r + splat(5.0000001201e-1f);
  y = y * z + r + splat(1.0f);
  // 2^(fx - 1) from t's low mantissa bits (fx in [-124, 128]), times 2 at the end: 2^128 itself is
  // not a float, exp(88.7) is
  const vxi bits = (((vxi)t - (vxi)magic) + 126) << 23;
  vxf e = (y * (vxf)bits) * splat(2.0f);
  e = x > hi ? splat(__builtin_inff()) : e;
  return x < lo ? splat(0.0f) : e;
}

template <bool GRAD>
DLK_INLINE vxf silu_v(vxf z) {
  const vxf one = splat(1.0f);
  const vxf s = one / (one + vexp(-z));
  if constexpr (GRAD) return s * (one + z * (one - s));
  else return s;
}

// w[k] <- sigmoid(w[k]) (GRAD false) or silu'(w[k]) = s * (1 + z * (1 - s)) (GRAD true), in place.
template <bool GRAD>
void silu_inplace(float* w, int64_t n) {
  int64_t k = 0;
  for (; k + kExpLanes <= n; k += kExpLanes) {
    vxf z;
    std::memcpy(&z, w + k, sizeof z);
    z = silu_v<GRAD>(z);
    std::memcpy(w + k, &z, sizeof z);
  }
  if (k < n) {  // the tail through a zero-padded vector: the same arithmetic as the full vectors
    float buf[kExpLanes] = {};
    std::memcpy(buf, w + k, (n - k) * sizeof(float));
    vxf z;
    std::memcpy(&z, buf, sizeof z);
    z = silu_v<GRAD>(z);
    std::memcpy(buf, &z, sizeof z);
    std::memcpy(w + k, buf, (n - k) * sizeof(float));
  }
}
#endif

// Scalar path (double, or a build without AVX2): libm's exp, which overflows to inf as torch's does.
template <bool GRAD, class T>
void silu_inplace(T* w, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    const T z = w[k], s = T(1) / (T(1) + std::exp(-z));
    w[k] = GRAD ? s * (T(1) + z * (T(1) - s)) : s;
  }
}

template <bool GRAD, class T>
void silu_run(T* w, int64_t n) {
#ifdef DLK_VEC_EXP
  if constexpr (std::is_same_v<T, float>) return silu_inplace<GRAD>(w, n);
#endif
  silu_inplace<GRAD, T>(w, n);
}

// SiluPrep<GRAD, RES, T>{x, scale, shift, r, C}: the runs' prologue for silu (see channel_map): fills w
// with z = x * scale[c] + shift[c] (+ r) for the run, then turns it into sigmoid(z) or silu'(z).
// In two steps where runs are short (NCS planes of 7x7): fill for each run of a block, then finish
// once over the block's buffer.
template <bool GRAD, bool RES, class T>
struct SiluPrep {
  static constexpr bool active = true, flat = false;
  const T *x, *sc, *sh, *r;
  int64_t C;  // channels: a channels-last run is len / C whole rows
  void operator()(int64_t i0, int64_t c, int64_t len, T* w) const {
    fill(i0, c, len, w);
    finish(w, len);
  }
  void finish(T* w, int64_t n) const { silu_run<GRAD>(w, n); }
  void fill(int64_t i0, int64_t c, int64_t len, T* w) const {
    if (c >= 0) {  // NCS: one channel
      const T a = sc[c], b = sh[c];
#pragma omp simd
      for (int64_t k = 0; k < len; ++k) {
        T z = x[i0 + k] * a + b;
        if constexpr (RES) z += r[i0 + k];
        w[k] = z;
      }
    } else {  // channels-last rows: element k of each is channel k
      for (int64_t o = 0; o < len; o += C) {
#pragma omp simd
        for (int64_t k = 0; k < C; ++k) {
          T z = x[i0 + o + k] * sc[k] + sh[k];
          if constexpr (RES) z += r[i0 + o + k];
          w[o + k] = z;
        }
      }
    }
  }
};

struct NoPrep {
  static constexpr bool active = false, flat = false;
  template <class T>
  void fill(int64_t, int64_t, int64_t, T*) const {}
  template <class T>
  void finish(T*, int64_t) const {}
  template <class T>
  void operator()(int64_t, int64_t, int64_t, T*) const {}
};

// The relu gate: bit i of a byte array is !(y[i] <= 0) for the output's element at flat offset i,
// the mask relu's gradient takes (threshold_backward's, NaN passing). The training forward writes it
// beside y (1/32 of y's bytes) so that the backward, which reads the gate in both its passes, streams
// the bits instead of y: a relu training step moves ~10 tensors instead of 11 (channels-last) or 7
// instead of 8 (NCS by channel groups). Relu with a residual, forward + backward, all gradients, two
// threads, Zen4, both builds interleaved in one process (11 pairs, median): the backward 0.81-0.95x
// channels-last, 0.85-0.99x NCS; the forward 1.00-1.11x (the packing); the step, two runs,
// channels-last 0.91-1.00x (32x256x56x56 0.94/0.97, 32x512x28x28 0.96/0.94, 32x1024x14x14 1.00/0.93,
// 32x2048x7x7 0.97/0.95, 8x128x75x75 0.96/0.94, 8x728x19x19 0.95/0.91), NCS 0.83-1.03x (on 7x7
// planes the short blocks' edge bytes and packing cost the forward 20-30 %, which the backward about
// wins back).
// kGatePad: bytes past the last bit the readers may load (8-byte words).
constexpr int64_t kGatePad = 8;
inline int64_t gate_bytes(int64_t elements) { return (elements + 7) / 8 + kGatePad; }

// bytes[j] = the gate bits of v[8j, 8j + 8) for j in [j0, nbytes): the scalar form of the packing.
template <class T>
DLK_INLINE void pack_gate_bytes_scalar(const T* v, int64_t j0, int64_t nbytes, uint8_t* bytes) {
  for (int64_t j = j0; j < nbytes; ++j) {
    uint8_t b = 0;
    for (int k = 0; k < 8; ++k) b |= static_cast<uint8_t>(!(v[8 * j + k] <= T(0))) << k;
    bytes[j] = b;
  }
}

// bytes[j] = the gate bits of v[8j, 8j + 8), j < nbytes.
DLK_INLINE void pack_gate_bytes(const float* v, int64_t nbytes, uint8_t* bytes) {
  int64_t j = 0;
#if defined(__AVX512F__)
  const __m512 zero = _mm512_setzero_ps();
  auto bits16 = [&](int64_t k) -> uint64_t { return _mm512_cmp_ps_mask(_mm512_loadu_ps(v + k), zero, _CMP_NLE_UQ); };
  for (; j + 8 <= nbytes; j += 8) {  // 64 bits a store
    const uint64_t m = bits16(8 * j) | bits16(8 * j + 16) << 16 | bits16(8 * j + 32) << 32 | bits16(8 * j + 48) << 48;
    std::memcpy(bytes + j, &m, 8);
  }
  for (; j + 2 <= nbytes; j += 2) {
    const uint16_t m = static_cast<uint16_t>(bits16(8 * j));
    std::memcpy(bytes + j, &m, 2);
  }
#elif defined(__AVX__)
  const __m256 zero = _mm256_setzero_ps();
  for (; j < nbytes; ++j)
    bytes[j] = static_cast<uint8_t>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(v + 8 * j), zero, _CMP_NLE_UQ)));
#endif
  pack_gate_bytes_scalar(v, j, nbytes, bytes);
}
DLK_INLINE void pack_gate_bytes(const double* v, int64_t nbytes, uint8_t* bytes) {
  pack_gate_bytes_scalar(v, 0, nbytes, bytes);
}

// A byte of gate bits that a block shares with the neighbouring block, perhaps another thread's: its
// bits are set after the parallel region (GateEdges::apply), so no byte is written by two threads and
// no store needs a locked instruction (atomic updates in place measured alike).
struct GateEdge {
  int64_t byte;
  uint8_t mine, set;  // the block's bits in the byte, and those of them that are set
};
class GateEdges {
  std::vector<std::vector<GateEdge>> per_thread_;

 public:
  // used: whether the pass writes a gate (else nothing is allocated: every batch norm pass makes one)
  explicit GateEdges(bool used) : per_thread_(used ? omp_get_max_threads() : 0) {}
  std::vector<GateEdge>& mine() { return per_thread_[omp_get_thread_num()]; }
  void apply(uint8_t* bits) const {
    for (const auto& edges : per_thread_)
      for (const GateEdge& e : edges) bits[e.byte] = static_cast<uint8_t>((bits[e.byte] & ~e.mine) | e.set);
  }
};

// The gate bits of the flat offsets [b0, b1), whose values are v[0, b1 - b0): whole bytes in place,
// bytes shared with a neighbouring range into edges.
template <class T>
void store_gate(const T* v, int64_t b0, int64_t b1, uint8_t* bits, std::vector<GateEdge>& edges) {
  auto partial = [&](int64_t i0, int64_t i1) {  // [i0, i1) within one byte
    GateEdge e{i0 >> 3, 0, 0};
    for (int64_t i = i0; i < i1; ++i) {
      const uint8_t bit = static_cast<uint8_t>(1u << (i & 7));
      e.mine |= bit;
      if (!(v[i - b0] <= T(0))) e.set |= bit;
    }
    edges.push_back(e);
  };
  const int64_t a = std::min(b1, (b0 + 7) & ~int64_t{7}), e = std::max(a, b1 & ~int64_t{7});
  if (a > b0) partial(b0, a);
  pack_gate_bytes(v + (a - b0), (e - a) / 8, bits + (a >> 3));
  if (b1 > e) partial(e, b1);
}

// The runs' prologue for Act::ReluGate's gradient (see channel_map): w[k] = 1 where the element at flat
// offset i0 + k passes the gradient, else 0, from the gate bits. (Reading y through this buffer instead of
// in the element loop, as evaluation's backward does without bits, measured up to 16 % slower.)
template <class T>
struct GatePrep {
  static constexpr bool active = true, flat = true;  // see ncs_prologue
  const uint8_t* bits;
  void operator()(int64_t i0, int64_t c, int64_t len, T* w) const { fill(i0, c, len, w); }
  void finish(T*, int64_t) const {}
  void fill(int64_t i0, int64_t, int64_t len, T* w) const {
    for (int64_t k = 0; k < len; k += 32) {  // 32 bits at a time from an unaligned 8-byte word
      const int64_t i = i0 + k, n = std::min<int64_t>(32, len - k);
      uint64_t word;
      std::memcpy(&word, bits + (i >> 3), sizeof word);
      const uint32_t v = static_cast<uint32_t>(word >> (i & 7));
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) w[k + j] = static_cast<T>((v >> j) & 1u);
    }
  }
};

template <Act A, class T>
DLK_INLINE T activate(T z, T sig) {
  if constexpr (A == Act::Relu || A == Act::ReluGate) return z < T(0) ? T(0) : z;  // keeps NaN, as torch.relu
  else if constexpr (A == Act::Silu) return z * sig;             // sig: sigmoid(z) from SiluPrep
  else return z;
}

// grad of act at z = x*scale + shift + residual: relu masks with the output y as PyTorch's
// threshold_backward does (y <= 0 -> 0, so a NaN output passes its gradient through), or with the
// gate the prologue's w holds (ReluGate: the same mask from the forward's bits); a select, not a
// product, so an infinite gradient is masked to 0 too. silu's derivative is w (SiluPrep<true>).
template <Act A, class T>
DLK_INLINE T act_grad(T gy, T y, T w) {
  if constexpr (A == Act::Relu) return y <= T(0) ? T(0) : gy;
  else if constexpr (A == Act::ReluGate) return w == T(0) ? T(0) : gy;
  else if constexpr (A == Act::Silu) return gy * w;
  else return gy;
}

// Both loops below visit the elements in contiguous runs: NCS, up to RUN elements of one channel;
// channels-last, whole rows of C channels, as many as fit RUN (cl_group_rows). Before a run, pre(i0,
// c, len, w) may fill the per-thread buffer w[0, len) (c: the run's channel, or -1 for channels-last
// rows, whose element k is channel k % C); the element functor then gets w[k] (silu's sigmoid;
// NoPrep leaves w unused and the load dead). NCS blocks of short planes fill each plane's part of
// one buffer and finish it once (pre.fill, pre.finish). Either way the prologue's per-call cost is
// paid once per ~RUN elements, not per row or plane: silu, two threads, Zen5, against eager in the
// same run, 8x16x112x112 channels-last evaluation 0.33x -> 0.74x, training 0.45x -> 0.82x (32
// channels 0.65x -> 1.22x); 8x1152x7x7 NCHW evaluation 0.64x -> 0.83x, training 0.73x -> 0.91x.
constexpr int64_t RUN = 2048;

// Channels-last rows a prologue run covers: whole rows, about RUN elements.
inline int64_t cl_group_rows(int64_t C) { return std::max<int64_t>(1, RUN / std::max<int64_t>(1, C)); }
// Planes up to this size (7x7, 8x8) take channel_sums2's small-plane path (no gain measured at 14x14
// then, on another machine).
constexpr int64_t kSmallPlane = 64;
// Planes channel_sums2 sweeps with ncs_small_plane_sums: those up to kSmallPlane and, on AMD family 19h,
// up to 16x16, where run_sums' fold of 2 x 32 lanes a plane held the pass under the Zen4's bandwidth.
// Training kernels, relu + residual, NCHW, two threads, inputs from DRAM, interleaved in one process,
// run_sums -> sweep (ms): 32x1024x14x14 forward 3.99 -> 3.94 and 4.34 -> 4.03, backward 5.31 -> 5.04
// and 6.29 -> 5.23; 8x1024x10x10 forward 0.64 -> 0.52, backward 0.64 -> 0.56; 16x512x16x16 1.18 ->
// 1.16, 1.30 -> 1.29; 7x7 unchanged. Other machines are unmeasured.
inline bool sweeps_small_planes(int64_t S) { return S <= kSmallPlane || (amd_family_19h() && S <= 256); }

// Calls seg(i0, c, len) for the runs within one plane (channel c) that make up the flat range [b0, b1)
// of an NCS array.
template <class G>
DLK_INLINE void ncs_runs(const Bn3& d, int64_t b0, int64_t b1, G seg) {
  int64_t c = (b0 / d.S) % d.C, end = (b0 / d.S + 1) * d.S;
  for (int64_t i0 = b0; i0 < b1; end += d.S) {
    const int64_t len = std::min(b1, end) - i0;
    seg(i0, c, len);
    i0 += len;
    if (++c == d.C) c = 0;
  }
}
// The runs of NCS block blk, the flat offsets [blk * RUN, (blk + 1) * RUN) clipped to the array: a
// block spans as many planes as fit, so that small planes (7x7) are not one scheduling unit each.
template <class G>
DLK_INLINE void ncs_segments(const Bn3& d, int64_t blk, G seg) {
  ncs_runs(d, blk * RUN, std::min(d.N * d.C * d.S, blk * RUN + RUN), seg);
}

// pre's values for the NCS elements [b0, b1) into w[i - b0]: each plane's run filled, then all
// finished at once (see SiluPrep); nothing for NoPrep.
template <class P, class T>
DLK_INLINE void ncs_prologue(const Bn3& d, const P& pre, int64_t b0, int64_t b1, T* w) {
  if constexpr (P::flat) {  // values of the flat offset alone (no channel): the block in one run
    pre.fill(b0, int64_t(-1), b1 - b0, w);
  } else if constexpr (P::active) {
    ncs_runs(d, b0, b1, [&](int64_t i0, int64_t c, int64_t len) { pre.fill(i0, c, len, w + (i0 - b0)); });
    pre.finish(w, b1 - b0);
  }
}

// Sum of the BL lanes in a fixed tree order (the first halvings vectorize).
template <int BL, class T>
DLK_INLINE T fold_lanes(T* p) {
  for (int h = BL / 2; h >= 1; h /= 2)
    for (int k = 0; k < h; ++k) p[k] += p[k + h];
  return p[0];
}

// pa[k] += a, pb[k] += b for f's (a, b) at the n elements from flat offset i0 (see channel_sums2):
// one plane's run of channel c, or (ROW) one channels-last row, whose element k is channel k.
template <bool ROW, class T, class F>
DLK_INLINE void add_run(const F& f, int64_t i0, int64_t c, int64_t n, const T* w, T* pa, T* pb) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    T a, b;
    f(i0 + k, ROW ? k : c, w[k], a, b);
    pa[k] += a;
    pb[k] += b;
  }
}

// acc_a += sum of a, acc_b += sum of b over one NCS run (channel c, n elements from flat offset i0):
// lane-wise partial sums (independent adds vectorize without reassociating a reduction), folded in
// T, added in double; 32 lanes: enough independent vector adds, few to clear and fold for a 7x7 plane.
template <class T, class F>
DLK_INLINE void run_sums(const F& f, int64_t i0, int64_t c, int64_t n, const T* w, double& acc_a, double& acc_b) {
  constexpr int BL = 32;
  T pa[BL] = {}, pb[BL] = {};
  int64_t s = 0;
  for (; s + BL <= n; s += BL) add_run<false>(f, i0 + s, c, BL, w + s, pa, pb);
  add_run<false>(f, i0 + s, c, n - s, w + s, pa, pb);
  acc_a += fold_lanes<BL>(pa);
  acc_b += fold_lanes<BL>(pb);
}

// Small planes (up to kSmallPlane) in a channel group (ncs_resident; channel_sums2 sweeps them with
// ncs_small_plane_sums): the planes of channels [c0, c1) at one n are added elementwise into
// S-wide accumulator rows per channel (A, B: (c1 - c0) x S, in L1), which fold_rows adds into the double
// sums once per kFoldPlanes planes: folding 2 x 32 lanes for every 49-element plane cost more than
// the sums (the 7x7 statistics pass ran at 7 GB/s, against 27 for the same bytes channels-last).
constexpr int64_t kFoldPlanes = 16;
template <class T>
void fold_rows(const Bn3& d, int64_t nc, T* A, T* B, double* acc_a, double* acc_b) {
  for (int64_t j = 0; j < nc; ++j) {
    double sa = 0, sb = 0;
    for (int64_t k = 0; k < d.S; ++k) sa += A[j * d.S + k], sb += B[j * d.S + k];
    acc_a[j] += sa;
    acc_b[j] += sb;
  }
  std::fill(A, A + nc * d.S, T(0));
  std::fill(B, B + nc * d.S, T(0));
}

// Per-channel sums of two per-element values: f(i, c, wk, a, b) sets a and b for the element at flat
// offset i in channel c. Short runs are summed in T (vectorized), runs are accumulated per thread in
// double, threads merged at the end in a fixed order: accurate for large N*S and deterministic.
// ahead (channels-last): the arrays f reads (up to three); how the rows are then walked depends on
// the CPU (cl_sums_walk). Four rows a step (the prologue filled first for ~RUN elements of whole
// rows), those arrays prefetched kSumsAhead bytes ahead: on the Zen5, row by row, every element's two
// partial sums went through an L1 load and store (pa, pb), and the pass read DRAM at a third of the
// NCS pass's rate.
// Statistics pass, two threads, interleaved, input from DRAM (Zen5): 8x128x75x75 0.59 -> 0.50 ms
// (NCS 0.55), 32x256x56x56 2.48 -> 2.26 (NCS 2.33), 8x728x19x19 0.227 -> 0.195; in an earlier run
// on the same machine 0.92 -> 0.50 and 3.61 -> 2.29. Four rows without the prefetch were no faster
// (1.30 and 3.70 in that run), 4, 16 and 32 KiB ahead no better than 8. The backward's reduce pass
// took the row-by-row path until it named its arrays (see reduce_pass); it needs all three
// prefetched (8x128x75x75, interleaved, copy 69-78 GB/s: three 1.63 ms, the first two 1.78, one
// 1.88, none 2.57), and 4 to 32 KiB ahead measured alike there too (at 44 GB/s, also 32x256x56x56).
constexpr int64_t kSumsAhead = 8192;
// How channel_sums2 walks channels-last rows (named: the caller named its arrays in Ahead): four rows a
// step or one, the named arrays prefetched or not. On AMD family 19h the Zen4 measured the opposite of
// the Zen5 (two threads, interleaved in one process, copy at 50-65 GB/s, float32, the old walk first):
// four rows interleave four streams an array, and those rows at most a page apart ran at half the
// sequential rate, the prefetch no help (it cost a little more); rows one at a time, no prefetch,
// where a row is 256 B to 4 KiB: reduce pass 8x128x75x75 2.26 -> 1.49 ms, 32x256x56x56 8.29 -> 5.92,
// 32x512x28x28 3.91 -> 2.03, 32x1024x14x14 1.60 -> 1.25 (relu with its gate 13.3 -> 7.5 at 56x56;
// one thread 8x128x75x75 4.66 -> 2.07, the NCS pass's time); whole backward 4.34 -> 3.51,
// 15.8 -> 13.3, 7.00 -> 5.31; the forward 3-10 % faster. Shorter rows (16 to 48 channels) lose to the
// per-row loop's cost, longer ones (1536, 2048 channels: the two accumulator rows no longer stay in L1
// beside the rows streaming through) run faster four at a time: 8x2048x28x28 reduce 3.72 (four rows,
// prefetched) 4.32 (one) 2.96 (four, not prefetched). Tensors the LLC holds (8x1024x10x10) measured
// alike either way. The Zen3, same family, is unmeasured.
struct ClSumsWalk {
  bool four_rows, prefetch;
};
template <class T>
ClSumsWalk cl_sums_walk(int64_t C, bool named) {
  if (!named) return {false, false};
  if (!amd_family_19h()) return {true, true};
  const int64_t row = C * static_cast<int64_t>(sizeof(T));
  return {row < 256 || row > 4096, false};
}
template <class T>
struct Ahead {
  const T* p[3] = {nullptr, nullptr, nullptr};
  bool any() const { return p[0] != nullptr; }
};
// Prefetches a channel group's planes (its n-major segments, one contiguous run of (c1 - c0) planes
// at each n) of up to three arrays kSumsAhead bytes ahead of their reader: the hardware prefetchers
// restart at each segment, and without this the statistics over 32x1024x14x14 read by segments ran
// at half the rate of one sequential sweep (two threads, Zen5: 1.22 against 0.68 ms).
template <class T>
struct GroupPrefetch {
  Ahead<T> a;
  int64_t stride, len, nseg;  // bytes from one segment to the next, bytes in one, segments
  int64_t n = 0, off = 0;     // the next line to fetch: segment and byte offset in it
  GroupPrefetch(const Bn3& d, int64_t c0, int64_t c1, Ahead<T> ahead)
      : a(ahead), stride(d.C * d.S * static_cast<int64_t>(sizeof(T))),
        len((c1 - c0) * d.S * static_cast<int64_t>(sizeof(T))), nseg(d.N) {
    for (int k = 0; k < 3; ++k)
      if (a.p[k]) a.p[k] += c0 * d.S;
  }
  // before the reader starts the plane at byte q of the group's sequence (of `plane` bytes): that
  // plane's lines and kSumsAhead bytes beyond
  void before(int64_t q, int64_t plane) {
    if (!a.any()) return;
    const int64_t q_end = q + plane + kSumsAhead;
    while (n < nseg && n * len + off < q_end) {
      for (const T* p : a.p)
        if (p) __builtin_prefetch(reinterpret_cast<const char*>(p) + n * stride + off);
      off += 64;
      if (off >= len) {
        for (const T* p : a.p)  // the segment's last line, which off may have stepped past
          if (p) __builtin_prefetch(reinterpret_cast<const char*>(p) + n * stride + len - 1);
        ++n, off = 0;
      }
    }
  }
};

// Calls blk(b0, b1) for the blocks of at most RUN elements that make up channels [c0, c1) of an NCS
// array, n by n (at each n the group's planes are one contiguous segment): first each block's lines
// are prefetched (pf) and its prologue run into w (pre, as channel_map runs it).
template <class T, class P, class G>
DLK_INLINE void group_blocks(const Bn3& d, int64_t c0, int64_t c1, GroupPrefetch<T>& pf, const P& pre, T* w, G blk) {
  const int64_t len = (c1 - c0) * d.S;
  for (int64_t n = 0; n < d.N; ++n) {
    const int64_t s0 = (n * d.C + c0) * d.S;
    for (int64_t b0 = s0; b0 < s0 + len; b0 += RUN) {
      const int64_t b1 = std::min(s0 + len, b0 + RUN);
      pf.before((n * len + b0 - s0) * static_cast<int64_t>(sizeof(T)), (b1 - b0) * static_cast<int64_t>(sizeof(T)));
      ncs_prologue(d, pre, b0, b1, w);
      blk(b0, b1);
    }
  }
}

// NCS: the per-channel sums (sa[c - c0], sb[c - c0], in double, zeroed here) of f's two values over the
// planes of channels [c0, c1), n by n in order, block by block (group_blocks); f, pre, w as in
// channel_sums2 below. A, B: the small-plane accumulator rows (fold_rows), (c1 - c0) x S each, unused
// for larger planes. ahead: the arrays f reads, prefetched (GroupPrefetch).
template <class T, class P, class F>
void channel_group_sums(const Bn3& d, int64_t c0, int64_t c1, const P& pre, const F& f, T* w, T* A, T* B, double* sa,
                        double* sb, Ahead<T> ahead) {
  const int64_t nc = c1 - c0;
  const bool small = d.S <= kSmallPlane;
  GroupPrefetch<T> pf(d, c0, c1, ahead);
  std::fill(sa, sa + nc, 0.0);
  std::fill(sb, sb + nc, 0.0);
  if (small) {
    std::fill(A, A + nc * d.S, T(0));
    std::fill(B, B + nc * d.S, T(0));
  }
  int64_t ns = 0;  // small: the n's whose planes are summed (A, B fold every kFoldPlanes of them)
  group_blocks(d, c0, c1, pf, pre, w, [&](int64_t b0, int64_t b1) {
    ncs_runs(d, b0, b1, [&](int64_t i0, int64_t c, int64_t len) {
      const int64_t j = c - c0;
      if (small) {
        const int64_t o = j * d.S + i0 % d.S;
        add_run<false>(f, i0, c, len, w + (i0 - b0), A + o, B + o);
        if (j == nc - 1 && (i0 + len) % d.S == 0 && (++ns % kFoldPlanes == 0 || i0 / d.S / d.C == d.N - 1))
          fold_rows(d, nc, A, B, sa, sb);
      } else {
        run_sums(f, i0, c, len, w + (i0 - b0), sa[j], sb[j]);
      }
    });
  });
}

// Small planes (ResNet's 7x7; on AMD family 19h up to 16x16, sweeps_small_planes), NCS: one sequential
// sweep, each thread a contiguous range of the N*C planes (by blocks of whole planes, about RUN
// elements, for the prologue); a plane's whole vectors are added lane-wise into its channel's W =
// min(L, S) accumulators (C x W each per thread, in L2), its last S % L elements into the first
// lanes, and the lanes fold into the double sums after about kFoldPlanes planes of four vectors a
// channel. It replaced summing channel groups (a group's planes at each n, a few KiB a
// channel stride apart, into (c1 - c0) x S rows, fold_rows): two threads, Zen4, both in one process
// interleaved, three input sets rotated past a 64 MiB flush, median of 40: statistics 32x2048x7x7
// 0.95 -> 0.55 ms, 32x512x8x8 0.27 -> 0.12, 64x300x6x6 0.23 -> 0.13, 8x1152x7x7 0.15 -> 0.13;
// relu's reduce pass (writing dz) 1.60 -> 1.25, 0.47 -> 0.34, 0.41 -> 0.26, 0.23 -> 0.22. The same
// sweep in AVX-512 intrinsics took 0.45 ms at 32x2048x7x7, a plain sum of those bytes 0.38. Later,
// old and new builds alternated as processes (the intrinsics sweep then 0.56 ms, the plain sum 0.36):
// 32x2048x7x7 statistics 0.93-1.05 -> 0.80-0.85, reduce 1.68-1.89 -> 1.37-1.46. Prefetching the
// named arrays 2-32 KiB ahead: statistics 5-10 % faster, the reduce pass 5-15 % slower; not kept.
// The Zen3, Zen5 and Xeon are unmeasured.
template <class T, class P, class F>
void ncs_small_plane_sums(const Bn3& d, const P& pre, const F& f, ThreadPartials<double>& part) {
  constexpr int64_t L = 64 / sizeof(T);
  const int64_t S = d.S, C = d.C, planes = d.N * d.C;
  const int64_t bp = std::max<int64_t>(1, RUN / S), blocks = ceil_div(planes, bp);  // planes a block
  const int64_t nv = S / L, W = std::min(L, S);  // whole vectors a plane; lanes a channel
#pragma omp parallel if (worth_threads(planes * S))
  {
    std::vector<T> wbuf(bp * S), abuf(C * W, T(0)), bbuf(C * W, T(0));
    T *w = wbuf.data(), *la = abuf.data(), *lb = bbuf.data();
    double* acc = part.mine();
    int64_t since = 0;  // planes added since the last fold
    auto fold = [&] {
      for (int64_t c = 0; c < C; ++c) {
        double sa = 0, sb = 0;
        for (int64_t k = 0; k < W; ++k) sa += la[c * W + k], sb += lb[c * W + k];
        acc[c] += sa;
        acc[C + c] += sb;
      }
      std::fill(la, la + C * W, T(0));
      std::fill(lb, lb + C * W, T(0));
    };
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t p0 = blk * bp, p1 = std::min(planes, p0 + bp), b0 = p0 * S;
      ncs_prologue(d, pre, b0, p1 * S, w);
      int64_t c = p0 % C;
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t i0 = p * S;
        const T* wp = w + (i0 - b0);
        T* pa = la + c * W;
        T* pb = lb + c * W;
        for (int64_t v = 0; v < nv; ++v) {
#pragma omp simd
          for (int64_t j = 0; j < L; ++j) {
            T a, b;
            f(i0 + v * L + j, c, wp[v * L + j], a, b);
            pa[j] += a;
            pb[j] += b;
          }
        }
        // the plane's last elements (a gather of them with the lanes past the plane masked measured
        // slower: 32x2048x7x7 statistics 0.80 ms)
        for (int64_t k = nv * L; k < S; ++k) {
          T a, b;
          f(i0 + k, c, wp[k], a, b);
          pa[k - nv * L] += a;
          pb[k - nv * L] += b;
        }
        if (++c == C) c = 0;
      }
      // folded after about kFoldPlanes 4-vector planes a channel, however many vectors a plane has:
      // the float partials then add ~64 values a lane at any plane size
      since += (p1 - p0) * std::max<int64_t>(1, ceil_div(S, L));
      if (since >= kFoldPlanes * 4 * C) fold(), since = 0;
    }
    fold();
  }
}

template <class T, class P, class F>
void channel_sums2(const Bn3& d, P pre, F f, double* sum_a, double* sum_b, Ahead<T> ahead = {}) {
  // Each thread's 2C partials padded to whole cache lines (plus one), so the two threads' blocks never
  // share a line.
  const int64_t width = (2 * d.C + 7) / 8 * 8 + 8;
  ThreadPartials<double> part(width);
  if (!d.cl && sweeps_small_planes(d.S)) {
    ncs_small_plane_sums<T>(d, pre, f, part);
  } else if (!d.cl) {
    const int64_t blocks = ceil_div(d.N * d.C * d.S, RUN);
#pragma omp parallel if (worth_threads(d.N * d.C * d.S))
    {
      std::vector<T> wbuf(RUN);
      T* w = wbuf.data();
      double* acc = part.mine();
#pragma omp for schedule(static)
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t b0 = blk * RUN;
        ncs_prologue(d, pre, b0, std::min(d.N * d.C * d.S, b0 + RUN), w);
        ncs_segments(d, blk, [&](int64_t i0, int64_t c, int64_t len) {
          run_sums(f, i0, c, len, w + (i0 - b0), acc[c], acc[d.C + c]);
        });
      }
    }
  } else {
    // Each thread takes one contiguous range of rows and streams it, holding the C per-channel
    // partials of the current block in T (L1-resident: block lengths keep ~64K values per block).
    const int64_t rows = d.N * d.S, rb = std::max<int64_t>(1, std::min<int64_t>(RUN, 65536 / d.C + 1));
    const int64_t bytes = rows * d.C * static_cast<int64_t>(sizeof(T));  // ahead's extent
    const int64_t blocks = ceil_div(rows, rb);
    const ClSumsWalk walk = cl_sums_walk<T>(d.C, ahead.any());
#pragma omp parallel if (worth_threads(d.N * d.C * d.S))
    {
      // rows per prologue run: about RUN elements, in whole fours for the four-row sums
      const int64_t G = P::active ? std::max<int64_t>(4, cl_group_rows(d.C) / 4 * 4) : 4;
      std::vector<T> ra(d.C), rbuf(d.C), wbuf(G * d.C);
      T* w = wbuf.data();
      double* acc = part.mine();
#pragma omp for schedule(static)
      for (int64_t blk = 0; blk < blocks; ++blk) {
        std::fill(ra.begin(), ra.end(), T(0));
        std::fill(rbuf.begin(), rbuf.end(), T(0));
        T* pa = ra.data();
        T* pb = rbuf.data();
        const int64_t r1 = std::min(rows, (blk + 1) * rb), C = d.C;
        for (int64_t r = blk * rb; r < r1; r += G) {
          const int64_t g = std::min(G, r1 - r), i0 = r * C;
          pre(i0, int64_t(-1), g * C, w);
          int64_t q = 0;
          if (walk.four_rows)
            for (; q + 4 <= g; q += 4) {
              const int64_t j0 = i0 + q * C;
              const T* wq = w + q * C;
              const int64_t b0 = j0 * static_cast<int64_t>(sizeof(T)) + kSumsAhead;
              const int64_t b1 = std::min(bytes, b0 + 4 * C * static_cast<int64_t>(sizeof(T)));
              for (const T* a : ahead.p)
                if (a && walk.prefetch)
                  for (int64_t o = b0; o < b1; o += 64) __builtin_prefetch(reinterpret_cast<const char*>(a) + o);
#pragma omp simd
              for (int64_t k = 0; k < C; ++k) {
                T a0, s0, a1, s1, a2, s2, a3, s3;
                f(j0 + k, k, wq[k], a0, s0);
                f(j0 + C + k, k, wq[C + k], a1, s1);
                f(j0 + 2 * C + k, k, wq[2 * C + k], a2, s2);
                f(j0 + 3 * C + k, k, wq[3 * C + k], a3, s3);
                pa[k] += (a0 + a1) + (a2 + a3);
                pb[k] += (s0 + s1) + (s2 + s3);
              }
            }
          for (; q < g; ++q) add_run<true>(f, i0 + q * C, int64_t(-1), C, w + q * C, pa, pb);
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

// The one or two arrays channel_map writes at every flat offset (b: nullptr for one). With stream,
// they are written with non-temporal stores: for a pass whose arrays are past streams_outputs's
// threshold a plain store first reads the line it writes, a fourth more DRAM traffic for evaluation's
// x + residual -> y (two threads, 8x128x75x75: 2.0 -> 1.6 ms).
// gate: where not null, a's relu gate bits (store_gate) are written too.
template <class T>
struct MapOut {
  T* a;
  T* b;
  bool stream;
  uint8_t* gate = nullptr;
};

// A thread's writer of a MapOut, block by block (begin, then the block's runs in flat order, then
// finish; done after the thread's last block). A run's element functor e(k, oa, ob) stores the values
// of the run's element k at *oa (and *ob; ob is oa where there is no second output).
//
// Streamed, a run's whole cache lines are computed into a line-sized local array and stored from
// registers with non-temporal stores as they are done (lines); the elements of a line the run only
// starts or ends (a plane's edges in NCS) wait in a pending line, which the next run completes (each
// run streamed out by itself made every line of 7x7 planes a partial one: ResNet-50 stage 4 evaluation
// 1.1 -> 6.3 ms), and a line the block shares with its neighbour goes out with plain stores, the
// block's part only. It replaced computing the whole block (~RUN elements) into a cached buffer and
// streaming that out afterwards: on the Zen4 that buffer's stores and reloads, and the block's reads
// and writes in two phases instead of interleaved, held the pass ~30 % under its bandwidth (a
// standalone 32x2048x7x7 evaluation loop, two threads, from DRAM: channels-last 0.95 -> 0.65 ms, as a
// flat loop 1.1 -> 0.8).
// Runs shorter than kMinLineRun (NCS planes, channels-last rows) keep that block buffer: a 7x7 plane is
// mostly its two partial lines, and 32x2048x7x7 NCHW evaluation ran 0.80 -> 0.86 ms by lines. Runs
// from 64 up gained in both layouts (same loop, interleaved A/B against the block buffer, two threads,
// from DRAM, relu + residual): evaluation 32x256x56x56 5.14 -> 4.16 ms NCHW, 5.66 -> 4.58 channels-last,
// 32x512x28x28 3.98 -> 3.61, 32x1024x14x14 1.93 -> 1.81 NCHW, 1.54 -> 1.20 channels-last, 8x128x75x75
// 1.19 -> 1.02 and 1.18 -> 1.05, 8x728x19x19 0.71 -> 0.64 and 0.77 -> 0.69 (rows of 728: lines span
// rows), 32x2048x7x7 channels-last 0.96 -> 0.80. Training steps moved within the noise (-4 to +9 %):
// their statistics and reduce passes, which write nothing, take most of the time. The AVX2 Zen3 and
// the Zen5 are unmeasured.
constexpr int64_t kMinLineRun = 64;
template <class T>
class MapBlock {
  static constexpr int64_t L = 64 / static_cast<int64_t>(sizeof(T));  // elements in a cache line
  const MapOut<T>& out_;
  const bool lines_;                  // streamed line by line (else buffered when streamed)
  std::vector<GateEdge>* edges_;      // this thread's, where there is a gate
  std::vector<T> abuf_, bbuf_;        // the block buffers (streamed, not by lines)
  int64_t b0_ = 0, b1_ = 0;           // the block
  int64_t pend_ = -1;                 // the flat offset of the pending line's first element, or -1
  alignas(64) T pa_[L], pb_[L];       // the pending line's values

  // Writes the line at flat offset l0 with values va (vb): whole and within the block, streamed;
  // else the block's part of it, plain.
  void put_line(int64_t l0, const T* va, const T* vb) {
    const int64_t lo = std::max(l0, b0_), hi = std::min(l0 + L, b1_);
    if (lo == l0 && hi == l0 + L) {
      stream_line(out_.a + l0, va);
      if (out_.b) stream_line(out_.b + l0, vb);
    } else {
      std::memcpy(out_.a + lo, va + (lo - l0), (hi - lo) * sizeof(T));
      if (out_.b) std::memcpy(out_.b + lo, vb + (lo - l0), (hi - lo) * sizeof(T));
    }
    if (out_.gate) store_gate(va + (lo - l0), lo, hi, out_.gate, *edges_);
  }
  void flush_pending() {
    if (pend_ >= 0) put_line(pend_, pa_, pb_);
    pend_ = -1;
  }

 public:
  // d: the pass's shape (its runs, planes or rows, under kMinLineRun are buffered); len: the longest block
  MapBlock(const MapOut<T>& out, const Bn3& d, int64_t len, GateEdges& edges)
      : out_(out),
        lines_(out.stream && (d.cl ? d.C : d.S) >= kMinLineRun && reinterpret_cast<uintptr_t>(out.a) % sizeof(T) == 0 &&
               (!out.b || (reinterpret_cast<uintptr_t>(out.b) - reinterpret_cast<uintptr_t>(out.a)) % 64 == 0)),
        edges_(out.gate ? &edges.mine() : nullptr),
        abuf_(out.stream && !lines_ ? len : 0),
        bbuf_(out.stream && !lines_ && out.b ? len : 0) {}

  void begin(int64_t b0, int64_t b1) {
    b0_ = b0;
    b1_ = b1;
  }

  // The run of the n elements from flat offset i0.
  template <class E>
  DLK_INLINE void run(int64_t i0, int64_t n, const E& e) {
    if (!lines_) {
      T* oa = out_.stream ? abuf_.data() + (i0 - b0_) : out_.a + i0;
      T* ob = !out_.b ? oa : out_.stream ? bbuf_.data() + (i0 - b0_) : out_.b + i0;
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) e(k, oa + k, ob + k);
      return;
    }
    // i0 inside a line (off elements in): that line is the pending one, which this run continues
    const int64_t off = static_cast<int64_t>(reinterpret_cast<uintptr_t>(out_.a + i0) % 64 / sizeof(T));
    int64_t k = 0;
    if (off != 0) {
      if (pend_ != i0 - off) {  // the block's first line, shared with the block before
        flush_pending();
        pend_ = i0 - off;
      }
      k = std::min(n, L - off);
      T* qa = pa_ + off;
      T* qb = out_.b ? pb_ + off : qa;
#pragma omp simd
      for (int64_t j = 0; j < k; ++j) e(j, qa + j, qb + j);
      if (off + k == L) flush_pending();
    }
    for (; k + L <= n; k += L) {  // whole lines, from registers (the local arrays vanish without a gate)
      alignas(64) T va[L], vb[L];
      T* qb = out_.b ? vb : va;
#pragma omp simd
      for (int64_t j = 0; j < L; ++j) e(k + j, va + j, qb + j);
      put_line(i0 + k, va, vb);
    }
    if (k < n) {  // the start of a line the next run completes
      pend_ = i0 + k;
      T* qb = out_.b ? pb_ : pa_;
#pragma omp simd
      for (int64_t j = 0; j < n - k; ++j) e(k + j, pa_ + j, qb + j);
    }
  }

  void finish() {
    if (lines_) {
      flush_pending();
      return;
    }
    if (out_.gate) store_gate(out_.stream ? abuf_.data() : out_.a + b0_, b0_, b1_, out_.gate, *edges_);
    if (out_.stream) {
      stream_copy(out_.a + b0_, abuf_.data(), b1_ - b0_);
      if (out_.b) stream_copy(out_.b + b0_, bbuf_.data(), b1_ - b0_);
    }
  }
  void done() const {
    if (out_.stream) stream_fence();
  }
};

// Whether a pass over `arrays` arrays of d's size (inputs and outputs) streams its outputs (MapOut).
template <class T>
bool streams(const Bn3& d, int arrays) {
  return streams_outputs(arrays * d.N * d.C * d.S * static_cast<int64_t>(sizeof(T)));
}

// Runs f(i, c, wk, oa, ob) for every element (flat offset i, channel c), vectorized along the
// contiguous axis: f stores its values for out.a[i] (and out.b[i]) at *oa (and *ob). The work is split
// in blocks of about RUN consecutive flat offsets: in NCS a block spans as many planes as fit, so that
// small planes (7x7) are not one scheduling unit each; in channels-last a block is whole rows.
// Always in ascending order: after the statistics (or reduce) pass, walking the blocks backwards so
// that the last-read input is reread first from the LLC did not pay (Zen4, two threads, interleaved,
// training forward + backward: by 8 KiB blocks 0.64-0.78x, the loss of the hardware prefetchers'
// streams at every block; by 512 KiB - 4 MiB pieces, 8x128x75x75, 32x256x56x56, 32x512x28x28 and
// 8x728x19x19 0.89-1.03x: no reuse seen).
template <class T, class P, class F>
void channel_map(const Bn3& d, P pre, F f, MapOut<T> out) {
  const int64_t total = d.N * d.C * d.S;
  if (total == 0) return;
  const int64_t blk_len = d.cl ? cl_group_rows(d.C) * d.C : RUN;
  const int64_t blocks = ceil_div(total, blk_len);
  GateEdges edges(out.gate != nullptr);
#pragma omp parallel if (worth_threads(total))
  {
    std::vector<T> wbuf(blk_len);
    MapBlock<T> dst(out, d, blk_len, edges);
    T* w = wbuf.data();
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t b0 = blk * blk_len, b1 = std::min(total, b0 + blk_len);
      dst.begin(b0, b1);
      if (!d.cl) {  // the block's planes: their prologue in one buffer (w[i - b0]), then the runs
        ncs_prologue(d, pre, b0, b1, w);
        ncs_segments(d, blk, [&](int64_t i0, int64_t c, int64_t len) {
          const T* wr = w + (i0 - b0);
          dst.run(i0, len, [&](int64_t k, T* oa, T* ob) DLK_LAMBDA_INLINE { f(i0 + k, c, wr[k], oa, ob); });
        });
      } else {  // the block's rows, one prologue run; a row's element k is channel k
        pre(b0, int64_t(-1), b1 - b0, w);
        for (int64_t i0 = b0; i0 < b1; i0 += d.C) {
          const T* wr = w + (i0 - b0);
          dst.run(i0, d.C, [&](int64_t k, T* oa, T* ob) DLK_LAMBDA_INLINE { f(i0 + k, k, wr[k], oa, ob); });
        }
      }
      dst.finish();
    }
    dst.done();
  }
  if (out.gate) edges.apply(out.gate);
}

// Training's second pass reads again what its first read: the forward's apply reads x after the
// statistics did, the backward's apply grad_y, y (or the residual) and x after the reduce did. In the
// order of channel_sums2 and channel_map those second reads come from DRAM again (a layer's tensors
// are far beyond the caches). In NCS a channel's data is N contiguous planes, so a thread can take
// whole channels and run both passes on each group of them back to back: the second pass finds the
// group's planes in its L2 (or L3: the reuse distance is the group's bytes, whatever the tensor's).
// A training step then moves 8 tensors instead of 11 (forward x, residual, y; backward grad_y, y or its
// relu gate, x, grad_x, grad_residual). Channels-last has no such order: a channel's elements are strided through every
// row, and reading 64 bytes of each 1 KiB row ran at half the sequential rate (two threads, Zen5,
// 19 against 35 GB/s), more than the saved reads are worth.
// Where it pays was measured (two threads, Zen5, interleaved in one process, input from DRAM, in both
// of this host's bandwidth states, copy at ~42 and ~70 GB/s):
// - planes up to kSmallPlane, forward and backward: 32x2048x7x7 forward 1.60-1.91 -> 1.01-1.09 ms,
//   backward 2.42-2.76 -> 2.08-2.12; 8x1152x7x7 0.25 -> 0.19, 0.36 -> 0.31 (the two-pass order also
//   costs more there than its bytes: its NCS blocks cut the 49-element planes);
// - larger planes, the backward where one tensor is past half the LLC (its reduce pass's three
//   inputs and dz then leave the LLC before the apply rereads them): at 42 GB/s 32x256x56x56
//   16.3-18.8 -> 12.5-14.1, 32x512x28x28 9.0-9.3 -> 6.8-7.3, 32x1024x14x14 5.0-5.3 -> 4.1-4.2,
//   8x128x75x75 3.5-3.9 -> 2.9-3.3; at 70 GB/s, where the passes are not bound by DRAM, 10.4 ->
//   11.2, 5.7 -> 5.6, 4.0 -> 3.8, 2.4 -> 2.4 (the 26-32 GB/s Zen3 and the Xeon are always bound);
// - not the forward on larger planes: 5-10 % faster at 42 GB/s, 0-37 % slower at 70 (by segments
//   of a channel group's planes, DRAM reads ran slower than one sweep); nor smaller tensors, whose
//   second reads the LLC already serves (8x728x19x19 backward 1.05 -> 1.18 ms at 70 GB/s).
// Per thread, the arrays a group's planes span must stay cached (kResidentBytes a channel), and the
// channels must be enough to keep the threads evenly busy.
// Not on AMD family 19h (Zen3/Zen4; see cl_sums_walk): on the Zen4 a group's short runs of planes
// (a few KiB at each n, the next n a channel stride away) read DRAM so much slower than the two
// sequential sweeps that the saved reads never paid. Two threads, interleaved in one process, inputs
// from DRAM, relu + residual, resident -> two passes, in three runs at copy 30-40 GB/s:
// 32x2048x7x7 forward 2.35-2.52 -> 1.94-2.02 ms, backward 3.20-3.31 -> 2.57-2.75; 8x1152x7x7 0.45 ->
// 0.33, 0.68 -> 0.41; backward 32x1024x14x14 5.45-5.91 -> 3.41-4.13, 32x512x28x28 8.96-9.50 ->
// 8.28-8.37, 32x256x56x56 17.2-17.5 -> 16.4-16.8, 8x128x75x75 3.91-3.99 -> 3.63-3.76 (one run at
// 7x7 read 3.15 / 3.53 the other way). Group sizes of 256 KiB and 1 MiB instead of 64 KiB did not
// recover the 14x14 backward (5.28, 5.38 against 5.23 and 3.97 two-pass). Later in the same session
// the host slowed (the 14x14 forward, either way, 2.8 -> 4.5 ms), and there the two orders came out
// closer: 14x14 backward 6.74-8.51 against 7.32-8.00 two-pass (resident ahead by 2-15 % in four runs
// of five), 7x7 3.31-4.00 against 2.94-3.90 (two-pass ahead in three). The Zen3 is unmeasured.
constexpr int64_t kResidentBytes = int64_t{4} << 20;
template <class T>
bool resident(const Bn3& d, int arrays, bool forward) {
  const int64_t bytes = d.N * d.C * d.S * static_cast<int64_t>(sizeof(T));
  if (d.cl || amd_family_19h() || d.C < 4 * static_cast<int64_t>(omp_get_max_threads()) ||
      arrays * d.N * d.S * static_cast<int64_t>(sizeof(T)) > kResidentBytes)
    return false;
  return d.S <= kSmallPlane || (!forward && 2 * bytes >= llc_bytes());
}

// Both passes per group of channels (NCS): sums of fs's two values over the group's planes
// (channel_group_sums, prologue pre_s), then mid(c0, c1, sa, sb) with the group's sums (sa[c - c0]),
// which sets the per-channel values fm reads, then fm over the same planes as channel_map runs it
// (prologue pre_m, outputs out). Groups of channels of about kGroupBytes a plane set, so that 7x7
// planes are not one scheduling unit each.
template <class T, class PS, class FS, class MID, class PM, class FM>
void ncs_resident(const Bn3& d, PS pre_s, FS fs, MID mid, PM pre_m, FM fm, MapOut<T> out, Ahead<T> ahead_s,
                  Ahead<T> ahead_m) {
  constexpr int64_t kGroupBytes = 64 << 10;
  const int64_t planes = d.N * d.S * static_cast<int64_t>(sizeof(T));  // one channel's, one array
  int64_t cg = std::clamp<int64_t>(kGroupBytes / planes, 1, ceil_div(d.C, omp_get_max_threads()));
  if (d.S <= kSmallPlane) cg = std::min(cg, std::max<int64_t>(1, RUN / d.S));  // accumulator rows within RUN
  const int64_t groups = ceil_div(d.C, cg);
  // Runs of consecutive groups to one thread, so that neighbouring groups' relu gate bytes (at each n
  // they share cache lines) are seldom written by both threads; the 32x2048x7x7 training forward,
  // groups of 10 channels, two threads, Zen4, took 1.70 and 1.61 ms against 1.90 and 1.74 dealt one
  // group at a time (no gate; two runs, interleaved).
  const int64_t chunk = std::max<int64_t>(1, groups / (8 * omp_get_max_threads()));
  GateEdges edges(out.gate != nullptr);
#pragma omp parallel if (worth_threads(d.N * d.C * d.S))
  {
    const bool small = d.S <= kSmallPlane;
    std::vector<T> wbuf(RUN), abuf(small ? cg * d.S : 0), bbuf(small ? cg * d.S : 0);
    MapBlock<T> dst(out, d, RUN, edges);
    std::vector<double> sa(cg), sb(cg);
    T* w = wbuf.data();
#pragma omp for schedule(dynamic, chunk)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t c0 = g * cg, c1 = std::min(d.C, c0 + cg);
      channel_group_sums(d, c0, c1, pre_s, fs, w, abuf.data(), bbuf.data(), sa.data(), sb.data(), ahead_s);
      mid(c0, c1, sa.data(), sb.data());
      GroupPrefetch<T> pf(d, c0, c1, ahead_m);
      group_blocks(d, c0, c1, pf, pre_m, w, [&](int64_t b0, int64_t b1) {
        dst.begin(b0, b1);
        ncs_runs(d, b0, b1, [&](int64_t i0, int64_t c, int64_t len) {
          const T* wr = w + (i0 - b0);
          dst.run(i0, len, [&](int64_t k, T* oa, T* ob) DLK_LAMBDA_INLINE { fm(i0 + k, c, wr[k], oa, ob); });
        });
        dst.finish();
      });
    }
    dst.done();
  }
  if (out.gate) edges.apply(out.gate);
}

// ---------------------------------------------------------------------------------------------
// argument checks
// ---------------------------------------------------------------------------------------------
Bn3 dims_of(const Buf& x3, bool cl) {
  require(x3.ndim() == 3, "batch norm: 3-D (N, C, S) views expected");
  return {x3.shape(0), x3.shape(1), x3.shape(2), cl};
}

template <class T>
const T* in3(const Buf& a, const char* name, const Bn3& d) {
  check_dense<T>(a, name, {d.N, d.C, d.S}, strides3(d.C, d.S, d.cl), false);
  return cptr<T>(a);
}
template <class T>
const T* in3_opt(const py::object& a, const char* name, const Bn3& d) {
  return a.is_none() ? nullptr : in3<T>(a.cast<Buf>(), name, d);
}
// A fresh output this large has its own mmap (glibc serves 32 MiB and more that way by default), so
// the pass's first writes fault it in 4 KiB page by page: ~70-130 ms of faults for a 103 MB output
// against ~10 ms for the pass itself on the 2-core Zen3. Transparent huge pages (THP in "madvise"
// mode there) for the 2 MiB-aligned interior cut that to ~50 faults. Advisory, and confined to whole
// pages inside the buffer; smaller outputs mostly reuse already-mapped heap memory.
void advise_huge_pages(void* p, int64_t bytes) {
#ifdef MADV_HUGEPAGE
  constexpr int64_t kMinBytes = int64_t(32) << 20;
  if (bytes < kMinBytes) return;
  const uintptr_t H = uintptr_t(1) << 21, p0 = reinterpret_cast<uintptr_t>(p);
  const uintptr_t a = (p0 + H - 1) & ~(H - 1), e = (p0 + static_cast<uintptr_t>(bytes)) & ~(H - 1);
  if (e > a) madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);
#endif
}

template <class T>
T* out3(const Buf& a, const char* name, const Bn3& d) {
  check_dense<T>(a, name, {d.N, d.C, d.S}, strides3(d.C, d.S, d.cl), true);
  advise_huge_pages(mptr<T>(a), d.N * d.C * d.S * static_cast<int64_t>(sizeof(T)));
  return mptr<T>(a);
}
template <class T>
const T* vec(const Buf& a, const char* name, const Bn3& d) {
  check_dense<T>(a, name, {d.C}, {1}, false);
  return cptr<T>(a);
}
template <class T>
const T* vec_opt(const py::object& a, const char* name, const Bn3& d) {
  return a.is_none() ? nullptr : vec<T>(a.cast<Buf>(), name, d);
}
template <class T>
T* out_vec(const Buf& a, const char* name, const Bn3& d) {
  check_dense<T>(a, name, {d.C}, {1}, true);
  return mptr<T>(a);
}

// ---------------------------------------------------------------------------------------------
// passes (below the GIL; pointers checked by the entry points)
// ---------------------------------------------------------------------------------------------
// Per-channel invstd, scale = weight * invstd and shift = bias - mean * scale: the formula of
// op._scale_shift (the compiler may fuse the shift's multiply-add, so it can differ by an ulp). Here
// rather than in Python, where it was 8-10 tiny torch ops, ~50 us a call: more than a small layer's pass.
template <class T>
struct Fold {
  std::vector<T> invstd, scale, shift;
  explicit Fold(int64_t C) : invstd(C), scale(C), shift(C) {}
  void set(int64_t c, T mu, T vr, const T* wt, const T* bs, double eps) {
    invstd[c] = T(1) / std::sqrt(vr + static_cast<T>(eps));
    scale[c] = wt ? wt[c] * invstd[c] : invstd[c];
    shift[c] = -mu * scale[c] + (bs ? bs[c] : T(0));
  }
};
template <class T>
Fold<T> fold(const Bn3& d, const T* mu, const T* vr, const T* wt, const T* bs, double eps) {
  Fold<T> f(d.C);
  for (int64_t c = 0; c < d.C; ++c) f.set(c, mu[c], vr[c], wt, bs, eps);
  return f;
}

// The statistics are sums of x - K[c] with K[c] a sample of channel c: no cancellation for a large
// mean with a small spread, which E[x^2] - E[x]^2 on raw values would suffer.
template <class T>
struct Stats {
  std::vector<T> K;
  double count;
  Stats(const Bn3& d, const T* x) : K(d.C, T(0)), count(static_cast<double>(d.N * d.S)) {
    if (d.N * d.S > 0)
      for (int64_t c = 0; c < d.C; ++c) K[c] = x[d.cl ? c : c * d.S];
  }
  // the two sums channel_sums2 takes, a = x - K[c] and a * a
  auto sums(const T* x) const {
    const T* k = K.data();
    return [=](int64_t i, int64_t c, T, T& a, T& b) {
      a = x[i] - k[c];
      b = a * a;
    };
  }
  // mean and biased variance of channel c from its two sums
  void finish(int64_t c, double sa, double sb, T* mo, T* vo) const {
    const double m1 = sa / count;
    mo[c] = static_cast<T>(K[c] + m1);
    const double v = sb / count - m1 * m1;
    vo[c] = static_cast<T>(v < 0.0 ? 0.0 : v);  // rounding below 0 clipped; a NaN kept (std::max dropped it)
  }
};

template <class T>
void stats_pass(const Bn3& d, const T* x, T* mo, T* vo) {
  const Stats<T> st(d, x);
  std::vector<double> sa(d.C), sb(d.C);
  channel_sums2<T>(d, NoPrep{}, st.sums(x), sa.data(), sb.data(), Ahead<T>{{x}});
  for (int64_t c = 0; c < d.C; ++c) st.finish(c, sa[c], sb[c], mo, vo);
}

// Runs body(f, pre) with the apply's element functor y = act(x * scale[c] + shift[c] (+ r)) and its
// prologue (silu's sigmoid), for the runtime activation and residual. sc and sh are read as f runs.
template <class T, class B>
void with_apply_fn(const T* x, const T* r, const T* sc, const T* sh, Act act, int64_t C, B body) {
  dispatch_act(act, r != nullptr, [&](auto A, auto R) {
    constexpr Act AV = decltype(A)::value;
    constexpr bool RV = decltype(R)::value;
    auto f = [=](int64_t i, int64_t c, T sig, T* yi, T*) {
      T z = x[i] * sc[c] + sh[c];
      if constexpr (RV) z += r[i];
      *yi = activate<AV>(z, sig);
    };
    if constexpr (AV == Act::Silu)
      body(f, SiluPrep<false, RV, T>{x, sc, sh, r, C});
    else
      body(f, NoPrep{});
  });
}

template <class T>
void apply_pass(const Bn3& d, const T* x, const T* r, const Fold<T>& fo, Act act, T* y, uint8_t* gate = nullptr) {
  const MapOut<T> out{y, nullptr, streams<T>(d, r ? 3 : 2), gate};
  with_apply_fn(x, r, fo.scale.data(), fo.shift.data(), act, d.C,
                [&](auto f, auto pre) { channel_map<T>(d, pre, f, out); });
}

// The training forward with both passes per channel group (ncs_resident): statistics, the fold, apply.
template <class T>
void forward_train_resident(const Bn3& d, const T* x, const T* r, const T* wt, const T* bs, double eps, Act act,
                            T* mo, T* vo, T* y, uint8_t* gate) {
  const Stats<T> st(d, x);
  Fold<T> fo(d.C);
  auto mid = [&](int64_t c0, int64_t c1, const double* sa, const double* sb) {
    for (int64_t c = c0; c < c1; ++c) {
      st.finish(c, sa[c - c0], sb[c - c0], mo, vo);
      fo.set(c, mo[c], vo[c], wt, bs, eps);
    }
  };
  const MapOut<T> out{y, nullptr, streams<T>(d, r ? 3 : 2), gate};
  with_apply_fn(x, r, fo.scale.data(), fo.shift.data(), act, d.C, [&](auto f, auto pre) {
    ncs_resident<T>(d, NoPrep{}, st.sums(x), mid, pre, f, out, Ahead<T>{{x}}, Ahead<T>{{r}});
  });
}

// The per-element pieces both backward passes share.
// gate: the forward's relu gate bits, for Act::ReluGate.
template <class T>
struct BwdInputs {
  const T *gy, *y, *x, *r, *mean, *invstd, *scale, *shift;
  const uint8_t* gate;
};

template <Act A, bool RES, class T>
DLK_INLINE T dz_at(const BwdInputs<T>& b, int64_t i, T wk) {
  return act_grad<A>(b.gy[i], A == Act::Relu ? b.y[i] : T(0), wk);
}

// Runs loop(pre) with the prologue act_grad's w comes from: silu's derivative, relu's gate, or none.
template <Act A, bool RES, class T, class L>
DLK_INLINE void with_bwd_prep(const BwdInputs<T>& b, int64_t C, L loop) {
  if constexpr (A == Act::Silu)
    loop(SiluPrep<true, RES, T>{b.x, b.scale, b.shift, b.r, C});
  else if constexpr (A == Act::ReluGate)
    loop(GatePrep<T>{b.gate});
  else
    loop(NoPrep{});
}

// The third array the backward's passes stream besides grad_y and x: y for relu, the residual for silu,
// none otherwise (prefetched as Ahead's third).
template <class T>
const T* bwd_third(const BwdInputs<T>& b, Act act) {
  return act == Act::Relu ? b.y : act == Act::Silu ? b.r : nullptr;
}

// Per-channel sums of dz and dz * (x - mean) in double (sa, sb), and dz itself into dzo unless null.
// Channels-last, it names the arrays it reads (grad_y, x, and bwd_third's) for channel_sums2's
// four-row path: relu with dz written, two threads, Zen5, interleaved in one process, copy at 71-74
// GB/s: 32x256x56x56 7.9-8.1 -> 7.4 ms, 32x512x28x28 3.95-4.0 -> 3.5, 8x128x75x75 1.9 -> 1.43,
// 32x1024x14x14 1.93 -> 1.80 (2-7 % at 46-52 GB/s; 8 of 8 pairs in each state). Tried and dropped:
// dz streamed out with non-temporal stores from a four-row buffer, as channel_map streams: slower at
// 56x56, 28x28 and 14x14 (28x28 3.58 -> 4.02 ms at 73 GB/s; 1-3 % at 42), faster only at 8x128x75x75
// (1.40 -> 1.31), in the same interleaved runs.
// The reduce pass's element functor: dz and dz * (x - mean[c]), writing dz to dzo[i] when WRITE.
template <Act A, bool RES, bool WRITE, class T>
auto reduce_fn(const BwdInputs<T>& b, T* dzo) {
  return [=](int64_t i, int64_t c, T wk, T& a, T& s) {
    a = dz_at<A, RES>(b, i, wk);
    if constexpr (WRITE) dzo[i] = a;
    s = a * (b.x[i] - b.mean[c]);
  };
}

template <class T>
void reduce_pass(const Bn3& d, const BwdInputs<T>& b, Act act, T* dzo, double* sa, double* sb) {
  dispatch_act(act, b.r != nullptr, [&](auto A, auto R) {
    constexpr Act AV = decltype(A)::value;
    constexpr bool RV = decltype(R)::value;
    with_bwd_prep<AV, RV>(b, d.C, [&](auto pre) {
      const Ahead<T> ahead{{b.gy, b.x, bwd_third(b, AV)}};
      if (dzo)
        channel_sums2<T>(d, pre, reduce_fn<AV, RV, true>(b, dzo), sa, sb, ahead);
      else
        channel_sums2<T>(d, pre, reduce_fn<AV, RV, false>(b, dzo), sa, sb, ahead);
    });
  });
}

// The apply pass's element functor: grad_x = scale[c] * (dz - c_dz[c] - (x - mean[c]) * cx[c]) in
// training (CENTRE), scale[c] * dz in evaluation (GX), and dz (GR), into the first output and the next.
// Evaluation's grad_x does not read x: with zero terms instead, an infinite or NaN input made its own
// gradient NaN (inf * 0), where torch's is finite.
template <Act A, bool RES, bool GX, bool GR, bool CENTRE, class T>
auto bwd_apply_fn(const BwdInputs<T>& b, const T* cdz, const T* cx) {
  return [=](int64_t i, int64_t c, T wk, T* o1, T* o2) {
    const T dz = dz_at<A, RES>(b, i, wk);
    if constexpr (GX && CENTRE) *o1 = b.scale[c] * (dz - cdz[c] - (b.x[i] - b.mean[c]) * cx[c]);
    if constexpr (GX && !CENTRE) *o1 = b.scale[c] * dz;
    if constexpr (GR) *(GX ? o2 : o1) = dz;
  };
}

// The arrays a backward apply pass streams (see streams): grad_y and the outputs, x for grad_x, and
// bwd_third's.
template <class T>
int bwd_apply_arrays(const BwdInputs<T>& b, Act act, const T* gx, const T* gr) {
  return 1 + (gx ? 2 : 0) + (gr ? 1 : 0) + (bwd_third(b, act) ? 1 : 0);
}

// grad_x (with c_dz, cx; both null in evaluation) into gx, and dz into gr (either may be null).
template <class T>
void bwd_apply_pass(const Bn3& d, const BwdInputs<T>& b, const T* cdz, const T* cx, Act act, T* gx, T* gr) {
  const bool stream = streams<T>(d, bwd_apply_arrays(b, act, gx, gr));
  dispatch_act(act, b.r != nullptr, [&](auto A, auto R) {
    constexpr Act AV = decltype(A)::value;
    constexpr bool RV = decltype(R)::value;
    with_bwd_prep<AV, RV>(b, d.C, [&](auto pre) {
      if (!gx) {
        channel_map<T>(d, pre, bwd_apply_fn<AV, RV, false, true, false>(b, cdz, cx), MapOut<T>{gr, nullptr, stream});
        return;
      }
      with_bool(cx != nullptr, [&](auto CT) {
        constexpr bool CV = decltype(CT)::value;
        if (gr)
          channel_map<T>(d, pre, bwd_apply_fn<AV, RV, true, true, CV>(b, cdz, cx), MapOut<T>{gx, gr, stream});
        else
          channel_map<T>(d, pre, bwd_apply_fn<AV, RV, true, false, CV>(b, cdz, cx), MapOut<T>{gx, nullptr, stream});
      });
    });
  });
}

// Both backward passes per channel group (ncs_resident), for grad_x (and grad_residual = dz into gr
// unless null): terms(c, sum_dz, sum_dz_xc) turns a channel's sums into its c_dz and cx (and the sum
// outputs) between them. The arrays both passes read: grad_y, x, and y (relu) or the residual (silu).
template <class T>
int bwd_resident_arrays(const BwdInputs<T>& b, Act act) {
  return 2 + (bwd_third(b, act) ? 1 : 0);
}
template <class T, class Terms>
void backward_resident(const Bn3& d, const BwdInputs<T>& b, Act act, Terms terms, const T* cdz, const T* cx, T* gx,
                       T* gr) {
  const bool stream = streams<T>(d, bwd_apply_arrays(b, act, gx, gr));
  auto mid = [&](int64_t c0, int64_t c1, const double* sa, const double* sb) {
    for (int64_t c = c0; c < c1; ++c) terms(c, sa[c - c0], sb[c - c0]);
  };
  dispatch_act(act, b.r != nullptr, [&](auto A, auto R) {
    constexpr Act AV = decltype(A)::value;
    constexpr bool RV = decltype(R)::value;
    with_bwd_prep<AV, RV>(b, d.C, [&](auto pre) {
      auto fs = reduce_fn<AV, RV, false>(b, static_cast<T*>(nullptr));
      const Ahead<T> ahead{{b.gy, b.x, bwd_third(b, AV)}};
      with_bool(cx != nullptr, [&](auto CT) {
        constexpr bool CV = decltype(CT)::value;
        if (gr)
          ncs_resident<T>(d, pre, fs, mid, pre, bwd_apply_fn<AV, RV, true, true, CV>(b, cdz, cx),
                          MapOut<T>{gx, gr, stream}, ahead, Ahead<T>{});
        else
          ncs_resident<T>(d, pre, fs, mid, pre, bwd_apply_fn<AV, RV, true, false, CV>(b, cdz, cx),
                          MapOut<T>{gx, nullptr, stream}, ahead, Ahead<T>{});
      });
    });
  });
}

// ---------------------------------------------------------------------------------------------
// entry points (the kernel contract of dlkernels/batchnorm/op.py)
// ---------------------------------------------------------------------------------------------
// The per-channel arguments every entry takes: statistics, and the optional weight and bias.
template <class T>
struct Affine {
  const T *mean, *var, *weight, *bias;
  Fold<T> fold(const Bn3& d, double eps) const { return dlk::fold<T>(d, mean, var, weight, bias, eps); }
};
template <class T>
Affine<T> affine(const Buf& mean, const Buf& var, const py::object& weight, const py::object& bias,
                 const Bn3& d) {
  return {vec<T>(mean, "mean", d), vec<T>(var, "var", d), vec_opt<T>(weight, "weight", d),
          vec_opt<T>(bias, "bias", d)};
}

void py_apply(const Buf& x3, const py::object& res3, const Buf& mean, const Buf& var,
              const py::object& weight, const py::object& bias, double eps, const std::string& activation,
              const Buf& y3, bool cl) {
  const Bn3 d = dims_of(x3, cl);
  const Act act = parse_act(activation);
  dispatch_float(x3, "bn_apply", [&](auto tag) {
    using T = decltype(tag);
    const T* x = in3<T>(x3, "x3", d);
    const T* r = in3_opt<T>(res3, "residual3", d);
    const Affine<T> a = affine<T>(mean, var, weight, bias, d);
    T* y = out3<T>(y3, "y3", d);
    py::gil_scoped_release nogil;
    apply_pass<T>(d, x, r, a.fold(d, eps), act, y);
  });
}

// The relu gate array (gate_bytes of the tensor's elements, uint8), or nullptr for None.
uint8_t* gate_arg(const py::object& g, const Bn3& d, Act act) {
  if (g.is_none()) return nullptr;
  require(act == Act::Relu, "relu_gate: only relu has a gate");
  Buf a = g.cast<Buf>();
  require(a.holds<uint8_t>() && a.ndim() == 1 && (a.shape(0) <= 1 || a.stride(0) == 1),
          "relu_gate: a contiguous 1-D uint8 array expected");
  require(a.shape(0) >= gate_bytes(d.N * d.C * d.S), "relu_gate: ", a.shape(0), " bytes, expected ",
          gate_bytes(d.N * d.C * d.S));
  require(a.writeable(), "relu_gate: read-only array");
  return static_cast<uint8_t*>(a.mutable_data());
}

template <class T>
T* out3_opt(const py::object& a, const char* name, const Bn3& d) {
  if (a.is_none()) return nullptr;
  Buf arr = a.cast<Buf>();  // a view of the caller's array: its data outlives the call
  return out3<T>(arr, name, d);
}
template <class T>
T* out_vec_opt(const py::object& a, const char* name, const Bn3& d) {
  if (a.is_none()) return nullptr;
  Buf arr = a.cast<Buf>();
  return out_vec<T>(arr, name, d);
}

// running = running + momentum * (batch - running), the batch variance unbiased (count values a
// channel), in the arithmetic of op.update_running_stats_op's torch ops on a CPU tensor, so that the two
// update paths agree to the bit: the variance times the factor rounded to T, then ATen's lerp (a fused
// multiply-add from the nearer end).
template <class T>
void update_running(const T* mean, const T* var, double momentum, double count, int64_t C, T* run_mean, T* run_var) {
  const T w = static_cast<T>(momentum), unbias = static_cast<T>(count / (count - 1));
  auto lerp = [w](T start, T end) {
    const T diff = end - start;
    return std::abs(w) < T(0.5) ? std::fma(w, diff, start) : std::fma(w - T(1), diff, end);
  };
  for (int64_t c = 0; c < C; ++c) {
    run_mean[c] = lerp(run_mean[c], mean[c]);
    // rounded on its own, as torch's multiply is: contracted into lerp's subtraction (an fma) it was not
    const volatile T unbiased = var[c] * unbias;
    run_var[c] = lerp(run_var[c], unbiased);
  }
}

// Training forward in one call: the statistics pass, then the apply pass with them; relu's gate bits
// too where gate is given, and the running statistics' update where they are given.
void py_forward_train(const Buf& x3, const py::object& res3, const py::object& weight,
                      const py::object& bias, double eps, const std::string& activation, const Buf& mean,
                      const Buf& var, const Buf& y3, const py::object& gate3, bool cl,
                      const py::object& running_mean, const py::object& running_var, double momentum) {
  const Bn3 d = dims_of(x3, cl);
  const Act act = parse_act(activation);
  require(running_mean.is_none() == running_var.is_none(), "bn_forward_train: running_mean and running_var go together");
  require(running_mean.is_none() || d.N * d.S > 1, "bn_forward_train: the running update needs two values a channel");
  dispatch_float(x3, "bn_forward_train", [&](auto tag) {
    using T = decltype(tag);
    const T* x = in3<T>(x3, "x3", d);
    const T* r = in3_opt<T>(res3, "residual3", d);
    const T* wt = vec_opt<T>(weight, "weight", d);
    const T* bs = vec_opt<T>(bias, "bias", d);
    T* mo = out_vec<T>(mean, "mean", d);
    T* vo = out_vec<T>(var, "var", d);
    T* rmo = out_vec_opt<T>(running_mean, "running_mean", d);
    T* rvo = out_vec_opt<T>(running_var, "running_var", d);
    T* y = out3<T>(y3, "y3", d);
    uint8_t* gate = gate_arg(gate3, d, act);
    // the bytes past the last whole byte of bits, zero: the passes set only the tensor's bits in them
    if (gate) std::memset(gate + d.N * d.C * d.S / 8, 0, gate_bytes(d.N * d.C * d.S) - d.N * d.C * d.S / 8);
    py::gil_scoped_release nogil;
    if (resident<T>(d, 1, true)) {
      forward_train_resident<T>(d, x, r, wt, bs, eps, act, mo, vo, y, gate);
    } else {
      stats_pass<T>(d, x, mo, vo);
      apply_pass<T>(d, x, r, fold<T>(d, mo, vo, wt, bs, eps), act, y, gate);
    }
    if (rmo) update_running<T>(mo, vo, momentum, static_cast<double>(d.N * d.S), d.C, rmo, rvo);
  });
}

// The whole backward in one call, as op.compose_backward runs it from the two passes (see there): the
// reduce pass where sums are asked for (writing dz into grad_r3 where it is grad_residual under an
// activation), then the apply pass for grad_x3 (and grad_r3 where the reduce did not write it).
void py_backward(const Buf& gy3, const py::object& y3, const py::object& gate3, const Buf& x3,
                 const py::object& res3, const Buf& mean, const Buf& var, const py::object& weight,
                 const py::object& bias, double eps, bool training, const std::string& activation,
                 const py::object& sum_dz, const py::object& sum_dz_xhat, const py::object& gx3,
                 const py::object& gr3, bool cl) {
  const Bn3 d = dims_of(x3, cl);
  const Act named = parse_act(activation);
  dispatch_float(x3, "bn_backward", [&](auto tag) {
    using T = decltype(tag);
    const T* gy = in3<T>(gy3, "grad_y3", d);
    const T* y = in3_opt<T>(y3, "y3", d);
    const T* x = in3<T>(x3, "x3", d);
    const T* r = in3_opt<T>(res3, "residual3", d);
    const Affine<T> a = affine<T>(mean, var, weight, bias, d);
    const T* mu = a.mean;
    T* o_dz = out_vec_opt<T>(sum_dz, "sum_dz", d);
    T* o_dzx = out_vec_opt<T>(sum_dz_xhat, "sum_dz_xhat", d);
    T* gx = out3_opt<T>(gx3, "grad_x3", d);
    T* gr = out3_opt<T>(gr3, "grad_residual3", d);
    const uint8_t* gate = gate_arg(gate3, d, named);
    require(named != Act::Relu || y || gate, "bn_backward: relu needs y3 or its gate");
    const Act act = gate ? Act::ReluGate : named;
    require((o_dz == nullptr) == (o_dzx == nullptr), "bn_backward: sum_dz and sum_dz_xhat go together");
    require(!(training && gx) || o_dz, "bn_backward: grad_x3 in training needs the sums");
    py::gil_scoped_release nogil;
    const Fold<T> fo = a.fold(d, eps);
    const BwdInputs<T> b{gy, y, x, r, mu, fo.invstd.data(), fo.scale.data(), fo.shift.data(), gate};
    // Per channel: the sum outputs, and grad_x's terms c_dz = sum_dz / count and invstd * c_xhat (unused
    // in evaluation, where grad_x does not depend on the batch)
    std::vector<T> cdz(d.C, T(0)), cx(d.C, T(0));
    const double cnt = static_cast<double>(d.N * d.S);
    auto terms = [&, training](int64_t c, double sdz, double sdzx) {
      o_dz[c] = static_cast<T>(sdz);
      o_dzx[c] = static_cast<T>(sdzx * fo.invstd[c]);
      if (training) {
        cdz[c] = static_cast<T>(sdz / cnt);
        cx[c] = fo.invstd[c] * static_cast<T>(sdzx * fo.invstd[c] / cnt);
      }
    };
    T* const cdz_or_null = training ? cdz.data() : nullptr;  // null: evaluation's grad_x, no centring
    T* const cx_or_null = training ? cx.data() : nullptr;
    if (o_dz && gx && resident<T>(d, bwd_resident_arrays(b, act), false)) {
      backward_resident<T>(d, b, act, terms, cdz_or_null, cx_or_null, gx, gr);
      return;
    }
    const bool dz_written = o_dz && gr && act != Act::None;
    if (o_dz) {
      std::vector<double> sa(d.C, 0.0), sb(d.C, 0.0);
      reduce_pass<T>(d, b, act, dz_written ? gr : nullptr, sa.data(), sb.data());
      for (int64_t c = 0; c < d.C; ++c) terms(c, sa[c], sb[c]);
    }
    if (!gx && (!gr || dz_written)) return;
    if (dz_written)  // the apply reads dz and x instead of grad_y, y (or the residual) and x
      bwd_apply_pass<T>(d, BwdInputs<T>{gr, nullptr, x, nullptr, mu, b.invstd, b.scale, b.shift, nullptr},
                        cdz_or_null, cx_or_null, Act::None, gx, nullptr);
    else
      bwd_apply_pass<T>(d, b, cdz_or_null, cx_or_null, act, gx, gr);
  });
}

}  // namespace

void init_batchnorm(py::module_& m) {
  using namespace pybind11::literals;
  m.def("bn_apply", &py_apply, "x3"_a, "residual3"_a.none(true), "mean"_a, "var"_a, "weight"_a.none(true),
        "bias"_a.none(true), "eps"_a, "activation"_a, "y3"_a, "channels_last"_a,
        "y3 = act((x3 - mean[c]) / sqrt(var[c] + eps) * weight[c] + bias[c] + residual3)");
  m.def("bn_forward_train", &py_forward_train, "x3"_a, "residual3"_a.none(true), "weight"_a.none(true),
        "bias"_a.none(true), "eps"_a, "activation"_a, "mean"_a, "var"_a, "y3"_a, "relu_gate"_a.none(true),
        "channels_last"_a, "running_mean"_a.none(true) = py::none(), "running_var"_a.none(true) = py::none(),
        "momentum"_a = 0.0,
        "batch mean and biased variance of x3 into mean and var, then bn_apply with them into y3 (and, for relu, "
        "the gate bits !(y <= 0) into relu_gate unless None); then, unless None, running_mean and running_var "
        "updated in place with momentum (the variance unbiased), as batch norm's training does");
  m.def("bn_backward", &py_backward, "grad_y3"_a, "y3"_a.none(true), "relu_gate"_a.none(true), "x3"_a,
        "residual3"_a.none(true), "mean"_a, "var"_a, "weight"_a.none(true), "bias"_a.none(true), "eps"_a, "training"_a, "activation"_a,
        "sum_dz"_a.none(true), "sum_dz_xhat"_a.none(true), "grad_x3"_a.none(true), "grad_residual3"_a.none(true),
        "channels_last"_a, "batch norm backward into the given outputs (each may be None)");
}

}  // namespace dlk
