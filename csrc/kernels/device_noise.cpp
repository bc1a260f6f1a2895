// Fused device-noise kernels; see device_noise.h. The element-wise code mirrors
// romer_kernels/noise/pcm.py (PCMNoiseModel.program / .read, HERMES through PieceFit / ReadQ) and
// romer_kernels/noise/gaussian.py, operation by operation, in float32.
#include "kernels/device_noise.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "core/philox.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

#include <type_traits>

namespace romer {
namespace noise {
namespace {

// Elements per work item (whole rows; at least one row). Eight float buffers of this size stay in L2.
constexpr int64_t kItemElements = 4096;

// ------------------------------------------------------------------------------------------------
// ln and exp in double precision, rounded once to float32: the reference helpers log_f32 / pow_f32 (tests).
// The kernels use the float32 log8f / exp8f below (a quarter of the cost; a few ulp instead of 0.5 ulp).
// ------------------------------------------------------------------------------------------------
constexpr double kLn2 = 0.69314718055994530942;
constexpr double kLog2e = 1.4426950408889634074;
constexpr double kLn2Hi = 0x1.62e42fefa39efp-1;   // double(ln 2)
constexpr double kLn2Lo = 0x1.abc9e3b39803fp-56;  // ln 2 - kLn2Hi
constexpr double kShifter = 0x1.8p52;             // (y + S) - S = rint(y); low bits of y + S hold rint(y)
// The results are rounded to float32 (2^-24), so about 1e-11 relative accuracy suffices for a correctly
// rounded result in all but a vanishing fraction of cases.
// 2 atanh(s) = s * (2 + 2/3 z + 2/5 z^2 + ...), z = s^2, |s| <= 3 - 2 sqrt(2): truncation below 2e-12.
constexpr int kAtanhTerms = 7;
constexpr double kAtanh[kAtanhTerms] = {2.0, 2.0 / 3, 2.0 / 5, 2.0 / 7, 2.0 / 9, 2.0 / 11, 2.0 / 13};
// exp(r) Taylor coefficients 1/k!, |r| <= ln(2)/2: truncation below 1e-11.
constexpr int kExpTerms = 10;
constexpr double kExp[kExpTerms] = {1.0,       1.0,        1.0 / 2,     1.0 / 6,      1.0 / 24,
                                    1.0 / 120, 1.0 / 720,  1.0 / 5040,  1.0 / 40320,  1.0 / 362880};
constexpr double kExpMin = -708.0;  // exp(-708) is a normal double; float32 rounds it to 0
constexpr double kExpMax = 709.0;

#if ROMER_PHILOX_HAVE_AVX2
inline __m256d lo_pd(__m256 x) { return _mm256_cvtps_pd(_mm256_castps256_ps128(x)); }
inline __m256d hi_pd(__m256 x) { return _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)); }
inline __m256d lo_mask(__m256i m) { return _mm256_castsi256_pd(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(m))); }
inline __m256d hi_mask(__m256i m) { return _mm256_castsi256_pd(_mm256_cvtepi32_epi64(_mm256_extracti128_si256(m, 1))); }
inline __m256 join(__m256d lo, __m256d hi) { return _mm256_set_m128(_mm256_cvtpd_ps(hi), _mm256_cvtpd_ps(lo)); }

// e ln 2 + ln(1 + f) for f = m - 1, m in [sqrt(1/2), sqrt(2)); lanes where `zero` is set give -inf.
inline __m256d log_core(__m256d f, __m256d e, __m256d zero) {
  const __m256d s = _mm256_div_pd(f, _mm256_add_pd(_mm256_set1_pd(2.0), f));
  const __m256d z = _mm256_mul_pd(s, s);
  __m256d r = _mm256_set1_pd(kAtanh[kAtanhTerms - 1]);
  for (int k = kAtanhTerms - 2; k >= 0; --k) r = _mm256_fmadd_pd(r, z, _mm256_set1_pd(kAtanh[k]));
  const __m256d v = _mm256_fmadd_pd(e, _mm256_set1_pd(kLn2), _mm256_mul_pd(s, r));
  return _mm256_blendv_pd(v, _mm256_set1_pd(-std::numeric_limits<double>::infinity()), zero);
}

// ln of 8 floats >= 0 (subnormals scaled first; 0 -> -inf), as two double vectors (lanes 0-3, 4-7).
inline void log8(__m256 x, __m256d& lo, __m256d& hi) {
  const __m256 sub = _mm256_cmp_ps(x, _mm256_set1_ps(FLT_MIN), _CMP_LT_OQ);
  const __m256 xs = _mm256_blendv_ps(x, _mm256_mul_ps(x, _mm256_set1_ps(8388608.0f)), sub);
  const __m256i ix = _mm256_castps_si256(xs);
  const __m256i e = _mm256_srai_epi32(_mm256_sub_epi32(ix, _mm256_set1_epi32(0x3f3504f3)), 23);
  const __m256 m = _mm256_castsi256_ps(_mm256_sub_epi32(ix, _mm256_slli_epi32(e, 23)));
  const __m256 f = _mm256_sub_ps(m, _mm256_set1_ps(1.0f));  // exact (Sterbenz)
  const __m256i et = _mm256_add_epi32(e, _mm256_and_si256(_mm256_castps_si256(sub), _mm256_set1_epi32(-23)));
  const __m256i zero = _mm256_castps_si256(_mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_EQ_OQ));
  lo = log_core(lo_pd(f), _mm256_cvtepi32_pd(_mm256_castsi256_si128(et)), lo_mask(zero));
  hi = log_core(hi_pd(f), _mm256_cvtepi32_pd(_mm256_extracti128_si256(et, 1)), hi_mask(zero));
}

inline __m256d exp4(__m256d y) {
  y = _mm256_min_pd(_mm256_max_pd(y, _mm256_set1_pd(kExpMin)), _mm256_set1_pd(kExpMax));
  const __m256d shifter = _mm256_set1_pd(kShifter);
  const __m256d kd_shifted = _mm256_fmadd_pd(y, _mm256_set1_pd(kLog2e), shifter);
  const __m256d kd = _mm256_sub_pd(kd_shifted, shifter);
  __m256d r = _mm256_fnmadd_pd(kd, _mm256_set1_pd(kLn2Hi), y);
  r = _mm256_fnmadd_pd(kd, _mm256_set1_pd(kLn2Lo), r);
  __m256d p = _mm256_set1_pd(kExp[kExpTerms - 1]);
  for (int k = kExpTerms - 2; k >= 0; --k) p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(kExp[k]));
  const __m256i bits = _mm256_slli_epi64(
      _mm256_add_epi64(_mm256_castpd_si256(kd_shifted), _mm256_set1_epi64x(1023)), 52);
  return _mm256_mul_pd(p, _mm256_castsi256_pd(bits));
}

// ---- float32 ln / exp (the kernels' element-wise maths) ----------------------------------------
// Cephes-style single-precision polynomials with explicit FMA: ln within about 1.5 ulp, exp within about
// 1 ulp (x^e = exp(e ln x) then within a few ulp of |e ln x|). Their results differ from the double
// versions above (and from torch's float32 vector maths) by a few ulp, far inside the 1e-5 the torch
// path is tested against; they cost a quarter of the double versions (no division, eight lanes).
constexpr float kLogP[9] = {7.0376836292e-2f, -1.1514610310e-1f, 1.1676998740e-1f, -1.2420140846e-1f,
                            1.4249322787e-1f, -1.6668057665e-1f, 2.0000714765e-1f, -2.4999993993e-1f,
                            3.3333331174e-1f};
constexpr float kLn2HiF = 0.693359375f;      // ln 2 = kLn2HiF + kLn2LoF (kLn2HiF has 10 bits)
constexpr float kLn2LoF = -2.12194440e-4f;
constexpr float kExpP[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f,
                            1.6666665459e-1f, 5.0000001201e-1f};

// ln of 8 floats >= 0 (subnormals scaled first; 0 -> -inf; NaN -> NaN).
inline __m256 log8f(__m256 x) {
  const __m256 sub = _mm256_cmp_ps(x, _mm256_set1_ps(FLT_MIN), _CMP_LT_OQ);
  const __m256 xs = _mm256_blendv_ps(x, _mm256_mul_ps(x, _mm256_set1_ps(8388608.0f)), sub);
  const __m256i ix = _mm256_castps_si256(xs);
  const __m256i e = _mm256_srai_epi32(_mm256_sub_epi32(ix, _mm256_set1_epi32(0x3f3504f3)), 23);
  const __m256 m = _mm256_castsi256_ps(_mm256_sub_epi32(ix, _mm256_slli_epi32(e, 23)));
  const __m256 f = _mm256_sub_ps(m, _mm256_set1_ps(1.0f));  // exact, in [sqrt(1/2) - 1, sqrt(2) - 1)
  const __m256 ef = _mm256_cvtepi32_ps(
      _mm256_add_epi32(e, _mm256_and_si256(_mm256_castps_si256(sub), _mm256_set1_epi32(-23))));
  const __m256 z = _mm256_mul_ps(f, f);
  // P(f) = sum kLogP[k] f^(8-k) by Estrin's scheme (short dependency chains)
  const __m256 z2 = _mm256_mul_ps(z, z), z4 = _mm256_mul_ps(z2, z2);
  const __m256 a0 = _mm256_fmadd_ps(_mm256_set1_ps(kLogP[7]), f, _mm256_set1_ps(kLogP[8]));
  const __m256 a1 = _mm256_fmadd_ps(_mm256_set1_ps(kLogP[5]), f, _mm256_set1_ps(kLogP[6]));
  const __m256 a2 = _mm256_fmadd_ps(_mm256_set1_ps(kLogP[3]), f, _mm256_set1_ps(kLogP[4]));
  const __m256 a3 = _mm256_fmadd_ps(_mm256_set1_ps(kLogP[1]), f, _mm256_set1_ps(kLogP[2]));
  const __m256 b0 = _mm256_fmadd_ps(a1, z, a0), b1 = _mm256_fmadd_ps(a3, z, a2);
  const __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(kLogP[0]), z4, _mm256_fmadd_ps(b1, z2, b0));
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, f), z);
  y = _mm256_fmadd_ps(ef, _mm256_set1_ps(kLn2LoF), y);
  y = _mm256_fnmadd_ps(z, _mm256_set1_ps(0.5f), y);
  __m256 r = _mm256_add_ps(f, y);
  r = _mm256_fmadd_ps(ef, _mm256_set1_ps(kLn2HiF), r);
  r = _mm256_blendv_ps(r, _mm256_set1_ps(-std::numeric_limits<float>::infinity()),
                       _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_EQ_OQ));
  return _mm256_blendv_ps(r, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));  // NaN stays NaN
}

// exp of 8 floats: 0 below about -104, +inf above about 88.7, NaN -> NaN; subnormal results through a
// two-step scaling by 2^n.
inline __m256 exp8f(__m256 y) {
  const __m256 nan = _mm256_cmp_ps(y, y, _CMP_UNORD_Q);
  const __m256 yc = _mm256_min_ps(_mm256_max_ps(y, _mm256_set1_ps(-110.0f)), _mm256_set1_ps(100.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(yc, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2HiF), yc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2LoF), r);
  const __m256 z = _mm256_mul_ps(r, r);
  __m256 p = _mm256_set1_ps(kExpP[0]);
  for (int k = 1; k < 6; ++k) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP[k]));
  p = _mm256_add_ps(_mm256_fmadd_ps(p, z, r), _mm256_set1_ps(1.0f));
  const __m256i ni = _mm256_cvtps_epi32(n);                 // in [-159, 145]
  const __m256i n1 = _mm256_srai_epi32(ni, 1);
  const __m256i n2 = _mm256_sub_epi32(ni, n1);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, _mm256_set1_epi32(127)), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, _mm256_set1_epi32(127)), 23));
  return _mm256_blendv_ps(_mm256_mul_ps(_mm256_mul_ps(p, s1), s2), y, nan);
}

// Apply `op(lo, hi) -> __m256` to x[0..n) in blocks of 8 (the tail through a padded copy).
template <class Op>
inline void map8(const float* x, float* out, int64_t n, float pad, Op op) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, op(_mm256_loadu_ps(x + i)));
  if (i < n) {
    alignas(32) float tmp[8];
    for (int k = 0; k < 8; ++k) tmp[k] = i + k < n ? x[i + k] : pad;
    _mm256_store_ps(tmp, op(_mm256_load_ps(tmp)));
    for (int64_t k = 0; i + k < n; ++k) out[i + k] = tmp[k];
  }
}
#endif

inline double log_scalar(float x) { return x == 0.0f ? -std::numeric_limits<double>::infinity() : std::log(double(x)); }
inline double exp_scalar(double y) { return std::exp(std::min(std::max(y, kExpMin), kExpMax)); }

// out = base^-nu = exp(nu * -ln(base)), the product rounded to float32, exp in float32.
void neg_pow_base(const float* nu, double ln_base, float* out, int64_t n) {
  const float c = static_cast<float>(-ln_base);
#if ROMER_PHILOX_HAVE_AVX2
  const __m256 cv = _mm256_set1_ps(c);
  map8(nu, out, n, 0.0f, [&](__m256 v) { return exp8f(_mm256_mul_ps(v, cv)); });
#else
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(exp_scalar(double(nu[i] * c)));
#endif
}

// The kernels' ln and x^e (float32 maths above; double and rounded where AVX2 is missing).
void log_span(const float* x, float* out, int64_t n) {
#if ROMER_PHILOX_HAVE_AVX2
  map8(x, out, n, 1.0f, [](__m256 v) { return log8f(v); });
#else
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(log_scalar(x[i]));
#endif
}

void pow_span(const float* x, float exponent, float* out, int64_t n) {
#if ROMER_PHILOX_HAVE_AVX2
  const __m256 ev = _mm256_set1_ps(exponent);
  map8(x, out, n, 1.0f, [&](__m256 v) { return exp8f(_mm256_mul_ps(log8f(v), ev)); });
#else
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(exp_scalar(double(static_cast<float>(log_scalar(x[i])) * exponent)));
#endif
}

// ------------------------------------------------------------------------------------------------
// Grid and work items
// ------------------------------------------------------------------------------------------------
std::vector<int64_t> bounds_of(const std::vector<int64_t>& sizes) {
  std::vector<int64_t> b(sizes.size() + 1, 0);
  for (size_t i = 0; i < sizes.size(); ++i) b[i + 1] = b[i] + sizes[i];
  return b;
}

std::vector<int32_t> row_tiles(const std::vector<int64_t>& out_sizes, int64_t rows) {
  std::vector<int32_t> t(static_cast<size_t>(rows));
  int64_t r = 0;
  for (size_t k = 0; k < out_sizes.size(); ++k)
    for (int64_t i = 0; i < out_sizes[k] && r < rows; ++i) t[static_cast<size_t>(r++)] = static_cast<int32_t>(k);
  return t;
}

int resolve_threads(int num_threads, int64_t items) {
#if defined(_OPENMP)
  const int t = num_threads > 0 ? num_threads : omp_get_max_threads();
#else
  (void)num_threads;
  const int t = 1;
#endif
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(t, items)));
}

// Per-thread scratch: `count` float buffers of the largest item's size.
struct Scratch {
  int64_t cap;
  std::vector<float> data;
  Scratch(int count, int64_t cap_) : cap(cap_), data(static_cast<size_t>(count * cap_ + 8)) {}
  float* operator[](int k) { return data.data() + k * cap; }
};

// body(scratch, first_row, end_row) for every item of whole rows, parallel over items.
template <class Body>
void for_items(int64_t rows, int64_t cols, int num_threads, int buffers, Body body) {
  if (rows <= 0 || cols <= 0) return;
  const int64_t per = std::max<int64_t>(1, kItemElements / cols);
  const int64_t items = (rows + per - 1) / per;
  const int threads = resolve_threads(num_threads, items);
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads) if (threads > 1)
#endif
  {
    Scratch scratch(buffers, per * cols);
#if defined(_OPENMP)
#pragma omp for schedule(static)
#endif
    for (int64_t it = 0; it < items; ++it) body(scratch, it * per, std::min(rows, (it + 1) * per));
  }
}

// max |x| over a span; NaN if any element is NaN (as torch's amax).
float absmax_span(const float* x, int64_t n) {
  int64_t i = 0;
  float m = 0.0f;
  bool nan = false;
#if ROMER_PHILOX_HAVE_AVX2
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 acc = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i));
    acc = _mm256_max_ps(acc, v);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  for (float v : lanes) m = std::max(m, v);
  nan = _mm256_movemask_ps(bad) != 0;
#endif
  for (; i < n; ++i) {
    const float v = std::fabs(x[i]);
    nan = nan || std::isnan(v);
    m = std::max(m, v);
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : m;
}

// s = g_max / max(tile abs-max, 1e-7), as torch: clamp_min(1e-7) -> reciprocal -> * g_max.
std::vector<float> tile_scales(const float* w, int64_t rows, int64_t cols, const TileSizes& grid, float g_max,
                               int num_threads) {
  std::vector<float> s = tile_absmax(w, rows, cols, grid, num_threads);
  for (float& v : s) {
    const float clipped = std::isnan(v) ? v : std::max(v, 1e-7f);
    v = (1.0f / clipped) * g_max;
  }
  return s;
}

// Fill buf[0, n) of an item (rows r0..r1) with the per-tile value of every element.
void fill_tile_values(float* buf, int64_t r0, int64_t r1, int64_t cols, const std::vector<int32_t>& rtile,
                      const std::vector<int64_t>& cb, const std::vector<float>& per_tile) {
  const int64_t nin = static_cast<int64_t>(cb.size()) - 1;
  for (int64_t i = r0; i < r1; ++i) {
    float* row = buf + (i - r0) * cols;
    const float* vals = per_tile.data() + rtile[static_cast<size_t>(i)] * nin;
    for (int64_t t = 0; t < nin; ++t) std::fill(row + cb[t], row + cb[t + 1], vals[t]);
  }
}

// c ? x : y as bit operations. Under the default -ftrapping-math GCC turns a float ternary whose sides
// are only needed on one branch into control flow and then cannot vectorise the loop; the mask form
// stays branch-free. The comparisons are quiet ones (no FP exception on NaN) for the same reason.
inline float sel(bool c, float x, float y) {
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return philox::fmath::from_bits((philox::fmath::to_bits(x) & m) | (philox::fmath::to_bits(y) & ~m));
}
inline bool ge0(float w) { return __builtin_isgreaterequal(w, 0.0f); }   // w >= 0 (true for -0.0)
inline bool lt(float x, float y) { return __builtin_isless(x, y); }
inline float clampf(float v, float lo, float hi) { return std::min(std::max(v, lo), hi); }

inline float piece(const PieceFit& f, float x, float log_x) {
  const float low = clampf(log_x * f.a + f.b, f.lo, f.hi);
  const float high = (x * x * f.p2 + x * f.p1) + f.p0;
  return sel(lt(x, f.thr), low, high);
}

void normals(Stream s, int64_t start, int64_t n, float* out) {
  if (s.has) philox::philox_fill_normal(s.seed, start, n, out, 1);
}

// The drift exponents of both devices (G+ into out_p, G- into out_m) of the flat elements [e0, e0 + n),
// drawn from the target weights wv (programming tile scale per element in sb) and the DRIFT_NU normals:
// nu = |mu(x) + sigma(x) xi| * drift_scale for the device that holds the weight (x = max(a / g_max,
// 1e-7)), the constants of a zero target for the other one. pcm_program draws them at programming,
// pcm_read draws the same values again instead of keeping them. Scratch: xb, lg, mub, sgb, np, nm.
void drift_exponents(const float* wv, const float* sb, int64_t e0, int64_t n, const PcmParams& p, Stream nu_plus,
                     Stream nu_minus, float* __restrict xb, float* __restrict lg, float* __restrict mub,
                     float* __restrict sgb, float* __restrict np, float* __restrict nm, float* __restrict out_p,
                     float* __restrict out_m) {
  const float g_max = p.g_max;
  normals(nu_plus, e0, n, np);
  normals(nu_minus, e0, n, nm);
  for (int64_t j = 0; j < n; ++j) xb[j] = std::min(std::fabs(wv[j] * sb[j]), g_max) / g_max;
  for (int64_t j = 0; j < n; ++j) xb[j] = std::max(xb[j], 1e-7f);  // g_rel = max(x, 1e-7)
  log_span(xb, lg, n);
  const float ds = p.drift_scale, mu_off = p.mu_off, sg_off = p.sigma_nu_off;
  const PieceFit mu_fit = p.nu_mu, sigma_fit = p.nu_sigma;
  for (int64_t j = 0; j < n; ++j) {
    mub[j] = piece(mu_fit, xb[j], lg[j]);
    sgb[j] = piece(sigma_fit, xb[j], lg[j]);
  }
  int64_t j0 = 0;
#if ROMER_PHILOX_HAVE_AVX2
  {  // the loop below by hand (GCC does not vectorise it): same operations, blends for the selects
    const __m256 zero = _mm256_setzero_ps(), sign = _mm256_set1_ps(-0.0f);
    const __m256 vds = _mm256_set1_ps(ds), vmu_off = _mm256_set1_ps(mu_off), vsg_off = _mm256_set1_ps(sg_off);
    for (; j0 + 8 <= n; j0 += 8) {
      const __m256 plus = _mm256_cmp_ps(_mm256_loadu_ps(wv + j0), zero, _CMP_GE_OQ);
      const __m256 a = _mm256_loadu_ps(np + j0), b = _mm256_loadu_ps(nm + j0);
      const __m256 xi_on = _mm256_blendv_ps(b, a, plus), xi_off = _mm256_blendv_ps(a, b, plus);
      const __m256 on = _mm256_mul_ps(
          _mm256_andnot_ps(sign, _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(sgb + j0), xi_on),
                                               _mm256_loadu_ps(mub + j0))), vds);
      const __m256 off = _mm256_mul_ps(
          _mm256_andnot_ps(sign, _mm256_add_ps(_mm256_mul_ps(xi_off, vsg_off), vmu_off)), vds);
      _mm256_storeu_ps(out_p + j0, _mm256_blendv_ps(off, on, plus));
      _mm256_storeu_ps(out_m + j0, _mm256_blendv_ps(on, off, plus));
    }
  }
#endif
  for (int64_t j = j0; j < n; ++j) {
    const bool plus = ge0(wv[j]);
    const float mu = mub[j], sg = sgb[j];
    const float nu_on = std::fabs(sg * sel(plus, np[j], nm[j]) + mu) * ds;
    const float nu_off = std::fabs(sel(plus, nm[j], np[j]) * sg_off + mu_off) * ds;
    out_p[j] = sel(plus, nu_on, nu_off);
    out_m[j] = sel(plus, nu_off, nu_on);
  }
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// Public element-wise helpers
// ------------------------------------------------------------------------------------------------
void log_f32(const float* x, float* out, int64_t n) {
#if ROMER_PHILOX_HAVE_AVX2
  map8(x, out, n, 1.0f, [](__m256 v) {
    __m256d lo, hi;
    log8(v, lo, hi);
    return join(lo, hi);
  });
#else
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(log_scalar(x[i]));
#endif
}

void pow_f32(const float* x, float exponent, float* out, int64_t n) {
  const double e = exponent;
#if ROMER_PHILOX_HAVE_AVX2
  const __m256d ev = _mm256_set1_pd(e);
  map8(x, out, n, 1.0f, [&](__m256 v) {
    __m256d lo, hi;
    log8(v, lo, hi);
    return join(exp4(_mm256_mul_pd(lo, ev)), exp4(_mm256_mul_pd(hi, ev)));
  });
#else
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(exp_scalar(log_scalar(x[i]) * e));
#endif
}

void log_fast_f32(const float* x, float* out, int64_t n) { log_span(x, out, n); }
void pow_fast_f32(const float* x, float exponent, float* out, int64_t n) { pow_span(x, exponent, out, n); }
void exp_fast_f32(const float* y, float* out, int64_t n) {
#if ROMER_PHILOX_HAVE_AVX2
  map8(y, out, n, 0.0f, [](__m256 v) { return exp8f(v); });
#else
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(exp_scalar(double(y[i])));
#endif
}

std::vector<float> tile_absmax(const float* w, int64_t rows, int64_t cols, const TileSizes& grid, int num_threads) {
  const std::vector<int64_t> cb = bounds_of(grid.in_sizes);
  const std::vector<int32_t> rtile = row_tiles(grid.out_sizes, rows);
  const int64_t nin = static_cast<int64_t>(grid.in_sizes.size());
  const size_t ntiles = grid.out_sizes.size() * grid.in_sizes.size();
  std::vector<float> result(ntiles, 0.0f);
  auto combine = [](float a, float b) { return (std::isnan(a) || std::isnan(b)) ? std::numeric_limits<float>::quiet_NaN() : std::max(a, b); };
  const int64_t per = std::max<int64_t>(1, kItemElements / std::max<int64_t>(cols, 1));
  const int64_t items = (rows + per - 1) / per;
  const int threads = resolve_threads(num_threads, items);
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads) if (threads > 1)
#endif
  {
    std::vector<float> local(ntiles, 0.0f);
#if defined(_OPENMP)
#pragma omp for schedule(static)
#endif
    for (int64_t it = 0; it < items; ++it) {
      for (int64_t i = it * per; i < std::min(rows, (it + 1) * per); ++i) {
        float* tiles = local.data() + rtile[static_cast<size_t>(i)] * nin;
        for (int64_t t = 0; t < nin; ++t) tiles[t] = combine(tiles[t], absmax_span(w + i * cols + cb[t], cb[t + 1] - cb[t]));
      }
    }
#if defined(_OPENMP)
#pragma omp critical(romer_noise_tile_absmax)
#endif
    for (size_t k = 0; k < ntiles; ++k) result[k] = combine(result[k], local[k]);
  }
  return result;
}

// ------------------------------------------------------------------------------------------------
// PCM / HERMES
// ------------------------------------------------------------------------------------------------
void pcm_program(const float* w, int64_t rows, int64_t cols, const TileSizes& grid, const PcmParams& p,
                 Stream prog_plus, Stream prog_minus, Stream nu_plus, Stream nu_minus, float* weights,
                 float* drift_nu, int num_threads) {
  const std::vector<float> scales = tile_scales(w, rows, cols, grid, p.g_max, num_threads);
  const std::vector<int64_t> cb = bounds_of(grid.in_sizes);
  const std::vector<int32_t> rtile = row_tiles(grid.out_sizes, rows);
  const bool prog = prog_plus.has;
  const bool drift = nu_plus.has && drift_nu != nullptr;
  const int64_t total = rows * cols;
  const float g_max = p.g_max;
  const int nc = static_cast<int>(p.prog_coeff.size());
  const float* coeff = p.prog_coeff.data();

  for_items(rows, cols, num_threads, 9, [&](Scratch& ws, int64_t r0, int64_t r1) {
    const int64_t e0 = r0 * cols, n = (r1 - r0) * cols;
    const float* __restrict wv = w + e0;
    float* __restrict sb = ws[0];
    float *__restrict xp = ws[1], *__restrict xm = ws[2], *__restrict np = ws[3], *__restrict nm = ws[4];
    float *__restrict xb = ws[5], *__restrict sig = ws[6], *__restrict pw = ws[7], *__restrict lg = ws[8];
    fill_tile_values(sb, r0, r1, cols, rtile, cb, scales);
    normals(prog_plus, e0, n, xp);
    normals(prog_minus, e0, n, xm);
    // a = min(|w s|, g_max) on the device that holds w (G+ where w >= 0), x = a / g_max
    for (int64_t j = 0; j < n; ++j) xb[j] = std::min(std::fabs(wv[j] * sb[j]), g_max) / g_max;
    float* __restrict out_w = weights + e0;
    if (prog) {
      // sigma_prog(x) * reference_ratio * prog_noise_scale (polynomial with a running power, as pcm.polynomial)
      if (nc == 1) {
        std::fill(sig, sig + n, coeff[0]);
      } else {
        for (int64_t j = 0; j < n; ++j) {
          sig[j] = xb[j] * coeff[1] + coeff[0];
          pw[j] = xb[j];
        }
        for (int k = 2; k < nc; ++k) {
          const float c = coeff[k];
          for (int64_t j = 0; j < n; ++j) {
            pw[j] = pw[j] * xb[j];
            sig[j] = sig[j] + pw[j] * c;
          }
        }
      }
      const float ratio = p.reference_ratio, scale = p.prog_noise_scale, sigma_off = p.sigma_off;
      for (int64_t j = 0; j < n; ++j) {
        const float s = sb[j];
        const bool plus = ge0(wv[j]);
        const float a = std::min(std::fabs(wv[j] * s), g_max);
        const float xi_on = sel(plus, xp[j], xm[j]);
        const float xi_off = sel(plus, xm[j], xp[j]);
        const float g_on = std::max((sig[j] * ratio) * scale * xi_on + a, 0.0f);
        const float g_off = std::max(xi_off * sigma_off, 0.0f);
        out_w[j] = (sel(plus, g_on, g_off) - sel(plus, g_off, g_on)) / s;
      }
    } else {
      for (int64_t j = 0; j < n; ++j) {
        const float s = sb[j];
        const bool plus = ge0(wv[j]);
        const float a = std::min(std::fabs(wv[j] * s), g_max);
        out_w[j] = (sel(plus, a, 0.0f) - sel(plus, 0.0f, a)) / s;
      }
    }
    if (drift) {
      drift_exponents(wv, sb, e0, n, p, nu_plus, nu_minus, xb, lg, sig, pw, np, nm, drift_nu + e0,
                      drift_nu + total + e0);
    }
  });
}

void pcm_read(const float* w_prog, const float* w_target, int64_t rows, int64_t cols, const TileSizes& grid,
              const PcmParams& p, double t_ratio, double time_factor, float read_noise_scale, Stream read_plus,
              Stream read_minus, Stream nu_plus, Stream nu_minus, float* out, int num_threads) {
  const std::vector<float> scales = tile_scales(w_prog, rows, cols, grid, p.g_max, num_threads);
  const bool drift = w_target != nullptr && nu_plus.has;
  const std::vector<float> target_scales =
      drift ? tile_scales(w_target, rows, cols, grid, p.g_max, num_threads) : std::vector<float>{};
  const std::vector<int64_t> cb = bounds_of(grid.in_sizes);
  const std::vector<int32_t> rtile = row_tiles(grid.out_sizes, rows);
  const bool read = read_plus.has;
  const float g_max = p.g_max;
  const double ln_base = std::log(static_cast<double>(static_cast<float>(t_ratio)));  // torch: float(t / t_0)
  const float tf = static_cast<float>(time_factor);
  const ReadQ q = p.q;

  for_items(rows, cols, num_threads, 16, [&](Scratch& ws, int64_t r0, int64_t r1) {
    const int64_t e0 = r0 * cols, n = (r1 - r0) * cols;
    // wv and res may be the same memory (a read in place): every element is read before it is written.
    const float* wv = w_prog + e0;
    float *__restrict sb = ws[0], *__restrict xp = ws[1], *__restrict xm = ws[2], *__restrict xq = ws[3];
    float *__restrict nub = ws[4], *__restrict df = ws[5], *__restrict qb = ws[6];
    fill_tile_values(sb, r0, r1, cols, rtile, cb, scales);
    if (read) {
      normals(read_plus, e0, n, xp);
      normals(read_minus, e0, n, xm);
      for (int64_t j = 0; j < n; ++j) xq[j] = std::min(std::fabs(wv[j] * sb[j]), g_max) / g_max;
      if (q.family == 0) {
        pow_span(xq, q.exponent, qb, n);
        for (int64_t j = 0; j < n; ++j) qb[j] = std::min((1.0f / std::max(qb[j], q.floor)) * q.numerator, q.cap);
      } else {
        log_span(xq, qb, n);
        for (int64_t j = 0; j < n; ++j) {
          const float x = xq[j], x2 = x * x;
          const float low = clampf(qb[j] * q.a + q.b, q.lo, q.hi);
          const float high = (((x2 * x) * q.p3 + x2 * q.p2) + x * q.p1) + q.p0;
          qb[j] = sel(lt(x, q.thr), low, high);
        }
      }
    }
    if (drift) {
      float *__restrict st = ws[7], *__restrict nu_p = ws[14], *__restrict nu_m = ws[15];
      fill_tile_values(st, r0, r1, cols, rtile, cb, target_scales);
      drift_exponents(w_target + e0, st, e0, n, p, nu_plus, nu_minus, ws[8], ws[9], ws[10], ws[11], ws[12], ws[13],
                      nu_p, nu_m);
      // the device that holds the programmed weight now (the other one is 0 and stays 0)
      for (int64_t j = 0; j < n; ++j) nub[j] = sel(ge0(wv[j]), nu_p[j], nu_m[j]);
      neg_pow_base(nub, ln_base, df, n);
    }
    float* res = out + e0;
    auto finish = [&](auto with_drift, auto with_read) {
      for (int64_t j = 0; j < n; ++j) {
        const float s = sb[j];
        const float w = wv[j];
        const bool plus = ge0(w);
        const float g = std::min(std::fabs(w * s), g_max);
        float gd = g;
        if constexpr (decltype(with_drift)::value) gd = df[j] * g;
        if constexpr (decltype(with_read)::value) {
          gd = ((std::fabs(gd) * read_noise_scale) * (qb[j] * tf)) * sel(plus, xp[j], xm[j]) + gd;
        }
        const float quotient = std::max(gd, 0.0f) / s;
        res[j] = sel(plus, quotient, -quotient);
      }
    };
    using yes = std::true_type;
    using no = std::false_type;
    if (drift && read) finish(yes{}, yes{});
    else if (drift) finish(yes{}, no{});
    else if (read) finish(no{}, yes{});
    else finish(no{}, no{});
  });
}

// ------------------------------------------------------------------------------------------------
// Gaussian
// ------------------------------------------------------------------------------------------------
void gaussian_program(const float* w, int64_t rows, int64_t cols, const std::vector<int64_t>& in_sizes, float sigma,
                      float mult_sigma, Stream add, Stream mul, float* out, int num_threads) {
  const std::vector<int64_t> cb = bounds_of(in_sizes);
  const int64_t nin = static_cast<int64_t>(in_sizes.size());
  for_items(rows, cols, num_threads, 2, [&](Scratch& ws, int64_t r0, int64_t r1) {
    const int64_t e0 = r0 * cols, n = (r1 - r0) * cols;
    float *xa = ws[0], *xm = ws[1];
    normals(add, e0, n, xa);
    normals(mul, e0, n, xm);
    for (int64_t i = r0; i < r1; ++i) {
      const int64_t o = (i - r0) * cols;
      const float* wr = w + i * cols;
      float* res = out + i * cols;
      for (int64_t t = 0; t < nin; ++t) {
        const int64_t c0 = cb[t], c1 = cb[t + 1];
        if (add.has) {
          const float m = absmax_span(wr + c0, c1 - c0) * sigma;
          for (int64_t j = c0; j < c1; ++j) res[j] = wr[j] + m * xa[o + j];
        } else {
          for (int64_t j = c0; j < c1; ++j) res[j] = wr[j];
        }
        if (mul.has) {
          for (int64_t j = c0; j < c1; ++j) res[j] = res[j] + (std::fabs(wr[j]) * mult_sigma) * xm[o + j];
        }
      }
    }
  });
}

void gaussian_read(const float* w_prog, int64_t rows, int64_t cols, const std::vector<int64_t>& in_sizes,
                   float read_sigma, Stream read, float* out, int num_threads) {
  const std::vector<int64_t> cb = bounds_of(in_sizes);
  const int64_t nin = static_cast<int64_t>(in_sizes.size());
  for_items(rows, cols, num_threads, 1, [&](Scratch& ws, int64_t r0, int64_t r1) {
    const int64_t e0 = r0 * cols, n = (r1 - r0) * cols;
    float* xi = ws[0];
    normals(read, e0, n, xi);
    for (int64_t i = r0; i < r1; ++i) {
      const int64_t o = (i - r0) * cols;
      const float* wr = w_prog + i * cols;
      float* res = out + i * cols;
      for (int64_t t = 0; t < nin; ++t) {
        const int64_t c0 = cb[t], c1 = cb[t + 1];
        const float m = absmax_span(wr + c0, c1 - c0) * read_sigma;
        for (int64_t j = c0; j < c1; ++j) res[j] = m * xi[o + j] + wr[j];
      }
    }
  });
}

}  // namespace noise
}  // namespace romer
