// Everything torchquant offers to C++ users.
#pragma once

#include "torchquant/fake_quant.h"
