#pragma once
/// @file
/// What a method provides to the generic machinery.
///
/// A method folder specialises `Method<TheConfig>` (deriving from
/// MethodDefaults<TheConfig>) and is listed once in peft/methods.h; from then
/// on PeftConfig, PeftModel and the adapter files handle it without naming it
/// (docs/adding-a-method.md).

#include <peft/core/error.h>
#include <peft/io/adapter_files.h>
#include <peft/jit/inject.h>
#include <peft/nn/inject.h>

#include <nlohmann/json.hpp>

#include <memory>
#include <string>
#include <type_traits>
#include <typeinfo>

namespace peft {

/// A method's hooks, specialised in its folder:
///
/// ```
/// template <> struct Method<MyConfig> : MethodDefaults<MyConfig> {
///   static constexpr const char* peft_type = "MY_METHOD";   // adapter_config.json's peft_type
///   static constexpr const char* name = "MyMethod";         // for messages
///   using JitTuner = my_method::Tuner;                      // a jit::Tuner made from (jit::Injection&, const MyConfig&)
///   static nlohmann::json to_json(const MyConfig&);         // HF's fields beyond the common ones
///   static MyConfig from_json(io::ConfigReader&);           // the config, set up for loading weights
///   static constexpr auto native_tuner = &my_method::native_tuner;  // torch::nn models (optional)
/// };
/// ```
template <typename Config>
struct Method;

/// What a method does unless its Method<> says otherwise.
template <typename Config>
struct MethodDefaults {
  /// How the method attaches to a torch::nn model: none yet (OptionError saying so).
  static constexpr std::nullptr_t native_tuner = nullptr;
  /// Prompt and prefix tuning: one such adapter per model, alone.
  static bool prompt_learning(const Config&) { return false; }
  /// Whether the method rescales the output of the layers it adapts (DoRA, IA3),
  /// so that no sum defines it together with another adapter on the same layer.
  static bool rescales_layers(const Config&) { return false; }
  /// Whether the method attaches after submodule calls (bottleneck adapters),
  /// which injecting other methods inlines away: such adapters are injected first.
  static bool needs_module_boundaries(const Config&) { return false; }
  /// The field by which the config changes the base model itself (QLoRA:
  /// "LoraConfig.quantize_base"), which only a model's first adapter may do; empty: none.
  static std::string base_change(const Config&) { return {}; }
  /// The base model prepared for the first adapter (QLoRA: quantised in place).
  static torch::jit::Module prepare_base(torch::jit::Module base, const Config&) { return base; }
  /// The config to re-create an adapter whose tensors are then restored: no
  /// initialisation that changes the base or draws random numbers.
  static Config for_loading(const Config& config) { return config; }
};

/// Any method's config (LoraConfig, IA3Config, ...): a value, copied cheaply.
///
/// ```
/// peft::PeftConfig config = peft::LoraConfig().r(8).target_modules({"q_proj", "v_proj"});
/// if (const auto* lora = config.get_if<peft::LoraConfig>()) fmt::print("rank {}\n", lora->r());
/// ```
class PeftConfig {
 public:
  /// No method yet; using it throws OptionError.
  PeftConfig() = default;

  /// The config of a method (one with a Method<C>).
  template <typename C, typename = std::enable_if_t<!std::is_same<std::decay_t<C>, PeftConfig>::value>>
  PeftConfig(C config) : impl_(std::make_shared<Model<C>>(std::move(config))) {}  // NOLINT: implicit by design

  /// Whether a method's config is held.
  bool has_value() const { return impl_ != nullptr; }
  /// Whether it is a `C`.
  template <typename C>
  bool is() const {
    return impl_ && impl_->type() == typeid(C);
  }
  /// The `C` held, or nullptr.
  template <typename C>
  const C* get_if() const {
    return is<C>() ? static_cast<const C*>(impl_->get()) : nullptr;
  }

  /// adapter_config.json's peft_type ("LORA", ...).
  std::string peft_type() const { return impl().peft_type(); }
  /// The method's name for messages ("LoRA", ...).
  std::string method() const { return impl().method(); }
  /// The config's fields as HF peft writes them.
  nlohmann::json to_json() const { return impl().to_json(); }
  /// The method's graph rewriting of one TorchScript adapter.
  std::unique_ptr<jit::Tuner> jit_tuner(jit::Injection& injection) const { return impl().jit_tuner(injection); }
  /// The method on a torch::nn model (OptionError for a method without a native layer yet).
  std::unique_ptr<nn::Tuner> native_tuner(nn::Injection& injection) const { return impl().native_tuner(injection); }
  /// See MethodDefaults::for_loading.
  PeftConfig for_loading() const { return impl().for_loading(); }
  /// See MethodDefaults::prompt_learning.
  bool prompt_learning() const { return impl().prompt_learning(); }
  /// See MethodDefaults::rescales_layers.
  bool rescales_layers() const { return impl().rescales_layers(); }
  /// See MethodDefaults::needs_module_boundaries.
  bool needs_module_boundaries() const { return impl().needs_module_boundaries(); }
  /// See MethodDefaults::base_change.
  std::string base_change() const { return impl().base_change(); }
  /// See MethodDefaults::prepare_base.
  torch::jit::Module prepare_base(torch::jit::Module base) const { return impl().prepare_base(std::move(base)); }

 private:
  struct Concept {
    virtual ~Concept() = default;
    virtual const std::type_info& type() const = 0;
    virtual const void* get() const = 0;
    virtual std::string peft_type() const = 0;
    virtual std::string method() const = 0;
    virtual nlohmann::json to_json() const = 0;
    virtual std::unique_ptr<jit::Tuner> jit_tuner(jit::Injection&) const = 0;
    virtual std::unique_ptr<nn::Tuner> native_tuner(nn::Injection&) const = 0;
    virtual PeftConfig for_loading() const = 0;
    virtual bool prompt_learning() const = 0;
    virtual bool rescales_layers() const = 0;
    virtual bool needs_module_boundaries() const = 0;
    virtual std::string base_change() const = 0;
    virtual torch::jit::Module prepare_base(torch::jit::Module) const = 0;
  };

  template <typename C>
  struct Model final : Concept {
    explicit Model(C c) : config(std::move(c)) {}
    const std::type_info& type() const override { return typeid(C); }
    const void* get() const override { return &config; }
    std::string peft_type() const override { return Method<C>::peft_type; }
    std::string method() const override { return Method<C>::name; }
    nlohmann::json to_json() const override {
      nlohmann::json j = io::common_fields(Method<C>::peft_type);
      j.update(Method<C>::to_json(config));
      return j;
    }
    std::unique_ptr<jit::Tuner> jit_tuner(jit::Injection& i) const override {
      return std::make_unique<typename Method<C>::JitTuner>(i, config);
    }
    std::unique_ptr<nn::Tuner> native_tuner(nn::Injection& i) const override {
      if constexpr (std::is_null_pointer<decltype(Method<C>::native_tuner)>::value) {
        throw OptionError(fmt::format("{} is not available for torch::nn models yet; use it through a TorchScript "
                                      "export (peft::get_peft_model(torch::jit::Module, ...))",
                                      Method<C>::name));
      } else {
        return Method<C>::native_tuner(i, config);
      }
    }
    PeftConfig for_loading() const override { return PeftConfig(Method<C>::for_loading(config)); }
    bool prompt_learning() const override { return Method<C>::prompt_learning(config); }
    bool rescales_layers() const override { return Method<C>::rescales_layers(config); }
    bool needs_module_boundaries() const override { return Method<C>::needs_module_boundaries(config); }
    std::string base_change() const override { return Method<C>::base_change(config); }
    torch::jit::Module prepare_base(torch::jit::Module base) const override {
      return Method<C>::prepare_base(std::move(base), config);
    }
    C config;
  };

  const Concept& impl() const {
    if (!impl_) throw OptionError("empty PeftConfig: assign a method's config (LoraConfig, IA3Config, ...)");
    return *impl_;
  }

  std::shared_ptr<const Concept> impl_;
};

/// Whether `config` is prompt or prefix tuning (one such adapter per model, alone).
inline bool is_prompt_learning(const PeftConfig& config) { return config.prompt_learning(); }

}  // namespace peft
