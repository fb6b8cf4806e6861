"""Record reference trajectories from the real Keras 3 optimizers (Lamb, AdamW).

Run with Keras 3 and JAX in their own virtualenv (never mxlamb's), e.g. `make keras-reference`:

    KERAS_BACKEND=jax .venv-keras/bin/python tests/keras_reference/record.py \
        [--out tests/data/keras_trajectories.npz]

For each case it builds three float32 keras.Variables, an optimizer from the case's kwargs, and
calls `opt.apply(grads, variables)` step by step with seeded NumPy gradients, recording the
weights (and EMA averages) after every step, the learning rate read before each step and the
iteration counter after it. It also records the errors Keras raises for some bad arguments.

Output: numpy.savez_compressed with
    "__meta__"                      uint8 array of UTF-8 JSON (versions, cases, errors)
    "<case>/init/<k>"               initial value of variable k (0..2)
    "<case>/grad/<s>/<k>"           gradient passed to apply() at step s (as passed: loss-scaled
                                    where the case has loss_scale_factor)
    "<case>/weight/<s>/<k>"         variable k after step s
    "<case>/average/<s>/<k>"        its moving average after step s (only with use_ema)
    "<case>/lr"                     float(opt.learning_rate) read before each apply(), (steps,)
    "<case>/iterations"             int(opt._iterations) after each apply(), (steps,): every call
                                    counts, accumulating or not
    "<case>/iterations_public"      int(opt.iterations) after each apply(): the same, floor-divided
                                    by gradient_accumulation_steps where that is set (what update
                                    steps use for bias correction and EMA)
"""
import argparse
import io
import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

import jax  # noqa: E402
import keras  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, os.pardir, "data", "keras_trajectories.npz")

VARIABLES = [("dense_kernel", (3, 4)), ("dense_bias", (4,)), ("ln_gamma", (2, 3, 2))]
BIAS = 1
ALL_ZERO_STEP = 5     # every gradient is zero at this step (in every case long enough)
BIAS_ZERO_STEP = 2    # the dense_bias gradient is zero at this step

SCHEDULE = {"schedule": "ExponentialDecay", "initial_learning_rate": 0.01,
            "decay_steps": 1, "decay_rate": 0.9}

# name, optimizer, kwargs, exclude, extra options (steps, grad_scale, all_zero, bias_init).
# grad_scale: gradients are standard normal times this (chosen so that clipping cases clip
# some gradients and not others). loss_scale: the gradients passed are the plain ones times it.
CASES = [
    ("lamb_defaults", "Lamb", {}, None, {}),
    ("lamb_betas_eps", "Lamb", {"beta_1": 0.8, "beta_2": 0.99, "epsilon": 1e-5}, None, {}),
    ("lamb_wd", "Lamb", {"learning_rate": 0.01, "weight_decay": 0.01}, None, {}),
    ("lamb_wd_lr1_zero_grads", "Lamb", {"learning_rate": 1.0, "weight_decay": 0.004}, None,
     {"steps": 3, "all_zero": True, "bias_init": 2.0}),
    ("lamb_wd_exclude_names", "Lamb", {"learning_rate": 0.01, "weight_decay": 0.01},
     {"var_names": ["bias"]}, {}),
    ("lamb_wd_exclude_list", "Lamb", {"learning_rate": 0.01, "weight_decay": 0.01},
     {"var_list": [2]}, {}),
    ("lamb_clipnorm", "Lamb", {"clipnorm": 0.5}, None, {"grad_scale": 0.2}),
    ("lamb_global_clipnorm", "Lamb", {"global_clipnorm": 0.5}, None, {"grad_scale": 0.2}),
    ("lamb_clipvalue", "Lamb", {"clipvalue": 0.05}, None, {"grad_scale": 0.05}),
    ("lamb_loss_scale", "Lamb", {"loss_scale_factor": 128.0}, None, {"loss_scale": 128.0}),
    ("lamb_accumulation", "Lamb", {"gradient_accumulation_steps": 3, "learning_rate": 0.01},
     None, {}),
    ("lamb_ema", "Lamb", {"use_ema": True, "ema_momentum": 0.9, "learning_rate": 0.01},
     None, {}),
    ("lamb_ema_overwrite", "Lamb", {"use_ema": True, "ema_momentum": 0.9,
                                    "ema_overwrite_frequency": 3, "learning_rate": 0.01},
     None, {}),
    ("lamb_accum_ema_overwrite", "Lamb", {"gradient_accumulation_steps": 2, "use_ema": True,
                                          "ema_momentum": 0.9, "ema_overwrite_frequency": 2,
                                          "learning_rate": 0.01}, None, {}),
    ("lamb_schedule", "Lamb", {"learning_rate": SCHEDULE}, None, {}),
    ("lamb_schedule_accum", "Lamb", {"learning_rate": SCHEDULE,
                                     "gradient_accumulation_steps": 2}, None, {}),
    ("lamb_combined", "Lamb", {"learning_rate": 0.01, "weight_decay": 0.01,
                               "global_clipnorm": 1.0, "gradient_accumulation_steps": 2,
                               "use_ema": True, "ema_momentum": 0.8},
     {"var_names": ["gamma"]}, {"grad_scale": 0.2}),
    ("adamw_defaults", "AdamW", {}, None, {}),
    ("adamw_wd0", "AdamW", {"weight_decay": 0.0}, None, {}),
    ("adamw_amsgrad", "AdamW", {"amsgrad": True, "learning_rate": 0.01}, None, {}),
    ("adamw_amsgrad_accum", "AdamW", {"amsgrad": True, "gradient_accumulation_steps": 2,
                                      "learning_rate": 0.01}, None, {}),
    ("adamw_exclude_clipvalue", "AdamW", {"learning_rate": 0.01, "weight_decay": 0.01,
                                          "clipvalue": 0.05},
     {"var_names": ["bias"]}, {"grad_scale": 0.05}),
    ("adamw_ema_overwrite", "AdamW", {"use_ema": True, "ema_momentum": 0.9,
                                      "ema_overwrite_frequency": 2, "learning_rate": 0.01},
     None, {}),
    ("adamw_global_clipnorm_loss_scale", "AdamW", {"global_clipnorm": 0.5,
                                                   "loss_scale_factor": 64.0},
     None, {"grad_scale": 0.2, "loss_scale": 64.0}),
]

ERRORS = [
    ("Lamb(clipnorm=1, clipvalue=1)", lambda: keras.optimizers.Lamb(clipnorm=1, clipvalue=1)),
    ("Lamb(gradient_accumulation_steps=1)",
     lambda: keras.optimizers.Lamb(gradient_accumulation_steps=1)),
    ("Lamb(use_ema=True, ema_momentum=1.5)",
     lambda: keras.optimizers.Lamb(use_ema=True, ema_momentum=1.5)),
    ("Lamb(use_ema=True, ema_overwrite_frequency=0)",
     lambda: keras.optimizers.Lamb(use_ema=True, ema_overwrite_frequency=0)),
    ("AdamW(weight_decay=None)", lambda: keras.optimizers.AdamW(weight_decay=None)),
    ('Lamb(learning_rate="x")', lambda: keras.optimizers.Lamb(learning_rate="x")),
    ("Lamb(foo=1)", lambda: keras.optimizers.Lamb(foo=1)),
]


def _learning_rate(value):
    if isinstance(value, dict):
        assert value["schedule"] == "ExponentialDecay"
        return keras.optimizers.schedules.ExponentialDecay(
            initial_learning_rate=value["initial_learning_rate"],
            decay_steps=value["decay_steps"], decay_rate=value["decay_rate"])
    return value


def _build_optimizer(kind, kwargs):
    kwargs = dict(kwargs)
    if "learning_rate" in kwargs:
        kwargs["learning_rate"] = _learning_rate(kwargs["learning_rate"])
    return getattr(keras.optimizers, kind)(**kwargs)


def _gradients(rng, step, scale, all_zero):
    grads = [(rng.standard_normal(shape) * scale).astype(np.float32)
             for _, shape in VARIABLES]
    if all_zero or step == ALL_ZERO_STEP:
        grads = [np.zeros_like(g) for g in grads]
    if step == BIAS_ZERO_STEP:
        grads[BIAS] = np.zeros_like(grads[BIAS])
    return grads


def record_case(index, name, kind, kwargs, exclude, extra, arrays):
    steps = extra.get("steps", 9)
    grad_scale = extra.get("grad_scale", 1.0)
    loss_scale = extra.get("loss_scale", None)
    seed = 1234 + index
    keras.utils.set_random_seed(seed)

    init_rng = np.random.RandomState(seed)
    inits = [(init_rng.standard_normal(shape) * 0.5).astype(np.float32)
             for _, shape in VARIABLES]
    if "bias_init" in extra:
        inits[BIAS] = np.full(VARIABLES[BIAS][1], extra["bias_init"], np.float32)
    variables = [keras.Variable(value, name=vname, dtype="float32")
                 for value, (vname, _) in zip(inits, VARIABLES)]
    names = [v.name for v in variables]
    assert names == [vname for vname, _ in VARIABLES], names
    assert all(str(v.dtype) == "float32" for v in variables)

    opt = _build_optimizer(kind, kwargs)
    if exclude is not None:
        if "var_names" in exclude:
            opt.exclude_from_weight_decay(var_names=exclude["var_names"])
        else:
            opt.exclude_from_weight_decay(var_list=[variables[i] for i in exclude["var_list"]])
    use_ema = bool(kwargs.get("use_ema", False))

    for k, value in enumerate(inits):
        arrays[f"{name}/init/{k}"] = value
    grad_rng = np.random.RandomState(seed + 10000)
    lrs, iterations, public_iterations = [], [], []
    for s in range(steps):
        grads = _gradients(grad_rng, s, grad_scale, extra.get("all_zero", False))
        if loss_scale is not None:
            grads = [(g * np.float32(loss_scale)).astype(np.float32) for g in grads]
        lrs.append(float(opt.learning_rate))
        opt.apply([g.copy() for g in grads], variables)
        iterations.append(int(np.asarray(opt._iterations)))
        public_iterations.append(int(np.asarray(opt.iterations)))
        for k, g in enumerate(grads):
            arrays[f"{name}/grad/{s}/{k}"] = g
        for k, v in enumerate(variables):
            w = np.asarray(v.value, dtype=np.float32)
            assert np.all(np.isfinite(w)), (name, s, k)
            arrays[f"{name}/weight/{s}/{k}"] = w
        if use_ema:
            for k in range(len(variables)):
                arrays[f"{name}/average/{s}/{k}"] = np.asarray(
                    opt._model_variables_moving_average[k].value, dtype=np.float32)
    arrays[f"{name}/lr"] = np.asarray(lrs, dtype=np.float64)
    arrays[f"{name}/iterations"] = np.asarray(iterations, dtype=np.int64)
    arrays[f"{name}/iterations_public"] = np.asarray(public_iterations, dtype=np.int64)

    meta = {"name": name, "optimizer": kind, "kwargs": kwargs, "exclude": exclude,
            "names": names, "steps": steps, "use_ema": use_ema,
            # how the gradients were made (informational; the gradients themselves are stored)
            "seed": seed, "grad_scale": grad_scale, "loss_scale": loss_scale,
            "all_zero_steps": (list(range(steps)) if extra.get("all_zero")
                               else [s for s in [ALL_ZERO_STEP] if s < steps]),
            "bias_zero_steps": [s for s in [BIAS_ZERO_STEP] if s < steps]}
    return meta


def record_errors():
    errors = []
    for call, make in ERRORS:
        try:
            make()
        except Exception as e:  # noqa: BLE001 - recording whatever Keras raises
            errors.append({"call": call, "type": type(e).__name__, "message": str(e)})
        else:
            errors.append({"call": call, "type": None, "message": None})
    return errors


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    backend = keras.backend.backend()
    if backend != "jax":
        sys.exit(f"record.py needs KERAS_BACKEND=jax, got {backend!r}")
    print(f"keras {keras.__version__}, jax {jax.__version__}, backend {backend}, "
          f"devices {jax.devices()}")

    arrays, cases = {}, []
    for index, (name, kind, kwargs, exclude, extra) in enumerate(CASES):
        cases.append(record_case(index, name, kind, kwargs, exclude, extra, arrays))
    meta = {"keras": keras.__version__, "jax": jax.__version__, "backend": backend,
            "cases": cases, "errors": record_errors()}
    blob = json.dumps(meta, indent=1, sort_keys=True).encode("utf-8")
    arrays["__meta__"] = np.frombuffer(blob, dtype=np.uint8)

    out = os.path.normpath(args.out)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    with open(out, "wb") as f:
        f.write(buf.getvalue())
    print(f"wrote {out}: {len(cases)} cases, {len(meta['errors'])} errors, "
          f"{len(arrays)} arrays, {os.path.getsize(out)} bytes")
    for e in meta["errors"]:
        print(f"  {e['call']}: {e['type']}: {e['message']}")


if __name__ == "__main__":
    main()
