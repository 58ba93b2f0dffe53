#pragma once
/// @file
/// The exception types every peft function throws on bad input.

#include <c10/util/Exception.h>
#include <torch/version.h>
#include <fmt/format.h>

#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace peft {

/// Base of every error peft raises. The message names the module, tensor,
/// option or file at fault and what was expected.
///
/// ```
/// try { peft::LoRALinear layer(base, peft::LoraOptions(0)); }
/// catch (const peft::Error& e) { std::cerr << e.what(); }
/// ```
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// An option or config value outside its allowed range.
///
/// ```
/// peft::LoraOptions(0);   // throws OptionError: LoraOptions.r must be >= 1
/// ```
class OptionError : public Error {
 public:
  using Error::Error;
};

/// A tensor whose shape, dtype or device does not fit.
///
/// ```
/// layer(torch::randn({4, 512}));   // a LoRALinear over Linear(768, 768): ShapeError
/// ```
class ShapeError : public Error {
 public:
  using Error::Error;
};

/// A target-module pattern that matched nothing, or matched the wrong kind of module.
///
/// ```
/// try { peft::get_peft_model(base, peft::LoraConfig().target_modules({"nope"})); }
/// catch (const peft::TargetError& e) { std::cerr << e.what(); }   // lists the candidates
/// ```
class TargetError : public Error {
 public:
  using Error::Error;
};

/// A model that lacks what a method needs (frozen export, missing attention, ...).
///
/// ```
/// peft::get_peft_model(frozen_export, config);   // torch.jit.freeze'd: ModelError
/// ```
class ModelError : public Error {
 public:
  using Error::Error;
};

/// A file that is missing, unreadable, corrupt or for a different model.
///
/// ```
/// try { model.load_adapter("downloads/adapter", "other"); }
/// catch (const peft::FileError& e) { /* corrupt or mismatched: nothing was loaded */ }
/// ```
class FileError : public Error {
 public:
  using Error::Error;
};

/// A collective operation between processes that failed or timed out (a rank
/// that died or never arrived).
///
/// ```
/// try { dp.after_backward(); }
/// catch (const peft::CommunicationError& e) { /* a peer died: stop this rank */ }
/// ```
class CommunicationError : public Error {
 public:
  using Error::Error;
};

/// Throws `E` with a fmt-formatted message when `ok` is false.
///
/// ```
/// peft::check<peft::OptionError>(r > 0, "LoraOptions.r must be > 0, got {}", r);
/// ```
template <typename E = Error, typename... Args>
inline void check(bool ok, fmt::format_string<Args...> message, Args&&... args) {
  if (!ok) throw E(fmt::format(message, std::forward<Args>(args)...));
}

/// Warns through LibTorch's mechanism (TORCH_WARN: stderr by default), so a
/// program captures or silences peft's warnings like LibTorch's own.
template <typename... Args>
inline void warn(fmt::format_string<Args...> message, Args&&... args) {
  TORCH_WARN("peft: ", fmt::format(message, std::forward<Args>(args)...));
}

/// Captures the LibTorch warnings (peft's included) raised on this thread while
/// it lives, instead of printing them; the previous handler returns after.
///
/// ```
/// peft::CapturedWarnings captured;
/// auto model = peft::get_peft_model(base, config);
/// for (const auto& w : captured.messages()) log(w);
/// ```
class CapturedWarnings : public c10::WarningHandler {
#if TORCH_VERSION_MAJOR >= 2
  static c10::WarningHandler* handler() { return c10::WarningUtils::get_warning_handler(); }
  static void set_handler(c10::WarningHandler* h) { c10::WarningUtils::set_warning_handler(h); }
#else
  static c10::WarningHandler* handler() { return c10::Warning::get_warning_handler(); }
  static void set_handler(c10::WarningHandler* h) { c10::Warning::set_warning_handler(h); }
#endif

 public:
  CapturedWarnings() : previous_(handler()) { set_handler(this); }
  ~CapturedWarnings() override { set_handler(previous_); }
  CapturedWarnings(const CapturedWarnings&) = delete;
  CapturedWarnings& operator=(const CapturedWarnings&) = delete;

  /// Records one warning instead of printing it (LibTorch calls this).
#if TORCH_VERSION_MAJOR >= 2
  void process(const c10::Warning& warning) override { messages_.push_back(warning.msg()); }
#else
  void process(const c10::SourceLocation&, const std::string& message, const bool) override { messages_.push_back(message); }
#endif
  /// The messages, oldest first (peft's start with "peft: ").
  const std::vector<std::string>& messages() const { return messages_; }

 private:
  c10::WarningHandler* previous_;
  std::vector<std::string> messages_;
};

}  // namespace peft
