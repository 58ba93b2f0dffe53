#pragma once
/// @file
/// Bounding both CPU thread pools LibTorch uses.
///
/// Debian's LibTorch runs its own ops on OpenMP and matrix products on
/// OpenBLAS's pthread pool; `torch::set_num_threads` bounds only the first.
/// At few threads OpenMP's busy-waiting also fights OpenBLAS's threads for the
/// cores unless `OMP_WAIT_POLICY=PASSIVE` (measured: two threads without it
/// ran ~2x slower than one). OpenMP reads that variable when it is loaded,
/// before main() runs, so a program can only set it for itself by re-executing.

#include <peft/core/error.h>
#include <torch/torch.h>

#include <dlfcn.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>
#include <thread>

namespace peft {

/// Sets the intra-op thread count of LibTorch (OpenMP) *and* of OpenBLAS
/// (reached through `openblas_set_num_threads` when the process has it loaded).
/// Warns once (peft::warn) when `threads` > 1 and `OMP_WAIT_POLICY` is not
/// `PASSIVE`, the setting under which two threads are slower than one; use
/// configure_threads() to have it set for you.
///
/// ```
/// peft::set_num_threads(2);
/// ```
inline void set_num_threads(int threads) {
  torch::set_num_threads(threads);
  using SetThreads = void (*)(int);
  if (auto* openblas = reinterpret_cast<SetThreads>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads")))
    openblas(threads);
  static std::atomic<bool> warned{false};
  const char* policy = std::getenv("OMP_WAIT_POLICY");
  if (threads > 1 && (policy == nullptr || std::string(policy) != "PASSIVE") && !warned.exchange(true))
    warn("{} threads without OMP_WAIT_POLICY=PASSIVE: OpenMP's spinning competes with OpenBLAS's threads (measured "
         "~2x slower than one thread); export OMP_WAIT_POLICY=PASSIVE or call peft::configure_threads(argv, {}) first "
         "in main()", threads, threads);
}

/// Makes OpenMP and OpenBLAS use `threads` (0 = all cores) with passive
/// waiting: when `OMP_NUM_THREADS`, `OPENBLAS_NUM_THREADS` and
/// `OMP_WAIT_POLICY` do not already say so, sets them and re-executes the
/// program (`/proc/self/exe` with `argv`) once, since both libraries read them
/// at load; then calls set_num_threads(). Call it first thing in main(), before
/// any other thread starts. Linux only; if re-executing fails it carries on with
/// set_num_threads() alone.
///
/// ```
/// int main(int argc, char** argv) {
///   peft::configure_threads(argv, 2);
///   ...
/// }
/// ```
inline void configure_threads(char** argv, int threads) {
  if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const std::string n = std::to_string(threads);
  auto differs = [](const char* name, const std::string& want) {
    const char* have = std::getenv(name);
    return have == nullptr || want != have;
  };
  if (differs("OMP_NUM_THREADS", n) || differs("OPENBLAS_NUM_THREADS", n) || differs("OMP_WAIT_POLICY", "PASSIVE")) {
    setenv("OMP_NUM_THREADS", n.c_str(), 1);
    setenv("OPENBLAS_NUM_THREADS", n.c_str(), 1);
    setenv("OMP_WAIT_POLICY", "PASSIVE", 1);
    execv("/proc/self/exe", argv);  // returns only on failure: carry on with what set_num_threads can do
  }
  set_num_threads(threads);
}

}  // namespace peft
