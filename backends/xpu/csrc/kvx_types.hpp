// Element types shared by every kvdispatch SYCL kernel: how a stored element becomes a float and
// back. Compiled by icpx (the XPU SyclExtension build) and by DPC++'s run-time compiler (the CPU
// test lane and first-use compilation); nothing here depends on the target.
#pragma once
#include <sycl/sycl.hpp>

#include <cstdint>
#include <limits>

namespace kvx {

inline constexpr float kInf = std::numeric_limits<float>::infinity();

// An element read/written as its own arithmetic type (float, sycl::half, bfloat16).
template <class T> struct Plain {
  using storage = T;
  static constexpr bool is_fp8 = false;
  static inline float to_float(T v) { return static_cast<float>(v); }
  static inline T from_float(float f) { return T(f); }
};

// fp8 formats, stored as bytes: the cache may be an fp8 tensor or a uint8 view of one, and the
// kernel does the conversion itself so that it rounds exactly like torch's `.to(fp8 dtype)`.
enum Fp8Kind : int { E4M3FN = 1, E4M3FNUZ = 2, E5M2 = 3 };

template <int Kind> struct Fp8 {
  using storage = uint8_t;
  static constexpr bool is_fp8 = true;
  static constexpr int M = Kind == E5M2 ? 2 : 3;             // mantissa bits
  static constexpr int E = Kind == E5M2 ? 5 : 4;             // exponent bits
  static constexpr int BIAS = Kind == E4M3FN ? 7 : Kind == E4M3FNUZ ? 8 : 15;
  static constexpr float MAX = Kind == E4M3FN ? 448.0f : Kind == E4M3FNUZ ? 240.0f : 57344.0f;

  static inline float to_float(uint8_t c) {
    const int sign = c >> 7, e = (c >> M) & ((1 << E) - 1), m = c & ((1 << M) - 1);
    if (Kind == E4M3FNUZ && c == 0x80) return sycl::nan(0u);
    if (Kind == E4M3FN && (c & 0x7f) == 0x7f) return sycl::nan(0u);
    if (Kind == E5M2 && e == 31) return m ? sycl::nan(0u) : (sign ? -kInf : kInf);
    float v = e == 0 ? sycl::ldexp(float(m), 1 - BIAS - M)
                     : sycl::ldexp(float((1 << M) | m), e - BIAS - M);
    return sign ? -v : v;
  }

  // Saturating: |f| is clamped to the largest finite value first (e4m3fn has no infinity, so an
  // unclamped cast would give NaN), then rounded to nearest even like torch.
  static inline uint8_t from_float(float f) {
    if (sycl::isnan(f)) return Kind == E4M3FNUZ ? 0x80 : 0x7f;
    const uint8_t sign = sycl::signbit(f) ? 0x80 : 0;
    const float a = sycl::fmin(sycl::fabs(f), MAX);
    constexpr float min_normal = Kind == E5M2 ? 0x1p-14f : Kind == E4M3FN ? 0x1p-6f : 0x1p-7f;
    int code;
    if (a < min_normal) {
      // subnormal: a multiple of 2^(1 - BIAS - M); reaching 1 << M lands on the smallest normal
      code = int(sycl::rint(sycl::ldexp(a, BIAS + M - 1)));
    } else {
      int e = int((sycl::bit_cast<uint32_t>(a) >> 23) & 0xff) - 127;
      int q = int(sycl::rint(sycl::ldexp(a, M - e))) - (1 << M);  // exact: a has 24 bits
      if (q == (1 << M)) {
        q = 0;
        e += 1;
      }
      code = ((e + BIAS) << M) | q;
    }
    if (Kind == E4M3FNUZ && code == 0) return 0;  // fnuz has no negative zero (0x80 is NaN)
    return uint8_t(sign | code);
  }
};

// Raw bits of an element of 1, 2 or 4 bytes: a cache write that needs no conversion copies them.
template <class T> struct Raw {
  using storage = T;
  static constexpr bool is_fp8 = false;
};

// Offset into a cache by the descriptor's formula; `Idx` is int64_t unless the descriptor proved
// that every offset fits in int32 (the narrowing is decided on the host, never assumed).
template <class Idx>
inline Idx cache_offset(Idx block, Idx token, Idx head, Idx d, Idx s_block, Idx s_token, Idx s_head,
                        Idx s_chunk, Idx x) {
  return block * s_block + token * s_token + head * s_head + (d / x) * s_chunk + d % x;
}

}  // namespace kvx
