// pack_weight / unpack_weight / dequantize_weight in ATen only: they run at
// load time or in tests, never on the hot path, so one device-independent
// source serves every backend. The bit positions are those of
// packed_layout.h's code_at / set_code, expressed as shifts over a
// [rows, chunks, slices, 16] view of the codes: slice i of a chunk holds the
// codes of columns 16 i .. 16 i + 15.
#include "linear_ops.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace torchquant {
namespace {

// Shift amounts 0, step, 2 step, ... as an int32 column [count, 1] on `like`'s device.
at::Tensor shifts(int64_t count, int64_t step, const at::Tensor& like) {
  return (at::arange(count, like.options().dtype(at::kInt)) * step).view({count, 1});
}

}  // namespace

at::Tensor pack_weight_aten(const at::Tensor& codes, int64_t bits, bool check_values) {
  check_codes("torchquant.pack_weight", codes, bits, check_values);
  const int64_t n = codes.size(0), k = codes.size(1);
  const int64_t chunks = layout::num_chunks(k, bits), c = layout::chunk_codes(bits);
  at::Tensor u = at::zeros({n, chunks * c}, codes.options().dtype(at::kInt));
  u.narrow(1, 0, k).copy_(codes);
  at::Tensor bytes;
  if (bits == 3) {
    const at::Tensor s = u.view({n, chunks, 8, 16});
    // Low two bits of slice i: byte block i / 4, bits 2 (i % 4).
    const at::Tensor low = at::bitwise_left_shift(at::bitwise_and(s, 3).view({n, chunks, 2, 4, 16}),
                                                  shifts(4, 2, u))
                               .sum(3);
    // High bit of slice i: block 2, bit i.
    const at::Tensor high =
        at::bitwise_left_shift(at::bitwise_and(at::bitwise_right_shift(s, 2), 1), shifts(8, 1, u))
            .sum(2, /*keepdim=*/true);
    bytes = at::cat({low, high}, 2);
  } else {
    const int64_t slices = c / 16;
    bytes = at::bitwise_left_shift(u.view({n, chunks, slices, 16}), shifts(slices, bits, u)).sum(2);
  }
  // The shifted fields are disjoint, so their sum is their bitwise or.
  return bytes.to(at::kByte).reshape({n, layout::packed_row_bytes(k, bits)});
}

at::Tensor unpack_weight_aten(const at::Tensor& packed, int64_t bits, int64_t in_features) {
  check_packed("torchquant.unpack_weight", packed, bits, in_features);
  const int64_t n = packed.size(0);
  const int64_t chunks = layout::num_chunks(in_features, bits), c = layout::chunk_codes(bits);
  const at::Tensor p = packed.to(at::kInt);
  at::Tensor u;
  if (bits == 3) {
    const at::Tensor blocks = p.reshape({n, chunks, 3, 16});
    const at::Tensor low = at::bitwise_and(
        at::bitwise_right_shift(blocks.narrow(2, 0, 2).unsqueeze(3), shifts(4, 2, p)), 3);
    const at::Tensor high =
        at::bitwise_and(at::bitwise_right_shift(blocks.narrow(2, 2, 1), shifts(8, 1, p)), 1);
    u = at::bitwise_or(low.reshape({n, chunks, 8, 16}), at::bitwise_left_shift(high, 2));
  } else {
    const int64_t slices = c / 16;
    u = at::bitwise_and(
        at::bitwise_right_shift(p.reshape({n, chunks, 1, 16}), shifts(slices, bits, p)),
        (1 << bits) - 1);
  }
  return u.reshape({n, chunks * c}).narrow(1, 0, in_features).to(at::kByte).contiguous();
}

at::Tensor dequantize_weight_aten(const at::Tensor& packed, const at::Tensor& scales,
                                  const at::Tensor& zeros, int64_t bits, int64_t in_features,
                                  const std::optional<at::Tensor>& lut) {
  const PackedWeight w = check_packed_weight("torchquant.dequantize_weight", packed, scales, zeros,
                                             bits, in_features, lut, packed.device());
  const int64_t n = w.out_features;
  const at::Tensor u = unpack_weight_aten(w.packed, bits, in_features);
  const at::Tensor v = w.lut.defined()
                           ? w.lut.index_select(0, u.reshape({-1}).to(at::kLong))
                           : u.to(at::kFloat);
  return ((v.view({n, w.groups, w.group_size}) - w.zeros.unsqueeze(-1)) * w.scales.unsqueeze(-1))
      .view({n, in_features});
}

namespace {

at::Tensor pack_weight_cpu(const at::Tensor& codes, int64_t bits) {
  return pack_weight_aten(codes, bits, /*check_values=*/true);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchquant, CPU, m) {
  m.impl("pack_weight", TORCH_FN(pack_weight_cpu));
  m.impl("unpack_weight", TORCH_FN(unpack_weight_aten));
  m.impl("dequantize_weight", TORCH_FN(dequantize_weight_aten));
}

}  // namespace torchquant
