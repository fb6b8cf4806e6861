"""Flat buffers: arrays of many parameters side by side in one array, each parameter a view of
its own shape (made by :func:`mxlamb.make_contiguous`), and how the optimizer recognises them.

Every array an operator call takes costs about a microsecond in MXNet; a group whose weights,
gradients, moments (and float32 master copies) each lie side by side in one array goes to one
``mxlamb_step`` call with four arrays however many tensors it has (its attribute
``flat_sizes``). The views are ordinary arrays to Gluon, autograd, the Trainer and checkpoints.

A view is recognised by identity only: the buffer that made it keeps it, and a parameter
whose array has been replaced behind our back (``Parameter.cast``, ``reset_ctx``,
``initialize(force_reinit=True)``, an optimizer state loaded from a file) simply holds an array
that is no view, and is updated through its own arrays, as any parameter is.
"""
import collections
import weakref

import numpy

from mxnet import ndarray

__all__ = ["Layout", "FlatBuffer", "FlatStates", "FlatAt", "position", "flat_position",
           "flat_run", "context_of"]

# id(view) -> the FlatBuffer that made it (which keeps the view alive: the id is not reused).
_BUFFERS = weakref.WeakValueDictionary()

# Where a parameter's arrays lie in flat buffers, as LAMB's check finds them: the flat weight
# (or float32 master copy), the flat gradient and the flat float16 model weight (or None)
# hold its elements from `offset` on.
FlatAt = collections.namedtuple("FlatAt", ["weight", "grad", "model", "offset", "size"])


def _is_np(array):
    return type(array).__module__.startswith("mxnet.numpy")


def context_of(array):
    """An array's context (MXNet 2.0's mx.np arrays call it device, and warn on .context)."""
    return array.device if _is_np(array) else array.context


class Layout:
    """Where each member of a flat buffer lies: parameters of one context, in order."""

    def __init__(self, context, names, shapes):
        self.context = context
        self.names = list(names)
        self.shapes = [tuple(s) for s in shapes]
        self.sizes = [int(numpy.prod(s)) for s in self.shapes]
        self.offsets = list(numpy.cumsum([0] + self.sizes[:-1]).tolist())
        self.total = sum(self.sizes)


class FlatBuffer:
    """One flat array of ``dtype`` on the layout's context and one view per member (mx.np
    views for MXNet 2.0's Gluon when ``np_views``). ``role`` is "weight", "grad" or
    "master". ``values``: arrays copied into the views (zeros where None)."""

    def __init__(self, layout, dtype, role, np_views, values=None):
        self.layout = layout
        self.role = role
        self.array = ndarray.zeros((layout.total,), layout.context, dtype=dtype)
        self.views = []
        self.index = {}
        for k, (offset, size, shape) in enumerate(zip(layout.offsets, layout.sizes,
                                                      layout.shapes)):
            view = self.array[offset:offset + size].reshape(shape)
            if values is not None and values[k] is not None:
                value = values[k]
                value = value.as_nd_ndarray() if _is_np(value) else value
                if numpy.dtype(value.dtype) == numpy.dtype(dtype):
                    value.copyto(view)
                else:
                    ndarray.cast(value, dtype=dtype, out=view)
            if np_views:
                view = view.as_np_ndarray()
            self.views.append(view)
            self.index[id(view)] = k
            _BUFFERS[id(view)] = self


def position(array):
    """(FlatBuffer, member) of a view made by a FlatBuffer, else (None, None)."""
    buffer = _BUFFERS.get(id(array))
    if buffer is None:
        return None, None
    k = buffer.index.get(id(array))
    if k is None or buffer.views[k] is not array:
        return None, None
    return buffer, k


def flat_position(weight, grad, master):
    """The :class:`FlatAt` of a parameter whose weight, gradient (and master copy, where it
    is not the weight) are the same member of flat buffers of one layout, else None."""
    weights, k = position(weight)
    if weights is None or weights.role != "weight":
        return None
    grads, k_grad = position(grad)
    if grads is None or k_grad != k or grads.role != "grad" or grads.layout is not weights.layout:
        return None
    offset, size = weights.layout.offsets[k], weights.layout.sizes[k]
    if master is weight:
        return FlatAt(weights.array, grads.array, None, offset, size)
    masters, k_master = position(master)
    if (masters is None or k_master != k or masters.role != "master"
            or masters.layout is not weights.layout):
        return None
    return FlatAt(masters.array, grads.array, weights.array, offset, size)


def flat_run(slots):
    """(flat weight, flat grad, flat model weight or None, offset, sizes) where the tensors
    of a group lie side by side in the same flat buffers, in the group's order, and the step
    reads their gradients (no accumulated sums), else None."""
    first = slots[0].flat_at
    if first is None:
        return None
    expected = first.offset
    sizes = []
    for s in slots:
        at = s.flat_at
        # (with gradient accumulation the step's gradients are the sums, not the views)
        if (at is None or s.accum is not None or at.offset != expected
                or at.weight is not first.weight
                or at.grad is not first.grad or at.model is not first.model):
            return None
        sizes.append(at.size)
        expected += at.size
    return first.weight, first.grad, first.model, first.offset, sizes


def _on_cpu(buffer):
    # Flat masters and moments (and so mxlamb_step's flat mode) on the CPU only: the GPU's flat
    # mode is compiled but has not run on a GPU yet, so GPU parameters keep per-tensor states.
    return buffer.layout.context.device_type == "cpu"


class FlatStates:
    """One optimizer's float32 master copies and packed moments of contiguous parameters,
    laid out as their weights: member k's master at the weight's offset, its mean and var side
    by side at twice that offset. A run of consecutive parameters then has its masters in one
    array and its moments in another, as ``mxlamb_step``'s flat mode takes them."""

    def __init__(self):
        # weight (or master) FlatBuffer -> [[buffer or moment array, members handed out]]
        self._masters = weakref.WeakKeyDictionary()
        self._moments = weakref.WeakKeyDictionary()

    @staticmethod
    def _free(generations, k, make):
        """The first buffer of ``generations`` whose member k is not handed out yet (a state
        made twice, by a second optimizer state of the same parameter, gets its own)."""
        for generation in generations:
            if k not in generation[1]:
                generation[1].add(k)
                return generation[0]
        generations.append([make(), {k}])
        return generations[-1][0]

    def master(self, weight):
        """A float32 master copy of a float16/bfloat16 weight view (its values), itself a view
        of a flat master buffer; None for any other array."""
        weights, k = position(weight)
        if weights is None or weights.role != "weight" or not _on_cpu(weights):
            return None
        layout = weights.layout
        masters = self._free(self._masters.setdefault(weights, []), k, lambda: FlatBuffer(
            layout, numpy.float32, "master", _is_np(weight)))
        view = masters.views[k]
        source = weight.as_nd_ndarray() if _is_np(weight) else weight
        ndarray.cast(source, dtype=numpy.float32, out=masters.array[
            layout.offsets[k]:layout.offsets[k] + layout.sizes[k]].reshape(layout.shapes[k]))
        return view

    def moments(self, weight):
        """Zeroed (mean, var, (slab, offset, size)) views for a weight (or master) view, in a
        moment slab laid out as its buffer; None for any other array."""
        buffer, k = position(weight)
        if buffer is None or buffer.role not in ("weight", "master") or not _on_cpu(buffer):
            return None
        layout = buffer.layout
        slab = self._free(self._moments.setdefault(buffer, []), k, lambda: ndarray.zeros(
            (2 * layout.total,), layout.context, dtype=buffer.array.dtype))
        offset, size, shape = 2 * layout.offsets[k], layout.sizes[k], layout.shapes[k]
        mean = slab[offset:offset + size].reshape(shape)
        var = slab[offset + size:offset + 2 * size].reshape(shape)
        return mean, var, (slab, offset, size)
