// CPU kernel of mse_clip_search, compiled once per instruction set like the
// fake-quant kernels. One task = one (grid, candidate) pair: it fake-quantizes
// the grid's row with the candidate's scale / zero-point and sums |x^ - x|^norm.
// Tasks of one row run back to back, so the row stays in cache while all its
// candidates are scored.
#pragma once

// vec_math.h before quant_math.h (see fake_quant_kernel_impl.h).
#include "vec_math.h"

#include "../clip_search.h"
#include "../dispatch.h"
#include "../quant_math.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>

namespace torchquant::cpu {
namespace CPU_CAPABILITY {

void clip_search(const ClipSearchArgs& a, at::Tensor& err, at::Tensor& scale, at::Tensor& zero);

namespace clip_search_detail {

using VecF = at::vec::Vectorized<float>;

inline VecF error_term(const VecF& d, float norm) {
  const VecF ad = d.abs();
  return norm == 2.0f ? ad * ad : ad.pow(VecF(norm));
}

inline float error_term(float d, float norm) {
  const float ad = std::fabs(d);
  return norm == 2.0f ? ad * ad : std::pow(ad, norm);
}

// Sum of |fake_quantize(x) - x|^norm over one row; accumulated in float
// vectors, then in double across blocks so long rows keep their precision.
template <typename scalar_t>
double row_error(const scalar_t* x, int64_t n, const QuantGrid<float>& gs, float norm) {
  constexpr int64_t kBlock = 4096;
  const QuantGrid<VecF> gv{VecF(gs.scale), VecF(gs.inv_scale), VecF(gs.zero), VecF(gs.qmin),
                           VecF(gs.qmax)};
  double total = 0.0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    VecF acc(0.0f);
    int64_t i = b;
    if constexpr (std::is_same_v<scalar_t, float>) {
      for (; i + VecF::size() <= e; i += VecF::size()) {
        const VecF xv = VecF::loadu(x + i);
        acc = acc + error_term(fake_quantize_value(xv, gv) - xv, norm);
      }
    }
    float partial = at::vec::vec_reduce_all<float>(
        [](const VecF& p, const VecF& q) { return p + q; }, acc);
    for (; i < e; ++i) {
      const float xf = static_cast<float>(x[i]);
      partial += error_term(fake_quantize_value(xf, gs) - xf, norm);
    }
    total += partial;
  }
  return total;
}

}  // namespace clip_search_detail

void clip_search(const ClipSearchArgs& a, at::Tensor& err, at::Tensor& scale, at::Tensor& zero) {
  const int64_t grids = a.rows.size(0);
  const int64_t n = a.rows.size(1);
  const float* lo = a.lo.const_data_ptr<float>();
  const float* hi = a.hi.const_data_ptr<float>();
  float* e_out = err.mutable_data_ptr<float>();
  float* s_out = scale.mutable_data_ptr<float>();
  float* z_out = zero.mutable_data_ptr<float>();
  const int64_t tasks = grids * a.steps;
  // Aim for ~64K element visits per parallel chunk.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, n));

  TORCHQUANT_DISPATCH_FLOAT_TYPES(a.rows.scalar_type(), "torchquant.mse_clip_search", [&] {
    const scalar_t* rows = a.rows.const_data_ptr<scalar_t>();
    at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t g = t / a.steps;
        const int64_t k = t % a.steps;
        const float shrink = candidate_shrink(k, a.steps, a.max_shrink);
        float s, z;
        grid_from_range(lo[g] * shrink, hi[g] * shrink, a.quant_min, a.quant_max, a.symmetric,
                        kMinScale, &s, &z);
        const QuantGrid<float> gs{s, 1.0f / s, z, a.quant_min, a.quant_max};
        e_out[t] = static_cast<float>(
            clip_search_detail::row_error<scalar_t>(rows + g * n, n, gs, a.norm));
        s_out[t] = s;
        z_out[t] = z;
      }
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace torchquant::cpu
