#pragma once
/// @file
/// Library version. CMake reads PEFT_VERSION_* from this file, so it is the
/// single place the version is written.

/// Major version.
#define PEFT_VERSION_MAJOR 0
/// Minor version.
#define PEFT_VERSION_MINOR 1
/// Patch version.
#define PEFT_VERSION_PATCH 0

namespace peft {

/// The library version as "MAJOR.MINOR.PATCH".
inline const char* version() {
/// @cond INTERNAL
#define PEFT_STR2(x) #x
#define PEFT_STR(x) PEFT_STR2(x)
/// @endcond
  return PEFT_STR(PEFT_VERSION_MAJOR) "." PEFT_STR(PEFT_VERSION_MINOR) "." PEFT_STR(PEFT_VERSION_PATCH);
#undef PEFT_STR
#undef PEFT_STR2
}

}  // namespace peft
