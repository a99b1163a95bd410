// Shared helpers for lrc_ext kernels: dtype codes, scalar conversions, argument checks.
// Plain C++: no Python or torch headers, so the kernels build without either.
#pragma once
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace lrc {

// Must match lrc_ext/_ext.py DTYPE_CODES.
enum class DType : int { F32 = 0, F16 = 1, BF16 = 2, F64 = 3 };

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::F32: return "float32";
    case DType::F16: return "float16";
    case DType::BF16: return "bfloat16";
    case DType::F64: return "float64";
  }
  return "unknown";
}

inline DType to_dtype(int code, const char* op, const char* arg) {
  if (code < 0 || code > 3)
    throw std::invalid_argument(std::string(op) + ": argument '" + arg + "' has unknown dtype code " +
                                std::to_string(code));
  return static_cast<DType>(code);
}

[[noreturn]] inline void fail(const char* op, const std::string& msg) {
  throw std::invalid_argument(std::string(op) + ": " + msg);
}

// bf16 / fp16 <-> fp32 on the CPU, round to nearest even (matches torch's casts).
inline float bf16_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float half_to_float(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);
  } else if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do { man <<= 1; ++e; } while ((man & 0x400u) == 0);
      u = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (man & 0x3ffu) << 13;
    }
  } else {
    u = sign | (exp + 112u) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t float_to_half(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow -> inf
  if (a < 0x38800000u) {  // subnormal or zero in half
    if (a < 0x33000000u) return static_cast<uint16_t>(sign);
    uint32_t e = a >> 23, m = (a & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126 - e;  // 14..24
    uint32_t r = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return static_cast<uint16_t>(sign | r);
  }
  uint32_t r = a + 0xfffu + ((a >> 13) & 1u);  // round to nearest even
  return static_cast<uint16_t>(sign | ((r - 0x38000000u) >> 13));
}

// Scalar load/store by storage type.
struct bf16_t { uint16_t x; };
struct f16_t { uint16_t x; };
inline float load(const float* p) { return *p; }
inline double load(const double* p) { return *p; }
inline float load(const bf16_t* p) { return bf16_to_float(p->x); }
inline float load(const f16_t* p) { return half_to_float(p->x); }
inline void store(float* p, double v) { *p = static_cast<float>(v); }
inline void store(double* p, double v) { *p = v; }
inline void store(bf16_t* p, double v) { p->x = float_to_bf16(static_cast<float>(v)); }
inline void store(f16_t* p, double v) { p->x = float_to_half(static_cast<float>(v)); }

// Calls f(T*) with the storage type of a dtype code.
template <typename F>
auto dispatch_dtype(DType d, const char* op, F&& f) {
  switch (d) {
    case DType::F32: return f(static_cast<float*>(nullptr));
    case DType::F64: return f(static_cast<double*>(nullptr));
    case DType::BF16: return f(static_cast<bf16_t*>(nullptr));
    case DType::F16: return f(static_cast<f16_t*>(nullptr));
  }
  fail(op, "unsupported dtype");
}

}  // namespace lrc
