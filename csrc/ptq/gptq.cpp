// GPTQ (Frantar et al. 2022, Algorithm 1) for one layer, in ATen so that the
// same code runs on every device; only the inner column loop of a block is a
// kernel (gptq_block.h). The steps, with the paper's code's semantics:
//
//  1. Dead inputs (zero Hessian diagonal: the input was always 0): the
//     weights of those columns are zeroed and their diagonal set to 1.
//  2. Grids, one per (row, group) or per row without groups, of the weights
//     with dead columns zeroed (a dead input does not widen a grid): min/max,
//     or the MSE-best shrunk range (the mse_clip_search op). With
//     static_groups all grids come up front from the weights in their
//     original order; otherwise a group's grid is taken when the block
//     containing its first column starts, from the weights as they are then
//     (every earlier block's error feedback applied, none of the current
//     block's).
//  3. act_order: columns by decreasing Hessian diagonal.
//  4. Cholesky of H + damp * I, with more damping when it fails
//     (gptq_damped_cholesky.h); when it always fails, an error, or
//     round-to-nearest with rtn_fallback.
//  5. Blocks of block_size columns: the earlier blocks' error feedback
//     reaches a block as one GEMM, and the block kernel quantizes its columns
//     one by one with the feedback of the block's own earlier columns.
//  6. The loss tr((W - Q) H (W - Q)^T) / 2 with the undamped H.
//
// One factorization instead of the paper's three. The paper's code takes
// U, the upper Cholesky factor of (H + damp I)^-1, quantizes column j, and
// subtracts err_j * U[j, j+1:] from the later columns, err_j = (w_j - q_j) /
// U_jj. Summing those updates, W - Q = Err U, so with M = U^-1 (upper,
// M M^T = H + damp I):
//
//   Err = (W - Q) M,   err_j = sum_{i<=j} E_i M_ij          (E = W - Q)
//   w_j = q_j + err_j U_jj = W_j + (sum_{i<j} E_i M_ij) / M_jj,
//
// the weight column j holds when it is quantized. So M, the Cholesky factor
// itself, is what the algorithm needs: no inverse, no second factorization,
// and the lazy block update becomes the feedback F = E[:, :b0] @ M[:b0, b0:b1],
// with the same flops as the paper's. (Between columns, the weights are not
// W + F / diag(M): after the first b0 columns, column c >= b0 holds
// W_c + (F M[b0:, b0:]^-1)_c. Only a grid taken at the start of a block needs
// them, and gets them from a triangular solve with a diagonal block of M.)
// The loss comes from the same quantities:
//
//   tr(E (H + damp I) E^T) = ||E M||^2 = ||Err||^2
//   loss = (||Err||^2 - damp ||E||^2) / 2,
//
// exact for the undamped H (dead columns have E = 0 and zero Hessian rows),
// summed in float64: no extra O(out * in^2) product. Only the
// round-to-nearest fallback, which has no factor, multiplies by H.
//
// Precision: the matrix work is float32, the factorization included (the
// damping retries cover what float32 cannot factorize); the loss terms are
// summed in float64 per row. Against the definition evaluated in float64 the
// loss agrees to about 1e-5 relative, also on near-singular Hessians.
#include "gptq.h"

#include "gptq_args.h"
#include "gptq_block.h"
#include "gptq_grids.h"
#include "gptq_damped_cholesky.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace torchquant::ptq {
namespace {

// TORCHQUANT_GPTQ_BLOCK=aten runs the ATen column loop on CPU too, so that
// the version other devices use is tested where no GPU is.
GptqBlockKernel block_kernel_for(const at::Tensor& w) {
  const char* forced = std::getenv("TORCHQUANT_GPTQ_BLOCK");
  const bool force_aten = forced != nullptr && std::string(forced) == "aten";
  if (w.device().is_cpu() && !force_aten) return cpu_gptq_block_kernel();
  return &gptq_block_aten;
}

std::string list_dampings(const std::vector<double>& tried) {
  std::ostringstream os;
  for (size_t i = 0; i < tried.size(); ++i) os << (i ? ", " : "") << tried[i];
  return os.str();
}

// Integer codes of dequantized values on their own grids: exact, since
// (code - zero) * scale * (1 / scale) is within a few ulps of an integer of at
// most 16 bits. `q` is [rows, k * g] with group j of every row on grid column j.
at::Tensor codes_of(const at::Tensor& q, const at::Tensor& scales, const at::Tensor& zeros,
                    int64_t g) {
  const int64_t rows = q.size(0);
  const int64_t k = scales.size(1);
  return at::round(q.view({rows, k, g}) * at::reciprocal(scales).unsqueeze(2))
      .add_(zeros.unsqueeze(2))
      .view({rows, k * g})
      .to(at::kInt);
}

}  // namespace

GptqOutputs gptq_quantize(
    const at::Tensor& weight,
    const at::Tensor& hessian,
    int64_t quant_min,
    int64_t quant_max,
    bool symmetric,
    std::optional<int64_t> group_size,
    bool act_order,
    bool static_groups,
    int64_t block_size,
    double percdamp,
    int64_t clip_search_steps,
    double clip_max_shrink,
    bool rtn_fallback,
    const std::string& layer_name) {
  const std::string ctx = gptq_context(layer_name);
  check_gptq_options(ctx, weight, hessian, quant_min, quant_max, symmetric, group_size,
                     static_groups, block_size, percdamp, clip_search_steps, clip_max_shrink);
  check_gptq_values(ctx, weight, hessian);

  const int64_t rows = weight.size(0);
  const int64_t cols = weight.size(1);
  const int64_t g = group_size.value_or(cols);
  const int64_t n_groups = cols / g;
  const auto f32 = weight.options().dtype(at::kFloat);
  const GridOptions grid_options{quant_min, quant_max, symmetric, clip_search_steps,
                                 clip_max_shrink};
  // The weights in float32; in processing order from step 3 on.
  at::Tensor w = weight.to(f32, /*non_blocking=*/false, /*copy=*/true,
                           at::MemoryFormat::Contiguous);

  // 1. Dead inputs (their diagonal is set below, on the copy of the Hessian
  // that is factorized).
  at::Tensor dead = hessian.diagonal() == 0;
  const bool any_dead = dead.any().item<bool>();
  w.masked_fill_(dead, 0.0);

  // 2. Static grids, in the original column order.
  at::Tensor scales = at::empty({rows, n_groups}, f32);
  at::Tensor zeros = at::empty({rows, n_groups}, f32);
  if (static_groups) {
    auto [s, z] = group_grids(w, g, grid_options);
    scales.copy_(s);
    zeros.copy_(z);
  }

  // 3. Processing order, the grid group of each processed column, and the
  // group of each original column (g_idx, as GPTQ checkpoints store it).
  std::vector<int64_t> group_of_column(cols);
  at::Tensor g_idx_host = at::empty({cols}, at::kInt);
  int32_t* g_idx = g_idx_host.mutable_data_ptr<int32_t>();
  at::Tensor perm;
  at::Tensor h = hessian;  // a copy wherever it is changed
  if (act_order) {
    // Dead columns count with their diagonal of 1, as in the paper's code.
    perm = at::argsort(hessian.diagonal().masked_fill(dead, 1.0), /*stable=*/true, /*dim=*/0,
                       /*descending=*/true);
    w = w.index_select(1, perm);
    h = hessian.index({perm.unsqueeze(1), perm});  // one gather: H[perm][:, perm]
    dead = dead.index_select(0, perm);
    const at::Tensor perm_host = perm.cpu();
    const int64_t* p = perm_host.const_data_ptr<int64_t>();
    for (int64_t j = 0; j < cols; ++j) {
      if (static_groups) {
        group_of_column[j] = p[j] / g;
        g_idx[j] = static_cast<int32_t>(j / g);
      } else {
        group_of_column[j] = j / g;
        g_idx[p[j]] = static_cast<int32_t>(j / g);
      }
    }
  } else {
    for (int64_t j = 0; j < cols; ++j) {
      group_of_column[j] = j / g;
      g_idx[j] = static_cast<int32_t>(j / g);
    }
  }

  if (any_dead) {
    if (!act_order) h = hessian.clone(at::MemoryFormat::Contiguous);
    h.diagonal().masked_fill_(dead, 1.0);
  }

  // 4. The factor M of the damped Hessian.
  at::Tensor chol;
  double damp = -1.0;
  {
    HessianFactor factor = damped_upper_cholesky(h, percdamp);
    if (factor.ok()) {
      chol = std::move(factor.upper);
      damp = factor.damp;
    } else {
      const std::string tried = list_dampings(factor.tried);
      TORCH_CHECK_LINALG(
          rtn_fallback, ctx,
          ": the damped Hessian is not positive definite; Cholesky failed with every damping "
          "tried (", tried, ", i.e. percdamp=", percdamp,
          " times 10^k of the mean diagonal, up to 1x). Use a larger percdamp, more (or more "
          "varied) calibration data, or rtn_fallback=True to round this layer to nearest.");
      TORCH_WARN(ctx, ": the damped Hessian is not positive definite (damping tried: ", tried,
                 "); falling back to round-to-nearest for this layer (damp = -1).");
    }
  }
  // Round to nearest: M = I, so no column feeds back into another.
  const bool rtn = !chol.defined();
  if (rtn) {
    chol = at::eye(cols, f32);
    // The loss needs the undamped Hessian (dead diagonals back to 0).
    if (any_dead) h.diagonal().masked_fill_(dead, 0.0);
  } else {
    h = at::Tensor();
  }

  // 5. The column loop, and 6. the loss terms, block by block. The columns
  // of w become the errors E = W - Q as the blocks complete.
  at::Tensor q = at::empty({rows, cols}, f32);
  const GptqBlockKernel kernel = block_kernel_for(w);
  GptqBlock block;
  block.w = w;
  block.chol = chol;
  block.scales = scales;
  block.zeros = zeros;
  block.group_of_column = group_of_column.data();
  block.group_size = g;
  block.symmetric = symmetric;
  block.q = q;
  block.row_sums = at::zeros({rows, 2}, f32.dtype(at::kDouble));
  block.quant_min = static_cast<float>(quant_min);
  block.quant_max = static_cast<float>(quant_max);
  for (int64_t b0 = 0; b0 < cols; b0 += block_size) {
    const int64_t b1 = std::min(cols, b0 + block_size);
    // The groups whose first column is in this block get their grids now;
    // the feedback must then reach their last column.
    int64_t first_group = 0;
    int64_t new_groups = 0;
    int64_t reach = b1;
    if (!static_groups) {
      first_group = (b0 + g - 1) / g;
      new_groups = std::max<int64_t>(0, (b1 - 1) / g + 1 - first_group);
      if (new_groups > 0) reach = std::max(reach, (first_group + new_groups) * g);
    }
    // The lazy update: feedback = E[:, :b0] @ M[:b0, b0:reach].
    block.feedback = b0 > 0 && !rtn
        ? at::mm(w.narrow(1, 0, b0), chol.narrow(0, 0, b0).narrow(1, b0, reach - b0))
        : at::Tensor();
    block.grid_weights = at::Tensor();
    if (new_groups > 0) {
      // The weights as the earlier blocks' updates left them: the paper's
      // subtractions amount to W + feedback @ M[b0:reach, b0:reach]^-1 (see
      // above; the block's own diagonal block of U = M^-1).
      const int64_t c0 = first_group * g;
      const int64_t width = new_groups * g;
      at::Tensor current = w.narrow(1, c0, width);
      if (block.feedback.defined()) {
        const at::Tensor m = chol.narrow(0, b0, reach - b0).narrow(1, b0, reach - b0);
        current = current + at::linalg_solve_triangular(m, block.feedback, /*upper=*/true,
                                                        /*left=*/false)
                                .narrow(1, c0 - b0, width);
      }
      if (clip_search_steps > 0) {
        auto [s, z] = group_grids(current, g, grid_options);
        scales.narrow(1, first_group, new_groups).copy_(s);
        zeros.narrow(1, first_group, new_groups).copy_(z);
      } else {
        // Min/max grids: the block takes them itself.
        block.grid_weights = current;
        block.first_new_group = first_group;
      }
    }
    block.begin = b0;
    block.end = b1;
    kernel(block);
  }
  at::Tensor loss;
  if (rtn) {
    loss = 0.5 * at::mul(at::mm(w, h), w).sum(at::kDouble);
  } else {
    // Per-row sums in float64 (independent of the number of threads).
    const at::Tensor totals = block.row_sums.sum(0);
    loss = 0.5 * (totals[0] - damp * totals[1]);
  }
  block = GptqBlock();
  chol = at::Tensor();
  w = h = at::Tensor();

  // Codes where each group's columns are consecutive (processing order
  // without static groups, the original order with them), then everything
  // in the original column order.
  at::Tensor codes;
  if (act_order) {
    const at::Tensor inverse = at::argsort(perm);
    if (static_groups) {
      q = q.index_select(1, inverse);
      codes = codes_of(q, scales, zeros, g);
    } else {
      codes = codes_of(q, scales, zeros, g).index_select(1, inverse);
      q = q.index_select(1, inverse);
    }
  } else {
    codes = codes_of(q, scales, zeros, g);
  }
  return {q.to(weight.scalar_type()),
          codes,
          scales,
          zeros,
          g_idx_host.to(weight.device()),
          loss.to(at::kFloat),
          at::scalar_tensor(damp, f32)};
}

}  // namespace torchquant::ptq
