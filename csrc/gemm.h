// dlk::gemm: the project's CPU GEMM, callable from any kernel in csrc/ (defined in matmul.cpp,
// instantiated for float and double).
//
//   C[i, j] = act( (accumulate ? C[i, j] : 0) + sum_k A[i, k] * B[k, j] + bias )
//
//   A element (i, k) is A[i * rs_a + k * cs_a]; B element (k, j) is B[k * rs_b + j * cs_b].
//   Any non-negative strides, 0 included (a broadcast row or column), so a transposed operand is
//   just swapped strides: both operands are packed into the micro-kernel's layout anyway.
//   C is row-major with leading dimension ldc >= N (column stride 1) and must not overlap A or B.
//   bias: nullptr, or N values (bias_dim = 1, one per column) or M values (bias_dim = 0, one per
//   row). relu: max(x, 0) that keeps NaN (only x < 0 becomes 0), applied after the bias.
//   Bias and relu are fused into the last K block's store: C is written once per K block.
//   M, N or K may be 0 (K = 0 gives C = act((accumulate ? C : 0) + bias)).
//
// Threads: parallel = true runs an OpenMP team of omp_get_max_threads() threads, each on its own
// block of C (one thread when the product is too small to pay for a team). parallel = false runs
// entirely on the calling thread and uses no OpenMP construct at all, so it is safe to call from
// inside the caller's own `omp parallel` region, one independent GEMM per thread: e.g. a fused
// kernel that computes a cache-sized block of its intermediate and then multiplies it.
//
// Memory: packing buffers belong to the calling thread (thread_local, grown on demand and kept, so
// a steady-state call allocates nothing): up to about 4.3 MiB per thread of the team (parallel) or
// for the caller alone (parallel = false) for large problems, a few KiB for small ones. The
// functions are reentrant across threads.
//
// Errors: none are checked here (callers validate shapes and strides); a failed allocation of the
// packing buffers throws std::bad_alloc before any thread is started.
#pragma once

#include <cstdint>

#include "common.h"

namespace dlk {

// A batch of products that share A, run as one GEMM whose B and C columns come in runs of len,
// one matrix each, its elements `stride` apart from the run before: column g of the whole is
// column g % len of matrix g / len. len = 0: one matrix, plain columns. A 1x1 conv of NCHW images
// with few pixels each (Xception's exit flow: 100) is one product of N * 100 columns instead of
// N products whose last NR-wide panel is mostly padding.
struct ColRuns {
  int64_t len = 0, stride = 0;
  // offset of column g from column 0, for a matrix whose columns are cs apart
  int64_t at(int64_t g, int64_t cs = 1) const { return len ? (g / len) * stride + (g % len) * cs : g * cs; }
  // columns g .. g + n - 1 lie in one matrix
  bool whole(int64_t g, int64_t n) const { return len == 0 || g % len + n <= len; }
};

template <class T>
void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t rs_a, int64_t cs_a, const T* B, int64_t rs_b,
          int64_t cs_b, T* C, int64_t ldc, const T* bias, int bias_dim, bool relu, bool parallel,
          bool accumulate = false);

// A batch of products sharing A: C[b] (M x N, row-major, b * M * N from C) = A @ B[b] (+ bias_row, M
// values, or nullptr), B[b] at B + b * sb_b. As the batched matmul runs it (matmul.cpp: one matrix a
// thread where they are small, else each with the team, or one product over the batch's columns,
// ColRuns), with an OpenMP team inside: not for callers already in a parallel region.
template <class T>
void gemm_shared_a(int64_t batch, int64_t M, int64_t N, int64_t K, const T* A, int64_t rs_a, int64_t cs_a,
                   const T* B, int64_t sb_b, int64_t rs_b, int64_t cs_b, T* C, const T* bias_row);

// The same GEMM through the portable scalar micro-kernel (the fallback a build without AVX2/FMA or
// AVX-512 uses for gemm); always compiled, so tests can run it on any machine.
template <class T>
void gemm_portable(int64_t M, int64_t N, int64_t K, const T* A, int64_t rs_a, int64_t cs_a, const T* B,
                   int64_t rs_b, int64_t cs_b, T* C, int64_t ldc, const T* bias, int bias_dim, bool relu,
                   bool parallel, bool accumulate = false);

extern template void gemm<float>(int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*, int64_t,
                                 int64_t, float*, int64_t, const float*, int, bool, bool, bool);
extern template void gemm<double>(int64_t, int64_t, int64_t, const double*, int64_t, int64_t, const double*,
                                  int64_t, int64_t, double*, int64_t, const double*, int, bool, bool, bool);
extern template void gemm_portable<float>(int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*,
                                          int64_t, int64_t, float*, int64_t, const float*, int, bool, bool, bool);
extern template void gemm_portable<double>(int64_t, int64_t, int64_t, const double*, int64_t, int64_t,
                                           const double*, int64_t, int64_t, double*, int64_t, const double*, int,
                                           bool, bool, bool);

// Building blocks for a fused kernel that produces one GEMM operand itself, block by block (e.g.
// the fused separable conv computes its depthwise output where gemm would pack A), with the same
// micro-kernel as gemm, on the calling thread (no OpenMP inside):
//   gemm_blocking(n): the micro-kernel tile (mr x nr) and the cache blocking (kc deep K slices, mc
//     rows of A per L2 block) gemm uses for a C of n columns (0: any). The other three take it
//     back: the tile it names is the micro-kernel they pack for and run.
//   gemm_pack_a: an mc x kc block of A (element (i, k) at a[i * rs + k * cs]) -> ceil(mc / mr)
//     panels of kc x mr, rows past mc zero; ceil(mc / mr) * mr * kc values. A block's rows i0..
//     (i0 a multiple of mr) start at out + i0 * kc.
//   gemm_pack_b: a kc x nc block of B -> ceil(nc / nr) panels of kc x nr, columns past nc zero;
//     ceil(nc / nr) * nr * kc values. Columns j0.. (j0 a multiple of nr) start at out + j0 * kc.
//   gemm_macro: C block (mc x nc at c, row stride ldc) = (load ? C : 0) + A_packed @ B_packed
//     (+ bias_row[i] per row, + bias_col[j] per column, where not nullptr). With lda > 0, A is not
//     packed but read in place (row i at a + i * lda, unit stride along K), and a_tail (mr * kc
//     values) holds the packed copy of a partial last row tile: cheaper where gemm_a_in_place.
//     pf: lines the caller wants fetched while the block computes (its next block's input), an
//     equal share per micro-tile, spread over its K loop.
struct GemmBlocking {
  int64_t mr, nr, kc, mc;
};

// Whether A is better read in place than packed for nc columns of C in nr-wide panels: with one or
// two panels, packing A (a transposing copy, about two instructions an element) costs as much as
// the 2 * nr / vector-width FMAs each element feeds (see gemm_serial). On the AVX-512 machine
// (kAvx512Machine: a Zen5 with a 48 KiB 12-way L1) in place measured faster at every width: two
// threads, interleaved, A row-major: 45000 x 128 @ 128 x 128 (Xception entry's channels-last 1x1)
// 5.34 -> 3.37 ms (oneDNN's conv 3.49), 11552 x 256 @ 256 x 256 3.93 -> 3.21, 2888 x 728 @ 728 x
// 728 7.50 -> 6.98, 800 x 1024 @ 1024 x 1536 6.13 -> 5.97, 2048^3 40.5 -> 39.9; the fused separable
// forward, whose depthwise rows it reads where they are, 0.97-1.08x (entry 4.80 -> 4.45 ms).
inline bool gemm_a_in_place(int64_t nc, int64_t nr) { return kAvx512Machine || (nc + nr - 1) / nr <= 2; }
template <class T>
GemmBlocking gemm_blocking(int64_t n = 0);
template <class T>
void gemm_pack_a(const GemmBlocking& bl, int64_t mc, int64_t kc, const T* a, int64_t rs, int64_t cs, T* out);
template <class T>
void gemm_pack_b(const GemmBlocking& bl, int64_t nc, int64_t kc, const T* b, int64_t rs, int64_t cs, T* out);
template <class T>
void gemm_macro(const GemmBlocking& bl, int64_t mc, int64_t nc, int64_t kc, const T* a, const T* b_packed, T* c,
                int64_t ldc, bool load, const T* bias_row, const T* bias_col, int64_t lda = 0, T* a_tail = nullptr,
                LinePrefetch* pf = nullptr);

}  // namespace dlk
