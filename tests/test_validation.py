"""Bad input is a clear error naming the argument or the parameter, and nothing is changed."""
import mxnet as mx
import numpy as np
import pytest

import mxlamb
from conftest import mx_array, to_f64


@pytest.mark.parametrize("kwargs,name", [
    ({"learning_rate": -0.1}, "learning_rate"), ({"learning_rate": np.nan}, "learning_rate"),
    ({"beta1": 1.0}, "beta1"), ({"beta2": -0.1}, "beta2"), ({"beta1": np.nan}, "beta1"),
    ({"epsilon": -1e-6}, "epsilon"), ({"epsilon": np.inf}, "epsilon"),
    ({"lower_bound": 2.0, "upper_bound": 1.0}, "lower_bound"),
    ({"lower_bound": -1.0}, "lower_bound"), ({"upper_bound": np.nan}, "upper_bound"),
    ({"aggregate_num": -1}, "aggregate_num"), ({"aggregate_num": 2.5}, "aggregate_num"),
    ({"aggregate_num": np.nan}, "aggregate_num"), ({"aggregate_num": True}, "aggregate_num"),
    ({"aggregate_num": "4"}, "aggregate_num"), ({"aggregate_num": -np.inf}, "aggregate_num"),
    ({"wd": -1.0}, "wd"), ({"wd": np.inf}, "wd"), ({"clip_gradient": np.nan}, "clip_gradient"),
    ({"clip_gradient": np.inf}, "clip_gradient"), ({"clip_gradient": "1"}, "clip_gradient"),
    ({"rescale_grad": -1.0}, "rescale_grad"), ({"rescale_grad": np.nan}, "rescale_grad"),
    ({"momentum": 0.9}, "momentum"), ({"bias_correction": "no"}, "bias_correction"),
    ({"use_fused_step": 1}, "use_fused_step")])
def test_bad_hyper_parameters(kwargs, name):
    with pytest.raises(ValueError, match=name):
        mxlamb.LAMB(**kwargs)


def bad_cases():
    w = lambda: mx_array(np.ones(4))
    yield "shape", w(), mx_array(np.ones(5))
    yield "gradient is float16", w(), mx_array(np.ones(4), "float16")
    yield "gradient is float64, weight is float32", w(), mx.nd.ones((4,), dtype="float64")
    yield "int32", mx.nd.ones((4,), dtype="int32"), mx.nd.ones((4,), dtype="int32")
    yield "row_sparse", w(), mx.nd.ones((4,)).tostype("row_sparse")


@pytest.mark.parametrize("case", list(bad_cases()), ids=lambda c: c[0])
def test_bad_arrays_at_step_time_name_the_parameter_and_change_nothing(case):
    match, bad_weight, bad_grad = case
    opt = mxlamb.LAMB(learning_rate=0.1, aggregate_num=2,
                      param_idx2name={0: "fc_weight", 1: "odd_weight"})
    updater = mx.optimizer.get_updater(opt)
    good = mx_array(np.ones(4))
    updater([0], [mx_array(np.ones(4))], [good])  # a first clean step
    before = to_f64(good)
    states_before = [to_f64(s) for s in updater.states[0]]
    with pytest.raises(ValueError, match="odd_weight.*" + match):
        # (int32 weights are refused by create_state, which the Updater calls for every
        # parameter of the call before it updates any.)
        updater([0, 1], [mx_array(np.ones(4)), bad_grad], [good, bad_weight])
    np.testing.assert_array_equal(to_f64(good), before)
    for s, b in zip(updater.states[0], states_before):
        np.testing.assert_array_equal(to_f64(s), b)


@pytest.mark.parametrize("option,value", [
    ("global_clipnorm", -1.0), ("global_clipnorm", 0.0), ("clipnorm", -0.5),
    ("clipnorm", float("nan")), ("ema_momentum", 1.0), ("ema_momentum", -0.1),
    ("ema_overwrite_frequency", 0), ("ema_overwrite_frequency", 2.5),
    ("gradient_accumulation_steps", 2.0), ("gradient_accumulation_steps", 0),
    ("loss_scale_factor", 0.0), ("use_ema", 1), ("skip_nonfinite", "yes"),
    ("exclude_from_weight_decay", ["bias", "(unclosed"]),
    ("exclude_from_layer_adaptation", "bias"), ("loss_scaler", 128.0),
])
def test_bad_option_values_raise_naming_the_option(option, value):
    with pytest.raises(ValueError, match=option):
        mxlamb.LAMB(**{option: value})
    with pytest.raises(ValueError, match=option):
        mxlamb.AdamW(**{option: value})


@pytest.mark.parametrize("kwargs,name", [
    ({"weight_decay": -1.0}, "weight_decay"), ({"amsgrad": 1}, "amsgrad"),
    ({"lower_bound": 1.0}, "lower_bound"), ({"epsilon": -1e-7}, "epsilon")])
def test_adamw_bad_values(kwargs, name):
    with pytest.raises(ValueError, match=name):
        mxlamb.AdamW(**kwargs)


@pytest.mark.parametrize("kwargs,name", [({"init_scale": 0.5}, "init_scale"),
                                         ({"growth_interval": 0}, "growth_interval")])
def test_loss_scaler_bad_values(kwargs, name):
    with pytest.raises(ValueError, match=name):
        mxlamb.LossScaler(**kwargs)
