# Sanitizer and fuzzing builds (see docs/sanitizers.md and docs/fuzzing.md).
#
#   -DMEMBANK_SANITIZE=address,undefined   AddressSanitizer + UndefinedBehaviorSanitizer (gcc or clang)
#   -DMEMBANK_SANITIZE=thread              ThreadSanitizer: clang with LLVM's OpenMP runtime (libomp)
#   -DMEMBANK_BUILD_FUZZ=ON                the fuzz targets in fuzz/: libFuzzer programs with clang, corpus
#                                          replayers (a CTest test per target) with gcc
#
# The flags go to every target of this project (compile and link), nothing to a parent project.
# UBSan findings abort (-fno-sanitize-recover), so a test that triggers one fails.
set(MEMBANK_SANITIZE "" CACHE STRING "Sanitizers to build with: address,undefined | thread | empty for none")
option(MEMBANK_BUILD_FUZZ "Build the fuzz targets (fuzz/) and their corpus-replay tests" OFF)

if(MEMBANK_SANITIZE)
  string(REPLACE "," ";" _membank_san_list "${MEMBANK_SANITIZE}")
  foreach(_s IN LISTS _membank_san_list)
    if(NOT _s MATCHES "^(address|undefined|thread|leak)$")
      message(FATAL_ERROR "MEMBANK_SANITIZE: expected a comma-separated list of address, undefined, leak, thread; "
                          "got \"${MEMBANK_SANITIZE}\" (\"${_s}\" is not one of them)")
    endif()
  endforeach()
  if("thread" IN_LIST _membank_san_list)
    if(NOT _membank_san_list STREQUAL "thread")
      message(FATAL_ERROR "MEMBANK_SANITIZE: thread cannot be combined with other sanitizers (got \"${MEMBANK_SANITIZE}\")")
    endif()
    # GCC's libgomp is not instrumented: TSan reports its barriers as races. LLVM's libomp, with the
    # archer tool loaded at run time (OMP_TOOL_LIBRARIES=.../libarcher.so), tells TSan what OpenMP orders.
    if(NOT CMAKE_CXX_COMPILER_ID MATCHES "Clang")
      message(FATAL_ERROR "MEMBANK_SANITIZE=thread needs clang and LLVM's OpenMP runtime (libomp), not "
                          "${CMAKE_CXX_COMPILER_ID}: configure with -DCMAKE_CXX_COMPILER=clang++-14 -DCMAKE_C_COMPILER=clang-14")
    endif()
  endif()
  add_compile_options(-fsanitize=${MEMBANK_SANITIZE} -fno-omit-frame-pointer)
  add_link_options(-fsanitize=${MEMBANK_SANITIZE})
  if("undefined" IN_LIST _membank_san_list)
    # float -> integer conversions out of range are undefined behaviour but not in GCC's "undefined" group.
    add_compile_options(-fsanitize=float-cast-overflow -fno-sanitize-recover=all)
    add_link_options(-fsanitize=float-cast-overflow)
  endif()
  if("address" IN_LIST _membank_san_list)
    # libstdc++'s own bounds checks (operator[], front(), ...): cheap, and they name the container.
    add_compile_definitions(_GLIBCXX_ASSERTIONS)
  endif()
  if(CMAKE_CXX_COMPILER_ID MATCHES "Clang" AND "undefined" IN_LIST _membank_san_list)
    # clang links the C++ part of the UBSan runtime (vptr checks) only when asked.
    add_link_options(-fsanitize-link-c++-runtime)
  endif()
endif()

if(MEMBANK_BUILD_FUZZ AND CMAKE_CXX_COMPILER_ID MATCHES "Clang")
  # Coverage feedback for libFuzzer in every translation unit; the fuzz targets add -fsanitize=fuzzer
  # (libFuzzer's main) themselves.
  add_compile_options(-fsanitize=fuzzer-no-link)
endif()
