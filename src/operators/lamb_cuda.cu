// Multi-tensor LAMB kernels for CUDA (interface: lamb_cuda.h).
//
// The engine follows Apex's multi-tensor apply: every tensor of the group is cut into chunks of
// kChunk elements and one thread block takes one chunk, so a large embedding is spread over
// many blocks. Unlike Apex, the tensor and chunk tables are not packed into the kernel's
// argument space: they are written to the caller's device workspace (through a pinned staging
// ring, so the copy never waits for the stream), and indices are 64-bit.
//
// The arithmetic is lamb_math.h's, the same per-element functions as the CPU kernels, on
// coefficients the caller made with lamb_math.h as the CPU does. Reductions are deterministic: each block reduces its chunk in a fixed tree, and the per-tensor norm adds the
// chunk partials in chunk order. No float atomics.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <mutex>
#include <vector>

#include "lamb_cuda.h"
#include "lamb_math.h"

namespace mxlamb {
namespace cuda {
namespace {

constexpr int kBlock = 256;
constexpr int64_t kChunk = int64_t{1} << 16;

struct TensorEntry {
  float* weight;
  const void* grad;
  float* mean;
  float* var;
  void* weight_lowp;
  int64_t n;
  TensorCoeffs<float> coeffs;
};

struct ChunkEntry {
  int64_t tensor;
  int64_t begin;
};

// Workspace layout: [tensors][chunks][first_chunk (N + 1)][partials (2 per chunk)].
struct Layout {
  size_t tensors, chunks, first_chunk, partials, total;
  int64_t num_chunks;
};

size_t align_up(size_t x) { return (x + 255) & ~size_t{255}; }

Layout layout_of(const MxlambCudaGroup& g) {
  Layout l{};
  l.num_chunks = 0;
  for (int t = 0; t < g.num_tensors; ++t) l.num_chunks += (g.sizes[t] + kChunk - 1) / kChunk;
  l.tensors = 0;
  l.chunks = align_up(sizeof(TensorEntry) * g.num_tensors);
  l.first_chunk = l.chunks + align_up(sizeof(ChunkEntry) * l.num_chunks);
  l.partials = l.first_chunk + align_up(sizeof(int64_t) * (g.num_tensors + 1));
  l.total = l.partials + align_up(sizeof(double) * 2 * l.num_chunks);
  return l;
}

// Storage types: loads widen to float, stores round to nearest even.
__device__ __forceinline__ float load(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load(const __half* p, int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ float load(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}
__device__ __forceinline__ void store(float* p, int64_t i, float x) { p[i] = x; }
__device__ __forceinline__ void store(__half* p, int64_t i, float x) { p[i] = __float2half_rn(x); }
__device__ __forceinline__ void store(__nv_bfloat16* p, int64_t i, float x) {
  p[i] = __float2bfloat16_rn(x);
}

// Sum over the block in a fixed tree order (deterministic).
__device__ double block_sum(double value, double* shared) {
  shared[threadIdx.x] = value;
  __syncthreads();
  for (int width = kBlock / 2; width > 0; width >>= 1) {
    if (threadIdx.x < width) shared[threadIdx.x] += shared[threadIdx.x + width];
    __syncthreads();
  }
  const double sum = shared[0];
  __syncthreads();
  return sum;
}

template <typename GradT>
__global__ void __launch_bounds__(kBlock)
    phase1_kernel(const TensorEntry* tensors, const ChunkEntry* chunks, StepCoeffs<float> step,
                  double* partials) {
  __shared__ double shared[kBlock];
  const ChunkEntry c = chunks[blockIdx.x];
  const TensorEntry t = tensors[c.tensor];
  const GradT* grad = static_cast<const GradT*>(t.grad);
  const int64_t end = c.begin + kChunk < t.n ? c.begin + kChunk : t.n;
  double weight_sumsq = 0.0, update_sumsq = 0.0;
  for (int64_t i = c.begin + threadIdx.x; i < end; i += kBlock) {
    const float w = t.weight[i];
    const float u = phase1_element(w, load(grad, i), &t.mean[i], &t.var[i], step, t.coeffs);
    weight_sumsq += static_cast<double>(w) * w;
    update_sumsq += static_cast<double>(u) * u;
  }
  weight_sumsq = block_sum(weight_sumsq, shared);
  update_sumsq = block_sum(update_sumsq, shared);
  if (threadIdx.x == 0) {
    partials[2 * blockIdx.x] = weight_sumsq;
    partials[2 * blockIdx.x + 1] = update_sumsq;
  }
}

// Per-tensor norms: the chunk partials of each tensor added in chunk order.
__global__ void norms_kernel(const int64_t* first_chunk, const double* partials, double* sumsq,
                             int num_tensors) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= num_tensors) return;
  double w = 0.0, u = 0.0;
  for (int64_t c = first_chunk[t]; c < first_chunk[t + 1]; ++c) {
    w += partials[2 * c];
    u += partials[2 * c + 1];
  }
  sumsq[2 * t] = w;
  sumsq[2 * t + 1] = u;
}

template <typename LowT>
__global__ void __launch_bounds__(kBlock)
    phase2_kernel(const TensorEntry* tensors, const ChunkEntry* chunks, StepCoeffs<float> step,
                  const double* sumsq) {
  const ChunkEntry c = chunks[blockIdx.x];
  const TensorEntry t = tensors[c.tensor];
  const float step_size =
      mxlamb::step_size(step, t.coeffs, sumsq[2 * c.tensor], sumsq[2 * c.tensor + 1], true);
  LowT* lowp = static_cast<LowT*>(t.weight_lowp);
  const int64_t end = c.begin + kChunk < t.n ? c.begin + kChunk : t.n;
  for (int64_t i = c.begin + threadIdx.x; i < end; i += kBlock) {
    const float updated = phase2_element(t.weight[i], t.mean[i], t.var[i], t.coeffs, step_size);
    t.weight[i] = updated;
    if (lowp != nullptr) store(lowp, i, updated);
  }
}

// Pinned staging buffers for the table copies. A copy from pageable memory would make
// cudaMemcpyAsync wait for the stream; from pinned memory it does not. A slot is reused only
// after the copy that last read it has completed (its event), normally long before.
class StagingRing {
 public:
  static constexpr int kSlots = 32;

  // Returns a pinned buffer of at least `bytes`, or nullptr (err set).
  char* acquire(size_t bytes, int* slot_out, cudaError_t* err) {
    std::lock_guard<std::mutex> lock(mutex_);
    const int slot = next_++ % kSlots;
    Slot& s = slots_[slot];
    *err = cudaSuccess;
    if (s.event != nullptr) *err = cudaEventSynchronize(s.event);
    if (*err == cudaSuccess && s.capacity < bytes) {
      if (s.data != nullptr) cudaFreeHost(s.data);
      s.data = nullptr;
      s.capacity = 0;
      *err = cudaHostAlloc(reinterpret_cast<void**>(&s.data), bytes, cudaHostAllocDefault);
      if (*err == cudaSuccess) s.capacity = bytes;
    }
    if (*err == cudaSuccess && s.event == nullptr) {
      *err = cudaEventCreateWithFlags(&s.event, cudaEventDisableTiming);
    }
    *slot_out = slot;
    return *err == cudaSuccess ? s.data : nullptr;
  }

  cudaError_t release(int slot, cudaStream_t stream) {
    std::lock_guard<std::mutex> lock(mutex_);
    return cudaEventRecord(slots_[slot].event, stream);
  }

  ~StagingRing() {
    for (Slot& s : slots_) {
      if (s.event != nullptr) cudaEventDestroy(s.event);
      if (s.data != nullptr) cudaFreeHost(s.data);
    }
  }

 private:
  struct Slot {
    char* data = nullptr;
    size_t capacity = 0;
    cudaEvent_t event = nullptr;
  };
  std::mutex mutex_;
  Slot slots_[kSlots];
  unsigned next_ = 0;
};

StagingRing staging;

// Writes the tensor, chunk and first-chunk tables into the workspace (asynchronously).
cudaError_t write_tables(const MxlambCudaGroup& g, const Layout& l, char* workspace,
                         cudaStream_t stream) {
  int slot;
  cudaError_t err;
  char* host = staging.acquire(l.partials, &slot, &err);
  if (host == nullptr) return err;
  auto* tensors = reinterpret_cast<TensorEntry*>(host + l.tensors);
  auto* chunks = reinterpret_cast<ChunkEntry*>(host + l.chunks);
  auto* first_chunk = reinterpret_cast<int64_t*>(host + l.first_chunk);
  int64_t c = 0;
  for (int t = 0; t < g.num_tensors; ++t) {
    tensors[t] = TensorEntry{g.weights[t], g.grads[t], g.means[t], g.vars[t],
                             g.weights_lowp != nullptr ? g.weights_lowp[t] : nullptr,
                             g.sizes[t], g.coeffs[t]};
    first_chunk[t] = c;
    for (int64_t begin = 0; begin < g.sizes[t]; begin += kChunk) chunks[c++] = ChunkEntry{t, begin};
  }
  first_chunk[g.num_tensors] = c;
  err = cudaMemcpyAsync(workspace, host, l.partials, cudaMemcpyHostToDevice, stream);
  const cudaError_t recorded = staging.release(slot, stream);
  return err != cudaSuccess ? err : recorded;
}

template <template <typename> class Launch, typename... Args>
cudaError_t dispatch(MxlambDType dtype, Args... args) {
  switch (dtype) {
    case MXLAMB_FLOAT16: return Launch<__half>::run(args...);
    case MXLAMB_BFLOAT16: return Launch<__nv_bfloat16>::run(args...);
    case MXLAMB_FLOAT32: return Launch<float>::run(args...);
    default: return cudaErrorInvalidValue;
  }
}

template <typename GradT>
struct LaunchPhase1 {
  static cudaError_t run(const Layout& l, char* ws, StepCoeffs<float> step, cudaStream_t stream) {
    phase1_kernel<GradT><<<static_cast<unsigned>(l.num_chunks), kBlock, 0, stream>>>(
        reinterpret_cast<const TensorEntry*>(ws + l.tensors),
        reinterpret_cast<const ChunkEntry*>(ws + l.chunks), step,
        reinterpret_cast<double*>(ws + l.partials));
    return cudaGetLastError();
  }
};

template <typename LowT>
struct LaunchPhase2 {
  static cudaError_t run(const Layout& l, char* ws, StepCoeffs<float> step, const double* sumsq,
                         cudaStream_t stream) {
    phase2_kernel<LowT><<<static_cast<unsigned>(l.num_chunks), kBlock, 0, stream>>>(
        reinterpret_cast<const TensorEntry*>(ws + l.tensors),
        reinterpret_cast<const ChunkEntry*>(ws + l.chunks), step, sumsq);
    return cudaGetLastError();
  }
};

// Checks the arguments and writes the tables; *ready is false when there is nothing to do.
cudaError_t prepare(const MxlambCudaGroup* g, void* workspace, size_t bytes, cudaStream_t stream,
                    Layout* l, bool* ready) {
  *ready = false;
  if (g == nullptr || g->num_tensors < 0 || workspace == nullptr ||
      (g->num_tensors > 0 && g->coeffs == nullptr)) {
    return cudaErrorInvalidValue;
  }
  *l = layout_of(*g);
  if (bytes < l->total) return cudaErrorInvalidValue;
  if (l->num_chunks == 0) return cudaSuccess;
  *ready = true;
  return write_tables(*g, *l, static_cast<char*>(workspace), stream);
}

}  // namespace
}  // namespace cuda
}  // namespace mxlamb

using mxlamb::cuda::Layout;

extern "C" size_t mxlamb_cuda_workspace_bytes(const MxlambCudaGroup* group) {
  return group == nullptr ? 0 : mxlamb::cuda::layout_of(*group).total;
}

extern "C" int mxlamb_cuda_phase1(const MxlambCudaGroup* group, double* sumsq, void* workspace,
                                  size_t workspace_bytes, void* stream_ptr) {
  using namespace mxlamb::cuda;
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  char* ws = static_cast<char*>(workspace);
  Layout l;
  bool ready;
  if (cudaError_t err = prepare(group, workspace, workspace_bytes, stream, &l, &ready)) return err;
  if (!ready) return cudaSuccess;
  if (cudaError_t err = dispatch<LaunchPhase1>(group->grad_dtype, l, ws, group->step, stream)) {
    return err;
  }
  norms_kernel<<<(group->num_tensors + 127) / 128, 128, 0, stream>>>(
      reinterpret_cast<const int64_t*>(ws + l.first_chunk),
      reinterpret_cast<const double*>(ws + l.partials), sumsq, group->num_tensors);
  return cudaGetLastError();
}

extern "C" int mxlamb_cuda_phase2(const MxlambCudaGroup* group, const double* sumsq,
                                  void* workspace, size_t workspace_bytes, void* stream_ptr) {
  using namespace mxlamb::cuda;
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  char* ws = static_cast<char*>(workspace);
  Layout l;
  bool ready;
  if (cudaError_t err = prepare(group, workspace, workspace_bytes, stream, &l, &ready)) return err;
  if (!ready) return cudaSuccess;
  const MxlambDType lowp = group->weights_lowp != nullptr ? group->lowp_dtype : MXLAMB_FLOAT32;
  return dispatch<LaunchPhase2>(lowp, l, ws, group->step, sumsq, stream);
}
