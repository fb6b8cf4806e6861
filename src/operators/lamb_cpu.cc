// The CPU's multi-tensor phases: a group's tensors cut into chunks (multi_tensor.h), each chunk
// handed to the active ISA level's span kernel, per-chunk sums combined in chunk order.
#include "lamb_cpu.h"

#include "multi_tensor.h"

namespace mxlamb {
namespace {

template <typename Span>
std::vector<int64_t> sizes_of(const std::vector<Span>& spans) {
  std::vector<int64_t> sizes;
  sizes.reserve(spans.size());
  for (const auto& s : spans) sizes.push_back(s.n);
  return sizes;
}

// The part of an 8-bit moment from element `begin` on (a chunk's first element, a multiple of
// kStateBlock: chunks are).
QuantizedMoment quantized_part(const QuantizedMoment& whole, int64_t begin) {
  static_assert(kChunkElements % kStateBlock == 0, "chunks begin at a block's first element");
  if (whole.codes == nullptr) return whole;
  return QuantizedMoment{whole.codes + begin, whole.scales + begin / kStateBlock};
}

}  // namespace

template <typename T>
void lamb_phase1_cpu(const std::vector<Phase1Span<T>>& tensors, const StepCoeffs<T>& step,
                     const std::vector<TensorCoeffs<T>>& coeffs, double* sumsq) {
  const PhaseKernels<T>& k = active_kernels().phases<T>();
  const ChunkPlan plan(sizes_of(tensors));
  std::vector<double> partial(2 * plan.chunks.size());
  for_each_chunk(plan, [&](int64_t c, const Chunk& chunk) {
    const Phase1Span<T>& whole = tensors[chunk.tensor];
    const int64_t grad_bytes = dtype_bytes(whole.grad_type);
    Phase1Span<T> part = whole;
    part.weight = whole.weight + chunk.begin;
    part.grad = static_cast<const char*>(whole.grad) + chunk.begin * grad_bytes;
    if (whole.mean != nullptr) part.mean = whole.mean + chunk.begin;  // (nullptr: 8-bit)
    if (whole.var != nullptr) part.var = whole.var + chunk.begin;
    if (whole.var_max != nullptr) part.var_max = whole.var_max + chunk.begin;
    part.q_mean = quantized_part(whole.q_mean, chunk.begin);
    part.q_var = quantized_part(whole.q_var, chunk.begin);
    part.q_var_max = quantized_part(whole.q_var_max, chunk.begin);
    part.n = chunk.end - chunk.begin;
    k.phase1(part, step, coeffs[chunk.tensor], &partial[2 * c], &partial[2 * c + 1]);
  });
  // Combine chunk partials in chunk order: independent of how chunks were shared out.
  for (size_t t = 0; t < tensors.size(); ++t) {
    double w = 0.0, u = 0.0;
    for (int64_t c = plan.first_chunk[t]; c < plan.first_chunk[t + 1]; ++c) {
      w += partial[2 * c];
      u += partial[2 * c + 1];
    }
    sumsq[2 * t] = w;
    sumsq[2 * t + 1] = u;
  }
}

template <typename T>
void lamb_phase2_cpu(const std::vector<Phase2Span<T>>& tensors, const StepCoeffs<T>& step,
                     const std::vector<TensorCoeffs<T>>& coeffs, const std::vector<T>& step_sizes) {
  const PhaseKernels<T>& k = active_kernels().phases<T>();
  const ChunkPlan plan(sizes_of(tensors));
  for_each_chunk(plan, [&](int64_t, const Chunk& chunk) {
    const Phase2Span<T>& whole = tensors[chunk.tensor];
    Phase2Span<T> part = whole;
    part.weight = whole.weight + chunk.begin;
    part.weight_out = whole.weight_out + chunk.begin;
    if (whole.model_weight != nullptr) part.model_weight = whole.model_weight + chunk.begin;
    if (whole.mean != nullptr) part.mean = whole.mean + chunk.begin;  // (nullptr: 8-bit)
    if (whole.var != nullptr) part.var = whole.var + chunk.begin;
    if (whole.average != nullptr) part.average = whole.average + chunk.begin;
    part.q_mean = quantized_part(whole.q_mean, chunk.begin);
    part.q_var = quantized_part(whole.q_var, chunk.begin);
    part.n = chunk.end - chunk.begin;
    k.phase2(part, step, coeffs[chunk.tensor], step_sizes[chunk.tensor]);
  });
}

template void lamb_phase1_cpu<float>(const std::vector<Phase1Span<float>>&,
                                      const StepCoeffs<float>&,
                                      const std::vector<TensorCoeffs<float>>&, double*);
template void lamb_phase1_cpu<double>(const std::vector<Phase1Span<double>>&,
                                       const StepCoeffs<double>&,
                                       const std::vector<TensorCoeffs<double>>&, double*);
template void lamb_phase2_cpu<float>(const std::vector<Phase2Span<float>>&,
                                      const StepCoeffs<float>&,
                                      const std::vector<TensorCoeffs<float>>&,
                                      const std::vector<float>&);
template void lamb_phase2_cpu<double>(const std::vector<Phase2Span<double>>&,
                                       const StepCoeffs<double>&,
                                       const std::vector<TensorCoeffs<double>>&,
                                       const std::vector<double>&);

void grad_sumsq_cpu(const std::vector<GradSpan>& grads, double* out) {
  const KernelTable& k = active_kernels();
  const ChunkPlan plan(sizes_of(grads));
  std::vector<double> partial(plan.chunks.size());
  for_each_chunk(plan, [&](int64_t c, const Chunk& chunk) {
    const GradSpan& whole = grads[chunk.tensor];
    const int64_t bytes = dtype_bytes(whole.grad_type);
    GradSpan part = whole;
    part.grad = static_cast<const char*>(whole.grad) + chunk.begin * bytes;
    part.n = chunk.end - chunk.begin;
    partial[c] = k.grad_sumsq(part);
  });
  for (size_t t = 0; t < grads.size(); ++t) {
    double sum = 0.0;
    for (int64_t c = plan.first_chunk[t]; c < plan.first_chunk[t + 1]; ++c) sum += partial[c];
    out[t] = sum;
  }
}

}  // namespace mxlamb
