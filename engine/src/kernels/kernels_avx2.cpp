// The avx2 path of the hot kernels, compiled with -march=x86-64-v3 (AVX2, FMA) (engine/CMakeLists.txt).
// Eigen lives in a namespace of its own here, so no instance of it can be shared with another path.
#define MEMBANK_KERNEL_NS avx2
#define Eigen membank_eigen_avx2
#include "kernels/kernels_impl.hpp"
