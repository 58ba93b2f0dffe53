#pragma once
/// @file
/// Writing files so that a crash never leaves a half-written one: write a
/// temporary file in the same directory, flush it to disk, rename it over the
/// target (atomic on POSIX), then flush the directory entry.

#include <peft/core/error.h>

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <string>

namespace peft {
namespace io {

namespace detail {

inline void write_all(int fd, const char* data, size_t size, const std::string& path) {
  while (size > 0) {
    const ssize_t n = ::write(fd, data, size);
    if (n < 0 && errno == EINTR) continue;
    check<FileError>(n > 0, "cannot write '{}': {}", path, std::strerror(errno));
    data += n;
    size -= static_cast<size_t>(n);
  }
}

}  // namespace detail

/// Replaces `path` with `bytes` atomically: readers see the old file or the
/// new one, never a mix, even if the process is killed mid-write.
inline void write_file_atomic(const std::filesystem::path& path, const std::string& bytes) {
  static std::atomic<unsigned> counter{0};
  const std::filesystem::path dir = path.has_parent_path() ? path.parent_path() : std::filesystem::path(".");
  const std::filesystem::path tmp =
      dir / ("." + path.filename().string() + ".tmp." + std::to_string(::getpid()) + "." + std::to_string(counter++));
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  check<FileError>(fd >= 0, "cannot create '{}' (writing '{}'): {}", tmp.string(), path.string(), std::strerror(errno));
  try {
    detail::write_all(fd, bytes.data(), bytes.size(), path.string());
    check<FileError>(::fsync(fd) == 0, "cannot flush '{}': {}", path.string(), std::strerror(errno));
  } catch (...) {
    ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  ::close(fd);
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    throw FileError("cannot replace '" + path.string() + "': " + std::strerror(err));
  }
  const int dir_fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd >= 0) {
    ::fsync(dir_fd);
    ::close(dir_fd);
  }
}

/// The whole content of `path`; FileError if it cannot be read.
inline std::string read_file(const std::filesystem::path& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  check<FileError>(fd >= 0, "cannot open '{}': {}", path.string(), std::strerror(errno));
  std::string out;
  char buffer[1 << 16];
  for (;;) {
    const ssize_t n = ::read(fd, buffer, sizeof buffer);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int err = errno;
      ::close(fd);
      check<FileError>(n == 0, "cannot read '{}': {}", path.string(), std::strerror(err));
      return out;
    }
    out.append(buffer, static_cast<size_t>(n));
  }
}

}  // namespace io
}  // namespace peft
