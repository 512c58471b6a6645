// Sketch ops (edgetune/methods/sketchtune/layer.py, quant/bitpack.py): gather a weight from
// bit-packed codes + per-row-group tables, and scatter-add a weight gradient into the table
// buckets, for 2/3/4-bit codes. Code i of a row occupies stream bits [k*i, k*i+k), LSB first;
// column c belongs to group g(c) = c*GPR / in.
#include "common.h"

namespace edgetune_cpu {

static inline int code_at(const uint8_t* row, int64_t nbytes, int64_t c, int bits) {
  const int64_t p = c * bits;
  const int64_t byte = p >> 3;
  const int shift = static_cast<int>(p & 7);
  unsigned v = row[byte];
  if (shift + bits > 8 && byte + 1 < nbytes) v |= static_cast<unsigned>(row[byte + 1]) << 8;
  return static_cast<int>((v >> shift) & ((1u << bits) - 1));
}

static std::vector<int32_t> column_offsets(int64_t in_f, int64_t gpr, int64_t K) {
  std::vector<int32_t> off(in_f);
  for (int64_t c = 0; c < in_f; ++c) off[c] = static_cast<int32_t>((c * gpr / in_f) * K);
  return off;
}

static void check_sketch(const at::Tensor& codes, int64_t bits, int64_t in_f) {
  TORCH_CHECK(bits >= 1 && bits <= 8, "sketch: bits must be in 1..8");
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte, "sketch: codes must be uint8 (out, nbytes)");
  TORCH_CHECK(codes.size(1) == (in_f * bits + 7) / 8, "sketch: codes hold ", codes.size(1), " bytes per row, expected ",
              (in_f * bits + 7) / 8);
}

// table (out, GPR, K) -> W (out, in) in table's dtype.
at::Tensor sketch_gather(const at::Tensor& table_, const at::Tensor& codes_, int64_t bits, int64_t in_f) {
  ET_CHECK_CPU(table_);
  auto table = table_.contiguous();
  auto codes = codes_.contiguous();
  check_sketch(codes, bits, in_f);
  const int64_t out_f = table.size(0), gpr = table.size(1), K = table.size(2);
  TORCH_CHECK(K == (1 << bits) && codes.size(0) == out_f, "sketch_gather: table/codes shapes do not match");
  auto w = at::empty({out_f, in_f}, table.options());
  const int64_t nbytes = codes.size(1);
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const auto off = column_offsets(in_f, gpr, K);
  ET_DISPATCH_FLOATS(table.scalar_type(), "sketch_gather", [&] {
    const scalar_t* tp = table.data_ptr<scalar_t>();
    scalar_t* wp = w.data_ptr<scalar_t>();
    at::parallel_for(0, out_f, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const uint8_t* row = cp + r * nbytes;
        const scalar_t* t = tp + r * gpr * K;
        scalar_t* o = wp + r * in_f;
        if (bits == 4) {
          for (int64_t c = 0; c < in_f; ++c) o[c] = t[off[c] + ((row[c >> 1] >> ((c & 1) << 2)) & 15)];
        } else if (bits == 2) {
          for (int64_t c = 0; c < in_f; ++c) o[c] = t[off[c] + ((row[c >> 2] >> ((c & 3) << 1)) & 3)];
        } else {
          for (int64_t c = 0; c < in_f; ++c) o[c] = t[off[c] + code_at(row, nbytes, c, static_cast<int>(bits))];
        }
      }
    });
  });
  return w;
}

template <typename scalar_t, typename acc_t>
static void scatter_rows(const scalar_t* gp, const uint8_t* cp, acc_t* op, int64_t r0, int64_t r1, int64_t in_f,
                         int64_t nbytes, int64_t gpr, int64_t K, int bits, int64_t row_offset, const int32_t* off) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = cp + (r + row_offset) * nbytes;
    acc_t* o = op + (r + row_offset) * gpr * K;
    const scalar_t* g = gp + r * in_f;
    if (bits == 4) {
      for (int64_t c = 0; c < in_f; ++c) o[off[c] + ((row[c >> 1] >> ((c & 1) << 2)) & 15)] += static_cast<acc_t>(g[c]);
    } else if (bits == 2) {
      for (int64_t c = 0; c < in_f; ++c) o[off[c] + ((row[c >> 2] >> ((c & 3) << 1)) & 3)] += static_cast<acc_t>(g[c]);
    } else {
      for (int64_t c = 0; c < in_f; ++c) o[off[c] + code_at(row, nbytes, c, bits)] += static_cast<acc_t>(g[c]);
    }
  }
}

// grad_w (out, in) -> grad_table (out, GPR, K), accumulated in float32 (float64 for double).
at::Tensor sketch_scatter_add(const at::Tensor& grad_w_, const at::Tensor& codes_, int64_t bits, int64_t gpr) {
  ET_CHECK_CPU(grad_w_);
  auto gw = grad_w_.contiguous();
  auto codes = codes_.contiguous();
  const int64_t out_f = gw.size(0), in_f = gw.size(1), K = int64_t(1) << bits;
  check_sketch(codes, bits, in_f);
  const auto acc_type = gw.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto out = at::zeros({out_f, gpr, K}, gw.options().dtype(acc_type));
  const int64_t nbytes = codes.size(1);
  const auto off = column_offsets(in_f, gpr, K);
  ET_DISPATCH_FLOATS(gw.scalar_type(), "sketch_scatter_add", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* gp = gw.data_ptr<scalar_t>();
    at::parallel_for(0, out_f, 1, [&](int64_t r0, int64_t r1) {
      scatter_rows<scalar_t, acc_t>(gp, codes.data_ptr<uint8_t>(), out.data_ptr<acc_t>(), r0, r1, in_f, nbytes, gpr, K,
                                    static_cast<int>(bits), 0, off.data());
    });
  });
  return out;
}

// Fused: grad_table from dY (N, out) and X (N, in) without a full (out, in) grad_W: tiles of
// output rows, grad_W_tile = dY[:, tile]ᵀ · X, scattered at once.
at::Tensor sketch_grad_table(const at::Tensor& dy_, const at::Tensor& x_, const at::Tensor& codes_, int64_t bits,
                             int64_t gpr) {
  ET_CHECK_CPU(dy_);
  const int64_t out_f = dy_.size(-1), in_f = x_.size(-1), K = int64_t(1) << bits;
  auto dy = dy_.reshape({-1, out_f});
  auto x = x_.reshape({-1, in_f}).to(dy.scalar_type());
  auto codes = codes_.contiguous();
  check_sketch(codes, bits, in_f);
  TORCH_CHECK(codes.size(0) == out_f, "sketch_grad_table: codes rows must equal dY's last dim");
  const auto acc_type = dy.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto out = at::zeros({out_f, gpr, K}, dy.options().dtype(acc_type));
  const int64_t nbytes = codes.size(1);
  const int64_t tile = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, in_f));
  auto dyt = dy.t();
  const auto off = column_offsets(in_f, gpr, K);
  ET_DISPATCH_FLOATS(dy.scalar_type(), "sketch_grad_table", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    for (int64_t r0 = 0; r0 < out_f; r0 += tile) {
      const int64_t r1 = std::min(out_f, r0 + tile);
      auto gw = at::mm(dyt.narrow(0, r0, r1 - r0), x).contiguous();  // (r1-r0, in)
      const scalar_t* gp = gw.data_ptr<scalar_t>();
      at::parallel_for(0, r1 - r0, 1, [&](int64_t a, int64_t b) {
        // gp rows are relative to the tile; codes/out rows absolute (row_offset = r0)
        scatter_rows<scalar_t, acc_t>(gp + 0, codes.data_ptr<uint8_t>(), out.data_ptr<acc_t>(), a, b, in_f, nbytes,
                                      gpr, K, static_cast<int>(bits), r0, off.data());
      });
    }
  });
  return out;
}

}  // namespace edgetune_cpu

TORCH_LIBRARY_FRAGMENT(edgetune_cpu, m) {
  m.def("sketch_gather(Tensor table, Tensor codes, int bits, int in_features) -> Tensor");
  m.def("sketch_scatter_add(Tensor grad_w, Tensor codes, int bits, int groups_per_row) -> Tensor");
  m.def("sketch_grad_table(Tensor dy, Tensor x, Tensor codes, int bits, int groups_per_row) -> Tensor");
}

TORCH_LIBRARY_IMPL(edgetune_cpu, CPU, m) {
  m.impl("sketch_gather", &edgetune_cpu::sketch_gather);
  m.impl("sketch_scatter_add", &edgetune_cpu::sketch_scatter_add);
  m.impl("sketch_grad_table", &edgetune_cpu::sketch_grad_table);
}
