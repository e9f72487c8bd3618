// Weight-only int8 / int4 matrix products for decoding on x86 CPUs with AVX-512 VNNI.
//
// Built on first use by nanoseek/quant/cpu_kernels.py (torch.utils.cpp_extension.load, -O3
// -march=native); nanoseek falls back to torch's own kernels when this file cannot be built or the
// CPU lacks the instructions (available() says which).
//
// Both products compute y [M, N] fp32 = x [M, K] fp32 @ W^T for a quantized W [N, K], and both
// quantize the activation rows first, in blocks of the K axis (symmetric, one fp32 scale per block
// and row: xq = round(x / sx), sx = max|x| / qmax), so that the inner products are integer dot
// products (VNNI: vpdpwssd for int16 pairs, vpdpbusd for u8 x s8 quads, summed into int32 lanes).
// The only rounding beyond the weights' own is that of the activations (|error| <= sx / 2 per
// element) and fp32 accumulation.
//
// int8_gemm: W = q * scale[n], q int8 [N, K] (row-major), scale bf16 [N]. Activations in int16
//   (qmax 32767) in blocks of 64: their rounding is ~2^-16 of the block's largest value, below
//   bf16's, so int8 weights lose nothing to it (int8 activations would add ~0.5% to each product,
//   as much as the weights' own rounding). The codes are widened to int16 for vpdpwssd.
// int4_gemm: W[n, k] = (c[n, k] - 8) * scale[n, k / g] + zero[n, k / g], codes c in 0..15 packed two
//   per byte in nanoseek's on-disk layout: uint8 [N, K/2], byte j holds column 2j in its low nibble
//   and 2j+1 in its high nibble; scale and zero bf16 [N, G], G = K / g, g in {32, 64, 128, 256}
//   (zero = wmin + 8 * scale of the on-disk W = c * scale + wmin: centred, so bf16 rounds it less).
//   Activations in int8 (qmax 127; ~0.5% per product, small beside int4's own ~8%) in blocks of
//   32, so that vpdpbusd takes 4 codes at a time. The codes are already unsigned; the activation
//   is stored per 64 columns as its 32 even columns then its 32 odd ones, so the low nibbles of 32 bytes meet the
//   even columns and the high nibbles the odd ones. The kernel sums c * xq; the -8 * sum(xq) that
//   centres it and the zero term are added per group from two sums of each row of x: its
//   quantized sum (so the activation rounding meets the centred codes c - 8, not c, whose mean
//   of ~7.5 would double the error) and its exact fp32 sum (zero * sum x).
//
// int8_gemm_experts / int4_gemm_experts: the same products for a token's chosen routed experts at
//   once, from the stacked [E, N, K] weights and the experts' ids: one parallel region over all their
//   rows, reading only the chosen experts' weights.
//
// Work is split over output rows n with at::parallel_for (torch's intra-op threads; built with -fopenmp,
// without which ATen's OpenMP parallel_for runs on one thread); inside a
// thread, rows go in blocks of ROW_BLOCK so that with more than M_TILE rows of x a block's weights
// are re-read from cache, not memory. K must be a multiple of 64 (callers check).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__) && defined(__FMA__)
#define NANOSEEK_VNNI 1
#include <immintrin.h>
#endif

namespace {

constexpr int64_t CHUNK = 64;      // columns per inner step (one 32-byte load of int4 codes, four 16-byte of int8)
constexpr int64_t M_TILE = 4;      // rows of x per pass over a block of weight rows
constexpr int64_t ROW_BLOCK = 16;  // weight rows per block inside a thread
// Software prefetch distance (the products' last argument; this is its default): each thread asks
// for the weight bytes this far ahead of those it reads. Without it the hardware prefetchers left
// one thread at ~40% of the read bandwidth.
constexpr int64_t PREFETCH_BYTES = 16384;

bool cpu_has_vnni() {
#ifdef NANOSEEK_VNNI
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
         __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

#ifdef NANOSEEK_VNNI

inline float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One block of 32 activations -> 32 int8 codes in `out` (in order) and their scale; returns the
// block's exact fp32 sum in *sum and the sum of its codes in *qsum.
inline float quantize32(const float* x, int8_t* out, float* sum, int32_t* qsum) {
  __m512 a = _mm512_loadu_ps(x), b = _mm512_loadu_ps(x + 16);
  *sum = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
  float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
  float sx = amax / 127.0f;
  float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
  __m512 vinv = _mm512_set1_ps(inv);
  __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, vinv));  // round to nearest even
  __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, vinv));
  *qsum = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtsepi32_epi8(qa));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16), _mm512_cvtsepi32_epi8(qb));
  return sx;
}

// ---------------------------------------------------------------------------- int8

struct Int8Act {  // one row of x, quantized for int8_gemm
  std::vector<int16_t> q;  // [K]
  std::vector<float> sx;   // [K / 64]
};

void quantize_int8_act(const float* x, int64_t K, Int8Act& a) {
  a.q.resize(K);
  a.sx.resize(K / CHUNK);
  for (int64_t c = 0; c < K / CHUNK; ++c) {
    const float* xc = x + c * CHUNK;
    __m512 v[4];
    float amax = 0.0f;
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm512_loadu_ps(xc + 16 * i);
      amax = std::max(amax, _mm512_reduce_max_ps(_mm512_abs_ps(v[i])));
    }
    const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 32767.0f / amax : 0.0f);
    for (int i = 0; i < 4; ++i) {
      __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v[i], inv));  // round to nearest even
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.q.data() + c * CHUNK + 16 * i), _mm512_cvtsepi32_epi16(q));
    }
    a.sx[c] = amax / 32767.0f;
  }
}

// 16 int8 codes -> 16 int16
inline __m256i widen(const int8_t* p) { return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// sum over one 64-column chunk of w * xq as 8 int32 lanes (vpdpwssd: pairs of int16 products)
inline __m256i dot64(const __m256i* w, const int16_t* xq) {
  __m256i s = _mm256_dpwssd_epi32(_mm256_setzero_si256(), w[0], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq)));
  s = _mm256_dpwssd_epi32(s, w[1], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 16)));
  s = _mm256_dpwssd_epi32(s, w[2], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32)));
  return _mm256_dpwssd_epi32(s, w[3], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 48)));
}

// Rows n0..n1 of y for MT rows of x; weight rows go in pairs (two independent accumulation chains
// per row of x, sharing the activation loads).
template <int MT>
void int8_rows(const Int8Act* act, const int8_t* q, const uint16_t* scale, float* y, int64_t N, int64_t K,
               int64_t n0, int64_t n1, int64_t pf) {
  int64_t n = n0;
  for (; n + 2 <= n1; n += 2) {
    const int8_t* w0 = q + n * K;
    const int8_t* w1 = w0 + K;
    __m256 acc0[MT], acc1[MT];
    for (int m = 0; m < MT; ++m) acc0[m] = acc1[m] = _mm256_setzero_ps();
    for (int64_t c = 0; c < K / CHUNK; ++c) {
      _mm_prefetch(reinterpret_cast<const char*>(w0 + pf + c * CHUNK), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w1 + pf + c * CHUNK), _MM_HINT_T0);
      __m256i a[4], b[4];
      for (int j = 0; j < 4; ++j) {
        a[j] = widen(w0 + c * CHUNK + 16 * j);
        b[j] = widen(w1 + c * CHUNK + 16 * j);
      }
      for (int m = 0; m < MT; ++m) {
        const int16_t* xq = act[m].q.data() + c * CHUNK;
        const __m256 sx = _mm256_set1_ps(act[m].sx[c]);
        acc0[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot64(a, xq)), sx, acc0[m]);
        acc1[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot64(b, xq)), sx, acc1[m]);
      }
    }
    const float sw0 = bf16_to_float(scale[n]), sw1 = bf16_to_float(scale[n + 1]);
    for (int m = 0; m < MT; ++m) {
      y[m * N + n] = sw0 * hsum(acc0[m]);
      y[m * N + n + 1] = sw1 * hsum(acc1[m]);
    }
  }
  for (; n < n1; ++n) {  // an odd last row
    const int8_t* w = q + n * K;
    __m256 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t c = 0; c < K / CHUNK; ++c) {
      __m256i a[4];
      for (int j = 0; j < 4; ++j) a[j] = widen(w + c * CHUNK + 16 * j);
      for (int m = 0; m < MT; ++m)
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot64(a, act[m].q.data() + c * CHUNK)),
                                 _mm256_set1_ps(act[m].sx[c]), acc[m]);
    }
    const float sw = bf16_to_float(scale[n]);
    for (int m = 0; m < MT; ++m) y[m * N + n] = sw * hsum(acc[m]);
  }
}

// ---------------------------------------------------------------------------- int4

struct Int4Act {  // one row of x, quantized for int4_gemm
  std::vector<int8_t> q;   // [K]: per 64 columns, the 32 even ones then the 32 odd ones
  std::vector<float> sxv;  // [K / 64, 8]: lanes 0-3 the scale of columns 0..31 of the chunk, 4-7 of 32..63
  std::vector<float> gsum; // [G]: exact sum of x over each weight group
  std::vector<float> qsum8; // [G]: 8 * sum over the group's blocks of sx * sum(xq)
};

void quantize_int4_act(const float* x, int64_t K, int64_t g, Int4Act& a) {
  a.q.resize(K);
  a.sxv.resize(K / CHUNK * 8);
  a.gsum.assign(K / g, 0.0f);
  a.qsum8.assign(K / g, 0.0f);
  int8_t tmp[CHUNK];
  for (int64_t c = 0; c < K / CHUNK; ++c) {
    for (int h = 0; h < 2; ++h) {
      int64_t k0 = c * CHUNK + 32 * h;
      float sum;
      int32_t qsum;
      float sx = quantize32(x + k0, tmp + 32 * h, &sum, &qsum);
      a.gsum[k0 / g] += sum;
      a.qsum8[k0 / g] += 8.0f * sx * static_cast<float>(qsum);
      for (int l = 0; l < 4; ++l) a.sxv[c * 8 + 4 * h + l] = sx;
    }
    int8_t* out = a.q.data() + c * CHUNK;
    for (int i = 0; i < 32; ++i) {
      out[i] = tmp[2 * i];
      out[32 + i] = tmp[2 * i + 1];
    }
  }
}

// 16 bf16 -> 16 fp32
inline __m512 bf16x16(__m256i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)); }

// sum_j zero[j] * gsum[j] - scale[j] * qsum8[j] over the G groups of a row (zero, scale bf16)
inline float zero_term(const uint16_t* zr, const uint16_t* sc, const Int4Act& a, int64_t G) {
  __m512 t = _mm512_setzero_ps();
  for (int64_t j = 0; j < G; j += 16) {
    const __mmask16 k = G - j >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (G - j)) - 1);
    t = _mm512_fmadd_ps(bf16x16(_mm256_maskz_loadu_epi16(k, zr + j)), _mm512_maskz_loadu_ps(k, a.gsum.data() + j), t);
    t = _mm512_fnmadd_ps(bf16x16(_mm256_maskz_loadu_epi16(k, sc + j)), _mm512_maskz_loadu_ps(k, a.qsum8.data() + j), t);
  }
  return _mm512_reduce_add_ps(t);
}

// Weight-group scale(s) of one 64-column chunk as 8 fp32 lanes: for g >= 64 one bf16 scale broadcast;
// for g = 32 lanes 0-3 take sc[0] (columns 0..31) and lanes 4-7 sc[1] (columns 32..63).
inline __m256 chunk_scale(const uint16_t* sc, bool pair) {
  if (!pair) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_set1_epi16(static_cast<short>(*sc)), 16));
  int32_t two;
  std::memcpy(&two, sc, 4);
  __m256i v = _mm256_set1_epi32(two);
  return _mm256_castsi256_ps(_mm256_blend_epi32(_mm256_slli_epi32(v, 16),
                                                _mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))), 0xF0));
}

// Rows n0..n1 of y for MT rows of x; weight rows go in pairs (two independent accumulation chains
// per row of x, sharing the activation loads).
template <int MT>
void int4_rows(const Int4Act* act, const uint8_t* q, const uint16_t* scale, const uint16_t* zero, float* y,
               int64_t N, int64_t K, int64_t g, int64_t n0, int64_t n1, int64_t pf) {
  const int64_t G = K / g;
  const bool pair = g == 32;
  const __m256i low = _mm256_set1_epi8(0x0F);
  int64_t n = n0;
  for (; n + 2 <= n1; n += 2) {
    const uint8_t* w0 = q + n * (K / 2);
    const uint8_t* w1 = w0 + K / 2;
    const uint16_t* sc0 = scale + n * G;
    const uint16_t* sc1 = sc0 + G;
    __m256 acc0[MT], acc1[MT];
    for (int m = 0; m < MT; ++m) acc0[m] = acc1[m] = _mm256_setzero_ps();
    for (int64_t c = 0; c < K / CHUNK; ++c) {
      if (c % 2 == 0) {  // one cache line of each row
        _mm_prefetch(reinterpret_cast<const char*>(w0 + pf + c * (CHUNK / 2)), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(w1 + pf + c * (CHUNK / 2)), _MM_HINT_T0);
      }
      __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0 + c * (CHUNK / 2)));
      __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w1 + c * (CHUNK / 2)));
      __m256i lo0 = _mm256_and_si256(v0, low), hi0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), low);
      __m256i lo1 = _mm256_and_si256(v1, low), hi1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), low);
      const int64_t gi = pair ? 2 * c : c * CHUNK / g;
      __m256 ws0 = chunk_scale(sc0 + gi, pair), ws1 = chunk_scale(sc1 + gi, pair);
      for (int m = 0; m < MT; ++m) {
        const int8_t* xq = act[m].q.data() + c * CHUNK;
        __m256i xe = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
        __m256i xo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32));
        __m256 sx = _mm256_loadu_ps(act[m].sxv.data() + c * 8);
        __m256i s0 = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo0, xe), hi0, xo);
        __m256i s1 = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo1, xe), hi1, xo);
        acc0[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), _mm256_mul_ps(ws0, sx), acc0[m]);
        acc1[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), _mm256_mul_ps(ws1, sx), acc1[m]);
      }
    }
    for (int m = 0; m < MT; ++m) {
      y[m * N + n] = hsum(acc0[m]) + zero_term(zero + n * G, sc0, act[m], G);
      y[m * N + n + 1] = hsum(acc1[m]) + zero_term(zero + (n + 1) * G, sc1, act[m], G);
    }
  }
  for (; n < n1; ++n) {  // an odd last row
    const uint8_t* w = q + n * (K / 2);
    const uint16_t* sc = scale + n * G;
    __m256 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t c = 0; c < K / CHUNK; ++c) {
      __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + c * (CHUNK / 2)));
      __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
      __m256 ws = chunk_scale(sc + (pair ? 2 * c : c * CHUNK / g), pair);
      for (int m = 0; m < MT; ++m) {
        const int8_t* xq = act[m].q.data() + c * CHUNK;
        __m256i s = _mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq)));
        s = _mm256_dpbusd_epi32(s, hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32)));
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(ws, _mm256_loadu_ps(act[m].sxv.data() + c * 8)), acc[m]);
      }
    }
    for (int m = 0; m < MT; ++m) y[m * N + n] = hsum(acc[m]) + zero_term(zero + n * G, sc, act[m], G);
  }
}

// Runs rows(m0, mt, n0, n1) over all rows of x in tiles of M_TILE and all weight rows, split over threads.
template <typename F>
void for_tiles(int64_t M, int64_t N, int64_t K, F rows) {
  // enough weight rows per task that a task streams >= 64 KB (spawning costs more below that)
  int64_t grain = std::max<int64_t>(ROW_BLOCK, (64 << 10) / std::max<int64_t>(K, 1));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; b += ROW_BLOCK) {
      int64_t e = std::min(end, b + ROW_BLOCK);
      for (int64_t m0 = 0; m0 < M; m0 += M_TILE) rows(m0, std::min(M_TILE, M - m0), b, e);
    }
  });
}

#endif  // NANOSEEK_VNNI

// The int4 group size: K split into as many groups as scale's last dimension; zero shaped as scale.
int64_t int4_group_size(const torch::Tensor& scale, const torch::Tensor& zero, int64_t K) {
  TORCH_CHECK(zero.sizes() == scale.sizes() && zero.scalar_type() == torch::kBFloat16 && zero.is_contiguous(),
              "zero must be contiguous bf16, shaped as scale ", scale.sizes());
  const int64_t G = scale.size(-1);
  TORCH_CHECK(G > 0 && K % G == 0, "K = ", K, " does not split into ", G, " groups");
  const int64_t g = K / G;
  TORCH_CHECK(g == 32 || g == 64 || g == 128 || g == 256, "group size ", g, " is not 32, 64, 128 or 256");
  return g;
}

void check_x(const torch::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.device().is_cpu(),
              "x must be a contiguous fp32 CPU matrix [M, K]");
  TORCH_CHECK(x.size(1) == K, "x has ", x.size(1), " columns; the weight has ", K);
  TORCH_CHECK(K % CHUNK == 0, "K = ", K, " is not a multiple of ", CHUNK);
}

}  // namespace

bool available() { return cpu_has_vnni(); }

torch::Tensor int8_gemm(torch::Tensor x, torch::Tensor q, torch::Tensor scale, int64_t pf) {
  TORCH_CHECK(available(), "this CPU (or this build) has no AVX-512 VNNI");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == torch::kInt8 && q.is_contiguous(), "q must be contiguous int8 [N, K]");
  TORCH_CHECK(scale.scalar_type() == torch::kBFloat16 && scale.is_contiguous() && scale.numel() == q.size(0),
              "scale must be contiguous bf16 [N]");
  const int64_t N = q.size(0), K = q.size(1), M = x.size(0);
  check_x(x, K);
  auto y = torch::empty({M, N}, x.options());
#ifdef NANOSEEK_VNNI
  std::vector<Int8Act> act(M);
  for (int64_t m = 0; m < M; ++m) quantize_int8_act(x.data_ptr<float>() + m * K, K, act[m]);
  const int8_t* qp = q.data_ptr<int8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  for_tiles(M, N, K, [&](int64_t m0, int64_t mt, int64_t n0, int64_t n1) {
    const Int8Act* a = act.data() + m0;
    float* ym = yp + m0 * N;
    switch (mt) {
      case 1: int8_rows<1>(a, qp, sp, ym, N, K, n0, n1, pf); break;
      case 2: int8_rows<2>(a, qp, sp, ym, N, K, n0, n1, pf); break;
      case 3: int8_rows<3>(a, qp, sp, ym, N, K, n0, n1, pf); break;
      default: int8_rows<4>(a, qp, sp, ym, N, K, n0, n1, pf); break;
    }
  });
#endif
  return y;
}

torch::Tensor int4_gemm(torch::Tensor x, torch::Tensor q, torch::Tensor scale, torch::Tensor zero, int64_t pf) {
  TORCH_CHECK(available(), "this CPU (or this build) has no AVX-512 VNNI");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == torch::kUInt8 && q.is_contiguous(), "q must be contiguous uint8 [N, K/2]");
  const int64_t N = q.size(0), K = 2 * q.size(1), M = x.size(0);
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == N && scale.scalar_type() == torch::kBFloat16 && scale.is_contiguous(),
              "scale must be contiguous bf16 [N, G]");
  const int64_t g = int4_group_size(scale, zero, K), G = K / g;
  check_x(x, K);
  auto y = torch::empty({M, N}, x.options());
#ifdef NANOSEEK_VNNI
  std::vector<Int4Act> act(M);
  for (int64_t m = 0; m < M; ++m) quantize_int4_act(x.data_ptr<float>() + m * K, K, g, act[m]);
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::BFloat16>());
  const uint16_t* mp = reinterpret_cast<const uint16_t*>(zero.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  for_tiles(M, N, K, [&](int64_t m0, int64_t mt, int64_t n0, int64_t n1) {
    const Int4Act* a = act.data() + m0;
    float* ym = yp + m0 * N;
    switch (mt) {
      case 1: int4_rows<1>(a, qp, sp, mp, ym, N, K, g, n0, n1, pf); break;
      case 2: int4_rows<2>(a, qp, sp, mp, ym, N, K, g, n0, n1, pf); break;
      case 3: int4_rows<3>(a, qp, sp, mp, ym, N, K, g, n0, n1, pf); break;
      default: int4_rows<4>(a, qp, sp, mp, ym, N, K, g, n0, n1, pf); break;
    }
  });
#endif
  return y;
}

// ---------------------------------------------------------------------------- chosen experts

// y [n_e, N] = x_i @ W[ids[i]]^T for stacked weights W [E, N, K] and the n_e chosen experts, one
// parallel region over all their rows; x has one row (shared) or n_e rows. rows(act, i, n0, n1)
// computes rows n0..n1 of output i.
template <typename F>
void for_expert_rows(int64_t n_e, int64_t N, int64_t K, F rows) {
  int64_t grain = std::max<int64_t>(ROW_BLOCK, (64 << 10) / std::max<int64_t>(K, 1));
  at::parallel_for(0, n_e * N, grain, [&](int64_t begin, int64_t end) {
    while (begin < end) {
      const int64_t i = begin / N, n0 = begin % N, n1 = std::min(N, n0 + (end - begin));
      rows(i, n0, n1);
      begin += n1 - n0;
    }
  });
}

void check_experts(const torch::Tensor& x, const torch::Tensor& ids, int64_t E) {
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == torch::kInt64 && ids.is_contiguous(), "ids must be int64 [n_e]");
  TORCH_CHECK(x.size(0) == 1 || x.size(0) == ids.size(0), "x must have 1 row or one per chosen expert");
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < ids.size(0); ++i) TORCH_CHECK(id[i] >= 0 && id[i] < E, "expert id ", id[i], " out of range");
}

torch::Tensor int8_gemm_experts(torch::Tensor x, torch::Tensor q, torch::Tensor scale, torch::Tensor ids, int64_t pf) {
  TORCH_CHECK(available(), "this CPU (or this build) has no AVX-512 VNNI");
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == torch::kInt8 && q.is_contiguous(), "q must be contiguous int8 [E, N, K]");
  TORCH_CHECK(scale.scalar_type() == torch::kBFloat16 && scale.is_contiguous() && scale.dim() == 2 &&
              scale.size(0) == q.size(0) && scale.size(1) == q.size(1), "scale must be contiguous bf16 [E, N]");
  const int64_t E = q.size(0), N = q.size(1), K = q.size(2), n_e = ids.size(0);
  check_x(x, K);
  check_experts(x, ids, E);
  auto y = torch::empty({n_e, N}, x.options());
#ifdef NANOSEEK_VNNI
  std::vector<Int8Act> act(x.size(0));
  for (int64_t m = 0; m < x.size(0); ++m) quantize_int8_act(x.data_ptr<float>() + m * K, K, act[m]);
  const int64_t* id = ids.data_ptr<int64_t>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  for_expert_rows(n_e, N, K, [&](int64_t i, int64_t n0, int64_t n1) {
    int8_rows<1>(act.data() + (act.size() == 1 ? 0 : i), qp + id[i] * N * K, sp + id[i] * N, yp + i * N, N, K, n0, n1, pf);
  });
#endif
  return y;
}

torch::Tensor int4_gemm_experts(torch::Tensor x, torch::Tensor q, torch::Tensor scale, torch::Tensor zero,
                                torch::Tensor ids, int64_t pf) {
  TORCH_CHECK(available(), "this CPU (or this build) has no AVX-512 VNNI");
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == torch::kUInt8 && q.is_contiguous(), "q must be contiguous uint8 [E, N, K/2]");
  const int64_t E = q.size(0), N = q.size(1), K = 2 * q.size(2), n_e = ids.size(0);
  TORCH_CHECK(scale.dim() == 3 && scale.size(0) == E && scale.size(1) == N && scale.scalar_type() == torch::kBFloat16 &&
              scale.is_contiguous(), "scale must be contiguous bf16 [E, N, G]");
  const int64_t g = int4_group_size(scale, zero, K), G = K / g;
  check_x(x, K);
  check_experts(x, ids, E);
  auto y = torch::empty({n_e, N}, x.options());
#ifdef NANOSEEK_VNNI
  std::vector<Int4Act> act(x.size(0));
  for (int64_t m = 0; m < x.size(0); ++m) quantize_int4_act(x.data_ptr<float>() + m * K, K, g, act[m]);
  const int64_t* id = ids.data_ptr<int64_t>();
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::BFloat16>());
  const uint16_t* mp = reinterpret_cast<const uint16_t*>(zero.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  for_expert_rows(n_e, N, K, [&](int64_t i, int64_t n0, int64_t n1) {
    const int64_t e = id[i];
    int4_rows<1>(act.data() + (act.size() == 1 ? 0 : i), qp + e * N * (K / 2), sp + e * N * G, mp + e * N * G,
                 yp + i * N, N, K, g, n0, n1, pf);
  });
#endif
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("available", &available, "True if this build and this CPU have AVX-512 VNNI");
  m.def("int8_gemm", &int8_gemm, "y fp32 [M, N] = x fp32 [M, K] @ (q int8 [N, K] * scale bf16 [N])^T",
        py::arg("x"), py::arg("q"), py::arg("scale"), py::arg("prefetch") = PREFETCH_BYTES);
  m.def("int4_gemm", &int4_gemm,
        "y fp32 [M, N] = x fp32 [M, K] @ W^T, W = (codes - 8) * scale + zero per group; codes uint8 "
        "[N, K/2] (low nibble = even column), scale/zero bf16 [N, K/g]",
        py::arg("x"), py::arg("q"), py::arg("scale"), py::arg("zero"), py::arg("prefetch") = PREFETCH_BYTES);
  m.def("int8_gemm_experts", &int8_gemm_experts,
        "y fp32 [n_e, N]: row i = x[i] (or x[0]) @ W[ids[i]]^T for stacked int8 W (q [E, N, K], scale [E, N])",
        py::arg("x"), py::arg("q"), py::arg("scale"), py::arg("ids"), py::arg("prefetch") = PREFETCH_BYTES);
  m.def("int4_gemm_experts", &int4_gemm_experts,
        "y fp32 [n_e, N]: row i = x[i] (or x[0]) @ W[ids[i]]^T for stacked int4 W (q [E, N, K/2], scale/zero [E, N, G])",
        py::arg("x"), py::arg("q"), py::arg("scale"), py::arg("zero"), py::arg("ids"),
        py::arg("prefetch") = PREFETCH_BYTES);
}
