// Fused separable conv: depthwise k x k then pointwise 1 x 1, the depthwise intermediate kept in
// cache rather than written to memory in full.
// Channels_last: one BLIS-style GEMM whose pixel operand is produced by the depthwise conv. The
// pointwise weight is packed once into the GEMM's panel layout, shared read-only by the threads
// (re-packing it per pixel block, as a call of dlk::gemm per block does, cost more than the
// arithmetic at Xception's 728-1536 channels). Each task then computes the depthwise output of a
// few whole output rows for all C*m channels into an L2-sized thread buffer and runs the GEMM's
// micro-kernel on it against the packed weight, bias fused into the last K slice's store.
// NCHW, and channels_last on small planes: blocks of whole images, each's depthwise output into an
// LLC-sized buffer by the depthwise forward's kernels, then the block's GEMM (fwd_image_blocks).
// Contract: dlkernels/separable/op.py.
#include "depthwise.h"
#include "gemm.h"

#include <memory>

namespace dlk {
namespace {

inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

int team_size(const DwGeom& g, int64_t O) {
  const int64_t macs = g.N * g.Ho * g.Wo * g.Cm * (g.kH * g.kW + O);
  return macs < kMinParallelMacs ? 1 : omp_get_max_threads();
}

// Output rows per task. The pixel operand's packed K slice (pixels x kc) must stay in L2 beside
// the weight's panels; beyond that, more pixels per task mean fewer passes over the packed weight
// (it streams from L3 once per task and slice) and, for NCHW, less padding of the last NR-pixel
// panel: so the block is sized by the slice, not by the whole depthwise block (pixels x C*m, which
// only goes through L3 once). Capped so the thread buffer stays small, and enough tasks to balance
// the threads.
int64_t block_rows(const DwGeom& g, int64_t kc, size_t elem, int threads) {
  constexpr int64_t SLICE_BYTES = 192 * 1024;
  constexpr int64_t MID_BYTES = 1024 * 1024;
  const int64_t px = std::max<int64_t>(1, g.Wo) * static_cast<int64_t>(elem);
  const int64_t balanced = threads > 1 ? g.N * g.Ho / (4 * threads) : g.Ho;
  return std::max<int64_t>(1, std::min({SLICE_BYTES / (px * kc), MID_BYTES / (px * g.Cm), balanced, g.Ho}));
}

// The K (= C*m) slices of the GEMM: equal slices of at most the GEMM's kc, as dlk::gemm cuts them.
struct Slices {
  int64_t K, kc;
  explicit Slices(int64_t K_, int64_t kc_max) : K(K_), kc(ceil_div(K_, ceil_div(K_, kc_max))) {}
  int64_t len(int64_t pc) const { return std::min(kc, K - pc); }
};

// Blocks of whole images, each's depthwise output computed into a buffer of about a quarter of the
// LLC (or one image's, if larger, kept by the thread between calls) by the depthwise forward's own
// kernels, then multiplied by the pointwise weight while it is still in cache; the intermediate
// never goes to DRAM in full. NCHW (Cm x Ho*Wo an image): gemm_shared_a, the weight A shared by the
// block's images (small planes as one product over the block's pixels). Channels_last (Ho*Wo x Cm
// an image): one GEMM over the block's pixels.
// NCHW always: the row-block fusion this replaced there (each task a few output rows of one image
// for all channels, packed into the GEMM's panels) computed the depthwise rows in short pieces and
// copied them once more: slower than the two kernels apart at every bench shape (Zen5, two
// threads, input from DRAM, ms, fused / apart: 8x144x56x56 k3 -> 24 1.99 / 1.09, 8x96x112x112 k3 s2
// -> 24 2.09 / 1.45, 8x256x38x38 s2 -> 256 1.69 / 1.27, 8x128x75x75 -> 128 5.70 / 5.27).
// Channels_last on planes of up to max_pixels outputs whose whole batch's intermediate fits one
// block (image_blocks_cl): there fwd_cl's tasks (a few output rows of one image) feed its GEMM a
// pixel operand of a few dozen rows, mostly padding of the micro-kernel's tiles. Two threads, Zen5,
// 3x3, C -> O, fused -> blocks (ms): 8x512x3x3 -> 512 0.220 -> 0.148, 8x128x11x11 -> 128 0.103 ->
// 0.099, 32x512x7x7 -> 512 2.19 -> 1.97, Xception exit 8x1024x10x10 -> 1536 6.35 -> 5.98. From
// 14x14 on fwd_cl is as fast or faster (8x728x19x19 7.17 against 7.31); blocks on larger
// channels-last planes measured within the noise of it, slower at 8x144x56x56 k3 and
// 8x96x112x112 k3 s2.
template <class T>
bool image_blocks_cl(const DwGeom& g, int64_t max_pixels) {
  const int64_t mid_bytes = g.N * g.Cm * g.Ho * g.Wo * static_cast<int64_t>(sizeof(T));
  return g.Ho * g.Wo <= max_pixels && 4 * mid_bytes <= llc_bytes();
}

template <class T>
void fwd_image_blocks(const T* x, const T* dw, const T* pw, const T* bias, T* y, int64_t O, const DwGeom& g,
                      bool cl) {
  const int64_t HWo = g.Ho * g.Wo, per_image = g.Cm * HWo;
  const int64_t fit = std::clamp<int64_t>(llc_bytes() / 4 / (per_image * static_cast<int64_t>(sizeof(T))), 1, g.N);
  const int64_t imgs = ceil_div(g.N, ceil_div(g.N, fit));  // equal blocks: 8 images in 4 + 4, not 6 + 2
  T* mid = thread_buffer<struct SeparableMid, T>(static_cast<size_t>(imgs * per_image));
  for (int64_t n0 = 0; n0 < g.N; n0 += imgs) {
    DwGeom gb = g;
    gb.N = std::min(imgs, g.N - n0);
    depthwise_forward(x + n0 * g.C * g.H * g.W, dw, (const T*)nullptr, mid, gb, cl);
    if (cl)
      gemm(gb.N * HWo, O, g.Cm, mid, g.Cm, int64_t(1), pw, int64_t(1), g.Cm, y + n0 * HWo * O, O, bias, 1, false,
           true);
    else
      gemm_shared_a(gb.N, O, HWo, g.Cm, pw, g.Cm, int64_t(1), mid, per_image, HWo, int64_t(1), y + n0 * O * HWo,
                    bias);
  }
}

template <class T>
void fwd_cl(const T* x, const T* dw, const T* pw, const T* bias, T* y, int64_t O, const DwGeom& g0) {
  const DwGeom g = cl_padded<T>(g0);
  // y pixels (P x O) = depthwise (P x Cm) @ pw^T (Cm x O): the weight is B, O columns of C (the
  // tile gemm would take for them: MobileNetV2's 24-output projections get the 4 x 3-vector tile on
  // AVX2, the vector-and-a-half one on AVX-512).
  const GemmBlocking bl = gemm_blocking<T>(O);
  const Slices ks(g.Cm, bl.kc);
  const int64_t HWo = g.Ho * g.Wo, Np = round_up(O, bl.nr);
  const int nt = team_size(g, O);
  const int64_t rows = block_rows(g, ks.kc, sizeof(T), nt), nb = ceil_div(g.Ho, rows), pmax = rows * g.Wo;
  const std::vector<T> wt = taps_major(dw, g.Cm, g.kH * g.kW, g.ws);
  std::vector<T> b(static_cast<size_t>(Np * g.Cm));  // K slice pc at b + pc * Np
#pragma omp parallel num_threads(nt)
  {
#pragma omp for schedule(static)
    for (int64_t pc = 0; pc < g.Cm; pc += ks.kc) gemm_pack_b(bl, O, ks.len(pc), pw + pc, 1, g.Cm, b.data() + pc * Np);
    std::vector<T> mid(static_cast<size_t>(g.Cm * pmax)), a(static_cast<size_t>(round_up(pmax, bl.mr) * ks.kc));
    const bool in_place = gemm_a_in_place(O, bl.nr);  // few outputs: depthwise rows read where they are
    // Multiplier 1: the depthwise forward's row kernels (ClRowSource, x read in place where it
    // allows), else the pixel-at-a-time kernel. At stride 1 reading x in place was slower until the
    // next task's input was prefetched (Zen5, two threads, interleaved, 64 outputs, ring -> x:
    // 8x128x75x75 2.70-2.84 -> 2.80-3.07 ms); with it, 128 outputs 4.01 -> 3.94 ms, 8x144x56x56 -> 24
    // 1.00-1.02 -> 0.95. Stride 2 (two rows staged an output row): 8x96x112x112 2.19-2.25 -> 1.90-2.00
    // without the prefetch.
    std::unique_ptr<ClRowSource<T>> src(g.m == 1 ? new ClRowSource<T>(g, true) : nullptr);
    // Contiguous runs of tasks per thread (consecutive row blocks of an image): the ring then
    // carries the input rows two blocks share, where dynamic scheduling re-staged them. Zen5, two
    // threads, interleaved: Xception entry 4.18 -> 3.99 ms, MobileNetV2 144->24 1.13 -> 1.09,
    // Xception middle/exit and the stride-2 cases within 1 %.
    // The input rows task t reads, fetched into L2 while task t - 1 multiplies (the GEMM otherwise
    // left DRAM idle, and the next rows' depthwise waited on it). Interleaved, two threads, input
    // from DRAM, 64-byte channel vectors: 8x96x112x112 s2 -> 24 1.56 -> 1.33 ms, 8x144x56x56 -> 24
    // 1.11 -> 1.00, 8x256x38x38 s2 1.23 -> 1.13, Xception entry 4.17 -> 3.98, middle the same; into
    // L1 the same.
    auto task_input = [&](int64_t t) {
      if (t >= g.N * nb) return LinePrefetch();
      const int64_t n = t / nb, i0 = (t % nb) * rows;
      LinePrefetch pf = window_rows(x + n * g.H * g.W * g.C, i0, std::min(g.Ho, i0 + rows), g, g.W * g.C);
      pf.l2 = true;
      return pf;
    };
#pragma omp for schedule(static)
    for (int64_t t = 0; t < g.N * nb; ++t) {
      const int64_t n = t / nb, i0 = (t % nb) * rows, i1 = std::min(g.Ho, i0 + rows), P = (i1 - i0) * g.Wo;
      const T* xn = x + n * g.H * g.W * g.C;
      for (int64_t i = i0; i < i1; ++i) {
        T* mr = mid.data() + (i - i0) * g.Wo * g.Cm;
        if (src) {
          src->row(
              xn, n, i,
              [&](const T* const* rows, int64_t ps, const DwGeom& piece, int64_t j0) {
                cl_staged_row(rows, ps, xn, i, wt.data(), (const T*)nullptr, mr + j0 * g.Cm, piece);
              },
              [&](int64_t j0, int64_t j1) { cl_edge_pixels(xn, wt.data(), (const T*)nullptr, mr, i, j0, j1, g); });
        } else {
          for (int64_t j = 0; j < g.Wo; ++j) dw_pixel_cl(xn, wt.data(), (const T*)nullptr, mr + j * g.Cm, i, j, g);
        }
      }
      T* yb = y + (n * HWo + i0 * g.Wo) * O;
      LinePrefetch next_in = task_input(t + 1);
      for (int64_t pc = 0; pc < g.Cm; pc += ks.kc) {
        const int64_t kc = ks.len(pc);
        if (!in_place) gemm_pack_a(bl, P, kc, mid.data() + pc, g.Cm, 1, a.data());
        gemm_macro(bl, P, O, kc, in_place ? mid.data() + pc : a.data(), b.data() + pc * Np, yb, O, pc > 0,
                   (const T*)nullptr, pc + kc >= g.Cm ? bias : nullptr, in_place ? g.Cm : 0, a.data(), &next_in);
      }
    }
  }
}

void py_fwd(const Buf& x, const Buf& dw, const Buf& pw, const py::object& bias, const Buf& y,
            int64_t sH, int64_t sW, int64_t pT, int64_t pL, int64_t dH, int64_t dW, bool cl,
            int64_t max_block_pixels) {
  require(x.ndim() == 4 && dw.ndim() == 4 && pw.ndim() == 2 && y.ndim() == 4,
          "separable_fwd: 4-D x, dw_weight, y and 2-D pw_weight expected");
  const DwGeom g = make_geom(x.shape(0), x.shape(1), x.shape(2), x.shape(3), dw.shape(0), dw.shape(2), dw.shape(3),
                             y.shape(2), y.shape(3), sH, sW, pT, pL, dH, dW);
  const int64_t O = pw.shape(0);
  dispatch_float(x, "separable_fwd", [&](auto tag) {
    using T = decltype(tag);
    check_dense<T>(x, "x", {g.N, g.C, g.H, g.W}, strides4(g.C, g.H, g.W, cl), false);
    check_dense<T>(dw, "dw_weight", {g.Cm, 1, g.kH, g.kW}, {g.kH * g.kW, g.kH * g.kW, g.kW, 1}, false);
    check_dense<T>(pw, "pw_weight", {O, g.Cm}, {g.Cm, 1}, false);
    check_dense<T>(y, "y", {g.N, O, g.Ho, g.Wo}, strides4(O, g.Ho, g.Wo, cl), true);
    const T* b = nullptr;
    if (!bias.is_none()) {
      Buf ba = bias.cast<Buf>();
      check_dense<T>(ba, "bias", {O}, {1}, false);
      b = cptr<T>(ba);
    }
    py::gil_scoped_release nogil;
    if (g.N * g.Ho * g.Wo == 0 || O == 0) return;
    if (cl && !image_blocks_cl<T>(g, max_block_pixels))
      fwd_cl(cptr<T>(x), cptr<T>(dw), cptr<T>(pw), b, mptr<T>(y), O, g);
    else
      fwd_image_blocks(cptr<T>(x), cptr<T>(dw), cptr<T>(pw), b, mptr<T>(y), O, g, cl);
  });
}

}  // namespace

void init_separable(py::module_& m) {
  using namespace pybind11::literals;
  m.def("separable_fwd", &py_fwd, "x"_a, "dw_weight"_a, "pw_weight"_a, "bias"_a.none(true), "y"_a, "sH"_a, "sW"_a,
        "pT"_a, "pL"_a, "dH"_a, "dW"_a, "channels_last"_a, "max_block_pixels"_a,
        "y = pointwise(depthwise(x)) + bias, fused: the depthwise output stays in cache-sized blocks (NCHW, and "
        "channels_last planes of up to max_block_pixels outputs: blocks of whole images)");
}

}  // namespace dlk
