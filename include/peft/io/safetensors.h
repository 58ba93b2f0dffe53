#pragma once
/// @file
/// safetensors, read and written without dependencies beyond nlohmann-json:
/// 8-byte little-endian header length, a JSON header (dtype, shape,
/// data_offsets per tensor, optional __metadata__), then the data. The reader
/// trusts nothing; every violation is a FileError naming the file and tensor.

#include <peft/core/error.h>
#include <peft/io/atomic_file.h>
#include <torch/torch.h>

#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <string_view>
#include <vector>

namespace peft {
namespace io {

/// Tensors by name plus the string metadata of a safetensors file.
///
/// ```
/// peft::io::TensorFile file = peft::io::load_safetensors("adapter_model.safetensors");
/// torch::Tensor a = file.tensors.at("base_model.model.q_proj.lora_A.weight");
/// ```
struct TensorFile {
  /// The tensors by name (CPU, the file's dtypes).
  std::map<std::string, torch::Tensor> tensors;
  /// The `__metadata__` strings.
  std::map<std::string, std::string> metadata;
};

namespace detail {

struct DtypeInfo {
  const char* name;
  c10::ScalarType type;
  int64_t size;
};

inline const std::vector<DtypeInfo>& dtypes() {
  static const std::vector<DtypeInfo> table{
      {"F64", torch::kFloat64, 8}, {"F32", torch::kFloat32, 4}, {"F16", torch::kFloat16, 2}, {"BF16", torch::kBFloat16, 2},
      {"I64", torch::kInt64, 8},   {"I32", torch::kInt32, 4},   {"I16", torch::kInt16, 2},   {"I8", torch::kInt8, 1},
      {"U8", torch::kUInt8, 1},    {"BOOL", torch::kBool, 1}};
  return table;
}

inline const DtypeInfo* dtype_by_name(const std::string& name) {
  for (const auto& d : dtypes())
    if (name == d.name) return &d;
  return nullptr;
}

inline const DtypeInfo& dtype_of(c10::ScalarType type, const std::string& tensor) {
  for (const auto& d : dtypes())
    if (d.type == type) return d;
  throw FileError("safetensors: tensor '" + tensor + "' has dtype " + c10::toString(type) + ", which the format lacks");
}

inline bool little_endian() {
  const uint16_t probe = 1;
  unsigned char first;
  std::memcpy(&first, &probe, 1);
  return first == 1;
}

/// The largest header the reader accepts (the reference implementation's limit).
constexpr uint64_t kMaxHeader = 100'000'000;

/// Throws a FileError that says what `bytes` are when they are a well-known
/// other format that downloads hand out instead of the file (a git-lfs pointer,
/// an HTML page, JSON, a zip/pickle archive); returns otherwise.
inline void reject_other_format(std::string_view bytes, const std::string& source) {
  auto starts = [&](const char* prefix) { return bytes.rfind(prefix, 0) == 0; };
  const size_t text = bytes.find_first_not_of(" \t\r\n");
  const char first = text == std::string_view::npos ? '\0' : bytes[text];
  if (starts("version https://git-lfs"))
    throw FileError("'" + source + "' is a git-lfs pointer, not the safetensors file: fetch the real file (git lfs pull)");
  if (first == '<')
    throw FileError("'" + source + "' is an HTML/XML page, not a safetensors file: the download returned a web page");
  if (first == '{' || first == '[')
    throw FileError("'" + source + "' is JSON text, not a safetensors file");
  if (starts("PK\x03\x04") || starts("\x80\x02") || starts("\x80\x04"))
    throw FileError("'" + source + "' is a PyTorch/pickle or zip archive (torch.save), not a safetensors file");
}

}  // namespace detail

/// Serialises tensors (moved to CPU, made contiguous) in safetensors format.
/// Data are laid out by element size (largest first), then name, like the
/// reference writer, so every tensor is aligned; the header is padded to 8 bytes.
inline std::string to_safetensors(const std::map<std::string, torch::Tensor>& tensors,
                                  const std::map<std::string, std::string>& metadata = {{"format", "pt"}}) {
  check<FileError>(detail::little_endian(), "safetensors: big-endian hosts are not supported");
  std::vector<std::pair<std::string, torch::Tensor>> order;
  for (const auto& [name, t] : tensors) {
    check<FileError>(t.defined(), "safetensors: tensor '{}' is undefined", name);
    order.emplace_back(name, t.detach().to(torch::kCPU).contiguous());
  }
  std::stable_sort(order.begin(), order.end(), [](const auto& a, const auto& b) {
    return a.second.element_size() > b.second.element_size();
  });
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const auto& [name, t] : order) {
    const uint64_t bytes = static_cast<uint64_t>(t.numel()) * static_cast<uint64_t>(t.element_size());
    header[name] = {{"dtype", detail::dtype_of(t.scalar_type(), name).name},
                    {"shape", t.sizes().vec()},
                    {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string json = header.dump();
  json.append((8 - json.size() % 8) % 8, ' ');
  const uint64_t n = json.size();
  std::string out(8, '\0');
  std::memcpy(out.data(), &n, 8);
  out += json;
  out.reserve(out.size() + offset);
  for (const auto& [name, t] : order)
    if (t.nbytes() > 0) out.append(static_cast<const char*>(t.data_ptr()), t.nbytes());  // empty: data_ptr null
  return out;
}

/// Parses safetensors bytes; `source` names the file in errors. Each tensor is a copy, or, when
/// `keep_alive` owns `bytes` (a mapped file), a view of its bytes that keeps it alive (where the
/// bytes are aligned for the dtype; a copy otherwise).
inline TensorFile from_safetensors(std::string_view bytes, const std::string& source,
                                   const std::shared_ptr<void>& keep_alive = nullptr) {
  check<FileError>(detail::little_endian(), "safetensors: big-endian hosts are not supported");
  check<FileError>(bytes.size() >= 8, "'{}': {} bytes is too short for a safetensors file (8-byte header length)", source,
                   bytes.size());
  uint64_t header_len = 0;
  std::memcpy(&header_len, bytes.data(), 8);
  const bool fits = header_len <= bytes.size() - 8 && header_len <= detail::kMaxHeader;
  if (!fits) detail::reject_other_format(bytes, source);
  check<FileError>(fits, "'{}': header length {} exceeds the file ({} bytes) or the {}-byte limit", source, header_len,
                   bytes.size(), detail::kMaxHeader);
  std::set<std::string> keys;
  std::string duplicate;
  auto reject_duplicates = [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
    if (event == nlohmann::json::parse_event_t::key && depth == 1 && !keys.insert(parsed.get<std::string>()).second)
      duplicate = parsed.get<std::string>();
    return true;
  };
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(bytes.begin() + 8, bytes.begin() + 8 + static_cast<std::ptrdiff_t>(header_len),
                                   reject_duplicates);
  } catch (const nlohmann::json::exception& e) {
    throw FileError("'" + source + "': the safetensors header is not valid JSON: " + e.what());
  }
  check<FileError>(duplicate.empty(), "'{}': tensor '{}' appears twice in the header", source, duplicate);
  check<FileError>(header.is_object(), "'{}': the safetensors header is not a JSON object", source);

  const uint64_t data_size = bytes.size() - 8 - header_len;
  const char* data = bytes.data() + 8 + header_len;
  TensorFile file;
  std::vector<std::pair<uint64_t, uint64_t>> spans;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      check<FileError>(entry.is_object(), "'{}': __metadata__ must map strings to strings", source);
      for (const auto& [k, v] : entry.items()) {
        check<FileError>(v.is_string(), "'{}': __metadata__ value of '{}' is not a string", source, k);
        file.metadata[k] = v.get<std::string>();
      }
      continue;
    }
    check<FileError>(entry.is_object() && entry.contains("dtype") && entry.contains("shape") &&
                         entry.contains("data_offsets"),
                     "'{}': tensor '{}' needs dtype, shape and data_offsets", source, name);
    const auto& dtype = entry["dtype"];
    const detail::DtypeInfo* info = dtype.is_string() ? detail::dtype_by_name(dtype.get<std::string>()) : nullptr;
    check<FileError>(info != nullptr, "'{}': tensor '{}' has unknown dtype {}", source, name, dtype.dump());
    const auto& shape = entry["shape"];
    check<FileError>(shape.is_array(), "'{}': tensor '{}' shape is not a list", source, name);
    std::vector<int64_t> sizes;
    uint64_t numel = 1;
    for (const auto& d : shape) {
      check<FileError>(d.is_number_unsigned() || (d.is_number_integer() && d.get<int64_t>() >= 0),
                       "'{}': tensor '{}' has a bad dimension {}", source, name, d.dump());
      const uint64_t dim = d.get<uint64_t>();
      check<FileError>(dim == 0 || numel <= std::numeric_limits<uint64_t>::max() / dim / 8,
                       "'{}': tensor '{}' shape overflows", source, name);
      numel *= dim;
      sizes.push_back(static_cast<int64_t>(dim));
    }
    const auto& offsets = entry["data_offsets"];
    check<FileError>(offsets.is_array() && offsets.size() == 2 && offsets[0].is_number_unsigned() &&
                         offsets[1].is_number_unsigned(),
                     "'{}': tensor '{}' data_offsets must be two non-negative integers", source, name);
    const uint64_t begin = offsets[0].get<uint64_t>(), end = offsets[1].get<uint64_t>();
    check<FileError>(begin <= end && end <= data_size, "'{}': tensor '{}' data_offsets [{}, {}] fall outside the {} data bytes",
                     source, name, begin, end, data_size);
    check<FileError>(end - begin == numel * static_cast<uint64_t>(info->size),
                     "'{}': tensor '{}' has {} bytes, but {} x {} needs {}", source, name, end - begin, numel,
                     info->name, numel * static_cast<uint64_t>(info->size));
    spans.emplace_back(begin, end);
    const char* at = data + begin;
    if (keep_alive && end > begin && reinterpret_cast<uintptr_t>(at) % static_cast<uintptr_t>(info->size) == 0) {
      file.tensors[name] = torch::from_blob(const_cast<char*>(at), sizes, [keep_alive](void*) {},
                                            torch::TensorOptions().dtype(info->type));
      continue;
    }
    torch::Tensor t = torch::empty(sizes, torch::TensorOptions().dtype(info->type));
    if (end > begin) std::memcpy(t.data_ptr(), at, end - begin);
    file.tensors[name] = t;
  }
  std::sort(spans.begin(), spans.end());
  uint64_t covered = 0;
  for (const auto& [begin, end] : spans) {
    check<FileError>(begin == covered, "'{}': tensor data overlap or leave a gap at byte {}", source, begin);
    covered = end;
  }
  check<FileError>(covered == data_size, "'{}': {} data bytes are not covered by any tensor", source, data_size - covered);
  return file;
}

/// Writes `tensors` to `path` atomically (a temporary file renamed into place).
inline void save_safetensors(const std::filesystem::path& path, const std::map<std::string, torch::Tensor>& tensors,
                             const std::map<std::string, std::string>& metadata = {{"format", "pt"}}) {
  write_file_atomic(path, to_safetensors(tensors, metadata));
}

namespace detail {

/// The address ranges of the live MappedFiles (release_mapped_pages acts inside them only).
struct MappedRanges {
  std::mutex mutex;
  std::vector<std::pair<const char*, size_t>> ranges;
};
inline MappedRanges& mapped_ranges() {
  static MappedRanges ranges;
  return ranges;
}

/// A file mapped copy-on-write (MAP_PRIVATE, read and write): pages load as they are touched,
/// stay the page cache's until written, and a write never reaches the file.
class MappedFile {
 public:
  explicit MappedFile(const std::filesystem::path& path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    check<FileError>(fd >= 0, "cannot open '{}': {}", path.string(), std::strerror(errno));
    struct stat st {};
    const bool sized = ::fstat(fd, &st) == 0;
    size_ = sized ? static_cast<size_t>(st.st_size) : 0;
    void* p = size_ > 0 ? ::mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0) : MAP_FAILED;
    const int err = errno;
    ::close(fd);
    check<FileError>(sized && size_ > 0 && p != MAP_FAILED, "cannot map '{}': {}", path.string(),
                     size_ == 0 ? "empty file" : std::strerror(err));
    data_ = static_cast<char*>(p);
    std::lock_guard<std::mutex> lock(mapped_ranges().mutex);
    mapped_ranges().ranges.emplace_back(data_, size_);
  }
  ~MappedFile() {
    {
      std::lock_guard<std::mutex> lock(mapped_ranges().mutex);
      auto& r = mapped_ranges().ranges;
      r.erase(std::remove(r.begin(), r.end(), std::make_pair(static_cast<const char*>(data_), size_)), r.end());
    }
    ::munmap(data_, size_);
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  /// The file's bytes.
  std::string_view bytes() const { return {data_, size_}; }

 private:
  char* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace detail

/// Reads and checks a safetensors file through a memory map: the tensors are views
/// of the mapped file (copy-on-write), so loading copies nothing until a tensor is
/// converted or written; the map lives while any tensor does. Same checks and
/// errors as load_safetensors (an empty file is a FileError too).
inline TensorFile load_safetensors_mapped(const std::filesystem::path& path) {
  auto mapped = std::make_shared<detail::MappedFile>(path);
  return from_safetensors(mapped->bytes(), path.string(), mapped);
}

/// Hands the memory of `t`'s bytes back to the kernel when they lie in a memory-mapped
/// checkpoint (load_safetensors_mapped) and no other tensor shares its storage: the pages
/// of a live map stay resident once touched, so a weight replaced in place (QLoRA
/// quantises a layer, then empties its fp32 weight) would otherwise keep its memory.
/// Pages shared with neighbouring tensors stay. Call it only for a tensor nothing reads
/// again (a later read would see the file's bytes). Returns the bytes released.
inline size_t release_mapped_pages(const torch::Tensor& t) {
  if (!t.defined() || !t.has_storage() || t.storage().use_count() != 1 || t.nbytes() == 0) return 0;
  const auto page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr()), end = begin + t.nbytes();
  const uintptr_t first = (begin + page - 1) / page * page, last = end / page * page;
  if (last <= first) return 0;
  std::lock_guard<std::mutex> lock(detail::mapped_ranges().mutex);
  for (const auto& [data, size] : detail::mapped_ranges().ranges) {
    const auto lo = reinterpret_cast<uintptr_t>(data);
    if (begin >= lo && end <= lo + size)
      return ::madvise(reinterpret_cast<void*>(first), last - first, MADV_DONTNEED) == 0 ? last - first : 0;
  }
  return 0;
}

/// Reads and checks a safetensors file.
inline TensorFile load_safetensors(const std::filesystem::path& path) {
  return from_safetensors(read_file(path), path.string());
}

}  // namespace io
}  // namespace peft
