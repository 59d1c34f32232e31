// GPTQ's inner loop with ATen ops, one column at a time: the version for
// every device without a hand-written kernel (CUDA included). The grids come
// from the mse_clip_search op and each column is quantized by the
// fake_quantize op, so every device uses the same element math
// (quant_math.h).
#include "gptq_block.h"

#include "gptq_grids.h"
#include "torchquant/fake_quant.h"

#include <ATen/ATen.h>

namespace torchquant::ptq {

void gptq_block_aten(const GptqBlock& b) {
  const int64_t rows = b.w.size(0);
  const int64_t n = b.end - b.begin;
  const auto qmin = static_cast<int64_t>(b.quant_min);
  const auto qmax = static_cast<int64_t>(b.quant_max);
  if (b.grid_weights.defined()) {
    GridOptions options;
    options.quant_min = qmin;
    options.quant_max = qmax;
    options.symmetric = b.symmetric;
    auto [s, z] = group_grids(b.grid_weights, b.group_size, options);
    b.scales.narrow(1, b.first_new_group, s.size(1)).copy_(s);
    b.zeros.narrow(1, b.first_new_group, z.size(1)).copy_(z);
  }
  // Contiguous copies of the block, as in the paper's code: columns of a
  // [rows, n] matrix are far less strided than columns of the whole layer.
  at::Tensor w1 = b.w.narrow(1, b.begin, n).clone();
  at::Tensor q1 = at::empty_like(w1);
  at::Tensor err = at::empty_like(w1);
  at::Tensor acc = b.feedback.defined() ? b.feedback.narrow(1, 0, n).clone()
                                        : at::zeros({rows, n}, w1.options());
  for (int64_t i = 0; i < n; ++i) {
    const int64_t j = b.begin + i;
    const int64_t k = b.group_of_column[j];
    const at::Tensor m = b.chol.select(0, j).narrow(0, j, n - i);  // M[j, j:end]
    const at::Tensor m_jj = m.select(0, 0);
    const at::Tensor a = acc.select(1, i);
    const at::Tensor w_col = w1.select(1, i);
    const at::Tensor xq = torchquant::fake_quantize(
        w_col + a / m_jj, b.scales.select(1, k), b.zeros.select(1, k), qmin, qmax, /*axis=*/0);
    const at::Tensor e = w_col - xq;
    err.select(1, i).copy_(a + e * m_jj);
    q1.select(1, i).copy_(xq);
    w_col.copy_(e);
    if (i + 1 < n) {
      // acc[:, i+1:] += e (outer) M[j, j+1:end]
      acc.narrow(1, i + 1, n - i - 1).addr_(e, m.narrow(0, 1, n - i - 1));
    }
  }
  b.w.narrow(1, b.begin, n).copy_(w1);
  b.q.narrow(1, b.begin, n).copy_(q1);
  b.row_sums.select(1, 0).add_(err.square().sum(1, /*keepdim=*/false, at::kDouble));
  b.row_sums.select(1, 1).add_(w1.square().sum(1, /*keepdim=*/false, at::kDouble));
}

}  // namespace torchquant::ptq
