#pragma once
/// @file
/// Umbrella header: `#include <peft/peft.h>` brings in the whole public API.

#include <peft/core/error.h>
#include <peft/core/mask.h>
#include <peft/core/shape.h>
#include <peft/core/threads.h>
#include <peft/core/trainable.h>
#include <peft/version.h>

#include <peft/adapter/adapter.h>
#include <peft/bitfit/bitfit.h>
#include <peft/ia3/ia3.h>
#include <peft/lora/functional.h>
#include <peft/lora/module.h>
#include <peft/lora/options.h>
#include <peft/prefix/prefix.h>
#include <peft/prompt/prompt.h>
#include <peft/quant/nf4.h>

#include <peft/core/match.h>
#include <peft/lora/config.h>
#include <peft/peft_model.h>
#include <peft/quant/inject.h>
#include <peft/generation/generate.h>

#include <peft/io/checkpoint.h>
#include <peft/io/module_state.h>
#include <peft/io/pretrained.h>
#include <peft/io/safetensors.h>
