"""Helpers written once and shared: the item column of a raw id, the finite-parameters
check, where two sets of settings differ."""

import numpy as np
import pytest

from jax_vaecf.serving import bulk as batch_lib
from jax_vaecf.core import differences
from jax_vaecf.core import finite
from jax_vaecf.training import closed_form
from jax_vaecf.evaluation import metrics
from jax_vaecf.serving import recommender as recommend
from jax_vaecf.serving import artefact as serve


def test_columns_compare_raw_ids_by_text():
  column = serve.column_index(np.array([70, 7, 2**63 - 1], np.int64))
  np.testing.assert_array_equal(
      serve.lookup_columns(column, ["7", 7, "007", "x", str(2**63 - 1)]), [1, 1, -1, -1, 2])
  assert serve.columns_of(column, ["70", "b", 7, "70", "a"]) == ([0, 1], ["b", "a"])
  assert serve.columns_of(column, []) == ([], [])
  text = serve.column_index(np.array(["007", "b"]))
  np.testing.assert_array_equal(batch_lib.column_lookup(np.array(["007", "b"]),
                                                        np.array([["b", "7"], ["007", "c"]])),
                                [[1, -1], [0, -1]])
  assert text == {"007": 0, "b": 1}


def _params(bad: bool):
  kernel = np.ones((3, 2), np.float32)
  if bad:
    kernel[1, 0] = np.nan
  return {"decoder": {"kernel": kernel, "bias": np.zeros(2, np.float32)},
          "encoder": {"kernel": np.full((2, 2), np.inf if bad else 1.0, np.float32)}}


def test_nonfinite_arrays_names_each_bad_array():
  assert finite.nonfinite_arrays(_params(False)) == []
  assert finite.nonfinite_arrays(_params(True)) == ["decoder/kernel", "encoder/kernel"]


def test_each_caller_raises_its_own_error_from_the_one_check():
  finite.check_finite_params(_params(False), ValueError)  # finite: nothing raised
  with pytest.raises(closed_form.TrainingDivergedError,
                     match=r"ease: the fit gave NaN/inf in decoder/kernel, encoder/kernel"):
    closed_form.check_finite_params(_params(True), "ease")
  with pytest.raises(metrics.NonFiniteModelError,
                     match=r"not finite \(NaN/inf in decoder/kernel, encoder/kernel\)"):
    recommend.check_finite_params(_params(True))


def test_differences_both_ways_or_against_defaults():
  old = {"a": 1, "b": 2, "gone": 3}
  new = {"a": 1, "b": 5, "added": 4}
  assert differences.differences(old, new) == {"b": (2, 5), "gone": (3, None),
                                               "added": (None, 4)}
  # Against defaults: only the new side's keys, a missing old one read as its default.
  assert differences.differences(old, new, old_defaults={"a": 0, "b": 0, "added": 4}) == {
      "b": (2, 5)}
  assert differences.describe({"z": (1, 2), "a": ("x", "y")},
                              "{key}: {old!r} -> {new!r}", "; ") == "a: 'x' -> 'y'; z: 1 -> 2"
