"""Models the recipes and tools train: image classifiers and a Transformer text classifier.

Every model ends in `tfmp.layers.OutputHead`, so its output is float32 under any
policy; attention and normalisation use tfmp's float32-safe layers.

Example:

    with tfmp.policy_scope("mixed_float16"):
        model = tfmp.models.image_classifier("resnet_mini", (32, 32, 3), 10)
"""

from __future__ import annotations

import keras

from tfmp import _checks
from tfmp import layers as tfmp_layers

_APPLICATIONS = {
    "mobilenet_v2": "MobileNetV2",
    "resnet50": "ResNet50",
    "efficientnet_b0": "EfficientNetB0",
}
IMAGE_MODELS = ("resnet_mini",) + tuple(_APPLICATIONS)
# The smallest image side each model builds with. keras.applications refuse
# inputs under 32x32 without ImageNet weights (`obtain_input_shape(min_size=32)`);
# tried on Keras 3.15: 31 fails and every side from 32 on builds and runs, for
# all three. resnet_mini pads its convolutions, so any side works.
MIN_IMAGE_SIZE = {"resnet_mini": 1, **{name: 32 for name in _APPLICATIONS}}


def validate_image_model(name: str, image_size: int | None = None) -> str:
    """Returns `name` if it is in `IMAGE_MODELS`, else raises `ValueError`.

    Args:
        name: The model name.
        image_size: If given, the (smallest) image side, which must be at least
            `MIN_IMAGE_SIZE[name]`.

    Raises:
        ValueError: for an unknown model, or an image side the model cannot take.
    """
    if name not in IMAGE_MODELS:
        raise ValueError(
            f"Unknown `model`: {name!r}. Expected one of: {', '.join(IMAGE_MODELS)}.")
    least = MIN_IMAGE_SIZE[name]
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(
            image_size, int) or image_size < least):
        raise ValueError(
            f"`image_size` must be an integer >= {least} for model={name!r} "
            f"(keras.applications' minimum; resnet_mini takes any size). "
            f"Received: image_size={image_size!r}")
    return name


def validate_text_model(*, seq_len: int, vocab_size: int, embed_dim: int, num_heads: int,
                        num_layers: int, ff_dim: int = 128, dropout: float = 0.1) -> None:
    """Raises `ValueError` for a `text_classifier` shape it cannot build.

    Args:
        seq_len, vocab_size, embed_dim, num_heads, num_layers, ff_dim: integers >= 1;
            `num_heads` divides `embed_dim`.
        dropout: A rate in [0, 1).
    """
    for name, value in (("seq_len", seq_len), ("vocab_size", vocab_size),
                        ("embed_dim", embed_dim), ("num_heads", num_heads),
                        ("num_layers", num_layers), ("ff_dim", ff_dim)):
        _checks.integer(name, value)
    _checks.check(isinstance(dropout, (int, float)) and not isinstance(dropout, bool)
                  and 0 <= dropout < 1, "dropout", dropout, "a number in [0, 1)")
    if embed_dim % num_heads:
        raise ValueError(
            f"`num_heads` must divide `embed_dim` ({embed_dim}). Received: num_heads={num_heads}")


def _residual_block(x, filters: int, stride: int):
    shortcut = x
    y = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(x)
    y = keras.layers.BatchNormalization(momentum=0.9)(y)
    y = keras.layers.ReLU()(y)
    y = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(y)
    y = keras.layers.BatchNormalization(momentum=0.9)(y)
    if stride != 1 or shortcut.shape[-1] != filters:
        shortcut = keras.layers.Conv2D(filters, 1, strides=stride, use_bias=False)(shortcut)
        shortcut = keras.layers.BatchNormalization(momentum=0.9)(shortcut)
    return keras.layers.ReLU()(keras.layers.Add()([y, shortcut]))


def image_classifier(name: str, input_shape: tuple, num_classes: int, *,
                     width: int = 16) -> keras.Model:
    """Builds an image classifier with a float32 softmax head.

    Args:
        name: `"resnet_mini"` (a small ResNet: 3 stages of 2 residual blocks, `width`,
            `2*width`, `4*width` filters) or a `keras.applications` backbone
            (`"mobilenet_v2"`, `"resnet50"`, `"efficientnet_b0"`, random weights).
        input_shape: `(height, width, channels)`.
        num_classes: Number of classes.
        width: Filters of the first `resnet_mini` stage (a multiple of 8 suits tensor cores).

    Returns:
        A functional `keras.Model` taking float32 images in [0, 1].

    Raises:
        ValueError: for an unknown `name`, or images smaller than `MIN_IMAGE_SIZE[name]`.
    """
    validate_image_model(name, image_size=min(input_shape[:2]))
    inputs = keras.Input(input_shape, name="image")
    if name == "resnet_mini":
        x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False)(inputs)
        x = keras.layers.ReLU()(keras.layers.BatchNormalization(momentum=0.9)(x))
        for stage, filters in enumerate((width, 2 * width, 4 * width)):
            x = _residual_block(x, filters, stride=1 if stage == 0 else 2)
            x = _residual_block(x, filters, stride=1)
        x = keras.layers.GlobalAveragePooling2D()(x)
    else:
        backbone = getattr(keras.applications, _APPLICATIONS[name])(
            include_top=False, weights=None, input_shape=input_shape, pooling="avg")
        x = backbone(keras.layers.Rescaling(255.0)(inputs) if name == "efficientnet_b0"
                     else keras.layers.Rescaling(2.0, offset=-1.0)(inputs))
    outputs = tfmp_layers.OutputHead(num_classes, name="probs")(x)
    return keras.Model(inputs, outputs, name=name)


@keras.saving.register_keras_serializable(package="tfmp")
class TokenAndPositionEmbedding(keras.layers.Layer):
    """Sum of a token embedding and a learned position embedding.

    Args:
        seq_len: Maximum sequence length.
        vocab_size: Number of token ids.
        embed_dim: Embedding width.
        **kwargs: Base layer keyword arguments.

    Example:

        x = TokenAndPositionEmbedding(128, 1000, 64)(keras.Input((128,), dtype="int32"))
    """

    def __init__(self, seq_len: int, vocab_size: int, embed_dim: int, **kwargs):
        super().__init__(**kwargs)
        self.seq_len, self.vocab_size, self.embed_dim = seq_len, vocab_size, embed_dim
        self.tokens = keras.layers.Embedding(vocab_size, embed_dim, dtype=self.dtype_policy)
        self.positions = keras.layers.Embedding(seq_len, embed_dim, dtype=self.dtype_policy)

    def build(self, input_shape):
        self.tokens.build(input_shape)
        self.positions.build((input_shape[-1],))

    def call(self, ids):
        length = keras.ops.shape(ids)[-1]
        return self.tokens(ids) + self.positions(keras.ops.arange(length))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape) + (self.embed_dim,)

    def get_config(self):
        config = super().get_config()
        config.update(seq_len=self.seq_len, vocab_size=self.vocab_size, embed_dim=self.embed_dim)
        return config


def text_classifier(seq_len: int, vocab_size: int, num_classes: int, *, embed_dim: int = 64,
                    num_heads: int = 4, num_layers: int = 2, ff_dim: int = 128,
                    dropout: float = 0.1) -> keras.Model:
    """Builds a Transformer encoder classifier from tfmp's float32-safe layers.

    Token and position embeddings, `num_layers` post-norm encoder blocks
    (`tfmp.layers.MultiHeadAttention` with float32 softmax, padding (id 0) masked,
    `tfmp.layers.LayerNormalization` with float32 statistics), mean pooling and a
    float32 softmax head.

    Args:
        seq_len: Tokens per example.
        vocab_size: Token ids are in `[0, vocab_size)`.
        num_classes: Number of classes.
        embed_dim: Model width (multiple of 8 for tensor cores).
        num_heads: Attention heads (must divide `embed_dim`).
        num_layers: Encoder blocks.
        ff_dim: Hidden units of the feed-forward block.
        dropout: Dropout rate.

    Returns:
        A functional `keras.Model` taking int32 token ids `(batch, seq_len)`.
    """
    validate_text_model(seq_len=seq_len, vocab_size=vocab_size, embed_dim=embed_dim,
                        num_heads=num_heads, num_layers=num_layers, ff_dim=ff_dim,
                        dropout=dropout)
    tokens = keras.Input((seq_len,), dtype="int32", name="tokens")
    x = TokenAndPositionEmbedding(seq_len, vocab_size, embed_dim)(tokens)
    padding = keras.ops.not_equal(tokens, 0)
    attention_mask = keras.ops.logical_and(padding[:, None, :], padding[:, :, None])
    for _ in range(num_layers):
        attn = tfmp_layers.MultiHeadAttention(num_heads, embed_dim // num_heads, dropout=dropout)(
            x, x, attention_mask=attention_mask)
        x = tfmp_layers.LayerNormalization()(x + attn)
        ff = keras.layers.Dense(ff_dim, activation="relu")(x)
        ff = keras.layers.Dropout(dropout)(keras.layers.Dense(embed_dim)(ff))
        x = tfmp_layers.LayerNormalization()(x + ff)
    # Unmasked mean: a masked one divides by zero on an all-padding example.
    x = keras.layers.GlobalAveragePooling1D()(x)
    outputs = tfmp_layers.OutputHead(num_classes, name="probs")(x)
    return keras.Model(tokens, outputs, name="transformer_classifier")
