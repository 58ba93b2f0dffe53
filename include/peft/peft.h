#pragma once
/// @file
/// Umbrella header: including peft/peft.h brings in the whole public API.

#include <peft/core/error.h>
#include <peft/core/mask.h>
#include <peft/core/shape.h>
#include <peft/core/threads.h>
#include <peft/core/trainable.h>
#include <peft/version.h>

#include <peft/core/match.h>
#include <peft/io/adapter_files.h>
#include <peft/io/gguf.h>
#include <peft/io/module_state.h>
#include <peft/io/safetensors.h>
#include <peft/quant/nf4.h>
#include <peft/nn/embedding.h>
#include <peft/nn/linear.h>
#include <peft/nn/sites.h>
#include <peft/nn/slots.h>
#include <peft/tuner.h>

// The methods (one line each in methods.h, which reads any of them from adapter_config.json).
#include <peft/methods.h>

#include <peft/checkpoint.h>
#include <peft/generation/generate.h>
#include <peft/generation/hf.h>
#include <peft/hf/auto.h>
#include <peft/lora/gguf.h>
#include <peft/lora/weighted.h>
#include <peft/native_model.h>
#include <peft/peft_model.h>
#include <peft/serving/engine.h>
