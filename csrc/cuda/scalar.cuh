// Float conversions and dtype dispatch for the CUDA kernels: every computation is float32.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../common/dtype.h"

namespace fastforget {

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Calls fn with a null pointer of the CUDA type that `dtype` names, to pick a template instance.
template <typename Fn>
void dispatch(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: fn(static_cast<float*>(nullptr)); break;
    case DType::kFloat16: fn(static_cast<__half*>(nullptr)); break;
    case DType::kBFloat16: fn(static_cast<__nv_bfloat16*>(nullptr)); break;
  }
}

}  // namespace fastforget
