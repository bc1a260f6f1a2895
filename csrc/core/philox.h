// Philox4x32-10 counter-based streams, bit-compatible with romer_kernels/rng/philox.py and Triton.
//
// Header-only, C++17, no torch. Stream layout (the contract shared with the torch reference and the
// Triton kernels): element e of the stream `seed` is lane e % 4 of the Philox4x32-10 block with
//   counter = (blk & 0xffffffff, blk >> 32, 0, 0),  blk = e / 4,
//   key     = (seed & 0xffffffff, seed >> 32).
// Words -> uniforms: Triton's uint_to_uniform_float (reinterpret as int32, ~x if negative, times
// float32(4.6566127342e-10)). Uniforms -> normals: Triton's pair_uniform_to_normal on the word pairs
// (0, 1) and (2, 3): u1 = max(1e-7f, u1); theta = float32(2*pi) * u2; r = sqrt(-2 * log(u1));
// lanes (r cos theta, r sin theta).
//
// Exactness:
//  * words and uniforms are bit-exact with the torch reference and with Triton's tl.randint4x/tl.rand;
//  * normals use the reference's op order, but log and sin/cos are this file's own float32
//    polynomials built from IEEE-exact operations only (+, -, *, /, sqrt, fma, int ops). The result
//    therefore does not depend on libm, on the ISA path (the AVX2 and the portable code are bit-identical,
//    checked by csrc/tests/test_philox.cpp) or on the thread count. log is within 0.84 ulp and sin/cos
//    within 0.81 ulp of the exact value over the whole Box-Muller domain (exhaustive check); the normals
//    are within 2.23 * 2^-23 relative of the exact Box-Muller value (derived; 1.58 measured) and differ
//    from the torch reference (SLEEF/libm) by <= 3 ulp and from the Triton interpreter (numpy) by <= 5
//    ulp, measured on Intel and AMD; the bounds the tests hold are derived in tests/test_rng.py. Which
//    fraction is bit-identical to torch depends on the CPU (torch's vector maths does): 91.5 % on
//    Intel Sapphire Rapids, 80 % on AMD EPYC.
//  * Requires -ffp-contract=off (no implicit mul+add -> fma contraction); the build files set it.
//    -fno-math-errno lets GCC vectorise the portable path's sqrt (results are unaffected).
//
// Fill functions (elements [start, start + count) of a stream, any alignment):
//   philox_fill_uint32(seed, start, count, T* out)   raw words (T: any integer type wide enough)
//   philox_fill_uniform(seed, start, count, T* out)  float32 uniforms in [0, 1) (T: float or double)
//   philox_fill_normal(seed, start, count, T* out)   float32 standard normals (T: float or double)
// They parallelise with OpenMP over fixed chunks of blocks when compiled with -fopenmp; every element
// is a pure function of (seed, index), so results never depend on the number of threads.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>

#if defined(_OPENMP)
#include <omp.h>
#endif

#if defined(__AVX2__) && defined(__FMA__) && !defined(ROMER_PHILOX_NO_AVX2)
#include <immintrin.h>
#define ROMER_PHILOX_HAVE_AVX2 1
#else
#define ROMER_PHILOX_HAVE_AVX2 0
#endif

namespace romer {
namespace philox {

// ------------------------------------------------------------------------------------------------
// Constants
// ------------------------------------------------------------------------------------------------
inline constexpr uint32_t kMul0 = 0xD2511F53u;  // multiplies word 0
inline constexpr uint32_t kMul1 = 0xCD9E8D57u;  // multiplies word 2
inline constexpr uint32_t kBump0 = 0x9E3779B9u;  // key bump, word 0
inline constexpr uint32_t kBump1 = 0xBB67AE85u;  // key bump, word 1
inline constexpr int kRounds = 10;

// Triton's Python float constants, rounded to float32 exactly as torch/Triton do (double -> float).
inline constexpr float kUniformScale = static_cast<float>(4.6566127342e-10);  // 0x2fffffff
inline constexpr float kTwoPi = static_cast<float>(6.283185307179586);        // 0x40c90fdb
inline constexpr float kMinU1 = static_cast<float>(1e-7);                     // 0x33d6bf95

// ------------------------------------------------------------------------------------------------
// Scalar building blocks
// ------------------------------------------------------------------------------------------------
struct Block {
  uint32_t w[4];
};

// One Philox4x32-10 evaluation (Random123 round function, key bumped after every round).
inline Block philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  for (int r = 0; r < kRounds; ++r) {
    const uint64_t p0 = static_cast<uint64_t>(kMul0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kMul1) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += kBump0;
    k1 += kBump1;
  }
  return Block{{c0, c1, c2, c3}};
}

// The four words of block `blk` of stream `seed` (Triton randint4x(seed, blk) with an int64 offset).
inline Block philox_block(uint64_t seed, uint64_t blk) {
  return philox4x32_10(static_cast<uint32_t>(blk), static_cast<uint32_t>(blk >> 32), 0u, 0u,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Triton's uint_to_uniform_float for 32-bit words: [0, 1), 0 possible, never 1.
inline float uint_to_uniform(uint32_t word) {
  int32_t x = static_cast<int32_t>(word);
  x ^= (x >> 31);  // ~x for negative x, x otherwise
  return static_cast<float>(x) * kUniformScale;
}

namespace fmath {

inline float from_bits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}
inline uint32_t to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}

// log: x = 2^e * m with m in [sqrt(1/2), sqrt(2)), f = m - 1 (exact), s = f / (2 + f),
// log(1 + f) = 2 atanh(s) = f - f^2/2 + s (f^2/2 + R(s^2)); R fitted on |s| <= 3 - 2 sqrt(2).
inline constexpr uint32_t kSqrtHalfBits = 0x3f3504f3u;
inline constexpr float kLn2Hi = 0.693115234375f;          // 12 significant bits: e * kLn2Hi is exact
inline constexpr float kLn2Lo = 3.194618329871446e-05f;   // float(ln 2 - kLn2Hi)
inline constexpr float kLog1 = 0.6666666269302368f;
inline constexpr float kLog2 = 0.4000033438205719f;
inline constexpr float kLog3 = 0.28537359833717346f;
inline constexpr float kLog4 = 0.2358120232820511f;

// sin/cos: k = rint(x * 2/pi), r + rl = x - k pi/2 (three-part Cody-Waite, exact first step, the rest
// kept as a float-float pair), polynomials on |r| <= pi/4, quadrant fix-up by swap and sign flips.
inline constexpr float kTwoOverPi = 0.6366197466850281f;       // float(2/pi)
inline constexpr float kPio2A = 1.5707963705062866f;           // float(pi/2)
inline constexpr float kPio2B = -4.371138828673793e-08f;       // float(pi/2 - A)
inline constexpr float kPio2C = -1.7151245100058819e-15f;      // float(pi/2 - A - B)
inline constexpr float kRoundMagic = 12582912.0f;              // 1.5 * 2^23: (q + M) - M = rint(q)
inline constexpr float kSin1 = -0.1666666716337204f;
inline constexpr float kSin2 = 0.008333329111337662f;
inline constexpr float kSin3 = -0.00019839312881231308f;
inline constexpr float kSin4 = 2.718128598644398e-06f;
inline constexpr float kCos1 = 0.0416666679084301f;
inline constexpr float kCos2 = -0.0013888883404433727f;
inline constexpr float kCos3 = 2.479946124367416e-05f;
inline constexpr float kCos4 = -2.720580596360378e-07f;

// Natural log of a positive normal float (used, and tested exhaustively, on [1e-7, 1]).
inline float log_pos(float x) {
  const uint32_t ix = to_bits(x);
  const int32_t e = static_cast<int32_t>(ix - kSqrtHalfBits) >> 23;
  const float m = from_bits(ix - (static_cast<uint32_t>(e) << 23));
  const float f = m - 1.0f;
  const float s = f / (2.0f + f);
  const float z = s * s;
  const float R = z * std::fma(z, std::fma(z, std::fma(z, kLog4, kLog3), kLog2), kLog1);
  const float hfsq = 0.5f * f * f;
  const float fe = static_cast<float>(e);
  const float t = std::fma(s, hfsq + R, fe * kLn2Lo);
  return fe * kLn2Hi + (f - (hfsq - t));
}

// sin and cos of x >= 0 (used, and tested exhaustively, on the Box-Muller domain [0, 2 pi]).
inline void sincos_pos(float x, float& sin_out, float& cos_out) {
  const float q = x * kTwoOverPi;
  const float kf = (q + kRoundMagic) - kRoundMagic;
  const int32_t k = static_cast<int32_t>(kf);
  // r + rl = x - k pi/2 to about 2^-48 relative: the first step is exact, the second is an exact
  // TwoSum of r1 and the rounded k*B (whose own error kb_err is exact by fma).
  const float r1 = std::fma(-kf, kPio2A, x);
  const float kb = kf * kPio2B;
  const float kb_err = std::fma(kf, kPio2B, -kb);
  const float r = r1 - kb;
  const float r1v = r + kb;
  const float kbv = r - r1v;
  const float sum_err = (r1 - r1v) - (kb + kbv);
  const float rl = std::fma(-kf, kPio2C, sum_err - kb_err);
  const float z = r * r;
  const float ps = std::fma(z, std::fma(z, std::fma(z, kSin4, kSin3), kSin2), kSin1);
  const float pc = std::fma(z, std::fma(z, std::fma(z, kCos4, kCos3), kCos2), kCos1);
  const float hz = 0.5f * z;
  const float w = 1.0f - hz;
  // sin(r + rl) ~ r + r z ps(z) + rl (1 - z/2)
  const float sp = r + std::fma(rl, w, (r * z) * ps);
  // cos(r + rl) ~ w + [(1 - w) - hz] - (r*r - z)/2 - r rl + z^2 pc(z)
  const float zerr = std::fma(r, r, -z);
  const float corr = ((1.0f - w) - hz) - std::fma(r, rl, 0.5f * zerr);
  const float cp = w + (corr + (z * z) * pc);
  const uint32_t swap = 0u - static_cast<uint32_t>(k & 1);  // all ones in odd quadrants
  const uint32_t sin_sign = static_cast<uint32_t>(k & 2) << 30;
  const uint32_t cos_sign = static_cast<uint32_t>((k + 1) & 2) << 30;
  const uint32_t sb = to_bits(sp), cb = to_bits(cp);
  sin_out = from_bits(((sb & ~swap) | (cb & swap)) ^ sin_sign);
  cos_out = from_bits(((cb & ~swap) | (sb & swap)) ^ cos_sign);
}

}  // namespace fmath

// Triton's pair_uniform_to_normal in float32, same op order: (r cos(theta), r sin(theta)).
// u1, u2 in [0, 1) (uniforms from uint_to_uniform).
inline void box_muller(float u1, float u2, float& n0, float& n1) {
  // max(1e-7f, u1) as an integer max of the bit patterns (equal for non-negative floats); a float
  // compare-and-select here stops GCC from vectorising the loop.
  u1 = fmath::from_bits(std::max(fmath::to_bits(u1), fmath::to_bits(kMinU1)));
  const float theta = kTwoPi * u2;
  const float radius = std::sqrt(-2.0f * fmath::log_pos(u1));
  float s, c;
  fmath::sincos_pos(theta, s, c);
  n0 = radius * c;
  n1 = radius * s;
}

// ------------------------------------------------------------------------------------------------
// Block kernels: out[4 * i + lane] for blocks blk0 .. blk0 + nblk - 1
// ------------------------------------------------------------------------------------------------
enum class Kind { Words, Uniform, Normal };

// Everything below depends on the ISA this translation unit is compiled for. The inline namespace gives
// the AVX2 and the portable builds distinct symbols, so TUs compiled with different flags can be linked
// together without ODR clashes; callers still write romer::philox::philox_fill_normal etc.
#if ROMER_PHILOX_HAVE_AVX2
inline namespace isa_avx2 {
#else
inline namespace isa_generic {
#endif

namespace detail {

// Portable structure-of-arrays kernel: kGroup consecutive counters run through the rounds together.
// GCC 12 auto-vectorises the branch-free transforms and the output loops (about 4e8 normals/s/core with
// -march=x86-64-v3) but not the 32x32->64 multiply-high of the rounds ("unsupported use in stmt"),
// which is why the AVX2 kernel below exists (about 7e8 normals/s/core).
inline constexpr int kGroup = 16;

template <Kind K, class T>
inline void blocks_generic(uint64_t seed, uint64_t blk0, int64_t nblk, T* out) {
  const uint32_t key0 = static_cast<uint32_t>(seed);
  const uint32_t key1 = static_cast<uint32_t>(seed >> 32);
  for (int64_t g0 = 0; g0 < nblk; g0 += kGroup) {
    const int n = static_cast<int>(std::min<int64_t>(kGroup, nblk - g0));
    alignas(32) uint32_t c0[kGroup], c1[kGroup], c2[kGroup], c3[kGroup];
    for (int i = 0; i < kGroup; ++i) {
      const uint64_t b = blk0 + static_cast<uint64_t>(g0 + i);
      c0[i] = static_cast<uint32_t>(b);
      c1[i] = static_cast<uint32_t>(b >> 32);
      c2[i] = 0u;
      c3[i] = 0u;
    }
    uint32_t k0 = key0, k1 = key1;
    for (int r = 0; r < kRounds; ++r) {
      for (int i = 0; i < kGroup; ++i) {
        const uint64_t p0 = static_cast<uint64_t>(kMul0) * c0[i];
        const uint64_t p1 = static_cast<uint64_t>(kMul1) * c2[i];
        const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[i] ^ k0;
        const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[i] ^ k1;
        c1[i] = static_cast<uint32_t>(p1);
        c3[i] = static_cast<uint32_t>(p0);
        c0[i] = n0;
        c2[i] = n2;
      }
      k0 += kBump0;
      k1 += kBump1;
    }
    T* o = out + 4 * g0;
    if constexpr (K == Kind::Words) {
      for (int i = 0; i < n; ++i) {
        o[4 * i + 0] = static_cast<T>(c0[i]);
        o[4 * i + 1] = static_cast<T>(c1[i]);
        o[4 * i + 2] = static_cast<T>(c2[i]);
        o[4 * i + 3] = static_cast<T>(c3[i]);
      }
    } else if constexpr (K == Kind::Uniform) {
      for (int i = 0; i < n; ++i) {
        o[4 * i + 0] = static_cast<T>(uint_to_uniform(c0[i]));
        o[4 * i + 1] = static_cast<T>(uint_to_uniform(c1[i]));
        o[4 * i + 2] = static_cast<T>(uint_to_uniform(c2[i]));
        o[4 * i + 3] = static_cast<T>(uint_to_uniform(c3[i]));
      }
    } else {
      alignas(32) float n0[kGroup], n1[kGroup], n2[kGroup], n3[kGroup];
      for (int i = 0; i < kGroup; ++i) {
        box_muller(uint_to_uniform(c0[i]), uint_to_uniform(c1[i]), n0[i], n1[i]);
        box_muller(uint_to_uniform(c2[i]), uint_to_uniform(c3[i]), n2[i], n3[i]);
      }
      for (int i = 0; i < n; ++i) {
        o[4 * i + 0] = static_cast<T>(n0[i]);
        o[4 * i + 1] = static_cast<T>(n1[i]);
        o[4 * i + 2] = static_cast<T>(n2[i]);
        o[4 * i + 3] = static_cast<T>(n3[i]);
      }
    }
  }
}

#if ROMER_PHILOX_HAVE_AVX2
// Hand-vectorised AVX2 kernel: 8 counters per __m256i, two groups in flight. Every float operation
// mirrors the scalar code above one for one, so both paths give identical bits.
namespace avx2 {

inline __m256i mulhi_lo(__m256i x, __m256i m, __m256i& lo) {
  const __m256i pe = _mm256_mul_epu32(x, m);                          // lanes 0, 2, 4, 6
  const __m256i po = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), m);   // lanes 1, 3, 5, 7
  lo = _mm256_blend_epi32(pe, _mm256_slli_epi64(po, 32), 0xAA);
  return _mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA);
}

struct KeySchedule {
  __m256i k0[kRounds], k1[kRounds];
  explicit KeySchedule(uint64_t seed) {
    uint32_t a = static_cast<uint32_t>(seed), b = static_cast<uint32_t>(seed >> 32);
    for (int r = 0; r < kRounds; ++r) {
      k0[r] = _mm256_set1_epi32(static_cast<int>(a));
      k1[r] = _mm256_set1_epi32(static_cast<int>(b));
      a += kBump0;
      b += kBump1;
    }
  }
};

// Counters blk, blk + 1, ..., blk + 7 as (lo, hi) lanes, carrying into hi when lo wraps.
inline void counters8(uint64_t blk, __m256i& lo, __m256i& hi) {
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  lo = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(blk))), iota);
  const __m256i bias = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  // wrapped lanes: lo < iota (unsigned)
  const __m256i wrapped = _mm256_cmpgt_epi32(_mm256_xor_si256(iota, bias), _mm256_xor_si256(lo, bias));
  hi = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(blk >> 32))), wrapped);
}

template <int G>
inline void rounds(__m256i (&c0)[G], __m256i (&c1)[G], __m256i (&c2)[G], __m256i (&c3)[G], const KeySchedule& ks) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kMul0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kMul1));
  for (int r = 0; r < kRounds; ++r) {
    for (int g = 0; g < G; ++g) {
      __m256i lo0, lo1;
      const __m256i hi0 = mulhi_lo(c0[g], m0, lo0);
      const __m256i hi1 = mulhi_lo(c2[g], m1, lo1);
      c0[g] = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[g]), ks.k0[r]);
      c2[g] = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[g]), ks.k1[r]);
      c1[g] = lo1;
      c3[g] = lo0;
    }
  }
}

inline __m256 uniform8(__m256i w) {
  const __m256i x = _mm256_xor_si256(w, _mm256_srai_epi32(w, 31));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(x), _mm256_set1_ps(kUniformScale));
}

inline __m256 log_pos8(__m256 x) {
  using namespace fmath;
  const __m256i ix = _mm256_castps_si256(x);
  const __m256i e = _mm256_srai_epi32(_mm256_sub_epi32(ix, _mm256_set1_epi32(static_cast<int>(kSqrtHalfBits))), 23);
  const __m256 m = _mm256_castsi256_ps(_mm256_sub_epi32(ix, _mm256_slli_epi32(e, 23)));
  const __m256 f = _mm256_sub_ps(m, _mm256_set1_ps(1.0f));
  const __m256 s = _mm256_div_ps(f, _mm256_add_ps(_mm256_set1_ps(2.0f), f));
  const __m256 z = _mm256_mul_ps(s, s);
  __m256 p = _mm256_fmadd_ps(z, _mm256_set1_ps(kLog4), _mm256_set1_ps(kLog3));
  p = _mm256_fmadd_ps(z, p, _mm256_set1_ps(kLog2));
  p = _mm256_fmadd_ps(z, p, _mm256_set1_ps(kLog1));
  const __m256 R = _mm256_mul_ps(z, p);
  const __m256 hfsq = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), f), f);
  const __m256 fe = _mm256_cvtepi32_ps(e);
  const __m256 t = _mm256_fmadd_ps(s, _mm256_add_ps(hfsq, R), _mm256_mul_ps(fe, _mm256_set1_ps(kLn2Lo)));
  return _mm256_add_ps(_mm256_mul_ps(fe, _mm256_set1_ps(kLn2Hi)), _mm256_sub_ps(f, _mm256_sub_ps(hfsq, t)));
}

inline void sincos_pos8(__m256 x, __m256& sin_out, __m256& cos_out) {
  using namespace fmath;
  const __m256 magic = _mm256_set1_ps(kRoundMagic);
  const __m256 q = _mm256_mul_ps(x, _mm256_set1_ps(kTwoOverPi));
  const __m256 kf = _mm256_sub_ps(_mm256_add_ps(q, magic), magic);
  const __m256i k = _mm256_cvttps_epi32(kf);
  const __m256 nk = _mm256_xor_ps(kf, _mm256_set1_ps(-0.0f));  // -kf
  const __m256 r1 = _mm256_fmadd_ps(nk, _mm256_set1_ps(kPio2A), x);
  const __m256 kb = _mm256_mul_ps(kf, _mm256_set1_ps(kPio2B));
  const __m256 kb_err = _mm256_fmsub_ps(kf, _mm256_set1_ps(kPio2B), kb);
  const __m256 r = _mm256_sub_ps(r1, kb);
  const __m256 r1v = _mm256_add_ps(r, kb);
  const __m256 kbv = _mm256_sub_ps(r, r1v);
  const __m256 sum_err = _mm256_sub_ps(_mm256_sub_ps(r1, r1v), _mm256_add_ps(kb, kbv));
  const __m256 rl = _mm256_fmadd_ps(nk, _mm256_set1_ps(kPio2C), _mm256_sub_ps(sum_err, kb_err));
  const __m256 z = _mm256_mul_ps(r, r);
  __m256 ps = _mm256_fmadd_ps(z, _mm256_set1_ps(kSin4), _mm256_set1_ps(kSin3));
  ps = _mm256_fmadd_ps(z, ps, _mm256_set1_ps(kSin2));
  ps = _mm256_fmadd_ps(z, ps, _mm256_set1_ps(kSin1));
  __m256 pc = _mm256_fmadd_ps(z, _mm256_set1_ps(kCos4), _mm256_set1_ps(kCos3));
  pc = _mm256_fmadd_ps(z, pc, _mm256_set1_ps(kCos2));
  pc = _mm256_fmadd_ps(z, pc, _mm256_set1_ps(kCos1));
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 half = _mm256_set1_ps(0.5f);
  const __m256 hz = _mm256_mul_ps(half, z);
  const __m256 w = _mm256_sub_ps(one, hz);
  const __m256 sp = _mm256_add_ps(r, _mm256_fmadd_ps(rl, w, _mm256_mul_ps(_mm256_mul_ps(r, z), ps)));
  const __m256 zerr = _mm256_fmsub_ps(r, r, z);
  const __m256 corr = _mm256_sub_ps(_mm256_sub_ps(_mm256_sub_ps(one, w), hz), _mm256_fmadd_ps(r, rl, _mm256_mul_ps(half, zerr)));
  const __m256 cp = _mm256_add_ps(w, _mm256_add_ps(corr, _mm256_mul_ps(_mm256_mul_ps(z, z), pc)));
  const __m256 swap = _mm256_castsi256_ps(
      _mm256_cmpeq_epi32(_mm256_and_si256(k, _mm256_set1_epi32(1)), _mm256_set1_epi32(1)));
  const __m256 sin_sign = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_and_si256(k, _mm256_set1_epi32(2)), 30));
  const __m256 cos_sign = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_and_si256(_mm256_add_epi32(k, _mm256_set1_epi32(1)), _mm256_set1_epi32(2)), 30));
  sin_out = _mm256_xor_ps(_mm256_blendv_ps(sp, cp, swap), sin_sign);
  cos_out = _mm256_xor_ps(_mm256_blendv_ps(cp, sp, swap), cos_sign);
}

inline void box_muller8(__m256 u1, __m256 u2, __m256& n0, __m256& n1) {
  // max(u1, 1e-7): u1 is never NaN, so this equals the scalar `u1 < kMinU1 ? kMinU1 : u1`.
  u1 = _mm256_max_ps(u1, _mm256_set1_ps(kMinU1));
  const __m256 theta = _mm256_mul_ps(_mm256_set1_ps(kTwoPi), u2);
  const __m256 radius = _mm256_sqrt_ps(_mm256_mul_ps(_mm256_set1_ps(-2.0f), log_pos8(u1)));
  __m256 s, c;
  sincos_pos8(theta, s, c);
  n0 = _mm256_mul_ps(radius, c);
  n1 = _mm256_mul_ps(radius, s);
}

// 4 SoA vectors (lane j of vector w = word w of block j) -> 32 AoS values (block-major).
inline void transpose4x8(__m256i a, __m256i b, __m256i c, __m256i d, __m256i (&o)[4]) {
  const __m256i t0 = _mm256_unpacklo_epi32(a, b);  // a0 b0 a1 b1 | a4 b4 a5 b5
  const __m256i t1 = _mm256_unpackhi_epi32(a, b);  // a2 b2 a3 b3 | a6 b6 a7 b7
  const __m256i t2 = _mm256_unpacklo_epi32(c, d);
  const __m256i t3 = _mm256_unpackhi_epi32(c, d);
  const __m256i q0 = _mm256_unpacklo_epi64(t0, t2);  // blocks 0 | 4
  const __m256i q1 = _mm256_unpackhi_epi64(t0, t2);  // blocks 1 | 5
  const __m256i q2 = _mm256_unpacklo_epi64(t1, t3);  // blocks 2 | 6
  const __m256i q3 = _mm256_unpackhi_epi64(t1, t3);  // blocks 3 | 7
  o[0] = _mm256_permute2x128_si256(q0, q1, 0x20);
  o[1] = _mm256_permute2x128_si256(q2, q3, 0x20);
  o[2] = _mm256_permute2x128_si256(q0, q1, 0x31);
  o[3] = _mm256_permute2x128_si256(q2, q3, 0x31);
}

template <class T>
inline void store32(T* out, const __m256i (&v)[4]) {
  if constexpr (sizeof(T) == 4) {
    for (int j = 0; j < 4; ++j) _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 8 * j), v[j]);
  } else {
    alignas(32) uint32_t tmp[32];
    for (int j = 0; j < 4; ++j) _mm256_store_si256(reinterpret_cast<__m256i*>(tmp + 8 * j), v[j]);
    for (int i = 0; i < 32; ++i) {
      if constexpr (std::is_floating_point_v<T>) {
        out[i] = static_cast<T>(fmath::from_bits(tmp[i]));
      } else {
        out[i] = static_cast<T>(tmp[i]);
      }
    }
  }
}

template <Kind K, class T>
inline void blocks(uint64_t seed, uint64_t blk0, int64_t nblk, T* out) {
  constexpr int G = 2;  // two independent 8-block groups in flight hide the multiply latency
  const KeySchedule ks(seed);
  const int64_t full = nblk - nblk % (8 * G);
  for (int64_t b = 0; b < full; b += 8 * G) {
    __m256i c0[G], c1[G], c2[G], c3[G];
    for (int g = 0; g < G; ++g) {
      counters8(blk0 + static_cast<uint64_t>(b + 8 * g), c0[g], c1[g]);
      c2[g] = _mm256_setzero_si256();
      c3[g] = _mm256_setzero_si256();
    }
    rounds<G>(c0, c1, c2, c3, ks);
    for (int g = 0; g < G; ++g) {
      __m256i o[4];
      if constexpr (K == Kind::Words) {
        transpose4x8(c0[g], c1[g], c2[g], c3[g], o);
      } else if constexpr (K == Kind::Uniform) {
        transpose4x8(_mm256_castps_si256(uniform8(c0[g])), _mm256_castps_si256(uniform8(c1[g])),
                     _mm256_castps_si256(uniform8(c2[g])), _mm256_castps_si256(uniform8(c3[g])), o);
      } else {
        __m256 n0, n1, n2, n3;
        box_muller8(uniform8(c0[g]), uniform8(c1[g]), n0, n1);
        box_muller8(uniform8(c2[g]), uniform8(c3[g]), n2, n3);
        transpose4x8(_mm256_castps_si256(n0), _mm256_castps_si256(n1), _mm256_castps_si256(n2),
                     _mm256_castps_si256(n3), o);
      }
      store32(out + 4 * (b + 8 * g), o);
    }
  }
  if (full < nblk) blocks_generic<K, T>(seed, blk0 + static_cast<uint64_t>(full), nblk - full, out + 4 * full);
}

}  // namespace avx2
#endif  // ROMER_PHILOX_HAVE_AVX2

template <Kind K, class T>
inline void blocks(uint64_t seed, uint64_t blk0, int64_t nblk, T* out) {
#if ROMER_PHILOX_HAVE_AVX2
  avx2::blocks<K, T>(seed, blk0, nblk, out);
#else
  blocks_generic<K, T>(seed, blk0, nblk, out);
#endif
}

// Blocks per parallel work item (16384 elements); fixed, so the work split never depends on threads.
inline constexpr int64_t kChunkBlocks = 4096;

inline int resolve_threads(int num_threads) {
#if defined(_OPENMP)
  return num_threads > 0 ? num_threads : omp_get_max_threads();
#else
  (void)num_threads;
  return 1;
#endif
}

template <Kind K, class T>
inline void fill(uint64_t seed, int64_t start, int64_t count, T* out, int num_threads) {
  if (start < 0 || count < 0) {
    throw std::invalid_argument("philox fill: stream range must be non-negative, got start=" +
                                std::to_string(start) + ", count=" + std::to_string(count));
  }
  if (count > std::numeric_limits<int64_t>::max() - start) {
    throw std::invalid_argument("philox fill: start + count overflows int64");
  }
  if (count == 0) return;
  const int64_t end = start + count;
  int64_t e = start;
  // Head: the part of the first block before a block boundary.
  if (e % 4 != 0) {
    T tmp[4];
    const int64_t blk = e / 4;
    blocks<K, T>(seed, static_cast<uint64_t>(blk), 1, tmp);
    const int64_t stop = std::min<int64_t>(end, 4 * blk + 4);
    for (int64_t i = e; i < stop; ++i) out[i - start] = tmp[i - 4 * blk];
    e = stop;
  }
  // Body: whole blocks, in parallel chunks.
  const int64_t first = e / 4;
  const int64_t nblk = (end - e) / 4;
  if (nblk > 0) {
    T* body = out + (e - start);
    const int64_t nchunks = (nblk + kChunkBlocks - 1) / kChunkBlocks;
    const int threads = static_cast<int>(std::min<int64_t>(resolve_threads(num_threads), nchunks));
    if (threads <= 1) {
      blocks<K, T>(seed, static_cast<uint64_t>(first), nblk, body);
    } else {
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) num_threads(threads)
#endif
      for (int64_t c = 0; c < nchunks; ++c) {
        const int64_t b = c * kChunkBlocks;
        const int64_t n = std::min<int64_t>(kChunkBlocks, nblk - b);
        blocks<K, T>(seed, static_cast<uint64_t>(first + b), n, body + 4 * b);
      }
    }
    e += 4 * nblk;
  }
  // Tail: the first elements of the last block.
  if (e < end) {
    T tmp[4];
    const int64_t blk = e / 4;
    blocks<K, T>(seed, static_cast<uint64_t>(blk), 1, tmp);
    for (int64_t i = e; i < end; ++i) out[i - start] = tmp[i - 4 * blk];
  }
}

}  // namespace detail

// ------------------------------------------------------------------------------------------------
// Public fill functions. num_threads <= 0: OpenMP default (omp_get_max_threads()).
// ------------------------------------------------------------------------------------------------
template <class T>
inline void philox_fill_uint32(uint64_t seed, int64_t start, int64_t count, T* out, int num_threads = 0) {
  static_assert(std::is_integral_v<T> && (sizeof(T) > 4 || (sizeof(T) == 4 && std::is_unsigned_v<T>)),
                "philox_fill_uint32 needs uint32_t or a 64-bit integer output");
  detail::fill<Kind::Words, T>(seed, start, count, out, num_threads);
}

template <class T>
inline void philox_fill_uniform(uint64_t seed, int64_t start, int64_t count, T* out, int num_threads = 0) {
  static_assert(std::is_floating_point_v<T>, "philox_fill_uniform needs a float or double output");
  detail::fill<Kind::Uniform, T>(seed, start, count, out, num_threads);
}

template <class T>
inline void philox_fill_normal(uint64_t seed, int64_t start, int64_t count, T* out, int num_threads = 0) {
  static_assert(std::is_floating_point_v<T>, "philox_fill_normal needs a float or double output");
  detail::fill<Kind::Normal, T>(seed, start, count, out, num_threads);
}

}  // inline namespace isa_avx2 / isa_generic
}  // namespace philox
}  // namespace romer
