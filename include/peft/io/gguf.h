#pragma once
/// @file
/// GGUF, ggml's file format (version 3, as gguf-py's GGUFWriter writes it),
/// written and read without dependencies: little-endian magic "GGUF", version,
/// tensor and metadata counts (uint64); the metadata (key string, type, value);
/// one info per tensor (name, dims in ggml's order, i.e. the torch shape
/// reversed, ggml type, data offset); zero padding to the alignment
/// (`general.alignment`, else 32); then each tensor's bytes, padded to the
/// alignment. Strings are a uint64 length and UTF-8 bytes. Tensors here are
/// F32, F16 or BF16 (what adapters need). The reader trusts nothing: every
/// violation is a FileError naming the file and the key or tensor.

#include <peft/core/error.h>
#include <peft/io/atomic_file.h>
#include <torch/torch.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace peft {
namespace io {

/// GGUF's metadata value types (the numbers are the file's).
enum class GgufType : uint32_t {
  UInt8 = 0, Int8 = 1, UInt16 = 2, Int16 = 3, UInt32 = 4, Int32 = 5, Float32 = 6, Bool = 7,
  String = 8, Array = 9, UInt64 = 10, Int64 = 11, Float64 = 12,
};

/// ggml tensor types this module reads and writes (the numbers are ggml's).
enum class GgmlType : uint32_t { F32 = 0, F16 = 1, BF16 = 30 };

/// Alignment of the data section and of every tensor when `general.alignment` is absent.
constexpr uint32_t kGgufDefaultAlignment = 32;
/// ggml's GGML_MAX_NAME: a tensor name has at most 63 bytes.
constexpr size_t kGgufMaxName = 63;

namespace detail {

/// Bytes of a scalar of `type` (0 for String and Array).
inline size_t gguf_scalar_size(GgufType type) {
  switch (type) {
    case GgufType::UInt8: case GgufType::Int8: case GgufType::Bool: return 1;
    case GgufType::UInt16: case GgufType::Int16: return 2;
    case GgufType::UInt32: case GgufType::Int32: case GgufType::Float32: return 4;
    case GgufType::UInt64: case GgufType::Int64: case GgufType::Float64: return 8;
    default: return 0;
  }
}

inline const char* gguf_type_name(GgufType type) {
  static const char* names[] = {"uint8", "int8", "uint16", "int16", "uint32", "int32", "float32",
                                "bool",  "string", "array", "uint64", "int64", "float64"};
  const auto i = static_cast<uint32_t>(type);
  return i < 13 ? names[i] : "unknown";
}

template <typename T> struct GgufTypeOf;
template <> struct GgufTypeOf<uint8_t> { static constexpr GgufType value = GgufType::UInt8; };
template <> struct GgufTypeOf<int8_t> { static constexpr GgufType value = GgufType::Int8; };
template <> struct GgufTypeOf<uint16_t> { static constexpr GgufType value = GgufType::UInt16; };
template <> struct GgufTypeOf<int16_t> { static constexpr GgufType value = GgufType::Int16; };
template <> struct GgufTypeOf<uint32_t> { static constexpr GgufType value = GgufType::UInt32; };
template <> struct GgufTypeOf<int32_t> { static constexpr GgufType value = GgufType::Int32; };
template <> struct GgufTypeOf<float> { static constexpr GgufType value = GgufType::Float32; };
template <> struct GgufTypeOf<bool> { static constexpr GgufType value = GgufType::Bool; };
template <> struct GgufTypeOf<uint64_t> { static constexpr GgufType value = GgufType::UInt64; };
template <> struct GgufTypeOf<int64_t> { static constexpr GgufType value = GgufType::Int64; };
template <> struct GgufTypeOf<double> { static constexpr GgufType value = GgufType::Float64; };

inline bool gguf_little_endian() {
  const uint16_t probe = 1;
  unsigned char first;
  std::memcpy(&first, &probe, 1);
  return first == 1;
}

}  // namespace detail

/// One metadata value: a scalar (its bytes as stored), a string, or an array of values.
///
/// ```
/// peft::io::GgufValue alpha = peft::io::GgufValue::of(16.0f);   // float32
/// float a = alpha.as<float>();                                   // OptionError for another type
/// ```
struct GgufValue {
  GgufType type = GgufType::UInt32;  ///< the value's type
  uint64_t bits = 0;                 ///< a scalar's little-endian bytes (low bytes used)
  std::string text;                  ///< String: the UTF-8 text
  GgufType item_type = GgufType::UInt32;  ///< Array: the elements' type
  std::vector<GgufValue> items;      ///< Array: the elements

  /// A scalar of the GGUF type matching `T` (uint8_t ... double, bool).
  template <typename T>
  static GgufValue of(T value) {
    GgufValue v;
    v.type = detail::GgufTypeOf<T>::value;
    std::memcpy(&v.bits, &value, sizeof(T));
    return v;
  }
  /// A string.
  static GgufValue of(std::string value) {
    GgufValue v;
    v.type = GgufType::String;
    v.text = std::move(value);
    return v;
  }
  /// A string (from a literal).
  static GgufValue of(const char* value) { return of(std::string(value)); }
  /// An array of `item_type` elements (each must have that type).
  static GgufValue array(GgufType item_type, std::vector<GgufValue> items) {
    GgufValue v;
    v.type = GgufType::Array;
    v.item_type = item_type;
    v.items = std::move(items);
    return v;
  }

  /// The scalar as `T`, which must be its exact type (OptionError otherwise).
  template <typename T>
  T as() const {
    check<OptionError>(type == detail::GgufTypeOf<T>::value, "GGUF value is {}, not {}", detail::gguf_type_name(type),
                       detail::gguf_type_name(detail::GgufTypeOf<T>::value));
    T value;
    std::memcpy(&value, &bits, sizeof(T));
    return value;
  }
};

/// A GGUF file in memory: metadata and tensors, each in file order.
///
/// ```
/// peft::io::GgufFile file = peft::io::load_gguf("adapter.gguf");
/// std::string arch = file.get_string("general.architecture");
/// torch::Tensor a = file.tensor("blk.0.attn_q.weight.lora_a");   // torch's shape: ggml's ne reversed
/// ```
struct GgufFile {
  std::vector<std::pair<std::string, GgufValue>> metadata;  ///< key, value
  std::vector<std::pair<std::string, torch::Tensor>> tensors;  ///< name, CPU tensor (F32, F16 or BF16)
  std::string source = "GGUF file";  ///< where it was read from, for messages

  /// Sets `key` (replacing its value, else appending).
  void set(const std::string& key, GgufValue value) {
    for (auto& [k, v] : metadata)
      if (k == key) {
        v = std::move(value);
        return;
      }
    metadata.emplace_back(key, std::move(value));
  }
  /// The value of `key`, or nullptr.
  const GgufValue* find(const std::string& key) const {
    for (const auto& [k, v] : metadata)
      if (k == key) return &v;
    return nullptr;
  }
  /// The scalar `key` as `T` (its exact GGUF type); FileError naming the file and key if absent or of another type.
  template <typename T>
  T get(const std::string& key) const {
    const GgufValue& v = at(key);
    check<FileError>(v.type == detail::GgufTypeOf<T>::value, "'{}': metadata '{}' is {}, expected {}", source, key,
                     detail::gguf_type_name(v.type), detail::gguf_type_name(detail::GgufTypeOf<T>::value));
    return v.as<T>();
  }
  /// The string `key`; FileError naming the file and key if absent or not a string.
  std::string get_string(const std::string& key) const {
    const GgufValue& v = at(key);
    check<FileError>(v.type == GgufType::String, "'{}': metadata '{}' is {}, expected string", source, key,
                     detail::gguf_type_name(v.type));
    return v.text;
  }
  /// The tensor `name`; FileError naming the file if absent.
  const torch::Tensor& tensor(const std::string& name) const {
    for (const auto& [n, t] : tensors)
      if (n == name) return t;
    throw FileError(fmt::format("'{}': no tensor '{}'", source, name));
  }

 private:
  const GgufValue& at(const std::string& key) const {
    const GgufValue* v = find(key);
    check<FileError>(v != nullptr, "'{}': no metadata '{}'", source, key);
    return *v;
  }
};

namespace detail {

inline void gguf_put_u32(std::string& out, uint32_t v) { out.append(reinterpret_cast<const char*>(&v), 4); }
inline void gguf_put_u64(std::string& out, uint64_t v) { out.append(reinterpret_cast<const char*>(&v), 8); }
inline void gguf_put_string(std::string& out, const std::string& s) {
  gguf_put_u64(out, s.size());
  out += s;
}

inline void gguf_put_value(std::string& out, const GgufValue& v, const std::string& target, const std::string& key) {
  if (v.type == GgufType::String) return gguf_put_string(out, v.text);
  if (v.type == GgufType::Array) {
    gguf_put_u32(out, static_cast<uint32_t>(v.item_type));
    gguf_put_u64(out, v.items.size());
    for (const auto& item : v.items) {
      check<OptionError>(item.type == v.item_type, "{}: metadata '{}': an array of {} holds a {}", target, key,
                         gguf_type_name(v.item_type), gguf_type_name(item.type));
      gguf_put_value(out, item, target, key);
    }
    return;
  }
  const size_t size = gguf_scalar_size(v.type);
  check<OptionError>(size > 0, "{}: metadata '{}' has the unknown type {}", target, key, static_cast<uint32_t>(v.type));
  out.append(reinterpret_cast<const char*>(&v.bits), size);
}

inline GgmlType ggml_type_of(const torch::Tensor& t, const std::string& target, const std::string& name) {
  if (t.scalar_type() == torch::kFloat32) return GgmlType::F32;
  if (t.scalar_type() == torch::kFloat16) return GgmlType::F16;
  if (t.scalar_type() == torch::kBFloat16) return GgmlType::BF16;
  throw ShapeError(fmt::format("{}: tensor '{}' is {}; GGUF tensors here are float32, float16 or bfloat16", target, name,
                               c10::toString(t.scalar_type())));
}

/// The alignment `file` asks for (general.alignment, a power of two), else 32.
inline uint64_t gguf_alignment(const GgufFile& file, const std::string& where) {
  const GgufValue* v = file.find("general.alignment");
  if (!v) return kGgufDefaultAlignment;
  check<FileError>(v->type == GgufType::UInt32, "{}: general.alignment is {}, expected uint32", where, gguf_type_name(v->type));
  const uint32_t a = v->as<uint32_t>();
  check<FileError>(a > 0 && (a & (a - 1)) == 0, "{}: general.alignment {} is not a power of two", where, a);
  return a;
}

inline uint64_t gguf_pad(uint64_t n, uint64_t alignment) { return (n + alignment - 1) / alignment * alignment; }

}  // namespace detail

/// `file` as GGUF v3 bytes. `target` names the destination in messages.
/// OptionError for duplicate keys or tensor names, a name over 63 bytes, or an
/// array element of the wrong type; ShapeError for a tensor that is not F32/F16/BF16
/// or has no or more than 4 dimensions.
inline std::string to_gguf(const GgufFile& file, const std::string& target = "GGUF file") {
  check<OptionError>(detail::gguf_little_endian(), "{}: big-endian hosts are not supported", target);
  const uint64_t alignment = detail::gguf_alignment(file, target);
  std::string out = "GGUF";
  detail::gguf_put_u32(out, 3);
  detail::gguf_put_u64(out, file.tensors.size());
  detail::gguf_put_u64(out, file.metadata.size());
  std::set<std::string> seen;
  for (const auto& [key, value] : file.metadata) {
    check<OptionError>(seen.insert(key).second, "{}: metadata key '{}' appears twice", target, key);
    detail::gguf_put_string(out, key);
    detail::gguf_put_u32(out, static_cast<uint32_t>(value.type));
    detail::gguf_put_value(out, value, target, key);
  }
  seen.clear();
  std::vector<torch::Tensor> data;
  uint64_t offset = 0;
  for (const auto& [name, t] : file.tensors) {
    check<OptionError>(seen.insert(name).second, "{}: tensor '{}' appears twice", target, name);
    check<OptionError>(!name.empty() && name.size() <= kGgufMaxName, "{}: tensor name '{}' must have 1 to {} bytes", target,
                       name, kGgufMaxName);
    check<ShapeError>(t.defined() && t.dim() >= 1 && t.dim() <= 4, "{}: tensor '{}' must have 1 to 4 dimensions", target, name);
    const GgmlType type = detail::ggml_type_of(t, target, name);
    detail::gguf_put_string(out, name);
    detail::gguf_put_u32(out, static_cast<uint32_t>(t.dim()));
    for (int64_t d = t.dim() - 1; d >= 0; --d) detail::gguf_put_u64(out, static_cast<uint64_t>(t.size(d)));
    detail::gguf_put_u32(out, static_cast<uint32_t>(type));
    detail::gguf_put_u64(out, offset);
    data.push_back(t.detach().to(torch::kCPU).contiguous());
    offset += detail::gguf_pad(data.back().nbytes(), alignment);
  }
  out.resize(detail::gguf_pad(out.size(), alignment), '\0');
  for (const auto& t : data) {
    if (t.nbytes() > 0) out.append(static_cast<const char*>(t.data_ptr()), t.nbytes());  // empty: data_ptr null
    out.resize(detail::gguf_pad(out.size(), alignment), '\0');
  }
  return out;
}

/// Writes `file` to `path` atomically (a temporary file renamed over it). Errors as to_gguf, FileError for I/O.
inline void save_gguf(const std::filesystem::path& path, const GgufFile& file) {
  write_file_atomic(path, to_gguf(file, "'" + path.string() + "'"));
}

namespace detail {

/// Bounds-checked little-endian reading of GGUF bytes; errors name the source and what was read.
class GgufCursor {
 public:
  GgufCursor(const std::string& bytes, std::string source) : bytes_(bytes), source_(std::move(source)) {}

  template <typename T>
  T read(const char* what) {
    need(sizeof(T), what);
    T v;
    std::memcpy(&v, bytes_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  std::string string(const char* what) {
    const uint64_t n = read<uint64_t>(what);
    need(n, what);
    std::string s = bytes_.substr(pos_, n);
    pos_ += n;
    return s;
  }
  GgufValue value(GgufType type, const std::string& key, int depth = 0) {
    GgufValue v;
    v.type = type;
    if (type == GgufType::String) {
      v.text = string(key.c_str());
    } else if (type == GgufType::Array) {
      check<FileError>(depth < 8, "'{}': metadata '{}': arrays nested too deeply", source_, key);
      v.item_type = static_cast<GgufType>(read<uint32_t>(key.c_str()));
      const uint64_t n = read<uint64_t>(key.c_str());
      check<FileError>(n <= remaining(), "'{}': metadata '{}': array of {} elements exceeds the file", source_, key, n);
      for (uint64_t i = 0; i < n; ++i) v.items.push_back(value(v.item_type, key, depth + 1));
    } else {
      const size_t size = gguf_scalar_size(type);
      check<FileError>(size > 0, "'{}': metadata '{}' has the unknown type {}", source_, key, static_cast<uint32_t>(type));
      need(size, key.c_str());
      std::memcpy(&v.bits, bytes_.data() + pos_, size);
      pos_ += size;
    }
    return v;
  }
  uint64_t pos() const { return pos_; }
  uint64_t remaining() const { return bytes_.size() - pos_; }
  const std::string& source() const { return source_; }

 private:
  void need(uint64_t n, const char* what) const {
    check<FileError>(n <= remaining(), "'{}': truncated at byte {} (reading {})", source_, pos_, what);
  }
  const std::string& bytes_;
  std::string source_;
  uint64_t pos_ = 0;
};

}  // namespace detail

/// Parses GGUF `bytes` (version 2 or 3) read from `source`. FileError naming the
/// source and the key or tensor for a bad magic or version, truncation, duplicate
/// names, a tensor type other than F32/F16/BF16, or data outside the file.
inline GgufFile from_gguf(const std::string& bytes, const std::string& source) {
  check<FileError>(detail::gguf_little_endian(), "'{}': big-endian hosts are not supported", source);
  detail::GgufCursor in(bytes, source);
  check<FileError>(bytes.compare(0, 4, "GGUF") == 0, "'{}' is not a GGUF file (no 'GGUF' magic)", source);
  in.read<uint32_t>("magic");
  const uint32_t version = in.read<uint32_t>("version");
  check<FileError>(version == 2 || version == 3, "'{}': GGUF version {} is not supported (2 and 3 are)", source, version);
  const uint64_t n_tensors = in.read<uint64_t>("tensor count"), n_kv = in.read<uint64_t>("metadata count");
  check<FileError>(n_tensors <= in.remaining() && n_kv <= in.remaining(), "'{}': counts ({} tensors, {} keys) exceed the file",
                   source, n_tensors, n_kv);
  GgufFile file;
  file.source = source;
  for (uint64_t i = 0; i < n_kv; ++i) {
    std::string key = in.string("a metadata key");
    check<FileError>(file.find(key) == nullptr, "'{}': metadata key '{}' appears twice", source, key);
    const auto type = static_cast<GgufType>(in.read<uint32_t>(key.c_str()));
    file.metadata.emplace_back(key, in.value(type, key));
  }
  struct Info {
    std::string name;
    std::vector<int64_t> shape;
    torch::ScalarType dtype;
    uint64_t offset;
  };
  std::vector<Info> infos;
  std::set<std::string> names;
  for (uint64_t i = 0; i < n_tensors; ++i) {
    Info info;
    info.name = in.string("a tensor name");
    check<FileError>(names.insert(info.name).second, "'{}': tensor '{}' appears twice", source, info.name);
    const uint32_t n_dims = in.read<uint32_t>(info.name.c_str());
    check<FileError>(n_dims >= 1 && n_dims <= 4, "'{}': tensor '{}' has {} dimensions (1 to 4 allowed)", source, info.name,
                     n_dims);
    info.shape.resize(n_dims);
    for (uint32_t d = 0; d < n_dims; ++d) {
      const uint64_t ne = in.read<uint64_t>(info.name.c_str());
      check<FileError>(ne <= (uint64_t{1} << 40), "'{}': tensor '{}' has dimension {}", source, info.name, ne);
      info.shape[n_dims - 1 - d] = static_cast<int64_t>(ne);  // ggml's ne[0] is torch's last dimension
    }
    const uint32_t type = in.read<uint32_t>(info.name.c_str());
    const auto is = [&](GgmlType t) { return type == static_cast<uint32_t>(t); };
    check<FileError>(is(GgmlType::F32) || is(GgmlType::F16) || is(GgmlType::BF16),
                     "'{}': tensor '{}' has ggml type {}; this reader reads F32, F16 and BF16", source, info.name, type);
    info.dtype = is(GgmlType::F32) ? torch::kFloat32 : is(GgmlType::F16) ? torch::kFloat16 : torch::kBFloat16;
    info.offset = in.read<uint64_t>(info.name.c_str());
    infos.push_back(std::move(info));
  }
  const uint64_t alignment = detail::gguf_alignment(file, "'" + source + "'");
  const uint64_t data_start = detail::gguf_pad(in.pos(), alignment);
  for (const auto& info : infos) {
    uint64_t size = c10::elementSize(info.dtype);  // checked before allocating: a corrupt shape must not allocate
    for (const int64_t ne : info.shape) {
      check<FileError>(ne == 0 || size <= bytes.size() / static_cast<uint64_t>(ne),
                       "'{}': tensor '{}' is larger than the file", source, info.name);
      size *= static_cast<uint64_t>(ne);
    }
    check<FileError>(info.offset % alignment == 0, "'{}': tensor '{}' has offset {}, not a multiple of the alignment {}",
                     source, info.name, info.offset, alignment);
    check<FileError>(data_start <= bytes.size() && info.offset <= bytes.size() - data_start &&
                         size <= bytes.size() - data_start - info.offset,
                     "'{}': tensor '{}' ({} bytes at offset {}) extends past the end of the file", source, info.name,
                     size, info.offset);
    torch::Tensor t = torch::empty(info.shape, torch::TensorOptions().dtype(info.dtype));
    if (size > 0) std::memcpy(t.data_ptr(), bytes.data() + data_start + info.offset, size);  // empty: data_ptr null
    file.tensors.emplace_back(info.name, t);
  }
  return file;
}

/// Reads the GGUF file `path` (see from_gguf); FileError naming it if it cannot be read.
inline GgufFile load_gguf(const std::filesystem::path& path) { return from_gguf(read_file(path), path.string()); }

}  // namespace io
}  // namespace peft
