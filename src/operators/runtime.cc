// Run-time choices of the CPU library: the instruction-set level and the thread count, and
// the small C interface through which mxlamb/_library.py and the tests read them, force a
// level or a count, and read the MXNet version the library was built for.
#include <sched.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "lamb_kernels.h"
#include "multi_tensor.h"

namespace mxlamb {
namespace {

// The levels lamb_kernels.cc is compiled for (setup.py's ISA_FLAGS), by the names MXLAMB_ISA
// and mxlamb_set_isa take, best first.
enum class Isa { kAvx512, kAvx2, kBaseline };
struct IsaName {
  Isa isa;
  const char* name;
};
constexpr IsaName kLevels[] = {{Isa::kAvx512, "avx512"}, {Isa::kAvx2, "avx2"},
                               {Isa::kBaseline, "baseline"}};

bool cpu_has(Isa isa) {
  __builtin_cpu_init();
  switch (isa) {
    case Isa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") &&
             __builtin_cpu_supports("fma");
    case Isa::kBaseline:
      return true;
  }
  return false;
}

// A level's table is built the first time the CPU is known to have it: kernels_avx2() and
// kernels_avx512() are compiled with -mavx2/-mavx512f, so even their few instructions that fill
// the table may be VEX or EVEX code, an illegal instruction on a CPU without AVX.
const KernelTable* table_for(Isa isa) {
  if (!cpu_has(isa)) return nullptr;
  switch (isa) {
    case Isa::kAvx512: {
      static const KernelTable avx512 = kernels_avx512();
      return &avx512;
    }
    case Isa::kAvx2: {
      static const KernelTable avx2 = kernels_avx2();
      return &avx2;
    }
    case Isa::kBaseline:
      break;
  }
  static const KernelTable baseline = kernels_baseline();
  return &baseline;
}

// The table of the level a name names, if the CPU has it; else nullptr.
const KernelTable* table_named(const char* name) {
  for (const IsaName& level : kLevels) {
    if (std::strcmp(name, level.name) == 0) return table_for(level.isa);
  }
  return nullptr;
}

const KernelTable* best_table() {
  for (const IsaName& level : kLevels) {
    if (const KernelTable* t = table_for(level.isa)) return t;
  }
  return nullptr;  // unreachable: baseline is always there
}

// MXLAMB_ISA names a level to use instead of the best one (tests force each level with it).
// A level the CPU lacks is an error at load, reported by mxlamb_isa_error().
std::string isa_error;

const KernelTable* initial_table() {
  const char* forced = std::getenv("MXLAMB_ISA");
  if (forced == nullptr || *forced == '\0') return best_table();
  if (const KernelTable* t = table_named(forced)) return t;
  isa_error = std::string("MXLAMB_ISA=") + forced +
              " is not available on this CPU (choose from: baseline, avx2, avx512, "
              "as the CPU supports)";
  return best_table();
}

const KernelTable* active = initial_table();

int cpus_available() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return CPU_COUNT(&set);
  return 1;
}

int env_int(const char* name) {
  const char* s = std::getenv(name);
  if (s == nullptr) return 0;
  const int v = std::atoi(s);  // OMP_NUM_THREADS may be a list "4,2": the first level counts
  return v > 0 ? v : 0;
}

// The cores the user gave the process: MXLAMB_NUM_THREADS, else OMP_NUM_THREADS, else every
// CPU of the affinity mask. (MXNet's own operators use half the cores when OMP_NUM_THREADS is
// unset; a memory-bound update wants them all.)
int configured_threads() {
  if (int n = env_int("MXLAMB_NUM_THREADS")) return n;
  if (int n = env_int("OMP_NUM_THREADS")) return n;
  return cpus_available();
}

int num_threads = configured_threads();

// Below this many elements a group runs on one thread: waking a team costs a few
// microseconds, which is longer than the work itself.
constexpr int64_t kParallelElements = int64_t{1} << 16;

}  // namespace

const KernelTable& active_kernels() { return *active; }

int threads_for(int64_t total_elements, int64_t num_chunks) {
  if (total_elements < kParallelElements) return 1;
  return num_chunks < num_threads ? static_cast<int>(num_chunks) : num_threads;
}

}  // namespace mxlamb

extern "C" {

// The mxnet version (e.g. 10901) this library was compiled against.
__attribute__((visibility("default"))) int mxlamb_built_for_mxnet() {
  return MXLAMB_MXNET_VERSION;
}

__attribute__((visibility("default"))) const char* mxlamb_active_isa() {
  return mxlamb::active_kernels().isa;
}

// Empty string, or why MXLAMB_ISA could not be honoured.
__attribute__((visibility("default"))) const char* mxlamb_isa_error() {
  return mxlamb::isa_error.c_str();
}

// 1 if the CPU supports the level (then it becomes the active one), else 0.
__attribute__((visibility("default"))) int mxlamb_set_isa(const char* isa) {
  const mxlamb::KernelTable* t = mxlamb::table_named(isa);
  if (t == nullptr) return 0;
  mxlamb::active = t;
  return 1;
}

__attribute__((visibility("default"))) int mxlamb_num_threads() { return mxlamb::num_threads; }

__attribute__((visibility("default"))) void mxlamb_set_num_threads(int n) {
  mxlamb::num_threads = n > 0 ? n : mxlamb::configured_threads();
}

// The 8-bit moments' format (lamb_math.h), for mxlamb.checkpoint's conversions between float32
// and 8-bit moments: n values to codes and block scales (one per kStateBlock values), and back.
// kind 0 is a mean (signed codes), 1 a var or AMSGrad's max (unsigned). Returns 0, or -1 for an
// unknown kind.
__attribute__((visibility("default"))) int mxlamb_encode_moment(const float* x, long long n,
                                                                int kind, uint8_t* codes,
                                                                float* scales) {
  if (kind != 0 && kind != 1) return -1;
  for (long long begin = 0; begin < n; begin += mxlamb::kStateBlock) {
    const long long end = begin + mxlamb::kStateBlock < n ? begin + mxlamb::kStateBlock : n;
    uint32_t largest = 0;
    for (long long i = begin; i < end; ++i) {
      const uint32_t magnitude = mxlamb::magnitude_bits(x[i]);
      largest = largest > magnitude ? largest : magnitude;
    }
    const float scale = mxlamb::block_scale(largest), inverse = mxlamb::inverse_scale(scale);
    scales[begin / mxlamb::kStateBlock] = scale;
    for (long long i = begin; i < end; ++i) {
      codes[i] = kind == 0 ? mxlamb::encode_mean(x[i], inverse) : mxlamb::encode_var(x[i], inverse);
    }
  }
  return 0;
}

__attribute__((visibility("default"))) int mxlamb_decode_moment(const uint8_t* codes,
                                                                const float* scales, long long n,
                                                                int kind, float* out) {
  if (kind != 0 && kind != 1) return -1;
  for (long long i = 0; i < n; ++i) {
    const float scale = scales[i / mxlamb::kStateBlock];
    out[i] = kind == 0 ? mxlamb::decode_mean(codes[i], scale) : mxlamb::decode_var(codes[i], scale);
  }
  return 0;
}

}  // extern "C"

// Gluon's Trainer checks, for every parameter array, that backward has written its gradient
// since the last step (MXNet's fresh_out_grad flag), and clears the flag: two ctypes calls per
// array, each about as dear as the update of a 768-element bias. ContiguousTrainer reads
// and clears the flags of a whole model in one call (mxlamb/contrib/contiguous.py). `get` and `set` are MXNet's own
// MXNDArrayGetGradState and MXNDArraySetGradState (passed from Python: libmxnet is loaded
// with RTLD_LOCAL). Returns the position of the first array whose gradient is stale, n when
// every one is fresh (then, with `clear`, every flag is cleared), or -1 where MXNet failed.
extern "C" {
typedef int (*MxlambGetGradState)(void* handle, int* out);
typedef int (*MxlambSetGradState)(void* handle, int state);

__attribute__((visibility("default"))) int mxlamb_fresh_grads(MxlambGetGradState get,
                                                              MxlambSetGradState set,
                                                              void** handles, int n, int clear) {
  for (int i = 0; i < n; ++i) {
    int fresh = 0;
    if (get(handles[i], &fresh) != 0) return -1;
    if (!fresh) return i;
  }
  if (clear) {
    for (int i = 0; i < n; ++i) {
      if (set(handles[i], 0) != 0) return -1;
    }
  }
  return n;
}
}  // extern "C"

// A ContiguousTrainer keeps the gradient arrays its parameters had before, zeroed: a block
// hybridized with static_shape=True that ran backward before the trainer was made writes into
// them still. This finds such a write in one call: after waiting for the arrays' pending
// writes (MXNet's MXNDArrayWaitToRead, `wait`), the position of the first array (of n: handle,
// data and length in bytes) holding a byte that is not zero, n where none does, or -1 where
// MXNet failed.
extern "C" {
typedef int (*MxlambWaitToRead)(void* handle);

__attribute__((visibility("default"))) int mxlamb_first_written(MxlambWaitToRead wait,
                                                                void** handles,
                                                                void* const* data,
                                                                const long long* bytes, int n) {
  for (int i = 0; i < n; ++i) {
    if (wait(handles[i]) != 0) return -1;
    const unsigned char* c = static_cast<const unsigned char*>(data[i]);
    unsigned char any = 0;
    for (long long b = 0; b < bytes[i]; ++b) any |= c[b];  // (no early exit: it vectorises)
    if (any != 0) return i;
  }
  return n;
}
}  // extern "C"
