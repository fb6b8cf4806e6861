"""float64 weights with every training option and AdamW, against the float64 reference."""
import numpy as np
import pytest

import mxlamb
from conftest import TOLERANCE, to_f64
from reference import ReferenceAdamW, ReferenceLAMB, ReferenceStep
from stepping import LR, WD, assert_close, problem, run_ref, run_updater


F64_RTOL, F64_ATOL = TOLERANCE["float64"]
F64_NAMES = {0: "a_weight", 1: "a_bias", 2: "b_weight", 3: "b_bias", 4: "c_weight"}
# option set -> (LAMB options, ReferenceStep options); the problem's step 2 has an inf in
# parameter 3 and its steps are scaled by 8 where a loss scale is on.
F64_CASES = {
    "global_clipnorm": (dict(global_clipnorm=2.5), dict(global_clipnorm=2.5)),
    "clipnorm": (dict(clipnorm=1.5, clip_gradient=0.4), dict(clipnorm=1.5)),
    "ema": (dict(use_ema=True, ema_momentum=0.8), dict(ema_momentum=0.8)),
    "accumulation": (dict(gradient_accumulation_steps=2), {}),
    "loss_scale_factor": (dict(loss_scale_factor=8.0), dict(loss_scale=8.0)),
    "loss_scaler": (dict(multi_precision=True), dict(skip_nonfinite=True)),
    "skip_nonfinite": (dict(skip_nonfinite=True), dict(skip_nonfinite=True)),
    "exclusions": (dict(param_idx2name=F64_NAMES, exclude_from_weight_decay=["bias"],
                        exclude_from_layer_adaptation=["bias", "c_"]),
                   dict(no_decay=[1, 3], no_adaptation=[1, 3, 4])),
}


def run_float64_case(case, fused):
    options, ref_options = F64_CASES[case]
    weights, grads = problem(steps=4, scale=2.0)
    weights = [w.astype(np.float64) * 1.1 for w in weights]  # bits float32 cannot hold
    grads = [[g.astype(np.float64) * 1.1 for g in step] for step in grads]
    if case in ("loss_scaler", "skip_nonfinite"):
        grads[2][3] = np.array([np.inf])
    feed = grads
    if case in ("loss_scale_factor", "loss_scaler"):
        feed = [[g * 8.0 for g in step] for step in grads]
        if case == "loss_scaler":  # the scale halves after the skipped step 2: 8, 8, 8, 4
            feed[3] = [g * 4.0 for g in grads[3]]
            options = dict(options, loss_scaler=mxlamb.LossScaler(init_scale=8.0,
                                                                  growth_interval=100))
    opt = mxlamb.LAMB(learning_rate=LR, wd=WD, aggregate_num=2, use_fused_step=fused,
                      **options)
    actual, updater = run_updater(opt, weights, feed, dtype="float64")
    ref = ReferenceStep(ReferenceLAMB(clip_gradient=options.get("clip_gradient")),
                        **ref_options)
    if case == "accumulation":
        grads = [[(a + b) / 2 for a, b in zip(grads[n], grads[n + 1])] for n in (0, 2)]
    expected = run_ref(ref, weights, feed if case == "loss_scale_factor" else grads)
    return opt, updater, actual, expected, ref


@pytest.mark.parametrize("case", list(F64_CASES))
def test_every_option_on_float64_weights(case):
    """float64 weights are updated in float64 (moments, raw update, norms) with each training
    option: weights and every state float64 and within a few ulps of the reference;
    step and fused_step bit-identical."""
    results = []
    for fused in (True, False):
        opt, updater, actual, expected, ref = run_float64_case(case, fused)
        assert_close(actual, expected, F64_RTOL, F64_ATOL)
        for k in range(len(actual)):
            state = updater.states[k]
            assert all(np.dtype(a.dtype) == np.float64 for a in state), case
            np.testing.assert_allclose(to_f64(state[0]), ref.inner.mean[k], F64_RTOL, F64_ATOL)
            np.testing.assert_allclose(to_f64(state[1]), ref.inner.var[k], F64_RTOL, F64_ATOL)
            if case == "ema":
                np.testing.assert_allclose(to_f64(state[2]), ref.average[k], F64_RTOL,
                                           F64_ATOL)
        if case in ("loss_scaler", "skip_nonfinite"):
            assert opt.skipped_steps == ref.skipped == 1
        results.append(actual + [to_f64(a) for k in sorted(updater.states)
                                 for a in updater.states[k]])
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adamw_on_float64_weights(amsgrad):
    weights, grads = problem(steps=5)
    weights = [w.astype(np.float64) * 1.1 for w in weights]
    grads = [[g.astype(np.float64) * 0.5 ** n for g in step] for n, step in enumerate(grads)]
    opt = mxlamb.AdamW(learning_rate=0.01, weight_decay=0.05, amsgrad=amsgrad, aggregate_num=3)
    actual, updater = run_updater(opt, weights, grads, dtype="float64")
    ref = ReferenceAdamW(amsgrad=amsgrad)
    for k, w in enumerate(weights):
        ref.init(k, w)
    for step in grads:
        for k, g in enumerate(step):
            ref.step(k, g, 0.01, 0.05)
    assert_close(actual, [ref.weight[k] for k in range(len(weights))], F64_RTOL, F64_ATOL)
    assert all(np.dtype(a.dtype) == np.float64 for k in updater.states
               for a in updater.states[k])


def test_global_clipnorm_spans_float32_and_float64_groups():
    """float32 and float64 parameters reach the optimizer in two Updater calls (and two
    operator calls, one per math type); the global norm is over both."""
    weights, grads = problem(scale=3.0)
    opt = mxlamb.LAMB(learning_rate=LR, wd=WD, global_clipnorm=2.0)
    actual, updater = run_updater(opt, weights, grads, dtype="float64", mixed=True)
    assert [np.dtype(updater.states[k][0].dtype).name for k in range(len(weights))] == [
        "float64", "float32", "float64", "float32", "float64"]
    expected = run_ref(ReferenceStep(ReferenceLAMB(), global_clipnorm=2.0), weights, grads)
    assert_close(actual, expected)
