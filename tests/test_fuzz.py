"""Property tests: random groups of tensors (0-size and 1-element included), dtypes, options
and extreme magnitudes (1e-30, 1e30, float32 denormals) through mxlamb.LAMB, against the
float64 reference. CI runs a bounded, derandomised number of examples
(MXLAMB_FUZZ_EXAMPLES, default 40)."""
import os

import mxnet as mx
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mxlamb
from conftest import TOLERANCE, mx_array, to_f64
from reference import ReferenceLAMB

SIZES = [0, 1, 2, 15, 16, 17, 100, 33000]
# (weight magnitude, gradient magnitude); the extreme ones on float32 only (fp16 has no such
# range). 1e-40 is a float32 denormal; 1e15 squared (1e30) still fits in float32.
FP32_SCALES = [(1.0, 1.0), (1e-30, 1.0), (1e30, 1.0), (1.0, 1e-30), (1.0, 1e-40), (1.0, 1e15),
               (1e-30, 1e-30)]

problems = st.fixed_dictionaries({
    "sizes": st.lists(st.sampled_from(SIZES), min_size=1, max_size=5),
    "dtype": st.sampled_from(["float32", "float32", "float16", "float64"]),
    "scales": st.sampled_from(FP32_SCALES),
    "beta1": st.sampled_from([0.0, 0.5, 0.9]),
    "beta2": st.sampled_from([0.0, 0.9, 0.999]),
    "epsilon": st.sampled_from([1e-8, 1e-6, 1e-2]),
    "wd": st.sampled_from([0.0, 0.01, 1.0]),
    "rescale_grad": st.sampled_from([1.0, 0.25]),
    "clip_gradient": st.sampled_from([None, 0.5]),
    "bounds": st.sampled_from([(None, None), (1e-3, None), (None, 10.0), (0.5, 2.0)]),
    "bias_correction": st.booleans(),
    "aggregate_num": st.integers(1, 4),
    "use_fused_step": st.booleans(),
    "steps": st.integers(1, 3),
    "seed": st.integers(0, 2 ** 16),
})


@settings(max_examples=int(os.environ.get("MXLAMB_FUZZ_EXAMPLES", "40")), deadline=None,
          derandomize=bool(os.environ.get("CI")),
          suppress_health_check=[HealthCheck.too_slow])
@given(problems)
def test_random_groups_match_the_reference(p):
    dtype = p["dtype"]
    w_scale, g_scale = p["scales"] if dtype in ("float32", "float64") else (1.0, 1.0)
    lower, upper = p["bounds"]
    steps = p["steps"]
    if lower is not None and w_scale < lower:
        # ||w|| clamped up to lower_bound makes the first step as large as lower_bound * lr,
        # so later steps subtract nearly equal numbers (w - lr * ratio * u with lr * ratio *
        # ||u|| ~ ||w||): an ill-conditioned trajectory where float32 and float64 part ways
        # legitimately. One step of it is well-conditioned and checked.
        steps = 1
    rng = np.random.RandomState(p["seed"])
    round_ = {"float32": lambda x: x.astype(np.float32).astype(np.float64),
              "float16": lambda x: x.astype(np.float16).astype(np.float64),
              "float64": lambda x: x}[dtype]
    weights = [round_(rng.randn(n) * w_scale) for n in p["sizes"]]
    grads = [[round_(rng.randn(n) * g_scale) for n in p["sizes"]] for _ in range(steps)]
    lr = 0.01
    opt = mxlamb.LAMB(learning_rate=lr, beta1=p["beta1"], beta2=p["beta2"],
                      epsilon=p["epsilon"], lower_bound=lower, upper_bound=upper,
                      bias_correction=p["bias_correction"], aggregate_num=p["aggregate_num"],
                      use_fused_step=p["use_fused_step"], wd=p["wd"],
                      rescale_grad=p["rescale_grad"], clip_gradient=p["clip_gradient"],
                      multi_precision=dtype == "float16")
    ref = ReferenceLAMB(beta1=p["beta1"], beta2=p["beta2"], epsilon=p["epsilon"],
                        lower_bound=lower, upper_bound=upper,
                        bias_correction=p["bias_correction"], rescale_grad=p["rescale_grad"],
                        clip_gradient=p["clip_gradient"])
    arrays = [mx_array(w, dtype) for w in weights]
    updater = mx.optimizer.get_updater(opt)
    for k, w in enumerate(weights):
        ref.init(k, w)
    for step in grads:
        before = [ref.weight[k].copy() for k in range(len(weights))]
        updater(list(range(len(arrays))), [mx_array(g, dtype) for g in step], arrays)
        for k, g in enumerate(step):
            ref.step(k, g, lr, p["wd"])
    rtol, atol = TOLERANCE[dtype]
    for k, array in enumerate(arrays):
        got = to_f64(array)
        assert np.all(np.isfinite(got)), "parameter %d is not finite" % k
        expected = ref.weight[k]
        # Denormal gradients carry a few bits only: allow a share of the step itself.
        step_size = np.max(np.abs(expected - before[k]), initial=0.0)
        share = 0.25 if g_scale < 1e-38 else 1e-3
        np.testing.assert_allclose(got, expected, rtol=rtol,
                                   atol=atol * max(w_scale, 1.0) + share * step_size,
                                   err_msg="parameter %d" % k)
