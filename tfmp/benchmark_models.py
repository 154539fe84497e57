"""The models `tfmp.benchmark` trains, and their synthetic batches: keras.layers only.

Every model runs on any Keras backend and ends in `tfmp.layers.OutputHead`, so
its output (and the loss) is float32 under every policy. The default sizes are
the published ones, with dimensions that are multiples of 8 (tensor cores);
the size arguments shrink them for a CPU smoke run.

- `resnet50` (and `mobilenet_v2`, `efficientnet_b0`): `keras.applications`,
  random weights, 224x224 images, 1000 classes (`image_size` shrinks them, to 32
  at least); `resnet_mini`: `tfmp.models`' small ResNet on 32x32 images.
- `transformer`: a BERT-base encoder: token and position embeddings of a
  30528-token vocabulary (BERT's 30522 rounded up to a multiple of 8, as NVIDIA
  does), `num_layers=12` post-norm blocks of `keras.layers.MultiHeadAttention`
  (`num_heads=12`) and a GELU feed-forward block (`ff_dim=4*hidden`), hidden
  768, `seq_len=512` tokens, `tfmp.layers.LayerNormalization` (float32
  statistics); no dropout, so every step does the same work.
- `mlp`: `num_layers=8` Dense(`hidden=4096`, relu) layers on 4096 features.

A `.keras` file is converted per policy with `tfmp.convert.apply_policy` and fed
random inputs of its own shapes.
"""

from __future__ import annotations

import dataclasses

VOCAB_SIZE = 30528
CLASSES = {"resnet_mini": 10, "transformer": 8}  # Other models: ImageNet's 1000.
# Per model: its sizes' defaults and batch size (keras.applications models: 224x224, 256).
DEFAULTS = {
    "transformer": dict(hidden=768, num_heads=12, seq_len=512, ff_dim=None, num_layers=12,
                        batch_size=32),
    "mlp": dict(hidden=4096, num_layers=8, batch_size=8192),
    "resnet_mini": dict(image_size=32, batch_size=32),
}
_SIZES = ("image_size", "hidden", "num_heads", "seq_len", "ff_dim", "num_layers")


def model_names() -> tuple[str, ...]:
    """The names `--model` takes."""
    from tfmp import models

    return models.IMAGE_MODELS + ("transformer", "mlp")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """What to build and feed: a named model and the sizes it uses, or a `.keras` file."""

    name: str
    model_file: str | None = None
    image_size: int | None = None
    hidden: int | None = None
    num_heads: int | None = None
    seq_len: int | None = None
    ff_dim: int | None = None
    num_layers: int | None = None

    def sizes(self) -> dict:
        """The sizes the model uses (for the results' config)."""
        return {k: getattr(self, k) for k in _SIZES if getattr(self, k) is not None}


def resolve(model: str, model_file: str | None = None, **sizes) -> tuple[ModelConfig, int]:
    """Fills in the model's default sizes and checks them.

    Args:
        model: A name from `model_names()` (ignored when `model_file` is given).
        model_file: A `.keras` file instead.
        **sizes: `batch_size`, `image_size`, `hidden`, `num_heads`, `seq_len`,
            `ff_dim`, `num_layers`; None (or absent) takes the model's default
            (`DEFAULTS`; `ff_dim`: 4 * `hidden`), sizes the model does not use
            are ignored.

    Returns:
        `(config, batch_size)`.

    Raises:
        ValueError: for an unknown model, a size that is not a positive
            integer, a head count that does not divide `hidden`, or images
            smaller than the model takes.
    """
    from tfmp import _checks, cli, models

    given = {k: v for k, v in sizes.items() if v is not None}
    if model_file is not None:
        cli.check_keras_file(model_file, argument="model_file")
        config, defaults = ModelConfig("file", model_file=model_file), {"batch_size": 32}
    elif model not in model_names():
        raise ValueError(f"Unknown `model`: {model!r}. Expected one of: "
                         f"{', '.join(model_names())}.")
    else:
        defaults = DEFAULTS.get(model, {"image_size": 224, "batch_size": 256})
        used = {k: given.get(k, v) for k, v in defaults.items() if k != "batch_size"}
        for name, value in sorted(used.items()):
            if name != "image_size" and value is not None:
                _checks.integer(name, value)
        if "image_size" in used:
            models.validate_image_model(model, image_size=used["image_size"])
        if model == "transformer":
            used["ff_dim"] = used["ff_dim"] or 4 * used["hidden"]
            if used["hidden"] % used["num_heads"]:
                raise ValueError(f"`num_heads` must divide `hidden` ({used['hidden']}). "
                                 f"Received: num_heads={used['num_heads']}")
        config = ModelConfig(model, **used)
    batch_size = given.get("batch_size", defaults["batch_size"])
    _checks.integer("batch_size", batch_size)
    return config, batch_size


def _jax_platform() -> str:
    import jax

    return jax.devices()[0].platform


def _transformer(c: ModelConfig):
    import keras

    from tfmp import layers, models

    tokens = keras.Input((c.seq_len,), dtype="int32", name="tokens")
    x = models.TokenAndPositionEmbedding(c.seq_len, VOCAB_SIZE, c.hidden)(tokens)
    x = layers.LayerNormalization()(x)
    # Keras' fused path (ops.dot_product_attention: cuDNN flash attention on a GPU) needs a
    # float16 x float16 -> float32 dot_general that JAX's CPU backend lacks ("The precision
    # 'F16_F16_F32' is not supported by dot_general on CPU", JAX 0.10): asking for the scores
    # takes the einsum path there.
    einsum_path = keras.backend.backend() == "jax" and _jax_platform() == "cpu"
    for _ in range(c.num_layers):
        attention = keras.layers.MultiHeadAttention(c.num_heads, c.hidden // c.num_heads)(
            x, x, return_attention_scores=einsum_path)
        attention = attention[0] if einsum_path else attention
        x = layers.LayerNormalization()(x + attention)
        ff = keras.layers.Dense(c.hidden)(keras.layers.Dense(c.ff_dim, activation="gelu")(x))
        x = layers.LayerNormalization()(x + ff)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(tokens, layers.OutputHead(CLASSES["transformer"], name="probs")(x),
                       name="transformer")


def _mlp(c: ModelConfig):
    import keras

    from tfmp import layers

    inputs = keras.Input((c.hidden,), name="features")
    x = inputs
    for _ in range(c.num_layers):
        x = keras.layers.Dense(c.hidden, activation="relu")(x)
    return keras.Model(inputs, layers.OutputHead(1000, name="probs")(x), name="mlp")


def build(config: ModelConfig, policy: str):
    """The model under `policy` (uncompiled), from the current Keras seed."""
    import tfmp
    from tfmp import cli, convert, models

    if config.model_file is not None:
        loaded = cli.load_keras_file(config.model_file, argument="model_file")
        return convert.apply_policy(loaded, policy)
    with tfmp.policy_scope(policy):
        if config.name == "transformer":
            return _transformer(config)
        if config.name == "mlp":
            return _mlp(config)
        side = config.image_size
        return models.image_classifier(config.name, (side, side, 3),
                                       CLASSES.get(config.name, 1000))


def synthetic_batch(model, batch_size: int, seed: int) -> tuple:
    """A random batch `(x, y)` (NumPy) of `model`'s input shapes, with integer labels.

    Float inputs are uniform in [0, 1), integer inputs (token ids) in [1, 30528)
    or [0, 2) for a `.keras` model's, labels in [0, classes).

    Raises:
        ValueError: for an input with an unknown non-batch dimension, or a model
            with more than one output.
    """
    import keras
    import numpy as np

    rng = np.random.default_rng(seed)
    xs = []
    for t in model.inputs:
        shape = (batch_size,) + tuple(t.shape[1:])
        if any(d is None for d in shape):
            raise ValueError(f"Input {t.name!r} has an unknown dimension {tuple(t.shape)}; "
                             "the benchmark needs static shapes.")
        if keras.backend.is_float_dtype(t.dtype):
            xs.append(rng.uniform(size=shape).astype(t.dtype))
        else:
            high = VOCAB_SIZE if model.name == "transformer" else 2
            xs.append(rng.integers(high > 2, high, size=shape).astype(t.dtype))
    if len(model.outputs) != 1:
        raise ValueError(f"The model must have one output; it has {len(model.outputs)}.")
    classes = int(model.outputs[0].shape[-1] or 1)
    y = rng.integers(0, classes, size=(batch_size,)).astype("int32")
    return (xs[0] if len(xs) == 1 else xs), y
