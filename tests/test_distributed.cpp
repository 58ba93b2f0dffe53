// Data-parallel training on c10d/Gloo over loopback: processes started by
// peft-launch running tests/dist_worker.cpp. Reference: the same training in
// one process with the whole batch (1e-6).
#include <gtest/gtest.h>
#include <peft/distributed/data_parallel.h>
#include <peft/peft.h>
#include <unistd.h>

#include <chrono>
#include <fstream>

#include "fixtures.h"

#ifndef PEFT_LAUNCH  // built with the examples
#define PEFT_LAUNCH ""
#endif

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

/// A port unlikely to collide with a concurrently running test process.
int port(int offset) { return 20000 + static_cast<int>(getpid() % 6500) * 6 + offset; }  // offsets 0..5: no overlap between pids

struct Launch {
  int status;
  double seconds;
  fs::path dir;
};

/// peft-launch with `nproc` workers; `args` go to each worker.
Launch launch(const std::string& name, int nproc, int port_offset, const std::string& args = "") {
  const fs::path dir = peft_test::fresh_dir(name);
  const std::string cmd = fmt::format("{} --nproc-per-node {} --master-port {} -- {} --out {} {} > {}/launch.log 2>&1",
                                      PEFT_LAUNCH, nproc, port(port_offset), PEFT_DIST_WORKER, dir.string(), args,
                                      dir.string());
  const auto start = Clock::now();
  const int status = std::system(cmd.c_str());
  return {status, std::chrono::duration<double>(Clock::now() - start).count(), dir};
}

#define REQUIRE_LAUNCHER() \
  if (std::string(PEFT_LAUNCH).empty()) GTEST_SKIP() << "peft-launch is built with the examples (PEFT_BUILD_EXAMPLES)"

std::map<std::string, torch::Tensor> tensors(const fs::path& file) { return peft::io::load_safetensors(file).tensors; }

nlohmann::json traffic(const fs::path& file) {
  std::ifstream in(file);
  return nlohmann::json::parse(in);
}

std::string read(const fs::path& file) {
  std::ifstream in(file);
  return {std::istreambuf_iterator<char>(in), {}};
}

void expect_same(const std::map<std::string, torch::Tensor>& a, const std::map<std::string, torch::Tensor>& b,
                 double tol, const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (const auto& [name, t] : a)
    EXPECT_TRUE(torch::allclose(t, b.at(name), tol, tol))
        << what << " " << name << " max |diff| " << (t - b.at(name)).abs().max().item<double>();
}

TEST(DataParallel, TwoProcessesEqualOneAndSendOnlyTheAdapterGradients) {
  REQUIRE_LAUNCHER();
  const Launch one = launch("dp_one", 1, 0, "--steps 3 --batch 4");
  ASSERT_EQ(one.status, 0) << read(one.dir / "launch.log");
  const Launch two = launch("dp_two", 2, 1, "--steps 3 --batch 4");
  ASSERT_EQ(two.status, 0) << read(two.dir / "launch.log");
  const Launch accumulated = launch("dp_accumulated", 2, 2, "--steps 3 --batch 4 --accumulation 2");
  ASSERT_EQ(accumulated.status, 0) << read(accumulated.dir / "launch.log");

  const auto reference = tensors(one.dir / "rank0.safetensors");
  expect_same(tensors(two.dir / "rank0.safetensors"), reference, 1e-6, "2 ranks vs 1, rank 0:");
  expect_same(tensors(two.dir / "rank1.safetensors"), tensors(two.dir / "rank0.safetensors"), 0, "rank 1 vs rank 0:");
  expect_same(tensors(accumulated.dir / "rank0.safetensors"), reference, 1e-6, "2 ranks x 2 micro-steps vs 1:");

  int64_t trainable_bytes = 0;
  for (const auto& [name, t] : reference) trainable_bytes += t.numel() * t.element_size();
  for (const auto& run : {two, accumulated}) {
    const auto t = traffic(run.dir / "rank0.json");
    EXPECT_EQ(t["bytes_per_sync"].get<int64_t>(), trainable_bytes);
    EXPECT_EQ(t["bytes_reduced"].get<int64_t>(), 3 * trainable_bytes) << "one all-reduce per optimizer step";
    EXPECT_LT(t["bytes_per_sync"].get<double>(), 0.05 * t["model_bytes"].get<double>());
  }
}

/// Starts the worker as rank `rank` of `world` in the background (shell syntax).
std::string rank_command(int rank, int world, int port_number, const fs::path& dir, const std::string& args) {
  return fmt::format("RANK={} WORLD_SIZE={} MASTER_ADDR=127.0.0.1 MASTER_PORT={} {} --out {} {} > {}/rank{}.log 2>&1",
                     rank, world, port_number, PEFT_DIST_WORKER, dir.string(), args, dir.string(), rank);
}

TEST(DataParallel, ADeadRankFailsTheOthersWithinTheTimeout) {
  // Started without peft-launch, which would stop rank 0 itself when rank 1 dies.
  const fs::path dir = peft_test::fresh_dir("dp_dead");
  const std::string args = "--steps 3 --batch 4 --die-rank 1 --die-step 1 --timeout-ms 5000";
  const std::string cmd = rank_command(1, 2, port(3), dir, args) + " & " + rank_command(0, 2, port(3), dir, args) +
                          "; status=$?; wait; exit $status";
  const auto start = Clock::now();
  const int status = std::system(("bash -c '" + cmd + "'").c_str());
  EXPECT_NE(status, 0);
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - start).count(), 60) << "the survivor hung";
  const std::string error = read(dir / "rank0.error");
  EXPECT_NE(error.find("rank 0 of 2"), std::string::npos) << error << read(dir / "rank0.log");
  EXPECT_NE(error.find("all-reduce of the trainable gradients failed"), std::string::npos) << error;
}

TEST(DataParallel, TheLauncherStopsTheOthersWhenOneFails) {
  REQUIRE_LAUNCHER();
  const Launch run = launch("dp_launcher", 2, 5, "--steps 3 --batch 4 --die-rank 1 --die-step 1 --timeout-ms 5000");
  EXPECT_NE(run.status, 0);
  EXPECT_LT(run.seconds, 60);
  EXPECT_NE(read(run.dir / "launch.log").find("rank 1 exited with status 3"), std::string::npos) << read(run.dir / "launch.log");
}

TEST(DataParallel, ARankThatNeverArrivesIsReportedAfterTheTimeout) {
  const fs::path dir = peft_test::fresh_dir("dp_alone");
  const auto start = Clock::now();
  const int status = std::system(rank_command(0, 2, port(4), dir, "--timeout-ms 3000").c_str());
  EXPECT_NE(status, 0);
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - start).count(), 60);
  const std::string error = read(dir / "rank0.error");
  EXPECT_NE(error.find("did not form within 3 s"), std::string::npos) << error << read(dir / "rank0.log");
}

TEST(DataParallel, ShardsPartitionTheDataAndFormGlobalBatches) {
  namespace dist = peft::distributed;
  const auto opts = dist::ShardOptions().seed(5).epoch(2);
  std::vector<int64_t> all;
  for (int r = 0; r < 4; ++r) {
    auto mine = dist::shard(10, r, 4, opts);
    EXPECT_EQ(mine.size(), 3u) << "10 padded to 12";
    all.insert(all.end(), mine.begin(), mine.end());
  }
  std::sort(all.begin(), all.end());
  for (int64_t i = 0; i < 10; ++i) EXPECT_NE(std::find(all.begin(), all.end(), i), all.end()) << i << " is missing";
  EXPECT_EQ(dist::shard(10, 3, 4, dist::ShardOptions().drop_last(true)).size(), 2u);
  EXPECT_EQ(dist::shard(10, 0, 4, opts), dist::shard(10, 0, 4, opts)) << "the permutation must be reproducible";
  EXPECT_NE(dist::shard(10, 0, 4, opts), dist::shard(10, 0, 4, dist::ShardOptions().seed(5).epoch(3)));
  peft_test::expect_error<peft::OptionError>([] { dist::shard(10, 4, 4); }, {"rank"});
}

TEST(DataParallel, EnvironmentErrorsNameTheVariable) {
  namespace dist = peft::distributed;
  setenv("RANK", "0", 1);
  setenv("WORLD_SIZE", "two", 1);
  peft_test::expect_error<peft::OptionError>([] { dist::Environment::from_env(); }, {"WORLD_SIZE='two'"});
  setenv("WORLD_SIZE", "2", 1);
  unsetenv("RANK");
  peft_test::expect_error<peft::OptionError>([] { dist::Environment::from_env(); }, {"RANK is not set"});
  setenv("RANK", "2", 1);
  peft_test::expect_error<peft::OptionError>([] { dist::Environment::from_env(); }, {"RANK must be in [0, WORLD_SIZE=2)"});
  unsetenv("RANK");
  unsetenv("WORLD_SIZE");
}

}  // namespace
