// Fused decode of transform-coded KV latents on CPU (built by hf_geocomp.kv.fused).
//
// Every cached token's latents are unpacked from their packed codes and float16 scales (per width
// group, the levels of hf_geocomp.kv.quant.dequantize from a table per byte) into a small per-thread
// buffer in stored order (the groups one after another), and immediately used:
//   scores:  out[b, r, t] = sum_k q[b, r, k] * z[b, t, k]
//   values:  partial[b, blk, r, k] = sum_{t in blk} p[b, r, t] * z[b, t, k]
// with r the query rows of all KV heads (q is 0 on other heads' components), so the float latents
// of the whole history are never written to memory.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

struct Group {
  int bits;                  // 0: full precision (model dtype), else 8, 4, 2 or 1
  int n;                     // components
  int offset;                // first slot in the token's buffer
  const uint8_t* codes;      // (batch, seq, bytes) packed codes, or the full-precision values
  int64_t code_b, code_t;    // strides in elements
  const at::Half* scales;    // (batch, seq, groups)
  int64_t scale_b, scale_t;
  at::ScalarType dtype;      // of full-precision values
};

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

template <int B>
inline void unpack(const uint8_t* c, int n, float* out) {
  static const Levels<B> lv;
  constexpr int per = 8 / B;
  const int bytes = (n + per - 1) / per;
  for (int k = 0; k < bytes; ++k) std::memcpy(out + k * per, lv.table[c[k]], sizeof(float) * per);
}

template <typename T>
inline void widen(const T* x, int n, float* out) {
  for (int i = 0; i < n; ++i) out[i] = static_cast<float>(x[i]);
}

// One token's latents of every group into z (slots offset .. offset + n of each group).
// z has room for 8 more floats past the last slot (unpacking writes whole bytes).
inline void decode_token(const std::vector<Group>& groups, int64_t b, int64_t t, int group_size, float* z) {
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
      case 4: unpack<4>(c, g.n, out); break;
      case 2: unpack<2>(c, g.n, out); break;
      default: unpack<1>(c, g.n, out); break;
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

std::vector<Group> make_groups(const std::vector<torch::Tensor>& codes, const std::vector<torch::Tensor>& scales,
                               const std::vector<int64_t>& bits, const std::vector<int64_t>& sizes) {
  TORCH_CHECK(codes.size() == bits.size() && scales.size() == bits.size() && sizes.size() == bits.size(),
              "one codes, scales, bits and size entry per group");
  std::vector<Group> groups;
  int offset = 0;
  for (size_t i = 0; i < bits.size(); ++i) {
    const torch::Tensor& c = codes[i];
    TORCH_CHECK(c.dim() == 3 && c.stride(2) == 1, "codes must be (batch, seq, n) with unit last stride");
    Group g;
    g.bits = static_cast<int>(bits[i]);
    g.n = static_cast<int>(sizes[i]);
    g.offset = offset;
    offset += g.n;
    g.codes = static_cast<const uint8_t*>(c.data_ptr());
    g.code_b = c.stride(0);
    g.code_t = c.stride(1);
    g.dtype = c.scalar_type();
    if (g.bits) {
      TORCH_CHECK(c.scalar_type() == at::kByte, "packed codes must be uint8");
      const torch::Tensor& s = scales[i];
      TORCH_CHECK(s.scalar_type() == at::kHalf && s.dim() == 3 && s.stride(2) == 1, "scales must be float16");
      g.scales = s.data_ptr<at::Half>();
      g.scale_b = s.stride(0);
      g.scale_t = s.stride(1);
    } else {
      g.scales = nullptr;
      g.scale_b = g.scale_t = 0;
    }
    groups.push_back(g);
  }
  return groups;
}

// q (batch, rows, N) float32 contiguous, N >= the components -> out (batch, rows, length) float32.
void scores(torch::Tensor q, std::vector<torch::Tensor> codes, std::vector<torch::Tensor> scales,
            std::vector<int64_t> bits, std::vector<int64_t> sizes, int64_t group_size, int64_t length,
            torch::Tensor out) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.is_contiguous() && out.is_contiguous(), "float32 contiguous q, out");
  const std::vector<Group> groups = make_groups(codes, scales, bits, sizes);
  const int64_t batch = q.size(0), rows = q.size(1), n = q.size(2);
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, batch * length, 512, [&](int64_t begin, int64_t end) {
    std::vector<float> zbuf(n + 8, 0.0f);
    float* z = zbuf.data();
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / length, t = i % length;
      decode_token(groups, b, t, static_cast<int>(group_size), z);
      const float* qb = qp + b * rows * n;
      for (int64_t r = 0; r < rows; ++r) {
        const float* qv = qb + r * n;
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int64_t k = 0; k < n; ++k) s += qv[k] * z[k];
        op[(b * rows + r) * length + t] = s;
      }
    }
  });
}

// p (batch, rows, length) float32, unit last stride -> partial (batch, blocks, rows, N) float32 zeros,
// block k of ``block`` tokens summed into partial[:, k].
void values(torch::Tensor p, std::vector<torch::Tensor> codes, std::vector<torch::Tensor> scales,
            std::vector<int64_t> bits, std::vector<int64_t> sizes, int64_t group_size, int64_t length,
            int64_t block, torch::Tensor partial) {
  TORCH_CHECK(p.scalar_type() == at::kFloat && p.stride(2) == 1 && partial.is_contiguous(), "float32 p, partial");
  const std::vector<Group> groups = make_groups(codes, scales, bits, sizes);
  const int64_t batch = p.size(0), rows = p.size(1), n = partial.size(3);
  const int64_t blocks = partial.size(1);
  const int64_t sb = p.stride(0), sr = p.stride(1);
  const float* pp = p.data_ptr<float>();
  float* acc_all = partial.data_ptr<float>();
  at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> zbuf(n + 8, 0.0f);
    float* z = zbuf.data();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, blk = task % blocks;
      float* acc = acc_all + task * rows * n;
      for (int64_t t = blk * block; t < std::min(length, (blk + 1) * block); ++t) {
        decode_token(groups, b, t, static_cast<int>(group_size), z);
        for (int64_t r = 0; r < rows; ++r) {
          const float w = pp[b * sb + r * sr + t];
          float* a = acc + r * n;
#pragma omp simd
          for (int64_t k = 0; k < n; ++k) a[k] += w * z[k];
        }
      }
    }
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("scores", &scores, "scores of queries against coded latents");
  m.def("values", &values, "probability-weighted sums of coded latents, per block of tokens");
}
