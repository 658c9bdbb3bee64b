// The LSTM's two loops over time, each one call on one CPU thread: rnn_jax/native.py
// builds this file and registers the two handlers with XLA's FFI; rnn_jax/fused.py
// runs them as the fused layer's forward and backward loops (kernel="native").
//
// Layouts (row-major, float32; G = 4H, the gate blocks in the order I, F, O, C~):
//   forward:  xp <[T, B, G]> (X W_x), w <[H, G]> (W_h), b <[G]>, h0, c0 <[B, H]>,
//             valid <bool[T, B]>
//          -> ys <[T, B, H]>, h_T, c_T <[B, H]>, and with the attribute save, the
//             saves for the backward loop: acts <[T, B, G]> (i, f, o, c~ after their
//             nonlinearities), c_prev <[T, B, H]> (the cell state before each
//             step), tanh_c <[T, B, H]> and h_prev_t <[H, T B]> (the hidden state
//             before each step, transposed: the weight gradient's left operand,
//             sum_t h_{t-1}ᵀ dA_t = h_prev_t dA as a plain [H, T B] x [T B, G]
//             matmul; without save these four are not written)
//   backward: w, acts, c_prev, tanh_c, dys <[T, B, H]>, dh_T, dc_T, valid
//          -> da <[T, B, G]> (gradient of the pre-activations), dh0, dc0 and
//             db <[G]> = sum_{t,b} da[t, b] (each step's rows summed first, the
//             steps' sums added with Kahan's compensation)
//
// One step, per row (the equations of rnn_jax.cells.lstm):
//   a = xp_t + b + h_{t-1} W_h;  i, f, o = sigma(a_I), sigma(a_F), sigma(a_O);  g = tanh(a_C)
//   c_t = f * c_{t-1} + i * g;  h_t = o * tanh(c_t)
// and backward, with dh = dh_t + dy_t:
//   dc = dc_t + dh * o * (1 - tanh(c_t)^2)
//   da = [dc g i(1-i), dc c_{t-1} f(1-f), dh tanh(c_t) o(1-o), dc i (1-g^2)]
//   dh_{t-1} = da W_hᵀ;  dc_{t-1} = dc * f
// A row whose step is not valid keeps its carry, outputs zero, and passes its
// gradients through (da = 0), as the XLA loops do. With the attribute reverse, the
// forward loop runs t = T-1, ..., 0 (and the backward loop t = 0, ..., T-1): the
// backward direction of a bidirectional layer, read in place. The arrays stay in
// time order; a row's padding (its last steps, not valid) comes first and keeps
// the initial carry, so the row reads its valid steps L-1, ..., 0.
//
// The matmuls are register-tiled: MB rows times one group of kLanes hidden units
// (one vector), whose gate columns sit side by side in a copy of W_h made once per
// call, so each tile ends with the gates of whole units and the forward step's
// nonlinearities and cell update run on the tile while it is in registers. Where
// the registers hold only two gates' accumulators (16-register instruction sets),
// the forward step takes two passes per unit group, and the second applies the
// nonlinearities. The vectors are GCC/Clang vector extensions of one register each:
// 16 floats on AVX-512, 8 on AVX/AVX2, 4 on NEON and SSE (below).

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

// The vector width and the tiles per instruction set. A forward tile holds kRows x
// kPassGates vectors of accumulators, the kPassGates weight vectors and a broadcast
// row value; a backward tile kBackRows x kBackNZ accumulators, kBackNZ weights and
// the broadcast. They must fit the vector registers: AVX-512 and ARM's NEON (32
// registers), 6 x 4 + 4 + 1; AVX/AVX2 and SSE (16), 6 x 2 + 2 + 1, the forward step
// in two passes of two gates. With 16 registers, 3 rows x 4 gates (12 + 4 + 1)
// left no register for the broadcast and loaded every weight once per row: a real
// AVX2 CPU (Zen 3) ran its forward loop at 55 GFLOP/s, two passes at 66, and the
// backward loop at 62 against 78 for 6 x 2 (medium, one core). (A vector wider than
// the registers holds too few rows: AVX2 running the AVX-512 layout of 1 row of 16
// floats streamed W_h once per row and was 4-6x slower than XLA's loops.)
#define RNN_JAX_X4(x) x, x, x, x
#if defined(__AVX512F__)
constexpr int kLanes = 16, kRows = 6, kPassGates = 4, kBackRows = 6, kBackNZ = 4;
#define RNN_JAX_SPLAT(x) RNN_JAX_X4(x), RNN_JAX_X4(x), RNN_JAX_X4(x), RNN_JAX_X4(x)
#elif defined(__AVX__)
constexpr int kLanes = 8, kRows = 6, kPassGates = 2, kBackRows = 6, kBackNZ = 2;
#define RNN_JAX_SPLAT(x) RNN_JAX_X4(x), RNN_JAX_X4(x)
#elif defined(__aarch64__) || defined(__ARM_NEON)
constexpr int kLanes = 4, kRows = 6, kPassGates = 4, kBackRows = 6, kBackNZ = 4;
#define RNN_JAX_SPLAT(x) RNN_JAX_X4(x)
#else
constexpr int kLanes = 4, kRows = 6, kPassGates = 2, kBackRows = 6, kBackNZ = 2;
#define RNN_JAX_SPLAT(x) RNN_JAX_X4(x)
#endif
typedef float vf __attribute__((vector_size(kLanes * 4)));
typedef float vf_u __attribute__((vector_size(kLanes * 4), aligned(4)));
typedef int32_t vi __attribute__((vector_size(kLanes * 4)));

inline vf load(const float* p) { return *reinterpret_cast<const vf_u*>(p); }
inline void store(float* p, vf v) { *reinterpret_cast<vf_u*>(p) = v; }
// (not vf{} + x: adding +0.0 is not a no-op for -0.0, so the compiler keeps a scalar
// add before every broadcast, and the broadcast cannot fold into the FMA)
// (an initializer of kLanes copies: a loop setting the lanes one by one compiled to
// lane inserts, not a broadcast folded into the FMA, and made the AVX-512 loops 4x
// slower)
inline vf splat(float x) { return vf{RNN_JAX_SPLAT(x)}; }

// e^x to about 1 ulp over [-87, 88] (clamped outside): x = n ln2 + r, |r| <= ln2/2,
// e^r by a degree-6 polynomial (the Cephes coefficients), 2^n through the exponent
// bits (AVX-512: its rounding and scaling instructions, 6-9% faster forward loops).
// A NaN stays NaN, as in XLA's loops, so a diverged run shows: the clamps keep x
// where a comparison with NaN is false (and min/max return their second operand
// when one is NaN, so x goes second).
#if defined(__AVX512F__)
inline vf exp_v(vf xv) {
  __m512 x = _mm512_min_ps(_mm512_set1_ps(88.0f),
                           _mm512_max_ps(_mm512_set1_ps(-87.0f), (__m512)xv));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return (vf)_mm512_scalef_ps(p, n);
}
#else
inline vf exp_v(vf x) {
  x = x < -87.0f ? splat(-87.0f) : x;
  x = x > 88.0f ? splat(88.0f) : x;
  vf fx = x * 1.44269504088896341f + 0.5f;
  vi n = __builtin_convertvector(fx, vi);  // truncates toward zero
  vf nf = __builtin_convertvector(n, vf);
  vi adjust = nf > fx;  // -1 where truncation rounded up: floor
  n += adjust;
  nf = __builtin_convertvector(n, vf);
  vf r = x - nf * 0.693359375f;
  r = r - nf * -2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + (r + 1.0f);
  vi bits = (n + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
#endif

inline vf sigmoid_v(vf x) { return 1.0f / (1.0f + exp_v(-x)); }

// tanh(x) = (1 - e) / (1 + e), e = e^{-2|x|}, for |x| >= 0.625; below, where 1 - e
// would cancel (relative error ~1e-4 at |x| = 1e-4), x + x z P(z), z = x^2, with
// the Cephes coefficients of tanhf (a relative error of a few ulp)
inline vf tanh_v(vf x) {
  const vf ax = x < 0.0f ? -x : x;
  const vf e = exp_v(ax * -2.0f);
  vf t = (1.0f - e) / (1.0f + e);
  t = x < 0.0f ? -t : t;
  const vf z = x * x;
  vf p = z * -5.70498872745e-3f + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const vf small = x + x * z * p;
  return ax < 0.625f ? small : t;
}

#if defined(__AVX512F__)
// out[j ldout + i] = in[i ldin + j] for i, j < 16: three rounds of shuffles (pairs of
// rows, then fours, then 128-bit lanes across the four groups)
inline void transpose16(const float* in, size_t ldin, float* out, size_t ldout) {
  __m512 r[16], t[16], u[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(in + i * ldin);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  const auto lo = [](__m512 a, __m512 b) {
    return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
  };
  const auto hi = [](__m512 a, __m512 b) {
    return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
  };
  for (int i = 0; i < 16; i += 4) {
    u[i] = lo(t[i], t[i + 2]);
    u[i + 1] = hi(t[i], t[i + 2]);
    u[i + 2] = lo(t[i + 1], t[i + 3]);
    u[i + 3] = hi(t[i + 1], t[i + 3]);
  }
  // u[4g + j], 128-bit lane L: column 4L + j of rows 4g .. 4g+3
  for (int j = 0; j < 4; ++j) {
    const __m512 v = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x88);  // lanes 0, 2 of both
    const __m512 w = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xdd);  // lanes 1, 3
    const __m512 v2 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x88);
    const __m512 w2 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xdd);
    _mm512_storeu_ps(out + j * ldout, _mm512_shuffle_f32x4(v, v2, 0x88));
    _mm512_storeu_ps(out + (4 + j) * ldout, _mm512_shuffle_f32x4(w, w2, 0x88));
    _mm512_storeu_ps(out + (8 + j) * ldout, _mm512_shuffle_f32x4(v, v2, 0xdd));
    _mm512_storeu_ps(out + (12 + j) * ldout, _mm512_shuffle_f32x4(w, w2, 0xdd));
  }
}
#elif defined(__AVX__)
// out[j ldout + i] = in[i ldin + j] for i, j < 8 (the same rounds, 8 floats)
inline void transpose8(const float* in, size_t ldin, float* out, size_t ldout) {
  __m256 r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(in + i * ldin);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int j = 0; j < 4; ++j) {  // u[j], u[4 + j]: column j (low halves), 4 + j (high)
    _mm256_storeu_ps(out + j * ldout, _mm256_permute2f128_ps(u[j], u[4 + j], 0x20));
    _mm256_storeu_ps(out + (4 + j) * ldout, _mm256_permute2f128_ps(u[j], u[4 + j], 0x31));
  }
}
#endif

// out[k ld + r] = h[r H + k] for r < B, k < H (H a multiple of 16): h_{t-1} into
// h_prev_t's layout (in register blocks on AVX-512 and AVX, the other rows one by one)
inline void transpose_rows(const float* h, int B, int H, float* out, size_t ld) {
  int r0 = 0;
#if defined(__AVX512F__)
  for (; r0 + 16 <= B; r0 += 16)
    for (int k = 0; k < H; k += 16)
      transpose16(h + static_cast<size_t>(r0) * H + k, H, out + k * ld + r0, ld);
#elif defined(__AVX__)
  for (; r0 + 8 <= B; r0 += 8)
    for (int k = 0; k < H; k += 8)
      transpose8(h + static_cast<size_t>(r0) * H + k, H, out + k * ld + r0, ld);
#endif
  for (int k = 0; k < H; ++k)
    for (int r = r0; r < B; ++r) out[k * ld + r] = h[static_cast<size_t>(r) * H + k];
}

struct Scratch {
  float* p;
  explicit Scratch(size_t n)
      : p(static_cast<float*>(std::aligned_alloc(64, ((n * sizeof(float) + 63) / 64) * 64))) {}
  ~Scratch() { std::free(p); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

struct Step {  // one forward step's operands; rows of H or G floats
  int H;
  const float* hprev;
  float* hnext;
  float* c;  // the cell state, updated in place
  const float* xp;
  const float* b;  // the bias <[G]>, added to xp
  const bool* valid;
  float* ys;
  float* acts;
  float* cprev;
  float* tanh_c;
  bool save;
};

constexpr int kPasses = 4 / kPassGates;

// Rows [r0, r0 + MB), units [L u, L u + L) of one forward step (L = kLanes), gates
// [P kPassGates, (P + 1) kPassGates) of the recurrent matmul. wp: W_h's copy,
// <[H/L, kPasses, H, kPassGates, L]> (unit group, pass, input unit, gate, unit in
// group). A pass before the last leaves its pre-activations in pre <[B, 4, L]>; the
// last one reads them back and applies the step's nonlinearities and cell update.
template <int MB, int P>
inline void forward_tile(const Step& s, int u, int r0, const float* wp, float* pre) {
  const int H = s.H, G = 4 * H, col = u * kLanes;
  vf acc[MB][kPassGates], bias[kPassGates];
  for (int j = 0; j < kPassGates; ++j) bias[j] = load(s.b + (P * kPassGates + j) * H + col);
  for (int r = 0; r < MB; ++r)
    for (int j = 0; j < kPassGates; ++j)
      acc[r][j] = load(s.xp + (r0 + r) * G + (P * kPassGates + j) * H + col) + bias[j];
  const float* panel = wp + (static_cast<size_t>(u) * kPasses + P) * H * kPassGates * kLanes;
  for (int k = 0; k < H; ++k) {
    vf w[kPassGates];
    for (int j = 0; j < kPassGates; ++j) w[j] = load(panel + (k * kPassGates + j) * kLanes);
    for (int r = 0; r < MB; ++r) {
      const vf a = splat(s.hprev[(r0 + r) * H + k]);
      for (int j = 0; j < kPassGates; ++j) acc[r][j] += a * w[j];
    }
  }
  if constexpr (P + 1 < kPasses) {
    for (int r = 0; r < MB; ++r)
      for (int j = 0; j < kPassGates; ++j)
        store(pre + ((r0 + r) * 4 + P * kPassGates + j) * kLanes, acc[r][j]);
    return;
  } else {
    for (int r = 0; r < MB; ++r) {
      const int hi = (r0 + r) * H + col, gi = (r0 + r) * G + col;
      const vf c_prev = load(s.c + hi);
      if (s.save) store(s.cprev + hi, c_prev);
      if (!s.valid[r0 + r]) {  // the carry stays, the outputs are zero
        store(s.hnext + hi, load(s.hprev + hi));
        store(s.ys + hi, vf{});
        if (s.save) {
          store(s.tanh_c + hi, vf{});
          for (int g = 0; g < 4; ++g) store(s.acts + gi + g * H, vf{});
        }
        continue;
      }
      vf a[4];
      for (int g = 0; g < P * kPassGates; ++g) a[g] = load(pre + ((r0 + r) * 4 + g) * kLanes);
      for (int j = 0; j < kPassGates; ++j) a[P * kPassGates + j] = acc[r][j];
      const vf i = sigmoid_v(a[0]), f = sigmoid_v(a[1]), o = sigmoid_v(a[2]);
      const vf g = tanh_v(a[3]);
      const vf c = f * c_prev + i * g;
      const vf tc = tanh_v(c);
      const vf h = o * tc;
      store(s.c + hi, c);
      store(s.hnext + hi, h);
      store(s.ys + hi, h);
      if (!s.save) continue;
      store(s.tanh_c + hi, tc);
      store(s.acts + gi, i);
      store(s.acts + gi + H, f);
      store(s.acts + gi + 2 * H, o);
      store(s.acts + gi + 3 * H, g);
    }
  }
}

template <int MB, int P>
void forward_rows(const Step& s, int u, int rows, const float* wp, float* pre) {
  int r = 0;
  for (; r + MB <= rows; r += MB) forward_tile<MB, P>(s, u, r, wp, pre);
  switch (rows - r) {  // the last rows, fewer than MB
    case 1: forward_tile<1, P>(s, u, r, wp, pre); break;
    case 2: forward_tile<2, P>(s, u, r, wp, pre); break;
    case 3: forward_tile<3, P>(s, u, r, wp, pre); break;
    case 4: forward_tile<4, P>(s, u, r, wp, pre); break;
    case 5: forward_tile<5, P>(s, u, r, wp, pre); break;
    default: break;
  }
}

// One forward step's unit group u: every pass over all rows (a pass's weights stay
// in cache across the rows).
template <int... P>
inline void forward_group(const Step& s, int u, int rows, const float* wp, float* pre,
                          std::integer_sequence<int, P...>) {
  (forward_rows<kRows, P>(s, u, rows, wp, pre), ...);
}

// out[r, L NZ q + j] = sum_k da[r, k] W_h[L NZ q + j, k] for rows [r0, r0 + MB)
// (L = kLanes). wtp: W_hᵀ's copy, <[H / (L NZ), G, L NZ]>.
template <int MB, int NZ>
inline void backward_tile(int H, int q, int r0, const float* da, const float* wtp, float* out) {
  const int G = 4 * H, width = NZ * kLanes;
  vf acc[MB][NZ];
  for (int r = 0; r < MB; ++r)
    for (int z = 0; z < NZ; ++z) acc[r][z] = vf{};
  const float* panel = wtp + static_cast<size_t>(q) * G * width;
  for (int k = 0; k < G; ++k) {
    vf w[NZ];
    for (int z = 0; z < NZ; ++z) w[z] = load(panel + k * width + z * kLanes);
    for (int r = 0; r < MB; ++r) {
      const vf a = splat(da[(r0 + r) * G + k]);
      for (int z = 0; z < NZ; ++z) acc[r][z] += a * w[z];
    }
  }
  for (int r = 0; r < MB; ++r)
    for (int z = 0; z < NZ; ++z) store(out + (r0 + r) * H + q * width + z * kLanes, acc[r][z]);
}

template <int MB, int NZ>
void backward_rows(int H, int q, int rows, const float* da, const float* wtp, float* out) {
  int r = 0;
  for (; r + MB <= rows; r += MB) backward_tile<MB, NZ>(H, q, r, da, wtp, out);
  switch (rows - r) {
    case 1: backward_tile<1, NZ>(H, q, r, da, wtp, out); break;
    case 2: backward_tile<2, NZ>(H, q, r, da, wtp, out); break;
    case 3: backward_tile<3, NZ>(H, q, r, da, wtp, out); break;
    case 4: backward_tile<4, NZ>(H, q, r, da, wtp, out); break;
    case 5: backward_tile<5, NZ>(H, q, r, da, wtp, out); break;
    default: break;
  }
}

ffi::Error check_shapes(int64_t T, int64_t B, int64_t G, int64_t wrows, int64_t wcols) {
  if (G % 64 != 0)  // the same on every instruction set (a multiple of every kLanes)
    return ffi::Error::InvalidArgument("lstm_loops: 4H must be a multiple of 64 (H of 16)");
  if (wrows != G / 4 || wcols != G)
    return ffi::Error::InvalidArgument("lstm_loops: W_h must be [H, 4H]");
  if (T <= 0 || B <= 0) return ffi::Error::InvalidArgument("lstm_loops: empty sequence or batch");
  return ffi::Error::Success();
}

}  // namespace

static ffi::Error LstmForwardImpl(ffi::Buffer<ffi::F32> xp, ffi::Buffer<ffi::F32> w,
                                  ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> h0,
                                  ffi::Buffer<ffi::F32> c0, ffi::Buffer<ffi::PRED> valid,
                                  ffi::ResultBuffer<ffi::F32> ys,
                                  ffi::ResultBuffer<ffi::F32> hT, ffi::ResultBuffer<ffi::F32> cT,
                                  ffi::ResultBuffer<ffi::F32> acts,
                                  ffi::ResultBuffer<ffi::F32> cprev,
                                  ffi::ResultBuffer<ffi::F32> tanh_c,
                                  ffi::ResultBuffer<ffi::F32> hprev_t, bool save,
                                  bool reverse) {
  const auto d = xp.dimensions();
  const auto wd = w.dimensions();
  if (d.size() != 3 || wd.size() != 2) return ffi::Error::InvalidArgument("lstm_loops: ranks");
  if (auto e = check_shapes(d[0], d[1], d[2], wd[0], wd[1]); e.failure()) return e;
  const int T = d[0], B = d[1], G = d[2], H = G / 4;
  const size_t bh = static_cast<size_t>(B) * H, bg = static_cast<size_t>(B) * G;
  if (b.element_count() != static_cast<size_t>(G))
    return ffi::Error::InvalidArgument("lstm_loops: the bias must have 4H floats");
  if (save && (acts->element_count() != T * bg || cprev->element_count() != T * bh ||
               tanh_c->element_count() != T * bh || hprev_t->element_count() != T * bh))
    return ffi::Error::InvalidArgument("lstm_loops: save needs the saves' buffers");
  const float* W = w.typed_data();
  Scratch wp(static_cast<size_t>(H) * G), h_a(bh), h_b(bh);
  // the pre-activations that a pass leaves for the next (one-pass builds: none)
  Scratch pre(kPasses > 1 ? static_cast<size_t>(B) * 4 * kLanes : 1);
  for (int u = 0; u < H / kLanes; ++u)
    for (int q = 0; q < kPasses; ++q)
      for (int k = 0; k < H; ++k)
        for (int j = 0; j < kPassGates; ++j)
          std::memcpy(
              wp.p + (((static_cast<size_t>(u) * kPasses + q) * H + k) * kPassGates + j) * kLanes,
              W + static_cast<size_t>(k) * G + (q * kPassGates + j) * H + u * kLanes,
              kLanes * sizeof(float));
  std::memcpy(h_a.p, h0.typed_data(), bh * sizeof(float));
  float* c = cT->typed_data();  // the running cell state, final after the loop
  std::memcpy(c, c0.typed_data(), bh * sizeof(float));
  float *hprev = h_a.p, *hnext = h_b.p;
  // h_prev_t's rows are T B floats apart (often a power of two: every row of a step's
  // column block in the same cache set), so S steps are gathered in hbuf first and
  // written as S B floats per row (at least 256 where B allows); hbuf's rows are
  // padded by a vector for the same reason
  const int S = std::max(1, std::min(16, 256 / B));
  const size_t ld = static_cast<size_t>(S) * B + kLanes;
  Scratch hbuf(save ? H * ld : 1);
  for (int n = 0; n < T; ++n) {
    const int t = reverse ? T - 1 - n : n;
    const Step s{H,
                 hprev,
                 hnext,
                 c,
                 xp.typed_data() + t * bg,
                 b.typed_data(),
                 valid.typed_data() + static_cast<size_t>(t) * B,
                 ys->typed_data() + t * bh,
                 save ? acts->typed_data() + t * bg : nullptr,
                 save ? cprev->typed_data() + t * bh : nullptr,
                 save ? tanh_c->typed_data() + t * bh : nullptr,
                 save};
    if (save) {  // h_{t-1} of every row into column block t of h_prev_t, via hbuf
      const int slot = t % S;
      transpose_rows(hprev, B, H, hbuf.p + static_cast<size_t>(slot) * B, ld);
      if (reverse ? slot == 0 : (slot == S - 1 || t == T - 1)) {  // the block is complete
        const int first = t - slot, count = std::min(S, T - first);
        for (int k = 0; k < H; ++k)
          std::memcpy(hprev_t->typed_data() + k * (static_cast<size_t>(T) * B) +
                          static_cast<size_t>(first) * B,
                      hbuf.p + k * ld, static_cast<size_t>(count) * B * sizeof(float));
      }
    }
    for (int u = 0; u < H / kLanes; ++u)
      forward_group(s, u, B, wp.p, pre.p, std::make_integer_sequence<int, kPasses>{});
    std::swap(hprev, hnext);
  }
  std::memcpy(hT->typed_data(), hprev, bh * sizeof(float));
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnJaxLstmForward, LstmForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // xp
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w
                                  .Arg<ffi::Buffer<ffi::F32>>()   // b
                                  .Arg<ffi::Buffer<ffi::F32>>()   // h0
                                  .Arg<ffi::Buffer<ffi::F32>>()   // c0
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // valid
                                  .Ret<ffi::Buffer<ffi::F32>>()   // ys
                                  .Ret<ffi::Buffer<ffi::F32>>()   // h_T
                                  .Ret<ffi::Buffer<ffi::F32>>()   // c_T
                                  .Ret<ffi::Buffer<ffi::F32>>()   // acts
                                  .Ret<ffi::Buffer<ffi::F32>>()   // c_prev
                                  .Ret<ffi::Buffer<ffi::F32>>()   // tanh_c
                                  .Ret<ffi::Buffer<ffi::F32>>()   // h_prev_t
                                  .Attr<bool>("save")
                                  .Attr<bool>("reverse"));

template <int NZ>
static void backward_loop(int T, int B, int H, const float* W, const float* acts,
                          const float* cprev, const float* tanh_c, const float* dys,
                          const bool* valid, bool reverse, float* da, float* dh, float* dc,
                          float* db) {
  const int G = 4 * H, width = NZ * kLanes;
  const size_t bh = static_cast<size_t>(B) * H, bg = static_cast<size_t>(B) * G;
  Scratch wtp(static_cast<size_t>(H) * G), dh_new(bh), db_t(G), db_c(G);
  std::memset(db, 0, G * sizeof(float));
  std::memset(db_c.p, 0, G * sizeof(float));
  for (int q = 0; q < H / width; ++q)
    for (int k = 0; k < G; ++k)
      for (int j = 0; j < width; ++j)
        wtp.p[(static_cast<size_t>(q) * G + k) * width + j] =
            W[static_cast<size_t>(q * width + j) * G + k];
  for (int n = T - 1; n >= 0; --n) {  // the forward loop's steps, last first
    const int t = reverse ? T - 1 - n : n;
    const float* a_t = acts + t * bg;
    const size_t th = t * bh;
    const bool* v_t = valid + static_cast<size_t>(t) * B;
    float* da_t = da + t * bg;
    std::memset(db_t.p, 0, G * sizeof(float));  // the step's sum over rows, then db's
    for (int r = 0; r < B; ++r) {
      if (!v_t[r]) {  // carry gradients pass through
        std::memset(da_t + static_cast<size_t>(r) * G, 0, G * sizeof(float));
        continue;
      }
      for (int u = 0; u < H; u += kLanes) {
        const size_t hi = static_cast<size_t>(r) * H + u, gi = static_cast<size_t>(r) * G + u;
        const vf i = load(a_t + gi), f = load(a_t + gi + H);
        const vf o = load(a_t + gi + 2 * H), g = load(a_t + gi + 3 * H);
        const vf tc = load(tanh_c + th + hi);
        const vf dhv = load(dh + hi) + load(dys + th + hi);
        const vf dcv = load(dc + hi) + dhv * o * (1.0f - tc * tc);
        const vf di = dcv * g * (i * (1.0f - i));
        const vf df = dcv * load(cprev + th + hi) * (f * (1.0f - f));
        const vf dov = dhv * tc * (o * (1.0f - o));
        const vf dg = dcv * i * (1.0f - g * g);
        store(da_t + gi, di);
        store(da_t + gi + H, df);
        store(da_t + gi + 2 * H, dov);
        store(da_t + gi + 3 * H, dg);
        store(dc + hi, dcv * f);
        store(db_t.p + u, load(db_t.p + u) + di);
        store(db_t.p + H + u, load(db_t.p + H + u) + df);
        store(db_t.p + 2 * H + u, load(db_t.p + 2 * H + u) + dov);
        store(db_t.p + 3 * H + u, load(db_t.p + 3 * H + u) + dg);
      }
    }
    for (int k = 0; k < G; k += kLanes) {  // db += the step's sum, compensated (Kahan)
      const vf y = load(db_t.p + k) - load(db_c.p + k), sum = load(db + k), next = sum + y;
      store(db_c.p + k, (next - sum) - y);
      store(db + k, next);
    }
    for (int q = 0; q < H / width; ++q)
      backward_rows<kBackRows, NZ>(H, q, B, da_t, wtp.p, dh_new.p);
    for (int r = 0; r < B; ++r)
      if (v_t[r])
        std::memcpy(dh + static_cast<size_t>(r) * H, dh_new.p + static_cast<size_t>(r) * H,
                    H * sizeof(float));
  }
}

static ffi::Error LstmBackwardImpl(ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> acts,
                                   ffi::Buffer<ffi::F32> cprev, ffi::Buffer<ffi::F32> tanh_c,
                                   ffi::Buffer<ffi::F32> dys, ffi::Buffer<ffi::F32> dhT,
                                   ffi::Buffer<ffi::F32> dcT, ffi::Buffer<ffi::PRED> valid,
                                   ffi::ResultBuffer<ffi::F32> da, ffi::ResultBuffer<ffi::F32> dh0,
                                   ffi::ResultBuffer<ffi::F32> dc0,
                                   ffi::ResultBuffer<ffi::F32> db, bool reverse) {
  const auto d = acts.dimensions();
  const auto wd = w.dimensions();
  if (d.size() != 3 || wd.size() != 2) return ffi::Error::InvalidArgument("lstm_loops: ranks");
  if (auto e = check_shapes(d[0], d[1], d[2], wd[0], wd[1]); e.failure()) return e;
  const int T = d[0], B = d[1], H = d[2] / 4;
  const size_t bh = static_cast<size_t>(B) * H;
  if (db->element_count() != static_cast<size_t>(d[2]))
    return ffi::Error::InvalidArgument("lstm_loops: the bias gradient must have 4H floats");
  float* dh = dh0->typed_data();  // the running carry gradients, final after the loop
  float* dc = dc0->typed_data();
  std::memcpy(dh, dhT.typed_data(), bh * sizeof(float));
  std::memcpy(dc, dcT.typed_data(), bh * sizeof(float));
  auto run = [&](auto loop) {
    loop(T, B, H, w.typed_data(), acts.typed_data(), cprev.typed_data(), tanh_c.typed_data(),
         dys.typed_data(), valid.typed_data(), reverse, da->typed_data(), dh, dc,
         db->typed_data());
  };
  if (kBackNZ >= 4 && H % (4 * kLanes) == 0)
    run(backward_loop<4>);
  else if (H % (2 * kLanes) == 0)
    run(backward_loop<2>);
  else
    run(backward_loop<1>);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnJaxLstmBackward, LstmBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w
                                  .Arg<ffi::Buffer<ffi::F32>>()   // acts
                                  .Arg<ffi::Buffer<ffi::F32>>()   // c_prev
                                  .Arg<ffi::Buffer<ffi::F32>>()   // tanh_c
                                  .Arg<ffi::Buffer<ffi::F32>>()   // dys
                                  .Arg<ffi::Buffer<ffi::F32>>()   // dh_T
                                  .Arg<ffi::Buffer<ffi::F32>>()   // dc_T
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // valid
                                  .Ret<ffi::Buffer<ffi::F32>>()   // da
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dh0
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dc0
                                  .Ret<ffi::Buffer<ffi::F32>>()   // db
                                  .Attr<bool>("reverse"));

// The vector width this build uses (rnn_jax.native.vector_lanes).
extern "C" __attribute__((visibility("default"))) int RnnJaxLstmLanes() { return kLanes; }
