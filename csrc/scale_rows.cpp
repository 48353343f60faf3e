// kdfast::scale_rows, the backward of distill_fwd. Device-generic (ATen's mul_out does the
// arithmetic on CPU and CUDA); its own op only so the output buffer comes from empty_output.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "op_common.h"

namespace kdfast {
namespace {

at::Tensor scale_rows(const at::Tensor& grad, const at::Tensor& row_scale, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(grad.dim() == 2 && row_scale.dim() == 1 && row_scale.size(0) == grad.size(0),
                    "scale_rows: grad must be (N, C) and row_scale (N,), got ", grad.sizes(),
                    " and ", row_scale.sizes());
  at::Tensor out = empty_output(grad.sizes(), grad.options().dtype(dtype));
  // The product is computed in the promoted dtype of grad and row_scale (float32 or float64)
  // and cast once into out's dtype.
  at::mul_out(out, grad, row_scale.unsqueeze(1));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CompositeExplicitAutograd, m) { m.impl("scale_rows", &scale_rows); }

}  // namespace kdfast
