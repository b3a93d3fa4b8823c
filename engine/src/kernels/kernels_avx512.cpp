// The avx512 path of the hot kernels, compiled with -march=x86-64-v4 (AVX-512 F/BW/CD/DQ/VL) (engine/CMakeLists.txt).
// Eigen lives in a namespace of its own here, so no instance of it can be shared with another path.
#define MEMBANK_KERNEL_NS avx512
#define Eigen membank_eigen_avx512
#include "kernels/kernels_impl.hpp"
