// Test entry point: ctest runs two test processes at a time on 2 cores, so
// each uses one thread in LibTorch and in OpenBLAS.
#include <gtest/gtest.h>
#include <peft/core/threads.h>

int main(int argc, char** argv) {
  peft::set_num_threads(1);
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
