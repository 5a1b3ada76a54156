// Argument checks shared by every op: each message names the argument.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#define NBRETR_CHECK_ARG(cond, op, ...) TORCH_CHECK(cond, "nbretr.", op, ": ", __VA_ARGS__)
