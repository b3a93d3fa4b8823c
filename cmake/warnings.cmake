# Compiler warnings for every target this project defines (libraries and programs; imported targets
# and the headers of dependencies excluded), applied once all targets exist.
#
#   MEMBANK_WARNINGS     -Wall -Wextra -Wshadow (+ -Wpedantic on the engine library)     default ON
#   MEMBANK_WCONVERSION  -Wconversion as well (implicit narrowing of values)            default OFF
#   MEMBANK_WERROR       warnings are errors                                            default OFF
#
# CI (.ci/sanitizers) builds with MEMBANK_WCONVERSION and MEMBANK_WERROR on, with GCC and clang:
# the project's code has no implicit narrowing; a conversion that narrows on purpose is written as a
# static_cast.
option(MEMBANK_WARNINGS "Compile this project's targets with -Wall -Wextra -Wshadow" ON)
option(MEMBANK_WCONVERSION "Add -Wconversion to this project's warnings" OFF)
option(MEMBANK_WERROR "Treat warnings in this project's targets as errors" OFF)

function(_membank_collect_targets dir out)
  get_property(_targets DIRECTORY ${dir} PROPERTY BUILDSYSTEM_TARGETS)
  get_property(_subdirs DIRECTORY ${dir} PROPERTY SUBDIRECTORIES)
  foreach(_sub IN LISTS _subdirs)
    _membank_collect_targets(${_sub} _more)
    list(APPEND _targets ${_more})
  endforeach()
  set(${out} ${_targets} PARENT_SCOPE)
endfunction()

function(membank_apply_warnings)
  if(NOT MEMBANK_WARNINGS)
    return()
  endif()
  set(_flags -Wall -Wextra -Wshadow)
  if(MEMBANK_WCONVERSION)
    list(APPEND _flags -Wconversion)
  endif()
  if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
    # GCC 12 reports Eigen's vectorised kernels (inlined into our code) as maybe-uninitialized: a
    # known false positive that no source change of ours can silence.
    list(APPEND _flags -Wno-maybe-uninitialized)
  endif()
  if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU" AND CMAKE_CXX_COMPILER_VERSION VERSION_LESS 12.3 AND MEMBANK_SANITIZE)
    # GCC 12.2's avx512fintrin.h reports its own _mm512_undefined_* values as used uninitialised once
    # Eigen's AVX-512 kernels are inlined into sanitizer-instrumented -O1 code (fixed in later GCCs).
    list(APPEND _flags -Wno-uninitialized)
  endif()
  if(CMAKE_CXX_COMPILER_ID MATCHES "Clang")
    # Some targets name GCC-only warning switches (-Wno-maybe-uninitialized) in their own options.
    list(APPEND _flags -Wno-unknown-warning-option)
    # `#pragma omp simd` is a request: at -O1 under TSan clang may leave such a loop scalar and says
    # so (-Wpass-failed); that changes speed, never results.
    list(APPEND _flags -Wno-pass-failed)
  endif()
  # Eigen's AVX-512 packet types carry alignment attributes that GCC ignores in template arguments.
  list(APPEND _flags -Wno-ignored-attributes)
  if(MEMBANK_WERROR)
    list(APPEND _flags -Werror)
  endif()
  _membank_collect_targets(${PROJECT_SOURCE_DIR} _targets)
  foreach(_t IN LISTS _targets)
    get_target_property(_type ${_t} TYPE)
    if(NOT _type MATCHES "^(EXECUTABLE|STATIC_LIBRARY|SHARED_LIBRARY|MODULE_LIBRARY|OBJECT_LIBRARY)$")
      continue()
    endif()
    target_compile_options(${_t} PRIVATE "$<$<COMPILE_LANGUAGE:CXX>:${_flags}>")
    if(_t STREQUAL "membank_engine")
      target_compile_options(${_t} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-Wpedantic>)
    endif()
  endforeach()
endfunction()

# Runs when the top-level CMakeLists.txt has been read to its end: every subdirectory's targets exist.
cmake_language(DEFER DIRECTORY ${PROJECT_SOURCE_DIR} CALL membank_apply_warnings)
