// The diffusion family's step inputs on the CPU (../common/diffusion_inputs.h): one pass over
// each image writes the student's and the teacher's.
#pragma once
#include <cstdint>

#include "../common/diffusion_inputs.h"

namespace fastforget {

// Images [begin, end).
void diffusion_inputs_images(const DiffusionInputsArgs& a, int64_t begin, int64_t end);

}  // namespace fastforget
