// The floating dtypes the kernels take, as plain integers across the torch-free boundary.
#pragma once

namespace fastforget {
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
}  // namespace fastforget
