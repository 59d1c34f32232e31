// CPU kernels of the weight-only linear ops, compiled once per instruction
// set (the including file defines CPU_CAPABILITY and the matching flags).
// The op body hands over x as float32 [M, Kp], zero padded to whole chunks,
// so no chunk ever needs a tail. Two paths:
//  * GEMV (M small, memory bound; gemv_impl.h): every packed byte is read
//    once and dequantized in registers.
//  * Panels (M large, compute bound): a panel of rows is dequantized into a
//    cache-sized float buffer (dequant_rows_impl.h) and multiplied there by
//    the BLAS GEMM. The input gradient (dx = dy W) uses the same panels.
#pragma once

#include "dequant_rows_impl.h"
#include "gemv_impl.h"
#include "quantized_linear_kernel.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <cstdlib>

namespace torchquant::cpu {
namespace CPU_CAPABILITY {
namespace {

// Largest M for the GEMV path. Measured on Zen 4, two threads, 4096 x 4096
// over 8 layers: at M = 4 / 8 / 12 / 16 the GEMV takes 1.7 / 2.5 / 3.5 / 4.1 ms
// at W4 g128 against 3.2 / 3.9 / 4.6 / 5.2 ms for the panels; at W3 the two
// meet at M = 16. TORCHQUANT_GEMV_MAX_M overrides it (tests use it to send
// the same shapes down both paths).
int64_t gemv_max_rows() {
  static const int64_t value = [] {
    const char* env = std::getenv("TORCHQUANT_GEMV_MAX_M");
    return env != nullptr ? std::atoll(env) : int64_t{16};
  }();
  return value;
}

// ---- Panels -------------------------------------------------------------------

// Rows per panel: a panel of Kp floats per row fits in half of a 2 MiB L2.
int64_t panel_rows(int64_t kp) {
  const int64_t bytes = int64_t{1} << 20;
  return std::max<int64_t>(16, std::min<int64_t>(256, bytes / (kp * 4)) / 16 * 16);
}

// One panel per thread, each multiplied by a single-threaded GEMM: on two
// threads this measured faster at M = 32 and 512 than all threads decoding a
// panel and then sharing one GEMM on it (which synchronises per panel). The
// ATen calls run on OpenMP workers, which must see the caller's
// thread-local state (inference mode, grad mode, dispatch keys).
void panel_linear(const PackedWeight& pw, const at::Tensor& x, const at::Tensor& bias,
                  at::Tensor& y) {
  const Weight w(pw);
  const DecodeFn vec = vector_decoder(pw);
  const int64_t n = pw.out_features, rows = panel_rows(w.kp);
  const int64_t panels = (n + rows - 1) / rows;
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    at::ThreadLocalStateGuard guard(caller_state);
    float* buf = scratch(rows * w.kp);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * rows, r = std::min(n, n0 + rows) - n0;
      decode_rows(w, vec, n0, n0 + r, buf, w.kp);
      const at::Tensor panel = at::from_blob(buf, {r, w.kp}, x.options());
      // y[:, n0:n0+r] is a strided view (row stride N): the GEMM writes it in place.
      at::Tensor out = y.narrow(1, n0, r);
      if (bias.defined()) {
        at::addmm_out(out, bias.narrow(0, n0, r), x, panel.t());
      } else {
        at::mm_out(out, x, panel.t());
      }
    }
  });
}

}  // namespace

void quantized_linear(const PackedWeight& w, const at::Tensor& x, const at::Tensor& bias,
                      at::Tensor& y) {
  if (x.size(0) <= gemv_max_rows()) {
    gemv(w, x, bias, y);
  } else {
    panel_linear(w, x, bias, y);
  }
}

void quantized_linear_grad_input(const PackedWeight& pw, const at::Tensor& dy, at::Tensor& dx) {
  const Weight w(pw);
  const DecodeFn vec = vector_decoder(pw);
  const int64_t m = dy.size(0), n = pw.out_features, rows = panel_rows(w.kp);
  const int64_t threads = at::get_num_threads();
  const at::ThreadLocalState caller_state;
  // dx[rows] (+)= dy[rows, panel] @ panel over every panel of W, decoded into
  // the calling thread's buffer.
  auto accumulate = [&](int64_t n_begin, int64_t n_end, const at::Tensor& dy_rows,
                        at::Tensor& dx_rows, bool overwrite) {
    float* buf = scratch(rows * w.kp);
    for (int64_t n0 = n_begin; n0 < n_end; n0 += rows) {
      const int64_t r = std::min(n_end, n0 + rows) - n0;
      decode_rows(w, vec, n0, n0 + r, buf, w.kp);
      const at::Tensor panel = at::from_blob(buf, {r, w.kp}, dy.options());
      const at::Tensor dy_p = dy_rows.narrow(1, n0, r);
      if (overwrite && n0 == n_begin) {
        at::mm_out(dx_rows, dy_p, panel);
      } else {
        dx_rows.addmm_(dy_p, panel);
      }
    }
  };
  if (m >= 16 * threads) {
    // Enough rows of dy: each thread owns rows of dx and decodes W itself
    // (the decode is small next to the GEMM at this size).
    at::parallel_for(0, m, (m + threads - 1) / threads, [&](int64_t m0, int64_t m1) {
      at::ThreadLocalStateGuard guard(caller_state);
      at::Tensor dx_rows = dx.narrow(0, m0, m1 - m0);
      accumulate(0, n, dy.narrow(0, m0, m1 - m0), dx_rows, /*overwrite=*/true);
    });
    return;
  }
  // Few rows: threads split W's panels and sum private copies of dx.
  const int64_t panels = (n + rows - 1) / rows;
  const int64_t parts = std::min(threads, panels);
  at::Tensor partial = at::zeros({parts, m, w.kp}, dy.options());
  at::parallel_for(0, parts, 1, [&](int64_t t0, int64_t t1) {
    at::ThreadLocalStateGuard guard(caller_state);
    for (int64_t t = t0; t < t1; ++t) {
      at::Tensor dx_t = partial.select(0, t);
      accumulate(t * panels / parts * rows, std::min(n, (t + 1) * panels / parts * rows), dy,
                 dx_t, /*overwrite=*/false);
    }
  });
  at::sum_out(dx, partial, 0);
}

}  // namespace CPU_CAPABILITY
}  // namespace torchquant::cpu
