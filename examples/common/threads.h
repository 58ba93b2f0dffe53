#pragma once
// Thread set-up for examples and benchmarks.
//
// Debian's OpenBLAS is the pthread build: torch::set_num_threads does not bound
// it, and at few threads OpenMP's busy-waiting fights it unless
// OMP_WAIT_POLICY=PASSIVE. Both libraries read these variables when they are
// loaded, before main() runs, so the program re-executes itself once with them
// set.

#include <peft/core/threads.h>
#include <unistd.h>

#include <cstdlib>
#include <string>
#include <thread>

namespace peft_examples {

/// Bounds OpenMP and OpenBLAS to `threads` (0 = all cores) with passive waiting.
/// May re-execute the current program; call it first thing in main().
inline void configure_threads(char** argv, int threads) {
  if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const std::string n = std::to_string(threads);
  auto differs = [](const char* name, const std::string& want) {
    const char* have = std::getenv(name);
    return have == nullptr || want != have;
  };
  if (differs("OMP_NUM_THREADS", n) || differs("OPENBLAS_NUM_THREADS", n) ||
      differs("OMP_WAIT_POLICY", "PASSIVE")) {
    setenv("OMP_NUM_THREADS", n.c_str(), 1);
    setenv("OPENBLAS_NUM_THREADS", n.c_str(), 1);
    setenv("OMP_WAIT_POLICY", "PASSIVE", 1);
    execv("/proc/self/exe", argv);  // returns only on failure: carry on unbounded
  }
  peft::set_num_threads(threads);
}

}  // namespace peft_examples
