#pragma once
/// @file
/// Library version. CMake reads PEFT_VERSION_* from this file, so it is the
/// single place the version is written.

#define PEFT_VERSION_MAJOR 0
#define PEFT_VERSION_MINOR 1
#define PEFT_VERSION_PATCH 0

namespace peft {

/// The library version as "MAJOR.MINOR.PATCH".
inline const char* version() {
#define PEFT_STR2(x) #x
#define PEFT_STR(x) PEFT_STR2(x)
  return PEFT_STR(PEFT_VERSION_MAJOR) "." PEFT_STR(PEFT_VERSION_MINOR) "." PEFT_STR(PEFT_VERSION_PATCH);
#undef PEFT_STR
#undef PEFT_STR2
}

}  // namespace peft
