// Fused decode of transform-coded KV latents on CPU (built by hf_geocomp.kv.fused).
//
// Every cached token's latents are unpacked from their packed codes and float16 scales (per width
// group, the levels of hf_geocomp.kv.quant.dequantize) into *head order*: the components of KV head
// 0, then of head 1, ..., each head's slice padded with zeros to a multiple of VL floats (``order``
// and ``offsets`` from fused.Layout; ``rows`` the decoder rows in that order). Blocks of TB tokens
// are unpacked into a per-thread buffer z and used at once, each query row reading only the slice
// of its own KV head h:
//   scores:  out[b, h*M + r, t] = sum_j qt[b, h, r, j] z[t, off_h + j],
//            qt[b, h, r, j] = q[b, h, r, :] . rows[off_h + j, :]  (the query in latent space, once per call);
//   values:  y[b, h, r, j] = sum_t p[b, h*M + r, t] z[t, off_h + j],
//            out[b, h, r, :] = sum_j y[b, h, r, j] rows[off_h + j, :]  (lifted after the sum),
// so a token costs sum_h M * n_h products, and the float latents of the history are never written to memory.
//
// Two unpacks give the same floats bit for bit (a level is exact in float32; one rounding for the scale):
// * portable: the stored order from a table of every byte's levels, then the head-order permutation;
// * AVX-512 VBMI (compiled with -march=native on such a CPU, when a token's codes fit 128 bytes and
//   its scales 31): 16 slots per vector straight into head order (byte select, shift, mask, convert,
//   scale select).
// Work is split into tasks of consecutive tokens of one sequence, taken by the threads from a shared
// counter, so a thread slowed by other jobs (shared machines) takes fewer tasks; the join still waits
// until every thread has run once.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VBMI__)
#include <immintrin.h>
#define GEOCOMP_VBMI 1
#endif

namespace {

constexpr int VL = 16;  // floats per vector; head slices are padded to a multiple (fused.VL)
constexpr int TB = 16;  // tokens unpacked per block
typedef float vf __attribute__((vector_size(VL * sizeof(float))));
typedef float vf8 __attribute__((vector_size(8 * sizeof(float))));
typedef float vf4 __attribute__((vector_size(4 * sizeof(float))));

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline float hsum(vf v) {
  const vf8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const vf4 c = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (c[0] + c[2]) + (c[1] + c[3]);
}

struct Group {
  int bits;                  // 0: full precision (model dtype), else 8, 4, 2 or 1
  int n;                     // components
  int offset;                // first slot in the token's stored-order buffer
  int byte_base, bytes;      // its codes in the token's code window (quantised groups)
  int scale_base, nscales;   // its scales in the token's scale window
  const uint8_t* codes;      // (batch, seq, bytes) packed codes, or the full-precision values
  int64_t code_b, code_t;    // strides in elements
  const at::Half* scales;    // (batch, seq, groups)
  int64_t scale_b, scale_t;
  at::ScalarType dtype;      // of full-precision values
  uint64_t win[2], swin;     // its lanes of the code window (2 x 64 bytes) and scale window (32 float16)
};

// Lanes [lo, hi) of a register of n lanes (n <= 64) as a mask.
inline uint64_t lanes(int lo, int hi, int n) {
  lo = std::max(lo, 0);
  hi = std::min(hi, n);
  if (hi <= lo) return 0;
  const uint64_t run = hi - lo == 64 ? ~0ULL : ((1ULL << (hi - lo)) - 1);
  return run << lo;
}

// Level of code c at width B in units of the group's scale a: z = a * level (quant.dequantize).
// Tables of every byte's 8 / B levels, so unpacking is one copy per byte.
template <int B>
struct Levels {
  static constexpr int per = 8 / B;
  float table[256][per];
  Levels() {
    const float L = static_cast<float>(1 << B);
    for (int v = 0; v < 256; ++v)
      for (int s = 0; s < per; ++s) {
        const int c = (v >> (s * B)) & ((1 << B) - 1);
        table[v][s] = B == 1 ? 2.0f * c - 1.0f : (c + 0.5f) * (2.0f / L) - 1.0f;
      }
  }
};
const Levels<4> levels4;
const Levels<2> levels2;
const Levels<1> levels1;

template <int B>
inline void unpack(const Levels<B>& lv, const uint8_t* c, int n, float* out) {
  constexpr int per = 8 / B;
  const int bytes = (n + per - 1) / per;
  for (int k = 0; k < bytes; ++k) std::memcpy(out + k * per, lv.table[c[k]], sizeof(float) * per);
}

template <typename T>
inline void widen(const T* x, int n, float* out) {
  for (int i = 0; i < n; ++i) out[i] = static_cast<float>(x[i]);
}

inline float full_value(const Group& g, int64_t b, int64_t t, int i) {
  const int64_t off = b * g.code_b + t * g.code_t + i;
  if (g.dtype == at::kBFloat16) return static_cast<float>(reinterpret_cast<const at::BFloat16*>(g.codes)[off]);
  if (g.dtype == at::kHalf) return static_cast<float>(reinterpret_cast<const at::Half*>(g.codes)[off]);
  return reinterpret_cast<const float*>(g.codes)[off];
}

// One token's latents of every group in stored order (slots offset .. offset + n of each group).
// z has room for 8 more floats past the last slot (unpacking writes whole bytes).
inline void decode_stored(const std::vector<Group>& groups, int64_t b, int64_t t, int group_size, float* z) {
  for (const Group& g : groups) {
    float* out = z + g.offset;
    if (g.bits == 0) {
      const int64_t off = b * g.code_b + t * g.code_t;
      if (g.dtype == at::kBFloat16) {
        widen(reinterpret_cast<const at::BFloat16*>(g.codes) + off, g.n, out);
      } else if (g.dtype == at::kHalf) {
        widen(reinterpret_cast<const at::Half*>(g.codes) + off, g.n, out);
      } else {
        widen(reinterpret_cast<const float*>(g.codes) + off, g.n, out);
      }
      continue;
    }
    const uint8_t* c = g.codes + b * g.code_b + t * g.code_t;
    switch (g.bits) {
      case 8: for (int i = 0; i < g.n; ++i) out[i] = (c[i] + 0.5f) * (2.0f / 256.0f) - 1.0f; break;
      case 4: unpack<4>(levels4, c, g.n, out); break;
      case 2: unpack<2>(levels2, c, g.n, out); break;
      default: unpack<1>(levels1, c, g.n, out); break;
    }
    const at::Half* s = g.scales + b * g.scale_b + t * g.scale_t;
    for (int lo = 0, j = 0; lo < g.n; lo += group_size, ++j) {
      const int hi = std::min(g.n, lo + group_size);
      const float a = static_cast<float>(s[j]);
#pragma omp simd
      for (int i = lo; i < hi; ++i) out[i] *= a;
    }
  }
}

#ifdef GEOCOMP_VBMI
// Per vector of 16 head-order slots: where each slot's code and scale are in the token's windows.
struct alignas(64) VTab {
  uint8_t idx[64];      // byte 4k: the code byte of slot k in the code window
  int32_t shift[16];    // of its code in that byte
  int32_t mask[16];     // (1 << bits) - 1; 0 for padding and full-precision slots
  float step[16];       // level = code * step + off (exact in float32)
  float off[16];
  int32_t sidx[16];     // its scale in the scale window (ZERO_SCALE: none)
};
constexpr int ZERO_SCALE = 31;
#endif

// Everything one call needs about the codec's layout, and the unpack of one token into head order.
struct Codes {
  std::vector<Group> groups;
  int n = 0, np = 0, heads = 0, group_size = 1, code_bytes = 0, nscales = 0;
  std::vector<int> offsets;   // heads + 1: each head's slice of the head order
  std::vector<int> src;       // np: stored slot of each head-order slot (zero slot for padding)
  int zero = 0;               // the stored-order buffer's slot that stays 0
  std::vector<int> full_slot, full_group, full_pos;  // full-precision components: head-order slot, group, index
  bool fast = false;
#ifdef GEOCOMP_VBMI
  std::vector<VTab> tabs;
#endif

  int buffer() const { return n + VL; }  // floats of the stored-order buffer (portable unpack)

  // Token t of sequence b → zh[0 .. np) in head order; tmp: buffer() floats (portable unpack).
  inline void token(int64_t b, int64_t t, float* zh, float* tmp) const {
#ifdef GEOCOMP_VBMI
    if (fast) {
      // the token's codes (128 bytes) and scales (32 float16) in registers: masked loads of each group
      __m512i w0 = _mm512_setzero_si512(), w1 = w0, s = w0;
      for (const Group& g : groups) {
        if (g.bits == 0) continue;
        const uint8_t* c = g.codes + b * g.code_b + t * g.code_t - g.byte_base;  // lane i: window byte i
        w0 = _mm512_mask_loadu_epi8(w0, g.win[0], c);
        w1 = _mm512_mask_loadu_epi8(w1, g.win[1], c + 64);
        const at::Half* a = g.scales + b * g.scale_b + t * g.scale_t - g.scale_base;  // lane i: window scale i
        s = _mm512_mask_loadu_epi16(s, static_cast<__mmask32>(g.swin), a);
      }
      const __m512 s0 = _mm512_cvtph_ps(_mm512_castsi512_si256(s));        // scales 0 .. 15 as float32
      const __m512 s1 = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(s, 1));  // scales 16 .. 31
      for (size_t v = 0; v < tabs.size(); ++v) {
        const VTab& tb = tabs[v];
        __m512i c = _mm512_maskz_permutex2var_epi8(0x1111111111111111ULL, w0, _mm512_load_si512(tb.idx), w1);
        c = _mm512_and_si512(_mm512_srlv_epi32(c, _mm512_load_si512(tb.shift)), _mm512_load_si512(tb.mask));
        const __m512 level = _mm512_fmadd_ps(_mm512_cvtepi32_ps(c), _mm512_load_ps(tb.step), _mm512_load_ps(tb.off));
        const __m512 scale = _mm512_permutex2var_ps(s0, _mm512_load_si512(tb.sidx), s1);
        _mm512_storeu_ps(zh + VL * v, _mm512_mul_ps(level, scale));
      }
      for (size_t i = 0; i < full_slot.size(); ++i)
        zh[full_slot[i]] = full_value(groups[full_group[i]], b, t, full_pos[i]);
      return;
    }
#endif
    decode_stored(groups, b, t, group_size, tmp);
    const int* s = src.data();
    for (int j = 0; j < np; ++j) zh[j] = tmp[s[j]];
  }
};

Codes make_codes(const std::vector<torch::Tensor>& codes, const std::vector<torch::Tensor>& scales,
                 const std::vector<int64_t>& bits, const std::vector<int64_t>& sizes, int64_t group_size,
                 const std::vector<int64_t>& offsets, const torch::Tensor& order, bool generic) {
  TORCH_CHECK(codes.size() == bits.size() && scales.size() == bits.size() && sizes.size() == bits.size(),
              "one codes, scales, bits and size entry per group");
  TORCH_CHECK(group_size >= 1, "group_size must be positive");
  Codes cd;
  cd.group_size = static_cast<int>(group_size);
  for (size_t i = 0; i < bits.size(); ++i) {
    const torch::Tensor& c = codes[i];
    TORCH_CHECK(c.dim() == 3 && c.stride(2) == 1, "codes must be (batch, seq, n) with unit last stride");
    Group g;
    g.bits = static_cast<int>(bits[i]);
    TORCH_CHECK(g.bits == 0 || g.bits == 8 || g.bits == 4 || g.bits == 2 || g.bits == 1,
                "widths must be full precision (0) or 8, 4, 2, 1 bits, got ", g.bits);
    g.n = static_cast<int>(sizes[i]);
    g.offset = cd.n;
    cd.n += g.n;
    g.codes = static_cast<const uint8_t*>(c.data_ptr());
    g.code_b = c.stride(0);
    g.code_t = c.stride(1);
    g.dtype = c.scalar_type();
    g.byte_base = g.bytes = g.scale_base = g.nscales = 0;
    if (g.bits) {
      TORCH_CHECK(c.scalar_type() == at::kByte, "packed codes must be uint8");
      const torch::Tensor& s = scales[i];
      TORCH_CHECK(s.scalar_type() == at::kHalf && s.dim() == 3 && s.stride(2) == 1, "scales must be float16");
      const int per = 8 / g.bits;
      g.bytes = (g.n + per - 1) / per;
      g.nscales = (g.n + cd.group_size - 1) / cd.group_size;
      TORCH_CHECK(c.size(2) >= g.bytes && s.size(2) >= g.nscales, "codes or scales narrower than their group");
      g.byte_base = cd.code_bytes;
      g.scale_base = cd.nscales;
      cd.code_bytes += g.bytes;
      cd.nscales += g.nscales;
      g.scales = s.data_ptr<at::Half>();
      g.scale_b = s.stride(0);
      g.scale_t = s.stride(1);
      g.win[0] = lanes(g.byte_base, g.byte_base + g.bytes, 64);
      g.win[1] = lanes(g.byte_base - 64, g.byte_base + g.bytes - 64, 64);
      g.swin = lanes(g.scale_base, g.scale_base + g.nscales, 32);
    } else {
      TORCH_CHECK(c.scalar_type() == at::kBFloat16 || c.scalar_type() == at::kHalf || c.scalar_type() == at::kFloat,
                  "full-precision values must be bfloat16, float16 or float32");
      TORCH_CHECK(c.size(2) >= g.n, "values narrower than their group");
      g.scales = nullptr;
      g.scale_b = g.scale_t = 0;
      g.win[0] = g.win[1] = g.swin = 0;
    }
    cd.groups.push_back(g);
  }
  TORCH_CHECK(order.scalar_type() == at::kLong && order.dim() == 1 && order.is_contiguous(), "order: int64 (np,)");
  cd.np = static_cast<int>(order.size(0));
  cd.heads = static_cast<int>(offsets.size()) - 1;
  TORCH_CHECK(cd.heads >= 1 && offsets[0] == 0 && offsets.back() == cd.np, "offsets must run from 0 to len(order)");
  for (int h = 0; h <= cd.heads; ++h) {
    TORCH_CHECK(offsets[h] % VL == 0 && (h == 0 || offsets[h] >= offsets[h - 1]),
                "head slices must be padded to multiples of ", VL);
    cd.offsets.push_back(static_cast<int>(offsets[h]));
  }
  cd.zero = cd.n + VL - 1;  // unpacking writes at most 7 floats past the last slot
  const int64_t* o = order.data_ptr<int64_t>();
  std::vector<int> group_of(cd.n);
  for (size_t gi = 0; gi < cd.groups.size(); ++gi)
    for (int i = 0; i < cd.groups[gi].n; ++i) group_of[cd.groups[gi].offset + i] = static_cast<int>(gi);
  cd.src.resize(cd.np);
  for (int j = 0; j < cd.np; ++j) {
    TORCH_CHECK(o[j] >= -1 && o[j] < cd.n, "order holds stored slots (or -1 for padding)");
    cd.src[j] = o[j] < 0 ? cd.zero : static_cast<int>(o[j]);
    if (o[j] >= 0 && cd.groups[group_of[o[j]]].bits == 0) {
      cd.full_slot.push_back(j);
      cd.full_group.push_back(group_of[o[j]]);
      cd.full_pos.push_back(static_cast<int>(o[j]) - cd.groups[group_of[o[j]]].offset);
    }
  }
#ifdef GEOCOMP_VBMI
  cd.fast = !generic && cd.code_bytes <= 128 && cd.nscales < ZERO_SCALE;
  if (cd.fast) {
    cd.tabs.resize(cd.np / VL);
    for (int j = 0; j < cd.np; ++j) {
      VTab& tb = cd.tabs[j / VL];
      const int k = j % VL;
      if (k == 0) std::memset(&tb, 0, sizeof tb);
      tb.sidx[k] = ZERO_SCALE;
      if (o[j] < 0) continue;
      const Group& g = cd.groups[group_of[o[j]]];
      if (g.bits == 0) continue;  // written after the vector pass
      const int i = static_cast<int>(o[j]) - g.offset, per = 8 / g.bits;
      tb.idx[4 * k] = static_cast<uint8_t>(g.byte_base + i / per);
      tb.shift[k] = (i % per) * g.bits;
      tb.mask[k] = (1 << g.bits) - 1;
      const float L = static_cast<float>(1 << g.bits);
      tb.step[k] = g.bits == 1 ? 2.0f : 2.0f / L;
      tb.off[k] = g.bits == 1 ? -1.0f : 1.0f / L - 1.0f;
      tb.sidx[k] = g.scale_base + i / cd.group_size;
    }
  }
#else
  (void)generic;
#endif
  return cd;
}

// Tokens per task: about 8 tasks per thread over the whole batch, at least 128 tokens, whole blocks.
int64_t task_tokens(int64_t batch, int64_t length) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t t = std::max<int64_t>(128, (batch * length + 8 * threads - 1) / (8 * threads));
  return (t + TB - 1) / TB * TB;
}

// Runs fn(task) for every task in [0, tasks), the threads taking tasks from a shared counter.
template <typename F>
void run_tasks(int64_t tasks, const F& fn) {
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(tasks, std::max<int64_t>(1, at::get_num_threads()));
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t task = next++; task < tasks; task = next++) fn(task);
  });
}

// Per-thread scratch of one task: the head-order block of TB tokens (and the stored-order buffer).
struct Scratch {
  std::vector<float> block, tmp;
  explicit Scratch(const Codes& cd) : block(static_cast<size_t>(TB) * cd.np), tmp(cd.buffer(), 0.0f) {}
  // tokens t0 .. t0 + nt of sequence b into block rows 0 .. nt
  void unpack(const Codes& cd, int64_t b, int64_t t0, int nt) {
    for (int i = 0; i < nt; ++i) cd.token(b, t0 + i, block.data() + static_cast<int64_t>(i) * cd.np, tmp.data());
  }
};

// R query rows of one head against nt tokens: out[r * ostride + i] = q[r] . z[i] over the head's width.
template <int R>
void score_rows(const float* q, int64_t qstride, int width, const float* z, int zstride, int nt, float* out,
                int64_t ostride) {
  for (int i = 0; i < nt; ++i, z += zstride) {
    vf acc[R];
    for (int r = 0; r < R; ++r) acc[r] = vf{};
    for (int c = 0; c < width; c += VL) {
      const vf zv = load(z + c);
      for (int r = 0; r < R; ++r) acc[r] += load(q + r * qstride + c) * zv;
    }
    for (int r = 0; r < R; ++r) out[r * ostride + i] = hsum(acc[r]);
  }
}

// R weight rows of one head over nt tokens, NV vectors of the head's slice: acc[r] += sum_i p[r][i] z[i].
template <int R, int NV>
void value_rows(const float* p, int64_t pstride, const float* z, int zstride, int nt, float* acc, int64_t astride) {
  vf a[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) a[r][v] = load(acc + r * astride + v * VL);
  for (int i = 0; i < nt; ++i, z += zstride) {
    vf zv[NV];
    for (int v = 0; v < NV; ++v) zv[v] = load(z + v * VL);
    for (int r = 0; r < R; ++r) {
      const float w = p[r * pstride + i];
      for (int v = 0; v < NV; ++v) a[r][v] += w * zv[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) store(acc + r * astride + v * VL, a[r][v]);
}

template <int R>
void value_cols(const float* p, int64_t pstride, int width, const float* z, int zstride, int nt, float* acc,
                int64_t astride) {
  for (int c = 0; c < width; c += 4 * VL) {
    switch (std::min(4, (width - c) / VL)) {
      case 1: value_rows<R, 1>(p, pstride, z + c, zstride, nt, acc + c, astride); break;
      case 2: value_rows<R, 2>(p, pstride, z + c, zstride, nt, acc + c, astride); break;
      case 3: value_rows<R, 3>(p, pstride, z + c, zstride, nt, acc + c, astride); break;
      default: value_rows<R, 4>(p, pstride, z + c, zstride, nt, acc + c, astride); break;
    }
  }
}

void check_rows(const torch::Tensor& rows, const Codes& cd) {
  TORCH_CHECK(rows.scalar_type() == at::kFloat && rows.dim() == 2 && rows.is_contiguous() && rows.size(0) == cd.np,
              "rows: float32 contiguous (len(order), head_dim)");
}

// q (batch, heads, M, d) float32 contiguous; rows (np, d) -> out (batch, heads * M, length) float32 contiguous.
void scores(torch::Tensor q, torch::Tensor rows, std::vector<int64_t> offsets, torch::Tensor order,
            std::vector<torch::Tensor> codes, std::vector<torch::Tensor> scales, std::vector<int64_t> bits,
            std::vector<int64_t> sizes, int64_t group_size, int64_t length, torch::Tensor out, bool generic) {
  const Codes cd = make_codes(codes, scales, bits, sizes, group_size, offsets, order, generic);
  check_rows(rows, cd);
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.is_contiguous() && q.dim() == 4 && q.size(1) == cd.heads &&
              q.size(3) == rows.size(1), "q: float32 contiguous (batch, heads, M, head_dim)");
  const int64_t batch = q.size(0), M = q.size(2), d = q.size(3), nrows = cd.heads * M;
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.size(0) == batch &&
              out.size(1) == nrows && out.size(2) == length, "out: float32 contiguous (batch, heads * M, length)");
  if (length == 0 || batch == 0 || M == 0) return;
  // the queries in latent space, each row on its own head's slice: qt (batch, heads * M, np)
  std::vector<float> qt(static_cast<size_t>(batch * nrows * cd.np), 0.0f);
  const float* qp = q.data_ptr<float>();
  const float* rp = rows.data_ptr<float>();
  at::parallel_for(0, batch * nrows, 64, [&](int64_t begin, int64_t end) {  // serial for small batches
    for (int64_t row = begin; row < end; ++row) {
      const int h = static_cast<int>((row % nrows) / M);
      const float* qv = qp + row * d;
      float* dst = qt.data() + row * cd.np;
      for (int j = cd.offsets[h]; j < cd.offsets[h + 1]; ++j) {
        const float* rv = rp + j * d;
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int64_t k = 0; k < d; ++k) s += qv[k] * rv[k];
        dst[j] = s;
      }
    }
  });
  float* op = out.data_ptr<float>();
  const int64_t per = task_tokens(batch, length), chunks = (length + per - 1) / per;
  run_tasks(batch * chunks, [&](int64_t task) {
    const int64_t b = task / chunks, start = (task % chunks) * per, stop = std::min(length, start + per);
    Scratch sc(cd);
    for (int64_t t0 = start; t0 < stop; t0 += TB) {
      const int nt = static_cast<int>(std::min<int64_t>(TB, stop - t0));
      sc.unpack(cd, b, t0, nt);
      for (int h = 0; h < cd.heads; ++h) {
        const int lo = cd.offsets[h], width = cd.offsets[h + 1] - lo;
        for (int64_t r0 = 0; r0 < M; r0 += 4) {
          const int64_t row = b * nrows + h * M + r0;
          const float* qv = qt.data() + row * cd.np + lo;
          const float* z = sc.block.data() + lo;
          float* o = op + row * length + t0;
          switch (std::min<int64_t>(4, M - r0)) {
            case 1: score_rows<1>(qv, cd.np, width, z, cd.np, nt, o, length); break;
            case 2: score_rows<2>(qv, cd.np, width, z, cd.np, nt, o, length); break;
            case 3: score_rows<3>(qv, cd.np, width, z, cd.np, nt, o, length); break;
            default: score_rows<4>(qv, cd.np, width, z, cd.np, nt, o, length); break;
          }
        }
      }
    }
  });
}

// p (batch, heads * M, length) float32 with unit last stride; rows (np, d) -> out (batch, heads, M, d) float32
// contiguous: the p-weighted sums of the coded values, lifted by their decoder rows.
void values(torch::Tensor p, torch::Tensor rows, std::vector<int64_t> offsets, torch::Tensor order,
            std::vector<torch::Tensor> codes, std::vector<torch::Tensor> scales, std::vector<int64_t> bits,
            std::vector<int64_t> sizes, int64_t group_size, int64_t length, torch::Tensor out, bool generic) {
  const Codes cd = make_codes(codes, scales, bits, sizes, group_size, offsets, order, generic);
  check_rows(rows, cd);
  TORCH_CHECK(p.scalar_type() == at::kFloat && p.dim() == 3 && p.stride(2) == 1 && p.size(2) >= length,
              "p: float32 (batch, heads * M, length) with unit last stride");
  const int64_t batch = p.size(0), nrows = p.size(1), d = rows.size(1);
  TORCH_CHECK(nrows % cd.heads == 0, "p's rows must be heads * M");
  const int64_t M = nrows / cd.heads;
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 4 && out.size(0) == batch &&
              out.size(1) == cd.heads && out.size(2) == M && out.size(3) == d,
              "out: float32 contiguous (batch, heads, M, head_dim)");
  out.zero_();
  if (length == 0 || batch == 0 || M == 0) return;
  const int64_t sb = p.stride(0), sr = p.stride(1);
  const float* pp = p.data_ptr<float>();
  const int64_t per = task_tokens(batch, length), chunks = (length + per - 1) / per;
  // partial[task] (heads * M, np): each task's sums, each row on its own head's slice
  std::vector<float> partial(static_cast<size_t>(batch * chunks * nrows * cd.np), 0.0f);
  run_tasks(batch * chunks, [&](int64_t task) {
    const int64_t b = task / chunks, start = (task % chunks) * per, stop = std::min(length, start + per);
    float* acc_all = partial.data() + task * nrows * cd.np;
    Scratch sc(cd);
    for (int64_t t0 = start; t0 < stop; t0 += TB) {
      const int nt = static_cast<int>(std::min<int64_t>(TB, stop - t0));
      sc.unpack(cd, b, t0, nt);
      for (int h = 0; h < cd.heads; ++h) {
        const int lo = cd.offsets[h], width = cd.offsets[h + 1] - lo;
        for (int64_t r0 = 0; r0 < M; r0 += 4) {
          const float* w = pp + b * sb + (h * M + r0) * sr + t0;
          const float* z = sc.block.data() + lo;
          float* acc = acc_all + (h * M + r0) * cd.np + lo;
          switch (std::min<int64_t>(4, M - r0)) {
            case 1: value_cols<1>(w, sr, width, z, cd.np, nt, acc, cd.np); break;
            case 2: value_cols<2>(w, sr, width, z, cd.np, nt, acc, cd.np); break;
            case 3: value_cols<3>(w, sr, width, z, cd.np, nt, acc, cd.np); break;
            default: value_cols<4>(w, sr, width, z, cd.np, nt, acc, cd.np); break;
          }
        }
      }
    }
  });
  // sum the tasks of each sequence, then lift by the decoder rows of the row's head
  const float* rp = rows.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, batch * nrows, 64, [&](int64_t begin, int64_t end) {  // serial for small batches
    std::vector<float> y(cd.np);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / nrows, r = row % nrows;
      const int h = static_cast<int>(r / M), lo = cd.offsets[h], hi = cd.offsets[h + 1];
      for (int j = lo; j < hi; ++j) y[j] = 0.0f;
      for (int64_t c = 0; c < chunks; ++c) {
        const float* part = partial.data() + ((b * chunks + c) * nrows + r) * cd.np;
#pragma omp simd
        for (int j = lo; j < hi; ++j) y[j] += part[j];
      }
      float* o = op + row * d;
      for (int j = lo; j < hi; ++j) {
        const float yj = y[j];
        const float* rv = rp + j * d;
#pragma omp simd
        for (int64_t k = 0; k < d; ++k) o[k] += yj * rv[k];
      }
    }
  });
}

bool vbmi() {
#ifdef GEOCOMP_VBMI
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("scores", &scores, "scores of queries against coded latents, each query row on its own KV head");
  m.def("values", &values, "probability-weighted sums of coded latents, lifted by their decoder rows");
  m.def("vbmi", &vbmi, "whether the AVX-512 VBMI unpack was compiled in");
}
