// The few C++ and OpenMP runtime functions that a current GCC's headers and code generation
// call but that are newer than what libmxnet.so needs (GLIBCXX_3.4.19, CXXABI_1.3.7, GOMP_1.0),
// defined here from older ones, as devtoolset's libstdc++_nonshared.a does for manylinux
// builds. Compiled into portable builds only, with -D_GLIBCXX_USE_CXX11_ABI=0 (the pre-GCC-5
// std::string, which the old libstdc++ exports) and -fno-sized-deallocation
// (operator delete(void*, size_t) is CXXABI_1.3.9); the linker version script keeps all of
// them local. tests/test_portability.py checks the result against libmxnet.so.
#include <cstdarg>
#include <cstdio>
#include <new>
#include <stdexcept>
#include <string>

namespace std {

// GLIBCXX_3.4.21 (GCC 5): the const char* constructor, as the std::string one (GLIBCXX_3.4).
runtime_error::runtime_error(const char* what) : runtime_error(std::string(what)) {}

// GLIBCXX_3.4.29 (GCC 11): called by std::allocator<T>::allocate for an impossible size.
void __throw_bad_array_new_length() { throw std::bad_alloc(); }

// GLIBCXX_3.4.20 (GCC 4.9): the bounds-check messages of at() and substr().
void __throw_out_of_range_fmt(const char* format, ...) {
  char message[512];
  va_list args;
  va_start(args, format);
  std::vsnprintf(message, sizeof(message), format, args);
  va_end(args);
  throw std::out_of_range(std::string(message));  // the const char* one is GLIBCXX_3.4.21
}

}  // namespace std

extern "C" {

// GLIBC_2.32: libstdc++'s headers read this glibc flag to skip the atomic reference counts
// of the old std::string in a single-threaded process. Here it always says "maybe threads":
// the counts are atomic, as they are with any glibc before 2.32.
char __libc_single_threaded = 0;

void GOMP_parallel_start(void (*fn)(void*), void* data, unsigned num_threads);
void GOMP_parallel_end(void);

// GOMP_4.0 (GCC 4.9): what `#pragma omp parallel` compiles to. libgomp implements it as exactly
// these three steps; `flags` carries a proc_bind clause, which mxlamb never uses.
void GOMP_parallel(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags) {
  (void)flags;
  GOMP_parallel_start(fn, data, num_threads);
  fn(data);
  GOMP_parallel_end();
}

}  // extern "C"
