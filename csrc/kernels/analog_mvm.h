// Fused analog tiled MVM on the CPU: the semantics of romer_kernels/kernels/reference.py (tiled_mvm +
// analog_linear), with the per-MVM noise drawn inline from the same Philox streams.
//
// One call is one forward of one analog matrix:
//   prologue  (per input tile and vector, OpenMP): noise management, DAC, input noise, and the extra
//             operands IR drop and PCM-read noise need (x * (1 - p^2), |x|, x^2);
//   GEMMs     at::bmm per bound-management round (MKL): x' W^T, x' (1 - p^2) W^T, |x'| |W|^T, x'^2 |W|^T,
//             stacked so W and |W| are each read by one call;
//   epilogue  (per tile and vector, OpenMP): IR drop, weight read noise, output noise (Philox normals of
//             the reference's elements, generated per row into a thread-local buffer), ADC, clip flags;
//   then iterative bound management re-runs only the (tile, vector) pairs whose output tile clipped,
//   and the digital part sums out_scale * partial over input tiles and adds the bias.
//
// Stream keys: the caller passes chip_key = splitmix64(splitmix64(chip_seed) ^ layer_key); the kernel
// finishes the chain of romer_kernels.rng.streams.stream_seed for (purpose, mvm_counter(call, round,
// readout)) itself.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace romer {
namespace mvm {

enum class NoiseManagement : int { AbsMax = 0, Constant = 1, None = 2 };

// IOConfig, with every float already rounded to float32 as the reference's tensor ops see it.
struct IOParams {
  bool is_perfect = false;
  int noise_management = 0;  // NoiseManagement
  float nm_thres = 0.0f;
  float inp_step = 0.0f;     // 0: no DAC quantization
  float inp_bound = 1.0f;
  float inp_noise = 0.0f;
  float out_step = 0.0f;     // 0: no ADC quantization
  float out_bound = 0.0f;    // <= 0: no clipping
  float out_noise = 0.0f;
  float w_noise = 0.0f;
  bool w_noise_pcm = false;  // false: additive_constant (std w_noise * ||x'||), true: pcm_read
  float ir_drop = 0.0f;
  float ir_drop_g_ratio = 1.0f;
  bool iterative = false;    // iterative bound management (needs out_bound > 0)
  bool bm_test_negative = true;
  double max_bm_factor = 1000.0;
  double max_bm_res = 0.25;
  double inp_step_exact = 0.0;  // the DAC step in double, for aihwkit's stop rule
  int max_rounds = 48;          // romer_kernels.config.analog.MAX_BM_ROUNDS
};

struct NoiseKey {
  bool enabled = false;      // false: no per-MVM noise (the reference's stream_seed None)
  uint64_t chip_key = 0;
  int64_t call_index = 0;
  bool readout = false;
};

uint64_t stream_seed(uint64_t chip_key, int purpose, uint64_t counter);

// What analog_mvm returns (float32 CPU):
inline constexpr int kOutputLayer = 0;      // y [B, out]: digital scales, sum over input tiles, bias
inline constexpr int kOutputPartial = 1;    // per-tile partial z * scale * r [T, B, out]
inline constexpr int kOutputProbeMean = 2;  // [T, out]: mean over b < in_sizes[t] of |partial[t, b, :]|
                                            // (the drift-compensation readout, with probes)

// w: tile weights split per input tile [T, out, n_max] (see reference.split_columns), or the whole [out, in]
// weight (read in place by the fused readout, split internally for every other path).
// probes: the caller promises that row j of every input tile's slice is zero except at position j (the
// one-hot readout of drift compensation); the products are then computed element-wise, exactly as the
// GEMM would, instead of by a GEMM.
at::Tensor analog_mvm(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& abs_split_w,
                      const std::optional<at::Tensor>& out_scale, const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& row_ids, const std::vector<int64_t>& in_sizes,
                      const std::vector<int64_t>& out_sizes, const IOParams& io, const NoiseKey& noise, bool probes,
                      int output);

}  // namespace mvm
}  // namespace romer
