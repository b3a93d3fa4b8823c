// The scalar path of the hot kernels, compiled with the library's baseline flags (engine/CMakeLists.txt).
// Eigen lives in a namespace of its own here, so no instance of it can be shared with another path.
#define MEMBANK_KERNEL_NS scalar
#define Eigen membank_eigen_scalar
#include "kernels/kernels_impl.hpp"
