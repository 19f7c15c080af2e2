// Self-tests of the CUDA emulator (emu_selftest.cu): small kernels whose results the Python tests
// check against torch, and faulty kernels the emulator must reject. Exposed by _attn_cuda_emu.
#pragma once

#include <cstdint>
#include <string>

namespace sc2_emu {

// D (16 x n) = A (16x16) @ B (16 x n) + C on mma.m16n8k16, fp32 accumulators. a: 16x16 row-major,
// b: 16 x n row-major (k, n) or n x 16 row-major when the mode loads "NxK"; c, d: 16 x n fp32.
// dtype 0: fp16, 1: bf16. mode 0: fragments built by hand from the PTX ISA formulas (n = 8);
// 1: A by ldmatrix.x4, B (KxN) by ldmatrix.x2.trans (n = 8); 2: B (NxK) by ldmatrix.x2 (n = 8);
// 3: B (KxN) by ldmatrix.x4.trans (n = 16); 4: B (NxK) by ldmatrix.x4 (n = 16).
std::string mma_test(uintptr_t a, uintptr_t b, uintptr_t c, uintptr_t d, int dtype, int mode);
// One warp-collective kind per output row: out (rows x 64) int32 from in (64) int32, 2 warps.
std::string shuffle_test(uintptr_t in, uintptr_t out);
// out[i] = smem[(i + 64) % 128] after each thread stored in[i] at smem[i]; with or without the
// __syncthreads between, in static or dynamic shared memory; 4 blocks of 128 threads.
std::string barrier_test(uintptr_t in, uintptr_t out, bool with_barrier, bool dynamic_smem);
// Runs a named faulty kernel or launch; returns the emulator's error ("" if it found none).
std::string fault_test(const std::string& name);
// Conversions float -> fp16 / bf16 bits (round to nearest even) and back.
void convert_test(uintptr_t in, int64_t n, uintptr_t half_bits, uintptr_t bf16_bits, uintptr_t half_back,
                  uintptr_t bf16_back);

}  // namespace sc2_emu

#ifdef PYBIND11_MODULE
namespace sc2_emu {
inline void bind_selftests(pybind11::module_& m) {
  auto check = [](const std::string& err) {
    if (!err.empty()) throw std::runtime_error(err);
  };
  m.def("selftest_mma", [check](uintptr_t a, uintptr_t b, uintptr_t c, uintptr_t d, int dtype, int mode) {
    check(mma_test(a, b, c, d, dtype, mode));
  });
  m.def("selftest_shuffle", [check](uintptr_t in, uintptr_t out) { check(shuffle_test(in, out)); });
  m.def("selftest_barrier", [check](uintptr_t in, uintptr_t out, bool with_barrier, bool dynamic_smem) {
    check(barrier_test(in, out, with_barrier, dynamic_smem));
  });
  m.def("selftest_fault", &fault_test, "The emulator's error for a named faulty kernel ('' if none).");
  m.def("selftest_convert", &convert_test);
}
}  // namespace sc2_emu
#endif
