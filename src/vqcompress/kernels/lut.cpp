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
