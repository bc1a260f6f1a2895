// Routed analog experts on the CPU; see analog_experts.h.
#include "kernels/analog_experts.h"

#include <omp.h>

#include <numeric>
#include <stdexcept>
#include <string>

namespace romer {
namespace mvm {

namespace {

NoiseKey key_of(const ExpertMatrix& m, int64_t call_index) {
  NoiseKey key;
  key.enabled = m.chip_key.has_value();
  key.chip_key = m.chip_key.value_or(0);
  key.call_index = call_index;
  return key;
}

}  // namespace

at::Tensor analog_experts(const at::Tensor& hidden, const at::Tensor& top_k_index, const at::Tensor& top_k_weights,
                          const std::vector<ExpertMatrix>& gate_up, const std::vector<ExpertMatrix>& down,
                          const std::vector<int64_t>& gate_up_in_sizes, const std::vector<int64_t>& gate_up_out_sizes,
                          const std::vector<int64_t>& down_in_sizes, const std::vector<int64_t>& down_out_sizes,
                          const IOParams& io, int64_t call_index, int64_t parallel_below) {
  const auto fail = [](const std::string& what) { throw std::invalid_argument("analog_experts: " + what); };
  if (hidden.dim() != 2 || hidden.scalar_type() != at::kFloat || !hidden.device().is_cpu()) {
    fail("hidden must be a float32 CPU tensor [tokens, hidden]");
  }
  if (top_k_index.dim() != 2 || top_k_index.size(0) != hidden.size(0) || top_k_weights.sizes() != top_k_index.sizes()) {
    fail("top_k_index and top_k_weights must both be [tokens, k]");
  }
  const int64_t E = static_cast<int64_t>(gate_up.size());
  if (E == 0 || static_cast<int64_t>(down.size()) != E) fail("gate_up and down must list the same experts");
  const int64_t k = top_k_index.size(1);
  const at::Tensor flat = top_k_index.reshape(-1).to(at::kLong).contiguous();
  if (flat.numel() > 0 && (flat.min().item<int64_t>() < 0 || flat.max().item<int64_t>() >= E)) {
    fail("top_k_index holds expert ids outside [0, " + std::to_string(E) + ")");
  }
  const at::Tensor weights = top_k_weights.reshape(-1).to(at::kFloat).contiguous();
  const at::Tensor x = hidden.contiguous();
  const at::Tensor order = at::argsort(flat, /*stable=*/true);
  const at::Tensor counts = at::bincount(flat, /*weights=*/{}, E);
  const int64_t* cp = counts.data_ptr<int64_t>();
  std::vector<int64_t> start(E + 1, 0);
  for (int64_t e = 0; e < E; ++e) start[e + 1] = start[e] + cp[e];

  const int64_t inter = std::accumulate(down_in_sizes.begin(), down_in_sizes.end(), int64_t{0});  // I
  std::vector<at::Tensor> results(E), tokens(E);
  const auto run_expert = [&](int64_t e) {
    const int64_t n = start[e + 1] - start[e];
    if (n == 0) return;
    const at::Tensor rows = order.narrow(0, start[e], n);
    const at::Tensor tok = at::div(rows, k, "floor");
    const at::Tensor h = analog_mvm(x.index_select(0, tok), gate_up[e].split_w, gate_up[e].abs_split_w,
                                    gate_up[e].out_scale, std::nullopt, tok, gate_up_in_sizes, gate_up_out_sizes, io,
                                    key_of(gate_up[e], call_index), false, kOutputLayer);
    const at::Tensor act = (at::silu(h.narrow(1, 0, inter)) * h.narrow(1, inter, inter)).contiguous();
    const at::Tensor y = analog_mvm(act, down[e].split_w, down[e].abs_split_w, down[e].out_scale, std::nullopt, tok,
                                    down_in_sizes, down_out_sizes, io, key_of(down[e], call_index), false, kOutputLayer);
    results[e] = y * weights.index_select(0, rows).unsqueeze(1);
    tokens[e] = tok;
  };
  const int64_t used = static_cast<int64_t>((counts > 0).sum().item<int64_t>());
  const bool parallel = used > 0 && flat.numel() / used < parallel_below && at::get_num_threads() > 1;
  if (parallel) {
    // Experts side by side, one thread each (the MVMs inside run single-threaded in the nested region).
    std::string error;
#pragma omp parallel for schedule(dynamic, 1) num_threads(at::get_num_threads())
    for (int64_t e = 0; e < E; ++e) {
      try {
        run_expert(e);
      } catch (const std::exception& ex) {
#pragma omp critical
        error = ex.what();
      }
    }
    if (!error.empty()) throw std::invalid_argument(error);
  } else {
    for (int64_t e = 0; e < E; ++e) run_expert(e);
  }
  at::Tensor out = at::zeros_like(x);
  for (int64_t e = 0; e < E; ++e) {
    if (results[e].defined()) out.index_add_(0, tokens[e], results[e]);
  }
  return out;
}

}  // namespace mvm
}  // namespace romer
