// The romer_kernels._C extension module. Each csrc/bindings/<group>_ops.cpp defines a
// register_<group>_ops(module) function; declare it here and call it below to add a group.
#include <torch/extension.h>

namespace py = pybind11;

void register_rng_ops(py::module_& m);
void register_mvm_ops(py::module_& m);
void register_noise_ops(py::module_& m);

PYBIND11_MODULE(_C, m) {
  m.doc() = "romer_kernels compiled CPU kernels (RNG streams, analog MVM, device noise).";
  register_rng_ops(m);
  register_mvm_ops(m);
  register_noise_ops(m);
}
