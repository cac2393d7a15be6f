// The tail-biting Viterbi search of the bitshift trellis (vqcompress/trellis.py).
//
// A state is `bits` wide; each weight shifts `shift` new bits in at the bottom, so a state's
// predecessors are the 2^shift states whose low bits are its top bits. For each row of x
// (rows × length, weights w or none), the state sequence of least weighted squared error
// against values[state], with the first state's top bits equal to the last state's low bits:
// the row is then stored in exactly shift bits per weight. Those overlap bits come from a free
// pass over the seam (the row's end, then its start: QTIP's rolled pass), whose state where the
// row starts is taken. Rows are split across OpenMP threads, each searched alone: repeatable.
// With AVX2 and 2 to 4 new bits a weight, one step runs 8 states at a time (the same sums, the
// same codes as the plain loop).
// Compiled on first use by vqcompress/compiled.py.

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>
#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

constexpr int64_t SEAM = 64;  // weights either side of the seam that the first pass searches
constexpr float NONE = std::numeric_limits<float>::infinity();

struct Search {
  int bits, shift;
  const float* values;
  std::vector<float> cost, best;
  std::vector<uint8_t> back;  // per weight, per low part: which predecessor was best

  Search(int bits, int shift, const float* values, int64_t length)
      : bits(bits), shift(shift), values(values), cost(int64_t(1) << bits),
        best(int64_t(1) << (bits - shift)), back(length << (bits - shift)) {}

  // One weight further: each state's least cost so far, from the best of its predecessors (`from`).
  void step(float xt, float wt, uint8_t* from) {
    const int64_t count = int64_t(1) << bits, low = count >> shift, symbols = int64_t(1) << shift;
#ifdef __AVX2__
    if (shift >= 2 && shift <= 4 && low % 8 == 0) return step_avx2(xt, wt, from);
#endif
    for (int64_t l = 0; l < low; ++l) { best[l] = cost[l]; from[l] = 0; }
    for (int64_t q = 1; q < symbols; ++q) {
      const float* c = cost.data() + q * low;
      for (int64_t l = 0; l < low; ++l) {
        const bool less = c[l] < best[l];
        best[l] = less ? c[l] : best[l];
        from[l] = less ? uint8_t(q) : from[l];
      }
    }
    for (int64_t s = 0; s < count; ++s) {
      const float e = xt - values[s];
      cost[s] = best[s >> shift] + wt * e * e;
    }
  }

#ifdef __AVX2__
  // `step` 8 lanes at a time: the minimum of the 2^shift predecessors and its index, then each
  // best spread over its 2^shift successors (by lane permutes for 4, broadcast for 8 or 16).
  void step_avx2(float xt, float wt, uint8_t* from) {
    const int64_t symbols = int64_t(1) << shift, low = (int64_t(1) << bits) >> shift;
    float* c = cost.data();
    for (int64_t l = 0; l < low; l += 8) {
      __m256 b = _mm256_loadu_ps(c + l), f = _mm256_setzero_ps();
      for (int64_t q = 1; q < symbols; ++q) {
        const __m256 v = _mm256_loadu_ps(c + q * low + l), less = _mm256_cmp_ps(v, b, _CMP_LT_OQ);
        b = _mm256_blendv_ps(b, v, less);
        f = _mm256_blendv_ps(f, _mm256_set1_ps(float(q)), less);
      }
      _mm256_storeu_ps(best.data() + l, b);
      const __m256i i32 = _mm256_cvtps_epi32(f);
      const __m128i i16 = _mm_packus_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(from + l), _mm_packus_epi16(i16, i16));
    }
    const __m256 X = _mm256_set1_ps(xt), W = _mm256_set1_ps(wt);
    if (shift == 2) {
      const __m256i spread[4] = {_mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1), _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3),
                                 _mm256_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5), _mm256_setr_epi32(6, 6, 6, 6, 7, 7, 7, 7)};
      for (int64_t l = 0; l < low; l += 8) {
        const __m256 b = _mm256_loadu_ps(best.data() + l);
        for (int j = 0; j < 4; ++j) {
          const __m256 e = _mm256_sub_ps(X, _mm256_loadu_ps(values + 4 * l + 8 * j));
          _mm256_storeu_ps(c + 4 * l + 8 * j, _mm256_fmadd_ps(_mm256_mul_ps(W, e), e, _mm256_permutevar8x32_ps(b, spread[j])));
        }
      }
      return;
    }
    for (int64_t l = 0; l < low; ++l) {
      const __m256 b = _mm256_set1_ps(best[l]);
      for (int64_t j = 0; j < symbols; j += 8) {
        const __m256 e = _mm256_sub_ps(X, _mm256_loadu_ps(values + symbols * l + j));
        _mm256_storeu_ps(c + symbols * l + j, _mm256_fmadd_ps(_mm256_mul_ps(W, e), e, b));
      }
    }
  }
#endif

  // The least-error states of x[0..n) (weights w, or 1) into `states`; with overlap ≥ 0 the
  // first state's top bits and the last state's low bits are held to it.
  void run(const float* x, const float* w, int64_t n, int64_t overlap, uint16_t* states) {
    const int64_t count = int64_t(1) << bits, low = count >> shift, symbols = int64_t(1) << shift;
    const float w0 = w ? w[0] : 1.0f;
    for (int64_t s = 0; s < count; ++s) {
      const float e = x[0] - values[s];
      cost[s] = (overlap < 0 || (s >> shift) == overlap) ? w0 * e * e : NONE;
    }
    for (int64_t t = 1; t < n; ++t) step(x[t], w ? w[t] : 1.0f, back.data() + t * low);
    int64_t state = overlap < 0 ? 0 : overlap;  // a valid end state even if every cost is infinite
    float least = NONE;
    for (int64_t s = 0; s < count; ++s)
      if ((overlap < 0 || (s & (low - 1)) == overlap) && cost[s] < least) { least = cost[s]; state = s; }
    states[n - 1] = uint16_t(state);
    for (int64_t t = n - 1; t > 0; --t) {
      const int64_t kept = state >> shift;
      state = (int64_t(back[t * low + kept]) << (bits - shift)) | kept;
      states[t - 1] = uint16_t(state);
    }
  }
};

}  // namespace

extern "C" {

// states (rows × length, uint16): each row's tail-biting state sequence; length · shift ≥ bits.
void vqc_trellis_encode(const float* x, const float* w, int64_t rows, int64_t length, const float* values,
                        int bits, int shift, uint16_t* states, int threads) {
  const int64_t before = std::min(length - length / 2, SEAM), after = std::min(length / 2, SEAM);
  #pragma omp parallel num_threads(threads)
  {
    Search search(bits, shift, values, length);
    std::vector<float> seam(before + after), seam_w(w ? before + after : 0);
    std::vector<uint16_t> seam_states(before + after);
    #pragma omp for schedule(dynamic, 1)
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = x + r * length;
      const float* wr = w ? w + r * length : nullptr;
      for (int64_t i = 0; i < before; ++i) seam[i] = xr[length - before + i];
      for (int64_t i = 0; i < after; ++i) seam[before + i] = xr[i];
      if (w) {
        for (int64_t i = 0; i < before; ++i) seam_w[i] = wr[length - before + i];
        for (int64_t i = 0; i < after; ++i) seam_w[before + i] = wr[i];
      }
      search.run(seam.data(), w ? seam_w.data() : nullptr, before + after, -1, seam_states.data());
      search.run(xr, wr, length, seam_states[before] >> shift, states + r * length);
    }
  }
}

}  // extern "C"
