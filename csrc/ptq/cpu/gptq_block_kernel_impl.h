// CPU kernel of one GPTQ block (see ../gptq_block.h), compiled once per
// instruction set like the fake-quant kernels.
//
// A task is a run of rows. For each row the block's feedback sums
// (end - begin floats) stay in L1 while its columns are processed in order:
// quantize w_j = W_j + acc_j / M_jj on the row's grid, store E_j = W_j - q_j,
// then acc[j+1:] += E_j * M[j, j+1:end] with vectors. The rows of M read by the
// block (an [n, n] triangle) are shared by all tasks and stay in L2.
//
// The grids are quant_math.h's grid_from_range and the quantization its
// fake_quantize_value: the element math of the fake-quantize ops and of
// mse_clip_search. Every product is rounded before it is added, in the vector
// body and the scalar tail alike (the build forbids FMA contraction), so the
// baseline and AVX2 builds give the same bits.
#pragma once

// vec_math.h before quant_math.h (see csrc/cpu/fake_quant_kernel_impl.h).
#include "../../cpu/vec_math.h"

#include "../../clip_search.h"
#include "../../quant_math.h"
#include "../gptq_block.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <vector>

namespace torchquant::ptq::cpu {
namespace CPU_CAPABILITY {

void gptq_block(const GptqBlock& b);

namespace gptq_detail {

// The min/max grid of each new group of one row.
inline void row_grids(const GptqBlock& b, const float* src, float* scales, float* zeros) {
  const int64_t g = b.group_size;
  const int64_t count = b.grid_weights.size(1) / g;
  for (int64_t t = 0; t < count; ++t) {
    const float* x = src + t * g;
    float lo = x[0];
    float hi = x[0];
    for (int64_t c = 1; c < g; ++c) {
      lo = std::min(lo, x[c]);
      hi = std::max(hi, x[c]);
    }
    grid_from_range(lo, hi, b.quant_min, b.quant_max, b.symmetric, kMinScale,
                    scales + b.first_new_group + t, zeros + b.first_new_group + t);
  }
}

}  // namespace gptq_detail

void gptq_block(const GptqBlock& b) {
  using VecF = at::vec::Vectorized<float>;
  TORCH_INTERNAL_ASSERT(b.w.is_contiguous() && b.chol.is_contiguous() && b.q.is_contiguous() &&
                        b.scales.is_contiguous() && b.zeros.is_contiguous() &&
                        b.row_sums.is_contiguous() &&
                        (!b.feedback.defined() || b.feedback.is_contiguous()) &&
                        (!b.grid_weights.defined() || b.grid_weights.stride(1) == 1));
  const int64_t rows = b.w.size(0);
  const int64_t cols = b.w.size(1);
  const int64_t n = b.end - b.begin;
  const int64_t groups = b.scales.size(1);
  float* w = b.w.mutable_data_ptr<float>();
  float* q = b.q.mutable_data_ptr<float>();
  float* scales = b.scales.mutable_data_ptr<float>();
  float* zeros = b.zeros.mutable_data_ptr<float>();
  double* row_sums = b.row_sums.mutable_data_ptr<double>();
  const float* chol = b.chol.const_data_ptr<float>();
  const float* feedback = b.feedback.defined() ? b.feedback.const_data_ptr<float>() : nullptr;
  const int64_t feedback_stride = b.feedback.defined() ? b.feedback.size(1) : 0;
  const float* grid_weights =
      b.grid_weights.defined() ? b.grid_weights.const_data_ptr<float>() : nullptr;
  const int64_t grid_stride = b.grid_weights.defined() ? b.grid_weights.stride(0) : 0;
  const int64_t* group_of_column = b.group_of_column;
  const float qmin = b.quant_min;
  const float qmax = b.quant_max;
  // About n^2 / 2 multiply-adds per row: aim for ~64K per task.
  const int64_t grain = std::max<int64_t>(1, 131072 / std::max<int64_t>(1, n * n));

  at::parallel_for(0, rows, grain, [&](int64_t row_begin, int64_t row_end) {
    std::vector<float> acc_buffer(n);
    float* acc = acc_buffer.data();
    for (int64_t r = row_begin; r < row_end; ++r) {
      float* wr = w + r * cols;
      float* qr = q + r * cols;
      if (grid_weights != nullptr) {
        gptq_detail::row_grids(b, grid_weights + r * grid_stride, scales + r * groups,
                               zeros + r * groups);
      }
      const float* fr = feedback != nullptr ? feedback + r * feedback_stride : nullptr;
      for (int64_t t = 0; t < n; ++t) acc[t] = fr != nullptr ? fr[t] : 0.0f;
      double err_squares = 0.0;
      double e_squares = 0.0;
      int64_t grid_group = -1;
      QuantGrid<float> grid{};
      for (int64_t i = 0; i < n; ++i) {
        const int64_t j = b.begin + i;
        // With act_order and static groups, consecutive columns may belong to
        // different groups; otherwise the grid changes once per group.
        const int64_t k = group_of_column[j];
        if (k != grid_group) {
          const float s = scales[r * groups + k];
          grid = QuantGrid<float>{s, 1.0f / s, zeros[r * groups + k], qmin, qmax};
          grid_group = k;
        }
        // Row j of M, from column `begin` on.
        const float* m = chol + j * cols + b.begin;
        const float x = wr[j] + acc[i] / m[i];
        const float xq = fake_quantize_value(x, grid);
        const float e = wr[j] - xq;
        const float err = acc[i] + e * m[i];
        err_squares += static_cast<double>(err) * err;
        e_squares += static_cast<double>(e) * e;
        qr[j] = xq;
        wr[j] = e;
        const VecF ev(e);
        int64_t t = i + 1;
        for (; t + VecF::size() <= n; t += VecF::size()) {
          (VecF::loadu(acc + t) + ev * VecF::loadu(m + t)).store(acc + t);
        }
        for (; t < n; ++t) {
          acc[t] = acc[t] + e * m[t];
        }
      }
      row_sums[2 * r] += err_squares;
      row_sums[2 * r + 1] += e_squares;
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace torchquant::ptq::cpu
