// Load-time conversions at memory speed: fp32 -> q4_0/q4_1/q8_0 (bit-exact with llama.cpp's reference
// quantizers and with formats.py), and GGUF K-quant / IQ4 blocks -> q4_1 or q8_0 (bit-exact with
// gguf_types.py). The torch versions stay as the reference and the fallback; these exist because
// element-wise torch ops on bytes run at ~20 MB/s, which would make a 7B model take minutes to load.
//
// Compiled with -ffp-contract=off: a*b+c must round twice, as numpy and torch do, or scales differ by an ulp.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <string>

namespace {

constexpr int64_t QK = 32;

inline float h2f(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

inline void f2h(float f, uint8_t* p) {
  const uint16_t h = _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
  std::memcpy(p, &h, 2);
}

// ------------------------------------------------------------------------------------------ quantizers
// One block of 32 floats -> GGUF bytes, exactly as quantize_row_*_ref (and gguf-py) compute it, with AVX2:
// the scalar versions ran at ~10 ns per weight (libm roundf), a minute for a 7B model.
struct Block32 {
  __m256 v[4];
  explicit Block32(const float* x) {
    for (int i = 0; i < 4; ++i) v[i] = _mm256_loadu_ps(x + 8 * i);
  }
};

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

inline float hmin(__m256 v) {
  __m128 m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_min_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_min_ss(m, _mm_movehdup_ps(m)));
}

// 32 integral floats (element order) -> 32 int8 in element order.
inline __m256i pack_i8(const __m256 f[4]) {
  __m256i i0 = _mm256_packs_epi32(_mm256_cvttps_epi32(f[0]), _mm256_cvttps_epi32(f[1]));
  __m256i i2 = _mm256_packs_epi32(_mm256_cvttps_epi32(f[2]), _mm256_cvttps_epi32(f[3]));
  return _mm256_permutevar8x32_epi32(_mm256_packs_epi16(i0, i2), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// Values 0..15 in element order -> 16 bytes, element i in the low nibble and i + 16 in the high one.
inline void store_nibbles(const __m256 f[4], uint8_t* out) {
  const __m256i q = pack_i8(f);
  const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm_or_si128(lo, _mm_slli_epi16(hi, 4)));
}

// C's roundf (half away from zero): truncate, then step away from zero where the dropped part is >= 0.5.
inline __m256 roundf_ps(__m256 t) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 tz = _mm256_round_ps(t, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
  const __m256 frac = _mm256_andnot_ps(sign, _mm256_sub_ps(t, tz));
  const __m256 step = _mm256_or_ps(_mm256_and_ps(t, sign), _mm256_set1_ps(1.0f));
  return _mm256_add_ps(tz, _mm256_and_ps(_mm256_cmp_ps(frac, _mm256_set1_ps(0.5f), _CMP_GE_OQ), step));
}

void quantize_q8_0(const float* x, uint8_t* out) {
  const Block32 b(x);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 mx = _mm256_andnot_ps(sign, b.v[0]);
  for (int i = 1; i < 4; ++i) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, b.v[i]));
  const float amax = hmax(mx), d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
  f2h(d, out);
  __m256 q[4];
  for (int i = 0; i < 4; ++i) q[i] = roundf_ps(_mm256_mul_ps(b.v[i], _mm256_set1_ps(id)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 2), pack_i8(q));
}

// q = clamp(trunc(t), 0, 15)
inline __m256 trunc_clamp15(__m256 t) {
  const __m256 r = _mm256_round_ps(t, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
  return _mm256_min_ps(_mm256_max_ps(r, _mm256_setzero_ps()), _mm256_set1_ps(15.0f));
}

void quantize_q4_0(const float* x, uint8_t* out) {
  const Block32 b(x);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 mx = _mm256_andnot_ps(sign, b.v[0]);
  for (int i = 1; i < 4; ++i) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, b.v[i]));
  const float amax = hmax(mx);
  // the first value of largest magnitude, with its sign (ties between +a and -a: the earlier one)
  uint32_t hits = 0;
  for (int i = 0; i < 4; ++i) {
    const __m256 eq = _mm256_cmp_ps(_mm256_andnot_ps(sign, b.v[i]), _mm256_set1_ps(amax), _CMP_EQ_OQ);
    hits |= static_cast<uint32_t>(_mm256_movemask_ps(eq)) << (8 * i);
  }
  const float m = hits ? x[__builtin_ctz(hits)] : 0.0f;
  const float d = m / -8.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
  f2h(d, out);
  __m256 q[4];
  for (int i = 0; i < 4; ++i)
    q[i] = trunc_clamp15(_mm256_add_ps(_mm256_mul_ps(b.v[i], _mm256_set1_ps(id)), _mm256_set1_ps(8.5f)));
  store_nibbles(q, out + 2);
}

void quantize_q4_1(const float* x, uint8_t* out) {
  const Block32 b(x);
  __m256 lo = b.v[0], hi = b.v[0];
  for (int i = 1; i < 4; ++i) {
    lo = _mm256_min_ps(lo, b.v[i]);
    hi = _mm256_max_ps(hi, b.v[i]);
  }
  const float mn = hmin(lo), mx = hmax(hi), d = (mx - mn) / 15.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
  f2h(d, out);
  f2h(mn, out + 2);
  __m256 q[4];
  for (int i = 0; i < 4; ++i) {
    const __m256 t = _mm256_mul_ps(_mm256_sub_ps(b.v[i], _mm256_set1_ps(mn)), _mm256_set1_ps(id));
    q[i] = trunc_clamp15(_mm256_add_ps(t, _mm256_set1_ps(0.5f)));
  }
  store_nibbles(q, out + 4);
}

using QuantFn = void (*)(const float*, uint8_t*);

QuantFn quantizer(int64_t fmt) {
  TORCH_CHECK(fmt >= 0 && fmt <= 2, "llama_adapter_quant: unknown format id ", fmt);
  return fmt == 0 ? quantize_q4_0 : fmt == 1 ? quantize_q4_1 : quantize_q8_0;
}

int64_t block_bytes(int64_t fmt) { return fmt == 0 ? 18 : fmt == 1 ? 20 : 34; }

// x: fp32, bf16 or fp16 [N, K] -> uint8 [N, K/32 * block_bytes]. Half-precision rows are widened a block at a
// time (exact), which is 3x faster than torch's .float() of the whole matrix and needs no fp32 copy.
inline void widen(const at::BFloat16* x, float* out) {
  for (int i = 0; i < 4; ++i) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + 8 * i));
    _mm256_storeu_ps(out + 8 * i, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
  }
}

inline void widen(const at::Half* x, float* out) {
  for (int i = 0; i < 4; ++i)
    _mm256_storeu_ps(out + 8 * i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + 8 * i))));
}

at::Tensor quantize(const at::Tensor& x_, int64_t fmt) {
  const auto dt = x_.scalar_type();
  TORCH_CHECK(x_.dim() == 2 && (dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf),
              "llama_adapter_quant::quantize: fp32/bf16/fp16 [N, K]");
  TORCH_CHECK(x_.size(1) % QK == 0, "llama_adapter_quant::quantize: K must be a multiple of 32");
  const at::Tensor x = x_.contiguous();
  const QuantFn q = quantizer(fmt);
  const int64_t bb = block_bytes(fmt), nb = x.numel() / QK;
  at::Tensor out = at::empty({x.size(0), x.size(1) / QK * bb}, x.options().dtype(at::kByte));
  uint8_t* op = out.data_ptr<uint8_t>();
  at::parallel_for(0, nb, 4096, [&](int64_t b0, int64_t b1) {
    float buf[QK];
    for (int64_t b = b0; b < b1; ++b) {
      if (dt == at::kFloat) {
        q(x.const_data_ptr<float>() + b * QK, op + b * bb);
        continue;
      }
      if (dt == at::kBFloat16) {
        widen(x.const_data_ptr<at::BFloat16>() + b * QK, buf);
      } else {
        widen(x.const_data_ptr<at::Half>() + b * QK, buf);
      }
      q(buf, op + b * bb);
    }
  });
  return out;
}

// ------------------------------------------------------------------------------------------ GGUF blocks
// Dequantizers of one GGUF superblock (256 weights), written as gguf-py (and gguf_types.py) evaluate them.
inline void k_scale_min(const uint8_t* s, int j, int& sc, int& m) {
  if (j < 4) {
    sc = s[j] & 63;
    m = s[j + 4] & 63;
  } else {
    sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
    m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

void dequant_q2_k(const uint8_t* b, float* y) {
  const uint8_t *scales = b, *qs = b + 16;
  const float d = h2f(b + 80), dmin = h2f(b + 82);
  for (int i = 0; i < 256; ++i) {
    const int half = i / 128, shift = (i % 128) / 32 * 2, byte = half * 32 + i % 32, sub = i / 16;
    const float dl = d * static_cast<float>(scales[sub] & 0x0F), ml = dmin * static_cast<float>(scales[sub] >> 4);
    y[i] = dl * static_cast<float>((qs[byte] >> shift) & 3) - ml;
  }
}

void dequant_q3_k(const uint8_t* b, float* y) {
  const uint8_t *hmask = b, *qs = b + 32, *s = b + 96;
  const float d = h2f(b + 108);
  for (int i = 0; i < 256; ++i) {
    const int sub = i / 16;
    const int lo = (s[sub % 8] >> (sub / 8 * 4)) & 0x0F, hi = (s[8 + sub % 4] >> (sub / 4 * 2)) & 3;
    const float dl = d * static_cast<float>((lo | (hi << 4)) - 32);
    const int half = i / 128, shift = (i % 128) / 32 * 2, byte = half * 32 + i % 32;
    const int ql = (qs[byte] >> shift) & 3, h = (hmask[i % 32] >> (i / 32)) & 1;
    y[i] = dl * static_cast<float>(ql - (h ? 0 : 4));
  }
}

void dequant_q4_5_k(const uint8_t* b, float* y, bool five) {
  const float d = h2f(b), dmin = h2f(b + 2);
  const uint8_t *s = b + 4, *qh = b + 16, *qs = five ? b + 48 : b + 16;
  for (int j = 0; j < 8; ++j) {
    int sc, m;
    k_scale_min(s, j, sc, m);
    const float ds = d * static_cast<float>(sc), dm = dmin * static_cast<float>(m);
    for (int i = 0; i < 32; ++i) {
      int q = (qs[j / 2 * 32 + i] >> (j % 2 * 4)) & 0x0F;
      if (five) q |= ((qh[i] >> j) & 1) << 4;
      y[j * 32 + i] = ds * static_cast<float>(q) - dm;
    }
  }
}

void dequant_q6_k(const uint8_t* b, float* y) {
  const float d = h2f(b + 208);
  for (int half = 0; half < 2; ++half) {  // ggml's dequantize_row_q6_K, 128 weights at a time
    const uint8_t *ql = b + half * 64, *qh = b + 128 + half * 32;
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192 + half * 8);
    float* o = y + half * 128;
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q1 = ((ql[l] & 0x0F) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      o[l] = (d * static_cast<float>(sc[is])) * static_cast<float>(q1);
      o[l + 32] = (d * static_cast<float>(sc[is + 2])) * static_cast<float>(q2);
      o[l + 64] = (d * static_cast<float>(sc[is + 4])) * static_cast<float>(q3);
      o[l + 96] = (d * static_cast<float>(sc[is + 6])) * static_cast<float>(q4);
    }
  }
}

void dequant_q5_1(const uint8_t* b, float* y) {
  const float d = h2f(b), m = h2f(b + 2);
  uint32_t qh;
  std::memcpy(&qh, b + 4, 4);
  for (int i = 0; i < 32; ++i) {
    const int q = ((b[8 + i % 16] >> (i / 16 * 4)) & 0x0F) | (((qh >> i) & 1) << 4);
    y[i] = static_cast<float>(q) * d + m;
  }
}

constexpr int8_t kIQ4Grid[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

// Exact conversions (no requantization): Q4_K -> 8 q4_1 blocks, Q5_0 / IQ4_NL -> q8_0, IQ4_XS -> 8 q8_0.
void q4_k_to_q4_1(const uint8_t* b, uint8_t* out) {
  const float d = h2f(b), dmin = h2f(b + 2);
  const uint8_t* qs = b + 16;
  for (int j = 0; j < 8; ++j) {
    int sc, m;
    k_scale_min(b + 4, j, sc, m);
    uint8_t* o = out + j * 20;
    f2h(d * static_cast<float>(sc), o);
    f2h(-(dmin * static_cast<float>(m)), o + 2);
    const uint8_t* src = qs + j / 2 * 32;
    const int sh = j % 2 * 4;
    for (int i = 0; i < 16; ++i)
      o[4 + i] = static_cast<uint8_t>(((src[i] >> sh) & 0x0F) | (((src[i + 16] >> sh) & 0x0F) << 4));
  }
}

void q5_0_to_q8_0(const uint8_t* b, uint8_t* out) {
  uint32_t qh;
  std::memcpy(&qh, b + 2, 4);
  out[0] = b[0];
  out[1] = b[1];
  for (int i = 0; i < 32; ++i) {
    const int q = ((b[6 + i % 16] >> (i / 16 * 4)) & 0x0F) | (((qh >> i) & 1) << 4);
    out[2 + i] = static_cast<uint8_t>(static_cast<int8_t>(q - 16));
  }
}

void iq4_nl_to_q8_0(const uint8_t* b, uint8_t* out) {
  out[0] = b[0];
  out[1] = b[1];
  for (int i = 0; i < 32; ++i) out[2 + i] = static_cast<uint8_t>(kIQ4Grid[(b[2 + i % 16] >> (i / 16 * 4)) & 0x0F]);
}

void iq4_xs_to_q8_0(const uint8_t* b, uint8_t* out) {
  const float d = h2f(b);
  uint16_t sh;
  std::memcpy(&sh, b + 2, 2);
  for (int j = 0; j < 8; ++j) {
    const int ls = (((b[4 + j / 2] >> (j % 2 * 4)) & 0x0F) | (((sh >> (2 * j)) & 3) << 4)) - 32;
    uint8_t* o = out + j * 34;
    f2h(d * static_cast<float>(ls), o);
    const uint8_t* qs = b + 8 + j * 16;
    for (int i = 0; i < 32; ++i) o[2 + i] = static_cast<uint8_t>(kIQ4Grid[(qs[i % 16] >> (i / 16 * 4)) & 0x0F]);
  }
}

// raw: the tensor's bytes; returns its blocks in our format (q4_1 for Q4_K, q8_0 otherwise), row-major.
at::Tensor gguf_repack(const at::Tensor& raw_, const std::string& type) {
  TORCH_CHECK(raw_.scalar_type() == at::kByte, "llama_adapter_quant::gguf_repack: raw bytes must be uint8");
  const at::Tensor raw = raw_.contiguous();
  int64_t in_bytes, weights;
  if (type == "Q4_K") {
    in_bytes = 144, weights = 256;
  } else if (type == "Q5_K") {
    in_bytes = 176, weights = 256;
  } else if (type == "Q6_K") {
    in_bytes = 210, weights = 256;
  } else if (type == "Q2_K") {
    in_bytes = 84, weights = 256;
  } else if (type == "Q3_K") {
    in_bytes = 110, weights = 256;
  } else if (type == "IQ4_XS") {
    in_bytes = 136, weights = 256;
  } else if (type == "Q5_0") {
    in_bytes = 22, weights = 32;
  } else if (type == "Q5_1") {
    in_bytes = 24, weights = 32;
  } else if (type == "IQ4_NL") {
    in_bytes = 18, weights = 32;
  } else {
    TORCH_CHECK(false, "llama_adapter_quant::gguf_repack: no conversion for ", type);
  }
  TORCH_CHECK(raw.numel() % in_bytes == 0, "gguf_repack: ", raw.numel(), " bytes are not whole ", type, " blocks");
  const int64_t nb = raw.numel() / in_bytes, per = weights / QK, ob = type == "Q4_K" ? 20 : 34;
  at::Tensor out = at::empty({nb * per * ob}, raw.options());
  const uint8_t* in = raw.data_ptr<uint8_t>();
  uint8_t* op = out.data_ptr<uint8_t>();
  at::parallel_for(0, nb, 256, [&](int64_t b0, int64_t b1) {
    float buf[256];
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* src = in + b * in_bytes;
      uint8_t* dst = op + b * per * ob;
      if (type == "Q4_K") {
        q4_k_to_q4_1(src, dst);
        continue;
      }
      if (type == "Q5_0") {
        q5_0_to_q8_0(src, dst);
        continue;
      }
      if (type == "IQ4_NL") {
        iq4_nl_to_q8_0(src, dst);
        continue;
      }
      if (type == "IQ4_XS") {
        iq4_xs_to_q8_0(src, dst);
        continue;
      }
      if (type == "Q6_K") {
        dequant_q6_k(src, buf);
      } else if (type == "Q5_K") {
        dequant_q4_5_k(src, buf, true);
      } else if (type == "Q2_K") {
        dequant_q2_k(src, buf);
      } else if (type == "Q3_K") {
        dequant_q3_k(src, buf);
      } else {
        dequant_q5_1(src, buf);
      }
      for (int64_t j = 0; j < per; ++j) quantize_q8_0(buf + j * QK, dst + j * ob);
    }
  });
  return out;
}

}  // namespace

#ifndef QNS
#define QNS llama_adapter_quant
#endif

TORCH_LIBRARY_FRAGMENT(QNS, m) {
  m.def("quantize(Tensor x, int fmt) -> Tensor");
  m.def("gguf_repack(Tensor raw, str type) -> Tensor");
}

TORCH_LIBRARY_IMPL(QNS, CPU, m) {
  m.impl("quantize", &quantize);
  m.impl("gguf_repack", &gguf_repack);
}
