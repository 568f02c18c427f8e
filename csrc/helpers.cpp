// Index builders for GPTDataset and BlendedDataset (Megatron semantics, see DESIGN.md).
//
// Why C++: both are sequential loops over every sample of training (hundreds of millions for large
// runs); in Python they take minutes, here well under a second per ten million samples. The GIL is
// released while they run.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

namespace py = pybind11;

namespace {

// Exact dtype and C-contiguity, without silent casts: a wrong dtype is a caller bug worth naming.
template <typename T>
const T* checked_data(const py::array& a, const char* name) {
  if (!a.dtype().equal(py::dtype::of<T>()))
    throw py::type_error(std::string(name) + " must have dtype " + std::string(py::str(py::dtype::of<T>())) +
                         ", got " + std::string(py::str(a.dtype())));
  if (a.ndim() != 1) throw py::value_error(std::string(name) + " must be 1-D");
  if (!(a.flags() & py::array::c_style)) throw py::value_error(std::string(name) + " must be C-contiguous");
  return static_cast<const T*>(a.data());
}

// Fills out[2*(num_samples+1)] with (position in doc_idx, offset in that document) where each sample
// starts. Sample i is the seq_length+1 tokens from entry i through entry i+1 inclusive, so consecutive
// samples share one token (inputs s[:-1], labels s[1:]) and samples run across document boundaries.
template <typename DocT>
void fill_sample_idx(const int32_t* sizes, int64_t num_sizes, const DocT* doc_idx, int64_t num_docs,
                     int64_t seq_length, int64_t num_samples, int64_t* out) {
  int64_t doc_pos = 0;     // index into doc_idx
  int64_t doc_offset = 0;  // token offset inside doc_idx[doc_pos]
  out[0] = 0;
  out[1] = 0;
  for (int64_t sample = 1; sample <= num_samples; ++sample) {
    int64_t remaining = seq_length + 1;
    while (remaining != 0) {
      if (doc_pos >= num_docs)
        throw py::value_error("build_sample_idx: doc_idx ran out of tokens at sample " + std::to_string(sample) +
                              " of " + std::to_string(num_samples) + "; tokens_per_epoch or num_epochs is wrong");
      const int64_t doc_id = static_cast<int64_t>(doc_idx[doc_pos]);
      if (doc_id < 0 || doc_id >= num_sizes)
        throw py::value_error("build_sample_idx: doc_idx[" + std::to_string(doc_pos) + "] = " +
                              std::to_string(doc_id) + " is outside sizes (length " + std::to_string(num_sizes) +
                              ")");
      const int64_t available = static_cast<int64_t>(sizes[doc_id]) - doc_offset;
      remaining -= available;
      if (remaining <= 0) {
        // The sample ends inside this document, on the token at doc_offset + (what was still needed) - 1;
        // that token is also the first token of the next sample.
        doc_offset += remaining + available - 1;
        remaining = 0;
      } else {
        ++doc_pos;
        doc_offset = 0;
      }
    }
    out[2 * sample] = doc_pos;
    out[2 * sample + 1] = doc_offset;
  }
}

py::array_t<int64_t> build_sample_idx(const py::array& sizes, const py::array& doc_idx, int64_t seq_length,
                                      int64_t num_epochs, int64_t tokens_per_epoch) {
  if (seq_length <= 0) throw py::value_error("seq_length must be positive, got " + std::to_string(seq_length));
  if (num_epochs <= 0) throw py::value_error("num_epochs must be positive, got " + std::to_string(num_epochs));
  if (tokens_per_epoch <= 0)
    throw py::value_error("tokens_per_epoch must be positive, got " + std::to_string(tokens_per_epoch));
  const int32_t* sz = checked_data<int32_t>(sizes, "sizes");
  const int64_t num_samples = (num_epochs * tokens_per_epoch - 1) / seq_length;
  py::array_t<int64_t> result({num_samples + 1, int64_t(2)});
  int64_t* out = result.mutable_data();
  const int64_t n_sizes = sizes.size();
  const int64_t n_docs = doc_idx.size();
  if (doc_idx.dtype().equal(py::dtype::of<int32_t>())) {
    const int32_t* d = checked_data<int32_t>(doc_idx, "doc_idx");
    py::gil_scoped_release release;
    fill_sample_idx(sz, n_sizes, d, n_docs, seq_length, num_samples, out);
  } else {
    const int64_t* d = checked_data<int64_t>(doc_idx, "doc_idx");
    py::gil_scoped_release release;
    fill_sample_idx(sz, n_sizes, d, n_docs, seq_length, num_samples, out);
  }
  return result;
}

// Greedy blending: sample i goes to the dataset whose achieved count lags its target the most,
// target = weight * max(i, 1) exactly as Megatron computes it (ties go to the lower dataset index).
template <typename IndexT>
void fill_blending(const double* weights, int64_t num_datasets, int64_t size, IndexT* dataset_index,
                   int64_t* dataset_sample_index) {
  std::vector<int64_t> current(num_datasets, 0);
  for (int64_t i = 0; i < size; ++i) {
    const double step = std::max(static_cast<double>(i), 1.0);
    int64_t best = 0;
    double best_error = weights[0] * step - static_cast<double>(current[0]);
    for (int64_t d = 1; d < num_datasets; ++d) {
      const double error = weights[d] * step - static_cast<double>(current[d]);
      if (error > best_error) {
        best_error = error;
        best = d;
      }
    }
    dataset_index[i] = static_cast<IndexT>(best);
    dataset_sample_index[i] = current[best];
    ++current[best];
  }
}

py::tuple build_blending_indices(const py::array& weights, int64_t size) {
  const double* w = checked_data<double>(weights, "weights");
  const int64_t n = weights.size();
  if (n < 1) throw py::value_error("build_blending_indices: need at least one weight");
  if (n > 32767) throw py::value_error("build_blending_indices: at most 32767 datasets, got " + std::to_string(n));
  if (size < 0) throw py::value_error("build_blending_indices: size must be >= 0, got " + std::to_string(size));
  for (int64_t d = 0; d < n; ++d)
    if (!std::isfinite(w[d]) || w[d] < 0)
      throw py::value_error("build_blending_indices: weight " + std::to_string(d) + " is " + std::to_string(w[d]) +
                            "; weights must be finite and >= 0");
  py::array_t<int64_t> sample_index(size);
  int64_t* si = sample_index.mutable_data();
  if (n <= 255) {
    py::array_t<uint8_t> index(size);
    uint8_t* di = index.mutable_data();
    {
      py::gil_scoped_release release;
      fill_blending(w, n, size, di, si);
    }
    return py::make_tuple(index, sample_index);
  }
  py::array_t<int16_t> index(size);
  int16_t* di = index.mutable_data();
  {
    py::gil_scoped_release release;
    fill_blending(w, n, size, di, si);
  }
  return py::make_tuple(index, sample_index);
}

}  // namespace

PYBIND11_MODULE(_helpers_cpp, m) {
  m.doc() = "Sample-index and blending-index builders (Megatron semantics).";
  m.def("build_sample_idx", &build_sample_idx, py::arg("sizes"), py::arg("doc_idx"), py::arg("seq_length"),
        py::arg("num_epochs"), py::arg("tokens_per_epoch"),
        "int64 [num_samples+1, 2] of (index into doc_idx, offset in that document); "
        "num_samples = (num_epochs*tokens_per_epoch - 1) // seq_length.");
  m.def("build_blending_indices", &build_blending_indices, py::arg("weights"), py::arg("size"),
        "(dataset_index uint8 (int16 past 255 datasets), dataset_sample_index int64) by Megatron's greedy rule.");
}
