// One block of GPTQ's column loop: quantize columns [begin, end) of the
// weights one after the other, each column first receiving the error
// feedback of every column before it (Frantar et al. 2022, Algorithm 1, the
// inner loop). The caller (gptq.cpp) supplies the feedback of the earlier
// blocks (one GEMM) and either the grids, or the weights to take min/max
// grids from.
//
// In terms of M (upper triangular, M M^T = H + damp I) and the quantization
// errors E = W - Q of the columns already done, column j is quantized at
//
//   w_j = W_j + (sum_{i<j} E_i M_ij) / M_jj
//
// which is the weight the paper's column-by-column updates leave in column j
// (see gptq.cpp); err_j = sum_{i<=j} E_i M_ij is the paper's scaled error.
//
// Once the grids are known every row is independent: row r needs only its
// own weights, its own grids and the shared rows of M. The CPU kernel
// exploits that (one row of the block at a time, in cache); the ATen version
// works on whole columns and serves every other device.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace torchquant::ptq {

struct GptqBlock {
  // [rows, cols] float32, contiguous, columns in processing order: the
  // weights (dead columns zeroed). The block reads columns [begin, end) and
  // overwrites them with their errors E = W - Q.
  at::Tensor w;
  // [cols, cols] float32, contiguous: M, in processing order.
  at::Tensor chol;
  // [rows, width] float32, contiguous, width >= end - begin: column t is
  // sum_{i<begin} E_i M_{i, begin + t}, the feedback of the earlier blocks
  // (only the first end - begin columns are read). Undefined means zero (the
  // first block, or round-to-nearest).
  at::Tensor feedback;
  // [rows, groups] float32, contiguous: the grid of every (row, group).
  at::Tensor scales;
  at::Tensor zeros;
  // Host array, [cols]: the group (column of `scales`) of each column.
  const int64_t* group_of_column = nullptr;
  // When defined, [rows, new_groups * group_size] float32 with unit column
  // stride: the weights of the groups whose first column is in [begin, end),
  // as they are when the block starts (group first_new_group + t in columns
  // [t * group_size, (t + 1) * group_size)). The block first writes their
  // min/max grids to scales / zeros.
  at::Tensor grid_weights;
  int64_t first_new_group = 0;
  int64_t group_size = 0;
  bool symmetric = true;
  // [rows, cols] float32, contiguous: receives the dequantized columns [begin, end).
  at::Tensor q;
  // [rows, 2] float64, contiguous: row r accumulates, over the block's
  // columns, err_j^2 (over all blocks: row r's share of the damped loss
  // tr(E (H + damp I) E^T)) and E_j^2.
  at::Tensor row_sums;
  int64_t begin = 0;
  int64_t end = 0;
  float quant_min = 0.0f;
  float quant_max = 0.0f;
};

using GptqBlockKernel = void (*)(const GptqBlock& block);

// Column by column with ATen ops (the quantization through the fake_quantize
// op): any device.
void gptq_block_aten(const GptqBlock& block);

// One row of the block at a time, vectorized over the remaining columns; the
// build for the instruction set the fake-quant kernels use (see cpu/).
GptqBlockKernel cpu_gptq_block_kernel();

}  // namespace torchquant::ptq
