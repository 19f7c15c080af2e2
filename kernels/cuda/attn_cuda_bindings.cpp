// pybind11 module megatron_sc2.ops._attn_cuda: raw device pointers (as integers), sizes and the
// CUDA stream handle in; no torch headers. Imports without a GPU; calls raise RuntimeError then.
// Built a second time as megatron_sc2.ops._attn_cuda_emu (-DSC2_CUDA_EMULATION, the kernels run
// on the CPU emulator in emu/; pointers are CPU memory), which also holds the emulator's
// self-tests.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "attn_cuda_api.h"
#ifdef SC2_CUDA_EMULATION
#include "emu/emu_selftest.h"
#endif

#ifndef SC2_CUDA_MODULE_NAME
#define SC2_CUDA_MODULE_NAME _attn_cuda
#endif

namespace py = pybind11;

namespace {

// Sq: query rows (0: S), the last Sq of the S key positions; returns it resolved.
int64_t check_sizes(int64_t B, int64_t S, int64_t Sq, int64_t H, int64_t KV, int64_t D, int dtype,
                    int kernel) {
  if (Sq == 0) Sq = S;
  if (Sq < 1 || Sq > S)
    throw std::invalid_argument("CUDA attention: need 1 <= Sq <= S, got Sq=" + std::to_string(Sq) +
                                " S=" + std::to_string(S));
  if (B < 1 || S < 1 || H < 1 || KV < 1 || H % KV || (D != 64 && D != 128))
    throw std::invalid_argument("CUDA attention: bad sizes B=" + std::to_string(B) + " S=" +
                                std::to_string(S) + " H=" + std::to_string(H) + " KV=" +
                                std::to_string(KV) + " D=" + std::to_string(D) +
                                " (head dim must be 64 or 128)");
  if (S > INT32_MAX || H > 65535 || B > 65535)
    throw std::invalid_argument("CUDA attention: sizes beyond the launch grid");
  if (dtype != 0 && dtype != 1) throw std::invalid_argument("CUDA attention: dtype code 0 (fp16) or 1 (bf16)");
  if (kernel != 0 && kernel != 1) throw std::invalid_argument("CUDA attention: kernel code 0 (tensor cores) or 1 (SIMT)");
  return Sq;
}

void raise_if(const std::string& err) {
  if (!err.empty()) throw std::runtime_error(err);
}

template <typename P>
P* as(uintptr_t x) { return reinterpret_cast<P*>(x); }

}  // namespace

PYBIND11_MODULE(SC2_CUDA_MODULE_NAME, m) {
#ifdef SC2_CUDA_EMULATION
  m.doc() = "Sliding-window GQA attention, CUDA kernels run by the CPU emulator (tests only)";
  sc2_emu::bind_selftests(m);
#else
  m.doc() = "Sliding-window GQA attention, CUDA kernels (sm_80/sm_90, fp16/bf16, head dim 64/128)";
#endif
  m.def("device_count", [] {
    int n = 0;
    sc2_cuda_device_count(&n);
    return n;
  }, "Number of CUDA devices the module can see (0 without a GPU or driver).");
  m.def("forward",
        [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t o, uintptr_t lse, uintptr_t lo,
           uintptr_t doc, uintptr_t by_id, int64_t B, int64_t S, int64_t H, int64_t KV, int64_t D,
           double scale, int dtype, uintptr_t stream, int kernel, int rows_per_warp, int64_t Sq) {
          Sq = check_sizes(B, S, Sq, H, KV, D, dtype, kernel);
          CudaAttnArgs a;
          a.q = as<const void>(q); a.k = as<const void>(k); a.v = as<const void>(v);
          a.fwd_rows_per_warp = rows_per_warp;
          a.o = as<void>(o); a.lse = as<float>(lse); a.lo = as<const int32_t>(lo);
          a.doc = as<const int64_t>(doc); a.by_id = as<const uint8_t>(by_id);
          a.B = B; a.S = S; a.Sq = Sq; a.H = H; a.KV = KV; a.D = D;
          a.scale = static_cast<float>(scale); a.dtype = dtype; a.stream = stream; a.kernel = kernel;
          std::string err;
          {
            py::gil_scoped_release release;
            err = sc2_cuda_forward(a);
          }
          raise_if(err);
        },
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("o"), py::arg("lse"), py::arg("lo"),
        py::arg("doc"), py::arg("by_id"), py::arg("B"), py::arg("S"), py::arg("H"), py::arg("KV"),
        py::arg("D"), py::arg("scale"), py::arg("dtype"), py::arg("stream"), py::arg("kernel"),
        py::arg("rows_per_warp") = 0,  // kernel 0: query rows per warp, 16 or 32 (0: 16)
        py::arg("Sq") = 0);            // query rows (0: S): q, o, lse hold the last Sq positions
  m.def("backward",
        [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t dout, uintptr_t lse, uintptr_t delta,
           uintptr_t lo, uintptr_t doc, uintptr_t by_id, uintptr_t dq, uintptr_t dk, uintptr_t dv,
           int64_t B, int64_t S, int64_t H, int64_t KV, int64_t D, double scale, int dtype,
           uintptr_t stream, int kernel, uintptr_t dq32, int head_splits, int bwd_warps,
           int64_t Sq) {
          Sq = check_sizes(B, S, Sq, H, KV, D, dtype, kernel);
          CudaAttnArgs a;
          a.q = as<const void>(q); a.k = as<const void>(k); a.v = as<const void>(v);
          a.dq32 = as<float>(dq32);
          a.head_splits = head_splits;
          a.bwd_warps = bwd_warps;
          a.dout = as<const void>(dout); a.lse = as<float>(lse); a.delta = as<const float>(delta);
          a.lo = as<const int32_t>(lo); a.doc = as<const int64_t>(doc);
          a.by_id = as<const uint8_t>(by_id);
          a.dq = as<void>(dq); a.dk = as<float>(dk); a.dv = as<float>(dv);
          a.B = B; a.S = S; a.Sq = Sq; a.H = H; a.KV = KV; a.D = D;
          a.scale = static_cast<float>(scale); a.dtype = dtype; a.stream = stream; a.kernel = kernel;
          std::string err;
          {
            py::gil_scoped_release release;
            err = sc2_cuda_backward(a);
          }
          raise_if(err);
        },
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("dout"), py::arg("lse"), py::arg("delta"),
        py::arg("lo"), py::arg("doc"), py::arg("by_id"), py::arg("dq"), py::arg("dk"), py::arg("dv"),
        py::arg("B"), py::arg("S"), py::arg("H"), py::arg("KV"), py::arg("D"), py::arg("scale"),
        py::arg("dtype"), py::arg("stream"), py::arg("kernel"),
        py::arg("dq32") = uintptr_t{0},    // kernel 0: zeroed fp32 (B, S, H, D) scratch for dQ
        py::arg("head_splits") = 0,        // kernel 0: blocks per (key tile, kv head); 0: auto
        py::arg("bwd_warps") = 0,          // kernel 0: warps per block, 4 or 8 (0: 4)
        py::arg("Sq") = 0);                // query rows (0: S), as the forward
}
