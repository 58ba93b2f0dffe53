// peft-launch: starts N processes of a program for data-parallel training on
// one machine, with the environment torchrun sets (RANK, WORLD_SIZE,
// LOCAL_RANK, MASTER_ADDR, MASTER_PORT). If one process fails, the others are
// stopped and its exit status is returned.
//
//   peft-launch --nproc-per-node 2 -- peft-finetune --method lora
//   # two machines: the same command on each, rank 0's address as master
//   peft-launch --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 --nproc-per-node 2 -- peft-finetune
//   peft-launch --nnodes 2 --node-rank 1 --master-addr 10.0.0.1 --nproc-per-node 2 -- peft-finetune
#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <map>
#include <string>
#include <vector>

namespace {

/// Starts `command` with the rank variables set; returns its pid.
pid_t start(const std::vector<std::string>& command, const std::map<std::string, std::string>& env) {
  const pid_t pid = fork();
  if (pid != 0) return pid;
  for (const auto& [name, value] : env) setenv(name.c_str(), value.c_str(), 1);
  std::vector<char*> argv;
  for (const auto& arg : command) argv.push_back(const_cast<char*>(arg.c_str()));
  argv.push_back(nullptr);
  execvp(argv[0], argv.data());
  fmt::print(stderr, "peft-launch: cannot run {}\n", command[0]);
  std::_Exit(127);
}

int exit_status(int status) { return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status); }

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Start N local processes of a program for data-parallel training (like torchrun)"};
  int nproc = 1, nnodes = 1, node_rank = 0, port = 29500;
  std::string addr = "127.0.0.1";
  std::vector<std::string> command;
  app.add_option("--nproc-per-node", nproc, "processes on this machine")->check(CLI::PositiveNumber);
  app.add_option("--nnodes", nnodes, "machines taking part")->check(CLI::PositiveNumber);
  app.add_option("--node-rank", node_rank, "this machine's index, 0 for the one at --master-addr")->check(CLI::NonNegativeNumber);
  app.add_option("--master-addr", addr, "address of the machine running rank 0");
  app.add_option("--master-port", port, "free TCP port on that machine")->check(CLI::Range(1, 65535));
  app.add_option("command", command, "program and its arguments (after --)")->required();
  CLI11_PARSE(app, argc, argv);
  if (node_rank >= nnodes) {
    fmt::print(stderr, "peft-launch: --node-rank {} must be < --nnodes {}\n", node_rank, nnodes);
    return 2;
  }

  std::map<pid_t, int> ranks;
  for (int local = 0; local < nproc; ++local) {
    const int rank = node_rank * nproc + local;
    ranks[start(command, {{"RANK", std::to_string(rank)},
                          {"LOCAL_RANK", std::to_string(local)},
                          {"WORLD_SIZE", std::to_string(nnodes * nproc)},
                          {"LOCAL_WORLD_SIZE", std::to_string(nproc)},
                          {"MASTER_ADDR", addr},
                          {"MASTER_PORT", std::to_string(port)}})] = rank;
  }
  int result = 0;
  while (!ranks.empty()) {
    int status = 0;
    const pid_t pid = waitpid(-1, &status, 0);
    if (pid < 0) break;
    const int rank = ranks[pid];
    ranks.erase(pid);
    if (exit_status(status) != 0 && result == 0) {
      result = exit_status(status);
      fmt::print(stderr, "peft-launch: rank {} exited with status {}; stopping the other {}\n", rank, result,
                 ranks.size());
      for (const auto& other : ranks) kill(other.first, SIGTERM);
    }
  }
  return result;
}
