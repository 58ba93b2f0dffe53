# Install rules, the installed package config, and a build-tree config so that
# find_package(peft) works against an install prefix and against this build.
include(CMakePackageConfigHelpers)
set(PEFT_CMAKE_DIR ${CMAKE_INSTALL_LIBDIR}/cmake/peft)

install(TARGETS peft peft_distributed peft_tokenizers EXPORT peftTargets)
install(DIRECTORY ${PROJECT_SOURCE_DIR}/include/ DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(EXPORT peftTargets NAMESPACE peft:: DESTINATION ${PEFT_CMAKE_DIR})

configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/peftConfig.cmake.in
  ${PROJECT_BINARY_DIR}/install/peftConfig.cmake INSTALL_DESTINATION ${PEFT_CMAKE_DIR})
write_basic_package_version_file(${PROJECT_BINARY_DIR}/peftConfigVersion.cmake
  COMPATIBILITY SameMinorVersion ARCH_INDEPENDENT)
install(FILES ${PROJECT_BINARY_DIR}/install/peftConfig.cmake ${PROJECT_BINARY_DIR}/peftConfigVersion.cmake
  DESTINATION ${PEFT_CMAKE_DIR})

# Build tree: peft_DIR=<build> finds these.
export(EXPORT peftTargets NAMESPACE peft:: FILE ${PROJECT_BINARY_DIR}/peftTargets.cmake)
configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/peftConfig.cmake.in
  ${PROJECT_BINARY_DIR}/peftConfig.cmake INSTALL_DESTINATION ${PROJECT_BINARY_DIR}
  INSTALL_PREFIX ${PROJECT_BINARY_DIR})
