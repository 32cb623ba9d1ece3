// Kernel-side pieces shared by every op's generic kernel (kernels/<op>.h): scratch carving and
// element access. Like the kernels it is included inside an ISA namespace by isa/kernels.inc,
// after simd.h (see simd.h for why nothing is included here), so each ISA gets its own copy.
#pragma once

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Hands out consecutive pieces of `base`, each a whole number of 16 floats (64 bytes, at least
// one block so every piece is distinct); with base == nullptr it only counts, so one function
// both sizes and carves a set of buffers (each listed once).
class Carver {
 public:
  explicit Carver(float* base) : base_(base) {}
  float* take(int64_t n) {
    float* p = base_ != nullptr ? base_ + used_ : nullptr;
    used_ += round_up(n > 1 ? n : 1, 16);
    return p;
  }
  int64_t used() const { return used_; }

 private:
  float* base_;
  int64_t used_ = 0;
};

// Element access, specialised per element type so that the per-row loops inline.
template <ElemType T> struct Elem;
template <> struct Elem<ElemType::kFloat32> {
  using type = float;
  static float to_f32(float x) { return x; }
  static float from_f32(float x) { return x; }
  static vf load(const float* p) { return vload(p); }
  static void store(float* p, vf x) { vstore(p, x); }
};
template <> struct Elem<ElemType::kBFloat16> {
  using type = uint16_t;
  static float to_f32(uint16_t x) { return bf16_to_f32(x); }
  static uint16_t from_f32(float x) { return f32_to_bf16(x); }
  static vf load(const uint16_t* p) { return vload_bf16(p); }
  static void store(uint16_t* p, vf x) { vstore_bf16(p, x); }
};
template <> struct Elem<ElemType::kFloat16> {
  using type = uint16_t;
  static float to_f32(uint16_t x) { return f16_to_f32(x); }
  static uint16_t from_f32(float x) { return f32_to_f16(x); }
  static vf load(const uint16_t* p) { return vload_f16(p); }
  static void store(uint16_t* p, vf x) { vstore_f16(p, x); }
};

// dst[off + i] = src[i] for i < n (outputs are contiguous), rounded to T.
template <ElemType T>
inline void store_row(void* dst, int64_t off, int64_t n, const float* src) {
  using E = Elem<T>;
  typename E::type* o = static_cast<typename E::type*>(dst) + off;
  int64_t i = 0;
  for (; i + kW <= n; i += kW) E::store(o + i, vload(src + i));
  for (; i < n; ++i) o[i] = E::from_f32(src[i]);
}
