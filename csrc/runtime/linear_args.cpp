#include "linear_args.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <sstream>
#include <string>
#include <vector>

namespace torchquant {

std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < sizes.size(); ++i) os << (i ? ", " : "") << sizes[i];
  os << "]";
  return os.str();
}

namespace {

bool is_float_activation(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

}  // namespace

void check_bits(const char* op, int64_t bits) {
  TORCH_CHECK_VALUE(layout::supported_bits(bits), op, ": bits must be 2, 3, 4 or 8, got ", bits);
}

void check_device(const char* op, const char* name, const at::Tensor& t, c10::Device device) {
  TORCH_CHECK_VALUE(t.device() == device, op, ": ", name, " must be on the input's device (",
                    device, "), got ", t.device());
}

void check_packed(const char* op, const at::Tensor& packed, int64_t bits, int64_t in_features) {
  check_bits(op, bits);
  TORCH_CHECK_VALUE(in_features >= 1, op, ": in_features must be positive, got ", in_features);
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, op, ": packed must be uint8, got ",
                   packed.scalar_type());
  const int64_t row_bytes = layout::packed_row_bytes(in_features, bits);
  TORCH_CHECK_VALUE(packed.dim() == 2 && packed.size(1) == row_bytes, op,
                    ": packed must have shape [out_features, ", row_bytes,
                    "] (packed_row_bytes(in_features=", in_features, ", bits=", bits,
                    ")), got ", shape_str(packed.sizes()));
}

PackedWeight check_packed_weight(const char* op, const at::Tensor& packed,
                                 const at::Tensor& scales, const at::Tensor& zeros,
                                 int64_t bits, int64_t in_features,
                                 const std::optional<at::Tensor>& lut, c10::Device device) {
  check_packed(op, packed, bits, in_features);
  check_device(op, "packed", packed, device);
  const int64_t n = packed.size(0);
  TORCH_CHECK_TYPE(scales.scalar_type() == at::kFloat, op, ": scales must be float32, got ",
                   scales.scalar_type());
  TORCH_CHECK_TYPE(zeros.scalar_type() == at::kFloat, op, ": zeros must be float32, got ",
                   zeros.scalar_type());
  check_device(op, "scales", scales, device);
  check_device(op, "zeros", zeros, device);
  TORCH_CHECK_VALUE(scales.dim() == 2 && scales.size(0) == n && scales.size(1) >= 1, op,
                    ": scales must have shape [out_features=", n, ", groups], got ",
                    shape_str(scales.sizes()));
  const int64_t groups = scales.size(1);
  TORCH_CHECK_VALUE(in_features % groups == 0, op, ": the number of groups (scales.size(1) = ",
                    groups, ") must divide in_features = ", in_features);
  TORCH_CHECK_VALUE(zeros.sizes() == scales.sizes(), op, ": zeros must have the shape of scales ",
                    shape_str(scales.sizes()), ", got ", shape_str(zeros.sizes()));

  PackedWeight w;
  if (lut.has_value() && lut->defined()) {
    TORCH_CHECK_VALUE(bits == 4, op, ": a lookup table (lut) needs bits == 4, got bits = ", bits);
    TORCH_CHECK_TYPE(lut->scalar_type() == at::kFloat, op, ": lut must be float32, got ",
                     lut->scalar_type());
    TORCH_CHECK_VALUE(lut->dim() == 1 && lut->size(0) == 16, op,
                      ": lut must have shape [16], got ", shape_str(lut->sizes()));
    check_device(op, "lut", *lut, device);
    w.lut = lut->contiguous();
  }
  w.packed = packed.contiguous();
  w.scales = scales.contiguous();
  w.zeros = zeros.contiguous();
  w.bits = bits;
  w.in_features = in_features;
  w.out_features = n;
  w.groups = groups;
  w.group_size = in_features / groups;
  return w;
}

void check_activation(const char* op, const char* name, const at::Tensor& x, int64_t last_dim,
                      const char* last_dim_name) {
  TORCH_CHECK_TYPE(is_float_activation(x.scalar_type()), op, ": ", name,
                   " must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == last_dim, op, ": ", name,
                    " must have shape [..., ", last_dim_name, "=", last_dim, "], got ",
                    shape_str(x.sizes()));
}

at::Tensor check_perm(const char* op, const at::Tensor& perm, int64_t in_features,
                      c10::Device device, bool check_values) {
  TORCH_CHECK_TYPE(perm.scalar_type() == at::kLong, op, ": perm must be int64, got ",
                   perm.scalar_type());
  TORCH_CHECK_VALUE(perm.dim() == 1 && perm.size(0) == in_features, op,
                    ": perm must have shape [in_features=", in_features, "], got ",
                    shape_str(perm.sizes()));
  check_device(op, "perm", perm, device);
  at::Tensor p = perm.contiguous();
  if (check_values) {
    // Out-of-range or repeated entries would read past x or drop columns.
    const int64_t* v = p.const_data_ptr<int64_t>();
    std::vector<bool> seen(static_cast<size_t>(in_features), false);
    for (int64_t j = 0; j < in_features; ++j) {
      TORCH_CHECK_VALUE(v[j] >= 0 && v[j] < in_features, op, ": perm must hold indices in [0, ",
                        in_features, "), got perm[", j, "] = ", v[j]);
      TORCH_CHECK_VALUE(!seen[v[j]], op, ": perm must be a permutation, but ", v[j],
                        " appears twice");
      seen[v[j]] = true;
    }
  }
  return p;
}

at::Tensor check_bias(const char* op, const at::Tensor& bias, int64_t out_features,
                      c10::Device device) {
  TORCH_CHECK_TYPE(at::isFloatingType(bias.scalar_type()), op,
                   ": bias must be a floating-point tensor, got ", bias.scalar_type());
  TORCH_CHECK_VALUE(bias.dim() == 1 && bias.size(0) == out_features, op,
                    ": bias must have shape [out_features=", out_features, "], got ",
                    shape_str(bias.sizes()));
  check_device(op, "bias", bias, device);
  return bias.to(at::kFloat).contiguous();
}

void check_codes(const char* op, const at::Tensor& codes, int64_t bits, bool check_values) {
  check_bits(op, bits);
  TORCH_CHECK_TYPE(at::isIntegralType(codes.scalar_type(), /*includeBool=*/false), op,
                   ": codes must have an integer dtype, got ", codes.scalar_type());
  TORCH_CHECK_VALUE(codes.dim() == 2 && codes.size(1) >= 1, op,
                    ": codes must have shape [out_features, in_features], got ",
                    shape_str(codes.sizes()));
  if (check_values && codes.numel() > 0) {
    const auto [lo, hi] = at::aminmax(codes);
    const int64_t min_code = lo.item<int64_t>(), max_code = hi.item<int64_t>();
    TORCH_CHECK_VALUE(min_code >= 0 && max_code < (int64_t{1} << bits), op,
                      ": codes must lie in [0, ", (int64_t{1} << bits) - 1, "] for bits = ", bits,
                      ", got values in [", min_code, ", ", max_code, "]");
  }
}

W8A8Args check_w8a8_args(const char* op, const at::Tensor& input, const at::Tensor& packed,
                         const at::Tensor& scales, const std::optional<at::Tensor>& input_scale,
                         const std::optional<at::Tensor>& bias, double outlier_threshold) {
  TORCH_CHECK_TYPE(is_float_activation(input.scalar_type()), op,
                   ": input must be float32, float16 or bfloat16, got ", input.scalar_type());
  TORCH_CHECK_VALUE(input.dim() >= 1 && input.size(-1) >= 1, op,
                    ": input must have shape [..., in_features] with in_features >= 1, got ",
                    shape_str(input.sizes()));
  const c10::Device device = input.device();
  const int64_t k = input.size(-1);
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, op, ": packed must be uint8, got ",
                   packed.scalar_type());
  const int64_t row_bytes = layout::packed_row_bytes(k, 8);
  TORCH_CHECK_VALUE(packed.dim() == 2 && packed.size(1) == row_bytes, op,
                    ": packed must have shape [out_features, ", row_bytes,
                    "] (8-bit rows for in_features = input.size(-1) = ", k, "), got ",
                    shape_str(packed.sizes()));
  check_device(op, "packed", packed, device);
  const int64_t n = packed.size(0);
  TORCH_CHECK_TYPE(scales.scalar_type() == at::kFloat, op, ": scales must be float32, got ",
                   scales.scalar_type());
  TORCH_CHECK_VALUE(scales.dim() == 2 && scales.size(0) == n && scales.size(1) == 1, op,
                    ": scales must have shape [out_features=", n, ", 1], got ",
                    shape_str(scales.sizes()));
  check_device(op, "scales", scales, device);

  W8A8Args a;
  if (input_scale.has_value() && input_scale->defined()) {
    TORCH_CHECK_TYPE(input_scale->scalar_type() == at::kFloat, op,
                     ": input_scale must be float32, got ", input_scale->scalar_type());
    TORCH_CHECK_VALUE(input_scale->numel() == 1 && input_scale->dim() <= 1, op,
                      ": input_scale must have shape [1], got ",
                      shape_str(input_scale->sizes()));
    check_device(op, "input_scale", *input_scale, device);
    a.input_scale = input_scale->reshape({1}).contiguous();
  }
  if (bias.has_value() && bias->defined()) a.bias = check_bias(op, *bias, n, device);
  TORCH_CHECK_VALUE(outlier_threshold >= 0.0 && std::isfinite(outlier_threshold), op,
                    ": outlier_threshold must be 0 (no LLM.int8() decomposition) or positive and "
                    "finite, got ", outlier_threshold);
  TORCH_CHECK_VALUE(outlier_threshold == 0.0 || !a.input_scale.defined(), op,
                    ": outlier_threshold needs per-token activation grids (input_scale=None): the "
                    "decomposition finds each token's grid over its non-outlier values");
  a.outlier_threshold = static_cast<float>(outlier_threshold);
  a.packed = packed.contiguous();
  a.scales = scales.contiguous();
  a.in_features = k;
  a.out_features = n;
  return a;
}

void add_outlier_product(const W8A8Args& a, const at::Tensor& x, const at::Tensor& outlier_columns,
                         const at::Tensor& y) {
  // Few columns as a rule (the paper finds ~0.1% of them): gathered, not masked.
  const at::Tensor columns = outlier_columns.nonzero().flatten();
  if (columns.numel() == 0) return;
  const at::Tensor w = a.packed.index_select(1, columns).to(at::kFloat).sub_(128.0).mul_(a.scales);
  y.addmm_(x.index_select(1, columns), w.t().to(x.scalar_type()));
}

}  // namespace torchquant
