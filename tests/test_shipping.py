"""Any model a Keras user writes reaches the probe's child: custom layers, subclassed models, notebooks.

Each case runs a real probe in the child and a short ``autobatch.fit``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

import autobatch
from autobatch import ModelError

HELPER = textwrap.dedent(
    """
    import keras
    from keras import ops

    class TokPos(keras.layers.Layer):  # a module the script imports after sys.path.insert, as the issue's user
        def __init__(self, maxlen, vocab, dim, **kwargs):
            super().__init__(**kwargs)
            self.maxlen, self.vocab, self.dim = maxlen, vocab, dim
            self.tok = keras.layers.Embedding(vocab, dim)
            self.pos = keras.layers.Embedding(maxlen, dim)

        def call(self, x):
            return self.tok(x) + self.pos(ops.arange(0, ops.shape(x)[-1]))

        def get_config(self):
            return {**super().get_config(), "maxlen": self.maxlen, "vocab": self.vocab, "dim": self.dim}
    """
)

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
    import keras, numpy as np, pandas as pd
    from keras import ops
    import autobatch
    from autobatch._memory import peak_rss_bytes
    from helper_layers import TokPos

    class Halve(keras.layers.Layer):  # defined in __main__: it can only travel by value
        def call(self, x):
            return x * 0.5

    def pair_loss(y_true, y_pred):
        return ops.mean(ops.square(y_true - y_pred), axis=-1)

    class AbsError(keras.metrics.Mean):
        def update_state(self, y_true, y_pred, sample_weight=None):
            return super().update_state(ops.abs(y_true - y_pred))

    class Stepped(keras.Model):  # its own train_step
        def train_step(self, data):
            logs = super().train_step(data)
            return {**logs, "own_step": ops.convert_to_tensor(1.0)}

    MAXLEN = 96
    tokens = keras.Input((None,), dtype="int32", name="tokens")
    h = TokPos(MAXLEN, 50, 32)(tokens)
    h = keras.layers.MultiHeadAttention(4, 16)(h, h)  # memory grows with length squared
    h = Halve()(h)
    h = keras.layers.Lambda(lambda t: t + 1.0)(h)
    out = keras.layers.Dense(1)(keras.layers.GlobalAveragePooling1D()(h))
    model = Stepped(tokens, out)
    model.compile("adam", loss=pair_loss, metrics=[AbsError()])

    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.geometric(1 / 20, 600), MAXLEN)
    lengths[:3] = MAXLEN  # the longest sequences exist: the worst case pads to them
    frame = pd.DataFrame({"tokens": [rng.integers(1, 50, n) for n in lengths], "label": rng.random(600)})

    def preprocess(x, y):
        return {"tokens": autobatch.padding.pad_sequences_batch(list(x["tokens"]), dtype="int32")}, y.to_numpy("float32")

    history = autobatch.fit(model, frame[["tokens"]], frame["label"], preprocess=preprocess, epochs=2,
                            ram_limit="3GiB", cache=False, max_batch_size=128)
    plan = history.autobatch_plan
    print(json.dumps({"batch": plan.batch_size, "predicted": plan.predicted_peak_bytes, "vmhwm": peak_rss_bytes(),
                      "trials": len(plan.probe.trials), "own_step": history.history.get("own_step"),
                      "loss": history.history["loss"]}))
    """
)


def test_a_script_model_with_main_classes_helpers_lambda_attention_and_custom_loss_is_probed_and_trained(tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "helper_layers.py").write_text(HELPER)
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    # Run as `python train.py` from elsewhere: the child imports neither __main__ nor lib/ by itself.
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd="/")
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["trials"] >= 3  # real steps ran in the child on the shipped model
    assert result["own_step"] == [1.0, 1.0]  # the model's own train_step trained here
    assert all(np.isfinite(result["loss"]))
    # The worst-case batch pads to the longest sequences: the prediction holds for the whole run.
    assert result["vmhwm"] <= 1.05 * result["predicted"], result



def _net_class(with_config: bool):
    import keras

    class SubNet(keras.Model):
        def __init__(self, units=8, thing=None, **kwargs):
            super().__init__(**kwargs)
            self.thing = thing
            self.hidden = keras.layers.Dense(units, activation="relu")
            self.out = keras.layers.Dense(1)

        def call(self, x):
            return self.out(self.hidden(x))

        def train_step(self, data):
            return super().train_step(data)

    if with_config:
        SubNet.get_config = lambda self: {**keras.Model.get_config(self), "units": self.hidden.units}
    return SubNet


def _frame() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(rng.random((300, 5)), columns=list("abcdy"))


def _arrays(x, y):
    return x.to_numpy("float32"), y.to_numpy("float32")


def _built(cls, **kwargs):
    model = cls(**kwargs)
    model.compile("adam", "mse")
    model(np.zeros((1, 4), "float32"))
    return model


def test_a_subclassed_model_with_its_own_train_step_and_config_is_rebuilt_in_the_child():
    model = _built(_net_class(with_config=True), units=16)
    history = autobatch.fit(model, _frame()[list("abcd")], _frame()["y"], preprocess=_arrays, epochs=1,
                            ram_limit="3GiB", cache=False, verbose=0)
    assert history.autobatch_plan.probe.model_params == model.count_params() == 4 * 16 + 16 + 16 + 1
    assert len(history.autobatch_plan.probe.trials) >= 3


def test_a_model_whose_config_does_not_round_trip_says_why_and_the_ways_out():
    model = _built(_net_class(with_config=False), units=16)  # Keras' own config keeps units=8
    with pytest.raises(ModelError) as excinfo:
        autobatch.plan(_frame()[list("abcd")], _frame()["y"], preprocess=_arrays, model=model, ram_limit="3GiB",
                       cache=False)
    message = str(excinfo.value)
    assert "SubNet rebuilt from its get_config() is not the caller's model" in message
    assert "register_keras_serializable" in message and "model_builder=" in message and "probe='in_process'" in message


def test_a_builder_or_an_in_process_probe_handles_what_cannot_travel():
    cls = _net_class(with_config=False)
    model = _built(cls, units=16, thing=object())
    before = [w.copy() for w in model.get_weights()]
    built = autobatch.plan(_frame()[list("abcd")], _frame()["y"], preprocess=_arrays, model=model, ram_limit="3GiB",
                           cache=False, model_builder=lambda: _built(cls, units=16))
    assert built.probe.model_params == model.count_params() and built.confirmed
    here = autobatch.plan(_frame()[list("abcd")], _frame()["y"], preprocess=_arrays, model=model, ram_limit="3GiB",
                          cache=False, probe="in_process")
    assert here.probe.model_params == model.count_params() and len(here.probe.trials) >= 3
    # The in-process trials trained the caller's model; its weights and optimizer are as they were.
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    assert int(model.optimizer.iterations.numpy()) == 0
    # A builder of another model is caught, not silently measured.
    with pytest.raises(ModelError, match="parameters"):
        autobatch.plan(_frame()[list("abcd")], _frame()["y"], preprocess=_arrays, model=model, ram_limit="3GiB",
                       cache=False, model_builder=lambda: _built(cls, units=4))
