// One instruction-set variant of the CPU kernel; build.py compiles this file once per variant
// with -DSC2_NS=<namespace> and that variant's -m flags.
#include "attn_cpu_api.h"
#include "attn_cpu_kernel.h"

namespace SC2_NS {

static Shape shape_of(const AttnArgs& a) {
  Shape s;
  s.B = a.B; s.S = a.S; s.Sq = a.Sq; s.off = a.S - a.Sq; s.H = a.H; s.KV = a.KV; s.D = a.D;
  s.DP = (a.D + 15) / 16 * 16;
  s.window = (a.window <= 0 || a.window > a.S) ? a.S : a.window;
  s.scale = a.scale;
  return s;
}

void attn_forward(const AttnArgs& a) {
  const Shape s = shape_of(a);
  if (a.dtype == 1) {
    using T = uint16_t;
    forward(static_cast<const T*>(a.q), static_cast<const T*>(a.k), static_cast<const T*>(a.v),
            static_cast<T*>(const_cast<void*>(a.o)), a.lse, a.doc, s, a.nthreads);
  } else {
    using T = float;
    forward(static_cast<const T*>(a.q), static_cast<const T*>(a.k), static_cast<const T*>(a.v),
            static_cast<T*>(const_cast<void*>(a.o)), a.lse, a.doc, s, a.nthreads);
  }
}

void attn_backward(const AttnArgs& a) {
  const Shape s = shape_of(a);
  if (a.dtype == 1) {
    using T = uint16_t;
    backward(static_cast<const T*>(a.q), static_cast<const T*>(a.k), static_cast<const T*>(a.v),
             static_cast<const T*>(a.o), static_cast<const T*>(a.dout), a.lse, a.doc,
             static_cast<T*>(a.dq), static_cast<T*>(a.dk), static_cast<T*>(a.dv), s, a.nthreads);
  } else {
    using T = float;
    backward(static_cast<const T*>(a.q), static_cast<const T*>(a.k), static_cast<const T*>(a.v),
             static_cast<const T*>(a.o), static_cast<const T*>(a.dout), a.lse, a.doc,
             static_cast<T*>(a.dq), static_cast<T*>(a.dk), static_cast<T*>(a.dv), s, a.nthreads);
  }
}

}  // namespace SC2_NS
