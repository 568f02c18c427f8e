// Streaming writer for Megatron-compatible .bin/.idx indexed datasets (format: DESIGN.md).
//
// Why C++: Megatron's Python builder keeps every document's tokens and sizes in Python lists and runs
// out of memory on large shards. This writer streams tokens to the .bin through a fixed buffer as they
// arrive and keeps only one int32 length per document, so memory is constant in the corpus size.
// All file I/O and token conversion run with the GIL released so tokenizer threads keep working.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace py = pybind11;

namespace {

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the .bin/.idx format is little endian; this writer assumes a little-endian host"
#endif

constexpr char kMagic[9] = {'M', 'M', 'I', 'D', 'I', 'D', 'X', '\0', '\0'};
constexpr uint64_t kVersion = 1;
constexpr size_t kBufferBytes = size_t(4) << 20;

// An I/O failure; surfaces in Python as OSError (registered in the module below).
struct IOFailure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

std::string errno_message(const std::string& what, const std::string& path) {
  return what + " " + path + ": " + std::strerror(errno);
}

// Fixed-size write buffer over a FILE*: one fwrite per kBufferBytes, whatever the document sizes.
class BufferedFile {
 public:
  explicit BufferedFile(const std::string& path) : path_(path), buf_(kBufferBytes) {
    f_ = std::fopen(path.c_str(), "wb");
    if (!f_) throw IOFailure(errno_message("cannot open for writing", path));
    std::setvbuf(f_, nullptr, _IONBF, 0);  // we buffer ourselves
  }
  ~BufferedFile() {
    if (f_) std::fclose(f_);
  }
  BufferedFile(const BufferedFile&) = delete;
  BufferedFile& operator=(const BufferedFile&) = delete;

  void write(const void* data, size_t n) {
    const char* p = static_cast<const char*>(data);
    if (used_ + n > buf_.size()) flush_buffer();
    if (n >= buf_.size()) {
      raw_write(p, n);
      return;
    }
    std::memcpy(buf_.data() + used_, p, n);
    used_ += n;
  }
  template <typename T>
  void put(T value) {
    write(&value, sizeof(T));
  }
  // Flushes, fsyncs (so a later rename never exposes a file whose bytes are not on disk) and closes.
  void close_synced() {
    flush_buffer();
    if (std::fflush(f_) != 0) throw IOFailure(errno_message("cannot flush", path_));
    if (::fsync(fileno(f_)) != 0) throw IOFailure(errno_message("cannot fsync", path_));
    FILE* f = f_;
    f_ = nullptr;
    if (std::fclose(f) != 0) throw IOFailure(errno_message("cannot close", path_));
  }
  void close_quietly() {
    if (f_) std::fclose(f_);
    f_ = nullptr;
  }
  bool is_open() const { return f_ != nullptr; }
  const std::string& path() const { return path_; }

 private:
  void flush_buffer() {
    if (used_ > 0) raw_write(buf_.data(), used_);
    used_ = 0;
  }
  void raw_write(const char* p, size_t n) {
    if (std::fwrite(p, 1, n, f_) != n) throw IOFailure(errno_message("cannot write", path_));
  }
  std::string path_;
  FILE* f_ = nullptr;
  std::vector<char> buf_;
  size_t used_ = 0;
};

const char* dtype_name(int code) {
  switch (code) {
    case 1: return "uint8";
    case 2: return "int8";
    case 3: return "int16";
    case 4: return "int32";
    case 5: return "int64";
    case 6: return "float64";
    case 7: return "float32";
    case 8: return "uint16";
    default: return "unknown";
  }
}

size_t dtype_itemsize(int code) {
  switch (code) {
    case 1: case 2: return 1;
    case 3: case 8: return 2;
    case 4: case 7: return 4;
    case 5: case 6: return 8;
    default: throw py::value_error("unknown dtype code " + std::to_string(code) + " (valid: 1..8)");
  }
}

// True when integer `v` is representable in Dst (always true for floating-point targets).
template <typename Dst, typename Src>
bool fits(Src v) {
  if constexpr (std::is_floating_point_v<Dst>) {
    return true;
  } else if constexpr (std::is_signed_v<Src>) {
    const int64_t x = static_cast<int64_t>(v);
    return x >= static_cast<int64_t>(std::numeric_limits<Dst>::min()) &&
           x <= static_cast<int64_t>(std::numeric_limits<Dst>::max());
  } else {
    return static_cast<uint64_t>(v) <= static_cast<uint64_t>(std::numeric_limits<Dst>::max());
  }
}

template <typename Src>
std::string to_string_any(Src v) {
  if constexpr (std::is_signed_v<Src>) return std::to_string(static_cast<long long>(v));
  else return std::to_string(static_cast<unsigned long long>(v));
}

// Sum of sequence lengths, each checked to fit the .idx's int32 length field; `where` names the source.
template <typename Len>
int64_t checked_total(const Len* len, size_t n, const std::string& where) {
  int64_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    if (len[i] < 0 || static_cast<int64_t>(len[i]) > std::numeric_limits<int32_t>::max())
      throw py::value_error("length " + std::to_string(len[i]) + " of sequence " + std::to_string(i) + " in " +
                            where + " is outside the int32 length field");
    total += len[i];
  }
  return total;
}

class Builder {
 public:
  Builder(const std::string& bin_path, int dtype_code)
      : code_(dtype_code), itemsize_(dtype_itemsize(dtype_code)), bin_(bin_path) {}

  // Appends one document; validates every token before writing any, so a rejected document leaves
  // the .bin and the lengths consistent.
  void add_document(const py::array& tokens) {
    check_open();
    const size_t n = write_tokens(tokens);
    if (n > static_cast<size_t>(std::numeric_limits<int32_t>::max()))
      throw py::value_error("document of " + std::to_string(n) + " tokens exceeds the int32 length field");
    lengths_.push_back(static_cast<int32_t>(n));
    tokens_ += static_cast<int64_t>(n);
  }

  // Appends many documents at once: `tokens` holds them back to back, `lengths` their sizes. One call per
  // preprocessing chunk instead of one per document; the lengths are checked before any byte is written.
  void add_documents(const py::array& tokens, const py::array_t<int64_t, py::array::c_style>& lengths) {
    check_open();
    if (lengths.ndim() != 1) throw py::value_error("lengths must be a 1-D array");
    const int64_t* len = lengths.data();
    const size_t docs = static_cast<size_t>(lengths.size());
    const int64_t total = checked_total(len, docs, "the batch");
    if (tokens.ndim() != 1 || static_cast<int64_t>(tokens.size()) != total)
      throw py::value_error("tokens must be a 1-D array of sum(lengths) = " + std::to_string(total) +
                            " ids, got " + std::to_string(tokens.size()));
    write_tokens(tokens);
    lengths_.insert(lengths_.end(), len, len + docs);
    tokens_ += total;
  }

  // Appends another dataset of the same dtype: copies its .bin bytes and its sequence lengths
  // (read and validated by the Python reader, which owns the .idx parsing).
  void add_index(const std::string& other_bin, const py::array_t<int32_t, py::array::c_style>& lengths) {
    check_open();
    if (lengths.ndim() != 1) throw py::value_error("lengths must be 1-D");
    const int32_t* len = lengths.data();
    const size_t n = static_cast<size_t>(lengths.size());
    const int64_t total = checked_total(len, n, other_bin);
    {
      py::gil_scoped_release release;
      FILE* in = std::fopen(other_bin.c_str(), "rb");
      if (!in) throw IOFailure(errno_message("cannot open", other_bin));
      std::vector<char> chunk(kBufferBytes);
      int64_t copied = 0;
      size_t got;
      while ((got = std::fread(chunk.data(), 1, chunk.size(), in)) > 0) {
        bin_.write(chunk.data(), got);
        copied += static_cast<int64_t>(got);
      }
      const bool failed = std::ferror(in) != 0;
      std::fclose(in);
      if (failed) throw IOFailure(errno_message("cannot read", other_bin));
      const int64_t expected = total * static_cast<int64_t>(itemsize_);
      if (copied != expected)
        throw py::value_error(other_bin + " holds " + std::to_string(copied) + " bytes but its index expects " +
                              std::to_string(expected) + "; the output is now inconsistent, abort it");
    }
    lengths_.insert(lengths_.end(), len, len + n);
    tokens_ += total;
  }

  // Closes the .bin and writes the .idx: header, int32 lengths, int64 byte pointers, int64 doc indices.
  void finalize(const std::string& idx_path) {
    check_open();
    py::gil_scoped_release release;
    bin_.close_synced();
    BufferedFile idx(idx_path);
    const uint64_t s = lengths_.size();
    idx.write(kMagic, sizeof(kMagic));
    idx.put<uint64_t>(kVersion);
    idx.put<uint8_t>(static_cast<uint8_t>(code_));
    idx.put<uint64_t>(s);
    idx.put<uint64_t>(s + 1);
    idx.write(lengths_.data(), s * sizeof(int32_t));
    int64_t pointer = 0;
    for (int32_t len : lengths_) {
      idx.put<int64_t>(pointer);
      pointer += static_cast<int64_t>(len) * static_cast<int64_t>(itemsize_);
    }
    for (uint64_t d = 0; d <= s; ++d) idx.put<int64_t>(static_cast<int64_t>(d));
    idx.close_synced();
    finalized_ = true;
  }

  // Closes the .bin without writing an index (the Python side deletes the temporary files).
  void abort() { bin_.close_quietly(); }

  size_t documents() const { return lengths_.size(); }
  int64_t tokens() const { return tokens_; }
  int dtype_code() const { return code_; }

 private:
  void check_open() const {
    if (finalized_) throw std::runtime_error("builder already finalized");
    if (!bin_.is_open()) throw std::runtime_error("builder was aborted");
  }

  // Range-checks and writes a 1-D integer array (converted to the dataset dtype); returns its size.
  size_t write_tokens(const py::array& tokens) {
    if (tokens.ndim() != 1)
      throw py::value_error("a document must be a 1-D array of token ids, got " +
                            std::to_string(tokens.ndim()) + " dimensions");
    const char kind = tokens.dtype().kind();
    if (kind != 'i' && kind != 'u')
      throw py::type_error(std::string("token ids must have an integer dtype, got kind '") + kind + "'");
    // Contiguous view (copy only when the caller passed a strided array); keeps the dtype.
    py::array arr = py::array::ensure(tokens, py::array::c_style);
    if (!arr) throw py::error_already_set();
    const size_t n = static_cast<size_t>(arr.size());
    const void* data = arr.data();
    const size_t isz = static_cast<size_t>(arr.itemsize());
    py::gil_scoped_release release;
    if (kind == 'i') write_sized<int8_t, int16_t, int32_t, int64_t>(data, n, isz);
    else write_sized<uint8_t, uint16_t, uint32_t, uint64_t>(data, n, isz);
    return n;
  }

  // Picks the source type of one signedness by its itemsize.
  template <typename T1, typename T2, typename T4, typename T8>
  void write_sized(const void* data, size_t n, size_t itemsize) {
    switch (itemsize) {
      case 1: write_from(static_cast<const T1*>(data), n); break;
      case 2: write_from(static_cast<const T2*>(data), n); break;
      case 4: write_from(static_cast<const T4*>(data), n); break;
      case 8: write_from(static_cast<const T8*>(data), n); break;
      default: throw py::type_error("unsupported integer itemsize " + std::to_string(itemsize));
    }
  }

  template <typename Src>
  void write_from(const Src* data, size_t n) {
    switch (code_) {
      case 1: convert<Src, uint8_t>(data, n); break;
      case 2: convert<Src, int8_t>(data, n); break;
      case 3: convert<Src, int16_t>(data, n); break;
      case 4: convert<Src, int32_t>(data, n); break;
      case 5: convert<Src, int64_t>(data, n); break;
      case 6: convert<Src, double>(data, n); break;
      case 7: convert<Src, float>(data, n); break;
      case 8: convert<Src, uint16_t>(data, n); break;
    }
  }

  template <typename Src, typename Dst>
  void range_check(const Src* data, size_t n) const {
    for (size_t i = 0; i < n; ++i) {
      if (!fits<Dst>(data[i])) {
        throw py::value_error("token id " + to_string_any(data[i]) + " at position " + std::to_string(i) +
                              " of document " + std::to_string(lengths_.size()) + " is out of range for " +
                              dtype_name(code_) + " [" + to_string_any(std::numeric_limits<Dst>::min()) +
                              ", " + to_string_any(std::numeric_limits<Dst>::max()) + "]");
      }
    }
  }

  template <typename Src, typename Dst>
  void convert(const Src* data, size_t n) {
    if constexpr (!std::is_floating_point_v<Dst>) range_check<Src, Dst>(data, n);
    if constexpr (std::is_same_v<Src, Dst>) {
      bin_.write(data, n * sizeof(Dst));
    } else {
      constexpr size_t kChunk = 8192;
      Dst tmp[kChunk];
      for (size_t i = 0; i < n; i += kChunk) {
        const size_t m = std::min(kChunk, n - i);
        for (size_t j = 0; j < m; ++j) tmp[j] = static_cast<Dst>(data[i + j]);
        bin_.write(tmp, m * sizeof(Dst));
      }
    }
  }

  int code_;
  size_t itemsize_;
  BufferedFile bin_;
  std::vector<int32_t> lengths_;
  int64_t tokens_ = 0;
  bool finalized_ = false;
};

}  // namespace

PYBIND11_MODULE(_builder_cpp, m) {
  m.doc() = "Streaming Megatron-compatible .bin/.idx writer (constant memory, GIL released during I/O).";
  py::register_exception<IOFailure>(m, "BuilderIOError", PyExc_OSError);
  m.def("dtype_itemsize", &dtype_itemsize, py::arg("dtype_code"), "Bytes per token for an .idx dtype code.");
  py::class_<Builder>(m, "Builder")
      .def(py::init<const std::string&, int>(), py::arg("bin_path"), py::arg("dtype_code"),
           "Open bin_path for writing tokens of the given .idx dtype code.")
      .def("add_document", &Builder::add_document, py::arg("tokens"),
           "Append one document (1-D integer array; values range-checked against the target dtype).")
      .def("add_documents", &Builder::add_documents, py::arg("tokens"), py::arg("lengths"),
           "Append len(lengths) documents stored back to back in the 1-D integer array tokens.")
      .def("add_index", &Builder::add_index, py::arg("other_bin_path"), py::arg("lengths"),
           "Append another dataset: copy its .bin bytes and its int32 sequence lengths.")
      .def("finalize", &Builder::finalize, py::arg("idx_path"), "Close the .bin and write the .idx.")
      .def("abort", &Builder::abort, "Close the .bin without writing an index.")
      .def_property_readonly("documents", &Builder::documents)
      .def_property_readonly("tokens", &Builder::tokens)
      .def_property_readonly("dtype_code", &Builder::dtype_code);
}
