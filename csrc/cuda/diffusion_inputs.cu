// The student's and the routed teacher's inputs in one launch: grid (chunks, images); an image's
// first chunks copy its condition into both outputs, the rest compute its noisy channels.
#include "diffusion_inputs.h"
#include "scalar.cuh"

namespace fastforget {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 4 * kThreads;  // elements per block

int64_t chunks(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

template <typename T, typename N>
__global__ void __launch_bounds__(kThreads) inputs_kernel(DiffusionInputsArgs a, int64_t cond_chunks) {
  const int64_t b = blockIdx.y, s = a.positions;
  const int64_t cond = a.cond_channels * s, noisy = a.channels * s;
  T* student = static_cast<T*>(a.student) + b * (cond + noisy);
  T* teacher = static_cast<T*>(a.teacher) + b * (cond + noisy);
  if (blockIdx.x < cond_chunks) {  // the condition, as it is, into both
    const T* y_cond = static_cast<const T*>(a.y_cond) + b * cond;
    const int64_t end = min(int64_t(blockIdx.x + 1) * kChunk, cond);
    for (int64_t i = int64_t(blockIdx.x) * kChunk + threadIdx.x; i < end; i += kThreads) {
      const T v = y_cond[i];
      student[i] = v;
      teacher[i] = v;
    }
    return;
  }
  const float gamma = a.gammas[b], keep = sqrtf(gamma), blend = sqrtf(1.0f - gamma);
  const bool forget = a.is_forget[b] != 0;
  const T* y_0 = static_cast<const T*>(a.y_0) + b * noisy;
  const N* given = a.noise ? static_cast<const N*>(a.noise) + b * noisy : nullptr;
  const uint64_t seed = uint64_t(a.stream[0]), first = uint64_t(a.stream[1]) + uint64_t(b * noisy);
  const uint8_t* mask = a.mask + b * a.mask_channels * s;
  const int64_t begin = (int64_t(blockIdx.x) - cond_chunks) * kChunk, end = min(begin + kChunk, noisy);
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const float y = to_f(y_0[i]);
    const float eps = given ? to_f(given[i]) : normal_noise(first + uint64_t(i), seed);
    const bool hole = mask[a.mask_channels == 1 ? i % s : i] != 0;
    const float x_t = keep * y + blend * eps;
    student[cond + i] = from_f<T>(hole ? x_t : y);
    teacher[cond + i] = from_f<T>(hole ? (forget ? eps : x_t) : y);
  }
}

}  // namespace

cudaError_t launch_diffusion_inputs(const DiffusionInputsArgs& a, cudaStream_t stream) {
  const int64_t cond_chunks = chunks(a.cond_channels * a.positions);
  const dim3 grid(unsigned(cond_chunks + chunks(a.channels * a.positions)), unsigned(a.batch));
  dispatch(a.dtype, [&](auto* tag) {
    dispatch(a.noise_dtype, [&](auto* noise_tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      using N = std::remove_pointer_t<decltype(noise_tag)>;
      inputs_kernel<T, N><<<grid, kThreads, 0, stream>>>(a, cond_chunks);
    });
  });
  return cudaGetLastError();
}

}  // namespace fastforget
