# peft_discover_test_suites(<gtest target>): one ctest test per GoogleTest suite.
#
# gtest_discover_tests makes one ctest test, hence one process, per test; each process
# spends ~0.5 s of CPU starting LibTorch, which for ~330 tests was a minute and a half of
# the test command on 2 cores. A suite's tests run in one process, each still reported by
# GoogleTest in the test's output. A suite whose tests all skip is reported as skipped: the
# binary's main() returns 77 (SKIP_RETURN_CODE) when no test ran and none failed.
set(_peft_suites_script ${CMAKE_CURRENT_LIST_DIR}/peft_list_test_suites.cmake)

function(peft_discover_test_suites target)
  set(ctest_file ${CMAKE_CURRENT_BINARY_DIR}/${target}_suites.cmake)
  add_custom_command(TARGET ${target} POST_BUILD
    COMMAND ${CMAKE_COMMAND} -D EXE=$<TARGET_FILE:${target}> -D OUT=${ctest_file}
            -D WORKING_DIR=${CMAKE_CURRENT_BINARY_DIR} -P ${_peft_suites_script}
    BYPRODUCTS ${ctest_file} VERBATIM)
  # Until the target is built there is no list: ctest then reports <target>_NOT_BUILT as not run.
  set(include_file ${CMAKE_CURRENT_BINARY_DIR}/${target}_suites_include.cmake)
  file(WRITE ${include_file} "if(EXISTS [==[${ctest_file}]==])\n  include([==[${ctest_file}]==])\nelse()\n"
                             "  add_test(${target}_NOT_BUILT ${target}_NOT_BUILT)\nendif()\n")
  set_property(DIRECTORY APPEND PROPERTY TEST_INCLUDE_FILES ${include_file})
endfunction()
