// Force-included into every csrc/ file of the AddressSanitizer build (CMake DLKERNELS_ASAN=ON,
// `make asan`). GCC's ASan instruments ordinary loads and stores, intrinsic vector loads included, but
// not the builtins behind masked loads/stores and non-temporal stores, which the kernels use exactly
// at tensor edges and for outputs past the cache. These wrappers check the lanes a masked access
// enables (only those: a masked-off lane past a buffer's end is legal and never faults) and a streamed
// store's whole vector against ASan's shadow memory, report as ASan does, then do the real access.
#pragma once
#if defined(__cplusplus) && defined(__AVX__)
#include <immintrin.h>
#include <sanitizer/asan_interface.h>

#include <cstddef>

namespace dlk_asan {

// The lanes of `mask` (of `lanes` lanes, esz bytes each) from p: checked one by one where the span
// from the first to the last enabled lane holds any poisoned byte.
__attribute__((always_inline)) inline void check_lanes(const void* p, unsigned mask, int lanes, int esz, bool write) {
  mask &= lanes >= 32 ? ~0u : (1u << lanes) - 1;
  if (!mask) return;
  const int lo = __builtin_ctz(mask), hi = 31 - __builtin_clz(mask);
  char* b = static_cast<char*>(const_cast<void*>(p));
  if (!__asan_region_is_poisoned(b + lo * esz, static_cast<size_t>(hi - lo + 1) * esz)) return;
  for (int i = lo; i <= hi; ++i)
    if ((mask >> i) & 1) {
      if (write)
        __asan_storeN_noabort(b + i * esz, esz);
      else
        __asan_loadN_noabort(b + i * esz, esz);
    }
}

#define DLK_ASAN_STREAM(name, T, V, BYTES)                   \
  __attribute__((always_inline)) inline void name(T* p, V a) { \
    __asan_storeN_noabort(p, BYTES);                          \
    _##name(p, a);                                            \
  }
// (the wrappers take the intrinsics' names without their leading underscore: mm256_stream_ps -> _mm256_stream_ps)
DLK_ASAN_STREAM(mm256_stream_ps, float, __m256, 32)
DLK_ASAN_STREAM(mm256_stream_pd, double, __m256d, 32)
#if defined(__AVX512F__)
DLK_ASAN_STREAM(mm512_stream_ps, float, __m512, 64)
DLK_ASAN_STREAM(mm512_stream_pd, double, __m512d, 64)
__attribute__((always_inline)) inline __m512 maskz_loadu_ps(__mmask16 m, const void* p) {
  check_lanes(p, m, 16, 4, false);
  return _mm512_maskz_loadu_ps(m, p);
}
__attribute__((always_inline)) inline __m512d maskz_loadu_pd(__mmask8 m, const void* p) {
  check_lanes(p, m, 8, 8, false);
  return _mm512_maskz_loadu_pd(m, p);
}
__attribute__((always_inline)) inline void mask_storeu_ps(void* p, __mmask16 m, __m512 a) {
  check_lanes(p, m, 16, 4, true);
  _mm512_mask_storeu_ps(p, m, a);
}
__attribute__((always_inline)) inline void mask_storeu_pd(void* p, __mmask8 m, __m512d a) {
  check_lanes(p, m, 8, 8, true);
  _mm512_mask_storeu_pd(p, m, a);
}
#endif
#undef DLK_ASAN_STREAM

}  // namespace dlk_asan

// From here on the kernels' calls go through the checks (the wrappers above were compiled before these).
#define _mm256_stream_ps(p, a) dlk_asan::mm256_stream_ps((p), (a))
#define _mm256_stream_pd(p, a) dlk_asan::mm256_stream_pd((p), (a))
#if defined(__AVX512F__)
#define _mm512_stream_ps(p, a) dlk_asan::mm512_stream_ps((p), (a))
#define _mm512_stream_pd(p, a) dlk_asan::mm512_stream_pd((p), (a))
#define _mm512_maskz_loadu_ps(m, p) dlk_asan::maskz_loadu_ps((m), (p))
#define _mm512_maskz_loadu_pd(m, p) dlk_asan::maskz_loadu_pd((m), (p))
#define _mm512_mask_storeu_ps(p, m, a) dlk_asan::mask_storeu_ps((p), (m), (a))
#define _mm512_mask_storeu_pd(p, m, a) dlk_asan::mask_storeu_pd((p), (m), (a))
#endif
#endif
