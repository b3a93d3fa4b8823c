// libmembank.so: every object of the static library, linked whole (engine/CMakeLists.txt). CMake
// needs one source of the shared library's own; this is it.
