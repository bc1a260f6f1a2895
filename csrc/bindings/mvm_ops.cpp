// Torch bindings of the fused CPU analog MVM (csrc/kernels/analog_mvm.h).
//
//   MvmIO(...)                      the IOConfig numbers, as the kernel takes them (built once per config)
//   mvm_stream_seed(chip_key, purpose, counter) -> int   the last two splitmix64 steps of stream_seed
//   analog_mvm(x, w, abs_split_w, out_scale, bias, row_ids, in_sizes, out_sizes, io,
//              chip_key, call_index, readout, probes, output) -> Tensor
//     output 0: y [B, out]; 1: per-tile partial [T, B, out]; 2: probe means [T, out] (see analog_mvm.h)
//     w: tile weights split per input tile [T, out, n_max], or the whole weight [out, in].
//     chip_key None: no per-MVM noise. Runs without the GIL on at::get_num_threads() threads.
//   analog_experts(hidden, top_k_index, top_k_weights, gate_up, down, gate_up_in_sizes, gate_up_out_sizes,
//                  down_in_sizes, down_out_sizes, io, call_index, parallel_below) -> Tensor
//     gate_up / down: one (split_w, abs_split_w | None, out_scale, chip_key | None) tuple per expert.
#include <torch/extension.h>

#include <optional>

#include "kernels/analog_experts.h"
#include "kernels/analog_mvm.h"

namespace py = pybind11;
using romer::mvm::IOParams;

void register_mvm_ops(py::module_& m) {
  py::class_<IOParams>(m, "MvmIO", "IOConfig numbers of the fused CPU analog MVM (floats rounded to float32).")
      .def(py::init([](bool is_perfect, int noise_management, float nm_thres, float inp_step, float inp_bound,
                       float inp_noise, float out_step, float out_bound, float out_noise, float w_noise,
                       bool w_noise_pcm, float ir_drop, float ir_drop_g_ratio, bool iterative,
                       bool bm_test_negative, double max_bm_factor, double max_bm_res, double inp_step_exact,
                       int max_rounds) {
             if (noise_management < 0 || noise_management > 2) {
               throw py::value_error("MvmIO: noise_management must be 0 (abs_max), 1 (constant) or 2 (none)");
             }
             if (max_rounds < 1 || max_rounds > 64) throw py::value_error("MvmIO: max_rounds must be in [1, 64]");
             IOParams p;
             p.is_perfect = is_perfect;
             p.noise_management = noise_management;
             p.nm_thres = nm_thres;
             p.inp_step = inp_step;
             p.inp_bound = inp_bound;
             p.inp_noise = inp_noise;
             p.out_step = out_step;
             p.out_bound = out_bound;
             p.out_noise = out_noise;
             p.w_noise = w_noise;
             p.w_noise_pcm = w_noise_pcm;
             p.ir_drop = ir_drop;
             p.ir_drop_g_ratio = ir_drop_g_ratio;
             p.iterative = iterative;
             p.bm_test_negative = bm_test_negative;
             p.max_bm_factor = max_bm_factor;
             p.max_bm_res = max_bm_res;
             p.inp_step_exact = inp_step_exact;
             p.max_rounds = max_rounds;
             return p;
           }),
           py::arg("is_perfect"), py::arg("noise_management"), py::arg("nm_thres"), py::arg("inp_step"),
           py::arg("inp_bound"), py::arg("inp_noise"), py::arg("out_step"), py::arg("out_bound"),
           py::arg("out_noise"), py::arg("w_noise"), py::arg("w_noise_pcm"), py::arg("ir_drop"),
           py::arg("ir_drop_g_ratio"), py::arg("iterative"), py::arg("bm_test_negative"), py::arg("max_bm_factor"),
           py::arg("max_bm_res"), py::arg("inp_step_exact"), py::arg("max_rounds"));

  m.def("mvm_stream_seed",
        [](uint64_t chip_key, int purpose, uint64_t counter) { return romer::mvm::stream_seed(chip_key, purpose, counter); },
        py::arg("chip_key"), py::arg("purpose"), py::arg("counter"));

  m.def(
      "analog_mvm",
      [](const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& abs_split_w,
         const std::optional<at::Tensor>& out_scale, const std::optional<at::Tensor>& bias,
         const std::optional<at::Tensor>& row_ids, const std::vector<int64_t>& in_sizes,
         const std::vector<int64_t>& out_sizes, const IOParams& io, std::optional<uint64_t> chip_key,
         int64_t call_index, bool readout, bool probes, int output) {
        if (call_index < 0) throw py::value_error("analog_mvm: call_index must be non-negative");
        romer::mvm::NoiseKey key;
        key.enabled = chip_key.has_value();
        key.chip_key = chip_key.value_or(0);
        key.call_index = call_index;
        key.readout = readout;
        py::gil_scoped_release release;
        return romer::mvm::analog_mvm(x, w, abs_split_w, out_scale, bias, row_ids, in_sizes, out_sizes, io, key,
                                      probes, output);
      },
      py::arg("x"), py::arg("w"), py::arg("abs_split_w"), py::arg("out_scale"), py::arg("bias"),
      py::arg("row_ids"), py::arg("in_sizes"), py::arg("out_sizes"), py::arg("io"), py::arg("chip_key"),
      py::arg("call_index"), py::arg("readout"), py::arg("probes"), py::arg("output"));

  m.def(
      "analog_experts",
      [](const at::Tensor& hidden, const at::Tensor& top_k_index, const at::Tensor& top_k_weights,
         const std::vector<std::tuple<at::Tensor, std::optional<at::Tensor>, at::Tensor, std::optional<uint64_t>>>& gate_up,
         const std::vector<std::tuple<at::Tensor, std::optional<at::Tensor>, at::Tensor, std::optional<uint64_t>>>& down,
         const std::vector<int64_t>& gate_up_in_sizes, const std::vector<int64_t>& gate_up_out_sizes,
         const std::vector<int64_t>& down_in_sizes, const std::vector<int64_t>& down_out_sizes, const IOParams& io,
         int64_t call_index, int64_t parallel_below) {
        if (call_index < 0) throw py::value_error("analog_experts: call_index must be non-negative");
        const auto convert = [](const auto& list) {
          std::vector<romer::mvm::ExpertMatrix> out;
          out.reserve(list.size());
          for (const auto& [split_w, abs_split_w, out_scale, key] : list) out.push_back({split_w, abs_split_w, out_scale, key});
          return out;
        };
        const auto gu = convert(gate_up);
        const auto dn = convert(down);
        py::gil_scoped_release release;
        return romer::mvm::analog_experts(hidden, top_k_index, top_k_weights, gu, dn, gate_up_in_sizes, gate_up_out_sizes,
                                          down_in_sizes, down_out_sizes, io, call_index, parallel_below);
      },
      py::arg("hidden"), py::arg("top_k_index"), py::arg("top_k_weights"), py::arg("gate_up"), py::arg("down"),
      py::arg("gate_up_in_sizes"), py::arg("gate_up_out_sizes"), py::arg("down_in_sizes"), py::arg("down_out_sizes"),
      py::arg("io"), py::arg("call_index"), py::arg("parallel_below"));
}
