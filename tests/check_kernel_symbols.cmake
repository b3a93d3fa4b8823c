# The per-instruction-set kernel objects must define no symbol that another object could define too
# (the linker would keep one copy, compiled for whichever instruction set, for every caller: see
# engine/src/kernels/kernels.hpp). Lists the external symbols each one defines (nm) and fails on any
# whose name does not carry that object's own namespace (membank::kernels::<isa> or membank_eigen_<isa>).
# One exception: DW.ref.__gxx_personality_v0, a data word every C++ object with exception tables
# defines, holding the address of the C++ runtime's personality routine: the same value everywhere.
# Usage: cmake -DNM=<nm> -DOBJECTS=<obj;obj;...> -P check_kernel_symbols.cmake
set(checked 0)
foreach(obj IN LISTS OBJECTS)
  if(NOT obj MATCHES "kernels_(scalar|avx2|avx512)\\.cpp\\.o$")
    continue()
  endif()
  set(isa ${CMAKE_MATCH_1})
  execute_process(COMMAND ${NM} --defined-only --extern-only -C ${obj} OUTPUT_VARIABLE out RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${NM} failed on ${obj}")
  endif()
  string(REPLACE "\n" ";" lines "${out}")
  set(n 0)
  foreach(line IN LISTS lines)
    if(line STREQUAL "")
      continue()
    endif()
    math(EXPR n "${n} + 1")
    if(NOT line MATCHES "membank::kernels::${isa}::" AND NOT line MATCHES "membank_eigen_${isa}"
       AND NOT line MATCHES " DW\\.ref\\.__gxx_personality_v0$")
      message(FATAL_ERROR "${obj} defines a symbol outside its own namespaces (it could replace another "
                          "object's copy at link time): ${line}")
    endif()
  endforeach()
  message(STATUS "kernels_${isa}: ${n} external symbols, all in its own namespaces")
  math(EXPR checked "${checked} + 1")
endforeach()
if(checked EQUAL 0)
  message(FATAL_ERROR "no kernels_<isa>.cpp.o among the objects given: nothing checked")
endif()
