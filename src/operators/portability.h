// Included first into every file of a portable build (setup.py passes -include; see
// portability.cc for the other half): the library must load wherever MXNet's own wheel does,
// and libmxnet.so needs no more than GLIBC_2.14, GLIBCXX_3.4.19, CXXABI_1.3.7 and GOMP_1.0.
//
// glibc 2.27 and 2.29 gave expf/logf/powf/exp2f/log2f and exp/log/pow/exp2/log2 new symbol
// versions when they dropped the SVID error handling (matherr). The computation behind both
// versions is the same, and so is every result outside the error cases (pow(beta, t) checked
// on 4M arguments): the calls bind to the old versions. A directive for a function a file does
// not call changes nothing.
#ifndef MXLAMB_PORTABILITY_H_
#define MXLAMB_PORTABILITY_H_

#if defined(__x86_64__) && defined(__linux__)
__asm__(".symver exp,exp@GLIBC_2.2.5");
__asm__(".symver exp2,exp2@GLIBC_2.2.5");
__asm__(".symver log,log@GLIBC_2.2.5");
__asm__(".symver log2,log2@GLIBC_2.2.5");
__asm__(".symver pow,pow@GLIBC_2.2.5");
__asm__(".symver expf,expf@GLIBC_2.2.5");
__asm__(".symver exp2f,exp2f@GLIBC_2.2.5");
__asm__(".symver logf,logf@GLIBC_2.2.5");
__asm__(".symver log2f,log2f@GLIBC_2.2.5");
__asm__(".symver powf,powf@GLIBC_2.2.5");
#endif

#endif  // MXLAMB_PORTABILITY_H_
