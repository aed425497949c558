// Thin wrappers over the widest float vectors the build targets (-march=native): Vec<T> (512-bit on
// AVX-512, 256-bit on AVX2 + FMA; DLK_SIMD_VEC is defined where there is one), and HalfVec<T>, the
// 256-bit half of an AVX-512 vector. The GEMM's micro-kernels (matmul.cpp) and the arithmetic peak
// (module.cpp, fma_peak) are written over them.
#pragma once

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace dlk {
namespace simd {

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#define DLK_SIMD_VEC 1
// 256-bit vectors: the AVX2 build's Vec, and on AVX-512 the half vector of HalfKernel's tile.
template <class T>
struct Vec256;
template <>
struct Vec256<float> {
  using V = __m256;
  static constexpr int W = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V x) { _mm256_storeu_ps(p, x); }
  static void stream(float* p, V x) { _mm256_stream_ps(p, x); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  // only lanes with x < 0 become 0: NaN lanes compare false (ordered) and stay NaN
  static V relu(V x) { return _mm256_andnot_ps(_mm256_cmp_ps(x, zero(), _CMP_LT_OQ), x); }
};
template <>
struct Vec256<double> {
  using V = __m256d;
  static constexpr int W = 4;
  static V zero() { return _mm256_setzero_pd(); }
  static V load(const double* p) { return _mm256_loadu_pd(p); }
  static void store(double* p, V x) { _mm256_storeu_pd(p, x); }
  static void stream(double* p, V x) { _mm256_stream_pd(p, x); }
  static V set1(double x) { return _mm256_set1_pd(x); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  static V add(V a, V b) { return _mm256_add_pd(a, b); }
  static V relu(V x) { return _mm256_andnot_pd(_mm256_cmp_pd(x, zero(), _CMP_LT_OQ), x); }
};
#endif
#if defined(__AVX512F__)
template <class T>
struct Vec;
template <>
struct Vec<float> {
  using V = __m512;
  static constexpr int W = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V x) { _mm512_storeu_ps(p, x); }
  static void stream(float* p, V x) { _mm512_stream_ps(p, x); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  // only lanes with x < 0 become 0: NaN lanes compare false (ordered) and stay NaN
  static V relu(V x) { return _mm512_mask_mov_ps(x, _mm512_cmp_ps_mask(x, zero(), _CMP_LT_OQ), zero()); }
};
template <>
struct Vec<double> {
  using V = __m512d;
  static constexpr int W = 8;
  static V zero() { return _mm512_setzero_pd(); }
  static V load(const double* p) { return _mm512_loadu_pd(p); }
  static void store(double* p, V x) { _mm512_storeu_pd(p, x); }
  static void stream(double* p, V x) { _mm512_stream_pd(p, x); }
  static V set1(double x) { return _mm512_set1_pd(x); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  static V add(V a, V b) { return _mm512_add_pd(a, b); }
  static V relu(V x) { return _mm512_mask_mov_pd(x, _mm512_cmp_pd_mask(x, zero(), _CMP_LT_OQ), zero()); }
};
template <class T>
using HalfVec = Vec256<T>;
#elif defined(DLK_SIMD_VEC)
template <class T>
using Vec = Vec256<T>;
template <class T>
struct HalfVec;  // no half-vector tiles on AVX2 (WideKernel covers 17-24 float columns there)
#endif

}  // namespace simd
}  // namespace dlk
