// Shared helpers for the dlkernels C++ kernels.
//
// The kernels never link against libtorch: Python hands them CPU tensors as DLPack capsules
// (torch.utils.dlpack.to_dlpack, zero copy; numpy arrays are taken too) after
// dlkernels/_validation.py has checked dtype, shape and sizes. Each arrives as a Buf, whose shape,
// strides and dtype are what the exporter declared; the checks on them here are a second fence, so
// that a caller bypassing the Python layer still gets an exception instead of a read or write
// outside the buffers it passed.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <new>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>

#if defined(__AVX__)
#include <immintrin.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

// Forced inlining: DLK_INLINE on functions, DLK_LAMBDA_INLINE after a lambda's parameter list.
#define DLK_INLINE inline __attribute__((always_inline))
#define DLK_LAMBDA_INLINE __attribute__((always_inline))

namespace dlk {

namespace py = pybind11;

// Throws std::invalid_argument (Python's ValueError) with the parts of its message streamed together,
// assembled only when the check fails: every call checks its arrays, and building the messages of
// checks that pass (a std::string per literal, std::to_string per size) cost microseconds a call.
template <class... Parts>
DLK_INLINE void require(bool ok, const Parts&... parts) {
  if (__builtin_expect(!ok, 0)) {
    std::ostringstream msg;
    msg << "dlkernels._C: ";
    (msg << ... << parts);
    throw std::invalid_argument(msg.str());
  }
}

// DLPack's C ABI (dlpack.h, the unversioned DLManagedTensor of v0.8), the declarations a reader needs:
// what torch.utils.dlpack.to_dlpack exports, in a capsule named "dltensor".
namespace dlpack {
struct Device {
  int32_t device_type;  // 1: CPU
  int32_t device_id;
};
struct DataType {
  uint8_t code;  // 0 int, 1 uint, 2 float, 4 bfloat
  uint8_t bits;
  uint16_t lanes;
};
struct Tensor {
  void* data;
  Device device;
  int32_t ndim;
  DataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements; null: compact row-major
  uint64_t byte_offset;
};
struct ManagedTensor {
  Tensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(ManagedTensor* self);
};
}  // namespace dlpack

// An array argument of a kernel entry point: a CPU tensor's memory, its shape and element strides
// (up to kMaxDims), dtype and writability, read from a DLPack capsule or a numpy array by the caster
// below. The capsule (or array) is the caller's argument and keeps the memory alive for the call; a Buf
// is not kept past it. Strides are in elements (numpy's bytes are converted on the way in).
// Why capsules: after a layer-sized pass has flushed the caches, exporting a tensor as a capsule costs
// ~2.4 us, as a numpy view ~6.5 (torch's numpy bridge and numpy's array constructor, cold; the first
// view of a call ~40), and a C++ call of a kernel takes up to 16 arrays.
class Buf {
 public:
  static constexpr int kMaxDims = 8;
  enum class Kind : uint8_t { F32, F64, U8, Other };

  Buf() = default;
  static Buf of_dlpack(const dlpack::Tensor& t) {
    require(t.device.device_type == 1, "expected a CPU tensor, got DLPack device type ", t.device.device_type);
    require(t.ndim >= 0 && t.ndim <= kMaxDims, "at most ", kMaxDims, " dimensions expected, got ", t.ndim);
    require(t.dtype.lanes == 1, "vector element types are not supported");
    Buf b;
    b.ndim_ = t.ndim;
    b.itemsize_ = (t.dtype.bits + 7) / 8;
    b.kind_ = t.dtype.code == 2 && t.dtype.bits == 32   ? Kind::F32
              : t.dtype.code == 2 && t.dtype.bits == 64 ? Kind::F64
              : t.dtype.code == 1 && t.dtype.bits == 8  ? Kind::U8
                                                        : Kind::Other;
    b.data_ = static_cast<char*>(t.data) + t.byte_offset;
    int64_t compact = 1;
    for (int d = t.ndim - 1; d >= 0; --d) {
      b.shape_[d] = t.shape[d];
      b.strides_[d] = t.strides ? t.strides[d] : compact;
      compact *= t.shape[d];
    }
    b.writeable_ = true;  // the unversioned ABI has no read-only flag; torch's tensors are writable
    return b;
  }
  static Buf of_numpy(const py::array& a) {
    require(a.ndim() <= kMaxDims, "at most ", kMaxDims, " dimensions expected, got ", a.ndim());
    Buf b;
    b.ndim_ = static_cast<int>(a.ndim());
    b.itemsize_ = static_cast<int>(a.itemsize());
    b.kind_ = a.dtype().is(py::dtype::of<float>())     ? Kind::F32
              : a.dtype().is(py::dtype::of<double>())  ? Kind::F64
              : a.dtype().is(py::dtype::of<uint8_t>()) ? Kind::U8
                                                       : Kind::Other;
    b.data_ = static_cast<char*>(const_cast<void*>(a.data()));
    for (int d = 0; d < b.ndim_; ++d) {
      require(a.strides(d) % a.itemsize() == 0, "misaligned strides");
      b.shape_[d] = a.shape(d);
      b.strides_[d] = a.strides(d) / a.itemsize();
    }
    b.writeable_ = a.writeable();
    return b;
  }

  int64_t ndim() const { return ndim_; }
  int64_t shape(int d) const { return shape_[d]; }
  int64_t stride(int d) const { return strides_[d]; }  // in elements
  int64_t itemsize() const { return itemsize_; }
  int64_t size() const {
    int64_t n = 1;
    for (int d = 0; d < ndim_; ++d) n *= shape_[d];
    return n;
  }
  template <class T>
  bool holds() const {
    if constexpr (std::is_same_v<T, float>) return kind_ == Kind::F32;
    if constexpr (std::is_same_v<T, double>) return kind_ == Kind::F64;
    if constexpr (std::is_same_v<T, uint8_t>) return kind_ == Kind::U8;
    return false;
  }
  // Row-major with no gaps (a size-1 dimension's stride never moves an index: any value passes).
  bool c_contiguous() const {
    int64_t want = 1;
    for (int d = ndim_ - 1; d >= 0; --d) {
      if (shape_[d] != 1 && strides_[d] != want) return false;
      want *= shape_[d];
    }
    return true;
  }
  bool writeable() const { return writeable_; }
  const void* data() const { return data_; }
  void* mutable_data() const { return data_; }

 private:
  char* data_ = nullptr;
  int ndim_ = 0;
  int itemsize_ = 1;
  Kind kind_ = Kind::Other;
  bool writeable_ = false;
  int64_t shape_[kMaxDims] = {};
  int64_t strides_[kMaxDims] = {};
};

// Calls f(T{}) with T = float or double, after the dtype of `a`.
template <class F>
auto dispatch_float(const Buf& a, const char* op, F&& f) {
  if (a.holds<float>()) return f(float{});
  if (a.holds<double>()) return f(double{});
  throw std::invalid_argument(std::string("dlkernels._C.") + op + ": float32 or float64 expected");
}

// Whether a pass over `elements` values is worth a parallel region: starting and joining the
// OpenMP team costs microseconds quiet and milliseconds on a loaded machine (threads that lost
// their core), more than a small layer's whole pass. Use as `#pragma omp parallel if (...)`.
inline bool worth_threads(int64_t elements) { return elements >= (int64_t{1} << 15); }

// The same for compute-bound work (GEMMs, the fused separable conv): below this many multiply-adds
// (~50 us on one core) a second thread saves less than waking it can cost.
constexpr int64_t kMinParallelMacs = 128 * 128 * 128;

// Memory kept by the calling thread between calls, one buffer per Tag: grown on demand (64-byte
// aligned, contents not kept across growth) and never shrunk, so a steady-state kernel allocates and
// page-faults nothing. Distinct tags for buffers that are live at once on one thread (the GEMM's
// packing buffers, the fused separable conv's intermediate that feeds that GEMM).
template <class Tag, class T>
T* thread_buffer(size_t count) {
  struct Buffer {
    void* p = nullptr;
    size_t bytes = 0;
    ~Buffer() { std::free(p); }
  };
  thread_local Buffer buf;
  const size_t bytes = (count * sizeof(T) + 63) / 64 * 64;
  if (buf.bytes < bytes) {
    std::free(buf.p);
    buf.p = std::aligned_alloc(64, bytes);
    buf.bytes = buf.p ? bytes : 0;
    if (!buf.p) throw std::bad_alloc();
  }
  return static_cast<T*>(buf.p);
}

// A machine fact's override from the environment, read on every call (the tests set it per case):
// the variable's value, or nullptr where it is unset or empty.
inline const char* env_override(const char* name) {
  const char* v = std::getenv(name);
  return v && *v ? v : nullptr;
}

// Bytes of the last-level cache the calling CPU sees: sysfs's highest cache level, else glibc's sysconf
// (which on the development VM reports the host's 256 MiB, not the 32 MiB the VM's L3 has), else
// 32 MiB; or the environment's DLKERNELS_LLC_BYTES (read per call: the tests use it to reach the
// large-tensor paths on small tensors).
inline int64_t llc_bytes() {
  static const int64_t detected = [] {
    int64_t best_level = 0, bytes = 0;
    for (int idx = 0; idx < 8; ++idx) {
      const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(idx) + "/";
      std::FILE* fl = std::fopen((dir + "level").c_str(), "r");
      std::FILE* fs = std::fopen((dir + "size").c_str(), "r");
      long level = 0, size = 0;
      char unit = 0;
      const bool ok = fl && fs && std::fscanf(fl, "%ld", &level) == 1 && std::fscanf(fs, "%ld%c", &size, &unit) >= 1;
      if (fl) std::fclose(fl);
      if (fs) std::fclose(fs);
      if (!ok) continue;
      const int64_t b = int64_t{size} << (unit == 'K' ? 10 : unit == 'M' ? 20 : 0);
      if (level > best_level) best_level = level, bytes = b;
    }
    if (bytes > 0) return bytes;
    const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
    return l3 > 0 ? static_cast<int64_t>(l3) : (int64_t{32} << 20);
  }();
  const char* env = env_override("DLKERNELS_LLC_BYTES");
  return env ? std::max<int64_t>(0, std::atoll(env)) : detected;
}

// Whether the CPU is an AMD of family 19h (Zen3, Zen4), read once from cpuid: where a kernel's best
// memory access order was measured to differ between CPU generations (its comment says how), beside
// the -march=native choices the compiler makes, which on GCC 12 do not tell a Zen4 from a Zen3.
// DLKERNELS_AMD_FAMILY_19H=0 or 1 in the environment (read per call) stands in for cpuid, so that the
// tests run both orders on any machine.
inline bool amd_family_19h() {
  if (const char* env = env_override("DLKERNELS_AMD_FAMILY_19H")) return *env != '0';
#if defined(__x86_64__) || defined(__i386__)
  static const bool is = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid(0, &a, &b, &c, &d)) return false;
    const bool amd = b == 0x68747541 && d == 0x69746e65 && c == 0x444d4163;  // "AuthenticAMD"
    if (!amd || !__get_cpuid(1, &a, &b, &c, &d)) return false;
    const unsigned family = ((a >> 8) & 0xf) + ((a >> 20) & 0xff);
    return family == 0x19;
  }();
  return is;
#else
  return false;
#endif
}

// Whether the prefetches of a coming task's lines (LinePrefetch, the masked sweeps' planes) go into L2
// only (prefetcht1) rather than L1 (prefetcht0): on AMD family 19h. There a task's lines prefetched
// into L1 (a plane of 50 KiB, or rows beside the staged ones) exceed its 32 KiB and hold its miss
// buffers: after the staging loads, the stride-2 NCHW forward's hottest instruction was the
// prefetcht0 itself, waiting for a buffer. Zen4, two threads, from DRAM, interleaved in one process, L1 -> L2: depthwise forward
// NCHW 8x96x112x112 s2 3.27 -> 1.90 ms, 5x5 s2 3.70 -> 2.07, 8x256x38x38 s2 0.59 -> 0.55, 8x144x56x56
// 1.03 -> 0.95, 8x128x75x75 2.01 -> 1.92; channels-last 5x5 8x144x56x56 2.37 -> 1.21, 3x3 0.89 ->
// 0.73, 8x128x75x75 1.53 -> 1.20, 8x96x112x112 s2 2.22 -> 1.50; forward+backward channels-last
// 8x128x75x75 8.29 -> 6.10, 8x144x56x56 5.35 -> 3.91; fused separable NCHW 8x96x112x112 s2 -> 24 4.24 ->
// 2.74; the rest of 42 cases within 5 %. On the Zen5 (48 KiB L1) the L1 prefetches were measured
// faster where compared (the weight gradients' comments), so other CPUs keep them. The Zen3 (family
// 19h, 32 KiB L1 too) takes the L2 prefetches unmeasured. Read once, when the module loads (a prefetch
// changes no result): a function-local static cost a guard check, and in one sweep a call, per plane.
inline const bool kPrefetchIntoL2 = amd_family_19h();
inline bool prefetch_into_l2() { return kPrefetchIntoL2; }

// The cache lines of [begin, end), or of `rows` runs of len elements `stride` apart, prefetched a few
// at a time (step) while other work runs, so that a later read of them finds cache instead of waiting
// on DRAM alone.
struct LinePrefetch {
  const char* next = nullptr;  // the next line to prefetch
  const char* end = nullptr;   // the end of the run it is in
  // the runs after that one: `rows` more of row_bytes each, row_step bytes after the one before
  int64_t rows = 0, row_bytes = 0, row_step = 0;
  // into L2 only (prefetcht1): the machine's choice (prefetch_into_l2), or set for data wanted after
  // other work that uses L1
  bool l2 = prefetch_into_l2();

  LinePrefetch() = default;
  template <class T>
  LinePrefetch(const T* begin, const T* end_)
      : next(reinterpret_cast<const char*>(begin)), end(reinterpret_cast<const char*>(end_)) {}
  // n runs of len elements, the first at begin, each stride elements after the one before (one run
  // where they abut).
  template <class T>
  LinePrefetch(const T* begin, int64_t len, int64_t n, int64_t stride) {
    if (n <= 0 || len <= 0) return;
    if (stride == len) len *= n, n = 1;
    next = reinterpret_cast<const char*>(begin);
    end = next + len * static_cast<int64_t>(sizeof(T));
    rows = n - 1, row_bytes = len * static_cast<int64_t>(sizeof(T)), row_step = stride * static_cast<int64_t>(sizeof(T));
  }
  int64_t count() const {  // lines left
    return (next < end ? (end - next + 63) / 64 : 0) + rows * ((row_bytes + 63) / 64);
  }
  // Lines a step that spread what is left over `steps` steps (at least one).
  int64_t share(int64_t steps) const { return share_of(count(), steps); }
  static int64_t share_of(int64_t lines, int64_t steps) {
    steps = std::max<int64_t>(1, steps);
    return (lines + steps - 1) / steps;
  }
  // Prefetches the next k lines.
  void step(int64_t k) {
    for (; k > 0; --k, next += 64) {
      if (next >= end) {
        if (rows == 0) return;
        next = end - row_bytes + row_step, end = next + row_bytes, --rows;
      }
      if (l2)
        __builtin_prefetch(next, 0, 2);
      else
        __builtin_prefetch(next);
    }
  }
};

// Non-temporal stores, for outputs that would not stay in cache anyway: a plain store first reads the
// line it writes (write-allocate), which on a DRAM-bound pass is a third more traffic. Callers end
// the pass with stream_fence().
//
// streams_outputs: whether a pass that reads and writes `bytes` in all streams its outputs: past a
// third of the LLC, where the input streaming through evicts most of the output before its consumer
// reads it. Two threads, Zen3 (32 MiB L3), 3x3 channels-last depthwise followed by a sum of its output,
// streamed against plain: output 1.7-3.4 MiB (in + out 3.4-6.9) 0.95x, in + out 10.3-14.1 MiB 0.99-1.07x,
// 27.6 MiB 1.19x; the depthwise alone 1.11-1.40x at every size. Batch norm passes at 11-38 MiB:
// 0.95-1.04x against the old threshold (the whole LLC), within the noise.
inline bool streams_outputs(int64_t bytes) { return 3 * bytes > llc_bytes(); }
inline void stream_fence() {
#if defined(__AVX__)
  _mm_sfence();
#endif
}

// Choices that measured opposite ways on the two CPUs these kernels run on, keyed by the instruction
// set the module is built for (-march=native): the AVX2 machine is an AMD Zen3 (32 MiB L3, ~26-32 GB/s
// copy bandwidth for two threads), the AVX-512 ones a Zen5 (32 MiB L3, 40-76 GB/s, varying with the
// host's load) and an Intel Xeon (260 MiB L3, where layer-sized tensors stay in cache and these
// choices rarely matter). A proxy, not a cause: re-measure on a new CPU (see each use).
#if defined(__AVX512F__)
constexpr bool kAvx512Machine = true;
#else
constexpr bool kAvx512Machine = false;
#endif

// The instruction set this module was compiled for, reported by dlkernels._C.simd().
inline const char* simd_name() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2-fma";
#else
  return "scalar";
#endif
}

}  // namespace dlk

// Kernel arguments declared as dlk::Buf take a DLPack capsule (unconsumed, named "dltensor") or a
// numpy array, nothing else: no conversion from other objects (a list would become a temporary
// array, and an output written into it lost).
namespace pybind11::detail {
template <>
struct type_caster<dlk::Buf> {
  PYBIND11_TYPE_CASTER(dlk::Buf, const_name("DLPack capsule | numpy.ndarray"));
  bool load(handle src, bool) {
    if (PyCapsule_CheckExact(src.ptr())) {
      if (!PyCapsule_IsValid(src.ptr(), "dltensor")) return false;  // consumed, or another kind
      const void* p = PyCapsule_GetPointer(src.ptr(), "dltensor");
      value = dlk::Buf::of_dlpack(static_cast<const dlk::dlpack::ManagedTensor*>(p)->dl_tensor);
      return true;
    }
    if (!isinstance<array>(src)) return false;
    value = dlk::Buf::of_numpy(reinterpret_borrow<array>(src));
    return true;
  }
  static handle cast(const dlk::Buf&, return_value_policy, handle) { return none().release(); }
};
}  // namespace pybind11::detail
