"""Golden digests: the exact bits today's code produces, pinned for a fixed set of configurations.

Every configuration runs a few optimizer steps on fixed seeded inputs and hashes (sha256 of the
raw bytes, with dtype and shape) the weights, every optimizer state array (moments, master
copies, AMSGrad's max, EMA averages, accumulation sums) and what the optimizer shows in public
(num_update, skipped_steps, the LossScaler's state, trust_ratios()). The Gluon Trainer
configurations also hash the arrays of mxlamb.save_states' file, which holds the step state
and the device step counts. Each configuration runs on the lowest and the highest ISA level
this CPU has, and twice on the latter: the digests must agree (the kernels are bit-identical on
every level and for any thread count) and equal the recorded GOLDEN entry.

Only public API is used (mxlamb.LAMB / AdamW / LossScaler, mx.optimizer.get_updater and its
``states``, step / fused_step, gluon.Trainer, mxlamb.save_states), so the test survives a
restructure of private attributes and operators: a restructure that changes a digest changed
numbers.

Re-recording: ``python tests/test_golden.py --record`` (from the repository root) prints a new
GOLDEN dict computed with the mxlamb of this checkout. Re-record ONLY for a change of numbers
that is intended and explained in the same commit (a fixed bug, a new rounding), never to make
this test pass after a change that was meant to keep the numbers. A new configuration can be
added with its recorded digest without touching the others.

On MXNet 2.0 the same digests are expected (the kernels and the inputs are the same); a
configuration whose bits differ there because of MXNet's own operators (casts, the
accumulation's sums) would be skipped on 2.0 with the reason.
"""
import hashlib
import os
import sys

if __name__ == "__main__":  # --record: this checkout's mxlamb, not an installed one
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import mxlamb  # noqa: E402
from conftest import BFLOAT16, MXNET2, mx_array, mxnet1_only, supported_isas  # noqa: E402
from mxlamb import _library  # noqa: E402

STEPS = 4
# 70001 elements: above the packing limit (65,536), so its moments are its own arrays, and
# more than one 32768-element chunk; the others' moments share a slab on the CPU.
SHAPES = [(7,), (300,), (20, 30), (1,), (0,), (70001,)]
# 50 tensors: aggregate_num 45 leaves a second group of 5.
MANY = SHAPES + [(int(n),) for n in np.random.RandomState(99).randint(1, 2000, size=44)]
NO_EMPTY = [s for s in SHAPES if s != (0,)]
NAMES = ["enc_weight", "enc_bias", "ln_gamma", "ln_beta", "out_bias", "out_weight"]
BASE = {"learning_rate": 0.02}


def config(options=None, dtype="float32", via="updater", shapes=SHAPES, optimizer="LAMB",
           steps=STEPS, grad_scale=1.0, decay=1.0, nonfinite=(), loss_scaler=None):
    """One golden configuration. ``via``: 'updater' (mx.optimizer.get_updater, the 1.x
    entry), 'step' or 'fused_step' (called directly, the 2.0 entries), or 'trainer'
    (gluon.Trainer and mxlamb.save_states). ``dtype``: a dtype name or one per tensor.
    Gradients are ``grad_scale * decay**step * randn``; ``nonfinite`` puts
    (step, tensor, element, value) into them. ``loss_scaler``: LossScaler arguments."""
    return {"options": dict(BASE, **(options or {})), "dtype": dtype, "via": via,
            "shapes": shapes, "optimizer": optimizer, "steps": steps, "grad_scale": grad_scale,
            "decay": decay, "nonfinite": nonfinite, "loss_scaler": loss_scaler}


def _configs():
    mp = {"multi_precision": True}
    found = {
        "lamb-fp32": config(),
        "lamb-fp16-mp": config(mp, "float16"),
        "lamb-bf16-mp": config(mp, "bfloat16"),
        "lamb-mixed-dtypes-mp": config(mp, ["float32", "float16", "bfloat16"] * 2),
        "lamb-fp32-direct-fused_step": config(via="fused_step"),
        "lamb-fp32-direct-step": config(via="step"),
        "lamb-fp16-mp-direct-fused_step": config(mp, "float16", via="fused_step"),
        "lamb-bf16-mp-direct-step": config(mp, "bfloat16", via="step"),
    }
    for agg, label in ((1, "1"), (4, "4"), (45, "45"), (len(MANY) + 14, "whole")):
        found["lamb-fp32-agg" + label] = config({"aggregate_num": agg}, shapes=MANY)
    for agg, label in ((1, "1"), (45, "45"), (len(MANY) + 14, "whole")):
        found["lamb-fp16-mp-agg" + label] = config(dict(mp, aggregate_num=agg), "float16",
                                                   shapes=MANY)
    found["lamb-bf16-mp-agg45"] = config(dict(mp, aggregate_num=45), "bfloat16", shapes=MANY)

    # Each option alone, through the Updater's fused_step and step.
    inf_and_nan = ((1, 3, 0, np.inf), (2, 1, 17, np.nan))
    alone = {
        "wd": config({"wd": 0.01}),
        "bounds": config({"lower_bound": 2.0, "upper_bound": 20.0}),
        "no-bias-correction": config({"bias_correction": False}),
        "clip_gradient": config({"clip_gradient": 0.3}),
        "rescale_grad": config({"rescale_grad": 0.5}),
        "global_clipnorm": config({"global_clipnorm": 5.0}),
        "clipnorm": config({"clipnorm": 3.0}),
        # Overwrites after the 3rd applied step, then one more step: weights != averages.
        # Without the zero-size tensor: use_ema's create_state copies the weight, and MXNet
        # 1.9 cannot copy a zero-size array (a bug of its own, not pinned here).
        "ema": config({"use_ema": True, "ema_momentum": 0.9, "ema_overwrite_frequency": 3},
                      shapes=NO_EMPTY),
        # Two updates and one gradient pending in the sums.
        "accumulation": config({"gradient_accumulation_steps": 2}, steps=5),
        "loss_scale_factor": config({"loss_scale_factor": 64.0}, grad_scale=64.0),
        "skip_nonfinite": config({"skip_nonfinite": True}, nonfinite=inf_and_nan),
        "exclusions": config({"wd": 0.01, "param_idx2name": dict(enumerate(NAMES)),
                              "exclude_from_weight_decay": ["bias", "gamma", "beta"],
                              "exclude_from_layer_adaptation": ["bias", "ln_"]}),
        # Scale 256, growing after every clean step; the inf step is skipped and halves it.
        "loss_scaler-fp16-mp": config(mp, "float16", grad_scale=256.0,
                                      nonfinite=((1, 5, 4, np.inf),),
                                      loss_scaler={"init_scale": 256.0, "growth_interval": 1}),
        "adamw": config({"weight_decay": 0.05}, optimizer="AdamW"),
        # Shrinking gradients: AMSGrad's max differs from v.
        "adamw-amsgrad": config({"weight_decay": 0.05, "amsgrad": True}, optimizer="AdamW",
                                decay=0.5),
        "adamw-amsgrad-fp16-mp": config(dict(mp, weight_decay=0.05, amsgrad=True), "float16",
                                        optimizer="AdamW", decay=0.5),
    }
    for name, cfg in alone.items():
        found["%s-fused" % name] = cfg
        found["%s-step" % name] = dict(cfg, options=dict(cfg["options"], use_fused_step=False))

    # Gluon Trainer and mxlamb.save_states (MXNet 1.x): the step state and the device counts.
    # (NO_EMPTY: a 1.x Parameter of shape (0,) is one of unknown shape.)
    found["trainer-fp32-skip-ema-accum"] = config(
        {"wd": 0.01, "skip_nonfinite": True, "global_clipnorm": 5.0, "use_ema": True,
         "gradient_accumulation_steps": 2}, via="trainer", shapes=NO_EMPTY, steps=5,
        nonfinite=((2, 3, 0, np.inf),))
    found["trainer-fp16-mp-loss_scaler"] = config(
        dict(mp, wd=0.01), "float16", via="trainer", shapes=NO_EMPTY, grad_scale=256.0,
        nonfinite=((1, 4, 4, np.inf),), loss_scaler={"init_scale": 256.0, "growth_interval": 1})
    return found


CONFIGS = _configs()
# What a digest covers; GOLDEN holds one per part in this order.
PARTS = ("weights", "states", "optimizer")


# ------------------------------------------------------------------------------ digests

class Digest:
    """sha256 over arrays' dtype, shape and raw bytes, and plain values; 16 hex digits."""

    def __init__(self):
        self._hash = hashlib.sha256()

    def add(self, value):
        if value is None or isinstance(value, (int, float, str)):
            self._hash.update(repr(value).encode() + b";")
        elif isinstance(value, (list, tuple)):
            self._hash.update(b"(")
            for item in value:
                self.add(item)
            self._hash.update(b")")
        else:  # an NDArray (legacy or mx.np)
            dtype = "bfloat16" if np.dtype(value.dtype) == BFLOAT16 else np.dtype(value.dtype).name
            self._hash.update(("%s%r:" % (dtype, tuple(value.shape))).encode())
            if value.size:
                if dtype == "bfloat16":  # widening to float32 is exact
                    value = value.astype(np.float32)
                self._hash.update(np.ascontiguousarray(value.asnumpy()).tobytes())
        return self

    def hex(self):
        return self._hash.hexdigest()[:16]


def inputs(cfg):
    shapes, dtypes = cfg["shapes"], cfg["dtype"]
    if isinstance(dtypes, str):
        dtypes = [dtypes] * len(shapes)
    rng = np.random.RandomState(0)
    weights = [rng.randn(*s).astype(np.float32) for s in shapes]
    grads = [[(cfg["grad_scale"] * cfg["decay"] ** n * rng.randn(*s)).astype(np.float32)
              for s in shapes] for n in range(cfg["steps"])]
    for step, tensor, element, value in cfg["nonfinite"]:
        grads[step][tensor].reshape(-1)[element] = value
    return ([mx_array(w, d) for w, d in zip(weights, dtypes)],
            [[mx_array(g, d) for g, d in zip(step, dtypes)] for step in grads])


def make_optimizer(cfg):
    options = dict(cfg["options"])
    if cfg["loss_scaler"] is not None:
        options["loss_scaler"] = mxlamb.LossScaler(**cfg["loss_scaler"])
    return getattr(mxlamb, cfg["optimizer"])(**options)


def optimizer_digest(opt, extra=()):
    digest = Digest().add(opt.num_update).add(opt.skipped_steps)
    if opt.loss_scaler is not None:
        digest.add(opt.loss_scaler.state)
    ratios = opt.trust_ratios()  # by name: their order follows the operator calls' groups
    values = ratios.values.asnumpy() if ratios.keys else []
    digest.add(sorted((str(k), v.tobytes().hex()) for k, v in zip(ratios.keys, values)))
    return digest.add(list(extra)).hex()


def run(cfg):
    """The digests (a dict by PARTS) after the configuration's steps."""
    if cfg["via"] == "trainer":
        return run_trainer(cfg)
    weights, grads = inputs(cfg)
    opt = make_optimizer(cfg)
    indices = list(range(len(weights)))
    if cfg["via"] == "updater":
        updater = mx.optimizer.get_updater(opt)
        for step in grads:
            updater(indices, step, weights)
        states = updater.states
    else:
        created = [opt.create_state_multi_precision(i, w) for i, w in zip(indices, weights)]
        for step in grads:
            getattr(opt, cfg["via"])(indices, weights, step, created)
        states = dict(zip(indices, created))
    mx.nd.waitall()
    return {"weights": Digest().add(weights).hex(),
            "states": Digest().add([states[i] for i in sorted(states)]).hex(),
            "optimizer": optimizer_digest(opt)}


def run_trainer(cfg):
    from mxnet import gluon
    weights, grads = inputs(cfg)
    params = []
    for i, w in enumerate(weights):
        param = gluon.Parameter("golden%d_weight" % i, shape=w.shape, dtype=w.dtype)
        param.initialize(ctx=mx.cpu())
        param.set_data(w)
        params.append(param)
    opt = make_optimizer(cfg)
    trainer = gluon.Trainer(params, opt, kvstore=None)
    for step in grads:
        # d/dw sum(w * g) is g, exactly (and the Trainer sees fresh gradients).
        with mx.autograd.record():
            losses = [(param.data() * g).sum() for param, g in zip(params, step)]
        mx.autograd.backward(losses)
        trainer.step(1)
    mx.nd.waitall()
    return {"weights": Digest().add([p.data() for p in params]).hex(),
            "states": Digest().add(trainer_arrays(trainer)).hex(),
            "optimizer": optimizer_digest(opt, [opt.num_update])}


def trainer_arrays(trainer):
    """[key, array] of every state array, the device step counts and the step state, keyed as
    mxlamb 0.3's state files were (u0/<index>/<n>, opt/counts/0, opt/step_state/0), from the
    Trainer itself: the digests recorded then stay comparable whatever the file format."""
    arrays = {}

    def flatten(state, prefix):
        if isinstance(state, mx.nd.NDArray):
            arrays["%s/%d" % (prefix, len(arrays))] = state
        elif isinstance(state, (tuple, list)):
            for s in state:
                flatten(s, prefix)

    for index, state in trainer._updaters[0].states.items():
        flatten(state, "u0/%s" % index)
    opt = trainer._optimizer
    step_state = opt.counters.step_state(opt.options.loss_scaler, mx.cpu())
    if step_state is not None:
        arrays["opt/step_state/0"] = step_state
    counts = opt.counters.device_counts.get(mx.cpu())
    if counts is not None:
        arrays["opt/counts/0"] = counts
    return [[key, arrays[key]] for key in sorted(arrays)]


def isa_levels():
    """The lowest and the highest ISA level of this CPU."""
    levels = supported_isas()
    return sorted({levels[0], levels[-1]}, key=levels.index)


def run_on_every_level(name):
    """The configuration's digests on each level of isa_levels() and once more on the last:
    asserts they agree (ISA independence, determinism) and returns them."""
    before = _library.native.mxlamb_active_isa()
    results = []
    try:
        for level in isa_levels() + isa_levels()[-1:]:
            assert _library.native.mxlamb_set_isa(level.encode())
            results.append((level, run(CONFIGS[name])))
    finally:
        mx.nd.waitall()
        _library.native.mxlamb_set_isa(before)
    (first_level, first), (last_level, last), (_, again) = results[0], results[-2], results[-1]
    assert again == last, "%s: two runs on %s differ: %s, %s" % (name, last_level, last, again)
    assert first == last, ("%s: the ISA levels give other bits: %s %s, %s %s"
                           % (name, first_level, first, last_level, last))
    return first


def _format(golden):
    lines = ["GOLDEN = {"]
    for name, digests in golden.items():
        lines.append('    "%s": (%s),' % (name, ", ".join('"%s"' % digests[p] for p in PARTS)))
    return "\n".join(lines + ["}"])


# Recorded with `python tests/test_golden.py --record` (see the module docstring before
# changing an entry).
GOLDEN = {
    "lamb-fp32": ("6773eaa293228d0f", "88d42f8d36bbf504", "2222a4a418814c81"),
    "lamb-fp16-mp": ("4ac56b3a798a706d", "e1347017b213e212", "39586bfb2257a745"),
    "lamb-bf16-mp": ("c6c0723e07ae0bb8", "97a8232f637e56db", "fef6f2999383ba4c"),
    "lamb-mixed-dtypes-mp": ("5a426d7395ddca9b", "2771a4e342e17519", "ce9a11cf78be44b5"),
    "lamb-fp32-direct-fused_step": ("6773eaa293228d0f", "88d42f8d36bbf504", "2222a4a418814c81"),
    "lamb-fp32-direct-step": ("6773eaa293228d0f", "88d42f8d36bbf504", "2222a4a418814c81"),
    "lamb-fp16-mp-direct-fused_step": ("4ac56b3a798a706d", "e1347017b213e212", "39586bfb2257a745"),
    "lamb-bf16-mp-direct-step": ("c6c0723e07ae0bb8", "97a8232f637e56db", "fef6f2999383ba4c"),
    "lamb-fp32-agg1": ("bf0b3d9339e2e56f", "f8918da47067b880", "c47a38a25065ab2e"),
    "lamb-fp32-agg4": ("bf0b3d9339e2e56f", "f8918da47067b880", "c47a38a25065ab2e"),
    "lamb-fp32-agg45": ("bf0b3d9339e2e56f", "f8918da47067b880", "c47a38a25065ab2e"),
    "lamb-fp32-aggwhole": ("bf0b3d9339e2e56f", "f8918da47067b880", "c47a38a25065ab2e"),
    "lamb-fp16-mp-agg1": ("620e56781cfe2269", "1182a022269d03d9", "3a9bae4545975d67"),
    "lamb-fp16-mp-agg45": ("620e56781cfe2269", "1182a022269d03d9", "3a9bae4545975d67"),
    "lamb-fp16-mp-aggwhole": ("620e56781cfe2269", "1182a022269d03d9", "3a9bae4545975d67"),
    "lamb-bf16-mp-agg45": ("2c558d9fd56b1718", "adedb65d7cb1f5d1", "4830ef38761b137d"),
    "wd-fused": ("1f03f6cc90f70952", "88d42f8d36bbf504", "841e85dd9073d912"),
    "wd-step": ("1f03f6cc90f70952", "88d42f8d36bbf504", "841e85dd9073d912"),
    "bounds-fused": ("9415f61d80693953", "88d42f8d36bbf504", "a77bb325a8579f70"),
    "bounds-step": ("9415f61d80693953", "88d42f8d36bbf504", "a77bb325a8579f70"),
    "no-bias-correction-fused": ("db0fb67e412ec1d3", "88d42f8d36bbf504", "0b9538dcbb57dcaa"),
    "no-bias-correction-step": ("db0fb67e412ec1d3", "88d42f8d36bbf504", "0b9538dcbb57dcaa"),
    "clip_gradient-fused": ("bfa8f270a3c265b2", "db9c7c9b58deae78", "956461ee2ade0860"),
    "clip_gradient-step": ("bfa8f270a3c265b2", "db9c7c9b58deae78", "956461ee2ade0860"),
    "rescale_grad-fused": ("622a7f0678394e8d", "5fa6f490b86a1302", "c5defe1a2129715a"),
    "rescale_grad-step": ("622a7f0678394e8d", "5fa6f490b86a1302", "c5defe1a2129715a"),
    "global_clipnorm-fused": ("6d7d725c5acb2cef", "9bcc0c0b1298892d", "e9d2a887953533d5"),
    "global_clipnorm-step": ("6d7d725c5acb2cef", "9bcc0c0b1298892d", "e9d2a887953533d5"),
    "clipnorm-fused": ("603a24e3456d9373", "43731ac2684ccd5b", "01febd702b8f71d9"),
    "clipnorm-step": ("603a24e3456d9373", "43731ac2684ccd5b", "01febd702b8f71d9"),
    "ema-fused": ("45782a9b2da0ff91", "1f21b1d3caa1e551", "e7c13b45d89d36ae"),
    "ema-step": ("45782a9b2da0ff91", "1f21b1d3caa1e551", "e7c13b45d89d36ae"),
    "accumulation-fused": ("448206d380c3eab4", "96ceb3de9b17426b", "91110bca90421eda"),
    "accumulation-step": ("448206d380c3eab4", "96ceb3de9b17426b", "91110bca90421eda"),
    "loss_scale_factor-fused": ("6773eaa293228d0f", "88d42f8d36bbf504", "2222a4a418814c81"),
    "loss_scale_factor-step": ("6773eaa293228d0f", "88d42f8d36bbf504", "2222a4a418814c81"),
    "skip_nonfinite-fused": ("20244cc58277da9b", "25190f735bab0c06", "38a0ed05fc9b9d6d"),
    "skip_nonfinite-step": ("20244cc58277da9b", "25190f735bab0c06", "38a0ed05fc9b9d6d"),
    "exclusions-fused": ("2c9535228986b1fd", "88d42f8d36bbf504", "de1fabc3ad50acfe"),
    "exclusions-step": ("2c9535228986b1fd", "88d42f8d36bbf504", "de1fabc3ad50acfe"),
    "loss_scaler-fp16-mp-fused": ("7921ad2dd108e129", "bfd72bca60e0eba5", "6013d4c28c14f2ba"),
    "loss_scaler-fp16-mp-step": ("7921ad2dd108e129", "bfd72bca60e0eba5", "6013d4c28c14f2ba"),
    "adamw-fused": ("7a0783ddf278f555", "88d42f8d36bbf504", "75c1e662dd67088d"),
    "adamw-step": ("7a0783ddf278f555", "88d42f8d36bbf504", "75c1e662dd67088d"),
    "adamw-amsgrad-fused": ("f062320b41880120", "00e37c13cfb003c8", "75c1e662dd67088d"),
    "adamw-amsgrad-step": ("f062320b41880120", "00e37c13cfb003c8", "75c1e662dd67088d"),
    "adamw-amsgrad-fp16-mp-fused": ("c864fb371a277163", "cea59bea0158b189", "75c1e662dd67088d"),
    "adamw-amsgrad-fp16-mp-step": ("c864fb371a277163", "cea59bea0158b189", "75c1e662dd67088d"),
    "trainer-fp32-skip-ema-accum": ("22e1591b4c5b9530", "de449ebaaa648d40", "b8ccc53139e4ac0a"),
    "trainer-fp16-mp-loss_scaler": ("91728a5dc6934bcf", "b073ddcb8825b4a2", "9b71bca7e878cb08"),
}


# -------------------------------------------------------------------------------- tests

def _marks(name):
    return [mxnet1_only] if CONFIGS[name]["via"] == "trainer" else []


@pytest.mark.parametrize("name", [pytest.param(n, marks=_marks(n)) for n in CONFIGS])
def test_digests_equal_the_recorded_ones(name):
    got = run_on_every_level(name)
    assert name in GOLDEN, "%s has no recorded digest (python tests/test_golden.py --record)" % name
    recorded = dict(zip(PARTS, GOLDEN[name]))
    changed = [part for part in PARTS if got[part] != recorded[part]]
    assert not changed, (
        "%s: the numbers changed (%s: recorded %s, now %s). If that is intended, re-record and "
        "say why in the commit; see the module docstring" % (name, ", ".join(changed), recorded,
                                                             got))


def test_every_recorded_digest_has_its_configuration():
    assert sorted(GOLDEN) == sorted(CONFIGS)


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/test_golden.py --record   (prints a new GOLDEN dict)")
    print("# mxlamb from %s, mxnet %s, ISA levels %s" % (
        os.path.dirname(mxlamb.__file__), mx.__version__, isa_levels()), file=sys.stderr)
    print(_format({name: run_on_every_level(name) for name in CONFIGS
                   if not (MXNET2 and CONFIGS[name]["via"] == "trainer")}))
