// Torch bindings of the Philox streams in csrc/core/philox.h (CPU tensors).
//
//   philox_randint(seed, start, count) -> int64 tensor of 32-bit words in [0, 2**32)
//   philox_uniform(seed, start, count) -> float32 tensor in [0, 1)
//   philox_normal(seed, start, count)  -> float32 tensor of standard normals
//   philox_normal_rows(seed, rows, row_len) -> float32 [len(rows), row_len], rows of a row-major array
//
// Elements [start, start + count) of stream `seed`, same layout as romer_kernels/rng/philox.py. The
// work runs without the GIL on at::get_num_threads() OpenMP threads (torch.set_num_threads applies);
// results do not depend on the thread count.
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>

#include "core/philox.h"

namespace py = pybind11;

namespace {

// A Python int (or anything with __index__) as a Python int object; TypeError otherwise.
py::int_ as_index(const py::handle& obj, const char* name) {
  if (PyFloat_Check(obj.ptr())) {
    throw py::type_error(std::string(name) + " must be an int, got a float");
  }
  PyObject* idx = PyNumber_Index(obj.ptr());
  if (idx == nullptr) {
    PyErr_Clear();
    throw py::type_error(std::string(name) + " must be an int, got " +
                         std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
  }
  return py::reinterpret_steal<py::int_>(idx);
}

uint64_t seed_arg(const py::handle& obj) {
  const py::int_ v = as_index(obj, "seed");
  int overflow = 0;
  const long long s = PyLong_AsLongLongAndOverflow(v.ptr(), &overflow);
  if (overflow == 0) {
    if (s == -1 && PyErr_Occurred()) throw py::error_already_set();
    if (s < 0) throw py::value_error("seed must be in [0, 2**64), got " + std::string(py::str(v)));
    return static_cast<uint64_t>(s);
  }
  if (overflow < 0) throw py::value_error("seed must be in [0, 2**64), got " + std::string(py::str(v)));
  const unsigned long long u = PyLong_AsUnsignedLongLong(v.ptr());
  if (u == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
    PyErr_Clear();
    throw py::value_error("seed must be in [0, 2**64), got " + std::string(py::str(v)));
  }
  return static_cast<uint64_t>(u);
}

int64_t range_arg(const py::handle& obj, const char* name) {
  const py::int_ v = as_index(obj, name);
  int overflow = 0;
  const long long x = PyLong_AsLongLongAndOverflow(v.ptr(), &overflow);
  if (overflow == 0 && x == -1 && PyErr_Occurred()) throw py::error_already_set();
  if (overflow != 0 || x < 0) {
    throw py::value_error(std::string("stream range must be non-negative and below 2**63, got ") + name + "=" +
                          std::string(py::str(v)));
  }
  return static_cast<int64_t>(x);
}

struct Range {
  uint64_t seed;
  int64_t start;
  int64_t count;
};

Range parse(const py::handle& seed, const py::handle& start, const py::handle& count) {
  Range r{seed_arg(seed), range_arg(start, "start"), range_arg(count, "count")};
  if (r.count > std::numeric_limits<int64_t>::max() - r.start) {
    throw py::value_error("stream range end start + count must be below 2**63, got start=" + std::to_string(r.start) +
                          ", count=" + std::to_string(r.count));
  }
  return r;
}

torch::Tensor philox_randint(const py::object& seed, const py::object& start, const py::object& count) {
  const Range r = parse(seed, start, count);
  torch::Tensor out = torch::empty({r.count}, torch::dtype(torch::kInt64));
  {
    py::gil_scoped_release no_gil;
    romer::philox::philox_fill_uint32(r.seed, r.start, r.count, out.data_ptr<int64_t>(), at::get_num_threads());
  }
  return out;
}

torch::Tensor philox_uniform(const py::object& seed, const py::object& start, const py::object& count) {
  const Range r = parse(seed, start, count);
  torch::Tensor out = torch::empty({r.count}, torch::dtype(torch::kFloat32));
  {
    py::gil_scoped_release no_gil;
    romer::philox::philox_fill_uniform(r.seed, r.start, r.count, out.data_ptr<float>(), at::get_num_threads());
  }
  return out;
}

torch::Tensor philox_normal(const py::object& seed, const py::object& start, const py::object& count) {
  const Range r = parse(seed, start, count);
  torch::Tensor out = torch::empty({r.count}, torch::dtype(torch::kFloat32));
  {
    py::gil_scoped_release no_gil;
    romer::philox::philox_fill_normal(r.seed, r.start, r.count, out.data_ptr<float>(), at::get_num_threads());
  }
  return out;
}

// Rows `rows` of the row-major stream array with `row_len` columns: element (r, c) is stream element
// r * row_len + c. Used for the tokens routed to one expert, which are scattered rows of a batch.
torch::Tensor philox_normal_rows(const py::object& seed, const torch::Tensor& rows, const py::object& row_len) {
  const uint64_t s = seed_arg(seed);
  const int64_t len = range_arg(row_len, "row_len");
  if (len == 0) throw py::value_error("row_len must be positive");
  if (rows.device().type() != torch::kCPU || rows.scalar_type() != torch::kInt64 || rows.dim() != 1) {
    throw py::value_error("rows must be a 1-D int64 CPU tensor");
  }
  const torch::Tensor ids = rows.contiguous();
  const int64_t n = ids.numel();
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    if (id[i] < 0 || id[i] > (std::numeric_limits<int64_t>::max() - len) / len) {
      throw py::value_error("row ids must be non-negative and row * row_len + row_len below 2**63");
    }
  }
  torch::Tensor out = torch::empty({n, len}, torch::dtype(torch::kFloat32));
  float* dst = out.data_ptr<float>();
  {
    py::gil_scoped_release no_gil;
    // rows are independent; each is filled on one thread, so the result does not depend on threads
    at::parallel_for(0, n, std::max<int64_t>(1, 32768 / len), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        romer::philox::philox_fill_normal(s, id[i] * len, len, dst + i * len, 1);
      }
    });
  }
  return out;
}

}  // namespace

void register_rng_ops(py::module_& m) {
  m.def("philox_normal_rows", &philox_normal_rows, py::arg("seed"), py::arg("rows"), py::arg("row_len"),
        "Normals of rows `rows` of the row-major stream array with `row_len` columns, as [len(rows), row_len].");
  m.def("philox_randint", &philox_randint, py::arg("seed"), py::arg("start"), py::arg("count"),
        "Raw Philox4x32-10 words of stream `seed`, elements [start, start + count), as an int64 tensor.");
  m.def("philox_uniform", &philox_uniform, py::arg("seed"), py::arg("start"), py::arg("count"),
        "Uniforms in [0, 1) (Triton's uint_to_uniform_float) of stream `seed`, elements [start, start + count).");
  m.def("philox_normal", &philox_normal, py::arg("seed"), py::arg("start"), py::arg("count"),
        "Standard normals (lane e % 4 of Triton's randn4x(seed, e // 4)), elements [start, start + count).");
  m.attr("PHILOX_KERNEL") = ROMER_PHILOX_HAVE_AVX2 ? "avx2" : "portable";
}
