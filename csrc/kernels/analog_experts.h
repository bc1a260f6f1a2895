// Routed analog experts on the CPU: the whole expert loop of romer_kernels.nn.AnalogExperts.forward in C++.
//
// Assignments (token, k) are sorted by expert; each expert runs gate_up (fused analog MVM, row ids = token
// index), silu(gate) * up (ATen's silu, the same values as the module's act_fn), down, and the routing
// weight; experts run in parallel over OpenMP threads when they get few tokens each (small GEMMs do not
// use two cores well), else one after the other with the threads inside each MVM. Results are added per
// token in increasing expert order, as the module's index_add loop does.
#pragma once

#include <torch/extension.h>

#include <optional>
#include <vector>

#include "kernels/analog_mvm.h"

namespace romer {
namespace mvm {

// One matrix of one expert: its tile weights, whole [out, in] (the chip's state, read in place; float32,
// bfloat16 or float16) or split [T, out, n_max], |split| (optional, split only), out scales [T, out], and
// the chip key of its per-MVM streams (nullopt: no per-MVM noise).
struct ExpertMatrix {
  at::Tensor split_w;
  std::optional<at::Tensor> abs_split_w;
  at::Tensor out_scale;
  std::optional<uint64_t> chip_key;
};

at::Tensor analog_experts(const at::Tensor& hidden, const at::Tensor& top_k_index, const at::Tensor& top_k_weights,
                          const std::vector<ExpertMatrix>& gate_up, const std::vector<ExpertMatrix>& down,
                          const std::vector<int64_t>& gate_up_in_sizes, const std::vector<int64_t>& gate_up_out_sizes,
                          const std::vector<int64_t>& down_in_sizes, const std::vector<int64_t>& down_out_sizes,
                          const IOParams& io, int64_t call_index, int64_t parallel_below);

}  // namespace mvm
}  // namespace romer
