// Fused analog tiled MVM on the CPU; see analog_mvm.h for the structure and
// romer_kernels/kernels/reference.py for the semantics this file reproduces operation by operation.
//
// Every float operation of the prologue and epilogue is the reference's, in the reference's order and in
// float32 (built with -ffp-contract=off, so no implicit fma), so with the same GEMM results the outputs
// are bit-identical; the GEMM sums (MKL) and the normals (<= a few ulp) are the only sources of
// difference.
#include "kernels/analog_mvm.h"

#include <omp.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <initializer_list>
#include <string>
#include <type_traits>
#include <vector>

#include "core/philox.h"

namespace romer {
namespace mvm {

namespace {

constexpr int kOutNoise = 4;  // romer_kernels.rng.Purpose codes
constexpr int kWNoise = 5;
constexpr int kInpNoise = 6;
constexpr uint64_t kSeedMask = (uint64_t{1} << 63) - 1;
// Rounds with at most this many rows per tile use few_rows_products instead of MKL (measured crossover).
constexpr int64_t kFewRows = 4;

inline uint64_t splitmix64(uint64_t v) {
  v += 0x9E3779B97F4A7C15ull;
  v = (v ^ (v >> 30)) * 0xBF58476D1CE4E5B9ull;
  v = (v ^ (v >> 27)) * 0x94D049BB133111EBull;
  return v ^ (v >> 31);
}

inline uint64_t mvm_counter(int64_t call_index, int round, bool readout) {
  return static_cast<uint64_t>(call_index) * 128u + (readout ? 64u : 0u) + static_cast<uint64_t>(round);
}

// torch.round (half to even) of v / step, times step; step 0 = identity.
inline float quantize(float v, float step) { return step > 0.0f ? std::nearbyint(v / step) * step : v; }

// quantize() over an array, in place (explicitly vectorised: GCC does not vectorise nearbyint here).
inline void quantize_inplace(float* v, int64_t n, float step) {
  if (!(step > 0.0f)) return;
  int64_t i = 0;
#if defined(__AVX2__)
  const __m256 s = _mm256_set1_ps(step);
  for (; i + 8 <= n; i += 8) {
    const __m256 q = _mm256_div_ps(_mm256_loadu_ps(v + i), s);
    _mm256_storeu_ps(v + i, _mm256_mul_ps(_mm256_round_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), s));
  }
#endif
  for (; i < n; ++i) v[i] = quantize(v[i], step);
}

void check(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("analog_mvm: " + what);
}

void check_tensor(const at::Tensor& t, const char* name, int64_t dim) {
  check(t.device().is_cpu(), std::string(name) + " must be a CPU tensor");
  check(t.scalar_type() == at::kFloat, std::string(name) + " must be float32");
  check(t.dim() == dim, std::string(name) + " must have " + std::to_string(dim) + " dimensions, got " +
                            std::to_string(t.dim()));
  check(t.is_contiguous(), std::string(name) + " must be contiguous");
}

// Threads for a call that touches about `work` elements: small calls stay on one thread. Besides the
// fork/join cost, a parallel region waits for every thread of the team, and on a machine where another
// process holds a core that wait can last a scheduler time slice (milliseconds) per region.
constexpr int64_t kParallelGrain = 1 << 15;
int threads(int64_t work) { return work < kParallelGrain ? 1 : std::max(1, at::get_num_threads()); }

// The products of a round with few rows per tile: every weight row is read once (from memory) and
// multiplied with all rows of the round while it is in L1, instead of one GEMM pass per weight operand.
// For each row, the products against W (x', x'(1-p^2)) and |W| (|x'|, x'^2) share one pass over k.
template <int NA, int NB>
void few_rows_products_t(const float* wp, const std::vector<int64_t>& w_base, int64_t ld, int64_t T, int64_t N,
                         int64_t nmax, const std::vector<int64_t>& in_sizes,
                         const float* xap, const float* xbp, int64_t M, const std::vector<std::vector<int64_t>>& rows,
                         float* zap, float* zbp, int nt) {
  // Visit the weight in memory order: (tile, row) for the split layout, (row, tile) for the whole [out, in]
  // weight (row c holds all tiles side by side), so each thread streams one contiguous range.
  const bool row_major = ld != nmax || T == 1;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t item = 0; item < T * N; ++item) {
    {
      const int64_t t = row_major ? item % T : item / N;
      const int64_t c = row_major ? item / T : item % N;
      const float* w = wp + w_base[t] + c * ld;
      const int64_t size = in_sizes[t];
      const int64_t used = static_cast<int64_t>(rows[t].size());
      for (int64_t j = 0; j < used; ++j) {
        const float* xa[NA > 0 ? NA : 1];
        const float* xb[NB > 0 ? NB : 1];
        for (int a = 0; a < NA; ++a) xa[a] = xap + (t * NA * M + a * M + j) * nmax;
        for (int a = 0; a < NB; ++a) xb[a] = xbp + (t * NB * M + a * M + j) * nmax;
        float sa[NA > 0 ? NA : 1] = {}, sb[NB > 0 ? NB : 1] = {};
        int64_t k = 0;
#if defined(__AVX2__)
        __m256 acc_a[NA > 0 ? NA : 1][2], acc_b[NB > 0 ? NB : 1][2];
        for (int a = 0; a < NA; ++a) acc_a[a][0] = acc_a[a][1] = _mm256_setzero_ps();
        for (int a = 0; a < NB; ++a) acc_b[a][0] = acc_b[a][1] = _mm256_setzero_ps();
        const __m256 sign = _mm256_set1_ps(-0.0f);
        for (; k + 16 <= size; k += 16) {
          for (int h = 0; h < 2; ++h) {
            const __m256 wv = _mm256_loadu_ps(w + k + 8 * h);
            for (int a = 0; a < NA; ++a) acc_a[a][h] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xa[a] + k + 8 * h), acc_a[a][h]);
            if constexpr (NB > 0) {
              const __m256 av = _mm256_andnot_ps(sign, wv);
              for (int a = 0; a < NB; ++a) acc_b[a][h] = _mm256_fmadd_ps(av, _mm256_loadu_ps(xb[a] + k + 8 * h), acc_b[a][h]);
            }
          }
        }
        alignas(32) float lanes[8];
        for (int a = 0; a < NA; ++a) {
          _mm256_store_ps(lanes, _mm256_add_ps(acc_a[a][0], acc_a[a][1]));
          for (float lane : lanes) sa[a] += lane;
        }
        for (int a = 0; a < NB; ++a) {
          _mm256_store_ps(lanes, _mm256_add_ps(acc_b[a][0], acc_b[a][1]));
          for (float lane : lanes) sb[a] += lane;
        }
#endif
        for (; k < size; ++k) {
          for (int a = 0; a < NA; ++a) sa[a] += w[k] * xa[a][k];
          for (int a = 0; a < NB; ++a) sb[a] += std::fabs(w[k]) * xb[a][k];
        }
        for (int a = 0; a < NA; ++a) zap[(t * NA * M + a * M + j) * N + c] = sa[a];
        for (int a = 0; a < NB; ++a) zbp[(t * NB * M + a * M + j) * N + c] = sb[a];
      }
    }
  }
}

void few_rows_products(const float* wp, const std::vector<int64_t>& w_base, int64_t ld, int64_t T, int64_t N,
                       int64_t nmax, const std::vector<int64_t>& in_sizes,
                       const float* xap, int na, const float* xbp, int nb, int64_t M,
                       const std::vector<std::vector<int64_t>>& rows, float* zap, float* zbp, int nt) {
  const auto run = [&](auto na_c, auto nb_c) {
    few_rows_products_t<decltype(na_c)::value, decltype(nb_c)::value>(wp, w_base, ld, T, N, nmax, in_sizes, xap, xbp, M, rows,
                                                                         zap, zbp, nt);
  };
  using I1 = std::integral_constant<int, 1>;
  using I2 = std::integral_constant<int, 2>;
  using I0 = std::integral_constant<int, 0>;
  if (na == 1 && nb == 0) run(I1{}, I0{});
  else if (na == 1 && nb == 1) run(I1{}, I1{});
  else if (na == 2 && nb == 1) run(I2{}, I1{});
  else if (na == 2 && nb == 2) run(I2{}, I2{});
  else throw std::logic_error("few_rows_products: unexpected operand counts");
}

// Per-thread scratch buffers, kept between calls: a fresh multi-MB tensor costs a page fault per 4 KiB
// page on every call (as much as the epilogue itself for the drift-compensation readout).
struct Workspace {
  std::vector<float> xa, xb, za, zb, partial;
};
thread_local Workspace workspace;

at::Tensor scratch(std::vector<float>& storage, std::initializer_list<int64_t> shape, bool zero) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  if (static_cast<int64_t>(storage.size()) < n) storage.resize(static_cast<size_t>(n));
  if (zero) std::fill_n(storage.data(), n, 0.0f);
  return at::from_blob(storage.data(), at::IntArrayRef(shape), at::TensorOptions().dtype(at::kFloat));
}

// dst[j * ld_dst + c] = src[c * ld_src + j] for an 8 x 8 square (the readout's column-major copy of W).
inline void transpose8x8(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
#if defined(__AVX2__)
  __m256 r[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ld_src);
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  _mm256_storeu_ps(dst + 0 * ld_dst, _mm256_permute2f128_ps(s0, s4, 0x20));
  _mm256_storeu_ps(dst + 1 * ld_dst, _mm256_permute2f128_ps(s1, s5, 0x20));
  _mm256_storeu_ps(dst + 2 * ld_dst, _mm256_permute2f128_ps(s2, s6, 0x20));
  _mm256_storeu_ps(dst + 3 * ld_dst, _mm256_permute2f128_ps(s3, s7, 0x20));
  _mm256_storeu_ps(dst + 4 * ld_dst, _mm256_permute2f128_ps(s0, s4, 0x31));
  _mm256_storeu_ps(dst + 5 * ld_dst, _mm256_permute2f128_ps(s1, s5, 0x31));
  _mm256_storeu_ps(dst + 6 * ld_dst, _mm256_permute2f128_ps(s2, s6, 0x31));
  _mm256_storeu_ps(dst + 7 * ld_dst, _mm256_permute2f128_ps(s3, s7, 0x31));
#else
  for (int c = 0; c < 8; ++c)
    for (int j = 0; j < 8; ++j) dst[j * ld_dst + c] = src[c * ld_src + j];
#endif
}

}  // namespace

uint64_t stream_seed(uint64_t chip_key, int purpose, uint64_t counter) {
  uint64_t h = splitmix64(chip_key ^ static_cast<uint64_t>(purpose));
  h = splitmix64(h ^ counter);
  return h & kSeedMask;
}

at::Tensor analog_mvm(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& abs_split_w,
                      const std::optional<at::Tensor>& out_scale, const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& row_ids, const std::vector<int64_t>& in_sizes,
                      const std::vector<int64_t>& out_sizes, const IOParams& io, const NoiseKey& noise, bool probes,
                      int output) {
  const bool return_partial = output == kOutputPartial;
  // ---- shapes and arguments -----------------------------------------------------------------
  check_tensor(x, "x", 2);
  // The weight comes whole [out, in] (the chip's state, read in place: tile t is the column block
  // [in_off[t], in_off[t] + in_sizes[t]) of every row), or split per input tile [T, out, n_max].
  // A bfloat16 / float16 state is upcast once per call (a temporary of this one matrix).
  const bool whole = w.dim() == 2;
  if (whole && (w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kHalf)) {
    return analog_mvm(x, w.to(at::kFloat), abs_split_w, out_scale, bias, row_ids, in_sizes, out_sizes, io, noise,
                      probes, output);
  }
  if (whole) {
    check_tensor(w, "weight", 2);
    check(!in_sizes.empty(), "in_sizes must list the input tiles");
    check(w.size(1) == x.size(1), "the weight has " + std::to_string(w.size(1)) + " inputs but x has " +
                                      std::to_string(x.size(1)));
  } else {
    check_tensor(w, "split_w", 3);
  }
  const at::Tensor& split_w = w;  // [T, out, n_max] unless whole
  const int64_t B = x.size(0), K = x.size(1);
  const int64_t T = whole ? static_cast<int64_t>(in_sizes.size()) : w.size(0);
  const int64_t N = whole ? w.size(0) : w.size(1);
  const int64_t nmax = whole ? *std::max_element(in_sizes.begin(), in_sizes.end()) : w.size(2);
  check(static_cast<int64_t>(in_sizes.size()) == T,
        "in_sizes has " + std::to_string(in_sizes.size()) + " tiles, split_w " + std::to_string(T));
  std::vector<int64_t> in_off(T);
  int64_t total_in = 0;
  for (int64_t t = 0; t < T; ++t) {
    check(in_sizes[t] > 0 && in_sizes[t] <= nmax, "in_sizes must be in [1, split_w.shape[2]]");
    in_off[t] = total_in;
    total_in += in_sizes[t];
  }
  check(total_in == K, "in_sizes sum to " + std::to_string(total_in) + " but x has " + std::to_string(K) +
                           " inputs");
  // Weight element (tile t, output c, tile input k) is wp[w_base[t] + c * ld + k] in either layout.
  const int64_t ld = whole ? K : nmax;
  std::vector<int64_t> w_base(T);
  for (int64_t t = 0; t < T; ++t) w_base[t] = whole ? in_off[t] : t * N * nmax;
  // tile t of the whole weight as a [N, in_sizes[t]] view, transposed for the products: [in_sizes[t], N]
  const auto tile_t = [&](int64_t t) { return w.narrow(1, in_off[t], in_sizes[t]).t(); };
  std::vector<int64_t> out_tile_of(N);
  int64_t n_ot = 0, total_out = 0;
  for (int64_t s : out_sizes) {
    check(s > 0, "out_sizes must be positive");
    for (int64_t c = 0; c < s && total_out + c < N; ++c) out_tile_of[total_out + c] = n_ot;
    total_out += s;
    ++n_ot;
  }
  check(total_out == N, "out_sizes sum to " + std::to_string(total_out) + " but split_w has " +
                            std::to_string(N) + " outputs");
  if (abs_split_w.has_value()) {
    check(!whole, "abs_split_w goes with split weights");
    check_tensor(*abs_split_w, "abs_split_w", 3);
    check(abs_split_w->sizes() == split_w.sizes(), "abs_split_w must have split_w's shape");
  }
  check(output >= kOutputLayer && output <= kOutputProbeMean, "output must be 0 (layer), 1 (partial) or 2 (probe mean)");
  check(output != kOutputProbeMean || B >= nmax, "probe-mean output needs one probe row per tile input");
  if (output == kOutputLayer) {
    check(out_scale.has_value(), "out_scale is required for the layer output");
  }
  if (out_scale.has_value()) {
    check_tensor(*out_scale, "out_scale", 2);
    check(out_scale->size(0) == T && out_scale->size(1) == N, "out_scale must be [n_in_tiles, out_features]");
  }
  if (bias.has_value()) {
    check_tensor(*bias, "bias", 1);
    check(bias->size(0) == N, "bias must have out_features elements");
  }
  std::vector<int64_t> rid(B);
  if (row_ids.has_value()) {
    const at::Tensor r = row_ids->to(at::kLong).contiguous();
    check(r.dim() == 1 && r.size(0) == B, "row_ids must have one id per input vector");
    const int64_t* rp = r.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      check(rp[b] >= 0, "row_ids must be non-negative");
      rid[b] = rp[b];
    }
  } else {
    for (int64_t b = 0; b < B; ++b) rid[b] = b;
  }
  const int nt = threads(B * std::max(K, T * N));
  const float* xp = x.data_ptr<float>();
  const at::TensorOptions f32 = x.options();

  // Rows holding NaN/Inf give NaN rows (they are computed as zero rows and never affect other rows).
  std::vector<uint8_t> bad(B, 0);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    const float* row = xp + b * K;
    bool ok = true;
    for (int64_t k = 0; k < K; ++k) ok &= std::isfinite(row[k]);
    bad[b] = !ok;
  }

  at::Tensor partial;
  // Equal input tiles (in divisible by the tile size): the whole weight IS a [T, N, size] strided view (tile
  // t = columns [t size, (t + 1) size) of every row), so one batched GEMM reads it in place -- the same call
  // and sums as on a split copy. Ragged tiles take one GEMM per tile on strided views.
  const bool equal_tiles =
      whole && std::all_of(in_sizes.begin(), in_sizes.end(), [&](int64_t v) { return v == in_sizes[0]; });
  const auto tiles_view = [&](const at::Tensor& whole_w) { return whole_w.as_strided({T, N, nmax}, {nmax, K, 1}); };
  const at::Tensor w_t = !whole ? split_w.transpose(1, 2) : (equal_tiles ? tiles_view(w).transpose(1, 2) : at::Tensor());
  if (io.is_perfect) {
    at::Tensor xs = at::zeros({T, B, nmax}, f32);
    float* xsp = xs.data_ptr<float>();
#pragma omp parallel for num_threads(nt) collapse(2) schedule(static)
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t b = 0; b < B; ++b) {
        if (bad[b]) continue;
        std::copy_n(xp + b * K + in_off[t], in_sizes[t], xsp + (t * B + b) * nmax);
      }
    }
    if (!w_t.defined()) {
      partial = at::empty({T, B, N}, f32);
      for (int64_t t = 0; t < T; ++t) {
        at::Tensor part = partial.select(0, t);
        at::mm_out(part, xs.select(0, t).narrow(1, 0, in_sizes[t]), tile_t(t));
      }
    } else {
      partial = at::bmm(xs, w_t);
    }
  } else {
    // ---- per (tile, vector) noise management, fixed over the bound-management rounds -----------
    std::vector<float> safe_scale(T * B);
    std::vector<uint8_t> pending(T * B * n_ot);
    const auto nm = static_cast<NoiseManagement>(io.noise_management);
    const bool dead_possible = nm != NoiseManagement::None && !(io.inp_noise > 0.0f);
#pragma omp parallel for num_threads(nt) collapse(2) schedule(static)
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t b = 0; b < B; ++b) {
        float scale = 1.0f;
        if (nm == NoiseManagement::AbsMax) {
          scale = 0.0f;
          if (!bad[b]) {
            const float* row = xp + b * K + in_off[t];
            for (int64_t k = 0; k < in_sizes[t]; ++k) scale = std::max(scale, std::fabs(row[k]));
          }
          if (io.nm_thres > 0.0f) scale = std::min(scale, io.nm_thres);
        } else if (nm == NoiseManagement::Constant) {
          scale = io.nm_thres > 0.0f ? io.nm_thres : 1.0f;
        }
        const bool dead = bad[b] || (dead_possible && scale <= 0.0f);
        safe_scale[t * B + b] = scale > 0.0f ? scale : 1.0f;
        std::fill_n(pending.begin() + (t * B + b) * n_ot, n_ot, static_cast<uint8_t>(!dead));
      }
    }

    // ---- which products the epilogue needs -----------------------------------------------------
    const bool ir = io.ir_drop > 0.0f;
    const bool w_noise = noise.enabled && io.w_noise > 0.0f;
    const bool pcm_read = w_noise && io.w_noise_pcm;
    const bool out_noise = noise.enabled && io.out_noise > 0.0f;
    const bool inp_noise = noise.enabled && io.inp_noise > 0.0f;
    check(!(probes && inp_noise), "probes mode needs inp_noise = 0 (noisy inputs are not one-hot)");
    const int na = ir ? 2 : 1;                      // blocks of XA (against W): x', x' (1 - p^2)
    const int nb = (ir ? 1 : 0) + (pcm_read ? 1 : 0);  // blocks of XB (against |W|): |x'|, x'^2
    std::vector<float> ir_gain;                      // 1 - p^2, p = 1 - k / size
    std::vector<float> ir_size_ratio(T);             // size / g_ratio
    if (ir) {
      ir_gain.assign(T * nmax, 0.0f);
      for (int64_t t = 0; t < T; ++t) {
        const float size = static_cast<float>(in_sizes[t]);
        for (int64_t k = 0; k < nmax; ++k) {
          const float p = 1.0f - static_cast<float>(k) / size;
          ir_gain[t * nmax + k] = 1.0f - p * p;
        }
        ir_size_ratio[t] = size / io.ir_drop_g_ratio;
      }
    }
    // |W| for IR drop / PCM read: the fused readout, the probes and the few-rows products take |w| as they
    // read w; the GEMM path makes it per call, one tile at a time for a whole weight.
    const float* wp = split_w.data_ptr<float>();

    // The per-tile outputs; the fused readout never needs them, so they are made (and zeroed, 4 bytes per
    // tile x vector x output) only when the general epilogue runs.
    float* pp = nullptr;
    const auto make_partial = [&]() {
      if (pp != nullptr) return;
      partial = return_partial ? at::zeros({T, B, N}, f32) : scratch(workspace.partial, {T, B, N}, true);
      pp = partial.data_ptr<float>();
    };
    std::vector<uint8_t> over(T * B * n_ot, 0);
    std::vector<std::vector<int64_t>> rows(T);

    // The vector in compact row j of tile t this round, or -1 when there is none or nothing of it is pending.
    const auto live_row = [&](int64_t t, int64_t j) -> int64_t {
      if (j >= static_cast<int64_t>(rows[t].size())) return -1;
      const int64_t b = rows[t][j];
      const uint8_t* pend = pending.data() + (t * B + b) * n_ot;
      return std::any_of(pend, pend + n_ot, [](uint8_t u) { return u != 0; }) ? b : -1;
    };
    for (int round = 0; round < io.max_rounds; ++round) {
      const float reduction = static_cast<float>(std::ldexp(1.0, round));
      // Rows of this round per tile: all of them first, then the pairs whose output tile clipped.
      int64_t M = 0;
      for (int64_t t = 0; t < T; ++t) {
        rows[t].clear();
        for (int64_t b = 0; b < B; ++b) {
          const uint8_t* pend = pending.data() + (t * B + b) * n_ot;
          if (round == 0 || std::any_of(pend, pend + n_ot, [](uint8_t v) { return v != 0; })) rows[t].push_back(b);
        }
        M = std::max<int64_t>(M, static_cast<int64_t>(rows[t].size()));
      }
      if (M == 0) break;
      const uint64_t counter = mvm_counter(noise.call_index, round, noise.readout);

      // ---- drift-compensation readout, fused: the probes' own inputs --------------------------------
      // Probe j of tile t is one-hot at j, so the DAC is needed at that position only (every other input
      // must quantize to 0, which is checked); no [T, probes, n_max] operand is built.
      struct Diag {
        float x = 0.0f, x_gain = 0.0f, x_abs = 0.0f, x_sq = 0.0f, norm = 0.0f;
      };
      std::vector<Diag> diag;
      if (round == 0 && probes && output == kOutputProbeMean) {
        diag.resize(T * M);
        int violation = 0;
        const float lo = -io.inp_bound, hi = io.inp_bound;
#pragma omp parallel for collapse(2) num_threads(nt) schedule(static) reduction(| : violation)
        for (int64_t t = 0; t < T; ++t) {
          for (int64_t j = 0; j < M; ++j) {
            const int64_t b = live_row(t, j);
            if (b < 0) continue;  // no such row in this round, or nothing of it pending (dead rows stay 0)
            const float input_scale = (1.0f / safe_scale[t * B + b]) / reduction;
            const float* src = xp + b * K + in_off[t];
            const auto dac = [&](float value) {
              return std::min(std::max(quantize(value * input_scale, io.inp_step), lo), hi);
            };
            for (int64_t k = 0; k < in_sizes[t]; ++k) {
              if (k != b && src[k] != 0.0f) violation |= static_cast<int>(dac(src[k]) != 0.0f);
            }
            if (b >= in_sizes[t]) continue;
            Diag& d = diag[t * M + j];
            d.x = dac(src[b]);
            d.x_gain = ir ? d.x * ir_gain[t * nmax + b] : 0.0f;
            d.x_abs = std::fabs(d.x);
            d.x_sq = d.x * d.x;
            d.norm = std::sqrt(0.0f + d.x * d.x);
          }
        }
        check(violation == 0, "probes mode: an input row is not one-hot at its own position");

        // Probe j of tile t is x' e_j, so its outputs are x' times weight column j: the kernel reads the
        // column, runs the epilogue and adds |output| to the column means, block by block of outputs,
        // without the [T, probes, out] products and partial outputs (64 MB of traffic for 2048x2048).
        // Same operations as the general path below; that path takes over if a probe clips under
        // iterative bound management (another round would be needed).
        at::Tensor means = at::zeros({T, N}, f32);
        float* mp = means.data_ptr<float>();
        constexpr int64_t kBlock = 256;
        const int64_t n_blocks = (N + kBlock - 1) / kBlock;
        const uint64_t w_seed = w_noise ? stream_seed(noise.chip_key, kWNoise, counter) : 0;
        const uint64_t o_seed = out_noise ? stream_seed(noise.chip_key, kOutNoise, counter) : 0;
        int any_clip = 0;
#pragma omp parallel num_threads(nt) reduction(| : any_clip)
        {
          std::vector<float> wt(kBlock * nmax), nw(kBlock), no(kBlock);
#pragma omp for collapse(2) schedule(static)
          for (int64_t t = 0; t < T; ++t) {
            for (int64_t blk = 0; blk < n_blocks; ++blk) {
              const int64_t c0 = blk * kBlock, cb = std::min(N, c0 + kBlock) - c0;
              float* acc = mp + t * N + c0;
              // The block's weights transposed (column j contiguous), in 8 x 8 squares: the probes then read
              // contiguous columns instead of one cache line per weight.
              const int64_t size_t_ = in_sizes[t];
              for (int64_t c8 = 0; c8 < cb; c8 += 8) {
                for (int64_t j8 = 0; j8 < size_t_; j8 += 8) {
                  const int64_t ce = std::min<int64_t>(c8 + 8, cb), je = std::min<int64_t>(j8 + 8, size_t_);
                  if (ce - c8 == 8 && je - j8 == 8) {
                    const float* src = whole ? wp + (c0 + c8) * K + in_off[t] + j8 : wp + (t * N + c0 + c8) * nmax + j8;
                    transpose8x8(src, ld, wt.data() + j8 * kBlock + c8, kBlock);
                    continue;
                  }
                  for (int64_t c = c8; c < ce; ++c) {
                    const float* src = whole ? wp + (c0 + c) * K + in_off[t] : wp + (t * N + c0 + c) * nmax;
                    for (int64_t j = j8; j < je; ++j) wt[j * kBlock + c] = src[j];
                  }
                }
              }
              for (int64_t j = 0; j < in_sizes[t]; ++j) {
                const int64_t b = j;  // round 0: compact row j is probe j
                const uint8_t* pend = pending.data() + (t * B + b) * n_ot;
                if (std::none_of(pend, pend + n_ot, [](uint8_t u) { return u != 0; })) continue;  // adds |0|
                const float input_scale = (1.0f / safe_scale[t * B + b]) / reduction;
                const float* col = wt.data() + b * kBlock;
                const Diag& d = diag[t * M + j];
                const float x0 = d.x, xg = d.x_gain, xabs = d.x_abs, xsq = d.x_sq;
                const float ratio = ir ? ir_size_ratio[t] : 0.0f;
                const float sd = (w_noise && !pcm_read) ? io.w_noise * d.norm : 0.0f;
                const int64_t start = (rid[b] * T + t) * N + c0;
                if (w_noise) philox::philox_fill_normal(w_seed, start, cb, nw.data(), 1);
                if (out_noise) philox::philox_fill_normal(o_seed, start, cb, no.data(), 1);
                const bool clip = io.out_bound > 0.0f;
                const float bound = io.out_bound, step = io.out_step;
                int hit = 0;
                // The epilogue of one output, in the general path's order (one pass instead of one per step).
                const auto one = [&](int64_t c) {
                  float u = x0 * col[c];
                  if (ir) {
                    const float a = (xabs * std::fabs(col[c])) * ratio;
                    const float cc = a * (a * (0.05f * a - 0.2f) + 0.5f);
                    u = u - cc * io.ir_drop * (xg * col[c]);
                  }
                  if (pcm_read) {
                    u = u + (io.w_noise * std::sqrt(xsq * std::fabs(col[c]))) * nw[c];
                  } else if (w_noise) {
                    u = u + sd * nw[c];
                  }
                  if (out_noise) u = u + io.out_noise * no[c];
                  u = quantize(u, step);
                  if (clip) {
                    hit |= static_cast<int>(u > bound) | static_cast<int>(io.bm_test_negative && u < -bound);
                    u = std::min(std::max(u, -bound), bound);
                  }
                  acc[c] = acc[c] + std::fabs(u / input_scale);
                };
                int64_t c = 0;
#if defined(__AVX2__)
                {
                  const __m256 sign = _mm256_set1_ps(-0.0f);
                  const __m256 vx0 = _mm256_set1_ps(x0), vxg = _mm256_set1_ps(xg), vxabs = _mm256_set1_ps(xabs);
                  const __m256 vxsq = _mm256_set1_ps(xsq), vratio = _mm256_set1_ps(ratio);
                  const __m256 vir = _mm256_set1_ps(io.ir_drop), vwn = _mm256_set1_ps(io.w_noise);
                  const __m256 vsd = _mm256_set1_ps(sd), von = _mm256_set1_ps(io.out_noise);
                  const __m256 vstep = _mm256_set1_ps(step), vhi = _mm256_set1_ps(bound);
                  const __m256 vlo = _mm256_set1_ps(-bound), vin = _mm256_set1_ps(input_scale);
                  const __m256 k005 = _mm256_set1_ps(0.05f), k02 = _mm256_set1_ps(0.2f), k05 = _mm256_set1_ps(0.5f);
                  for (; c + 8 <= cb; c += 8) {
                    const __m256 w8 = _mm256_loadu_ps(col + c);
                    __m256 u = _mm256_mul_ps(vx0, w8);
                    if (ir) {
                      const __m256 a = _mm256_mul_ps(_mm256_mul_ps(vxabs, _mm256_andnot_ps(sign, w8)), vratio);
                      const __m256 inner = _mm256_add_ps(_mm256_mul_ps(a, _mm256_sub_ps(_mm256_mul_ps(k005, a), k02)), k05);
                      const __m256 cc = _mm256_mul_ps(a, inner);
                      u = _mm256_sub_ps(u, _mm256_mul_ps(_mm256_mul_ps(cc, vir), _mm256_mul_ps(vxg, w8)));
                    }
                    if (pcm_read) {
                      const __m256 sdv = _mm256_mul_ps(vwn, _mm256_sqrt_ps(_mm256_mul_ps(vxsq, _mm256_andnot_ps(sign, w8))));
                      u = _mm256_add_ps(u, _mm256_mul_ps(sdv, _mm256_loadu_ps(nw.data() + c)));
                    } else if (w_noise) {
                      u = _mm256_add_ps(u, _mm256_mul_ps(vsd, _mm256_loadu_ps(nw.data() + c)));
                    }
                    if (out_noise) u = _mm256_add_ps(u, _mm256_mul_ps(von, _mm256_loadu_ps(no.data() + c)));
                    if (step > 0.0f) {
                      const __m256 q = _mm256_round_ps(_mm256_div_ps(u, vstep), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                      u = _mm256_mul_ps(q, vstep);
                    }
                    if (clip) {
                      int mask = _mm256_movemask_ps(_mm256_cmp_ps(u, vhi, _CMP_GT_OQ));
                      if (io.bm_test_negative) mask |= _mm256_movemask_ps(_mm256_cmp_ps(u, vlo, _CMP_LT_OQ));
                      hit |= static_cast<int>(mask != 0);
                      u = _mm256_min_ps(_mm256_max_ps(u, vlo), vhi);
                    }
                    const __m256 contribution = _mm256_andnot_ps(sign, _mm256_div_ps(u, vin));
                    _mm256_storeu_ps(acc + c, _mm256_add_ps(_mm256_loadu_ps(acc + c), contribution));
                  }
                }
#endif
                for (; c < cb; ++c) one(c);
                any_clip |= hit;
              }
              const float count = static_cast<float>(in_sizes[t]);
              for (int64_t c = 0; c < cb; ++c) acc[c] = acc[c] / count;
            }
          }
        }
        if (!(io.iterative && any_clip)) return means;
        // a probe clipped: bound management continues on the general path below
      }

      // ---- prologue: DAC (+ input noise) and the extra operands ---------------------------------
      at::Tensor xa = scratch(workspace.xa, {T, na * M, nmax}, true);
      at::Tensor xb = nb > 0 ? scratch(workspace.xb, {T, nb * M, nmax}, true) : at::Tensor();
      std::vector<float> norm(T * M, 0.0f);
      float* xap = xa.data_ptr<float>();
      float* xbp = nb > 0 ? xb.data_ptr<float>() : nullptr;
      const uint64_t inp_seed = inp_noise ? stream_seed(noise.chip_key, kInpNoise, counter) : 0;
      bool probe_violation = false;
#pragma omp parallel num_threads(nt) reduction(|| : probe_violation)
      {
        std::vector<float> xi(inp_noise ? nmax : 0);
#pragma omp for collapse(2) schedule(static)
        for (int64_t t = 0; t < T; ++t) {
          for (int64_t j = 0; j < M; ++j) {
            const int64_t b = live_row(t, j);
            if (b < 0) continue;  // no such row in this round, or nothing of it pending (dead rows stay 0)
            const int64_t size = in_sizes[t];
            const float input_scale = (1.0f / safe_scale[t * B + b]) / reduction;
            const float* src = xp + b * K + in_off[t];
            float* dst = xap + (t * na * M + j) * nmax;
            if (inp_noise) philox::philox_fill_normal(inp_seed, rid[b] * K + in_off[t], size, xi.data(), 1);
            for (int64_t k = 0; k < size; ++k) dst[k] = src[k] * input_scale;
            quantize_inplace(dst, size, io.inp_step);
            const float lo = -io.inp_bound, hi = io.inp_bound;
            for (int64_t k = 0; k < size; ++k) dst[k] = std::min(std::max(dst[k], lo), hi);
            if (inp_noise) {
              for (int64_t k = 0; k < size; ++k) dst[k] = dst[k] + io.inp_noise * xi[k];
            }
            if (probes) {
              for (int64_t k = 0; k < size; ++k) probe_violation |= (k != b && dst[k] != 0.0f);
            }
            if (w_noise && !pcm_read) {
              float sq = 0.0f;
              for (int64_t k = 0; k < size; ++k) sq += dst[k] * dst[k];
              norm[t * M + j] = std::sqrt(sq);
            }
            if (ir) {
              float* g = xap + (t * na * M + M + j) * nmax;
              const float* gain = ir_gain.data() + t * nmax;
              for (int64_t k = 0; k < size; ++k) g[k] = dst[k] * gain[k];
            }
            if (nb > 0) {
              float* blk = xbp + (t * nb * M + j) * nmax;
              if (ir) {
                for (int64_t k = 0; k < size; ++k) blk[k] = std::fabs(dst[k]);
                blk += M * nmax;
              }
              if (pcm_read) {
                for (int64_t k = 0; k < size; ++k) blk[k] = dst[k] * dst[k];
              }
            }
          }
        }
      }
      check(!probe_violation, "probes mode: an input row is not one-hot at its own position");

      // ---- products -------------------------------------------------------------------------------
      at::Tensor za, zb;
      if (!probes && M <= kFewRows) {
        za = scratch(workspace.za, {T, na * M, N}, false);
        if (nb > 0) zb = scratch(workspace.zb, {T, nb * M, N}, false);
        few_rows_products(wp, w_base, ld, T, N, nmax, in_sizes, xap, na, xbp, nb, M, rows, za.data_ptr<float>(),
                          nb > 0 ? zb.data_ptr<float>() : nullptr, threads(T * N * nmax * M / 32));  // ~32 flops per element
      } else if (!probes) {
        za = scratch(workspace.za, {T, na * M, N}, false);
        if (nb > 0) zb = scratch(workspace.zb, {T, nb * M, N}, false);
        if (!w_t.defined()) {
          for (int64_t t = 0; t < T; ++t) {
            at::Tensor za_t = za.select(0, t);
            at::mm_out(za_t, xa.select(0, t).narrow(1, 0, in_sizes[t]), tile_t(t));
            if (nb > 0) {
              at::Tensor zb_t = zb.select(0, t);
              const at::Tensor abs_tile = tile_t(t).abs();  // [size, N] temporary of one tile
              at::mm_out(zb_t, xb.select(0, t).narrow(1, 0, in_sizes[t]), abs_tile);
            }
          }
        } else {
          at::bmm_out(za, xa, w_t);
          if (nb > 0) {  // |W|: a temporary of this call (the whole weight's |w|, viewed as its tiles)
            const at::Tensor abs_w = whole ? tiles_view(w.abs()) : (abs_split_w.has_value() ? *abs_split_w : split_w.abs());
            at::bmm_out(zb, xb, abs_w.transpose(1, 2));
          }
        }
      } else {
        // Row j of tile t is v e_b: every product is v times one weight column, exactly as in the GEMM.
        // The columns are read in blocks of kProbeBlock weight rows so each cache line serves 16 probes.
        constexpr int64_t kProbeBlock = 64;
        za = scratch(workspace.za, {T, na * M, N}, false);
        if (nb > 0) zb = scratch(workspace.zb, {T, nb * M, N}, false);
        float* zap = za.data_ptr<float>();
        float* zbp = nb > 0 ? zb.data_ptr<float>() : nullptr;
        const int64_t n_blocks = (N + kProbeBlock - 1) / kProbeBlock;
#pragma omp parallel for num_threads(nt) collapse(2) schedule(static)
        for (int64_t t = 0; t < T; ++t) {
          for (int64_t blk = 0; blk < n_blocks; ++blk) {
            const int64_t c0 = blk * kProbeBlock, c1 = std::min(N, c0 + kProbeBlock);
            const int64_t used = static_cast<int64_t>(rows[t].size());
            for (int64_t j = 0; j < M; ++j) {
              const int64_t b = j < used ? rows[t][j] : -1;
              const bool live = b >= 0 && b < in_sizes[t];
              for (int a = 0; a < na + nb; ++a) {
                const bool is_a = a < na;
                const int64_t r = is_a ? t * na * M + a * M + j : t * nb * M + (a - na) * M + j;
                float* out = (is_a ? zap : zbp) + r * N;
                if (!live) {
                  std::fill(out + c0, out + c1, 0.0f);
                  continue;
                }
                const float v = (is_a ? xap : xbp)[r * nmax + b];
                const float* col = wp + w_base[t] + b;
                if (is_a) {
                  for (int64_t c = c0; c < c1; ++c) out[c] = v * col[c * ld];
                } else {
                  for (int64_t c = c0; c < c1; ++c) out[c] = v * std::fabs(col[c * ld]);
                }
              }
            }
          }
        }
      }
      const float* zap = za.data_ptr<float>();
      const float* zbp = nb > 0 ? zb.data_ptr<float>() : nullptr;

      make_partial();
      // ---- epilogue -------------------------------------------------------------------------------
      const uint64_t w_seed = w_noise ? stream_seed(noise.chip_key, kWNoise, counter) : 0;
      const uint64_t o_seed = out_noise ? stream_seed(noise.chip_key, kOutNoise, counter) : 0;
      const bool clip = io.out_bound > 0.0f;
#pragma omp parallel num_threads(nt)
      {
        std::vector<float> nw(w_noise ? N : 0), no(out_noise ? N : 0), row(N);
#pragma omp for collapse(2) schedule(static)
        for (int64_t t = 0; t < T; ++t) {
          for (int64_t j = 0; j < M; ++j) {
            const int64_t b = live_row(t, j);
            if (b < 0) continue;
            const uint8_t* pend = pending.data() + (t * B + b) * n_ot;
            uint8_t* ov = over.data() + (t * B + b) * n_ot;
            std::fill_n(ov, n_ot, 0);
            const float input_scale = (1.0f / safe_scale[t * B + b]) / reduction;
            const int64_t start = (rid[b] * T + t) * N;
            if (w_noise) philox::philox_fill_normal(w_seed, start, N, nw.data(), 1);
            if (out_noise) philox::philox_fill_normal(o_seed, start, N, no.data(), 1);
            const float* z = zap + (t * na * M + j) * N;
            const float* weighted = ir ? zap + (t * na * M + M + j) * N : nullptr;
            const float* current = ir ? zbp + (t * nb * M + j) * N : nullptr;
            const float* var = pcm_read ? zbp + (t * nb * M + (ir ? M : 0) + j) * N : nullptr;
            const float std_add = (w_noise && !pcm_read) ? io.w_noise * norm[t * M + j] : 0.0f;
            // One pass per step over the row (each a simple loop GCC vectorises), in the reference's order.
            float* v = row.data();
            std::copy_n(z, N, v);
            if (ir) {
              const float ratio = ir_size_ratio[t];
              for (int64_t c = 0; c < N; ++c) {
                const float a = current[c] * ratio;
                const float cc = a * (a * (0.05f * a - 0.2f) + 0.5f);
                v[c] = v[c] - cc * io.ir_drop * weighted[c];
              }
            }
            if (pcm_read) {
              for (int64_t c = 0; c < N; ++c) v[c] = v[c] + (io.w_noise * std::sqrt(var[c])) * nw[c];
            } else if (w_noise) {
              for (int64_t c = 0; c < N; ++c) v[c] = v[c] + std_add * nw[c];
            }
            if (out_noise) {
              for (int64_t c = 0; c < N; ++c) v[c] = v[c] + io.out_noise * no[c];
            }
            quantize_inplace(v, N, io.out_step);
            float* dst = pp + (t * B + b) * N;
            int64_t c0 = 0;
            for (int64_t o = 0; o < n_ot; c0 += out_sizes[o], ++o) {
              const int64_t c1 = c0 + out_sizes[o];
              if (!pend[o]) continue;
              if (clip) {
                const float bound = io.out_bound;
                int hit = 0;
                if (io.bm_test_negative) {
                  for (int64_t c = c0; c < c1; ++c) hit |= static_cast<int>(v[c] > bound) | static_cast<int>(v[c] < -bound);
                } else {
                  for (int64_t c = c0; c < c1; ++c) hit |= static_cast<int>(v[c] > bound);
                }
                ov[o] = static_cast<uint8_t>(hit != 0);
                for (int64_t c = c0; c < c1; ++c) v[c] = std::min(std::max(v[c], -bound), bound);
              }
              for (int64_t c = c0; c < c1; ++c) dst[c] = v[c] / input_scale;
            }
          }
        }
      }

      if (!io.iterative) break;
      const double red = std::ldexp(1.0, round);
      if (red > io.max_bm_factor || (io.inp_step_exact > 0.0 && red > io.max_bm_res / io.inp_step_exact)) break;
      bool any = false;
      for (size_t i = 0; i < pending.size(); ++i) {
        pending[i] = pending[i] && over[i];
        any |= pending[i] != 0;
      }
      if (!any) break;
    }
    make_partial();  // an empty batch never reached the epilogue
  }

  // ---- digital part: out_scale, sum over input tiles, bias; NaN rows --------------------------------
  float* pp = partial.data_ptr<float>();
  const bool any_bad = std::any_of(bad.begin(), bad.end(), [](uint8_t v) { return v != 0; });
  if (output == kOutputProbeMean) {
    // Mean over each tile's probes b < in_sizes[t] of |partial[t, b, c]|, summed in order of b.
    at::Tensor means = at::zeros({T, N}, f32);
    float* mp = means.data_ptr<float>();
    constexpr int64_t kBlock = 256;
    const int64_t blocks = (N + kBlock - 1) / kBlock;
#pragma omp parallel for collapse(2) num_threads(nt) schedule(static)
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t c0 = blk * kBlock, c1 = std::min(N, c0 + kBlock);
        float* acc = mp + t * N;
        for (int64_t b = 0; b < in_sizes[t]; ++b) {
          const float* row = pp + (t * B + b) * N;
          for (int64_t c = c0; c < c1; ++c) acc[c] = acc[c] + std::fabs(row[c]);
        }
        const float count = static_cast<float>(in_sizes[t]);
        for (int64_t c = c0; c < c1; ++c) acc[c] = acc[c] / count;
      }
    }
    return means;
  }
  if (return_partial) {
    if (any_bad) {
      for (int64_t t = 0; t < T; ++t)
        for (int64_t b = 0; b < B; ++b)
          if (bad[b]) std::fill_n(pp + (t * B + b) * N, N, std::numeric_limits<float>::quiet_NaN());
    }
    return partial;
  }
  at::Tensor y = at::empty({B, N}, f32);
  float* yp = y.data_ptr<float>();
  const float* sp = out_scale->data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    float* yr = yp + b * N;
    if (bad[b]) {
      std::fill_n(yr, N, std::numeric_limits<float>::quiet_NaN());
      continue;
    }
    const float* p0 = pp + b * N;
    for (int64_t c = 0; c < N; ++c) yr[c] = p0[c] * sp[c];
    for (int64_t t = 1; t < T; ++t) {
      const float* pt = pp + (t * B + b) * N;
      const float* st = sp + t * N;
      for (int64_t c = 0; c < N; ++c) yr[c] = yr[c] + pt[c] * st[c];
    }
    if (bp != nullptr) {
      for (int64_t c = 0; c < N; ++c) yr[c] = yr[c] + bp[c];
    }
  }
  return y;
}

}  // namespace mvm
}  // namespace romer
