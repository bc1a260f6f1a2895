// Fused device-noise kernels (PCM / HERMES programming and reading, Gaussian chip noise), torch-free.
//
// Each kernel walks the layer weight [rows, cols] (row-major float32) in work items of whole rows
// (about kItemElements elements), parallel over items with OpenMP. Inside an item it generates the
// standard normals of its flat element range [e0, e1) of every Philox stream it needs with
// philox_fill_normal (element (i, j) of a stream is index i * cols + j, as normal_like), into a small
// per-thread buffer, then runs vectorisable element-wise loops. No full-size normal tensor is made, and
// every element is a pure function of its inputs and stream elements, so results do not depend on the
// number of threads.
//
// The element-wise arithmetic follows romer_kernels/noise/pcm.py and gaussian.py operation by operation
// (float32, Python constants rounded to float32 as torch does). The only differences to the torch path
// are the few-ulp difference of the normals and log / pow: here ln and exp are float32 polynomials
// (log_fast_f32 / exp_fast_f32, within about 2 ulp), torch uses its own float32 vector math (<= 1 ulp).
// Output buffers are the caller's (the bindings reuse the previous result's memory when told to).
#pragma once

#include <cstdint>
#include <vector>

namespace romer {
namespace noise {

// The tile partition: sizes of the output splits (rows) and input splits (columns).
struct TileSizes {
  std::vector<int64_t> out_sizes;
  std::vector<int64_t> in_sizes;
};

// x < thr ? clamp(ln(x) * a + b, lo, hi) : (x * x * p2 + x * p1) + p0   (thr = +inf: log branch only).
// The mean / std of the drift exponent of PCM (log branch only) and HERMES (both branches).
struct PieceFit {
  float thr, a, b, lo, hi, p2, p1, p0;
};

// Q_s of the 1/f read noise at x = |g| / g_max.
//   family 0 (PCM):    min((1 / max(x^exponent, floor)) * numerator, cap)
//   family 1 (HERMES): x < thr ? clamp(ln(x) * a + b, lo, hi) : ((x^3 p3 + x^2 p2) + x p1) + p0
struct ReadQ {
  int family;
  float exponent, floor, numerator, cap;
  float thr, a, b, lo, hi, p3, p2, p1, p0;
};

struct PcmParams {
  float g_max;
  std::vector<float> prog_coeff;  // sigma_prog polynomial in x = g_T / g_max
  float reference_ratio;          // g_max / prog_coeff_g_max_reference
  float prog_noise_scale;
  float sigma_off;                // prog_noise_scale * sigma_prog(0), as the torch code computes it
  float drift_scale;
  float mu_off, sigma_nu_off;     // drift statistics of a device with target 0
  PieceFit nu_mu, nu_sigma;
  ReadQ q;
};

// Optional stream: has = false means "no noise of this kind".
struct Stream {
  bool has = false;
  uint64_t seed = 0;
};

// PCM / HERMES programming: weights[rows*cols] and, if nu_plus.has, drift_nu[2*rows*cols] (G+ then G-).
// prog_plus/prog_minus: PROGRAM slots 0/1 (both or neither); nu_plus/nu_minus: DRIFT_NU slots 0/1.
void pcm_program(const float* w, int64_t rows, int64_t cols, const TileSizes& grid, const PcmParams& p,
                 Stream prog_plus, Stream prog_minus, Stream nu_plus, Stream nu_minus, float* weights,
                 float* drift_nu, int num_threads);

// PCM / HERMES read: re-conversion with the tile abs-max of w_prog, drift by (t / t_0)^-nu when w_target
// != nullptr and nu_plus.has (t_ratio = t / t_0), read noise when read_plus.has (time_factor =
// sqrt(ln((t + t_read) / (2 t_read))), read_noise_scale). The drift exponents are not stored: they are
// drawn again from w_target (the weights the chip was programmed to, tile units) and the DRIFT_NU
// streams, the same values pcm_program draws. `out` may be `w_prog` (read in place).
void pcm_read(const float* w_prog, const float* w_target, int64_t rows, int64_t cols, const TileSizes& grid,
              const PcmParams& p, double t_ratio, double time_factor, float read_noise_scale, Stream read_plus,
              Stream read_minus, Stream nu_plus, Stream nu_minus, float* out, int num_threads);

// Gaussian chip: out = w + (w_max * sigma) * xi_add [+ (|w| * mult_sigma) * xi_mul], w_max the abs-max of
// the crossbar column (row within an input split). Streams without `has` are skipped.
void gaussian_program(const float* w, int64_t rows, int64_t cols, const std::vector<int64_t>& in_sizes,
                      float sigma, float mult_sigma, Stream add, Stream mul, float* out, int num_threads);

// Gaussian read: out = (w_max(w_prog) * read_sigma) * xi + w_prog; `out` may be `w_prog` (in place).
void gaussian_read(const float* w_prog, int64_t rows, int64_t cols, const std::vector<int64_t>& in_sizes,
                   float read_sigma, Stream read, float* out, int num_threads);

// Per-tile abs-max, [n_out_tiles * n_in_tiles] row-major (out tile major).
std::vector<float> tile_absmax(const float* w, int64_t rows, int64_t cols, const TileSizes& grid, int num_threads);

// Element-wise helpers, exposed for the tests: ln(x) and x^e for x >= 0 (x = 0 gives -inf / 0),
// evaluated in double and rounded to float32 (the reference the float32 versions are tested against).
void log_f32(const float* x, float* out, int64_t n);
void pow_f32(const float* x, float exponent, float* out, int64_t n);

// The float32 ln, x^e and exp the kernels use (AVX2; the double versions above where AVX2 is missing):
// ln within 2 ulp, exp within 2 ulp, x^e = exp(e ln x) within 2 ulp + 2 ulp of |e ln x|.
void log_fast_f32(const float* x, float* out, int64_t n);
void pow_fast_f32(const float* x, float exponent, float* out, int64_t n);
void exp_fast_f32(const float* y, float* out, int64_t n);

}  // namespace noise
}  // namespace romer
