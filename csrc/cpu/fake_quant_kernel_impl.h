// CPU kernels of the fake-quantize ops, written once over
// at::vec::Vectorized and compiled once per instruction set: the including
// file defines CPU_CAPABILITY (and the matching compiler flags).
//
// Work decomposition. The input is viewed as [outer, channels, inner]
// (see ChannelLayout). When inner > 1 every run of `inner` consecutive
// elements shares one quantization grid, so the kernels walk runs with the
// grid broadcast into vector registers. When inner == 1 (per-channel on the
// last dimension) the grid changes every element, so the kernels walk rows of
// `channels` elements with the grids loaded as vectors.
//
// The learnable backward reads input and grad_output once, writes grad_input
// and reduces the scale / zero-point terms in registers; each task writes one
// partial sum per channel it touched into a small buffer whose layout depends
// only on the shape, so the result does not depend on the thread count.
#pragma once

// vec_math.h must come before quant_math.h: the templates there find the
// Vectorized overloads by ordinary lookup at their point of definition.
#include "vec_math.h"

#include "../dispatch.h"
#include "../quant_math.h"
#include "fake_quant_kernel.h"
#include "huge_pages.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <vector>

namespace torchquant::cpu {
namespace CPU_CAPABILITY {

using VecF = at::vec::Vectorized<float>;

// Elements per parallel task: large enough to amortise scheduling, small
// enough to balance two to a few dozen threads on a 4096 x 4096 tensor.
constexpr int64_t kGrainElements = 32768;
// Longest run reduced into one partial sum.
constexpr int64_t kPieceElements = 16384;
// Row blocks of the inner == 1 learnable backward (fixed, for determinism).
constexpr int64_t kMaxRowBlocks = 64;

// Loads / stores one block of input elements as float vectors.
template <typename scalar_t>
struct FloatBlock {
  using VecS = at::vec::Vectorized<scalar_t>;
  static constexpr int64_t kSize = VecS::size();
  static constexpr int kVecs = 2;
  static void load(const scalar_t* p, VecF* v) {
    auto [lo, hi] = at::vec::convert_to_float<scalar_t>(VecS::loadu(p));
    v[0] = lo;
    v[1] = hi;
  }
  static void store(scalar_t* p, const VecF* v) {
    at::vec::convert_from_float<scalar_t>(v[0], v[1]).store(p);
  }
};

template <>
struct FloatBlock<float> {
  static constexpr int64_t kSize = VecF::size();
  static constexpr int kVecs = 1;
  static void load(const float* p, VecF* v) { v[0] = VecF::loadu(p); }
  static void store(float* p, const VecF* v) { v[0].store(p); }
};

QuantGrid<float> scalar_grid(const FakeQuantArgs& a, const float* scale, const float* zero,
                             int64_t c) {
  return QuantGrid<float>{scale[c], 1.0f / scale[c], zero[c], a.quant_min, a.quant_max};
}

QuantGrid<VecF> broadcast_grid(const QuantGrid<float>& g) {
  return QuantGrid<VecF>{VecF(g.scale), VecF(g.inv_scale), VecF(g.zero), VecF(g.qmin),
                         VecF(g.qmax)};
}

// Calls fn(begin, end, channel) for every maximal run of [begin, end) that
// shares one channel.
template <typename Fn>
void for_each_run(const ChannelLayout& l, int64_t begin, int64_t end, const Fn& fn) {
  int64_t i = begin;
  while (i < end) {
    const int64_t seg = i / l.inner;
    const int64_t run_end = std::min(end, (seg + 1) * l.inner);
    fn(i, run_end, seg % l.channels);
    i = run_end;
  }
}

// Applies an elementwise map y = f(x[, dy]) over the tensor. `vec_fn` and
// `scalar_fn` take (x, dy, grid) and return the output value.
template <typename scalar_t, typename VecFn, typename ScalarFn>
void map_elements(const FakeQuantArgs& a, const scalar_t* x, const scalar_t* dy, scalar_t* y,
                  const VecFn& vec_fn, const ScalarFn& scalar_fn) {
  using Block = FloatBlock<scalar_t>;
  const float* scale = a.scale.const_data_ptr<float>();
  const float* zero = a.zero.const_data_ptr<float>();
  const ChannelLayout l = a.layout;
  const int64_t numel = a.input.numel();

  if (l.inner == 1 && l.channels > 1) {
    // Grids vary along the contiguous dimension: walk rows of `channels`.
    std::vector<float> inv(l.channels);
    for (int64_t c = 0; c < l.channels; ++c) inv[c] = 1.0f / scale[c];
    const int64_t grain = std::max<int64_t>(1, kGrainElements / l.channels);
    at::parallel_for(0, l.outer, grain, [&](int64_t row_begin, int64_t row_end) {
      for (int64_t r = row_begin; r < row_end; ++r) {
        const int64_t off = r * l.channels;
        int64_t c = 0;
        for (; c + Block::kSize <= l.channels; c += Block::kSize) {
          VecF xv[Block::kVecs], dv[Block::kVecs], out[Block::kVecs];
          Block::load(x + off + c, xv);
          if (dy) Block::load(dy + off + c, dv);
          for (int k = 0; k < Block::kVecs; ++k) {
            const int64_t cc = c + k * VecF::size();
            const QuantGrid<VecF> g{VecF::loadu(scale + cc), VecF::loadu(inv.data() + cc),
                                    VecF::loadu(zero + cc), VecF(a.quant_min),
                                    VecF(a.quant_max)};
            out[k] = vec_fn(xv[k], dy ? dv[k] : VecF(0.0f), g);
          }
          Block::store(y + off + c, out);
        }
        for (; c < l.channels; ++c) {
          const QuantGrid<float> g{scale[c], inv[c], zero[c], a.quant_min, a.quant_max};
          y[off + c] = static_cast<scalar_t>(scalar_fn(
              static_cast<float>(x[off + c]), dy ? static_cast<float>(dy[off + c]) : 0.0f, g));
        }
      }
    });
    return;
  }

  at::parallel_for(0, numel, kGrainElements, [&](int64_t begin, int64_t end) {
    for_each_run(l, begin, end, [&](int64_t rb, int64_t re, int64_t c) {
      const QuantGrid<float> gs = scalar_grid(a, scale, zero, c);
      const QuantGrid<VecF> gv = broadcast_grid(gs);
      int64_t i = rb;
      for (; i + Block::kSize <= re; i += Block::kSize) {
        VecF xv[Block::kVecs], dv[Block::kVecs], out[Block::kVecs];
        Block::load(x + i, xv);
        if (dy) Block::load(dy + i, dv);
        for (int k = 0; k < Block::kVecs; ++k) {
          out[k] = vec_fn(xv[k], dy ? dv[k] : VecF(0.0f), gv);
        }
        Block::store(y + i, out);
      }
      for (; i < re; ++i) {
        y[i] = static_cast<scalar_t>(scalar_fn(
            static_cast<float>(x[i]), dy ? static_cast<float>(dy[i]) : 0.0f, gs));
      }
    });
  });
}

void forward(const FakeQuantArgs& a, at::Tensor& out) {
  advise_huge_pages(out);
  TORCHQUANT_DISPATCH_FLOAT_TYPES(a.input.scalar_type(), "torchquant_fake_quantize_cpu", [&] {
    map_elements<scalar_t>(
        a, a.input.const_data_ptr<scalar_t>(), nullptr, out.mutable_data_ptr<scalar_t>(),
        [](const VecF& x, const VecF&, const QuantGrid<VecF>& g) {
          return fake_quantize_value(x, g);
        },
        [](float x, float, const QuantGrid<float>& g) { return fake_quantize_value(x, g); });
  });
}

void ste_backward(const FakeQuantArgs& a, const at::Tensor& grad_output, at::Tensor& grad_input) {
  advise_huge_pages(grad_input);
  TORCHQUANT_DISPATCH_FLOAT_TYPES(a.input.scalar_type(), "torchquant_fake_quantize_backward_cpu", [&] {
    map_elements<scalar_t>(
        a, a.input.const_data_ptr<scalar_t>(), grad_output.const_data_ptr<scalar_t>(),
        grad_input.mutable_data_ptr<scalar_t>(),
        [](const VecF& x, const VecF& dy, const QuantGrid<VecF>& g) { return ste_grad(x, dy, g); },
        [](float x, float dy, const QuantGrid<float>& g) { return ste_grad(x, dy, g); });
  });
}

// Reduces one run [rb, re) of a single channel: writes dx, returns the sums of
// the scale and zero-point terms.
template <typename scalar_t>
std::pair<float, float> learnable_run(const scalar_t* x, const scalar_t* dy, scalar_t* dx,
                                      int64_t rb, int64_t re, const QuantGrid<float>& gs) {
  using Block = FloatBlock<scalar_t>;
  const QuantGrid<VecF> gv = broadcast_grid(gs);
  VecF acc_s(0.0f), acc_z(0.0f);
  int64_t i = rb;
  for (; i + Block::kSize <= re; i += Block::kSize) {
    VecF xv[Block::kVecs], dv[Block::kVecs], out[Block::kVecs];
    Block::load(x + i, xv);
    Block::load(dy + i, dv);
    for (int k = 0; k < Block::kVecs; ++k) {
      const LearnableGrads<VecF> gr = learnable_grads(xv[k], dv[k], gv);
      out[k] = gr.dx;
      acc_s = acc_s + gr.dscale;
      acc_z = acc_z + gr.dzero;
    }
    Block::store(dx + i, out);
  }
  float sum_s = at::vec::vec_reduce_all<float>(
      [](const VecF& p, const VecF& q) { return p + q; }, acc_s);
  float sum_z = at::vec::vec_reduce_all<float>(
      [](const VecF& p, const VecF& q) { return p + q; }, acc_z);
  for (; i < re; ++i) {
    const LearnableGrads<float> gr =
        learnable_grads(static_cast<float>(x[i]), static_cast<float>(dy[i]), gs);
    dx[i] = static_cast<scalar_t>(gr.dx);
    sum_s += gr.dscale;
    sum_z += gr.dzero;
  }
  return {sum_s, sum_z};
}

// inner == 1: rows of `channels` elements, grids loaded as vectors; each row
// block accumulates per-channel sums in a local buffer.
template <typename scalar_t>
at::Tensor learnable_backward_rows(const FakeQuantArgs& a, const scalar_t* x, const scalar_t* dy,
                                   scalar_t* dx) {
  using Block = FloatBlock<scalar_t>;
  const ChannelLayout l = a.layout;
  const float* scale = a.scale.const_data_ptr<float>();
  const float* zero = a.zero.const_data_ptr<float>();
  std::vector<float> inv(l.channels);
  for (int64_t c = 0; c < l.channels; ++c) inv[c] = 1.0f / scale[c];

  const int64_t blocks = std::min(l.outer, kMaxRowBlocks);
  const int64_t rows_per_block = (l.outer + blocks - 1) / blocks;
  at::Tensor partial = at::zeros({2, blocks, l.channels, 1}, a.scale.options());
  float* ps = partial.mutable_data_ptr<float>();
  float* pz = ps + blocks * l.channels;

  const int64_t grain = std::max<int64_t>(1, kGrainElements / (rows_per_block * l.channels));
  at::parallel_for(0, blocks, grain, [&](int64_t b_begin, int64_t b_end) {
    for (int64_t b = b_begin; b < b_end; ++b) {
      float* acc_s = ps + b * l.channels;
      float* acc_z = pz + b * l.channels;
      const int64_t r_end = std::min(l.outer, (b + 1) * rows_per_block);
      for (int64_t r = b * rows_per_block; r < r_end; ++r) {
        const int64_t off = r * l.channels;
        int64_t c = 0;
        for (; c + Block::kSize <= l.channels; c += Block::kSize) {
          VecF xv[Block::kVecs], dv[Block::kVecs], out[Block::kVecs];
          Block::load(x + off + c, xv);
          Block::load(dy + off + c, dv);
          for (int k = 0; k < Block::kVecs; ++k) {
            const int64_t cc = c + k * VecF::size();
            const QuantGrid<VecF> g{VecF::loadu(scale + cc), VecF::loadu(inv.data() + cc),
                                    VecF::loadu(zero + cc), VecF(a.quant_min),
                                    VecF(a.quant_max)};
            const LearnableGrads<VecF> gr = learnable_grads(xv[k], dv[k], g);
            out[k] = gr.dx;
            (VecF::loadu(acc_s + cc) + gr.dscale).store(acc_s + cc);
            (VecF::loadu(acc_z + cc) + gr.dzero).store(acc_z + cc);
          }
          Block::store(dx + off + c, out);
        }
        for (; c < l.channels; ++c) {
          const QuantGrid<float> g{scale[c], inv[c], zero[c], a.quant_min, a.quant_max};
          const LearnableGrads<float> gr = learnable_grads(
              static_cast<float>(x[off + c]), static_cast<float>(dy[off + c]), g);
          dx[off + c] = static_cast<scalar_t>(gr.dx);
          acc_s[c] += gr.dscale;
          acc_z[c] += gr.dzero;
        }
      }
    }
  });
  return partial;
}

// inner > 1: runs split into pieces of at most kPieceElements; one partial
// sum per piece, laid out [2, outer, channels, pieces].
template <typename scalar_t>
at::Tensor learnable_backward_runs(const FakeQuantArgs& a, const scalar_t* x, const scalar_t* dy,
                                   scalar_t* dx) {
  const ChannelLayout l = a.layout;
  const float* scale = a.scale.const_data_ptr<float>();
  const float* zero = a.zero.const_data_ptr<float>();
  const int64_t piece = std::min(l.inner, kPieceElements);
  const int64_t pieces = (l.inner + piece - 1) / piece;
  const int64_t segments = l.outer * l.channels;
  const int64_t tasks = segments * pieces;
  at::Tensor partial = at::empty({2, l.outer, l.channels, pieces}, a.scale.options());
  float* ps = partial.mutable_data_ptr<float>();
  float* pz = ps + tasks;

  const int64_t grain = std::max<int64_t>(1, kGrainElements / piece);
  at::parallel_for(0, tasks, grain, [&](int64_t t_begin, int64_t t_end) {
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t seg = t / pieces;
      const int64_t k = t % pieces;
      const int64_t rb = seg * l.inner + k * piece;
      const int64_t re = std::min(rb + piece, (seg + 1) * l.inner);
      const auto [s, z] =
          learnable_run<scalar_t>(x, dy, dx, rb, re, scalar_grid(a, scale, zero, seg % l.channels));
      ps[t] = s;
      pz[t] = z;
    }
  });
  return partial;
}

at::Tensor learnable_backward(const FakeQuantArgs& a, const at::Tensor& grad_output,
                              at::Tensor& grad_input) {
  advise_huge_pages(grad_input);
  at::Tensor partial;
  TORCHQUANT_DISPATCH_FLOAT_TYPES(a.input.scalar_type(), "torchquant_fake_quantize_learnable_backward_cpu", [&] {
    const scalar_t* x = a.input.const_data_ptr<scalar_t>();
    const scalar_t* dy = grad_output.const_data_ptr<scalar_t>();
    scalar_t* dx = grad_input.mutable_data_ptr<scalar_t>();
    partial = (a.layout.inner == 1 && a.layout.channels > 1)
        ? learnable_backward_rows<scalar_t>(a, x, dy, dx)
        : learnable_backward_runs<scalar_t>(a, x, dy, dx);
  });
  return partial;
}

}  // namespace CPU_CAPABILITY
}  // namespace torchquant::cpu
