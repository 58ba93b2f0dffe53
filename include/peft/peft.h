#pragma once
/// @file
/// Umbrella header: `#include <peft/peft.h>` brings in the whole public API.

#include <peft/core/error.h>
#include <peft/core/threads.h>
#include <peft/version.h>
