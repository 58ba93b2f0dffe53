#pragma once
/// @file
/// Bounding both CPU thread pools LibTorch uses.

#include <torch/torch.h>

#include <dlfcn.h>

namespace peft {

/// Sets the intra-op thread count of LibTorch (OpenMP) *and* of OpenBLAS.
///
/// Debian's OpenBLAS is the pthread build, whose pool `torch::set_num_threads`
/// does not bound; it is reached through `openblas_set_num_threads` when the
/// process has OpenBLAS loaded. For few threads also export
/// `OMP_WAIT_POLICY=PASSIVE` before the program starts (OpenMP reads it at load).
///
/// ```
/// peft::set_num_threads(2);
/// ```
inline void set_num_threads(int threads) {
  torch::set_num_threads(threads);
  using SetThreads = void (*)(int);
  if (auto* openblas = reinterpret_cast<SetThreads>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads")))
    openblas(threads);
}

}  // namespace peft
