// Multi-tensor LAMB kernels for CUDA (interface: lamb_cuda.h).
//
// The engine, which knows nothing of LAMB: every tensor of a group is cut into chunks of
// kChunk elements; a grid sized to the device (as many blocks as stay resident on its SMs)
// loops over all chunks of all tensors, so one launch per phase serves any number of tensors
// and a large embedding is spread over many blocks. A block finds its chunk's tensor by binary
// search in the tensors' first-chunk table. Within a chunk, thread i takes elements 4i..4i+3 of
// every 4 * kBlock: with 16-byte vector loads and stores where all of the tensor's arrays are
// aligned (Apex's ILP idea), with scalar ones otherwise and in the tail, in the same order
// either way.
//
// Tables: the host packs each tensor's pointers and host values into TensorEntry records and
// sends them as kernel arguments of a small upload kernel (in batches that fit the 32 KiB
// argument space), which writes them to the caller's workspace. Nothing is copied from host
// memory and nothing waits for the device, so a whole step can be captured in a CUDA graph.
//
// The arithmetic is lamb_math.h's, the same functions as the CPU kernels', and the coefficients
// are made by lamb_math.h's tensor_coeffs and gradient_scale, on the device (coeffs_kernel),
// because device step counts and gradient statistics are device state.
//
// Reductions are deterministic and independent of the grid size: a chunk's partial sum is a
// fixed tree over its threads (each summing its elements in order, in double), and a tensor's
// sum is a fixed tree over its chunk partials (one warp: each lane adds every 32nd chunk in
// order, then the lanes in a shuffle tree). No float atomics.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <math_constants.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <type_traits>
#include <utility>
#include <vector>

#include "lamb_cuda.h"
#include "lamb_math.h"

namespace mxlamb {
namespace cuda {
namespace {

constexpr int kBlock = 256;
constexpr int kVec = 4;  // elements per thread and step: 16 bytes of float32
// 2^MXLAMB_CUDA_CHUNK_LOG2 elements: small enough that the last round of chunks leaves few
// SMs idle, large enough that a chunk's reduction costs nothing. The sums are a fixed tree for
// a given chunk size (the tests hold every size to the same reference); the size itself is
// chosen by measurement (benchmarks/gpu_session.sh's tune step) and built in.
#ifndef MXLAMB_CUDA_CHUNK_LOG2
#define MXLAMB_CUDA_CHUNK_LOG2 14
#endif
constexpr int64_t kChunk = int64_t{1} << MXLAMB_CUDA_CHUNK_LOG2;
static_assert(kChunk % (kVec * kBlock) == 0, "a chunk is whole rounds of the block's packs");

// ------------------------------------------------------------------------------ the tables

enum EntryFlags : int { kAligned = 1, kAdaptation = 2, kLastOfSlot = 4 };

// One tensor, as the kernels see it.
struct TensorEntry {
  void* weight;
  void* weight_out;
  const void* grad;
  void* mean;
  void* var;
  void* vmax;
  void* average;
  void* lowp;
  float* mean_scales;  // 8-bit moments: the block scales (mean, var, vmax are codes); or NULL
  float* var_scales;
  float* vmax_scales;
  int64_t n;
  int64_t first_chunk;
  double lr, wd, decay, step_count;
  int64_t count_slot, stat_row;
  int grad_dtype;
  int flags;
  int slot_rank;  // how many tensors before this one share its count slot (normally 0)
};

// Records per upload launch: the batch fills the 32,764 bytes of kernel arguments that CUDA
// 12.1 and newer take on Volta and newer GPUs (this library links the CUDA 13 runtime and is
// built for sm_90), so BERT-base's 200 tensors travel in one launch rather than seven.
constexpr int kArgumentBytes = 32764;
constexpr int kUploadBatch = (kArgumentBytes - 64) / sizeof(TensorEntry);
struct UploadBatch {
  TensorEntry entries[kUploadBatch];
  int first;
  int count;
};
static_assert(sizeof(UploadBatch) <= kArgumentBytes, "kernel arguments over 32,764 bytes");

size_t align_up(size_t x) { return (x + 255) & ~size_t{255}; }

__host__ __device__ int64_t chunks_of(int64_t n) { return (n + kChunk - 1) / kChunk; }

// Workspace: [TensorEntry N][first_chunk N][TensorCoeffs N][partials 2/chunk].
struct Layout {
  size_t entries, first_chunk, coeffs, partials, total;
  int64_t num_chunks;
};

Layout layout_of(int n, const int64_t* sizes) {
  Layout l{};
  l.num_chunks = 0;
  for (int t = 0; t < n && sizes != nullptr; ++t) l.num_chunks += chunks_of(sizes[t]);
  l.entries = 0;
  l.first_chunk = align_up(sizeof(TensorEntry) * n);
  l.coeffs = l.first_chunk + align_up(sizeof(int64_t) * n);
  l.partials = l.coeffs + align_up(sizeof(TensorCoeffs<double>) * n);
  l.total = l.partials + align_up(sizeof(double) * 2 * l.num_chunks);
  return l;
}

__global__ void upload_kernel(UploadBatch batch, TensorEntry* table, int64_t* first_chunk) {
  for (int i = threadIdx.x; i < batch.count; i += blockDim.x) {
    table[batch.first + i] = batch.entries[i];
    first_chunk[batch.first + i] = batch.entries[i].first_chunk;
  }
}

// Sends the n records that entry(t, &record) fills to the workspace's table.
template <typename EntryFn>
cudaError_t upload(int n, EntryFn&& entry, const Layout& l, char* ws, cudaStream_t stream) {
  UploadBatch batch;
  for (int first = 0; first < n; first += kUploadBatch) {
    batch.first = first;
    batch.count = n - first < kUploadBatch ? n - first : kUploadBatch;
    for (int i = 0; i < batch.count; ++i) entry(first + i, &batch.entries[i]);
    upload_kernel<<<1, 256, 0, stream>>>(batch, reinterpret_cast<TensorEntry*>(ws + l.entries),
                                         reinterpret_cast<int64_t*>(ws + l.first_chunk));
    if (cudaError_t err = cudaGetLastError()) return err;
  }
  return cudaSuccess;
}

int dtype_bytes(int dtype) {
  return dtype == MXLAMB_FLOAT64 ? 8 : dtype == MXLAMB_FLOAT32 ? 4 : 2;
}

bool vector_aligned(const void* p, int elem_bytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % (kVec * elem_bytes) == 0;
}

// ------------------------------------------------------------------------- the grid

// The grid of a chunk loop: as many blocks as can be resident at once (the kernel's occupancy,
// queried once per kernel, times the device's SM count, queried once per device), or fewer
// where there are fewer chunks. The results never depend on it.
int sm_count() {
  static std::atomic<int> cached[64];
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) return 1;
  int sms = cached[device].load(std::memory_order_relaxed);
  if (sms == 0) {
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
        sms <= 0) {
      return 1;
    }
    cached[device].store(sms, std::memory_order_relaxed);
  }
  return sms;
}

// One cache per kernel type (each chunk kernel has a signature of its own).
template <typename Kernel>
int grid_for(Kernel* kernel, int64_t num_chunks) {
  static std::atomic<int> resident{0};
  int per_sm = resident.load(std::memory_order_relaxed);
  if (per_sm == 0) {
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kBlock, 0) !=
            cudaSuccess ||
        per_sm <= 0) {
      per_sm = 1;
    }
    resident.store(per_sm, std::memory_order_relaxed);
  }
  int64_t most = int64_t{per_sm} * sm_count();
  // MXLAMB_CUDA_MAX_BLOCKS caps the grid: the tests run with 1 and 7 blocks to show that the
  // results do not depend on it.
  if (const char* cap = std::getenv("MXLAMB_CUDA_MAX_BLOCKS")) {
    const long blocks = std::strtol(cap, nullptr, 10);
    if (blocks > 0 && blocks < most) most = blocks;
  }
  return static_cast<int>(num_chunks < most ? num_chunks : most);
}

// The tensor that chunk c belongs to: the last t with first_chunk[t] <= c (empty tensors
// share their successor's first chunk and are passed over).
__device__ int tensor_of(const int64_t* first_chunk, int n, int64_t c) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (first_chunk[mid] <= c) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// ------------------------------------------------------------------- loads and stores

__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ double widen(double x) { return x; }
__device__ __forceinline__ float widen(__half x) { return __half2float(x); }
__device__ __forceinline__ float widen(__nv_bfloat16 x) { return __bfloat162float(x); }

// Round to nearest even. A NaN becomes one canonical quiet NaN, sign dropped, as the CPU's
// precision.h writes it (0x7e00 for float16; cvt.rn.f16.f32 alone gives 0x7fff), so that the
// bits after a non-finite step do not depend on the device; bfloat16's is 0x7fc0.
template <typename E> __device__ __forceinline__ E narrow(float x);
template <> __device__ __forceinline__ __half narrow<__half>(float x) {
  return x != x ? __ushort_as_half(0x7e00) : __float2half_rn(x);
}
template <> __device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16>(float x) {
  return x != x ? __ushort_as_bfloat16(0x7fc0) : __float2bfloat16_rn(x);
}

template <typename E>
struct alignas(kVec * sizeof(E)) Pack {
  E v[kVec];
};

// Elements i..i+count-1 (count <= kVec) of p into x: one vector load when `vector`.
template <typename T, typename E>
__device__ __forceinline__ void load(const E* p, int64_t i, int count, bool vector, T (&x)[kVec]) {
  if (vector) {
    const Pack<E> pack = *reinterpret_cast<const Pack<E>*>(p + i);
#pragma unroll
    for (int k = 0; k < kVec; ++k) x[k] = static_cast<T>(widen(pack.v[k]));
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k) x[k] = k < count ? static_cast<T>(widen(p[i + k])) : T(0);
  }
}

template <typename E, typename T>
__device__ __forceinline__ void store(E* p, int64_t i, int count, bool vector, const T (&x)[kVec]) {
  if (vector) {
    Pack<E> pack;
#pragma unroll
    for (int k = 0; k < kVec; ++k) pack.v[k] = x[k];
    *reinterpret_cast<Pack<E>*>(p + i) = pack;
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k) if (k < count) p[i + k] = x[k];
  }
}

template <typename E>
__device__ __forceinline__ void store_rounded(E* p, int64_t i, int count, bool vector,
                                              const float (&x)[kVec]) {
  E y[kVec];
#pragma unroll
  for (int k = 0; k < kVec; ++k) y[k] = narrow<E>(x[k]);
  store(p, i, count, vector, y);
}

// The elements of chunk [begin, end) of thread threadIdx.x, kVec at a time: fn(i, count, vector).
template <typename Fn>
__device__ __forceinline__ void for_each_pack(int64_t begin, int64_t end, bool aligned, Fn&& fn) {
  for (int64_t i = begin + kVec * threadIdx.x; i < end; i += kVec * kBlock) {
    const int count = end - i < kVec ? static_cast<int>(end - i) : kVec;
    fn(i, count, aligned && count == kVec);
  }
}

// Two sums over the block in a fixed tree (warp shuffles, then the warps' sums in order).
__device__ void block_sum2(double* a, double* b) {
  __shared__ double shared[2][kBlock / 32];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    *a += __shfl_down_sync(0xffffffffu, *a, offset);
    *b += __shfl_down_sync(0xffffffffu, *b, offset);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    shared[0][warp] = *a;
    shared[1][warp] = *b;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double x = 0.0, y = 0.0;
    for (int w = 0; w < kBlock / 32; ++w) {
      x += shared[0][w];
      y += shared[1][w];
    }
    *a = x;
    *b = y;
  }
  __syncthreads();  // shared is reused by the block's next chunk
}

__device__ __forceinline__ bool skipped(const double* control) {
  return control != nullptr && control[kControlApply] == 0.0;
}

// ------------------------------------------------------------------ per-tensor coefficients

// What phase 1 and phase 2 need besides the group's hyper-parameters.
struct CoeffsArgs {
  LambParams params;
  double rescale_grad;
  double clipnorm;
  const double* control;
  const double* grad_sumsq;
  double* counts;
  bool count_step;  // phase 1 (and the one-call step): an applied step adds 1 to counts
};

// One block, a thread per tensor: the step count (the host's, or the device count plus one for
// an applied phase 1) and lamb_math.h's coefficients. Tensors sharing a count slot are counted
// in tensor order, as the CPU does: the k-th of them gets count + k + 1 and the last writes the
// slot, after every thread has read it.
template <typename T>
__global__ void coeffs_kernel(const TensorEntry* table, int n, CoeffsArgs a,
                              TensorCoeffs<T>* coeffs) {
  if (a.count_step && skipped(a.control)) return;  // phase 1 of a skipped step: nothing at all
  const bool advance = a.count_step && a.counts != nullptr;
  const double multiplier = a.control != nullptr ? a.control[kControlMultiplier] : a.rescale_grad;
  for (int t = threadIdx.x; t < n; t += blockDim.x) {
    const TensorEntry& e = table[t];
    double count = e.step_count;
    if (a.counts != nullptr) count = a.counts[e.count_slot] + (advance ? e.slot_rank + 1.0 : 0.0);
    const double scale =
        a.grad_sumsq != nullptr ? gradient_scale(multiplier, a.grad_sumsq[e.stat_row], a.clipnorm)
                                : multiplier;
    coeffs[t] = tensor_coeffs<T>(a.params, count, e.lr, e.wd, scale, e.decay);
  }
  if (!advance) return;
  __syncthreads();
  for (int t = threadIdx.x; t < n; t += blockDim.x) {
    const TensorEntry& e = table[t];
    if (e.flags & kLastOfSlot) a.counts[e.count_slot] += e.slot_rank + 1.0;
  }
}

// ---------------------------------------------------------------------------------- phase 1

struct ChunkArgs {
  const TensorEntry* table;
  const int64_t* first_chunk;
  int num_tensors;
  int64_t num_chunks;
  const double* control;
  double* partials;
};

template <typename T, typename G>
__device__ __forceinline__ void phase1_chunk(const TensorEntry& e, int64_t begin, int64_t end,
                                             const StepCoeffs<T>& s, const TensorCoeffs<T>& c,
                                             double* weight_sumsq, double* update_sumsq) {
  const T* weight = static_cast<const T*>(e.weight);
  const G* grad = static_cast<const G*>(e.grad);
  T* mean = static_cast<T*>(e.mean);
  T* var = static_cast<T*>(e.var);
  T* vmax = static_cast<T*>(e.vmax);
  for_each_pack(begin, end, e.flags & kAligned, [&](int64_t i, int count, bool vector) {
    T w[kVec], g[kVec], m[kVec], v[kVec], vm[kVec], u[kVec];
    load(weight, i, count, vector, w);
    load(grad, i, count, vector, g);
    load(mean, i, count, vector, m);
    load(var, i, count, vector, v);
    if (vmax != nullptr) load(vmax, i, count, vector, vm);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      w[k] = decayed(w[k], c);  // (the weight itself without decoupled decay)
      u[k] = vmax != nullptr ? phase1_element(w[k], g[k], &m[k], &v[k], &vm[k], s, c)
                             : phase1_element(w[k], g[k], &m[k], &v[k], s, c);
      if (k < count) {
        *weight_sumsq += static_cast<double>(w[k]) * w[k];
        *update_sumsq += static_cast<double>(u[k]) * u[k];
      }
    }
    store(mean, i, count, vector, m);
    store(var, i, count, vector, v);
    if (vmax != nullptr) store(vmax, i, count, vector, vm);
  });
}

// ------------------------------------------------------------------------- 8-bit moments

// With 8-bit moments (lamb_math.h, state_bits=8) a warp takes one block of kStateBlock
// elements at a time, lane l its kPerLane consecutive elements from l * kPerLane (16-byte loads
// and stores where the tensor's arrays are aligned, all of them loaded before any store), the
// warps of the CUDA block taking the chunk's blocks in turn. A block's scales are a warp max
// (__reduce_max_sync on the magnitudes' bits: exact in any order).
constexpr int kWarps = kBlock / 32;
constexpr int kPerLane = kStateBlock / 32;
static_assert(kPerLane == 2 * kVec, "a lane's elements are two packs");
static_assert(kChunk % kStateBlock == 0, "chunks begin at a block's first element");

__device__ __forceinline__ uint32_t warp_max(uint32_t x) {
  return __reduce_max_sync(0xffffffffu, x);
}

// A lane's kPerLane elements from i (count of them in the tensor), as two packs.
template <typename T, typename E>
__device__ __forceinline__ void load_lane(const E* p, int64_t i, int count, bool vector,
                                          T (&x)[kPerLane]) {
  T low[kVec], high[kVec];
  load(p, i, count < kVec ? count : kVec, vector, low);
  load(p, i + kVec, count > kVec ? count - kVec : 0, vector, high);
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    x[k] = low[k];
    x[k + kVec] = high[k];
  }
}

template <typename E, typename T>
__device__ __forceinline__ void store_lane(E* p, int64_t i, int count, bool vector,
                                           const T (&x)[kPerLane]) {
  T low[kVec], high[kVec];
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    low[k] = x[k];
    high[k] = x[k + kVec];
  }
  store(p, i, count < kVec ? count : kVec, vector, low);
  store(p, i + kVec, count > kVec ? count - kVec : 0, vector, high);
}

// store_lane of the lane's values rounded to E, each as store_rounded rounds it.
template <typename E>
__device__ __forceinline__ void store_lane_rounded(E* p, int64_t i, int count, bool vector,
                                                   const float (&x)[kPerLane]) {
  E y[kPerLane];
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) y[k] = narrow<E>(x[k]);
  store_lane(p, i, count, vector, y);
}

struct alignas(8) CodePack {
  uint8_t c[kPerLane];
};

__device__ __forceinline__ CodePack load_codes(const uint8_t* p, int64_t i, int count,
                                               bool vector) {
  if (vector) return *reinterpret_cast<const CodePack*>(p + i);
  CodePack pack;
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) pack.c[k] = k < count ? p[i + k] : 0;
  return pack;
}

__device__ __forceinline__ void store_codes(uint8_t* p, int64_t i, int count, bool vector,
                                            const CodePack& pack) {
  if (vector) {
    *reinterpret_cast<CodePack*>(p + i) = pack;
    return;
  }
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    if (k < count) p[i + k] = pack.c[k];
  }
}

// The lane's first element of the block at `first`, and how many of its elements the tensor
// has (0..kPerLane).
__device__ __forceinline__ int lane_count(int64_t i, int64_t end) {
  return i >= end ? 0 : (end - i < kPerLane ? static_cast<int>(end - i) : kPerLane);
}

template <typename G>
__device__ __forceinline__ void phase1_q8_chunk(const TensorEntry& e, int64_t begin, int64_t end,
                                                const StepCoeffs<float>& s,
                                                const TensorCoeffs<float>& c,
                                                double* weight_sumsq, double* update_sumsq) {
  uint8_t* mean = static_cast<uint8_t*>(e.mean);
  uint8_t* var = static_cast<uint8_t*>(e.var);
  uint8_t* vmax = static_cast<uint8_t*>(e.vmax);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t first = begin + int64_t{warp} * kStateBlock; first < end;
       first += int64_t{kWarps} * kStateBlock) {
    const int64_t block = first / kStateBlock;
    const int64_t i = first + lane * kPerLane;
    const int count = lane_count(i, end);
    const bool vector = (e.flags & kAligned) && count == kPerLane;
    float w[kPerLane], g[kPerLane], m[kPerLane], v[kPerLane];
    load_lane(static_cast<const float*>(e.weight), i, count, vector, w);
    load_lane(static_cast<const G*>(e.grad), i, count, vector, g);
    CodePack mc = load_codes(mean, i, count, vector), vc = load_codes(var, i, count, vector);
    CodePack xc;
    if (vmax != nullptr) xc = load_codes(vmax, i, count, vector);
    const float m_scale = e.mean_scales[block], v_scale = e.var_scales[block];
    const float x_scale = vmax != nullptr ? e.vmax_scales[block] : 0.0f;
    uint32_t m_largest = 0, v_largest = 0;
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      m[k] = decode_mean(mc.c[k], m_scale);
      v[k] = decode_var(vc.c[k], v_scale);
      update_moments(scaled_grad(g[k], s, c), &m[k], &v[k], s);
      if (k >= count) m[k] = v[k] = 0.0f;  // (past the tensor's end: in no maximum)
      m_largest = max(m_largest, magnitude_bits(m[k]));
      v_largest = max(v_largest, magnitude_bits(v[k]));
    }
    // (every lane read the old scales before this, the warp's first synchronisation)
    const float m_stored = block_scale(warp_max(m_largest));
    const float v_stored = block_scale(warp_max(v_largest));
    const float m_inverse = inverse_scale(m_stored), v_inverse = inverse_scale(v_stored);
    if (lane == 0) {
      e.mean_scales[block] = m_stored;
      e.var_scales[block] = v_stored;
    }
    uint32_t x_largest = 0;
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      mc.c[k] = encode_mean(m[k], m_inverse);
      vc.c[k] = encode_var(v[k], v_inverse);
      m[k] = decode_mean(mc.c[k], m_stored);
      v[k] = decode_var(vc.c[k], v_stored);
      if (vmax != nullptr) {
        v[k] = k < count ? amsgrad_var(decode_var(xc.c[k], x_scale), v[k]) : 0.0f;
        x_largest = max(x_largest, magnitude_bits(v[k]));
      }
    }
    store_codes(mean, i, count, vector, mc);
    store_codes(var, i, count, vector, vc);
    if (vmax != nullptr) {  // the running max of the stored v, itself stored in 8 bits
      const float x_stored = block_scale(warp_max(x_largest));
      const float x_inverse = inverse_scale(x_stored);
      if (lane == 0) e.vmax_scales[block] = x_stored;
#pragma unroll
      for (int k = 0; k < kPerLane; ++k) {
        xc.c[k] = encode_var(v[k], x_inverse);
        v[k] = decode_var(xc.c[k], x_stored);
      }
      store_codes(vmax, i, count, vector, xc);
    }
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      if (k >= count) continue;
      const float wk = decayed(w[k], c);
      const float u = raw_update(wk, m[k], v[k], c);
      *weight_sumsq += static_cast<double>(wk) * wk;
      *update_sumsq += static_cast<double>(u) * u;
    }
  }
}

template <typename L>
__device__ __forceinline__ void phase2_q8_chunk(const TensorEntry& e, int64_t begin, int64_t end,
                                                const TensorCoeffs<float>& c, float step) {
  // Under AMSGrad u is made from the running max, as in phase 1.
  const uint8_t* var = static_cast<const uint8_t*>(e.vmax != nullptr ? e.vmax : e.var);
  const float* var_scales = e.vmax != nullptr ? e.vmax_scales : e.var_scales;
  float* average = static_cast<float*>(e.average);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t first = begin + int64_t{warp} * kStateBlock; first < end;
       first += int64_t{kWarps} * kStateBlock) {
    const int64_t block = first / kStateBlock;
    const int64_t i = first + lane * kPerLane;
    const int count = lane_count(i, end);
    if (count == 0) continue;
    const bool vector = (e.flags & kAligned) && count == kPerLane;
    float w[kPerLane], avg[kPerLane];
    load_lane(static_cast<const float*>(e.weight), i, count, vector, w);
    if (average != nullptr) load_lane(static_cast<const float*>(average), i, count, vector, avg);
    const CodePack mc = load_codes(static_cast<const uint8_t*>(e.mean), i, count, vector);
    const CodePack vc = load_codes(var, i, count, vector);
    const float m_scale = e.mean_scales[block], v_scale = var_scales[block];
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      w[k] = phase2_element(decayed(w[k], c), decode_mean(mc.c[k], m_scale),
                            decode_var(vc.c[k], v_scale), c, step);
      if (average != nullptr) avg[k] = moving_average(avg[k], w[k], c.ema);
    }
    store_lane(static_cast<float*>(e.weight_out), i, count, vector, w);
    if (average != nullptr) store_lane(average, i, count, vector, avg);
    if constexpr (!std::is_same<L, void>::value) {
      if (e.lowp != nullptr) store_lane_rounded(static_cast<L*>(e.lowp), i, count, vector, w);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kBlock)
    phase1_kernel(ChunkArgs a, StepCoeffs<T> step, const TensorCoeffs<T>* coeffs) {
  if (skipped(a.control)) return;
  for (int64_t c = blockIdx.x; c < a.num_chunks; c += gridDim.x) {
    const int t = tensor_of(a.first_chunk, a.num_tensors, c);
    const TensorEntry e = a.table[t];  // a copy: the stores below cannot alias it
    const TensorCoeffs<T> tc = coeffs[t];
    const int64_t begin = (c - e.first_chunk) * kChunk;
    const int64_t end = begin + kChunk < e.n ? begin + kChunk : e.n;
    double w2 = 0.0, u2 = 0.0;
    if constexpr (std::is_same<T, float>::value) {
      if (e.mean_scales != nullptr) {
        switch (e.grad_dtype) {
          case MXLAMB_FLOAT16: phase1_q8_chunk<__half>(e, begin, end, step, tc, &w2, &u2); break;
          case MXLAMB_BFLOAT16:
            phase1_q8_chunk<__nv_bfloat16>(e, begin, end, step, tc, &w2, &u2);
            break;
          default: phase1_q8_chunk<float>(e, begin, end, step, tc, &w2, &u2); break;
        }
        block_sum2(&w2, &u2);
        if (threadIdx.x == 0) {
          a.partials[2 * c] = w2;
          a.partials[2 * c + 1] = u2;
        }
        continue;
      }
    }
    switch (e.grad_dtype) {
      case MXLAMB_FLOAT16: phase1_chunk<T, __half>(e, begin, end, step, tc, &w2, &u2); break;
      case MXLAMB_BFLOAT16:
        phase1_chunk<T, __nv_bfloat16>(e, begin, end, step, tc, &w2, &u2);
        break;
      case MXLAMB_FLOAT64: phase1_chunk<T, double>(e, begin, end, step, tc, &w2, &u2); break;
      default: phase1_chunk<T, float>(e, begin, end, step, tc, &w2, &u2); break;
    }
    block_sum2(&w2, &u2);
    if (threadIdx.x == 0) {
      a.partials[2 * c] = w2;
      a.partials[2 * c + 1] = u2;
    }
  }
}

// The sums of one tensor's chunk partials [first, last) (entry `which` of each pair), by one
// warp: lane l adds chunks l, l + 32, ... in order, then a fixed shuffle tree over the lanes;
// the result is in lane 0. Independent of the grid, and a warp's loads are independent of
// each other (one thread adding a 1,431-chunk embedding in order waited on each load in turn).
__device__ double warp_sum_of_chunks(const double* partials, int64_t first, int64_t last,
                                     int which) {
  const int lane = threadIdx.x % 32;
  double sum = 0.0;
  for (int64_t c = first + lane; c < last; c += 32) sum += partials[2 * c + which];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_down_sync(0xffffffffu, sum, offset);
  return sum;
}

constexpr int kWarpsPerNormsBlock = 4;

// Per-tensor norms, a warp per tensor: the chunk partials of each tensor (NaN: skipped).
__global__ void norms_kernel(const TensorEntry* table, int n, const double* control,
                             const double* partials, double* sumsq) {
  const int t = blockIdx.x * kWarpsPerNormsBlock + threadIdx.x / 32;
  if (t >= n) return;  // (whole warps: t is the same for the 32 lanes)
  double w = 0.0, u = 0.0;
  if (skipped(control)) {
    w = u = CUDART_NAN;
  } else {
    const int64_t first = table[t].first_chunk, last = first + chunks_of(table[t].n);
    w = warp_sum_of_chunks(partials, first, last, 0);
    u = warp_sum_of_chunks(partials, first, last, 1);
  }
  if (threadIdx.x % 32 == 0) {
    sumsq[2 * t] = w;
    sumsq[2 * t + 1] = u;
  }
}

void launch_norms(const TensorEntry* table, int n, const double* control,
                  const double* partials, double* sumsq, cudaStream_t stream) {
  const int blocks = (n + kWarpsPerNormsBlock - 1) / kWarpsPerNormsBlock;
  norms_kernel<<<blocks, 32 * kWarpsPerNormsBlock, 0, stream>>>(table, n, control, partials,
                                                                 sumsq);
}

// ---------------------------------------------------------------------------------- phase 2

template <typename T, typename L>
__device__ __forceinline__ void phase2_chunk(const TensorEntry& e, int64_t begin, int64_t end,
                                             const TensorCoeffs<T>& c, T step) {
  const T* weight = static_cast<const T*>(e.weight);
  T* weight_out = static_cast<T*>(e.weight_out);
  const T* mean = static_cast<const T*>(e.mean);
  // Under AMSGrad u is made from the running max, as in phase 1.
  const T* var = static_cast<const T*>(e.vmax != nullptr ? e.vmax : e.var);
  T* average = static_cast<T*>(e.average);
  L* lowp = static_cast<L*>(e.lowp);
  for_each_pack(begin, end, e.flags & kAligned, [&](int64_t i, int count, bool vector) {
    T w[kVec], m[kVec], v[kVec], avg[kVec];
    load(weight, i, count, vector, w);
    load(mean, i, count, vector, m);
    load(var, i, count, vector, v);
    if (average != nullptr) load(average, i, count, vector, avg);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      w[k] = phase2_element(decayed(w[k], c), m[k], v[k], c, step);
      if (average != nullptr) avg[k] = moving_average(avg[k], w[k], c.ema);
    }
    store(weight_out, i, count, vector, w);
    if (average != nullptr) store(average, i, count, vector, avg);
    if constexpr (!std::is_same<L, void>::value) {
      float f[kVec];
#pragma unroll
      for (int k = 0; k < kVec; ++k) f[k] = static_cast<float>(w[k]);
      if (lowp != nullptr) store_rounded(lowp, i, count, vector, f);
    }
  });
}

template <typename T>
__global__ void __launch_bounds__(kBlock)
    phase2_kernel(ChunkArgs a, StepCoeffs<T> step, const TensorCoeffs<T>* coeffs,
                  const double* sumsq, int lowp_dtype) {
  if (skipped(a.control)) return;
  for (int64_t c = blockIdx.x; c < a.num_chunks; c += gridDim.x) {
    const int t = tensor_of(a.first_chunk, a.num_tensors, c);
    const TensorEntry e = a.table[t];  // a copy: the stores below cannot alias it
    const TensorCoeffs<T> tc = coeffs[t];
    const T size = step_size(step, tc, sumsq[2 * t], sumsq[2 * t + 1], e.flags & kAdaptation);
    const int64_t begin = (c - e.first_chunk) * kChunk;
    const int64_t end = begin + kChunk < e.n ? begin + kChunk : e.n;
    if constexpr (std::is_same<T, float>::value) {
      if (e.mean_scales != nullptr) {
        if (e.lowp == nullptr) {
          phase2_q8_chunk<void>(e, begin, end, tc, size);
        } else if (lowp_dtype == MXLAMB_BFLOAT16) {
          phase2_q8_chunk<__nv_bfloat16>(e, begin, end, tc, size);
        } else {
          phase2_q8_chunk<__half>(e, begin, end, tc, size);
        }
        continue;
      }
    }
    if (e.lowp == nullptr) {
      phase2_chunk<T, void>(e, begin, end, tc, size);
    } else if (lowp_dtype == MXLAMB_BFLOAT16) {
      phase2_chunk<T, __nv_bfloat16>(e, begin, end, tc, size);
    } else {
      phase2_chunk<T, __half>(e, begin, end, tc, size);
    }
  }
}

__global__ void trust_ratio_kernel(const TensorEntry* table, int n, double lower, double upper,
                                   const double* sumsq, double* ratios) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= n) return;
  const double w = sumsq[2 * t], u = sumsq[2 * t + 1];
  ratios[t] = w != w                              ? w  // a skipped step's NaN
              : (table[t].flags & kAdaptation) != 0 ? trust_ratio(w, u, lower, upper)
                                                    : 1.0;
}

// ------------------------------------------------------------------------- grad statistics

template <typename G>
__device__ __forceinline__ double grad_chunk_sumsq(const TensorEntry& e, int64_t begin,
                                                   int64_t end) {
  const G* grad = static_cast<const G*>(e.grad);
  double sum = 0.0;
  for_each_pack(begin, end, e.flags & kAligned, [&](int64_t i, int count, bool vector) {
    double g[kVec];
    load(grad, i, count, vector, g);
#pragma unroll
    for (int k = 0; k < kVec; ++k) sum += g[k] * g[k];  // the padding is 0
  });
  return sum;
}

__global__ void __launch_bounds__(kBlock) grad_sumsq_kernel(ChunkArgs a) {
  for (int64_t c = blockIdx.x; c < a.num_chunks; c += gridDim.x) {
    const int t = tensor_of(a.first_chunk, a.num_tensors, c);
    const TensorEntry e = a.table[t];  // a copy: the stores below cannot alias it
    const int64_t begin = (c - e.first_chunk) * kChunk;
    const int64_t end = begin + kChunk < e.n ? begin + kChunk : e.n;
    double sum = 0.0, unused = 0.0;
    switch (e.grad_dtype) {
      case MXLAMB_FLOAT16: sum = grad_chunk_sumsq<__half>(e, begin, end); break;
      case MXLAMB_BFLOAT16: sum = grad_chunk_sumsq<__nv_bfloat16>(e, begin, end); break;
      case MXLAMB_FLOAT64: sum = grad_chunk_sumsq<double>(e, begin, end); break;
      default: sum = grad_chunk_sumsq<float>(e, begin, end); break;
    }
    block_sum2(&sum, &unused);
    if (threadIdx.x == 0) a.partials[2 * c] = sum;
  }
}

// One block: each gradient's sum from its chunks (a warp per gradient, warp_sum_of_chunks), the
// total in tensor order (as the CPU adds them), then control and step_state by the CPU's own
// function.
__global__ void grad_stats_kernel(const TensorEntry* table, int n, const double* partials,
                                  GradStatsParams p, double* grad_sumsq, double* control,
                                  double* step_state) {
  const int warps = blockDim.x / 32;
  for (int t = threadIdx.x / 32; t < n; t += warps) {
    const int64_t first = table[t].first_chunk, last = first + chunks_of(table[t].n);
    const double sum = warp_sum_of_chunks(partials, first, last, 0);
    if (threadIdx.x % 32 == 0) grad_sumsq[t] = sum;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int t = 0; t < n; ++t) total += grad_sumsq[t];
    grad_stats_control(p, total, control, step_state);
  }
}

// ------------------------------------------------------------------------- the host side

ChunkArgs chunk_args(const Layout& l, char* ws, int n, const double* control) {
  return ChunkArgs{reinterpret_cast<const TensorEntry*>(ws + l.entries),
                   reinterpret_cast<const int64_t*>(ws + l.first_chunk), n, l.num_chunks,
                   control, reinterpret_cast<double*>(ws + l.partials)};
}

// Each tensor's rank among the tensors sharing its count slot, and whether it is their last
// (slots are normally distinct: all ranks 0, all last).
void slot_ranks(const MxlambCudaGroup& g, std::vector<int>* rank, std::vector<bool>* last) {
  const int n = g.num_tensors;
  rank->assign(n, 0);
  last->assign(n, true);
  if (g.counts == nullptr || g.count_slots == nullptr) return;
  std::vector<std::pair<int64_t, int>> by_slot(n);
  for (int t = 0; t < n; ++t) by_slot[t] = {g.count_slots[t], t};
  std::sort(by_slot.begin(), by_slot.end());
  for (int i = 1; i < n; ++i) {
    if (by_slot[i].first == by_slot[i - 1].first) {
      (*rank)[by_slot[i].second] = (*rank)[by_slot[i - 1].second] + 1;
      (*last)[by_slot[i - 1].second] = false;
    }
  }
}

// The group's tables in the workspace.
cudaError_t upload_group(const MxlambCudaGroup& g, const Layout& l, char* ws,
                         cudaStream_t stream) {
  const int math_bytes = g.math_dtype == MXLAMB_FLOAT64 ? 8 : 4;
  std::vector<int> rank;
  std::vector<bool> last;
  slot_ranks(g, &rank, &last);
  int64_t first_chunk = 0;
  auto entry = [&](int t, TensorEntry* e) {
    auto at = [t](void* const* arrays) { return arrays != nullptr ? arrays[t] : nullptr; };
    *e = TensorEntry{};
    e->weight = at(g.weights);
    e->weight_out = g.weights_out != nullptr ? g.weights_out[t] : e->weight;
    e->grad = g.grads != nullptr ? g.grads[t] : nullptr;
    e->mean = at(g.means);
    e->var = at(g.vars);
    e->vmax = at(g.vmaxes);
    e->average = at(g.averages);
    e->lowp = at(g.weights_lowp);
    e->mean_scales = g.mean_scales != nullptr ? g.mean_scales[t] : nullptr;
    e->var_scales = g.var_scales != nullptr ? g.var_scales[t] : nullptr;
    e->vmax_scales = g.vmax_scales != nullptr ? g.vmax_scales[t] : nullptr;
    e->n = g.sizes != nullptr ? g.sizes[t] : 0;
    e->first_chunk = first_chunk;
    first_chunk += chunks_of(e->n);
    e->lr = g.lrs != nullptr ? g.lrs[t] : 0.0;
    e->wd = g.wds != nullptr ? g.wds[t] : 0.0;
    e->decay = g.decays != nullptr ? g.decays[t] : 0.0;
    e->step_count = g.step_counts != nullptr ? g.step_counts[t] : 1.0;
    e->count_slot = g.count_slots != nullptr ? g.count_slots[t] : 0;
    e->stat_row = g.stat_rows != nullptr ? g.stat_rows[t] : 0;
    e->grad_dtype = g.grad_dtypes != nullptr ? g.grad_dtypes[t] : MXLAMB_FLOAT32;
    // (8-bit moments: their codes kPerLane = 8 bytes at a time, as the 2-byte vectors' 8)
    const int state_bytes = g.mean_scales != nullptr ? 2 : math_bytes;
    const bool aligned =
        vector_aligned(e->weight, math_bytes) && vector_aligned(e->weight_out, math_bytes) &&
        vector_aligned(e->grad, dtype_bytes(e->grad_dtype)) &&
        vector_aligned(e->mean, state_bytes) && vector_aligned(e->var, state_bytes) &&
        vector_aligned(e->vmax, state_bytes) && vector_aligned(e->average, math_bytes) &&
        vector_aligned(e->lowp, 2);
    const bool adapt = g.layer_adaptation == nullptr || g.layer_adaptation[t] != 0;
    e->flags = (aligned ? kAligned : 0) | (adapt ? kAdaptation : 0) | (last[t] ? kLastOfSlot : 0);
    e->slot_rank = rank[t];
  };
  return upload(g.num_tensors, entry, l, ws, stream);
}

bool valid_dtype(int d) {
  return d == MXLAMB_FLOAT32 || d == MXLAMB_FLOAT64 || d == MXLAMB_FLOAT16 ||
         d == MXLAMB_BFLOAT16;
}

// The checks every group entry point makes (what the kernels would otherwise trust).
bool valid(const MxlambCudaGroup* g, void* ws, size_t bytes, bool phase1, Layout* l) {
  if (g == nullptr || g->num_tensors < 0) return false;
  if (g->math_dtype != MXLAMB_FLOAT32 && g->math_dtype != MXLAMB_FLOAT64) return false;
  if (g->weights_lowp != nullptr && g->lowp_dtype != MXLAMB_FLOAT16 &&
      g->lowp_dtype != MXLAMB_BFLOAT16) {
    return false;
  }
  // A float64 master has no low-precision copy (the C interface would round it twice).
  if (g->weights_lowp != nullptr && g->math_dtype == MXLAMB_FLOAT64) return false;
  if (g->clipnorm > 0 && g->grad_sumsq == nullptr) return false;  // as the CPU refuses it
  // 8-bit moments: float32 math, scales for both moments (and vmax's with vmaxes), none
  // without them.
  const bool quantized = g->mean_scales != nullptr;
  if (quantized && (g->math_dtype != MXLAMB_FLOAT32 || g->var_scales == nullptr ||
                    (g->vmaxes != nullptr) != (g->vmax_scales != nullptr))) {
    return false;
  }
  if (!quantized && (g->var_scales != nullptr || g->vmax_scales != nullptr)) return false;
  if (g->num_tensors > 0 &&
      (g->lrs == nullptr || g->wds == nullptr ||
       (g->counts != nullptr ? g->count_slots == nullptr : g->step_counts == nullptr) ||
       (g->grad_sumsq != nullptr && g->stat_rows == nullptr))) {
    return false;
  }
  if (g->num_tensors > 0 && g->sizes != nullptr &&
      (g->weights == nullptr || g->means == nullptr || g->vars == nullptr)) {
    return false;
  }
  if (phase1 && g->num_tensors > 0 && g->sizes != nullptr &&
      (g->grads == nullptr || g->grad_dtypes == nullptr)) {
    return false;
  }
  for (int t = 0; phase1 && g->grad_dtypes != nullptr && t < g->num_tensors; ++t) {
    if (!valid_dtype(g->grad_dtypes[t])) return false;
  }
  // Every array a non-empty tensor's kernels touch is there: a NULL one would be an illegal
  // address, which ends the CUDA context, rather than this call's cudaErrorInvalidValue.
  for (int t = 0; g->sizes != nullptr && t < g->num_tensors; ++t) {
    if (g->sizes[t] < 0) return false;
    if (g->sizes[t] == 0) continue;
    auto missing = [t](void* const* arrays) { return arrays != nullptr && arrays[t] == nullptr; };
    if (g->weights[t] == nullptr || g->means[t] == nullptr || g->vars[t] == nullptr ||
        missing(g->weights_out) || missing(g->vmaxes) || missing(g->averages) ||
        missing(g->weights_lowp) || (phase1 && g->grads[t] == nullptr)) {
      return false;
    }
    auto no_scales = [t](float* const* scales) {
      return scales != nullptr && scales[t] == nullptr;
    };
    if (no_scales(g->mean_scales) || no_scales(g->var_scales) || no_scales(g->vmax_scales)) {
      return false;
    }
  }
  *l = layout_of(g->num_tensors, g->sizes);
  return bytes >= l->total && (ws != nullptr || l->total == 0);
}

enum Stage : int { kPhase1 = 1, kPhase2 = 2 };

template <typename T>
cudaError_t run_group(const MxlambCudaGroup& g, int stages, double* sumsq, const Layout& l,
                      char* ws, cudaStream_t stream) {
  const int n = g.num_tensors;
  if (n == 0) return cudaSuccess;
  if (cudaError_t err = upload_group(g, l, ws, stream)) return err;
  const auto* table = reinterpret_cast<const TensorEntry*>(ws + l.entries);
  auto* coeffs = reinterpret_cast<TensorCoeffs<T>*>(ws + l.coeffs);
  const CoeffsArgs ca{g.params, g.rescale_grad, g.clipnorm, g.control, g.grad_sumsq, g.counts,
                      (stages & kPhase1) != 0};
  coeffs_kernel<T><<<1, 256, 0, stream>>>(table, n, ca, coeffs);
  if (cudaError_t err = cudaGetLastError()) return err;
  const ChunkArgs a = chunk_args(l, ws, n, g.control);
  const StepCoeffs<T> step = step_coeffs<T>(g.params);
  if (stages & kPhase1) {
    const int grid = grid_for(phase1_kernel<T>, l.num_chunks);
    if (grid > 0) phase1_kernel<T><<<grid, kBlock, 0, stream>>>(a, step, coeffs);
    launch_norms(table, n, g.control, a.partials, sumsq, stream);
    if (cudaError_t err = cudaGetLastError()) return err;
  }
  const int grid = grid_for(phase2_kernel<T>, l.num_chunks);
  if ((stages & kPhase2) && grid > 0) {
    phase2_kernel<T><<<grid, kBlock, 0, stream>>>(a, step, coeffs, sumsq, g.lowp_dtype);
    if (cudaError_t err = cudaGetLastError()) return err;
  }
  return cudaSuccess;
}

int run(const MxlambCudaGroup* g, int stages, double* sumsq, void* ws, size_t bytes,
        void* stream) {
  Layout l;
  if (!valid(g, ws, bytes, (stages & kPhase1) != 0, &l)) return cudaErrorInvalidValue;
  if (g->num_tensors > 0 && sumsq == nullptr) return cudaErrorInvalidValue;
  auto s = static_cast<cudaStream_t>(stream);
  char* w = static_cast<char*>(ws);
  return g->math_dtype == MXLAMB_FLOAT64 ? run_group<double>(*g, stages, sumsq, l, w, s)
                                         : run_group<float>(*g, stages, sumsq, l, w, s);
}

}  // namespace
}  // namespace cuda
}  // namespace mxlamb

using namespace mxlamb::cuda;  // NOLINT: the entry points below are its interface

extern "C" size_t mxlamb_cuda_workspace_bytes(const MxlambCudaGroup* group) {
  return group == nullptr ? 0 : layout_of(group->num_tensors, group->sizes).total;
}

extern "C" int mxlamb_cuda_phase1(const MxlambCudaGroup* group, double* sumsq, void* workspace,
                                  size_t workspace_bytes, void* stream) {
  return run(group, kPhase1, sumsq, workspace, workspace_bytes, stream);
}

extern "C" int mxlamb_cuda_phase2(const MxlambCudaGroup* group, const double* sumsq,
                                  void* workspace, size_t workspace_bytes, void* stream) {
  return run(group, kPhase2, const_cast<double*>(sumsq), workspace, workspace_bytes, stream);
}

extern "C" int mxlamb_cuda_step(const MxlambCudaGroup* group, double* sumsq, void* workspace,
                                size_t workspace_bytes, void* stream) {
  return run(group, kPhase1 | kPhase2, sumsq, workspace, workspace_bytes, stream);
}

extern "C" int mxlamb_cuda_trust_ratio(const MxlambCudaGroup* group, const double* sumsq,
                                       double* ratios, void* workspace, size_t workspace_bytes,
                                       void* stream_ptr) {
  if (group == nullptr || group->num_tensors < 0) return cudaErrorInvalidValue;
  const int n = group->num_tensors;
  if (n == 0) return cudaSuccess;
  // Only the adaptation flags are read: the table is made without sizes or pointers.
  const Layout l = layout_of(n, nullptr);
  if (workspace == nullptr || workspace_bytes < l.total || sumsq == nullptr ||
      ratios == nullptr) {
    return cudaErrorInvalidValue;
  }
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  char* ws = static_cast<char*>(workspace);
  if (cudaError_t err = upload(n, [&](int t, TensorEntry* e) {
        *e = TensorEntry{};
        const bool adapt = group->layer_adaptation == nullptr || group->layer_adaptation[t] != 0;
        e->flags = adapt ? kAdaptation : 0;
      }, l, ws, stream)) {
    return err;
  }
  trust_ratio_kernel<<<(n + 127) / 128, 128, 0, stream>>>(
      reinterpret_cast<const TensorEntry*>(ws + l.entries), n, group->params.lower_bound,
      group->params.upper_bound, sumsq, ratios);
  return cudaGetLastError();
}

extern "C" size_t mxlamb_cuda_grad_stats_workspace_bytes(const MxlambCudaGradStats* stats) {
  return stats == nullptr ? 0 : layout_of(stats->num_tensors, stats->sizes).total;
}

extern "C" int mxlamb_cuda_grad_stats(const MxlambCudaGradStats* st, void* workspace,
                                      size_t workspace_bytes, void* stream_ptr) {
  if (st == nullptr || st->num_tensors < 0 || st->control == nullptr || st->step_state == nullptr ||
      (st->num_tensors > 0 && (st->grads == nullptr || st->grad_dtypes == nullptr ||
                               st->sizes == nullptr || st->grad_sumsq == nullptr))) {
    return cudaErrorInvalidValue;
  }
  const int n = st->num_tensors;
  for (int t = 0; t < n; ++t) {
    if (!valid_dtype(st->grad_dtypes[t]) || st->sizes[t] < 0 ||
        (st->sizes[t] > 0 && st->grads[t] == nullptr)) {
      return cudaErrorInvalidValue;
    }
  }
  const Layout l = layout_of(n, st->sizes);
  if (workspace_bytes < l.total || (workspace == nullptr && l.total > 0)) {
    return cudaErrorInvalidValue;
  }
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  char* ws = static_cast<char*>(workspace);
  int64_t first_chunk = 0;
  if (cudaError_t err = upload(n, [&](int t, TensorEntry* e) {
        *e = TensorEntry{};
        e->grad = st->grads[t];
        e->grad_dtype = st->grad_dtypes[t];
        e->n = st->sizes[t];
        e->first_chunk = first_chunk;
        first_chunk += chunks_of(e->n);
        e->flags = vector_aligned(e->grad, dtype_bytes(e->grad_dtype)) ? kAligned : 0;
      }, l, ws, stream)) {
    return err;
  }
  const ChunkArgs a = chunk_args(l, ws, n, nullptr);
  const int grid = grid_for(grad_sumsq_kernel, l.num_chunks);
  if (grid > 0) grad_sumsq_kernel<<<grid, kBlock, 0, stream>>>(a);
  grad_stats_kernel<<<1, 256, 0, stream>>>(a.table, n, a.partials, st->params, st->grad_sumsq,
                                           st->control, st->step_state);
  return cudaGetLastError();
}
