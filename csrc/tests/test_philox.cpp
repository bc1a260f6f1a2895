// Unit tests of csrc/core/philox.h (no torch, no framework). Registered with ctest by CMakeLists.txt;
// built twice: with AVX2 (the production path, also checked against the portable kernel) and without
// (-DROMER_PHILOX_NO_AVX2, the portable path alone). Both builds check the same golden stream hashes,
// so the two kernels are also checked against each other across executables.
#include "core/philox.h"

#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

namespace {

int g_failures = 0;
int g_checks = 0;

#define CHECK(...)                                                                        \
  do {                                                                                    \
    ++g_checks;                                                                           \
    if (!(__VA_ARGS__)) {                                                                 \
      ++g_failures;                                                                       \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #__VA_ARGS__); \
    }                                                                                     \
  } while (0)

#define CHECK_MSG(cond, ...)                                                         \
  do {                                                                               \
    ++g_checks;                                                                      \
    if (!(cond)) {                                                                   \
      ++g_failures;                                                                  \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s: ", __FILE__, __LINE__, #cond);  \
      std::fprintf(stderr, __VA_ARGS__);                                             \
      std::fprintf(stderr, "\n");                                                    \
    }                                                                                \
  } while (0)

using namespace romer::philox;

uint32_t bits(float f) { return fmath::to_bits(f); }

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

template <class T>
uint64_t fnv1a(const std::vector<T>& v) {
  uint64_t h = 0xcbf29ce484222325ull;
  const auto* p = reinterpret_cast<const unsigned char*>(v.data());
  for (size_t i = 0; i < v.size() * sizeof(T); ++i) {
    h ^= p[i];
    h *= 0x100000001b3ull;
  }
  return h;
}

void test_known_answers() {
  // Random123 known-answer vectors for Philox4x32-10.
  struct Kat {
    uint32_t ctr[4], key[2], out[4];
  };
  const Kat kats[] = {
      {{0u, 0u, 0u, 0u}, {0u, 0u}, {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
      {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
       {0xffffffffu, 0xffffffffu},
       {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
      {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
       {0xa4093822u, 0x299f31d0u},
       {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
  };
  for (const Kat& k : kats) {
    const Block b = philox4x32_10(k.ctr[0], k.ctr[1], k.ctr[2], k.ctr[3], k.key[0], k.key[1]);
    for (int i = 0; i < 4; ++i) CHECK_MSG(b.w[i] == k.out[i], "word %d: got %08x want %08x", i, b.w[i], k.out[i]);
  }
  // Stream layout: key = (seed lo, seed hi), counter = (blk lo, blk hi, 0, 0).
  const uint64_t seed = 0x0123456789abcdefull;
  const uint64_t blk = 0x0000000500000007ull;
  const Block a = philox_block(seed, blk);
  const Block b = philox4x32_10(7u, 5u, 0u, 0u, 0x89abcdefu, 0x01234567u);
  CHECK(std::memcmp(a.w, b.w, sizeof a.w) == 0);
  const Block z = philox_block(0, 0);
  CHECK(z.w[0] == 0x6627e8d5u && z.w[3] == 0x9b00dbd8u);
  std::vector<uint32_t> words(8);
  philox_fill_uint32(0, 0, 8, words.data());
  CHECK(words[0] == 0x6627e8d5u && words[1] == 0xe169c58du && words[2] == 0xbc57ac4cu && words[3] == 0x9b00dbd8u);
  const Block one = philox_block(0, 1);
  CHECK(std::memcmp(words.data() + 4, one.w, sizeof one.w) == 0);
}

void test_uniform_mapping() {
  // float32 constants as torch/Triton round them.
  CHECK(bits(kUniformScale) == 0x2fffffffu);
  CHECK(bits(kTwoPi) == 0x40c90fdbu);
  CHECK(bits(kMinU1) == 0x33d6bf95u);
  CHECK(uint_to_uniform(0u) == 0.0f);
  CHECK(uint_to_uniform(0xffffffffu) == 0.0f);  // ~(-1) == 0
  CHECK(uint_to_uniform(1u) == kUniformScale);
  CHECK(uint_to_uniform(0x7fffffffu) < 1.0f);
  CHECK(uint_to_uniform(0x7fffffffu) == uint_to_uniform(0x80000000u));
  CHECK(bits(uint_to_uniform(0x7fffffffu)) == 0x3f7fffffu);  // 0.99999994f, the largest value
  CHECK(uint_to_uniform(0xfffffffeu) == kUniformScale);      // ~(-2) == 1
  // Uniforms equal the mapped words, element by element, for an unaligned range.
  std::vector<uint32_t> w(1001);
  std::vector<float> u(1001);
  philox_fill_uint32(99, 3, 1001, w.data());
  philox_fill_uniform(99, 3, 1001, u.data());
  bool ok = true;
  for (size_t i = 0; i < w.size(); ++i) ok &= bits(u[i]) == bits(uint_to_uniform(w[i]));
  CHECK(ok);
}

// ulp error of a float against a double reference, in ulps of the reference's binade.
double ulp_err(float got, double want) {
  int e;
  std::frexp(std::fabs(want), &e);
  return std::fabs(static_cast<double>(got) - want) / std::ldexp(1.0, e - 24);
}

void test_math_accuracy() {
  // Sampled over the whole Box-Muller domain (the exhaustive run gave log <= 0.84, sin/cos <= 0.81 ulp).
  double worst_log = 0, worst_sin = 0, worst_cos = 0;
  for (uint32_t b = bits(kMinU1); b <= bits(1.0f); b += 37) {
    const float x = fmath::from_bits(b);
    worst_log = std::max(worst_log, ulp_err(fmath::log_pos(x), std::log(static_cast<double>(x))));
  }
  for (uint32_t b = 0; b <= bits(kTwoPi); b += 37) {
    const float x = fmath::from_bits(b);
    float s, c;
    fmath::sincos_pos(x, s, c);
    worst_sin = std::max(worst_sin, ulp_err(s, std::sin(static_cast<double>(x))));
    worst_cos = std::max(worst_cos, ulp_err(c, std::cos(static_cast<double>(x))));
  }
  std::printf("  accuracy (sampled): log %.3f ulp, sin %.3f ulp, cos %.3f ulp\n", worst_log, worst_sin, worst_cos);
  CHECK(worst_log < 1.0);
  CHECK(worst_sin < 1.0);
  CHECK(worst_cos < 1.0);
  float s, c;
  fmath::sincos_pos(0.0f, s, c);
  CHECK(s == 0.0f && c == 1.0f);
  CHECK(fmath::log_pos(1.0f) == 0.0f);
  // Box-Muller: the smallest u1 is clamped to 1e-7, so |n| <= sqrt(-2 log 1e-7) ~ 5.68.
  float n0, n1;
  box_muller(0.0f, 0.0f, n0, n1);
  CHECK(std::fabs(n0 - std::sqrt(-2.0 * std::log(static_cast<double>(kMinU1)))) < 1e-5 && n1 == 0.0f);
}

#if ROMER_PHILOX_HAVE_AVX2
template <Kind K, class T>
bool avx2_matches_generic(uint64_t seed, uint64_t blk0, int64_t nblk) {
  std::vector<T> a(4 * nblk), b(4 * nblk);
  detail::avx2::blocks<K, T>(seed, blk0, nblk, a.data());
  detail::blocks_generic<K, T>(seed, blk0, nblk, b.data());
  return same_bits(a, b);
}
#endif

void test_kernels_agree() {
#if ROMER_PHILOX_HAVE_AVX2
  const uint64_t seeds[] = {0ull, 1234ull, 0x1234567890ull, (1ull << 63) - 25, ~0ull};
  const uint64_t starts[] = {0ull, 3ull, (1ull << 32) - 5, (1ull << 32) - 16, 0x7ffffffffff0ull};
  for (uint64_t seed : seeds) {
    for (uint64_t blk0 : starts) {
      CHECK(avx2_matches_generic<Kind::Words, uint32_t>(seed, blk0, 37));
      CHECK(avx2_matches_generic<Kind::Words, int64_t>(seed, blk0, 37));
      CHECK(avx2_matches_generic<Kind::Uniform, float>(seed, blk0, 37));
      CHECK(avx2_matches_generic<Kind::Normal, float>(seed, blk0, 37));
      CHECK(avx2_matches_generic<Kind::Normal, double>(seed, blk0, 21));
    }
  }
  // A long run through the whole transform domain.
  CHECK(avx2_matches_generic<Kind::Normal, float>(77, 0, 1 << 18));
  std::printf("  AVX2 kernel == portable kernel (bit-exact)\n");
#else
  std::printf("  portable build: AVX2 kernel not compiled\n");
#endif
  // Counter high word: block 2^32 + 5 must use (5, 1, 0, 0), and a vector straddling 2^32 must carry.
  std::vector<uint32_t> w(4 * 40);
  const int64_t start = 4 * ((int64_t{1} << 32) - 20);
  philox_fill_uint32(42, start, 4 * 40, w.data());
  bool ok = true;
  for (int i = 0; i < 40; ++i) {
    const uint64_t blk = (uint64_t{1} << 32) - 20 + i;
    const Block b = philox4x32_10(static_cast<uint32_t>(blk), static_cast<uint32_t>(blk >> 32), 0u, 0u, 42u, 0u);
    ok &= std::memcmp(w.data() + 4 * i, b.w, sizeof b.w) == 0;
  }
  CHECK(ok);
}

template <class T, class Fill>
void check_unaligned_slices(Fill fill, const char* what) {
  const uint64_t seed = 0xfeedfacecafebeefull;
  const int64_t base = 4 * 1000;  // aligned
  const int64_t total = 4 * 4096 * 3 + 64;  // crosses several parallel chunks
  std::vector<T> ref(total);
  fill(seed, base, total, ref.data(), 2);
  bool ok = true;
  const int64_t offsets[] = {0, 1, 2, 3, 5, 6, 7, 13, 4095, 4 * 4096 - 1, 4 * 4096 + 2};
  const int64_t counts[] = {0, 1, 2, 3, 4, 5, 7, 8, 9, 31, 33, 67, 4 * 4096 + 3, 4 * 4096 * 2 + 1};
  for (int64_t off : offsets) {
    for (int64_t n : counts) {
      if (off + n > total) continue;
      std::vector<T> got(n);
      fill(seed, base + off, n, got.data(), 2);
      ok &= n == 0 || std::memcmp(got.data(), ref.data() + off, n * sizeof(T)) == 0;
    }
  }
  CHECK_MSG(ok, "%s: unaligned fills differ from slices of the aligned fill", what);
}

void test_unaligned_ranges() {
  check_unaligned_slices<uint32_t>(
      [](uint64_t s, int64_t a, int64_t n, uint32_t* o, int t) { philox_fill_uint32(s, a, n, o, t); }, "uint32");
  check_unaligned_slices<int64_t>(
      [](uint64_t s, int64_t a, int64_t n, int64_t* o, int t) { philox_fill_uint32(s, a, n, o, t); }, "int64");
  check_unaligned_slices<float>(
      [](uint64_t s, int64_t a, int64_t n, float* o, int t) { philox_fill_uniform(s, a, n, o, t); }, "uniform");
  check_unaligned_slices<float>(
      [](uint64_t s, int64_t a, int64_t n, float* o, int t) { philox_fill_normal(s, a, n, o, t); }, "normal");
  // int64 words equal uint32 words.
  std::vector<uint32_t> w32(999);
  std::vector<int64_t> w64(999);
  philox_fill_uint32(5, 7, 999, w32.data());
  philox_fill_uint32(5, 7, 999, w64.data());
  bool ok = true;
  for (size_t i = 0; i < w32.size(); ++i) ok &= static_cast<int64_t>(w32[i]) == w64[i];
  CHECK(ok);
}

void test_thread_independence() {
  const int64_t n = 1000003;
  const int64_t start = 4 * 123457 + 3;
  std::vector<float> ref(n);
  std::vector<uint32_t> wref(n);
  philox_fill_normal(31337, start, n, ref.data(), 1);
  philox_fill_uint32(31337, start, n, wref.data(), 1);
  for (int threads : {2, 3, 4, 7}) {
    std::vector<float> got(n);
    std::vector<uint32_t> wgot(n);
    philox_fill_normal(31337, start, n, got.data(), threads);
    philox_fill_uint32(31337, start, n, wgot.data(), threads);
    CHECK_MSG(same_bits(ref, got), "normals differ with %d threads", threads);
    CHECK_MSG(same_bits(wref, wgot), "words differ with %d threads", threads);
  }
  std::vector<float> dflt(n);
  philox_fill_normal(31337, start, n, dflt.data());  // OpenMP default thread count
  CHECK(same_bits(ref, dflt));
}

void test_distributions() {
  const int64_t n = 1000000;
  std::vector<float> u(n), z(n);
  philox_fill_uniform(2024, 17, n, u.data());
  philox_fill_normal(2024, 17, n, z.data());
  double su = 0, su2 = 0;
  bool in_range = true;
  for (float v : u) {
    in_range &= v >= 0.0f && v < 1.0f;
    su += v;
    su2 += static_cast<double>(v) * v;
  }
  CHECK(in_range);
  const double mu = su / n, vu = su2 / n - mu * mu;
  CHECK_MSG(std::fabs(mu - 0.5) < 0.003, "uniform mean %f", mu);
  CHECK_MSG(std::fabs(vu - 1.0 / 12) < 0.002, "uniform var %f", vu);
  double m1 = 0, m2 = 0, m3 = 0, m4 = 0, amax = 0;
  bool finite = true;
  for (float v : z) {
    finite &= std::isfinite(v);
    const double x = v;
    m1 += x;
    m2 += x * x;
    m3 += x * x * x;
    m4 += x * x * x * x;
    amax = std::max(amax, std::fabs(x));
  }
  m1 /= n;
  m2 /= n;
  m3 /= n;
  m4 /= n;
  std::printf("  normal moments on 1e6: mean %.5f  var %.5f  m3 %.5f  m4 %.5f  max|z| %.3f\n", m1, m2, m3, m4, amax);
  CHECK(finite);
  CHECK_MSG(std::fabs(m1) < 0.005, "mean %f", m1);  // sd of the mean is 0.001
  CHECK_MSG(std::fabs(m2 - 1.0) < 0.01, "var %f", m2);
  CHECK_MSG(std::fabs(m3) < 0.03, "third moment %f", m3);
  CHECK_MSG(std::fabs(m4 - 3.0) < 0.06, "fourth moment %f", m4);
  CHECK(amax <= 5.6777);
}

void test_errors() {
  std::vector<float> out(4);
  bool threw = false;
  try {
    philox_fill_normal(1, -1, 2, out.data());
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  CHECK(threw);
  threw = false;
  try {
    philox_fill_normal(1, 0, -2, out.data());
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  CHECK(threw);
  threw = false;
  try {
    philox_fill_normal(1, std::numeric_limits<int64_t>::max() - 1, 3, out.data());
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  CHECK(threw);
  philox_fill_normal(1, 5, 0, out.data());  // empty range is fine
}

void test_golden_streams() {
  // Stream fingerprints. They pin the stream (layout, words, uniform mapping, the Box-Muller transform
  // and its float32 log/sincos); the portable and the AVX2 build must both reproduce them.
  const int64_t n = 100003;
  std::vector<uint32_t> w(n);
  std::vector<float> u(n), z(n);
  philox_fill_uint32(0x0123456789abcdefull, 12345, n, w.data());
  philox_fill_uniform(0x0123456789abcdefull, 12345, n, u.data());
  philox_fill_normal(0x0123456789abcdefull, 12345, n, z.data());
  const uint64_t hw = fnv1a(w), hu = fnv1a(u), hz = fnv1a(z);
  std::printf("  golden hashes: words %016" PRIx64 " uniform %016" PRIx64 " normal %016" PRIx64 "\n", hw, hu, hz);
  // words and uniforms: the same hashes come out of romer_kernels/rng/philox.py (torch reference).
  CHECK(hw == 0xd34a6e40dee659d6ull);
  CHECK(hu == 0x1bd0a72680f25adbull);
  // normals: this file's transform (not libm), identical for both kernels.
  CHECK(hz == 0x642f0b5a9e56bac0ull);
}

}  // namespace

int main() {
  std::printf("philox tests (%s kernel)\n", ROMER_PHILOX_HAVE_AVX2 ? "AVX2" : "portable");
  test_known_answers();
  test_uniform_mapping();
  test_math_accuracy();
  test_kernels_agree();
  test_unaligned_ranges();
  test_thread_independence();
  test_distributions();
  test_errors();
  test_golden_streams();
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
