// The CPU multi-tensor engine: it knows tensors' sizes, chunks and threads, nothing of LAMB.
//
// All tensors of a group are cut into chunks of a fixed number of elements (never depending on
// the thread count), and threads share out chunks of all tensors, not whole tensors: one
// embedding can hold a fifth of a model's parameters. A reduction keeps one partial result
// per chunk and combines them in chunk order, so it is bit-identical for any thread count.
#ifndef MXLAMB_MULTI_TENSOR_H_
#define MXLAMB_MULTI_TENSOR_H_

#include <cstddef>
#include <cstdint>
#include <vector>

namespace mxlamb {

struct Chunk {
  int tensor;
  int64_t begin;
  int64_t end;
};

// 32768 floats: four streams of a chunk (w, g, m, v) fit in a core's L2 cache.
constexpr int64_t kChunkElements = int64_t{1} << 15;

struct ChunkPlan {
  std::vector<Chunk> chunks;
  // chunks of tensor t are chunks[first_chunk[t] .. first_chunk[t + 1])
  std::vector<int64_t> first_chunk;
  int64_t total_elements = 0;

  explicit ChunkPlan(const std::vector<int64_t>& sizes) {
    first_chunk.reserve(sizes.size() + 1);
    for (size_t t = 0; t < sizes.size(); ++t) {
      first_chunk.push_back(static_cast<int64_t>(chunks.size()));
      for (int64_t begin = 0; begin < sizes[t]; begin += kChunkElements) {
        const int64_t end = begin + kChunkElements < sizes[t] ? begin + kChunkElements : sizes[t];
        chunks.push_back(Chunk{static_cast<int>(t), begin, end});
      }
      total_elements += sizes[t];
    }
    first_chunk.push_back(static_cast<int64_t>(chunks.size()));
  }
};

// Threads to use for a group of this many elements: the library's configured count
// (MXLAMB_NUM_THREADS, else OMP_NUM_THREADS, else the CPUs this process may run on), but one
// thread below the size where starting a team costs more than it saves.
int threads_for(int64_t total_elements, int64_t num_chunks);

template <typename Fn>
void for_each_chunk(const ChunkPlan& plan, Fn&& fn) {
  const int64_t n = static_cast<int64_t>(plan.chunks.size());
  const int threads = threads_for(plan.total_elements, n);
  if (threads <= 1) {
    for (int64_t c = 0; c < n; ++c) fn(c, plan.chunks[c]);
    return;
  }
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t c = 0; c < n; ++c) fn(c, plan.chunks[c]);
}

}  // namespace mxlamb

#endif  // MXLAMB_MULTI_TENSOR_H_
