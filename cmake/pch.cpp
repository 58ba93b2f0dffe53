// Only here so CMake has a translation unit to build the shared PCH with.
