"""A parameter's optimizer state: how it is made, and how a step reads it.

A state is what MXNet's Updater keeps for a parameter: a tuple of arrays named by
``Options.layout`` (``mean, var[, var_max][, average][, accum]``), or under multi-precision
``(weight32, that tuple)``. With ``state_bits=8`` a tensor of 4,096 elements or more
(:func:`quantized`) keeps its moments as uint8 codes of its shape, each followed by its float32
block scales, one per ``BLOCK`` elements (``mean, mean_scale, var, var_scale[, var_max,
var_max_scale]...``; the codes are lamb_math.h's). The state says itself where its arrays lie:

- :class:`PackedState`, a tuple whose ``mean`` and ``var`` are views side by side in one
  moment slab (``packed``: slab, offset, size). Small parameters get such states, so that a
  group of them passes one slab to the operator instead of two arrays each;
- :class:`PrecisionState`, a ``(weight32, moments)`` pair whose master copy is a view of a
  master buffer (``master_at``: buffer, offset, size), made by :func:`create_side_by_side`
  for contiguous parameters.

Both pickle as plain tuples, and MXNet's Updater makes plain tuples when it moves a state to
another device: a state that no longer says where it lies is stepped through its own arrays.
Nothing here keeps a registry of arrays.
"""
import collections
import ctypes

import numpy

from mxnet import ndarray
from mxnet.ndarray.ndarray import _DTYPE_MX_TO_NP

from ._library import native
from .devices import same_memory

__all__ = ["BFLOAT16", "LOW_PRECISION", "PackedState", "PrecisionState", "MomentSlabs",
           "Slots", "create", "create_side_by_side", "check", "legacy", "dtype_name",
           "context_of", "is_np_array", "quantized", "layout_of", "BLOCK"]

BFLOAT16 = numpy.dtype(_DTYPE_MX_TO_NP[12])
LOW_PRECISION = (numpy.dtype(numpy.float16), BFLOAT16)
_FLOAT32 = numpy.dtype(numpy.float32)
_FLOAT64 = numpy.dtype(numpy.float64)

# Every array an operator call takes costs about a microsecond in MXNet (engine dependencies,
# shapes, the copies of the argument lists), more than the update itself of a 768-element
# bias. The moments of parameters up to PACKED_MAX_ELEMENTS elements are therefore allocated
# side by side in one slab per context and dtype (mean, then var, in the order their states
# are made).
PACKED_MAX_ELEMENTS = 1 << 16
SLAB_ELEMENTS = 1 << 22  # 16 MiB, where param_dict does not tell what the small ones need

# state_bits=8: the elements per block scale (lamb_math.h's kStateBlock), and the smallest
# tensor whose moments are 8-bit (bitsandbytes' min_8bit_size). The smaller ones (biases,
# LayerNorm) keep float32 moments, packed in slabs on the CPU or flat in a ContiguousTrainer:
# they are a small part of a model's memory.
BLOCK = 256
QUANTIZED_MIN_ELEMENTS = 4096
_UINT8 = numpy.dtype(numpy.uint8)


def _plain(state):
    return tuple(state)


class PackedState(tuple):
    """A state tuple whose mean and var lie side by side in a moment slab: ``packed`` is
    (slab, offset of the mean, elements)."""

    def __new__(cls, arrays, packed):
        state = super().__new__(cls, arrays)
        state.packed = packed
        return state

    def __reduce__(self):
        return _plain, (tuple(self),)


class PrecisionState(tuple):
    """``(weight32, moments)`` whose master copy is a view of a master buffer: ``master_at``
    is (buffer, offset, elements)."""

    def __new__(cls, master, moments, master_at):
        state = super().__new__(cls, (master, moments))
        state.master_at = master_at
        return state

    def __reduce__(self):
        return _plain, (tuple(self),)


# The per-parameter arrays of one step, as check() unpacks a state: the master copy (the weight
# itself without multi-precision), the moments and the optional arrays; ``packed`` and
# ``master_at`` as the state said (None where it says nothing).
Slots = collections.namedtuple("Slots", ["master", "mean", "var", "var_max", "average", "accum",
                                         "packed", "master_at", "mean_scale", "var_scale",
                                         "var_max_scale"])


def quantized(state_bits, size):
    """Whether a tensor of ``size`` elements keeps 8-bit moments under ``state_bits``."""
    return state_bits == 8 and size >= QUANTIZED_MIN_ELEMENTS


def blocks(size):
    return (size + BLOCK - 1) // BLOCK


def layout_of(options, shape, math_dtype):
    """[(name, dtype, shape)] of the state arrays a parameter of ``shape`` keeps, in order
    (``math_dtype``: of its float moments and optional arrays)."""
    size = int(numpy.prod(shape)) if shape else 1
    q = quantized(options.state_bits, size)
    specs = []
    for name in options.layout(q):
        if name.endswith("_scale"):
            specs.append((name, _FLOAT32, (blocks(size),)))
        elif q and name in ("mean", "var", "var_max"):
            specs.append((name, _UINT8, tuple(shape)))
        else:
            specs.append((name, numpy.dtype(math_dtype), tuple(shape)))
    return specs


def is_np_array(array):
    """Whether ``array`` is one of MXNet 2.0's ``mx.np`` arrays."""
    return type(array).__module__.startswith("mxnet.numpy")


def legacy(array):
    """MXNet 2.0's Gluon passes ``mx.np`` arrays, and extension operators take legacy
    NDArrays only: the same memory, viewed as one (no copy). Others pass through."""
    return array.as_nd_ndarray() if is_np_array(array) else array


def context_of(array):
    """An array's context (MXNet 2.0's mx.np arrays call it device, and warn on .context)."""
    return array.device if is_np_array(array) else array.context


def dtype_name(dtype):
    return "bfloat16" if numpy.dtype(dtype) == BFLOAT16 else numpy.dtype(dtype).name


def _zeros(weight):
    """Zeros of the weight's shape and dtype (float32 or float64: the math type)."""
    # MXNet 1.x cannot run any operator (zeros included) on a zero-size array.
    if weight.size == 0:
        return ndarray.empty(weight.shape, weight.context, dtype=weight.dtype)
    return ndarray.zeros(weight.shape, weight.context, dtype=weight.dtype)


class MomentSlabs:
    """An optimizer's allocator of packed (mean, var) pairs for small parameters, per context
    and moment dtype. It holds only the slab it is filling; the states hold their slabs."""

    def __init__(self):
        self._open = {}  # (context, dtype) -> [slab, elements used]

    def allocate(self, weight, wanted):
        """Zeroed (mean, var) views for ``weight`` and their (slab, offset, size); a new slab
        holds at least ``wanted`` elements."""
        size = weight.size
        key = (weight.context, numpy.dtype(weight.dtype))
        entry = self._open.get(key)
        if entry is None or entry[1] + 2 * size > entry[0].shape[0]:
            slab = ndarray.zeros((max(2 * size, wanted),), weight.context, dtype=key[1])
            entry = self._open[key] = [slab, 0]
        slab, offset = entry
        entry[1] += 2 * size
        mean = slab[offset:offset + size].reshape(weight.shape)
        var = slab[offset + size:offset + 2 * size].reshape(weight.shape)
        return mean, var, (slab, offset, size)


def slab_elements(param_dict, options):
    """Elements of a new moment slab: the float moments of every small parameter in
    param_dict (the Gluon Trainer's; one slab then holds them all), else SLAB_ELEMENTS."""
    wanted = 0
    for param in param_dict.values():
        shape = getattr(param, "shape", None)
        if shape is not None and all(shape):
            size = int(numpy.prod(shape))
            packed = size <= PACKED_MAX_ELEMENTS and not quantized(options.state_bits, size)
            wanted += 2 * size if packed else 0
    return wanted or SLAB_ELEMENTS


def _refuse_weight(weight, describe):
    if weight.stype != "default":
        raise ValueError("%s has %s storage; it needs dense weights (LAMB's trust ratio is a "
                         "whole-tensor norm)" % (describe(), weight.stype))
    if numpy.dtype(weight.dtype) not in (_FLOAT32, _FLOAT64):
        raise ValueError("%s is %s; it updates float32 and float64 weights, and "
                         "float16/bfloat16 weights with multi_precision=True"
                         % (describe(), dtype_name(weight.dtype)))


def _optional(weight, options, moments=True):
    """AMSGrad's max of the variance, the weight average (a copy of the weight) and the
    gradient sum, each when its option is on (``moments``: with AMSGrad's max)."""
    extra = []
    if options.amsgrad and moments:
        extra.append(_zeros(weight))
    if options.use_ema:
        extra.append(weight.copy())
    if options.gradient_accumulation_steps is not None:
        extra.append(_zeros(weight))
    return extra


def create(weight, options, slabs, param_dict, describe):
    """The state of one float32 or float64 weight (the master copy under multi-precision):
    zero mean and variance, packed into a slab for a small parameter on the CPU, then the
    optional arrays. ``describe()`` names the parameter in an error."""
    _refuse_weight(weight, describe)
    if quantized(options.state_bits, weight.size):
        return tuple(_quantized_moments(weight, options, describe)
                     + _optional(weight, options, moments=False))
    if 0 < weight.size <= PACKED_MAX_ELEMENTS and weight.context.device_type == "cpu":
        # (slabs on the CPU only: the GPU forwards take packed moments, not yet run there)
        mean, var, packed = slabs.allocate(weight, slab_elements(param_dict, options))
        return PackedState([mean, var] + _optional(weight, options), packed)
    return tuple([_zeros(weight), _zeros(weight)] + _optional(weight, options))


def _quantized_moments(weight, options, describe):
    """Zero 8-bit moments (codes 0, scales 0: the value 0) for a float32 weight on the CPU."""
    if numpy.dtype(weight.dtype) != _FLOAT32:
        raise ValueError("%s is %s; state_bits=8 keeps 8-bit moments around float32 arithmetic "
                         "(float32 weights, or float16/bfloat16 with multi_precision=True)"
                         % (describe(), dtype_name(weight.dtype)))
    if weight.context.device_type == "gpu":
        raise ValueError("%s is on %s; state_bits=8 runs on the CPU operators (the MXNet GPU "
                         "operators do not pass 8-bit moments to the CUDA kernels yet)"
                         % (describe(), weight.context))
    arrays = []
    for name, dtype, shape in layout_of(options, weight.shape, _FLOAT32):
        if name in ("mean", "var", "var_max") or name.endswith("_scale"):
            arrays.append(ndarray.zeros(shape, weight.context, dtype=dtype))
    return arrays


_KINDS = {"mean": 0, "var": 1, "var_max": 1}


def encode_moment(values, name):
    """A float32 moment (``name``: mean, var or var_max) in lamb_math.h's 8-bit format:
    (codes, block scales), on ``values``' context. Host-side, for conversions of states."""
    host = numpy.ascontiguousarray(values.asnumpy(), dtype=numpy.float32).ravel()
    codes = numpy.empty(host.size, numpy.uint8)
    scales = numpy.empty(blocks(host.size), numpy.float32)
    pointer = ctypes.c_void_p
    status = native.mxlamb_encode_moment(pointer(host.ctypes.data), ctypes.c_longlong(host.size),
                                         _KINDS[name], pointer(codes.ctypes.data),
                                         pointer(scales.ctypes.data))
    assert status == 0, name
    context = values.context
    return (ndarray.array(codes.reshape(values.shape), context, dtype=numpy.uint8),
            ndarray.array(scales, context, dtype=numpy.float32))


def decode_moment(codes, scales, name):
    """The float32 values of an 8-bit moment (the inverse of :func:`encode_moment`)."""
    host = numpy.ascontiguousarray(codes.asnumpy(), dtype=numpy.uint8).ravel()
    host_scales = numpy.ascontiguousarray(scales.asnumpy(), dtype=numpy.float32)
    out = numpy.empty(host.size, numpy.float32)
    pointer = ctypes.c_void_p
    status = native.mxlamb_decode_moment(pointer(host.ctypes.data),
                                         pointer(host_scales.ctypes.data),
                                         ctypes.c_longlong(host.size), _KINDS[name],
                                         pointer(out.ctypes.data))
    assert status == 0, name
    return ndarray.array(out.reshape(codes.shape), codes.context, dtype=numpy.float32)


def create_side_by_side(weights, options, multi_precision, describe):
    """The states of parameters that are stepped as one run (contiguous parameters): every
    mean and var in one new slab, [m0 v0 m1 v1 ...] in the order given, and under
    multi-precision every float32 master copy in one new buffer laid out as the weights (each
    a copy of its weight's values). ``describe(k)`` names the k-th in an error."""
    sizes = [w.size for w in weights]
    total = sum(sizes)
    context = weights[0].context
    low = [multi_precision and numpy.dtype(w.dtype) in LOW_PRECISION for w in weights]
    masters = None
    if any(low):
        masters = ndarray.zeros((total,), context, dtype=numpy.float32)
    math_dtype = _FLOAT32 if any(low) else numpy.dtype(weights[0].dtype)
    slab = ndarray.zeros((2 * total,), context, dtype=math_dtype)
    states, offset = [], 0
    for k, (weight, size) in enumerate(zip(weights, sizes)):
        master, master_at = weight, None
        if low[k]:
            master = masters[offset:offset + size].reshape(weight.shape)
            ndarray.cast(weight, dtype=numpy.float32, out=master)
            master_at = (masters, offset, size)
        _refuse_weight(master, lambda k=k: describe(k))
        mean = slab[2 * offset:2 * offset + size].reshape(weight.shape)
        var = slab[2 * offset + size:2 * offset + 2 * size].reshape(weight.shape)
        moments = PackedState([mean, var] + _optional(master, options), (slab, 2 * offset, size))
        states.append(PrecisionState(master, moments, master_at) if low[k] else moments)
        offset += size
    return states


def check(weight, grad, state, options, multi_precision, refuse):
    """The :class:`Slots` of a parameter's state, or ``refuse(what)`` (which raises) naming
    what the operators would get wrong, before any array is written."""
    dtype = numpy.dtype(weight.dtype)
    multi_precision = multi_precision and dtype in LOW_PRECISION
    if dtype not in (_FLOAT32, _FLOAT64) and not multi_precision:
        refuse("weight is %s; LAMB updates float32 and float64 weights, and float16/bfloat16 "
               "weights with multi_precision=True" % dtype_name(dtype))
    math_dtype = _FLOAT64 if dtype == _FLOAT64 else _FLOAT32  # of master copy and states
    if grad.stype != "default" or weight.stype != "default":
        refuse("%s storage; LAMB needs dense weights and gradients (the trust ratio is a "
               "whole-tensor norm, and densifying a sparse gradient would decay rows it never "
               "touched)" % (grad.stype if grad.stype != "default" else weight.stype))
    if grad.shape != weight.shape:
        refuse("gradient has shape %s, weight has %s" % (grad.shape, weight.shape))
    if numpy.dtype(grad.dtype) != dtype:
        refuse("gradient is %s, weight is %s" % (dtype_name(grad.dtype), dtype_name(dtype)))
    if not same_memory(grad.context, weight.context):
        refuse("gradient is on %s, weight on %s" % (grad.context, weight.context))
    specs = layout_of(options, weight.shape, math_dtype)
    layout = [name for name, _, _ in specs]
    expected = "(%s)" % ", ".join(layout)
    if multi_precision:
        expected = "(weight32, %s)" % expected
    try:
        master, arrays = state if multi_precision else (weight, state)
        arrays_tuple = tuple(arrays)
    except (TypeError, ValueError):
        refuse("state is not %s" % expected)
    if len(arrays_tuple) != len(layout) or not all(isinstance(a, ndarray.NDArray)
                                                   for a in arrays_tuple + (master,)):
        eight_bit = any(isinstance(a, ndarray.NDArray) and numpy.dtype(a.dtype) == _UINT8
                        for a in arrays_tuple)
        refuse("state is not %s: made with other options (%s), or for a weight of another "
               "dtype (Parameter.cast?)" % (expected, "this optimizer has state_bits=%d%s" % (
                   options.state_bits, ", the state has 8-bit moments" if eight_bit else "")))
    named = dict(zip(layout, arrays_tuple))
    wanted = [("weight32", master, math_dtype, weight.shape)] + [
        (name, named[name], dtype, shape) for name, dtype, shape in specs]
    for name, array, dtype, shape in wanted:
        if (array.shape != shape or numpy.dtype(array.dtype) != dtype
                or not same_memory(array.context, weight.context)):
            refuse("state %s is %s %s on %s, expected %s %s on %s%s"
                   % (name, dtype_name(array.dtype), array.shape, array.context,
                      dtype_name(dtype), shape, weight.context,
                      " (state_bits=%d)" % options.state_bits if options.state_bits != 32
                      or numpy.dtype(array.dtype) == _UINT8 else ""))

    def get(name):
        array = named.get(name)
        return None if array is None else legacy(array)
    return Slots(legacy(master), get("mean"), get("var"), get("var_max"), get("average"),
                 get("accum"), packed=getattr(arrays, "packed", None),
                 master_at=getattr(state, "master_at", None) if multi_precision else None,
                 mean_scale=get("mean_scale"), var_scale=get("var_scale"),
                 var_max_scale=get("var_max_scale"))


def packed_run(slots):
    """(slab, offset) where a group's moments lie side by side in one slab, in the group's
    order (mxlamb_step's packed layout), else None."""
    first = slots[0].packed
    if first is None:
        return None
    slab, expected = first[0], first[1]
    for s in slots:
        at = s.packed
        if at is None or at[0] is not slab or at[1] != expected:
            return None
        expected += 2 * at[2]
    return slab, first[1]
