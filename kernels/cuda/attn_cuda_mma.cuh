// Sliding-window GQA attention on tensor cores (mma.sync m16n8k16): PLACEHOLDER, being written.
#pragma once

#include <string>

#include "attn_cuda_api.h"
#include "sc2_device.cuh"

namespace sc2_mma {

template <typename T, int D>
std::string launch(const CudaAttnArgs&, bool) {
  return "CUDA attention: the tensor-core kernels are not written yet; use kernel=1 (SIMT)";
}

}  // namespace sc2_mma
