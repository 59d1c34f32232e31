// The one dtype switch of the project: float32, float16 and bfloat16 inputs,
// math in float32. Anything else is a TypeError naming the op.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#define TORCHQUANT_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                         \
  [&] {                                                                          \
    switch (TYPE) {                                                              \
      case c10::ScalarType::Float: {                                             \
        using scalar_t = float;                                                  \
        return __VA_ARGS__();                                                    \
      }                                                                          \
      case c10::ScalarType::Half: {                                              \
        using scalar_t = c10::Half;                                              \
        return __VA_ARGS__();                                                    \
      }                                                                          \
      case c10::ScalarType::BFloat16: {                                          \
        using scalar_t = c10::BFloat16;                                          \
        return __VA_ARGS__();                                                    \
      }                                                                          \
      default:                                                                   \
        TORCH_CHECK_TYPE(false, NAME, ": expected a float32, float16 or bfloat16 input, got ", \
                         TYPE);                                                  \
    }                                                                            \
  }()
