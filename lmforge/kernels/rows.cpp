// lmforge::linear_rows: y (M, N) = x (M, K) @ (w (N, K) * scale (N)[:, None])^T + bias (N), for the
// few rows of a decode step. w is fp32, bf16 or int8 (per-output-channel scale); the products are
// accumulated in fp32 whatever the dtypes (x and scale are read as fp32), y has x's dtype.
//
// Why our own: at one to a few rows the product is a stream over the weights, and its speed is how
// fast one core reads memory. PyTorch's CPU paths for so few rows stay at half of that or less
// (MKL's fp32 GEMV, oneDNN's bf16, and `_weight_int8pack_mm`, which spends its time converting);
// this kernel walks each weight row once, front to back (two rows far apart at a time, two memory
// streams), converting 16 weights per instruction group and keeping two fp32 accumulators per row
// so the FMA latency is hidden (bench/decode.py and docs/benchmarks.md "Decode" measure both). Short
// rows (a small model's layers) go 16 at a time instead, their sums reduced and stored together.
// Built by lmforge/kernels/rows.py with the host compiler (-O3 -march=native -fopenmp, linking torch's
// own OpenMP runtime): at::parallel_for splits output rows across torch's threads (a plain loop
// without -fopenmp). Without AVX-512, plain loops the compiler vectorises: their `omp simd reduction`s
// need OpenMP too, without which GCC keeps each fp32 sum in order, one element at a time (1.6-7x
// slower on an AVX2 CPU, measured).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define LMF_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

constexpr int kMaxRows = 8;  // x rows handled per pass over a weight row (the decode batch)

inline float to_f32(float v) { return v; }
inline float to_f32(int8_t v) { return static_cast<float>(v); }
inline float to_f32(c10::BFloat16 v) {
  uint32_t u = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// an optional (N,) vector (scales, bias) read as fp32, stored fp32 or bf16 (other dtypes converted)
struct Col {
  const float* f = nullptr;
  const c10::BFloat16* b = nullptr;
  at::Tensor keep;
  Col(const std::optional<at::Tensor>& t, int64_t N, const char* what) {
    if (!t) return;
    TORCH_CHECK(t->numel() == N, "linear_rows: ", what, " must have one value per output (", N, ")");
    keep = t->scalar_type() == at::kFloat || t->scalar_type() == at::kBFloat16 ? t->contiguous()
                                                                                : t->to(at::kFloat).contiguous();
    if (keep.scalar_type() == at::kFloat) f = keep.data_ptr<float>();
    else b = keep.data_ptr<c10::BFloat16>();
  }
  float get(int64_t n, float absent) const { return f ? f[n] : b ? to_f32(b[n]) : absent; }
#ifdef LMF_AVX512
  inline __m512 get16(int64_t n, float absent) const;
#endif
};

// the output, fp32 or bf16 (rounded once, from the fp32 sum)
struct Out {
  float* f;
  c10::BFloat16* b;
  Out at(int64_t off) const { return f ? Out{f + off, nullptr} : Out{nullptr, b + off}; }
  void set(int64_t i, float v) const {
    if (f) f[i] = v;
    else b[i] = c10::BFloat16(v);
  }
#ifdef LMF_AVX512
  void set16(int64_t i, __m512 v) const {
    if (f) {
      _mm512_storeu_ps(f + i, v);
      return;
    }
    alignas(64) float o[16];
    _mm512_store_ps(o, v);
    for (int l = 0; l < 16; l++) b[i + l] = c10::BFloat16(o[l]);
  }
#endif
};

#ifdef LMF_AVX512
// the first `left` of 16 lanes (all 16 when left >= 16): the mask of a row's last, partial chunk
inline __mmask16 tail(int64_t left) { return left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1); }

// 16 weights from w (the first `n` of them: n < 16 only at the end of a row) as fp32 lanes
inline __m512 load16(const float* w, __mmask16 m) { return _mm512_maskz_loadu_ps(m, w); }
inline __m512 load16(const int8_t* w, __mmask16 m) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, w)));
}
inline __m512 load16(const c10::BFloat16* w, __mmask16 m) {
  __m512i u = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, w));
  return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));  // bf16 is the top half of an fp32
}

inline __m512 Col::get16(int64_t n, float absent) const {
  return f ? _mm512_loadu_ps(f + n) : b ? load16(b + n, 0xFFFF) : _mm512_set1_ps(absent);
}

// lane i = the sum of a[i]'s 16 lanes, for i < 16: a transposing tree of ~45 instructions where 16
// separate reductions take ~130
inline __m512 sum16(const __m512* a) {
  __m512 b[8], c[4];
  for (int i = 0; i < 8; i++)  // per 128-bit lane L: a[2i] and a[2i+1]'s elements (0+2, 1+3) of L
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; i++) {  // per 128-bit lane L: the sums of L in a[4i..4i+3]
    __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(b[2 * i]), _mm512_castps_pd(b[2 * i + 1]));
    __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(b[2 * i]), _mm512_castps_pd(b[2 * i + 1]));
    c[i] = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
  }
  // the four 128-bit lanes of each c[i] summed, c[i] landing in lane i: a[4i..4i+3] in order
  __m512 d0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
  __m512 d1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x88), _mm512_shuffle_f32x4(c[2], c[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d0, d1, 0x88), _mm512_shuffle_f32x4(d0, d1, 0xDD));
}

// Short weight rows (K <= kShortK) and one x row: 16 consecutive rows at a time (one memory stream),
// their sums reduced together and scaled, biased and stored as one vector. Row by row, the reduction and
// the scalar epilogue would cost more than the row's own products (e.g. a small model's output layer).
constexpr int64_t kShortK = 256;

template <typename W>
void short_rows(const W* w, const float* x, const Col& scale, const Col& bias, const Out& y, int64_t n0, int64_t N,
                int64_t K) {
  for (int64_t n = n0; n + 16 <= N; n += 16) {
    __m512 a[16];
    for (int r = 0; r < 16; r++) a[r] = _mm512_setzero_ps();
    const W* wn = w + n * K;
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 mk = tail(K - k);
      const __m512 xv = _mm512_maskz_loadu_ps(mk, x + k);
      for (int r = 0; r < 16; r++) a[r] = _mm512_fmadd_ps(load16(wn + r * K + k, mk), xv, a[r]);
    }
    y.set16(n, _mm512_fmadd_ps(sum16(a), scale.get16(n, 1.f), bias.get16(n, 0.f)));
  }
}

// out[s * M + m] = dot(w[s * stride : s * stride + K], x[m, 0:K]) for S weight rows `stride` apart and
// M x rows (S, M constants, so the accumulators stay in registers). S = 2 rows far apart are two
// independent memory streams, which one core reads ~10-20% faster than one (bench/decode.py).
// (not inlined: inlined into the big parallel loop, GCC 12 keeps the accumulators on the stack,
// which made the int8 loop 1.5x slower)
template <int M, int S, typename W>
__attribute__((noinline)) void dot_rows(const W* w, int64_t stride, const float* x, int64_t K, float* out) {
  __m512 a[S][M][2];
  for (int s = 0; s < S; s++)
    for (int m = 0; m < M; m++) a[s][m][0] = a[s][m][1] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32)
    for (int s = 0; s < S; s++) {
      __m512 w0 = load16(w + s * stride + k, 0xFFFF), w1 = load16(w + s * stride + k + 16, 0xFFFF);
      for (int m = 0; m < M; m++) {
        a[s][m][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + m * K + k), a[s][m][0]);
        a[s][m][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + m * K + k + 16), a[s][m][1]);
      }
    }
  for (; k < K; k += 16) {
    const __mmask16 mk = tail(K - k);
    for (int s = 0; s < S; s++) {
      __m512 w0 = load16(w + s * stride + k, mk);
      for (int m = 0; m < M; m++)
        a[s][m][0] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(mk, x + m * K + k), a[s][m][0]);
    }
  }
  for (int s = 0; s < S; s++)
    for (int m = 0; m < M; m++) out[s * M + m] = _mm512_reduce_add_ps(_mm512_add_ps(a[s][m][0], a[s][m][1]));
}
#elif defined(__AVX2__) && defined(__FMA__)
// AVX2 + FMA (most laptops' CPUs): the same walk with 8 fp32 lanes; two accumulators per (row, x row)
// while they fit in the 16 ymm registers, one beyond (M x rows of a decode batch)
inline __m256 load8(const float* w) { return _mm256_loadu_ps(w); }
inline __m256 load8(const int8_t* w) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w))));
}
inline __m256 load8(const c10::BFloat16* w) {
  __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));  // bf16 is the top half of an fp32
}
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

template <int M, int S, typename W>
__attribute__((noinline)) void dot_rows(const W* w, int64_t stride, const float* x, int64_t K, float* out) {
  constexpr int U = S * M <= 4 ? 2 : 1;
  __m256 a[S][M][U];
  for (int s = 0; s < S; s++)
    for (int m = 0; m < M; m++)
      for (int u = 0; u < U; u++) a[s][m][u] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 * U <= K; k += 8 * U)
    for (int s = 0; s < S; s++)
      for (int u = 0; u < U; u++) {
        const __m256 wv = load8(w + s * stride + k + 8 * u);
        for (int m = 0; m < M; m++)
          a[s][m][u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k + 8 * u), a[s][m][u]);
      }
  for (int s = 0; s < S; s++)
    for (int m = 0; m < M; m++) {
      __m256 t = a[s][m][0];
      for (int u = 1; u < U; u++) t = _mm256_add_ps(t, a[s][m][u]);
      float r = hsum8(t);
      for (int64_t j = k; j < K; j++) r += to_f32(w[s * stride + j]) * x[m * K + j];  // the row's tail
      out[s * M + m] = r;
    }
}
#else
template <int M, int S, typename W>
inline void dot_rows(const W* w, int64_t stride, const float* x, int64_t K, float* out) {
  for (int s = 0; s < S; s++)
    for (int m = 0; m < M; m++) {
      const W* ws = w + s * stride;
      const float* xm = x + m * K;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < K; k++) acc += to_f32(ws[k]) * xm[k];
      out[s * M + m] = acc;
    }
}
#endif

// y[m, n] for n in [n0, n1): one x row reads the weight rows as two streams (the two halves of the
// range), more x rows share one stream (the product is then closer to compute-bound)
template <int M, typename W>
void rows_of(const W* w, const float* x, const Col& scale, const Col& bias, const Out& y, int64_t n0, int64_t n1,
             int64_t N, int64_t K) {
#ifdef LMF_AVX512
  if (M == 1 && K <= kShortK) {
    short_rows(w, x, scale, bias, y, n0, n1, K);
    n0 += (n1 - n0) / 16 * 16;  // the rows left over go the general way
  }
#endif
  constexpr int S = M == 1 ? 2 : 1;
  const int64_t h = (n1 - n0) / S;
  float out[S * M];
  auto put = [&](int64_t n, const float* o) {
    float sc = scale.get(n, 1.f), b = bias.get(n, 0.f);
    for (int m = 0; m < M; m++) y.set(m * N + n, o[m] * sc + b);
  };
  for (int64_t n = n0; n < n0 + h; n++) {
    dot_rows<M, S>(w + n * K, h * K, x, K, out);
    for (int s = 0; s < S; s++) put(n + s * h, out + s * M);
  }
  for (int64_t n = n0 + S * h; n < n1; n++) {  // what the halves leave over (one row at most)
    dot_rows<M, 1>(w + n * K, 0, x, K, out);
    put(n, out);
  }
}

template <typename W>
void rows(const W* w, const float* x, const Col& scale, const Col& bias, const Out& y, int64_t M, int64_t N,
          int64_t K) {
  // rows of w split across threads; x rows in groups of kMaxRows, each group one pass over the rows
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
      const float* xm = x + m0 * K;
      const Out ym = y.at(m0 * N);
      switch (std::min<int64_t>(kMaxRows, M - m0)) {
        case 1: rows_of<1>(w, xm, scale, bias, ym, n0, n1, N, K); break;
        case 2: rows_of<2>(w, xm, scale, bias, ym, n0, n1, N, K); break;
        case 3: rows_of<3>(w, xm, scale, bias, ym, n0, n1, N, K); break;
        case 4: rows_of<4>(w, xm, scale, bias, ym, n0, n1, N, K); break;
        case 5: rows_of<5>(w, xm, scale, bias, ym, n0, n1, N, K); break;
        case 6: rows_of<6>(w, xm, scale, bias, ym, n0, n1, N, K); break;
        case 7: rows_of<7>(w, xm, scale, bias, ym, n0, n1, N, K); break;
        default: rows_of<8>(w, xm, scale, bias, ym, n0, n1, N, K); break;
      }
    }
  });
}

// a contiguous fp32 or bf16 tensor's values as fp32, into y
void read(const at::Tensor& t, float* y) {
  const int64_t n = t.numel();
  if (t.scalar_type() == at::kFloat) {
    std::memcpy(y, t.data_ptr<float>(), n * sizeof(float));
    return;
  }
  const c10::BFloat16* b = t.data_ptr<c10::BFloat16>();
  for (int64_t i = 0; i < n; i++) y[i] = to_f32(b[i]);
}

// y = x (M, K) fp32 @ (w * scale)^T + bias with w's dtype (float32, bfloat16 or int8) dispatched
void rows_of_weight(const at::Tensor& w, const float* x, const Col& sc, const Col& bi, const Out& y, int64_t M,
                    const char* op) {
  const int64_t N = w.size(0), K = w.size(1);
  switch (w.scalar_type()) {
    case at::kFloat: rows(w.data_ptr<float>(), x, sc, bi, y, M, N, K); break;
    case at::kBFloat16: rows(w.data_ptr<c10::BFloat16>(), x, sc, bi, y, M, N, K); break;
    case at::kChar: rows(w.data_ptr<int8_t>(), x, sc, bi, y, M, N, K); break;
    default: TORCH_CHECK(false, op, ": weights must be float32, bfloat16 or int8, not ", w.scalar_type());
  }
}

at::Tensor linear_rows(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& scale,
                       const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "linear_rows: x (M, K), w (N, K)");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && w.is_contiguous(), "linear_rows: CPU, w contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  // fp32 and bf16 activations, scales, biases and outputs are read and written as they are (no
  // conversion ops around the kernel: a decode step makes ~120 of these calls); other dtypes convert
  at::Tensor xf = x.scalar_type() == at::kFloat ? x.contiguous() : at::Tensor();
  static thread_local std::vector<float> xbuf;
  const float* xp;
  if (xf.defined()) {
    xp = xf.data_ptr<float>();
  } else if (x.scalar_type() == at::kBFloat16 && x.is_contiguous()) {
    xbuf.resize(M * K);
    read(x, xbuf.data());
    xp = xbuf.data();
  } else {
    xf = x.to(at::kFloat).contiguous();
    xp = xf.data_ptr<float>();
  }
  const bool direct = x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16;
  at::Tensor y = at::empty({M, N}, x.options().dtype(direct ? x.scalar_type() : at::kFloat));
  const Out out = y.scalar_type() == at::kFloat ? Out{y.data_ptr<float>(), nullptr}
                                                : Out{nullptr, y.data_ptr<c10::BFloat16>()};
  rows_of_weight(w, xp, Col(scale, N, "scale"), Col(bias, N, "bias"), out, M, "linear_rows");
  return direct ? y : y.to(x.scalar_type());
}

// ---------------------------------------------------------------------------------------------------
// lmforge::decode_attention(q, k, v, mask, scale): softmax(q k^T * scale, where mask) v for the few
// queries of a decode step. q (B, H, T, hd); k, v (B, KV, S, hd), query head h reading key/value head
// h / (H / KV); mask (B, 1, T, S) bool (True = visible) or None (all visible). The last dimension is
// contiguous, the others may have any strides (views of the cache). Returns (B, T, H, hd) contiguous in
// q's dtype: the layout the output projection reads, so no transpose copy follows.
//
// Why our own: a decode step's attention reads each visible key and value once, so it is a memory
// stream too, but PyTorch's fused CPU kernel spends 2-3x that time at one query (several times more
// in bf16), and a compiled step with a static cache (engine.py) attends over every slot of the buffer.
// This kernel skips the masked slots entirely, so it reads only the keys in use, whatever the buffer's
// size; each key row is read once for all the query heads that share it, and the sums are fp32.
constexpr int kMaxGroup = 8;  // query heads per pass over a key/value head's rows (more: several passes)

// scratch for one group: the queries as fp32 (G, hd), the visible slots (n,), the scores (G, n)
struct Scratch {
  std::vector<float> f;
  std::vector<int32_t> idx;
};

#ifdef LMF_AVX512
// e^x in 16 lanes (relative error ~1e-7): 2^(x log2 e) as an integer power of two (scalef) times a
// polynomial in the fraction f, |f| <= 1/2 (Taylor series of e^(f ln 2) to degree 7)
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));  // below this e^x underflows; keep scalef's exponent sane
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  const __m512 f = _mm512_fmsub_ps(x, _mm512_set1_ps(1.44269504f), n);
  static const float c[] = {1.525273e-5f, 1.540353e-4f, 1.333356e-3f, 9.618129e-3f,
                            5.550411e-2f, 2.402265e-1f, 6.931472e-1f, 1.f};
  __m512 p = _mm512_set1_ps(c[0]);
  for (int i = 1; i < 8; i++) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c[i]));
  return _mm512_scalef_ps(p, n);
}

// G (a constant: its accumulators stay in registers) query heads sharing one key/value head
template <int G, typename E>
void attend_heads(const float* qf, const E* k, int64_t k_ss, const E* v, int64_t v_ss, const int32_t* idx,
                  int64_t n, int64_t hd, float scale, float* sc, const Out& y) {
  // scores (G, n): each key row read once for the G heads, its dot products reduced at the end
  for (int64_t i = 0; i < n; i++) {
    const E* kr = k + idx[i] * k_ss;
    __m512 a[G];
    for (int j = 0; j < G; j++) a[j] = _mm512_setzero_ps();
    for (int64_t c = 0; c < hd; c += 16) {
      const __mmask16 mk = tail(hd - c);
      const __m512 kk = load16(kr + c, mk);
      for (int j = 0; j < G; j++) a[j] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, qf + j * hd + c), kk, a[j]);
    }
    for (int j = 0; j < G; j++) sc[j * n + i] = _mm512_reduce_add_ps(a[j]) * scale;
  }
  for (int j = 0; j < G; j++) {  // softmax over the visible slots
    float* p = sc + j * n;
    __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), sum = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) mx = _mm512_mask_max_ps(mx, tail(n - i), mx, _mm512_maskz_loadu_ps(tail(n - i), p + i));
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 mk = tail(n - i);
      const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, p + i), m));
      _mm512_mask_storeu_ps(p + i, mk, e);
      sum = _mm512_mask_add_ps(sum, mk, sum, e);
    }
    const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
    for (int64_t i = 0; i < n; i += 16)
      _mm512_mask_storeu_ps(p + i, tail(n - i), _mm512_mul_ps(_mm512_maskz_loadu_ps(tail(n - i), p + i), inv));
  }
  // out (G, hd) = p (G, n) @ v[visible] (n, hd), 16 columns at a time (one cache line of each row); two
  // rows at a time into separate sums (G <= 4), so that more FMA chains are in flight
  constexpr int U = G <= 4 ? 2 : 1;
  for (int64_t c = 0; c < hd; c += 16) {
    const __mmask16 mk = tail(hd - c);
    __m512 a[U][G];
    for (int u = 0; u < U; u++)
      for (int j = 0; j < G; j++) a[u][j] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + U <= n; i += U)
      for (int u = 0; u < U; u++) {
        const __m512 vv = load16(v + idx[i + u] * v_ss + c, mk);
        for (int j = 0; j < G; j++) a[u][j] = _mm512_fmadd_ps(_mm512_set1_ps(sc[j * n + i + u]), vv, a[u][j]);
      }
    for (; i < n; i++) {
      const __m512 vv = load16(v + idx[i] * v_ss + c, mk);
      for (int j = 0; j < G; j++) a[0][j] = _mm512_fmadd_ps(_mm512_set1_ps(sc[j * n + i]), vv, a[0][j]);
    }
    float o[16];
    for (int j = 0; j < G; j++) {
      __m512 t = a[0][j];
      for (int u = 1; u < U; u++) t = _mm512_add_ps(t, a[u][j]);
      _mm512_storeu_ps(o, t);
      for (int64_t l = 0; l < std::min<int64_t>(16, hd - c); l++) y.set(j * hd + c + l, o[l]);
    }
  }
}
#else
template <int G, typename E>
void attend_heads(const float* qf, const E* k, int64_t k_ss, const E* v, int64_t v_ss, const int32_t* idx,
                  int64_t n, int64_t hd, float scale, float* sc, const Out& y) {
  for (int64_t i = 0; i < n; i++)
    for (int j = 0; j < G; j++) {
      const E* kr = k + idx[i] * k_ss;
      const float* qj = qf + j * hd;
      float a = 0.f;
#pragma omp simd reduction(+ : a)
      for (int64_t c = 0; c < hd; c++) a += qj[c] * to_f32(kr[c]);
      sc[j * n + i] = a * scale;
    }
  for (int j = 0; j < G; j++) {
    float* p = sc + j * n;
    float mx = -std::numeric_limits<float>::infinity(), sum = 0.f;
    for (int64_t i = 0; i < n; i++) mx = std::max(mx, p[i]);
    for (int64_t i = 0; i < n; i++) sum += (p[i] = std::exp(p[i] - mx));
    for (int64_t i = 0; i < n; i++) p[i] /= sum;
  }
  // p v: each value row is read front to back into hd sums (lanes across the head dimension, each
  // still summed over the slots in order), not one strided column at a time
  constexpr int64_t kC = 256;
  float acc[kC];
  for (int j = 0; j < G; j++) {
    const float* p = sc + j * n;
    for (int64_t c0 = 0; c0 < hd; c0 += kC) {
      const int64_t w = std::min(kC, hd - c0);
      std::fill(acc, acc + w, 0.f);
      for (int64_t i = 0; i < n; i++) {
        const E* vr = v + idx[i] * v_ss + c0;
        const float pi = p[i];
#pragma omp simd
        for (int64_t c = 0; c < w; c++) acc[c] += pi * to_f32(vr[c]);
      }
      for (int64_t c = 0; c < w; c++) y.set(j * hd + c0 + c, acc[c]);
    }
  }
}
#endif

// G <= kMaxGroup query heads (q_sh apart) reading one key/value head over S slots (mask: S flags m_ss
// apart, or none); writes their outputs (G, hd) at y
template <typename E>
void attend_group(const E* q, int64_t q_sh, const E* k, int64_t k_ss, const E* v, int64_t v_ss, const bool* mask,
                  int64_t m_ss, int64_t S, int G, int64_t hd, float scale, const Out& y) {
  static thread_local Scratch scr;
  scr.f.resize(G * hd + G * S);
  scr.idx.resize(S);
  float* qf = scr.f.data();
  int32_t* idx = scr.idx.data();
  for (int j = 0; j < G; j++)
    for (int64_t c = 0; c < hd; c++) qf[j * hd + c] = to_f32(q[j * q_sh + c]);
  int64_t n = 0;  // the visible slots: the only keys and values read
  for (int64_t s = 0; s < S; s++)
    if (!mask || mask[s * m_ss]) idx[n++] = static_cast<int32_t>(s);
  float* sc = qf + G * hd;
  switch (G) {
    case 1: attend_heads<1>(qf, k, k_ss, v, v_ss, idx, n, hd, scale, sc, y); break;
    case 2: attend_heads<2>(qf, k, k_ss, v, v_ss, idx, n, hd, scale, sc, y); break;
    case 3: attend_heads<3>(qf, k, k_ss, v, v_ss, idx, n, hd, scale, sc, y); break;
    case 4: attend_heads<4>(qf, k, k_ss, v, v_ss, idx, n, hd, scale, sc, y); break;
    case 5: attend_heads<5>(qf, k, k_ss, v, v_ss, idx, n, hd, scale, sc, y); break;
    case 6: attend_heads<6>(qf, k, k_ss, v, v_ss, idx, n, hd, scale, sc, y); break;
    case 7: attend_heads<7>(qf, k, k_ss, v, v_ss, idx, n, hd, scale, sc, y); break;
    default: attend_heads<8>(qf, k, k_ss, v, v_ss, idx, n, hd, scale, sc, y); break;
  }
}

template <typename E>
void attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& m, float scale,
            const Out& y) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), hd = q.size(3), KV = k.size(1), S = k.size(2);
  const int64_t G = H / KV, P = (G + kMaxGroup - 1) / kMaxGroup;  // heads per key/value head, passes
  const E* qp = q.data_ptr<E>();
  const E* kp = k.data_ptr<E>();
  const E* vp = v.data_ptr<E>();
  const bool* mp = m.defined() ? m.data_ptr<bool>() : nullptr;
  // one work item per (row, query, key/value head, pass): up to kMaxGroup of its query heads
  at::parallel_for(0, B * T * KV * P, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; i++) {
      const int64_t b = i / (T * KV * P), t = i / (KV * P) % T, g = i / P % KV, h = g * G + i % P * kMaxGroup;
      const int Gp = static_cast<int>(std::min<int64_t>(kMaxGroup, (g + 1) * G - h));
      const bool* mrow = mp ? mp + (m.size(0) == 1 ? 0 : b * m.stride(0)) + t * m.stride(2) : nullptr;
      attend_group(qp + b * q.stride(0) + h * q.stride(1) + t * q.stride(2), q.stride(1),
                   kp + b * k.stride(0) + g * k.stride(1), k.stride(2), vp + b * v.stride(0) + g * v.stride(1),
                   v.stride(2), mrow, mp ? m.stride(3) : 0, S, Gp, hd, scale, y.at(((b * T + t) * H + h) * hd));
    }
  });
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes() && q.size(0) == k.size(0) &&
                  q.size(3) == k.size(3) && k.size(1) > 0 && q.size(1) % k.size(1) == 0,
              "decode_attention: q (B, H, T, hd), k and v (B, KV, S, hd) with H a multiple of KV");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "decode_attention: CPU tensors");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type() &&
                  (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16),
              "decode_attention: q, k, v all float32 or all bfloat16");
  // the last dimension must be contiguous (the cache's is); copy otherwise
  auto rowwise = [](const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); };
  const at::Tensor qc = rowwise(q), kc = rowwise(k), vc = rowwise(v);
  at::Tensor m;
  if (mask) {
    m = *mask;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 4 && (m.size(0) == 1 || m.size(0) == q.size(0)) &&
                    m.size(1) == 1 && m.size(2) == q.size(2) && m.size(3) == k.size(2),
                "decode_attention: mask must be bool (B, 1, T, S)");
  }
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), hd = q.size(3);
  at::Tensor y = at::empty({B, T, H, hd}, q.options());
  const Out out = y.scalar_type() == at::kFloat ? Out{y.data_ptr<float>(), nullptr}
                                                : Out{nullptr, y.data_ptr<c10::BFloat16>()};
  const float sc = static_cast<float>(scale);
  if (q.scalar_type() == at::kFloat) attend<float>(qc, kc, vc, m, sc, out);
  else attend<c10::BFloat16>(qc, kc, vc, m, sc, out);
  return y;
}

// ---------------------------------------------------------------------------------------------------
// lmforge::decode_layer: one pre-norm decoder block of a decode step in one call, so that a step costs
// one dispatch per layer instead of ~50 (norms, RoPE, cache writes, residual adds, the MLP's
// activation each were an op of their own: 4-8 ms of a 20-30 ms step of a 30-layer model in eager
// PyTorch, measured). The block (model.py's Block, Attention and MLP, for the families whose blocks
// are x + attn(norm(x)), then x + mlp(norm(x))):
//   h = rmsnorm(x); q, k, v = split(h Wqkv^T + b); q, k = rope(q), rope(k)   (first `rot` channels)
//   cache[:, :, slot : slot + T] = k, v;  a = attention(q, cache[:, :, :S], mask)
//   x = x + a Wo^T + b;  h = rmsnorm(x);  g = h Win^T + b
//   x = x + (act(g[:, :F]) * g[:, F:]  (gated)  or  act(g)) Wout^T + b
// x (B, T, d) fp32 or bf16 (the residual stream, rounded to its dtype after each add, as eager does);
// weights w[i] fp32, bf16 or int8 with scales (Wqkv, Wo, Win, Wout); norm weights (d,) (RMSNorm as
// Llama's, or Gemma's 1 + w); cos, sin (B or 1, T, 1, rot): model.py's full-width RoPE tables (or
// undefined: no RoPE); kc, vc (B, KV, S_max, hd) the layer's cache (any strides but the last);
// mask (B, 1, T, S) or none. Everything in between is fp32 (the eager path rounds q, k, v and the
// activations to bf16 on the way: results agree to bf16's precision, not bit for bit).
enum Act { kSilu = 0, kGeluTanh = 1, kGelu = 2, kRelu = 3 };

inline float act(float v, int64_t kind) {
  switch (kind) {
    case kSilu: return v / (1.f + std::exp(-v));
    case kGeluTanh: return 0.5f * v * (1.f + std::tanh(0.7978845608f * (v + 0.044715f * v * v * v)));
    case kGelu: return 0.5f * v * (1.f + std::erf(v * 0.70710678f));
    default: return v > 0.f ? v : 0.f;
  }
}

// y (M, d) = rmsnorm of x (M, d) by weight w (d,): w * x / sqrt(mean(x^2) + eps), or (1 + w) * ...
void rms_rows(const float* x, const float* w, float unit, double eps, int64_t M, int64_t d, float* y) {
  for (int64_t m = 0; m < M; m++) {
    const float* xm = x + m * d;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t c = 0; c < d; c++) ss += xm[c] * xm[c];
    const float r = 1.f / std::sqrt(ss / static_cast<float>(d) + static_cast<float>(eps));
#pragma omp simd
    for (int64_t c = 0; c < d; c++) y[m * d + c] = xm[c] * r * (unit + w[c]);
  }
}

template <typename E>
at::Tensor layer(const at::Tensor& x, const std::vector<at::Tensor>& w, const std::vector<std::optional<at::Tensor>>& scale,
                 const std::vector<std::optional<at::Tensor>>& bias, const std::vector<at::Tensor>& norm, double eps,
                 bool unit_offset, const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                 const at::Tensor& kc, const at::Tensor& vc, int64_t slot, int64_t S, const at::Tensor& mask,
                 int64_t H, int64_t KV, double scale_qk, int64_t act_kind, bool glu) {
  const int64_t B = x.size(0), T = x.size(1), d = x.size(2), M = B * T, hd = kc.size(3);
  const int64_t QKV = (H + 2 * KV) * hd, G = w[2].size(0), F = glu ? G / 2 : G;
  TORCH_CHECK(w[0].size(0) == QKV && w[0].size(1) == d && w[1].size(0) == d && w[1].size(1) == H * hd &&
                  w[2].size(1) == d && w[3].size(0) == d && w[3].size(1) == F,
              "decode_layer: weight shapes do not match the block");
  TORCH_CHECK(kc.size(0) == B && kc.size(1) == KV && vc.sizes() == kc.sizes() && kc.stride(3) == 1 &&
                  vc.stride(3) == 1 && slot + T <= kc.size(2) && S <= kc.size(2),
              "decode_layer: cache (B, KV, S, hd) with room for the chunk");
  const float unit = unit_offset ? 1.f : 0.f;
  TORCH_CHECK(norm[0].numel() == d && norm[1].numel() == d, "decode_layer: norm weights (d,)");
  std::vector<float> n0(d), n1(d);
  read(norm[0].contiguous(), n0.data());
  read(norm[1].contiguous(), n1.data());
  for (const auto& wi : w)
    TORCH_CHECK(wi.dim() == 2 && wi.is_contiguous() && wi.device().is_cpu(), "decode_layer: weights (N, K) contiguous");
  // y (M, N) fp32 = x (M, K) fp32 @ (w[i] * scale[i])^T + bias[i], on the row kernel
  auto product = [&](int i, const float* xi, float* yi) {
    const int64_t N = w[i].size(0);
    rows_of_weight(w[i], xi, Col(scale[i], N, "scale"), Col(bias[i], N, "bias"), Out{yi, nullptr}, M, "decode_layer");
  };
  std::vector<float> xf(M * d), h(M * d), qkv(M * QKV), g(M * G), a(M * F), o(M * d);
  const at::Tensor xc = x.contiguous();
  read(xc, xf.data());
  // attention: norm, q k v, RoPE on the q and k heads, k v into the cache
  rms_rows(xf.data(), n0.data(), unit, eps, M, d, h.data());
  product(0, h.data(), qkv.data());
  if (cos) {
    const int64_t rot = cos->size(3), half = rot / 2;
    const at::Tensor cs = cos->contiguous(), sn = sin->contiguous();  // (B or 1, T, 1, rot)
    TORCH_CHECK(rot <= hd && rot <= 1024 && rot % 2 == 0 && sn.sizes() == cs.sizes() && cs.size(1) == T,
                "decode_layer: RoPE tables (B or 1, T, 1, rot) over at most hd channels");
    std::vector<float> cf(cs.numel()), sf(sn.numel());
    read(cs, cf.data());
    read(sn, sf.data());
    float tmp[1024];
    for (int64_t b = 0; b < B; b++)
      for (int64_t t = 0; t < T; t++) {
        const float* cb = cf.data() + ((cs.size(0) == 1 ? 0 : b) * T + t) * rot;
        const float* sb = sf.data() + ((cs.size(0) == 1 ? 0 : b) * T + t) * rot;
        float* row = qkv.data() + (b * T + t) * QKV;
        for (int64_t hh = 0; hh < H + KV; hh++) {
          float* v = row + hh * hd;
          std::memcpy(tmp, v, rot * sizeof(float));
          for (int64_t c = 0; c < half; c++) {
            v[c] = tmp[c] * cb[c] + tmp[c + half] * sb[c];
            v[c + half] = tmp[c + half] * cb[c + half] + tmp[c] * sb[c + half];
          }
        }
      }
  }
  at::Tensor q = at::empty({B, H, T, hd}, kc.options());
  E* qp = q.data_ptr<E>();
  E* kp = kc.data_ptr<E>();
  E* vp = vc.data_ptr<E>();
  for (int64_t b = 0; b < B; b++)
    for (int64_t t = 0; t < T; t++) {
      const float* row = qkv.data() + (b * T + t) * QKV;
      for (int64_t hh = 0; hh < H; hh++)
        for (int64_t c = 0; c < hd; c++) qp[((b * H + hh) * T + t) * hd + c] = E(row[hh * hd + c]);
      for (int64_t g2 = 0; g2 < KV; g2++) {
        E* kr = kp + b * kc.stride(0) + g2 * kc.stride(1) + (slot + t) * kc.stride(2);
        E* vr = vp + b * vc.stride(0) + g2 * vc.stride(1) + (slot + t) * vc.stride(2);
        for (int64_t c = 0; c < hd; c++) {
          kr[c] = E(row[(H + g2) * hd + c]);
          vr[c] = E(row[(H + KV + g2) * hd + c]);
        }
      }
    }
  at::Tensor y = at::empty({B, T, H, hd}, at::TensorOptions().dtype(at::kFloat));
  attend<E>(q, kc.narrow(2, 0, S), vc.narrow(2, 0, S), mask, static_cast<float>(scale_qk),
            Out{y.data_ptr<float>(), nullptr});
  product(1, y.data_ptr<float>(), o.data());
  at::Tensor out = at::empty_like(xc);
  float* of = out.scalar_type() == at::kFloat ? out.data_ptr<float>() : nullptr;
  c10::BFloat16* ob = of ? nullptr : out.data_ptr<c10::BFloat16>();
  auto round = [&](int64_t i, float v) -> float {  // the residual in x's dtype, as eager keeps it
    if (of) return of[i] = v;
    return to_f32(ob[i] = c10::BFloat16(v));
  };
  for (int64_t i = 0; i < M * d; i++) xf[i] = round(i, xf[i] + o[i]);
  // MLP: norm, in, activation, out
  rms_rows(xf.data(), n1.data(), unit, eps, M, d, h.data());
  product(2, h.data(), g.data());
  for (int64_t m = 0; m < M; m++)
    for (int64_t c = 0; c < F; c++)
      a[m * F + c] = glu ? act(g[m * G + c], act_kind) * g[m * G + F + c] : act(g[m * G + c], act_kind);
  product(3, a.data(), o.data());
  for (int64_t i = 0; i < M * d; i++) round(i, xf[i] + o[i]);
  return out;
}

at::Tensor decode_layer(const at::Tensor& x, at::TensorList w, const c10::List<std::optional<at::Tensor>>& scale,
                        const c10::List<std::optional<at::Tensor>>& bias, at::TensorList norm, double eps,
                        bool unit_offset, const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                        const at::Tensor& kc, const at::Tensor& vc, int64_t slot, int64_t S,
                        const std::optional<at::Tensor>& mask, int64_t H, int64_t KV, double scale_qk,
                        int64_t act_kind, bool glu) {
  TORCH_CHECK(x.dim() == 3 && x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "decode_layer: x (B, T, d) float32 or bfloat16 on CPU");
  TORCH_CHECK(w.size() == 4 && scale.size() == 4 && bias.size() == 4 && norm.size() == 2,
              "decode_layer: 4 weights (qkv, o, in, out) with their scales and biases, 2 norms");
  TORCH_CHECK(kc.dim() == 4 && kc.scalar_type() == vc.scalar_type() &&
                  (kc.scalar_type() == at::kFloat || kc.scalar_type() == at::kBFloat16),
              "decode_layer: cache float32 or bfloat16");
  TORCH_CHECK(!cos == !sin, "decode_layer: RoPE needs both tables");
  TORCH_CHECK(KV > 0 && H % KV == 0, "decode_layer: H must be a multiple of KV");
  at::Tensor m;
  if (mask) {
    m = *mask;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 4 && (m.size(0) == 1 || m.size(0) == x.size(0)) &&
                    m.size(1) == 1 && m.size(2) == x.size(1) && m.size(3) == S,
                "decode_layer: mask must be bool (B, 1, T, S)");
  }
  std::vector<at::Tensor> ws(w.begin(), w.end()), ns(norm.begin(), norm.end());
  std::vector<std::optional<at::Tensor>> sc, bi;
  for (size_t i = 0; i < 4; i++) {
    sc.push_back(scale.get(i));
    bi.push_back(bias.get(i));
  }
  if (kc.scalar_type() == at::kFloat)
    return layer<float>(x, ws, sc, bi, ns, eps, unit_offset, cos, sin, kc, vc, slot, S, m, H, KV, scale_qk, act_kind, glu);
  return layer<c10::BFloat16>(x, ws, sc, bi, ns, eps, unit_offset, cos, sin, kc, vc, slot, S, m, H, KV, scale_qk,
                              act_kind, glu);
}

}  // namespace

TORCH_LIBRARY(lmforge, m) {
  m.def("linear_rows(Tensor x, Tensor w, Tensor? scale, Tensor? bias) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
  m.def(
      "decode_layer(Tensor x, Tensor[] w, Tensor?[] scale, Tensor?[] bias, Tensor[] norm, float eps, "
      "bool unit_offset, Tensor? cos, Tensor? sin, Tensor(a!) kc, Tensor(b!) vc, int slot, int S, Tensor? mask, "
      "int H, int KV, float scale_qk, int act, bool glu) -> Tensor");
}
TORCH_LIBRARY_IMPL(lmforge, CPU, m) {
  m.impl("linear_rows", &linear_rows);
  m.impl("decode_attention", &decode_attention);
  m.impl("decode_layer", &decode_layer);
}
