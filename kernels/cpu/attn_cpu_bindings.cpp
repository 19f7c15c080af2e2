// pybind11 module megatron_sc2.ops._attn_cpu: raw pointers (as integers) and sizes in, no torch
// headers. Runs the widest instruction-set build of the kernel the CPU supports (AVX-512, else
// AVX2+FMA, else the baseline build); set_isa() forces another one (tests, benchmarks).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "attn_cpu_api.h"

namespace py = pybind11;

namespace {

struct Variant {
  const char* name;
  void (*forward)(const AttnArgs&);
  void (*backward)(const AttnArgs&);
  bool (*supported)();
};

bool always() { return true; }
#if defined(__x86_64__)
bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
bool cpu_has_avx512() {
  __builtin_cpu_init();
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
#endif

// Narrowest first.
const Variant kVariants[] = {
    {"baseline", sc2_cpu_baseline::attn_forward, sc2_cpu_baseline::attn_backward, always},
#if defined(__x86_64__)
    {"avx2", sc2_cpu_avx2::attn_forward, sc2_cpu_avx2::attn_backward, cpu_has_avx2},
    {"avx512", sc2_cpu_avx512::attn_forward, sc2_cpu_avx512::attn_backward, cpu_has_avx512},
#endif
};

const Variant* widest() {
  const Variant* best = &kVariants[0];
  for (const Variant& v : kVariants)
    if (v.supported()) best = &v;
  return best;
}

const Variant* g_variant = widest();

void run(const AttnArgs& a, bool fwd) {
  py::gil_scoped_release release;
  fwd ? g_variant->forward(a) : g_variant->backward(a);
}

// Sq: query rows (0: S); the queries are the last Sq of the S key positions.
int64_t check(int64_t B, int64_t S, int64_t Sq, int64_t H, int64_t KV, int64_t D, int dtype) {
  if (Sq == 0) Sq = S;
  if (B < 1 || S < 1 || Sq < 1 || Sq > S || H < 1 || KV < 1 || D < 1 || H % KV)
    throw std::invalid_argument("bad attention sizes: B=" + std::to_string(B) + " S=" +
                                std::to_string(S) + " Sq=" + std::to_string(Sq) + " H=" +
                                std::to_string(H) + " KV=" + std::to_string(KV) + " D=" +
                                std::to_string(D) + " (need 1 <= Sq <= S)");
  if (S > INT32_MAX) throw std::invalid_argument("sequence too long");
  if (dtype != 0 && dtype != 1) throw std::invalid_argument("dtype code must be 0 (fp32) or 1 (bf16)");
  return Sq;
}

}  // namespace

PYBIND11_MODULE(_attn_cpu, m) {
  m.doc() = "Sliding-window GQA attention, C++ CPU kernels (flash-style tiles, online softmax)";
  m.def("isa", [] { return std::string(g_variant->name); },
        "Instruction-set variant in use: 'avx512', 'avx2' or 'baseline'.");
  m.def("available_isas", [] {
    py::list out;
    for (const Variant& v : kVariants)
      if (v.supported()) out.append(v.name);
    return out;
  }, "The variants this CPU can run, narrowest first.");
  m.def("set_isa", [](const std::string& name) {
    for (const Variant& v : kVariants)
      if (name == v.name) {
        if (!v.supported()) break;
        g_variant = &v;
        return;
      }
    throw std::invalid_argument("instruction set '" + name + "' is not available on this CPU");
  }, "Force a variant (one of available_isas()).");
  m.def("forward",
        [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t o, uintptr_t lse, uintptr_t doc,
           int64_t B, int64_t S, int64_t H, int64_t KV, int64_t D, int64_t window, double scale,
           int dtype, int nthreads, int64_t Sq) {
          Sq = check(B, S, Sq, H, KV, D, dtype);
          AttnArgs a;
          a.q = reinterpret_cast<const void*>(q); a.k = reinterpret_cast<const void*>(k);
          a.v = reinterpret_cast<const void*>(v); a.o = reinterpret_cast<const void*>(o);
          a.lse = reinterpret_cast<float*>(lse); a.doc = reinterpret_cast<const int64_t*>(doc);
          a.B = B; a.S = S; a.Sq = Sq; a.H = H; a.KV = KV; a.D = D; a.window = window;
          a.scale = static_cast<float>(scale); a.dtype = dtype; a.nthreads = nthreads < 1 ? 1 : nthreads;
          run(a, true);
        },
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("o"), py::arg("lse"), py::arg("doc"),
        py::arg("B"), py::arg("S"), py::arg("H"), py::arg("KV"), py::arg("D"), py::arg("window"),
        py::arg("scale"), py::arg("dtype"), py::arg("nthreads"), py::arg("Sq") = 0,
        "o, lse <- attention(q, k, v); pointers to contiguous q (B,Sq,H,D), k/v (B,S,KV,D), doc "
        "(B,S) int64, lse (B,H,Sq) fp32; Sq (0: S) queries are the last Sq key positions");
  m.def("backward",
        [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t o, uintptr_t dout, uintptr_t lse,
           uintptr_t doc, uintptr_t dq, uintptr_t dk, uintptr_t dv, int64_t B, int64_t S, int64_t H,
           int64_t KV, int64_t D, int64_t window, double scale, int dtype, int nthreads,
           int64_t Sq) {
          Sq = check(B, S, Sq, H, KV, D, dtype);
          AttnArgs a;
          a.q = reinterpret_cast<const void*>(q); a.k = reinterpret_cast<const void*>(k);
          a.v = reinterpret_cast<const void*>(v); a.o = reinterpret_cast<const void*>(o);
          a.dout = reinterpret_cast<const void*>(dout); a.lse = reinterpret_cast<float*>(lse);
          a.doc = reinterpret_cast<const int64_t*>(doc);
          a.dq = reinterpret_cast<void*>(dq); a.dk = reinterpret_cast<void*>(dk);
          a.dv = reinterpret_cast<void*>(dv);
          a.B = B; a.S = S; a.Sq = Sq; a.H = H; a.KV = KV; a.D = D; a.window = window;
          a.scale = static_cast<float>(scale); a.dtype = dtype; a.nthreads = nthreads < 1 ? 1 : nthreads;
          run(a, false);
        },
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("o"), py::arg("dout"), py::arg("lse"),
        py::arg("doc"), py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("B"), py::arg("S"),
        py::arg("H"), py::arg("KV"), py::arg("D"), py::arg("window"), py::arg("scale"),
        py::arg("dtype"), py::arg("nthreads"), py::arg("Sq") = 0,
        "dq, dk, dv <- gradients, recomputing scores from the saved log-sum-exp (Sq as forward)");
}
