#include "fake_quant_args.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <sstream>

namespace torchquant {
namespace {

// Widest range the ops accept: 16-bit signed or unsigned codes.
constexpr int64_t kLowestQuantMin = -(int64_t{1} << 15);
constexpr int64_t kHighestQuantMax = (int64_t{1} << 16) - 1;
// At least 2 bits (4 levels), at most 16 bits (65536 levels).
constexpr int64_t kMinLevels = 4;
constexpr int64_t kMaxLevels = int64_t{1} << 16;

bool is_supported_input_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << s;
  return os.str();
}

void check_range(const char* op, int64_t quant_min, int64_t quant_max) {
  TORCH_CHECK_VALUE(
      quant_min < quant_max, op, ": quant_min must be less than quant_max, got quant_min=",
      quant_min, " and quant_max=", quant_max);
  TORCH_CHECK_VALUE(
      quant_min >= kLowestQuantMin && quant_max <= kHighestQuantMax, op,
      ": [quant_min, quant_max] must fit a signed or unsigned 16-bit code (within [",
      kLowestQuantMin, ", ", kHighestQuantMax, "]), got [", quant_min, ", ", quant_max, "]");
  const int64_t levels = quant_max - quant_min + 1;
  TORCH_CHECK_VALUE(
      levels >= kMinLevels && levels <= kMaxLevels, op,
      ": [quant_min, quant_max] must span 2 to 16 bits (4 to 65536 levels), got [", quant_min,
      ", ", quant_max, "] with ", levels, " levels");
}

}  // namespace

GridShape check_grid_args(
    const char* op,
    const at::Tensor& input,
    int64_t quant_min,
    int64_t quant_max,
    std::optional<int64_t> axis,
    std::optional<int64_t> group_size) {
  TORCH_CHECK_TYPE(
      is_supported_input_dtype(input.scalar_type()), op,
      ": input must be float32, float16 or bfloat16, got ", input.scalar_type());
  check_range(op, quant_min, quant_max);

  GridShape grid;
  const int64_t dim = input.dim();
  if (group_size.has_value()) {
    grid.granularity = "per-group";
    const int64_t g = *group_size;
    TORCH_CHECK_VALUE(g > 0, op, ": group_size must be positive, got ", g);
    TORCH_CHECK_VALUE(dim >= 1, op, ": per-group quantization needs an input with at least one dimension");
    TORCH_CHECK_VALUE(
        !axis.has_value() || *axis == -1 || *axis == dim - 1, op,
        ": per-group quantization groups the last dimension; axis must be None or -1, got ",
        *axis);
    const int64_t last = input.size(-1);
    TORCH_CHECK_VALUE(
        last % g == 0, op, ": group_size (", g, ") must divide the last dimension of input (",
        last, ")");
    grid.per_grid_shape = input.sizes().vec();
    grid.per_grid_shape.back() = last / g;
    grid.layout = ChannelLayout{1, input.numel() / g, g};
  } else if (axis.has_value()) {
    grid.granularity = "per-channel";
    TORCH_CHECK_VALUE(dim >= 1, op, ": per-channel quantization needs an input with at least one dimension");
    const int64_t a = *axis;
    TORCH_CHECK_VALUE(
        a >= -dim && a < dim, op, ": axis must be in [", -dim, ", ", dim - 1,
        "] for an input with ", dim, " dimensions, got ", a);
    const int64_t ax = a < 0 ? a + dim : a;
    const auto sizes = input.sizes();
    grid.layout = ChannelLayout{
        c10::multiply_integers(sizes.begin(), sizes.begin() + ax), sizes[ax],
        c10::multiply_integers(sizes.begin() + ax + 1, sizes.end())};
    grid.per_grid_shape = {sizes[ax]};
  } else {
    grid.per_grid_shape = {1};
    grid.layout = ChannelLayout{1, 1, input.numel()};
  }
  return grid;
}

void check_per_grid_tensor(const char* op, const char* name, const at::Tensor& t,
                           const at::Tensor& input, const GridShape& grid) {
  TORCH_CHECK_VALUE(
      t.device() == input.device(), op, ": ", name, " must be on the same device as input (",
      input.device(), "), got ", t.device());
  const at::IntArrayRef expected(grid.per_grid_shape);
  // A per-tensor grid may be given as a 0-d or a 1-element tensor.
  const bool single = t.numel() == 1 && c10::multiply_integers(expected) == 1 && expected.size() <= 1;
  TORCH_CHECK_VALUE(
      t.sizes() == expected || single, op, ": for ", grid.granularity,
      " quantization of an input of shape ", shape_str(input.sizes()), ", ", name,
      " must have shape ", shape_str(expected), ", got ", shape_str(t.sizes()));
}

FakeQuantArgs prepare_fake_quant_args(
    const char* op,
    const at::Tensor& input,
    const at::Tensor& scale,
    const at::Tensor& zero_point,
    int64_t quant_min,
    int64_t quant_max,
    std::optional<int64_t> axis,
    std::optional<int64_t> group_size) {
  const GridShape grid = check_grid_args(op, input, quant_min, quant_max, axis, group_size);
  TORCH_CHECK_TYPE(
      scale.scalar_type() == at::kFloat, op, ": scale must be float32, got ",
      scale.scalar_type());
  TORCH_CHECK_TYPE(
      zero_point.scalar_type() == at::kFloat || zero_point.scalar_type() == at::kInt ||
          zero_point.scalar_type() == at::kLong,
      op, ": zero_point must be float32, int32 or int64, got ", zero_point.scalar_type());
  check_per_grid_tensor(op, "scale", scale, input, grid);
  check_per_grid_tensor(op, "zero_point", zero_point, input, grid);

  FakeQuantArgs args;
  args.layout = grid.layout;
  args.input = input.contiguous();
  args.scale = scale.contiguous().view({-1});
  // Round half to even, like torch.round and the forward of PyTorch's own
  // learnable fake-quant; an out-of-range result is rejected by the value check.
  args.zero = zero_point.scalar_type() == at::kFloat
      ? zero_point.round().contiguous().view({-1})
      : zero_point.to(at::kFloat).contiguous().view({-1});
  args.quant_min = static_cast<float>(quant_min);
  args.quant_max = static_cast<float>(quant_max);
  return args;
}

at::Tensor prepare_grad_output(const char* op, const at::Tensor& grad_output, const at::Tensor& input) {
  TORCH_CHECK_VALUE(
      grad_output.sizes() == input.sizes(), op, ": grad_output must have the shape of input ",
      shape_str(input.sizes()), ", got ", shape_str(grad_output.sizes()));
  TORCH_CHECK_VALUE(
      grad_output.device() == input.device(), op,
      ": grad_output must be on the same device as input (", input.device(), "), got ",
      grad_output.device());
  // A gradient of another dtype (e.g. fp32 grads flowing into a bf16 graph
  // under autocast) is converted rather than rejected.
  return grad_output.to(input.scalar_type()).contiguous();
}

void check_qparam_values_on_host(const char* op, const FakeQuantArgs& args) {
  const float* s = args.scale.const_data_ptr<float>();
  const float* z = args.zero.const_data_ptr<float>();
  const int64_t n = args.scale.numel();
  for (int64_t c = 0; c < n; ++c) {
    TORCH_CHECK_VALUE(
        s[c] > 0.0f && std::isfinite(s[c]), op,
        ": scale must be positive and finite, got scale[", c, "] = ", s[c]);
    TORCH_CHECK_VALUE(
        std::isfinite(z[c]) && z[c] >= args.quant_min && z[c] <= args.quant_max, op,
        ": zero_point must round to a value in [quant_min, quant_max] = [", args.quant_min,
        ", ", args.quant_max, "], got zero_point[", c, "] rounding to ", z[c]);
  }
}

}  // namespace torchquant
