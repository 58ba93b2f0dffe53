# cmake -D EXE=<gtest binary> -D OUT=<ctest file> -D WORKING_DIR=<dir> -P peft_list_test_suites.cmake
# Writes one add_test per GoogleTest suite of EXE (see peftTestSuites.cmake).
execute_process(COMMAND ${EXE} --gtest_list_tests OUTPUT_VARIABLE listing RESULT_VARIABLE rc TIMEOUT 60)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "${EXE} --gtest_list_tests failed (${rc}):\n${listing}")
endif()
string(REPLACE "\n" ";" lines "${listing}")
set(suites "")
foreach(line IN LISTS lines)
  # A suite's line starts in column 0 and ends in '.' (then maybe "  # TypeParam = ..."); its tests' lines are indented.
  if(line MATCHES "^([^ #][^ ]*)\\.( |$)")
    set(suite ${CMAKE_MATCH_1})
    list(APPEND suites ${suite})
    set(count_${suite} 0)
  elseif(line MATCHES "^  [^ ]" AND DEFINED suite)
    math(EXPR count_${suite} "${count_${suite}} + 1")
  endif()
endforeach()
if(suites STREQUAL "")
  message(FATAL_ERROR "${EXE} --gtest_list_tests listed no test suite:\n${listing}")
endif()
set(script "")
foreach(suite IN LISTS suites)
  # COST: ctest starts costly tests first; with no timing history (a fresh clone) the number of tests stands in.
  string(APPEND script
    "add_test([==[${suite}]==] [==[${EXE}]==] [==[--gtest_filter=${suite}.*]==])\n"
    "set_tests_properties([==[${suite}]==] PROPERTIES WORKING_DIRECTORY [==[${WORKING_DIR}]==] SKIP_RETURN_CODE 77"
    " COST ${count_${suite}})\n")
endforeach()
file(WRITE ${OUT}.tmp "${script}")
file(RENAME ${OUT}.tmp ${OUT})
