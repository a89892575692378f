// lmforge::linear_rows: y (M, N) = x (M, K) @ (w (N, K) * scale (N)[:, None])^T + bias (N), for the
// few rows of a decode step. w is fp32, bf16 or int8 (per-output-channel scale); the products are
// accumulated in fp32 whatever the dtypes (x and scale are read as fp32), y has x's dtype.
//
// Why our own: at one to a few rows the product is a stream over the weights, and its speed is how
// fast one core reads memory. PyTorch's CPU paths for so few rows stay at half of that or less
// (MKL's fp32 GEMV, oneDNN's bf16, and `_weight_int8pack_mm`, which spends its time converting);
// this kernel walks each weight row once, front to back (two rows far apart at a time, two memory
// streams), converting 16 weights per instruction group and keeping two fp32 accumulators per row
// so the FMA latency is hidden (bench/decode.py and docs/benchmarks.md "Decode" measure both).
// Built by lmforge/infer/rows.py with the host compiler (-O3 -march=native); without AVX-512, a
// plain loop the compiler vectorises.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define LMF_AVX512 1
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
};

#ifdef LMF_AVX512
// 16 weights from w (the first `n` of them: n < 16 only at the end of a row) as fp32 lanes
inline __m512 load16(const float* w, __mmask16 m) { return _mm512_maskz_loadu_ps(m, w); }
inline __m512 load16(const int8_t* w, __mmask16 m) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, w)));
}
inline __m512 load16(const c10::BFloat16* w, __mmask16 m) {
  __m512i u = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, w));
  return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));  // bf16 is the top half of an fp32
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
    __mmask16 mk = K - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (K - k)) - 1);
    for (int s = 0; s < S; s++) {
      __m512 w0 = load16(w + s * stride + k, mk);
      for (int m = 0; m < M; m++)
        a[s][m][0] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(mk, x + m * K + k), a[s][m][0]);
    }
  }
  for (int s = 0; s < S; s++)
    for (int m = 0; m < M; m++) out[s * M + m] = _mm512_reduce_add_ps(_mm512_add_ps(a[s][m][0], a[s][m][1]));
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
    const c10::BFloat16* xb = x.data_ptr<c10::BFloat16>();
    for (int64_t i = 0; i < M * K; i++) xbuf[i] = to_f32(xb[i]);
    xp = xbuf.data();
  } else {
    xf = x.to(at::kFloat).contiguous();
    xp = xf.data_ptr<float>();
  }
  const bool direct = x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16;
  at::Tensor y = at::empty({M, N}, x.options().dtype(direct ? x.scalar_type() : at::kFloat));
  const Out out = y.scalar_type() == at::kFloat ? Out{y.data_ptr<float>(), nullptr}
                                                : Out{nullptr, y.data_ptr<c10::BFloat16>()};
  const Col sc(scale, N, "scale"), bi(bias, N, "bias");
  switch (w.scalar_type()) {
    case at::kFloat: rows(w.data_ptr<float>(), xp, sc, bi, out, M, N, K); break;
    case at::kBFloat16: rows(w.data_ptr<c10::BFloat16>(), xp, sc, bi, out, M, N, K); break;
    case at::kChar: rows(w.data_ptr<int8_t>(), xp, sc, bi, out, M, N, K); break;
    default: TORCH_CHECK(false, "linear_rows: weights must be float32, bfloat16 or int8, not ", w.scalar_type());
  }
  return direct ? y : y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY(lmforge, m) { m.def("linear_rows(Tensor x, Tensor w, Tensor? scale, Tensor? bias) -> Tensor"); }
TORCH_LIBRARY_IMPL(lmforge, CPU, m) { m.impl("linear_rows", &linear_rows); }
