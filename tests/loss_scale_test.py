"""Tests for tfmp.loss_scale: the pure state transition, table-driven."""

import keras
import numpy as np
from absl.testing import parameterized
from keras import ops

from tests.base import TestCase
from tfmp.loss_scale import STATE_DTYPES, LossScaleState, ScaleRule, next_state

_RULE = ScaleRule(dynamic=True, growth_steps=3, growth_factor=2.0, backoff_factor=0.5,
                  min_scale=1.0, max_scale=64.0, hysteresis=2)


def _state(counter, scale, hyst, skipped, consecutive):
    return LossScaleState(*[ops.convert_to_tensor(v, keras.backend.standardize_dtype(dtype))
                            for v, dtype in zip((counter, scale, hyst, skipped, consecutive),
                                                STATE_DTYPES, strict=True)])


def _values(state):
    return tuple(np.asarray(ops.convert_to_numpy(v)).item() for v in state)


class NextStateTest(TestCase):
    # (state before, finite, rule, state after), fields as LossScaleState.
    @parameterized.named_parameters(
        ("count_up", (0, 8.0, 2, 0, 0), True, _RULE, (1, 8.0, 2, 0, 0)),
        ("grow", (2, 8.0, 1, 0, 0), True, _RULE, (0, 16.0, 2, 0, 0)),
        ("grow_stops_at_max", (2, 64.0, 2, 0, 0), True, _RULE, (0, 64.0, 2, 0, 0)),
        ("first_overflow_tolerated", (1, 8.0, 2, 0, 0), False, _RULE, (0, 8.0, 1, 1, 1)),
        ("overflow_lowers", (0, 8.0, 1, 1, 1), False, _RULE, (0, 4.0, 1, 2, 2)),
        ("lower_stops_at_min", (0, 1.0, 1, 5, 5), False, _RULE, (0, 1.0, 1, 6, 6)),
        ("applied_resets_consecutive", (0, 4.0, 1, 6, 6), True, _RULE, (1, 4.0, 1, 6, 0)),
        ("fixed_skip", (0, 8.0, 2, 0, 0), False, ScaleRule(dynamic=False), (0, 8.0, 2, 1, 1)),
        ("fixed_apply", (0, 8.0, 2, 3, 1), True, ScaleRule(dynamic=False), (0, 8.0, 2, 3, 0)),
    )
    def test_transition(self, before, finite, rule, after):
        new = next_state(ops.convert_to_tensor(finite), _state(*before), rule)
        self.assertIsInstance(new, LossScaleState)
        self.assertEqual(_values(new), after)
        for value, dtype in zip(new, STATE_DTYPES, strict=True):
            self.assertEqual(str(ops.convert_to_numpy(value).dtype),
                             keras.backend.standardize_dtype(dtype))
