// Everything torchquant offers to C++ users.
#pragma once

#include "torchquant/fake_quant.h"
#include "torchquant/gptq.h"
#include "torchquant/awq.h"
#include "torchquant/smoothquant.h"
#include "torchquant/runtime.h"
