// The lookup-table product and the decode of a coded weight, reading the packed codes directly.
//
// Built on first use by vqcompress/kernels/__init__.py (g++ -O3 -march=native -fopenmp) and
// called through ctypes with raw pointers: no torch headers, so it compiles in about a second.
// The weight is described by `Coded` (mirrored there as a ctypes.Structure); see coded.py for the
// meaning of every field. All loops over rows are split across OpenMP threads in fixed chunks,
// so every output is summed in the same order whatever the thread count: results are repeatable.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define VQC_SIMD 1
#endif

namespace {

constexpr int64_t PARALLEL_WORK = 1 << 18;  // codes read per call below which one thread does it all
constexpr int32_t LANES = 8;  // independent partial sums per row: loads in flight instead of one chain of adds

struct Coded {
  int64_t rows, cols, k, dim, groups, scale_group;  // scale_group 0: no scales
  int64_t bits, code_bytes, perm_bits, perm_bytes;  // perm_bits 0: not permuted
  const uint8_t* codes;      // LSB-first stream, rows × segments codes in row-major order
  const uint16_t* codebook;  // fp16 (groups, k, dim)
  const uint16_t* scale;     // fp16 (rows, cols / scale_group) or null
  const uint16_t* offset;    // fp16 (rows, cols / scale_group) or null
  const uint8_t* perm;       // LSB-first stream: stored row r is original row perm[r]; or null
  float gain;                // 1 when the layout has none
  const int32_t* lattice;    // E8P codes decoded by structure (see dot_e8p), or null: by the table
};

inline float half(uint16_t h) {
  _Float16 f;
  std::memcpy(&f, &h, sizeof f);
  return static_cast<float>(f);
}

// The entry at position `index` of a packed stream of `bytes` bytes, `bits` wide: the `Reach`
// bytes that can hold it (3 for codes, up to 16 bits; 5 for a permutation's row numbers, up to 32).
template <int Reach = 3>
inline uint64_t read_bits(const uint8_t* stream, int64_t bytes, int64_t index, int64_t bits) {
  const int64_t position = index * bits, byte = position >> 3;
  uint64_t word = stream[byte];
  for (int i = 1; i < Reach; ++i)
    if (byte + i < bytes) word |= uint64_t(stream[byte + i]) << (8 * i);
  return (word >> (position & 7)) & ((uint64_t(1) << bits) - 1);
}

// Codes [first, first + n) of the stream into `out` (the lookup-table product reads 8- and
// 16-bit codes in place instead).
inline void read_codes(const Coded& w, int64_t first, int64_t n, uint16_t* out) {
  if (w.bits == 8) {
    for (int64_t i = 0; i < n; ++i) out[i] = w.codes[first + i];
  } else if (w.bits == 16) {
    std::memcpy(out, w.codes + 2 * first, 2 * n);  // little-endian, LSB-first: the same bytes
  } else if (w.bits == 4) {
    for (int64_t i = first; i < first + n; ++i) out[i - first] = (w.codes[i >> 1] >> ((i & 1) * 4)) & 15;
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = read_bits(w.codes, w.code_bytes, first + i, w.bits);
  }
}

// The codebooks in fp32: (groups, k, dim) as stored, or (groups, dim, k) `transposed` so that the
// table is built from contiguous runs of codewords.
std::vector<float> float_codebook(const Coded& w, bool transposed) {
  std::vector<float> out(w.groups * w.k * w.dim);
  for (int64_t g = 0; g < w.groups; ++g)
    for (int64_t c = 0; c < w.k; ++c)
      for (int64_t e = 0; e < w.dim; ++e)
        out[transposed ? (g * w.dim + e) * w.k + c : (g * w.k + c) * w.dim + e] = half(w.codebook[(g * w.k + c) * w.dim + e]);
  return out;
}

inline int64_t original_row(const Coded& w, int64_t r) {
  return w.perm ? int64_t(read_bits<5>(w.perm, w.perm_bytes, r, w.perm_bits)) : r;
}

// acc += scale × (sum over segments s < n of table[s * k + code[s]]), in LANES independent sums.
// The table stays in L2 (1 MiB for 4,096 inputs at d = 4, k = 256) and the codes are read in
// order; blocking the segments so the table slice fits L1 measured faster only when the codes
// lay in 4 KiB pages (on huge pages, as numpy allocates, 2-3 times slower), so rows go whole.
template <typename Code>
inline void gather_add(const float* table, int32_t k, const Code* code, int64_t n, float scale, float* acc) {
  float sum[LANES] = {};
  int64_t s = 0;
  for (; s + LANES <= n; s += LANES, table += LANES * k)
    for (int32_t j = 0; j < LANES; ++j) sum[j] += table[j * k + code[s + j]];
  for (; s < n; ++s, table += k) sum[0] += table[code[s]];
  for (int32_t j = 0; j < LANES; ++j) acc[j] += sum[j] * scale;
}

#ifdef VQC_SIMD
inline float horizontal_sum(__m256 all) {
  const __m128 four = _mm_add_ps(_mm256_castps256_ps128(all), _mm256_extractf128_ps(all, 1));
  const __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
  return _mm_cvtss_f32(_mm_add_ss(two, _mm_shuffle_ps(two, two, 1)));
}

// The sum over segments s < n of word(s) · x segment s, 8 lanes a segment, in four independent
// sums so that the codeword loads of neighbouring segments overlap.
template <typename Word>
inline float four_sums(int64_t n, const float* x, Word word) {
  __m256 sum[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t s = 0;
  for (; s + 4 <= n; s += 4)
    for (int j = 0; j < 4; ++j) sum[j] = _mm256_fmadd_ps(word(s + j), _mm256_loadu_ps(x + 8 * (s + j)), sum[j]);
  for (; s < n; ++s) sum[0] = _mm256_fmadd_ps(word(s), _mm256_loadu_ps(x + 8 * s), sum[0]);
  return horizontal_sum(_mm256_add_ps(_mm256_add_ps(sum[0], sum[1]), _mm256_add_ps(sum[2], sum[3])));
}
#endif

// <codeword code[s], x segment s> summed over segments s < n, d = `dim`: the gather product's inner
// loop. At d = 8 with AVX2 one codeword is one fp16 load and one fused multiply-add.
template <typename Code>
inline float dot_codewords(const uint16_t* book, int64_t dim, const Code* code, int64_t n, const float* x) {
#ifdef VQC_SIMD
  if (dim == 8)
    return four_sums(n, x, [&](int64_t at) {
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(book + 8 * int64_t(code[at]))));
    });
#endif
  float sum[LANES] = {};
  for (int64_t s = 0; s < n; ++s)
    for (int64_t e = 0; e < dim; ++e) sum[e % LANES] += half(book[int64_t(code[s]) * dim + e]) * x[s * dim + e];
  return std::accumulate(sum, sum + LANES, 0.0f);
}

// The same sum for the E8P codebook (lattice.py), decoded from its structure instead of read from
// its 1 MiB table, whose reads miss the caches: `lattice` holds X (256 × 8) by a code's low byte,
// H (256 × 8) by its high byte and the 6 magnitudes of an entry (fp32 bits); lane e of X ^ H has
// the entry's sign in bits 31 and 3 and its magnitude's index in bits 0–2 (lattice.py builds them;
// tests check them against the table). With AVX-512 one two-table permute gives the signed entry.
template <typename Code>
inline float dot_e8p(const int32_t* lattice, const Code* code, int64_t n, const float* x) {
#ifdef VQC_SIMD
  const __m256 magnitudes = _mm256_loadu_ps(reinterpret_cast<const float*>(lattice + 2 * 256 * 8));
#ifdef __AVX512VL__
  const __m256 negatives = _mm256_sub_ps(_mm256_setzero_ps(), magnitudes);  // entries 8–15 of the table
#else
  const __m256i sign = _mm256_set1_epi32(INT32_MIN);
#endif
  return four_sums(n, x, [&](int64_t at) {
    const uint32_t c = code[at];
    const __m256i lanes = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(lattice + 8 * (c & 255))),
                                           _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lattice + 8 * (256 + (c >> 8)))));
#ifdef __AVX512VL__
    return _mm256_permutex2var_ps(magnitudes, lanes, negatives);  // bit 3: the sign
#else
    return _mm256_xor_ps(_mm256_permutevar8x32_ps(magnitudes, lanes), _mm256_castsi256_ps(_mm256_and_si256(lanes, sign)));
#endif
  });
#else
  const float* magnitudes = reinterpret_cast<const float*>(lattice + 2 * 256 * 8);
  float sum[LANES] = {};
  for (int64_t s = 0; s < n; ++s) {
    const uint32_t c = code[s];
    for (int e = 0; e < 8; ++e) {
      const int32_t lane = lattice[8 * (c & 255) + e] ^ lattice[8 * (256 + (c >> 8)) + e];
      sum[e] += (lane < 0 ? -magnitudes[lane & 7] : magnitudes[lane & 7]) * x[8 * s + e];
    }
  }
  return std::accumulate(sum, sum + LANES, 0.0f);
#endif
}

}  // namespace

extern "C" {

// y (batch, rows) = x (batch, input_groups × cols) · Wᵀ, rows in original order. Stored row r
// reads input group original_row(r) / (rows / input_groups) and codebook r / (rows / groups).
// For every input vector: the table P[pair][s][c] = <x segment s, codeword c> for every
// (input group, codebook) pair some row uses, then each row sums the entries its codes pick.
void vqc_lut_matmul(const Coded* weight, const float* x, int64_t batch, int64_t input_groups, float* y,
                    int threads) {
  const Coded& w = *weight;
  const int64_t segments = w.cols / w.dim, k = w.k, pairs = input_groups * w.groups;
  const int64_t group_segments = w.scale_group ? w.scale_group / w.dim : segments;
  const int64_t scales_per_row = w.scale_group ? w.cols / w.scale_group : 0;

  const std::vector<float> codebook = float_codebook(w, true);
  // The (input group, codebook) pair each row reads: only the pairs some row uses get a table.
  auto pair_of = [&](int64_t r, int64_t original) {
    return original / (w.rows / input_groups) * w.groups + r / (w.rows / w.groups);
  };
  std::vector<char> used(pairs, pairs == 1);
  for (int64_t r = 0; pairs > 1 && r < w.rows; ++r) used[pair_of(r, original_row(w, r))] = 1;
  static thread_local std::vector<float> kept;  // the caller's table, kept between calls: no page faults
  kept.resize(pairs * segments * k);
  float* const table = kept.data();  // (threads see their own thread_local: share this pointer)
  std::vector<float> sums(w.offset ? batch * input_groups * scales_per_row : 0);  // inputs summed per scale group
  for (int64_t i = 0; i < int64_t(sums.size()); ++i)
    sums[i] = std::accumulate(x + i * w.scale_group, x + (i + 1) * w.scale_group, 0.0f);

  // Threads only for enough work: waking them costs tens of microseconds, more on a busy machine.
  #pragma omp parallel num_threads(threads) if (batch * w.rows * segments >= PARALLEL_WORK)
  {
    std::vector<uint16_t> unpacked(w.bits == 8 || w.bits == 16 ? 0 : segments);
    for (int64_t b = 0; b < batch; ++b) {
      const float* xb = x + b * input_groups * w.cols;
      #pragma omp for schedule(static)
      for (int64_t ps = 0; ps < pairs * segments; ++ps) {
        const int64_t p = ps / segments, s = ps % segments, j = p / w.groups, g = p % w.groups;
        if (!used[p]) continue;
        float* __restrict__ t = table + ps * k;
        std::fill(t, t + k, 0.0f);
        for (int64_t e = 0; e < w.dim; ++e) {
          const float v = xb[j * w.cols + s * w.dim + e];
          const float* __restrict__ column = codebook.data() + (g * w.dim + e) * k;
          for (int64_t c = 0; c < k; ++c) t[c] += v * column[c];
        }
      }
      #pragma omp for schedule(static)
      for (int64_t r = 0; r < w.rows; ++r) {
        const int64_t original = original_row(w, r), pair = pair_of(r, original);
        const float* t = table + pair * segments * k;
        float acc[LANES] = {};
        auto add_row = [&](const auto* code) {  // one piece per scale group
          for (int64_t q = 0; q * group_segments < segments; ++q)
            gather_add(t + q * group_segments * k, int32_t(k), code + q * group_segments, group_segments,
                       w.scale ? half(w.scale[r * scales_per_row + q]) : 1.0f, acc);
        };
        if (w.bits == 8) {
          add_row(w.codes + r * segments);
        } else if (w.bits == 16) {
          add_row(reinterpret_cast<const uint16_t*>(w.codes) + r * segments);  // little-endian LSB-first
        } else {
          read_codes(w, r * segments, segments, unpacked.data());
          add_row(unpacked.data());
        }
        float total = 0;
        for (int32_t j = 0; j < LANES; ++j) total += acc[j];
        if (w.offset) {  // offset × (sum of the row's inputs in the scale group)
          const float* s = sums.data() + (b * input_groups + pair / w.groups) * scales_per_row;
          for (int64_t q = 0; q < scales_per_row; ++q) total += half(w.offset[r * scales_per_row + q]) * s[q];
        }
        y[b * w.rows + original] = total * w.gain;
      }
    }
  }
}

// y (batch, rows) = x (batch, cols) · Wᵀ, rows in original order, by gathering codewords: each
// row sums <codeword, input segment> over its codes, d multiply-adds per code and input, with no
// table. What a large codebook (k = 2^16 at d = 8) takes at small batches, where the table's
// k·d multiply-adds per segment would cost far more than the codes it serves.
void vqc_gather_matmul(const Coded* weight, const float* x, int64_t batch, float* y, int threads) {
  const Coded& w = *weight;
  const int64_t segments = w.cols / w.dim;
  const int64_t group_segments = w.scale_group ? w.scale_group / w.dim : segments;
  const int64_t scales_per_row = w.scale_group ? w.cols / w.scale_group : 0;
  std::vector<float> sums(w.offset ? batch * scales_per_row : 0);  // inputs summed per scale group
  for (int64_t i = 0; i < int64_t(sums.size()); ++i)
    sums[i] = std::accumulate(x + i * w.scale_group, x + (i + 1) * w.scale_group, 0.0f);
  #pragma omp parallel num_threads(threads) if (batch * w.rows * segments >= PARALLEL_WORK)
  {
    std::vector<uint16_t> unpacked(w.bits == 8 || w.bits == 16 ? 0 : segments);
    #pragma omp for schedule(static)
    for (int64_t r = 0; r < w.rows; ++r) {
      const uint16_t* book = w.codebook + r / (w.rows / w.groups) * w.k * w.dim;
      auto row_times = [&](const auto* code, int64_t b) {  // <row r, input b>, one piece per scale group
        float total = 0;
        for (int64_t q = 0; q * group_segments < segments; ++q) {
          const float* xq = x + b * w.cols + q * group_segments * w.dim;
          const auto* cq = code + q * group_segments;
          const float dot = w.lattice ? dot_e8p(w.lattice, cq, group_segments, xq)
                                      : dot_codewords(book, w.dim, cq, group_segments, xq);
          total += dot * (w.scale ? half(w.scale[r * scales_per_row + q]) : 1.0f);
          if (w.offset) total += half(w.offset[r * scales_per_row + q]) * sums[b * scales_per_row + q];
        }
        return total * w.gain;
      };
      if (w.bits != 8 && w.bits != 16) read_codes(w, r * segments, segments, unpacked.data());
      for (int64_t b = 0; b < batch; ++b)
        y[b * w.rows + original_row(w, r)] =
            w.bits == 8 ? row_times(w.codes + r * segments, b)
            : w.bits == 16 ? row_times(reinterpret_cast<const uint16_t*>(w.codes) + r * segments, b)
            : row_times(unpacked.data(), b);
    }
  }
}

// The dense fp32 rows [first, last) of the weight in stored order, scales, offsets and gain
// applied: the large-batch path multiplies them with a matrix product.
void vqc_decode(const Coded* weight, int64_t first, int64_t last, float* out, int threads) {
  const Coded& w = *weight;
  const int64_t segments = w.cols / w.dim, d = w.dim;
  const int64_t group_segments = w.scale_group ? w.scale_group / d : segments;
  const int64_t scales_per_row = w.scale_group ? w.cols / w.scale_group : 0;
  const std::vector<float> codebook = float_codebook(w, false);
  #pragma omp parallel num_threads(threads) if ((last - first) * w.cols >= PARALLEL_WORK)
  {
    std::vector<uint16_t> code(segments);
    #pragma omp for schedule(static)
    for (int64_t r = first; r < last; ++r) {
      read_codes(w, r * segments, segments, code.data());
      const float* book = codebook.data() + r / (w.rows / w.groups) * w.k * d;
      float* row = out + (r - first) * w.cols;
      for (int64_t q = 0; q * group_segments < segments; ++q) {  // w = (codeword × scale + offset) × gain
        const float scale = (w.scale ? half(w.scale[r * scales_per_row + q]) : 1.0f) * w.gain;
        const float offset = w.offset ? half(w.offset[r * scales_per_row + q]) * w.gain : 0.0f;
        for (int64_t s = q * group_segments; s < (q + 1) * group_segments; ++s)
          for (int64_t e = 0; e < d; ++e) row[s * d + e] = book[code[s] * d + e] * scale + offset;
      }
    }
  }
}

}  // extern "C"
