# cmake -DMODE=<installed|build-tree|subdirectory> -DPEFT_SOURCE_DIR=.. -DPEFT_BINARY_DIR=..
#       -DWORK_DIR=.. -P run_consumer.cmake
# Configures, builds and runs tests/consumer/project against peft in one of
# the three ways a user consumes it.
set(project_dir ${PEFT_SOURCE_DIR}/tests/consumer/project)
set(build_dir ${WORK_DIR}/${MODE})
file(REMOVE_RECURSE ${build_dir})

function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGN}")
  endif()
endfunction()

if(MODE STREQUAL "installed")
  set(prefix ${WORK_DIR}/prefix)
  file(REMOVE_RECURSE ${prefix})
  run(${CMAKE_COMMAND} --install ${PEFT_BINARY_DIR} --prefix ${prefix})
  set(args -DPEFT_CONSUME=package -DCMAKE_PREFIX_PATH=${prefix})
elseif(MODE STREQUAL "build-tree")
  set(args -DPEFT_CONSUME=package -Dpeft_DIR=${PEFT_BINARY_DIR})
elseif(MODE STREQUAL "subdirectory")
  set(args -DPEFT_CONSUME=subdirectory -DPEFT_SOURCE_DIR=${PEFT_SOURCE_DIR})
else()
  message(FATAL_ERROR "unknown MODE '${MODE}'")
endif()

# No build type: unoptimised and without debug info. What is tested is that the project finds peft,
# compiles against its headers, links and runs; -O2 over torch and peft.h only costs time.
run(${CMAKE_COMMAND} -S ${project_dir} -B ${build_dir} -DCMAKE_BUILD_TYPE= ${args})
run(${CMAKE_COMMAND} --build ${build_dir})
run(${build_dir}/consumer)
