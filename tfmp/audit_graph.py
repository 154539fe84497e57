"""The precision audit's graph walk: the float32 and the mixed copy of a model, side by side.

`_Walker.walk` runs one batch through every node of both copies' graphs (a
probe model that outputs them all), pairs each float32 layer with its mixed
twin by position, recurses into nested Sequential/Functional models (rows named
`outer/inner`) and hands each other layer or `keras.ops` call to
`tfmp.audit_activations._layer_audit`, which makes its `LayerAudit` row. Each
row knows the rows that produce its inputs, through nested models too. Uses
`keras` only: no TensorFlow.

Example:

    walker = _Walker("float16", training=False)
    walker.walk(f32_model, mixed_model, [x], [x], [[]], "")
    walker.rows                          # one LayerAudit a layer, in graph order
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
from keras import tree
from keras.src.ops.function import make_node_key

from tfmp import convert
from tfmp.audit_activations import _layer_audit
from tfmp.audit_report import LayerAudit


def _graph(model):
    """`(function, [(operation, node), ...])` of a Sequential/Functional model's own graph."""
    fn = model._functional if isinstance(model, keras.Sequential) else model
    pairs = []
    for op in fn.operations:
        if isinstance(op, keras.layers.InputLayer):
            continue
        index = next(i for i in range(len(op._inbound_nodes))
                     if make_node_key(op, i) in fn._nodes)
        pairs.append((op, op._inbound_nodes[index]))
    return fn, pairs


def _node_outputs(pairs) -> list:
    """The output tensors of the `(operation, node)` pairs, in order."""
    return [t for _, node in pairs for t in node.output_tensors]


def _probe(model):
    """A model from `model`'s inputs to every node output of its graph, and the graph."""
    fn, pairs = _graph(model)
    return keras.Model(fn.inputs, _node_outputs(pairs)), fn, pairs


def _is_float(value) -> bool:
    return keras.backend.is_float_dtype(keras.backend.standardize_dtype(value.dtype))


def _recursable(op, node) -> bool:
    return convert._is_graph_model(op) and len(node.input_tensors) == len(_graph(op)[0].inputs)


def _float_outputs(ref_values, mixed_values) -> list:
    """`(float32, mixed)` numpy pairs of the outputs that are floating-point in both runs."""
    return [(np.asarray(keras.ops.convert_to_numpy(r)),
             np.asarray(keras.ops.convert_to_numpy(m)))
            for r, m in zip(ref_values, mixed_values, strict=True)
            if _is_float(r) and _is_float(m)]


@dataclasses.dataclass
class _Values:
    """One graph's values in both runs and the rows that produced them, by float32 tensor id."""

    f32: dict
    mixed: dict
    producers: dict

    def f32_of(self, tensors) -> list:
        return [self.f32[id(t)] for t in tensors]

    def mixed_of(self, tensors) -> list:
        return [self.mixed[id(t)] for t in tensors]

    def producers_of(self, tensors) -> list:
        return [self.producers.get(id(t), []) for t in tensors]


class _Walker:
    """Walks the float32 and mixed graphs side by side, one `LayerAudit` a layer."""

    def __init__(self, dtype: str, training: bool):
        self.dtype = dtype
        self.training = training
        self.rows: list[LayerAudit] = []

    def walk(self, f32_model, mixed_model, f32_inputs, mixed_inputs, input_producers,
             prefix: str):
        """Audits every layer of the two models; returns the rows producing each output."""
        f32_fn, f32_pairs, mixed_pairs, values = self._run_both(
            f32_model, mixed_model, f32_inputs, mixed_inputs, input_producers)
        for (op, node), (mixed_op, _) in zip(f32_pairs, mixed_pairs, strict=True):
            inputs, outputs = node.input_tensors, node.output_tensors
            if _recursable(op, node):
                rows = self.walk(op, mixed_op, values.f32_of(inputs), values.mixed_of(inputs),
                                 values.producers_of(inputs), f"{prefix}{op.name}/")
            else:
                input_rows = [row for rows in values.producers_of(inputs) for row in rows]
                row = self.audit_op(mixed_op, prefix, values.f32_of(outputs),
                                    values.mixed_of(outputs), input_rows)
                rows = [[row] if row is not None else [] for _ in outputs]
            for t, produced in zip(outputs, rows, strict=True):
                values.producers[id(t)] = produced
        return values.producers_of(f32_fn.outputs)

    def _run(self, model, inputs):
        """`(function, pairs, values by tensor id)`: `model`'s graph run on `inputs`."""
        probe, fn, pairs = _probe(model)
        # A probe with one output (a one-layer model) returns a tensor, not a list.
        outputs = tree.flatten(probe(list(inputs), training=self.training))
        values = {id(t): value for t, value in zip(fn.inputs, inputs, strict=True)}
        values.update((id(t), value)
                      for t, value in zip(_node_outputs(pairs), outputs, strict=True))
        return fn, pairs, values

    def _run_both(self, f32_model, mixed_model, f32_inputs, mixed_inputs, input_producers):
        """Runs both graphs: `(f32 function, f32 pairs, mixed pairs, _Values)`."""
        f32_fn, f32_pairs, f32_values = self._run(f32_model, f32_inputs)
        mixed_fn, mixed_pairs, mixed_values = self._run(mixed_model, mixed_inputs)
        # A mixed tensor is keyed by its float32 twin's id: the one at the same position.
        mixed_by_f32 = {id(t): mixed_values[id(m)] for t, m in zip(
            [*_node_outputs(f32_pairs), *f32_fn.inputs],
            [*_node_outputs(mixed_pairs), *mixed_fn.inputs], strict=True)}
        producers = {id(t): rows
                     for t, rows in zip(f32_fn.inputs, input_producers, strict=True)}
        return f32_fn, f32_pairs, mixed_pairs, _Values(f32_values, mixed_by_f32, producers)

    def audit_op(self, op, prefix, ref_values, mixed_values, input_rows) -> LayerAudit | None:
        """The row of one layer or `keras.ops` call (None without a float output)."""
        pairs = _float_outputs(ref_values, mixed_values)
        if not pairs:
            return None  # No floating-point output (e.g. a boolean mask).
        dtype = keras.backend.standardize_dtype(mixed_values[0].dtype)
        row = _layer_audit(op, prefix, pairs, dtype, self.dtype, input_rows)
        self.rows.append(row)
        return row
