// y = x @ W^T for weights kept in GGUF's block formats (q4_0, q4_1, q8_0), with AVX2 integer dot products.
//
// Why it looks like this: decoding reads every weight once per token, so the weights stay packed (0.56-1.06
// bytes per weight instead of 4) and are expanded in registers. x is quantized once per call to 8 bits per
// block of 32 (llama.cpp's q8 activations), which turns each 32-weight block into one `maddubs` + `madd`
// instead of 32 float FMAs. The kernels, by rows M of x (linear.py picks; benchmarks/kernels.py measures):
//   gemv      M = 1, GGUF rows: one sequential stream per thread, prefetched (decode)
//   tile_q8   M = 2..3, GGUF rows: RM x RN register tiles
//   packed    M >= 4: 8-row weight tiles re-laid out per call so 8 rows share each instruction (~2x fp32 MKL)
//   x8        the same re-layout stored at load ("x8 layout"): decode and batched decode read it directly
//   tile_f32 / mm   fp32 activations: blocks expanded to floats in registers / dequantized chunks + MKL
//
// Only light headers (no <torch/extension.h>, no pybind11): ops are registered with TORCH_LIBRARY and
// called through torch.ops, which halves the first build and keeps the ops visible to torch.compile.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

namespace {

constexpr int64_t QK = 32;
// Work below which a second thread costs more to wake than it saves (in weight blocks x rows of x).
constexpr int64_t kMinParallelBlocks = 8192;
enum Fmt : int64_t { Q4_0 = 0, Q4_1 = 1, Q8_0 = 2 };

// Format ids 0..2: q4_0, q4_1, q8_0 in GGUF's layout (row by row); 3..5: the same formats in the x8 layout
// (groups of 8 rows interleaved per block, see "x8 layout" below). Both hold the same bytes per weight.
constexpr int64_t X8 = 3;
inline bool is_x8(int64_t fmt) { return fmt >= X8; }

inline int64_t block_bytes(int64_t fmt) {
  TORCH_CHECK(fmt >= 0 && fmt <= 5, "llama_adapter_quant: unknown format id ", fmt);
  fmt %= X8;
  return fmt == Q4_0 ? 18 : fmt == Q4_1 ? 20 : 34;
}

inline float h2f(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// ------------------------------------------------------------------------------------------- weight blocks
// Per format: the 32 quants in one register (q4: unsigned 0..15 in element order; q8: signed) and the scales.
// q4 nibbles: one broadcast load puts the 16 bytes in both 128-bit lanes, a per-lane shift (0 | 4) and a mask
// leave elements 0..15 in the low lane and 16..31 in the high one: 3 instructions.
inline __m256i nibbles(const uint8_t* p) {
  const __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_and_si256(_mm256_srlv_epi32(b, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)), _mm256_set1_epi8(0x0F));
}

template <int F>
struct Block;

template <>
struct Block<Q4_0> {  // value = d * (q - 8)
  static constexpr int64_t BYTES = 18;
  static inline __m256i q(const uint8_t* p) { return nibbles(p + 2); }
};

template <>
struct Block<Q4_1> {  // value = d * q + m
  static constexpr int64_t BYTES = 20;
  static inline __m256i q(const uint8_t* p) { return nibbles(p + 4); }
  // d and m are adjacent: one load and one conversion for both.
  static inline void dm(const uint8_t* p, __m256& d, __m256& m) {
    uint32_t v;
    std::memcpy(&v, p, 4);
    const __m256 f = _mm256_castps128_ps256(_mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(v))));
    d = _mm256_broadcastss_ps(_mm256_castps256_ps128(f));
    m = _mm256_permutevar8x32_ps(f, _mm256_set1_epi32(1));
  }
};

template <>
struct Block<Q8_0> {  // value = d * q
  static constexpr int64_t BYTES = 34;
  static inline __m256i q(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 2)); }
};

// ---------------------------------------------------------------------------------- activation quantization
// x [M, K] fp32 -> per block of 32: q (int8), d (scale) and what each format needs for its offset term:
//   q4_1: s = d * sum(q) / 8 (the min term m*s is spread over the 8 float lanes: one FMA, no extra register)
//   q4_0: o = 8 * (q[2i] + q[2i+1]) as 16 int16, so maddubs(q_w, q_x) - o = sum((q_w - 8) * q_x) exactly,
//         one integer subtract per block instead of a float term.
// Blocks are stored group-interleaved: rows are taken G at a time (G = the kernel's RM) and block b of row m
// sits at slot ((m / G) * KB + b) * G + m % G, so a tile walks one pointer per array instead of one per row
// (4 rows x 3 arrays of pointers did not fit the general registers and spilled).
struct ActQ {
  int64_t G = 1;
  std::unique_ptr<int8_t[]> q;
  std::unique_ptr<float[]> d, s;
  std::unique_ptr<int16_t[]> o;
  std::unique_ptr<int32_t[]> i8;  // q4_0, packed kernel: 8 * sum(q) per block
};

ActQ quantize_act(const float* x, int64_t M, int64_t K, int64_t fmt, int64_t G) {
  const int64_t KB = K / QK, nb = M * KB, slots = (M + G - 1) / G * G * KB;
  ActQ a;
  a.G = G;
  a.q.reset(new int8_t[slots * QK]);
  a.d.reset(new float[slots]);
  if (fmt == Q4_1) a.s.reset(new float[slots]);
  if (fmt == Q4_0) a.o.reset(new int16_t[slots * 16]);
  if (fmt == Q4_0) a.i8.reset(new int32_t[slots]);
  int8_t* q = a.q.get();
  float* d = a.d.get();
  float* s = a.s.get();
  int16_t* o = a.o.get();
  int32_t* i8 = a.i8.get();
  at::parallel_for(0, nb, 1024, [&](int64_t b0, int64_t b1) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t i = b0; i < b1; ++i) {
      const float* p = x + i * QK;
      const int64_t row = i / KB, slot = (row / G * KB + i % KB) * G + row % G;
      __m256 v0 = _mm256_loadu_ps(p), v1 = _mm256_loadu_ps(p + 8), v2 = _mm256_loadu_ps(p + 16),
             v3 = _mm256_loadu_ps(p + 24);
      __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
      const float amax = _mm_cvtss_f32(m4);
      const float dd = amax / 127.0f, id = amax != 0.0f ? 127.0f / amax : 0.0f;
      const __m256 mul = _mm256_set1_ps(id);
      constexpr int R = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
      __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, mul), R));
      __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, mul), R));
      __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, mul), R));
      __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, mul), R));
      if (s || i8) {
        const __m256i sum32 = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum32), _mm256_extracti128_si256(sum32, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
        const int isum = _mm_cvtsi128_si32(s4);
        if (s) s[slot] = dd * static_cast<float>(isum) * 0.125f;
        if (i8) i8[slot] = 8 * isum;
      }
      i0 = _mm256_packs_epi32(i0, i1);
      i2 = _mm256_packs_epi32(i2, i3);
      i0 = _mm256_packs_epi16(i0, i2);
      i0 = _mm256_permutevar8x32_epi32(i0, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + slot * QK), i0);
      if (o) {
        const __m256i pairs = _mm256_maddubs_epi16(_mm256_set1_epi8(1), i0);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + slot * 16), _mm256_slli_epi16(pairs, 3));
      }
      d[slot] = dd;
    }
  });
  return a;
}

// ------------------------------------------------------------------------------------------ int8 kernel
// RM activation rows x RN weight rows over all of K; the RM*RN accumulators stay in registers.
template <int F, int RM, int RN>
inline void tile_q8(const uint8_t* w, int64_t row_bytes, const ActQ& a, int64_t K, int64_t m0, int64_t n0, float* y,
                    int64_t ldy) {
  using B = Block<F>;
  const int64_t KB = K / QK;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[RM][RN];
  for (int m = 0; m < RM; ++m)
    for (int n = 0; n < RN; ++n) acc[m][n] = _mm256_setzero_ps();
  const uint8_t* wr = w + n0 * row_bytes;
  const int64_t G = a.G, base = m0 / G * KB * G + m0 % G;  // slot of (m0, b = 0); the next block is G on
  const int8_t* qa = a.q.get() + base * QK;
  const float* da = a.d.get() + base;
  const float* sa = F == Q4_1 ? a.s.get() + base : nullptr;
  const int16_t* oa = F == Q4_0 ? a.o.get() + base * 16 : nullptr;
  for (int64_t b = 0; b < KB; ++b) {
    __m256i wq[RN], wabs[RN];
    __m256 wd[RN], wm[RN];
    for (int n = 0; n < RN; ++n) {
      const uint8_t* p = wr + n * row_bytes + b * B::BYTES;
      wq[n] = B::q(p);
      if constexpr (F == Q4_1) {
        B::dm(p, wd[n], wm[n]);
      } else {
        wd[n] = _mm256_set1_ps(h2f(p));
      }
      if constexpr (F == Q8_0) wabs[n] = _mm256_sign_epi8(wq[n], wq[n]);  // maddubs wants one unsigned side
    }
    for (int m = 0; m < RM; ++m) {
      const int64_t sl = b * G + m;
      const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qa + sl * QK));
      const __m256 ad = _mm256_broadcast_ss(da + sl);
      __m256 as;
      __m256i ao;
      if constexpr (F == Q4_1) as = _mm256_broadcast_ss(sa + sl);
      if constexpr (F == Q4_0) ao = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(oa + sl * 16));
      for (int n = 0; n < RN; ++n) {
        __m256i p16;
        if constexpr (F == Q8_0) {
          p16 = _mm256_maddubs_epi16(wabs[n], _mm256_sign_epi8(av, wq[n]));
        } else if constexpr (F == Q4_0) {
          p16 = _mm256_sub_epi16(_mm256_maddubs_epi16(wq[n], av), ao);
        } else {
          p16 = _mm256_maddubs_epi16(wq[n], av);
        }
        const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
        acc[m][n] = _mm256_fmadd_ps(_mm256_mul_ps(wd[n], ad), dot, acc[m][n]);
        if constexpr (F == Q4_1) acc[m][n] = _mm256_fmadd_ps(wm[n], as, acc[m][n]);
      }
    }
  }
  for (int m = 0; m < RM; ++m)
    for (int n = 0; n < RN; ++n) y[(m0 + m) * ldy + n0 + n] = hsum(acc[m][n]);
}

// ------------------------------------------------------------------------------------------ decode (M = 1)
// One weight row at a time, in memory order: a single sequential stream keeps DRAM prefetching at full speed
// (4 rows in lockstep, 4 interleaved streams, measured 1.5x slower once the weights come from DRAM), with a
// software prefetch ~1 KB ahead. Two blocks per iteration into separate accumulators (and q4_1's min term in
// its own) so consecutive FMAs do not wait on each other's 4-cycle latency.
#ifndef QPF
#define QPF 1024
#endif

template <int F>
inline void gemv_block(const uint8_t* p, const int8_t* qa, float da, const float* sa, const int16_t* oa,
                       __m256& acc, __m256& accm) {
  using B = Block<F>;
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i wq = B::q(p);
  const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qa));
  __m256i p16;
  __m256 wd, wm;
  if constexpr (F == Q4_1) {
    B::dm(p, wd, wm);
    p16 = _mm256_maddubs_epi16(wq, av);
    accm = _mm256_fmadd_ps(wm, _mm256_broadcast_ss(sa), accm);
  } else if constexpr (F == Q4_0) {
    wd = _mm256_set1_ps(h2f(p));
    p16 = _mm256_sub_epi16(_mm256_maddubs_epi16(wq, av), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(oa)));
  } else {
    wd = _mm256_set1_ps(h2f(p));
    p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(wq, wq), _mm256_sign_epi8(av, wq));
  }
  const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
  acc = _mm256_fmadd_ps(_mm256_mul_ps(wd, _mm256_set1_ps(da)), dot, acc);
}

template <int F>
float gemv_row(const uint8_t* row, const ActQ& a, int64_t KB) {
  using B = Block<F>;
  const int8_t* qa = a.q.get();
  const float* da = a.d.get();
  const float* sa = a.s.get();
  const int16_t* oa = a.o.get();
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  __m256 accm0 = _mm256_setzero_ps(), accm1 = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 1 < KB; b += 2) {
    const uint8_t* p = row + b * B::BYTES;
    _mm_prefetch(reinterpret_cast<const char*>(p + QPF), _MM_HINT_T0);
    gemv_block<F>(p, qa + b * QK, da[b], sa + b, oa + b * 16, acc0, accm0);
    gemv_block<F>(p + B::BYTES, qa + (b + 1) * QK, da[b + 1], sa + b + 1, oa + (b + 1) * 16, acc1, accm1);
  }
  if (b < KB) gemv_block<F>(row + b * B::BYTES, qa + b * QK, da[b], sa + b, oa + b * 16, acc0, accm0);
  return hsum(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(accm0, accm1)));
}

template <int F>
void gemv(const uint8_t* w, int64_t row_bytes, const ActQ& a, int64_t N, int64_t K, float* y) {
  const int64_t KB = K / QK;
  at::parallel_for(0, N, std::max<int64_t>(1, kMinParallelBlocks / KB), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) y[n] = gemv_row<F>(w + n * row_bytes, a, KB);
  });
}

// ------------------------------------------------------------------------------------------ fp32 kernel
// Exact activations: x stays fp32 and each weight block becomes 32 floats (q4_0: q - 8, so no offset term).
// The block's dot sum(q*x) is scaled once by d; q4_1's min uses sum(x) per block (xs = sum / 8, lane-spread).
template <int F>
inline void block_floats(const uint8_t* p, __m256 out[4]) {
  __m256i q = Block<F>::q(p);
  if constexpr (F == Q4_0) q = _mm256_sub_epi8(q, _mm256_set1_epi8(8));
  const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
  if constexpr (F == Q4_1) {
    out[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    out[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    out[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    out[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
  } else {
    out[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
    out[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
    out[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
    out[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
  }
}

template <int F>
inline void block_scales(const uint8_t* p, __m256& d, __m256& m) {
  if constexpr (F == Q4_1) {
    Block<F>::dm(p, d, m);
  } else {
    d = _mm256_set1_ps(h2f(p));
    m = _mm256_setzero_ps();
  }
}

template <int F, int RM, int RN>
inline void tile_f32(const uint8_t* w, int64_t row_bytes, const float* x, const float* xs, int64_t K, int64_t m0,
                     int64_t n0, float* y, int64_t ldy) {
  using B = Block<F>;
  const int64_t KB = K / QK;
  __m256 acc[RM][RN];
  for (int m = 0; m < RM; ++m)
    for (int n = 0; n < RN; ++n) acc[m][n] = _mm256_setzero_ps();
  for (int64_t b = 0; b < KB; ++b) {
    __m256 wf[RN][4], wd[RN], wm[RN];
    for (int n = 0; n < RN; ++n) {
      const uint8_t* p = w + (n0 + n) * row_bytes + b * B::BYTES;
      block_floats<F>(p, wf[n]);
      block_scales<F>(p, wd[n], wm[n]);
    }
    for (int m = 0; m < RM; ++m) {
      const float* xp = x + (m0 + m) * K + b * QK;
      const __m256 x0 = _mm256_loadu_ps(xp), x1 = _mm256_loadu_ps(xp + 8), x2 = _mm256_loadu_ps(xp + 16),
                   x3 = _mm256_loadu_ps(xp + 24);
      __m256 xsv;
      if constexpr (F == Q4_1) xsv = _mm256_broadcast_ss(xs + (m0 + m) * KB + b);
      for (int n = 0; n < RN; ++n) {
        __m256 t = _mm256_mul_ps(wf[n][0], x0);
        t = _mm256_fmadd_ps(wf[n][1], x1, t);
        t = _mm256_fmadd_ps(wf[n][2], x2, t);
        t = _mm256_fmadd_ps(wf[n][3], x3, t);
        acc[m][n] = _mm256_fmadd_ps(wd[n], t, acc[m][n]);
        if constexpr (F == Q4_1) acc[m][n] = _mm256_fmadd_ps(wm[n], xsv, acc[m][n]);
      }
    }
  }
  for (int m = 0; m < RM; ++m)
    for (int n = 0; n < RN; ++n) y[(m0 + m) * ldy + n0 + n] = hsum(acc[m][n]);
}

// ----------------------------------------------------------------------------------------- packed kernel
// For several rows of x (M >= 2), each weight tile of 8 rows is first re-laid out so that one register holds
// elements 4j..4j+3 of all 8 rows (row r in 32-bit lane r). Then a 4-byte broadcast of x meets 8 rows at once:
// per block the 8 lanes accumulate 8 rows' integer dots (q4: in int16, 8 x 3810 < 32767), and the scale,
// conversion and FMA happen once per 8 rows instead of once per row. The re-layout costs about as much as
// one row of x and is reused by every row of x (the llama.cpp "q4_0_8x8" idea, done per call on GGUF blocks).
constexpr int NR = 8;

template <int F>
struct Packed {
  static constexpr int64_t QBYTES = F == Q8_0 ? 512 : 256;  // q8_0 keeps |q| next to q for maddubs
  static constexpr int64_t BYTES = QBYTES + 64;             // + 8 scales d, + 8 mins (q4_1, times 8)
};

inline void transpose8x8_epi32(__m256i r[8]) {
  const __m256i t0 = _mm256_unpacklo_epi32(r[0], r[1]), t1 = _mm256_unpackhi_epi32(r[0], r[1]);
  const __m256i t2 = _mm256_unpacklo_epi32(r[2], r[3]), t3 = _mm256_unpackhi_epi32(r[2], r[3]);
  const __m256i t4 = _mm256_unpacklo_epi32(r[4], r[5]), t5 = _mm256_unpackhi_epi32(r[4], r[5]);
  const __m256i t6 = _mm256_unpacklo_epi32(r[6], r[7]), t7 = _mm256_unpackhi_epi32(r[6], r[7]);
  const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
  const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
  const __m256i u4 = _mm256_unpacklo_epi64(t4, t6), u5 = _mm256_unpackhi_epi64(t4, t6);
  const __m256i u6 = _mm256_unpacklo_epi64(t5, t7), u7 = _mm256_unpackhi_epi64(t5, t7);
  r[0] = _mm256_permute2x128_si256(u0, u4, 0x20);
  r[1] = _mm256_permute2x128_si256(u1, u5, 0x20);
  r[2] = _mm256_permute2x128_si256(u2, u6, 0x20);
  r[3] = _mm256_permute2x128_si256(u3, u7, 0x20);
  r[4] = _mm256_permute2x128_si256(u0, u4, 0x31);
  r[5] = _mm256_permute2x128_si256(u1, u5, 0x31);
  r[6] = _mm256_permute2x128_si256(u2, u6, 0x31);
  r[7] = _mm256_permute2x128_si256(u3, u7, 0x31);
}

// Rows n0 .. n0+rows-1 (rows <= 8; missing rows are zero) -> buf [KB][Packed<F>::BYTES].
template <int F>
void pack_tile(const uint8_t* w, int64_t row_bytes, int64_t n0, int rows, int64_t KB, uint8_t* buf) {
  using P = Packed<F>;
  for (int64_t b = 0; b < KB; ++b) {
    __m256i r[NR];
    alignas(32) float d[NR], m[NR];
    for (int i = 0; i < NR; ++i) {
      if (i < rows) {
        const uint8_t* p = w + (n0 + i) * row_bytes + b * Block<F>::BYTES;
        r[i] = Block<F>::q(p);
        d[i] = h2f(p);
        m[i] = F == Q4_1 ? 8.0f * h2f(p + 2) : 0.0f;
      } else {
        r[i] = _mm256_setzero_si256();
        d[i] = m[i] = 0.0f;
      }
    }
    transpose8x8_epi32(r);
    uint8_t* o = buf + b * P::BYTES;
    for (int j = 0; j < NR; ++j) {
      _mm256_store_si256(reinterpret_cast<__m256i*>(o + 32 * j), r[j]);
      if constexpr (F == Q8_0)
        _mm256_store_si256(reinterpret_cast<__m256i*>(o + 256 + 32 * j), _mm256_sign_epi8(r[j], r[j]));
    }
    _mm256_store_ps(reinterpret_cast<float*>(o + P::QBYTES), _mm256_load_ps(d));
    _mm256_store_ps(reinterpret_cast<float*>(o + P::QBYTES + 32), _mm256_load_ps(m));
  }
}

// MR rows of x (m0 .. m0+MR-1, one activation group) x one packed tile -> y[m][n0 .. n0+rows-1].
template <int F, int MR>
void packed_kernel(const uint8_t* buf, int64_t KB, const ActQ& a, int64_t m0, float* y, int64_t ldy, int64_t n0,
                   int rows) {
  using P = Packed<F>;
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t G = a.G, base = m0 / G * KB * G + m0 % G;
  const int8_t* qa = a.q.get();
  const float* da = a.d.get();
  __m256 acc[MR];
  for (int mr = 0; mr < MR; ++mr) acc[mr] = _mm256_setzero_ps();
  for (int64_t b = 0; b < KB; ++b) {
    const uint8_t* t = buf + b * P::BYTES;
    const int64_t slot = base + b * G;
    __m256i s[MR];
    for (int mr = 0; mr < MR; ++mr) s[mr] = _mm256_setzero_si256();
    for (int j = 0; j < NR; ++j) {
      const __m256i wq = _mm256_load_si256(reinterpret_cast<const __m256i*>(t + 32 * j));
      __m256i wabs;
      if constexpr (F == Q8_0) wabs = _mm256_load_si256(reinterpret_cast<const __m256i*>(t + 256 + 32 * j));
      for (int mr = 0; mr < MR; ++mr) {
        int32_t v;
        std::memcpy(&v, qa + (slot + mr) * QK + 4 * j, 4);
        const __m256i av = _mm256_set1_epi32(v);
        if constexpr (F == Q8_0) {
          s[mr] = _mm256_add_epi32(s[mr], _mm256_madd_epi16(_mm256_maddubs_epi16(wabs, _mm256_sign_epi8(av, wq)), ones));
        } else {
          s[mr] = _mm256_add_epi16(s[mr], _mm256_maddubs_epi16(wq, av));
        }
      }
    }
    const __m256 dw = _mm256_load_ps(reinterpret_cast<const float*>(t + P::QBYTES));
    __m256 mw;
    if constexpr (F == Q4_1) mw = _mm256_load_ps(reinterpret_cast<const float*>(t + P::QBYTES + 32));
    for (int mr = 0; mr < MR; ++mr) {
      __m256i s32 = F == Q8_0 ? s[mr] : _mm256_madd_epi16(s[mr], ones);
      if constexpr (F == Q4_0) s32 = _mm256_sub_epi32(s32, _mm256_set1_epi32(a.i8[slot + mr]));
      acc[mr] = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_broadcast_ss(da + slot + mr)), _mm256_cvtepi32_ps(s32), acc[mr]);
      if constexpr (F == Q4_1) acc[mr] = _mm256_fmadd_ps(mw, _mm256_broadcast_ss(a.s.get() + slot + mr), acc[mr]);
    }
  }
  for (int mr = 0; mr < MR; ++mr) {
    float* yr = y + (m0 + mr) * ldy + n0;
    if (rows == NR) {
      _mm256_storeu_ps(yr, acc[mr]);
    } else {
      alignas(32) float tmp[NR];
      _mm256_store_ps(tmp, acc[mr]);
      for (int r = 0; r < rows; ++r) yr[r] = tmp[r];
    }
  }
}

#ifndef QPMR
#define QPMR 4
#endif
constexpr int PMR = QPMR;  // rows of x per packed micro-kernel call (= the activation group size)

template <int F, int MR>
inline void packed_dispatch(int mr, const uint8_t* buf, int64_t KB, const ActQ& a, int64_t m0, float* y,
                            int64_t ldy, int64_t n0, int rows) {
  if constexpr (MR > 1) {
    if (mr < MR) return packed_dispatch<F, MR - 1>(mr, buf, KB, a, m0, y, ldy, n0, rows);
  }
  packed_kernel<F, MR>(buf, KB, a, m0, y, ldy, n0, rows);
}

// ------------------------------------------------------------------------------------------- x8 layout
// The packed kernel's re-layout, done once at load and kept: rows in groups of 8, and per group and block b
// (8 blocks' bytes, in the same 18/20/34 bytes per block as GGUF):
//   [d of rows 0..7: 8 x fp16] [q4_1: m of rows 0..7: 8 x fp16] [quants]
//   q4: 4 x 32 bytes L_t; byte 4r + i of L_t: low nibble = row r element 8t + i, high nibble = element 8t + 4 + i
//       (so L_t & 15 and L_t >> 4 are the packed kernel's registers for elements 8t.. and 8t + 4..)
//   q8: 8 x 32 bytes W_j; bytes 4r .. 4r + 3 = row r elements 4j .. 4j + 3
// Decode then reads one sequential stream and spends ~4 instructions per 32 weights instead of ~13.
template <int F>
struct X8L {
  static constexpr int64_t BB = Block<F>::BYTES, GB = 8 * BB, HDR = F == Q4_1 ? 32 : 16;
};

template <int F, int MR>
void x8_kernel(const uint8_t* g, int64_t KB, const ActQ& a, int64_t m0, float* y, int64_t ldy, int64_t n0) {
  using X = X8L<F>;
  const __m256i ones = _mm256_set1_epi16(1), m4 = _mm256_set1_epi8(0x0F);
  const int64_t G = a.G, base = m0 / G * KB * G + m0 % G;
  const int8_t* qa = a.q.get();
  const float* da = a.d.get();
  __m256 acc[MR];
  for (int mr = 0; mr < MR; ++mr) acc[mr] = _mm256_setzero_ps();
  for (int64_t b = 0; b < KB; ++b) {
    const uint8_t* t = g + b * X::GB;
    if constexpr (MR == 1) {  // decode streams the weights once: fetch ~1 KB ahead
      for (int64_t o = 0; o < X::GB; o += 64) _mm_prefetch(reinterpret_cast<const char*>(t + QPF + o), _MM_HINT_T0);
    }
    const int64_t slot = base + b * G;
    __m256i s[MR];
    for (int mr = 0; mr < MR; ++mr) s[mr] = _mm256_setzero_si256();
    if constexpr (F == Q8_0) {
      for (int j = 0; j < NR; ++j) {
        const __m256i wq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + X::HDR + 32 * j));
        const __m256i wabs = _mm256_sign_epi8(wq, wq);
        for (int mr = 0; mr < MR; ++mr) {
          int32_t v;
          std::memcpy(&v, qa + (slot + mr) * QK + 4 * j, 4);
          const __m256i p = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(_mm256_set1_epi32(v), wq));
          s[mr] = _mm256_add_epi32(s[mr], _mm256_madd_epi16(p, ones));
        }
      }
    } else {
      for (int q = 0; q < 4; ++q) {
        const __m256i l = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + X::HDR + 32 * q));
        const __m256i lo = _mm256_and_si256(l, m4), hi = _mm256_and_si256(_mm256_srli_epi16(l, 4), m4);
        for (int mr = 0; mr < MR; ++mr) {
          int32_t v0, v1;
          std::memcpy(&v0, qa + (slot + mr) * QK + 8 * q, 4);
          std::memcpy(&v1, qa + (slot + mr) * QK + 8 * q + 4, 4);
          s[mr] = _mm256_add_epi16(s[mr], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(v0)));
          s[mr] = _mm256_add_epi16(s[mr], _mm256_maddubs_epi16(hi, _mm256_set1_epi32(v1)));
        }
      }
    }
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t)));
    __m256 mw;
    if constexpr (F == Q4_1)
      mw = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t + 16))), _mm256_set1_ps(8.0f));
    for (int mr = 0; mr < MR; ++mr) {
      __m256i s32 = F == Q8_0 ? s[mr] : _mm256_madd_epi16(s[mr], ones);
      if constexpr (F == Q4_0) s32 = _mm256_sub_epi32(s32, _mm256_set1_epi32(a.i8[slot + mr]));
      acc[mr] = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_broadcast_ss(da + slot + mr)), _mm256_cvtepi32_ps(s32), acc[mr]);
      if constexpr (F == Q4_1) acc[mr] = _mm256_fmadd_ps(mw, _mm256_broadcast_ss(a.s.get() + slot + mr), acc[mr]);
    }
  }
  for (int mr = 0; mr < MR; ++mr) _mm256_storeu_ps(y + (m0 + mr) * ldy + n0, acc[mr]);
}

template <int F, int MR>
inline void x8_dispatch(int mr, const uint8_t* g, int64_t KB, const ActQ& a, int64_t m0, float* y, int64_t ldy,
                        int64_t n0) {
  if constexpr (MR > 1) {
    if (mr < MR) return x8_dispatch<F, MR - 1>(mr, g, KB, a, m0, y, ldy, n0);
  }
  x8_kernel<F, MR>(g, KB, a, m0, y, ldy, n0);
}

template <int F>
void gemm_x8(const uint8_t* w, const ActQ& a, int64_t M, int64_t N, int64_t K, float* y) {
  const int64_t KB = K / QK, groups = N / NR, gbytes = KB * X8L<F>::GB;
  const int64_t MC = std::max<int64_t>(PMR, 256 * 1024 / K / PMR * PMR);
  const int64_t grain = std::max<int64_t>(1, kMinParallelBlocks / (M * KB * NR));
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    for (int64_t mc = 0; mc < M; mc += MC) {
      const int64_t me = std::min(M, mc + MC);
      for (int64_t g = g0; g < g1; ++g)
        for (int64_t m0 = mc; m0 < me; m0 += a.G)
          x8_dispatch<F, PMR>(static_cast<int>(std::min<int64_t>(a.G, me - m0)), w + g * gbytes, KB, a, m0, y, N,
                              g * NR);
    }
  });
}

// GGUF rows <-> x8 groups (a byte permutation; 8 rows at a time through the 8x8 transpose).
template <int F>
void to_x8_group(const uint8_t* rows, int64_t row_bytes, int64_t KB, uint8_t* out) {
  using X = X8L<F>;
  for (int64_t b = 0; b < KB; ++b) {
    uint8_t* t = out + b * X::GB;
    __m256i r[NR];
    for (int i = 0; i < NR; ++i) {
      const uint8_t* p = rows + i * row_bytes + b * X::BB;
      r[i] = Block<F>::q(p);
      std::memcpy(t + 2 * i, p, 2);
      if constexpr (F == Q4_1) std::memcpy(t + 16 + 2 * i, p + 2, 2);
    }
    transpose8x8_epi32(r);
    if constexpr (F == Q8_0) {
      for (int j = 0; j < NR; ++j) _mm256_storeu_si256(reinterpret_cast<__m256i*>(t + X::HDR + 32 * j), r[j]);
    } else {
      for (int q = 0; q < 4; ++q)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(t + X::HDR + 32 * q),
                            _mm256_or_si256(r[2 * q], _mm256_slli_epi16(r[2 * q + 1], 4)));
    }
  }
}

// One x8 block-group -> the 8 rows' 32 quants each in element order (q4: 0..15, q8: signed).
template <int F>
inline void x8_rows(const uint8_t* t, __m256i r[NR]) {
  using X = X8L<F>;
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  for (int q = 0; q < (F == Q8_0 ? 8 : 4); ++q) {
    const __m256i l = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + X::HDR + 32 * q));
    if constexpr (F == Q8_0) {
      r[q] = l;
    } else {
      r[2 * q] = _mm256_and_si256(l, m4);
      r[2 * q + 1] = _mm256_and_si256(_mm256_srli_epi16(l, 4), m4);
    }
  }
  transpose8x8_epi32(r);  // its own inverse
}

template <int F>
void from_x8_group(const uint8_t* t0, int64_t KB, uint8_t* rows, int64_t row_bytes) {
  using X = X8L<F>;
  for (int64_t b = 0; b < KB; ++b) {
    const uint8_t* t = t0 + b * X::GB;
    __m256i r[NR];
    x8_rows<F>(t, r);
    for (int i = 0; i < NR; ++i) {
      uint8_t* p = rows + i * row_bytes + b * X::BB;
      std::memcpy(p, t + 2 * i, 2);
      if constexpr (F == Q8_0) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + 2), r[i]);
      } else {
        if constexpr (F == Q4_1) std::memcpy(p + 2, t + 16 + 2 * i, 2);
        const __m128i lo = _mm256_castsi256_si128(r[i]), hi = _mm256_extracti128_si256(r[i], 1);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(p + (F == Q4_1 ? 4 : 2)), _mm_or_si128(lo, _mm_slli_epi16(hi, 4)));
      }
    }
  }
}

// Rows r0 .. r1-1 of an x8 weight as fp32 (dequantize, embedding, the "mm" kernel, the input gradient).
template <int F>
void dequant_rows_x8(const uint8_t* w, int64_t r0, int64_t r1, int64_t K, float* out) {
  using X = X8L<F>;
  const int64_t KB = K / QK;
  for (int64_t g = r0 / NR; g * NR < r1; ++g) {
    for (int64_t b = 0; b < KB; ++b) {
      const uint8_t* t = w + (g * KB + b) * X::GB;
      __m256i r[NR];
      x8_rows<F>(t, r);
      for (int i = 0; i < NR; ++i) {
        const int64_t row = g * NR + i;
        if (row < r0 || row >= r1) continue;
        __m256i q = r[i];
        if constexpr (F == Q4_0) q = _mm256_sub_epi8(q, _mm256_set1_epi8(8));
        const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
        __m256 f[4];
        if constexpr (F == Q4_1) {
          f[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
          f[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
          f[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
          f[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
        } else {
          f[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
          f[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
          f[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
          f[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
        }
        const __m256 d = _mm256_set1_ps(h2f(t + 2 * i));
        const __m256 m = F == Q4_1 ? _mm256_set1_ps(h2f(t + 16 + 2 * i)) : _mm256_setzero_ps();
        float* o = out + (row - r0) * K + b * QK;
        for (int j = 0; j < 4; ++j) _mm256_storeu_ps(o + 8 * j, _mm256_fmadd_ps(f[j], d, m));
      }
    }
  }
}

// An x8 group straight into the packed kernel's buffer: nibbles to bytes, fp16 to fp32 (no transpose needed).
template <int F>
void pack_tile_x8(const uint8_t* g, int64_t KB, uint8_t* buf) {
  using X = X8L<F>;
  using P = Packed<F>;
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  for (int64_t b = 0; b < KB; ++b) {
    const uint8_t* t = g + b * X::GB;
    uint8_t* o = buf + b * P::BYTES;
    for (int q = 0; q < (F == Q8_0 ? 8 : 4); ++q) {
      const __m256i l = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + X::HDR + 32 * q));
      if constexpr (F == Q8_0) {
        _mm256_store_si256(reinterpret_cast<__m256i*>(o + 32 * q), l);
        _mm256_store_si256(reinterpret_cast<__m256i*>(o + 256 + 32 * q), _mm256_sign_epi8(l, l));
      } else {
        _mm256_store_si256(reinterpret_cast<__m256i*>(o + 64 * q), _mm256_and_si256(l, m4));
        _mm256_store_si256(reinterpret_cast<__m256i*>(o + 64 * q + 32),
                           _mm256_and_si256(_mm256_srli_epi16(l, 4), m4));
      }
    }
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t)));
    _mm256_store_ps(reinterpret_cast<float*>(o + P::QBYTES), d);
    __m256 m = _mm256_setzero_ps();
    if constexpr (F == Q4_1)
      m = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t + 16))), _mm256_set1_ps(8.0f));
    _mm256_store_ps(reinterpret_cast<float*>(o + P::QBYTES + 32), m);
  }
}

// Packed kernel over all of W: each thread re-lays out its 8-row tiles (from GGUF rows, or from x8 groups)
// into a buffer that stays in L1/L2 while every row of x passes over it.
template <int F, bool FROM_X8>
void gemm_packed(const uint8_t* w, int64_t row_bytes, const ActQ& a, int64_t M, int64_t N, int64_t K, float* y) {
  const int64_t KB = K / QK, n_tiles = (N + NR - 1) / NR;
  // Rows of x per pass (their int8 blocks stay in L2 while a packed tile is reused across them).
  const int64_t MC = std::max<int64_t>(PMR, 256 * 1024 / K / PMR * PMR);
  at::parallel_for(0, n_tiles, 1, [&](int64_t t0, int64_t t1) {
    std::unique_ptr<uint8_t[], void (*)(void*)> buf(
        static_cast<uint8_t*>(std::aligned_alloc(64, (KB * Packed<F>::BYTES + 63) / 64 * 64)), std::free);
    for (int64_t mc = 0; mc < M; mc += MC) {
      const int64_t me = std::min(M, mc + MC);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * NR;
        const int rows = static_cast<int>(std::min<int64_t>(NR, N - n0));
        if constexpr (FROM_X8) {
          pack_tile_x8<F>(w + t * KB * X8L<F>::GB, KB, buf.get());
        } else {
          pack_tile<F>(w, row_bytes, n0, rows, KB, buf.get());
        }
        for (int64_t m0 = mc; m0 < me; m0 += PMR)
          packed_dispatch<F, PMR>(static_cast<int>(std::min<int64_t>(PMR, me - m0)), buf.get(), KB, a, m0, y, N, n0,
                                  rows);
      }
    }
  });
}

// ------------------------------------------------------------------------------------------- tiling
// Runtime (rm, rn) -> template instance, so edge tiles run the same code with fewer rows.
template <int RM, int RN, typename Fn>
inline void dispatch(int rm, int rn, Fn& fn) {
  if constexpr (RM > 1) {
    if (rm < RM) return dispatch<RM - 1, RN>(rm, rn, fn);
  }
  if constexpr (RN > 1) {
    if (rn < RN) return dispatch<RM, RN - 1>(rm, rn, fn);
  }
  fn.template run<RM, RN>();
}

template <int F, bool EXACT>
struct TileCall {
  const uint8_t* w;
  int64_t row_bytes;
  const ActQ* a;
  const float* x;
  const float* xs;
  int64_t K, m0, n0;
  float* y;
  int64_t ldy;
  template <int RM, int RN>
  void run() {
    if constexpr (EXACT) {
      tile_f32<F, RM, RN>(w, row_bytes, x, xs, K, m0, n0, y, ldy);
    } else {
      tile_q8<F, RM, RN>(w, row_bytes, *a, K, m0, n0, y, ldy);
    }
  }
};

// Tile shapes (activation rows x weight rows): RM*RN accumulators + RN unpacked weight blocks fit the 16 ymm
// registers. RN1: weight rows per tile when M == 1 (the fp32 kernel; the int8 one uses gemv at M == 1).
#ifndef QRM
#define QRM 4
#endif
#ifndef QRN
#define QRN 2
#endif
template <bool EXACT>
struct Shape {
  static constexpr int RM = EXACT ? 2 : QRM, RN = EXACT ? 1 : QRN, RN1 = EXACT ? 2 : QRN;
};

template <int F, bool EXACT>
void gemm(const uint8_t* w, int64_t row_bytes, const ActQ* a, const float* x, const float* xs, int64_t M, int64_t N,
          int64_t K, float* y) {
  using S = Shape<EXACT>;
  const int RN = M == 1 ? S::RN1 : S::RN;
  const int64_t n_tiles = (N + RN - 1) / RN;
  // Rows of x per pass: their quantized blocks stay in L2 while each weight tile streams through once.
  const int64_t MC = std::max<int64_t>(S::RM, (EXACT ? 128 : 512) * 1024 / (K * (EXACT ? 4 : 1)) / S::RM * S::RM);
  const int64_t grain = std::max<int64_t>(1, kMinParallelBlocks / std::max<int64_t>(1, M * (K / QK) * RN));
  at::parallel_for(0, n_tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t mc = 0; mc < M; mc += MC) {
      const int64_t me = std::min(M, mc + MC);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * RN;
        const int rn = static_cast<int>(std::min<int64_t>(RN, N - n0));
        for (int64_t m0 = mc; m0 < me; m0 += S::RM) {
          const int rm = static_cast<int>(std::min<int64_t>(S::RM, me - m0));
          TileCall<F, EXACT> c{w, row_bytes, a, x, xs, K, m0, n0, y, N};
          if (M == 1) {
            dispatch<1, S::RN1>(rm, rn, c);
          } else {
            dispatch<S::RM, S::RN>(rm, rn, c);
          }
        }
      }
    }
  });
}

// ------------------------------------------------------------------------------------------ dequantize
template <int F>
void dequant_rows(const uint8_t* w, int64_t row_bytes, int64_t r0, int64_t r1, int64_t K, float* out) {
  const int64_t KB = K / QK;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w + r * row_bytes;
    float* o = out + (r - r0) * K;
    for (int64_t b = 0; b < KB; ++b) {
      const uint8_t* p = row + b * Block<F>::BYTES;
      __m256 f[4], d, m;
      block_floats<F>(p, f);
      block_scales<F>(p, d, m);
      for (int j = 0; j < 4; ++j) _mm256_storeu_ps(o + b * QK + 8 * j, _mm256_fmadd_ps(f[j], d, m));
    }
  }
}

void dequant_any(int64_t fmt, const uint8_t* w, int64_t row_bytes, int64_t r0, int64_t r1, int64_t K, float* out) {
  switch (fmt) {
    case X8 + Q4_0: return dequant_rows_x8<Q4_0>(w, r0, r1, K, out);
    case X8 + Q4_1: return dequant_rows_x8<Q4_1>(w, r0, r1, K, out);
    case X8 + Q8_0: return dequant_rows_x8<Q8_0>(w, r0, r1, K, out);
    case Q4_0: return dequant_rows<Q4_0>(w, row_bytes, r0, r1, K, out);
    case Q4_1: return dequant_rows<Q4_1>(w, row_bytes, r0, r1, K, out);
    default: return dequant_rows<Q8_0>(w, row_bytes, r0, r1, K, out);
  }
}

// ------------------------------------------------------------------------------------------ ops
int64_t check_w(const at::Tensor& w, int64_t fmt, int64_t K) {
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous(),
              "llama_adapter_quant: packed weight must be a contiguous uint8 [N, row_bytes] tensor");
  TORCH_CHECK(K % QK == 0, "llama_adapter_quant: in_features must be a multiple of 32, got ", K);
  TORCH_CHECK(w.size(1) == K / QK * block_bytes(fmt), "llama_adapter_quant: packed rows of ", w.size(1),
              " bytes do not hold ", K, " weights in format ", fmt);
  TORCH_CHECK(!is_x8(fmt) || w.size(0) % NR == 0, "llama_adapter_quant: the x8 layout needs rows in multiples of 8");
  return w.size(1);
}

// kernel 0 "rows": int8 activations, RM x RN tiles straight from GGUF blocks (decode, M < 4);
//        1 "fp32": fp32 activations, weight blocks expanded in registers (exact, small M);
//        2 "mm":   dequantize ~512 KB of rows at a time, multiply with BLAS (exact, large M);
//        3 "packed": int8 activations, 8-row tiles re-laid out per call (M >= 4).
at::Tensor linear(const at::Tensor& x_, const at::Tensor& w, int64_t fmt, int64_t mode) {
  TORCH_CHECK(mode >= 0 && mode <= 3, "llama_adapter_quant::linear: unknown kernel id ", mode);
  TORCH_CHECK(x_.dim() == 2 && x_.scalar_type() == at::kFloat, "llama_adapter_quant::linear: x must be fp32 [M, K]");
  const at::Tensor x = x_.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const int64_t row_bytes = check_w(w, fmt, K);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (mode == 2) {
    // Chunks of ~512 KB of fp32 rows: big enough for an efficient GEMM, small enough to stay in cache.
    const int64_t NC = std::min<int64_t>(N, std::max<int64_t>(64, (128 * 1024 / K + 15) / 16 * 16));
    at::Tensor buf = at::empty({NC, K}, x.options());
    at::Tensor yt = at::empty({N, M}, x.options());
    for (int64_t n0 = 0; n0 < N; n0 += NC) {
      const int64_t nc = std::min(NC, N - n0);
      float* bp = buf.data_ptr<float>();
      at::parallel_for(0, nc, 16, [&](int64_t r0, int64_t r1) {
        dequant_any(fmt, wp, row_bytes, n0 + r0, n0 + r1, K, bp + r0 * K);
      });
      at::Tensor out = yt.narrow(0, n0, nc);
      at::mm_out(out, buf.narrow(0, 0, nc), x.t());
    }
    y.copy_(yt.t());
    return y;
  }
  if (is_x8(fmt)) {  // int8 activations: kernel 0 reads x8 groups directly, 3 unpacks them per call first
    TORCH_CHECK(mode != 1, "llama_adapter_quant::linear: the x8 layout has no \"fp32\" kernel; use \"mm\"");
    const int64_t f = fmt - X8;
    const ActQ a = quantize_act(xp, M, K, f, M == 1 ? 1 : PMR);
    switch (f + (mode == 3 ? 10 : 0)) {
      case Q4_0: gemm_x8<Q4_0>(wp, a, M, N, K, yp); break;
      case Q4_1: gemm_x8<Q4_1>(wp, a, M, N, K, yp); break;
      case Q8_0: gemm_x8<Q8_0>(wp, a, M, N, K, yp); break;
      case 10 + Q4_0: gemm_packed<Q4_0, true>(wp, row_bytes, a, M, N, K, yp); break;
      case 10 + Q4_1: gemm_packed<Q4_1, true>(wp, row_bytes, a, M, N, K, yp); break;
      default: gemm_packed<Q8_0, true>(wp, row_bytes, a, M, N, K, yp);
    }
    return y;
  }
  if (mode == 1) {
    const int64_t KB = K / QK;
    std::unique_ptr<float[]> xs(new float[M * KB]);
    for (int64_t i = 0; i < M * KB; ++i) {
      float s = 0.0f;
      for (int j = 0; j < QK; ++j) s += xp[i * QK + j];
      xs[i] = s * 0.125f;
    }
    switch (fmt) {
      case Q4_0: gemm<Q4_0, true>(wp, row_bytes, nullptr, xp, xs.get(), M, N, K, yp); break;
      case Q4_1: gemm<Q4_1, true>(wp, row_bytes, nullptr, xp, xs.get(), M, N, K, yp); break;
      default: gemm<Q8_0, true>(wp, row_bytes, nullptr, xp, xs.get(), M, N, K, yp);
    }
    return y;
  }
  if (mode == 3) {
    const ActQ a = quantize_act(xp, M, K, fmt, PMR);
    switch (fmt) {
      case Q4_0: gemm_packed<Q4_0, false>(wp, row_bytes, a, M, N, K, yp); break;
      case Q4_1: gemm_packed<Q4_1, false>(wp, row_bytes, a, M, N, K, yp); break;
      default: gemm_packed<Q8_0, false>(wp, row_bytes, a, M, N, K, yp);
    }
    return y;
  }
  const ActQ a = quantize_act(xp, M, K, fmt, M == 1 ? 1 : Shape<false>::RM);
  if (M == 1) {
    switch (fmt) {
      case Q4_0: gemv<Q4_0>(wp, row_bytes, a, N, K, yp); break;
      case Q4_1: gemv<Q4_1>(wp, row_bytes, a, N, K, yp); break;
      default: gemv<Q8_0>(wp, row_bytes, a, N, K, yp);
    }
    return y;
  }
  switch (fmt) {
    case Q4_0: gemm<Q4_0, false>(wp, row_bytes, &a, nullptr, nullptr, M, N, K, yp); break;
    case Q4_1: gemm<Q4_1, false>(wp, row_bytes, &a, nullptr, nullptr, M, N, K, yp); break;
    default: gemm<Q8_0, false>(wp, row_bytes, &a, nullptr, nullptr, M, N, K, yp);
  }
  return y;
}

// grad_x = grad_y @ W: W's rows are dequantized a chunk at a time and accumulated with BLAS.
at::Tensor linear_grad(const at::Tensor& gy_, const at::Tensor& w, int64_t fmt, int64_t K) {
  TORCH_CHECK(gy_.dim() == 2 && gy_.scalar_type() == at::kFloat, "llama_adapter_quant::linear_grad: fp32 [M, N]");
  const at::Tensor gy = gy_.contiguous();
  const int64_t M = gy.size(0), N = w.size(0);
  TORCH_CHECK(gy.size(1) == N, "llama_adapter_quant::linear_grad: grad has ", gy.size(1), " columns, weight ", N,
              " rows");
  const int64_t row_bytes = check_w(w, fmt, K);
  at::Tensor gx = at::zeros({M, K}, gy.options());
  const uint8_t* wp = w.data_ptr<uint8_t>();
#ifndef QGRAD
#define QGRAD 256
#endif
  // The chunk's rows are this GEMM's inner dimension: 64 starved MKL (30% slower than fp32), 256 matches fp32.
  const int64_t NC = std::min<int64_t>(N, std::max<int64_t>(QGRAD, (128 * 1024 / K + 15) / 16 * 16));
  at::Tensor buf = at::empty({NC, K}, gy.options());
  for (int64_t n0 = 0; n0 < N; n0 += NC) {
    const int64_t nc = std::min(NC, N - n0);
    float* bp = buf.data_ptr<float>();
    at::parallel_for(0, nc, 16, [&](int64_t r0, int64_t r1) {
      dequant_any(fmt, wp, row_bytes, n0 + r0, n0 + r1, K, bp + r0 * K);
    });
    gx.addmm_(gy.narrow(1, n0, nc), buf.narrow(0, 0, nc));
  }
  return gx;
}

at::Tensor dequantize(const at::Tensor& w, int64_t fmt, int64_t K) {
  const int64_t row_bytes = check_w(w, fmt, K), N = w.size(0);
  at::Tensor out = at::empty({N, K}, w.options().dtype(at::kFloat));
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t r0, int64_t r1) { dequant_any(fmt, wp, row_bytes, r0, r1, K, op + r0 * K); });
  return out;
}

// Rows `ids` of W, dequantized: the embedding lookup of a quantized (possibly tied) token table.
at::Tensor embedding(const at::Tensor& w, int64_t fmt, int64_t K, const at::Tensor& ids_) {
  const int64_t row_bytes = check_w(w, fmt, K), N = w.size(0);
  const at::Tensor ids = ids_.to(at::kLong).contiguous();
  std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
  shape.push_back(K);
  at::Tensor out = at::empty(shape, w.options().dtype(at::kFloat));
  const int64_t* ip = ids.data_ptr<int64_t>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  const int64_t n = ids.numel();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(ip[i] >= 0 && ip[i] < N, "embedding: id ", ip[i], " out of range");
  at::parallel_for(0, n, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) dequant_any(fmt, wp, row_bytes, ip[i], ip[i] + 1, K, op + i * K);
  });
  return out;
}

// GGUF-layout [N, row_bytes] <-> x8 layout (same shape and bytes per weight; N a multiple of 8).
at::Tensor to_x8(const at::Tensor& w, int64_t fmt, int64_t K) {
  TORCH_CHECK(!is_x8(fmt), "llama_adapter_quant::to_x8: already x8");
  const int64_t row_bytes = check_w(w, fmt, K), N = w.size(0), KB = K / QK;
  TORCH_CHECK(N % NR == 0, "llama_adapter_quant::to_x8: rows must be a multiple of 8, got ", N);
  at::Tensor out = at::empty(w.sizes(), w.options());
  const uint8_t* wp = w.data_ptr<uint8_t>();
  uint8_t* op = out.data_ptr<uint8_t>();
  at::parallel_for(0, N / NR, 16, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const uint8_t* rows = wp + g * NR * row_bytes;
      uint8_t* t = op + g * NR * row_bytes;
      if (fmt == Q4_0) to_x8_group<Q4_0>(rows, row_bytes, KB, t);
      if (fmt == Q4_1) to_x8_group<Q4_1>(rows, row_bytes, KB, t);
      if (fmt == Q8_0) to_x8_group<Q8_0>(rows, row_bytes, KB, t);
    }
  });
  return out;
}

at::Tensor from_x8(const at::Tensor& w, int64_t fmt, int64_t K) {
  TORCH_CHECK(!is_x8(fmt), "llama_adapter_quant::from_x8: pass the base format id");
  const int64_t row_bytes = check_w(w, fmt + X8, K), N = w.size(0), KB = K / QK;
  at::Tensor out = at::empty(w.sizes(), w.options());
  const uint8_t* wp = w.data_ptr<uint8_t>();
  uint8_t* op = out.data_ptr<uint8_t>();
  at::parallel_for(0, N / NR, 16, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const uint8_t* t = wp + g * NR * row_bytes;
      uint8_t* rows = op + g * NR * row_bytes;
      if (fmt == Q4_0) from_x8_group<Q4_0>(t, KB, rows, row_bytes);
      if (fmt == Q4_1) from_x8_group<Q4_1>(t, KB, rows, row_bytes);
      if (fmt == Q8_0) from_x8_group<Q8_0>(t, KB, rows, row_bytes);
    }
  });
  return out;
}

}  // namespace

// Experiments build variants under another namespace (-DQNS=...) to compare them in one process.
#ifndef QNS
#define QNS llama_adapter_quant
#endif

TORCH_LIBRARY(QNS, m) {
  m.def("linear(Tensor x, Tensor w, int fmt, int mode) -> Tensor");
  m.def("linear_grad(Tensor grad_y, Tensor w, int fmt, int k) -> Tensor");
  m.def("dequantize(Tensor w, int fmt, int k) -> Tensor");
  m.def("embedding(Tensor w, int fmt, int k, Tensor ids) -> Tensor");
  m.def("to_x8(Tensor w, int fmt, int k) -> Tensor");
  m.def("from_x8(Tensor w, int fmt, int k) -> Tensor");
}

TORCH_LIBRARY_IMPL(QNS, CPU, m) {
  m.impl("linear", &linear);
  m.impl("linear_grad", &linear_grad);
  m.impl("dequantize", &dequantize);
  m.impl("embedding", &embedding);
  m.impl("to_x8", &to_x8);
  m.impl("from_x8", &from_x8);
}
