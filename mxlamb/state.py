"""A parameter's state: its arrays as the Updater keeps them (made by ``create``), the named
slots the operators take (``prepare``, checked once and cached), and the moment slabs that
hold the moments of small parameters side by side."""
import collections

import numpy

from mxnet import ndarray
from mxnet.ndarray.ndarray import _DTYPE_MX_TO_NP

from .devices import device_key, same_memory
from .flat import FlatStates, flat_position

__all__ = ["ParameterStates", "Slots", "Prepared", "legacy", "dtype_name", "BFLOAT16",
           "LOW_PRECISION"]

BFLOAT16 = numpy.dtype(_DTYPE_MX_TO_NP[12])
LOW_PRECISION = (numpy.dtype(numpy.float16), BFLOAT16)
_FLOAT32 = numpy.dtype(numpy.float32)
_FLOAT64 = numpy.dtype(numpy.float64)

# The per-parameter arrays of one step, as ParameterStates.check unpacks a state; moments_at
# is (slab, offset, size) where mean and var are the packed pair at offset in a moment slab;
# flat_at is a flat.FlatAt where weight, gradient (and master) are views of flat buffers.
Slots = collections.namedtuple("Slots", ["master", "mean", "var", "var_max", "average", "accum",
                                         "moments_at", "flat_at"], defaults=(None,))
# One parameter as checked once and cached (views for the operators, its dtype and size: each
# NDArray property read is a call into libmxnet, and a step of many small tensors adds them up).
Prepared = collections.namedtuple("Prepared", ["weight", "grad", "slots", "dtype", "size"])

# Moment slabs. Every array an operator call takes costs about a microsecond in MXNet (engine
# dependencies, shapes, the copies of the argument lists), more than the update itself of a
# 768-element bias. The moments of parameters up to PACKED_MAX_ELEMENTS elements are
# therefore allocated side by side in one array per context and dtype (mean, then var, in the
# order their states are made), and a group whose moments lie side by side in one slab passes
# that slab once instead of two arrays per tensor. The states are views into the slab: the
# user, the Updater and checkpoints see ordinary arrays of the parameter's shape.
PACKED_MAX_ELEMENTS = 1 << 16
SLAB_ELEMENTS = 1 << 22  # 16 MiB, where param_dict does not tell what the small ones need


def legacy(array):
    """MXNet 2.0's Gluon passes ``mx.np`` arrays, and extension operators take legacy
    NDArrays only: the same memory, viewed as one (no copy). Others pass through."""
    return array.as_nd_ndarray() if type(array).__module__.startswith("mxnet.numpy") else array


def dtype_name(dtype):
    return "bfloat16" if numpy.dtype(dtype) == BFLOAT16 else numpy.dtype(dtype).name


def _zeros(weight):
    """Zeros of the weight's shape and dtype (float32 or float64: the math type)."""
    # MXNet 1.x cannot run any operator (zeros included) on a zero-size array.
    if weight.size == 0:
        return ndarray.empty(weight.shape, weight.context, dtype=weight.dtype)
    return ndarray.zeros(weight.shape, weight.context, dtype=weight.dtype)


class MomentSlabs:
    """Allocates packed (mean, var) pairs of small parameters, per context and moment dtype
    (float32, or float64 for float64 weights)."""

    def __init__(self):
        self._open = {}  # (context, dtype) -> [slab, elements used]

    def allocate(self, weight, wanted):
        """Zeroed (mean, var, (slab, offset, size)) views for ``weight`` (of the moments'
        dtype); a new slab holds at least ``wanted`` elements."""
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


def slab_elements(param_dict):
    """Elements of a new moment slab: the moments of every small parameter in param_dict
    (the Gluon Trainer's; one slab then holds them all), else SLAB_ELEMENTS."""
    wanted = 0
    for param in param_dict.values():
        shape = getattr(param, "shape", None)
        if shape is not None and all(shape):
            size = int(numpy.prod(shape))
            wanted += 2 * size if size <= PACKED_MAX_ELEMENTS else 0
    return wanted or SLAB_ELEMENTS


class ParameterStates:
    """Makes the states of parameters and checks them into :class:`Prepared` slots.

    ``describe(index)`` names a parameter in an error. Nothing here is pickled: the slabs'
    arrays travel as the Updater's states (views), and the cache is rebuilt on the next step.
    """

    def __init__(self, describe):
        self.describe = describe
        self.slabs = MomentSlabs()
        self.flat = FlatStates()  # masters and moments of contiguous parameters
        self.packed = {}   # id(mean) -> (mean, var, (slab, offset, size)) as allocated
        self.checked = {}  # index -> [(weight, grad, state, Prepared)], one per device

    def refuse(self, index, what):
        raise ValueError("LAMB: parameter %s: %s" % (self.describe(index), what))

    def create(self, index, weight, options, param_dict):
        """Mean and variance (zeros, of the weight's dtype: float32 or float64), then
        AMSGrad's max of the variance, the weight average (a copy of the weight) and the
        gradient sum, each when its option is on. On the CPU, the mean and variance of a
        parameter of up to PACKED_MAX_ELEMENTS elements are views into a moment slab."""
        if weight.stype != "default":
            raise ValueError("LAMB: parameter %s has %s storage; LAMB needs dense weights "
                             "(its trust ratio is a whole-tensor norm)"
                             % (self.describe(index), weight.stype))
        if numpy.dtype(weight.dtype) not in (_FLOAT32, _FLOAT64):
            raise ValueError(
                "LAMB: parameter %s is %s; LAMB updates float32 and float64 weights, and "
                "float16/bfloat16 weights with multi_precision=True"
                % (self.describe(index), dtype_name(weight.dtype)))
        packed = self.flat.moments(weight)  # a view of a contiguous parameter's flat buffer
        if packed is None and 0 < weight.size <= PACKED_MAX_ELEMENTS and \
                weight.context.device_type == "cpu":
            # (slabs on the CPU only: the GPU's packed moments have not run on a GPU yet)
            packed = self.slabs.allocate(weight, slab_elements(param_dict))
        if packed is not None:
            self.packed[id(packed[0])] = packed
            state = list(packed[:2])
        else:
            state = [_zeros(weight), _zeros(weight)]
        if options.amsgrad:
            state.append(_zeros(weight))
        if options.use_ema:
            state.append(weight.copy())
        if options.gradient_accumulation_steps is not None:
            state.append(_zeros(weight))
        return tuple(state)

    def prepare(self, index, weight, grad, state, options, multi_precision):
        """The :class:`Prepared` parameter: its :class:`Slots` (master is the weight itself
        without multi-precision), operator views of weight and gradient, dtype and size.
        Refuses, naming the parameter, what the operators would get wrong, before any array
        is written.

        Trainer and Updater pass the same array objects every step: a parameter whose weight,
        gradient and state are the very objects checked before is not checked again (the
        cache keeps them alive, so an identity cannot be reused by a new array)."""
        entries = self.checked.setdefault(index, [])
        for cached in entries:
            if cached[0] is weight and cached[1] is grad and cached[2] is state:
                return cached[3]
        result = Prepared(legacy(weight), legacy(grad),
                          self.check(index, weight, grad, state, options, multi_precision),
                          numpy.dtype(weight.dtype), weight.size)
        # One entry per device (several devices update the same index, each its own copy);
        # an entry of the same device is an older array of this parameter.
        device = device_key(weight.context)
        entries[:] = [c for c in entries if device_key(c[0].context) != device]
        entries.append((weight, grad, state, result))
        return result

    def check(self, index, weight, grad, state, options, multi_precision):
        """The slots of a state, or ValueError naming the parameter and what is wrong."""
        dtype = numpy.dtype(weight.dtype)
        multi_precision = multi_precision and dtype in LOW_PRECISION
        if dtype not in (_FLOAT32, _FLOAT64) and not multi_precision:
            self.refuse(index, "weight is %s; LAMB updates float32 and float64 weights, and "
                               "float16/bfloat16 weights with multi_precision=True"
                        % dtype_name(dtype))
        math_dtype = _FLOAT64 if dtype == _FLOAT64 else _FLOAT32  # of master copy and states
        if grad.stype != "default" or weight.stype != "default":
            self.refuse(index, "%s storage; LAMB needs dense weights and gradients (the trust "
                               "ratio is a whole-tensor norm, and densifying a sparse gradient "
                               "would decay rows it never touched)"
                        % (grad.stype if grad.stype != "default" else weight.stype))
        if grad.shape != weight.shape:
            self.refuse(index, "gradient has shape %s, weight has %s" % (grad.shape, weight.shape))
        if numpy.dtype(grad.dtype) != dtype:
            self.refuse(index, "gradient is %s, weight is %s"
                        % (dtype_name(grad.dtype), dtype_name(dtype)))
        if not same_memory(grad.context, weight.context):
            self.refuse(index, "gradient is on %s, weight on %s" % (grad.context, weight.context))
        layout = options.state_layout
        expected = "(%s)" % ", ".join(layout)
        if multi_precision:
            expected = "(weight32, %s)" % expected
        try:
            master, arrays = state if multi_precision else (weight, state)
            arrays = tuple(arrays)
        except (TypeError, ValueError):
            self.refuse(index, "state is not %s" % expected)
        if len(arrays) != len(layout) or not all(isinstance(a, ndarray.NDArray)
                                                 for a in arrays + (master,)):
            self.refuse(index, "state is not %s (made with other options?)" % expected)
        named = dict(zip(layout, arrays))
        packed = self.packed.get(id(named["mean"]))
        moments_at = (packed[2] if packed is not None and packed[0] is named["mean"]
                      and packed[1] is named["var"] else None)
        for name, array in [("weight32", master)] + list(named.items()):
            if (array.shape != weight.shape or numpy.dtype(array.dtype) != math_dtype
                    or not same_memory(array.context, weight.context)):
                self.refuse(index, "state %s is %s %s on %s, expected %s %s on %s"
                            % (name, dtype_name(array.dtype), array.shape, array.context,
                               math_dtype.name, weight.shape, weight.context))
        return Slots(*(None if array is None else legacy(array) for array in (
            master, named["mean"], named["var"], named.get("var_max"), named.get("average"),
            named.get("accum"))), moments_at=moments_at,
            flat_at=flat_position(weight, grad, master))

    @staticmethod
    def packed_moments(slots):
        """(slab, offset) where the tensors' moments lie side by side in one slab, in the
        group's order (mxlamb_step's packed layout), else None."""
        first = slots[0].moments_at
        if first is None:
            return None
        slab, expected = first[0], first[1]
        for s in slots:
            at = s.moments_at
            if at is None or at[0] is not slab or at[1] != expected:
                return None
            expected += 2 * at[2]
        return slab, first[1]

    def stepped(self):
        """(index, weight, Slots) of every parameter stepped so far, one per device."""
        for index, entries in self.checked.items():
            for cached in entries:
                yield index, cached[0], cached[3].slots
