// Fused decode of transform-coded KV latents on CPU (built by hf_geocomp.kv.fused).
//
// Every cached token's latents are unpacked from their packed codes and float16 scales (per width
// group, as hf_geocomp.kv.quant.dequantize computes them) into a small per-thread buffer laid out
// head by head (N slots per KV head, unused slots 0), and immediately used:
//   scores:  out[b, h, m, t] = sum_k q[b, h, m, k] * z[b, t, h, k]
//   values:  partial[b, blk, h, m, k] = sum_{t in blk} p[b, h, m, t] * z[b, t, h, k]
// so the float latents of the whole history are never written to memory.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace {

struct Group {
  int bits;                  // 0: full precision (model dtype), else 8, 4, 2 or 1
  int n;                     // components
  const uint8_t* codes;      // (batch, seq, bytes) packed codes, or the full-precision values
  int64_t code_b, code_t;    // strides in elements
  const at::Half* scales;    // (batch, seq, groups)
  int64_t scale_b, scale_t;
  const int32_t* dest;       // (n,) slot of each component in the head-by-head buffer
  at::ScalarType dtype;      // of full-precision values
};

template <int B>
inline void unpack(const uint8_t* c, int n, float* out) {
  constexpr int per = 8 / B;
  constexpr int mask = (1 << B) - 1;
  const int whole = n / per;
  for (int k = 0; k < whole; ++k) {
    const int v = c[k];
    for (int s = 0; s < per; ++s) out[k * per + s] = static_cast<float>((v >> (s * B)) & mask);
  }
  if (whole * per < n) {
    const int v = c[whole];
    for (int s = 0; whole * per + s < n; ++s) out[whole * per + s] = static_cast<float>((v >> (s * B)) & mask);
  }
}

template <typename T>
inline void widen(const T* x, int n, float* out) {
  for (int i = 0; i < n; ++i) out[i] = static_cast<float>(x[i]);
}

// One token's latents of every group into zbuf (slots given by dest); tmp holds one group.
inline void decode_token(const std::vector<Group>& groups, int64_t b, int64_t t, int group_size, float* tmp,
                         float* zbuf) {
  for (const Group& g : groups) {
    if (g.bits == 0) {
      const int64_t off = b * g.code_b + t * g.code_t;
      if (g.dtype == at::kBFloat16) {
        widen(reinterpret_cast<const at::BFloat16*>(g.codes) + off, g.n, tmp);
      } else if (g.dtype == at::kHalf) {
        widen(reinterpret_cast<const at::Half*>(g.codes) + off, g.n, tmp);
      } else {
        widen(reinterpret_cast<const float*>(g.codes) + off, g.n, tmp);
      }
    } else {
      const uint8_t* c = g.codes + b * g.code_b + t * g.code_t;
      switch (g.bits) {
        case 8: unpack<8>(c, g.n, tmp); break;
        case 4: unpack<4>(c, g.n, tmp); break;
        case 2: unpack<2>(c, g.n, tmp); break;
        default: unpack<1>(c, g.n, tmp); break;
      }
      const at::Half* s = g.scales + b * g.scale_b + t * g.scale_t;
      const float levels = static_cast<float>(1 << g.bits);
      for (int lo = 0, j = 0; lo < g.n; lo += group_size, ++j) {
        const int hi = std::min(g.n, lo + group_size);
        const float a = static_cast<float>(s[j]);
        if (g.bits == 1) {
          for (int i = lo; i < hi; ++i) tmp[i] = (2 * tmp[i] - 1) * a;
        } else {
          const float step = 2 * a / levels;
          for (int i = lo; i < hi; ++i) tmp[i] = (tmp[i] + 0.5f) * step - a;
        }
      }
    }
    for (int i = 0; i < g.n; ++i) zbuf[g.dest[i]] = tmp[i];
  }
}

std::vector<Group> make_groups(const std::vector<torch::Tensor>& codes, const std::vector<torch::Tensor>& scales,
                               const std::vector<int64_t>& bits, const std::vector<torch::Tensor>& dest, int* max_n) {
  TORCH_CHECK(codes.size() == bits.size() && scales.size() == bits.size() && dest.size() == bits.size(),
              "one codes, scales, bits and dest entry per group");
  std::vector<Group> groups;
  *max_n = 1;
  for (size_t i = 0; i < bits.size(); ++i) {
    const torch::Tensor& c = codes[i];
    TORCH_CHECK(c.dim() == 3 && c.stride(2) == 1, "codes must be (batch, seq, n) with unit last stride");
    TORCH_CHECK(dest[i].scalar_type() == at::kInt && dest[i].is_contiguous(), "dest must be contiguous int32");
    Group g;
    g.bits = static_cast<int>(bits[i]);
    g.n = static_cast<int>(dest[i].numel());
    g.codes = static_cast<const uint8_t*>(c.data_ptr());
    g.code_b = c.stride(0);
    g.code_t = c.stride(1);
    g.dtype = c.scalar_type();
    g.dest = dest[i].data_ptr<int32_t>();
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
    *max_n = std::max(*max_n, g.n);
    groups.push_back(g);
  }
  return groups;
}

// q (batch, kv_heads, M, N) float32 contiguous -> out (batch, kv_heads, M, length) float32.
void scores(torch::Tensor q, std::vector<torch::Tensor> codes, std::vector<torch::Tensor> scales,
            std::vector<int64_t> bits, std::vector<torch::Tensor> dest, int64_t group_size, int64_t length,
            torch::Tensor out) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.is_contiguous() && out.is_contiguous(), "float32 contiguous q, out");
  int max_n;
  const std::vector<Group> groups = make_groups(codes, scales, bits, dest, &max_n);
  const int64_t batch = q.size(0), heads = q.size(1), rows = q.size(2), n = q.size(3);
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, batch * length, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> zbuf(heads * n, 0.0f), tmp(max_n);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / length, t = i % length;
      decode_token(groups, b, t, static_cast<int>(group_size), tmp.data(), zbuf.data());
      for (int64_t h = 0; h < heads; ++h) {
        const float* z = zbuf.data() + h * n;
        for (int64_t m = 0; m < rows; ++m) {
          const float* qv = qp + ((b * heads + h) * rows + m) * n;
          float s = 0.0f;
#pragma omp simd reduction(+ : s)
          for (int64_t k = 0; k < n; ++k) s += qv[k] * z[k];
          op[((b * heads + h) * rows + m) * length + t] = s;
        }
      }
    }
  });
}

// p (batch, kv_heads, M, length) float32, unit last stride -> partial (batch, blocks, kv_heads, M, N) float32 zeros,
// block b of ``block`` tokens summed into partial[:, b].
void values(torch::Tensor p, std::vector<torch::Tensor> codes, std::vector<torch::Tensor> scales,
            std::vector<int64_t> bits, std::vector<torch::Tensor> dest, int64_t group_size, int64_t length,
            int64_t block, torch::Tensor partial) {
  TORCH_CHECK(p.scalar_type() == at::kFloat && p.stride(3) == 1 && partial.is_contiguous(), "float32 p, partial");
  int max_n;
  const std::vector<Group> groups = make_groups(codes, scales, bits, dest, &max_n);
  const int64_t batch = p.size(0), heads = p.size(1), rows = p.size(2), n = partial.size(4);
  const int64_t blocks = partial.size(1);
  const int64_t sb = p.stride(0), sh = p.stride(1), sm = p.stride(2);
  const float* pp = p.data_ptr<float>();
  float* acc_all = partial.data_ptr<float>();
  at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> zbuf(heads * n, 0.0f), tmp(max_n);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, blk = task % blocks;
      float* acc = acc_all + task * heads * rows * n;
      for (int64_t t = blk * block; t < std::min(length, (blk + 1) * block); ++t) {
        decode_token(groups, b, t, static_cast<int>(group_size), tmp.data(), zbuf.data());
        for (int64_t h = 0; h < heads; ++h) {
          const float* z = zbuf.data() + h * n;
          for (int64_t m = 0; m < rows; ++m) {
            const float w = pp[b * sb + h * sh + m * sm + t];
            float* a = acc + (h * rows + m) * n;
#pragma omp simd
            for (int64_t k = 0; k < n; ++k) a[k] += w * z[k];
          }
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
