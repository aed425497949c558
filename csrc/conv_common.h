// Helpers shared by the depthwise, separable and batch-norm kernels: buffer checks for the
// contiguous layouts they accept, dtype dispatch, the tap-range arithmetic of a strided, padded,
// dilated window, and per-thread partial sums.
#pragma once

#include "common.h"

#include <immintrin.h>
#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace dlk {

// Floor/ceil division that is right for negative numerators (C++ '/' truncates toward zero).
inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
inline int64_t ceil_div(int64_t a, int64_t b) { return -floor_div(-a, b); }

// Sizes or element strides of an array of up to 4 dimensions, held in place (check_dense runs on every
// array of every call: no heap).
struct Dims {
  int64_t v[4] = {};
  size_t n = 0;
  Dims(std::initializer_list<int64_t> l) : n(l.size()) { std::copy(l.begin(), l.begin() + std::min<size_t>(n, 4), v); }
  size_t size() const { return n; }
  int64_t operator[](size_t d) const { return v[d]; }
};

// Checks that `a` holds T, has exactly `shape`, and that its strides are `strides` on every dimension
// of size > 1 (a size-1 dimension's stride never moves an index, so any value there is harmless).
// The strides passed are those of a dense layout of `shape`, so every index the kernels form from
// `shape` stays inside the buffer.
template <class T>
void check_dense(const Buf& a, const char* name, const Dims& shape, const Dims& strides, bool writable) {
  require(shape.size() <= 4 && strides.size() == shape.size(), name, ": check_dense takes up to 4 dimensions");
  require(a.holds<T>(), name, ": dtype differs from the input's (float32 or float64 expected)");
  require(a.ndim() == static_cast<py::ssize_t>(shape.size()), name, ": expected ", shape.size(), " dimensions, got ",
          a.ndim());
  for (size_t d = 0; d < shape.size(); ++d) {
    require(a.shape(d) == shape[d], name, ": size of dimension ", d, " is ", a.shape(d), ", expected ", shape[d]);
    require(shape[d] <= 1 || a.stride(static_cast<int>(d)) == strides[d], name,
            ": not laid out as expected (stride of dimension ", d, ")");
  }
  if (writable) require(a.writeable(), name, ": output array is read-only");
}

// Strides of an (N, C, H, W) tensor, NCHW-contiguous or channels_last-contiguous.
inline Dims strides4(int64_t C, int64_t H, int64_t W, bool channels_last) {
  if (channels_last) return {H * W * C, 1, W * C, C};
  return {C * H * W, H * W, W, 1};
}

// Strides of an (N, C, S) view: NCS-contiguous or channels-last (contiguous (N, S, C)).
inline Dims strides3(int64_t C, int64_t S, bool channels_last) {
  if (channels_last) return {S * C, 1, C};
  return {C * S, S, 1};
}

template <class T>
const T* cptr(const Buf& a) { return static_cast<const T*>(a.data()); }
template <class T>
T* mptr(const Buf& a) { return static_cast<T*>(a.mutable_data()); }

// The window taps p in [lo, hi) of one output position that land inside [0, size):
// input index = o*stride - pad + p*dil.
struct TapRange {
  int64_t lo, hi;
};
inline TapRange tap_range(int64_t o, int64_t stride, int64_t pad, int64_t dil, int64_t k, int64_t size) {
  int64_t base = o * stride - pad;
  int64_t lo = std::max<int64_t>(0, ceil_div(-base, dil));
  int64_t hi = std::min<int64_t>(k, floor_div(size - 1 - base, dil) + 1);
  return {lo, std::max(lo, hi)};
}

// The other view: the outputs o in [lo, hi) (of `out`) whose tap at offset `tap` (= p*dil) reads
// inside [0, size): 0 <= o*stride - pad + tap < size.
inline TapRange outputs_inside(int64_t tap, int64_t stride, int64_t pad, int64_t out, int64_t size) {
  const int64_t lo = std::max<int64_t>(0, ceil_div(pad - tap, stride));
  const int64_t hi = std::min<int64_t>(out, floor_div(size - 1 + pad - tap, stride) + 1);
  return {lo, std::max(lo, hi)};
}

// Taps p and output positions o with o*stride - pad + p*dil == in: the (tap, output) pairs that read
// input position `in` (the transposed conv's gather).
struct TapOut {
  int64_t tap, out;
};

inline void taps_reading(int64_t in, int64_t stride, int64_t pad, int64_t dil, int64_t k, int64_t out_size,
                         std::vector<TapOut>& list) {
  list.clear();
  for (int64_t p = 0; p < k; ++p) {
    const int64_t t = in + pad - p * dil;
    if (t < 0) break;
    if (t % stride == 0 && t / stride < out_size) list.push_back({p, t / stride});
  }
}

// Output positions [lo, hi) along one axis whose whole window lies inside the input: the interior,
// where the inner loops run without bounds checks.
inline TapRange interior_range(int64_t out, int64_t stride, int64_t pad, int64_t dil, int64_t k, int64_t size) {
  int64_t lo = std::min<int64_t>(out, std::max<int64_t>(0, ceil_div(pad, stride)));
  int64_t hi = floor_div(size - 1 - (k - 1) * dil + pad, stride) + 1;
  hi = std::min<int64_t>(out, std::max<int64_t>(hi, lo));
  return {lo, hi};
}

// A B-byte vector of T (GCC vector extension: AVX registers under -march=native, split into
// halves on older targets), 32 bytes unless a kernel asks for 64 (AVX-512 builds; see
// cl_staged_row_kw). Fixed-size blocks of accumulators written with it stay in registers across
// runtime-length tap loops, which plain arrays do not reliably do.
template <class T, int B = 32>
struct Vec {
  typedef T type __attribute__((vector_size(B)));
  static constexpr int lanes = B / sizeof(T);
};
template <class T, int B = 32>
inline typename Vec<T, B>::type vload(const T* p) {
  typename Vec<T, B>::type v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <class T, class V>
inline void vstore(T* p, V v) { std::memcpy(p, &v, sizeof v); }
template <class T, int B = 32>
inline typename Vec<T, B>::type vbroadcast(T x) { return typename Vec<T, B>::type{} + x; }

// Whether stores `bytes` apart land in one L1 set (Zen3's 32 KiB 8-way L1, like most x86 L1s, indexes
// sets by address bits below 4 KiB): a run of them evicts itself, and streamed ones alias in the
// write-combining buffers (depthwise.h and depthwise.cpp measure both).
inline bool same_l1_set(int64_t bytes) { return bytes % 4096 == 0; }

// vstream: one vector to p, aligned to its size; a plain store without AVX (or, for 64-byte vectors,
// without AVX-512). Whole 64-byte lines should be written by consecutive calls: a partly written
// line goes out in pieces.
template <class T, class V>
inline void vstream(T* p, V v) {
#if defined(__AVX512F__)
  if constexpr (sizeof(V) == 64) {
    if constexpr (sizeof(T) == 4)
      _mm512_stream_ps(reinterpret_cast<float*>(p), reinterpret_cast<__m512>(v));
    else
      _mm512_stream_pd(reinterpret_cast<double*>(p), reinterpret_cast<__m512d>(v));
    return;
  }
#endif
#if defined(__AVX__)
  if constexpr (sizeof(V) == 32) {
    if constexpr (sizeof(T) == 4)
      _mm256_stream_ps(reinterpret_cast<float*>(p), reinterpret_cast<__m256>(v));
    else
      _mm256_stream_pd(reinterpret_cast<double*>(p), reinterpret_cast<__m256d>(v));
    return;
  }
#endif
  vstore(p, v);
}
// Bytes per non-temporal store in stream_copy and stream_line: whole 64-byte lines on the AVX-512
// machine, where batch norm's streamed passes ran 2-10 % faster than with two 32-byte halves per line
// (evaluation, two threads, interleaved, input from DRAM, both layouts: 32x2048x7x7 0.83-0.93 ->
// 0.80-0.85 ms, 32x1024x14x14 1.55-1.61 -> 1.50-1.58, 8x128x75x75 1.35-1.48 -> 1.32-1.45; 12 of 12
// pairs faster).
constexpr int kStreamBytes = kAvx512Machine ? 64 : 32;
// dst[0, 64 bytes) = v[...], non-temporal: one whole cache line from a line-aligned dst.
template <class T>
DLK_INLINE void stream_line(T* dst, const T* v) {
  constexpr int64_t L = 64 / static_cast<int64_t>(sizeof(T)), V = Vec<T, kStreamBytes>::lanes;
  for (int64_t j = 0; j < L; j += V) vstream(dst + j, vload<T, kStreamBytes>(v + j));
}
// dst[0, n) = src[0, n), non-temporal where aligned (plain stores for the unaligned ends).
template <class T>
inline void stream_copy(T* dst, const T* src, int64_t n) {
  constexpr int B = kStreamBytes;
  int64_t i = 0;
#if defined(__AVX__)
  for (; i < n && reinterpret_cast<uintptr_t>(dst + i) % B != 0; ++i) dst[i] = src[i];
  constexpr int64_t L = Vec<T, B>::lanes;
  for (; i + L <= n; i += L) vstream(dst + i, vload<T, B>(src + i));
#endif
  for (; i < n; ++i) dst[i] = src[i];
}

// One zeroed accumulator row per OpenMP thread; a reduction sums them at the end, so threads never
// share a cache line that both write.
template <class A>
struct ThreadPartials {
  int64_t width;
  int threads;
  std::vector<A> buf;
  explicit ThreadPartials(int64_t w) : width(w), threads(omp_get_max_threads()), buf(static_cast<size_t>(w) * threads, A(0)) {}
  A* mine() { return buf.data() + static_cast<size_t>(omp_get_thread_num()) * width; }
  A sum(int64_t i) const {
    A s = 0;
    for (int t = 0; t < threads; ++t) s += buf[static_cast<size_t>(t) * width + i];
    return s;
  }
};

// Scalar checks of conv geometry shared by the depthwise and separable entry points.
inline void check_conv_geometry(int64_t sH, int64_t sW, int64_t pT, int64_t pL, int64_t dH, int64_t dW) {
  require(sH >= 1 && sW >= 1, "stride must be >= 1");
  require(pT >= 0 && pL >= 0, "padding must be >= 0");
  require(dH >= 1 && dW >= 1, "dilation must be >= 1");
}

}  // namespace dlk
