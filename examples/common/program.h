#pragma once
// The frame of every example program: an error (a bad file, option or model)
// is printed as "<program>: error: <message>" and the program exits 1, never
// aborting on an uncaught exception.

#include <c10/util/Exception.h>
#include <fmt/format.h>
#include <peft/core/error.h>

#include <exception>

namespace peft_examples {

/// Returns `body()`, or 1 after printing the exception that escaped it.
template <typename Body>
int run_program(const char* program, Body&& body) {
  try {
    return body();
  } catch (const peft::Error& e) {
    fmt::print(stderr, "{}: error: {}\n", program, e.what());
  } catch (const c10::Error& e) {  // LibTorch's (torch::jit::load of a bad file, ...): no C++ backtrace
    fmt::print(stderr, "{}: error: {}\n", program, e.what_without_backtrace());
  } catch (const std::exception& e) {
    fmt::print(stderr, "{}: error: {}\n", program, e.what());
  }
  return 1;
}

}  // namespace peft_examples
