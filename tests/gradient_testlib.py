"""Gradient trees compared tensor by tensor, for the tests that check one way of computing
the model against another (scanned vs unrolled layers, two qkv projections)."""
import jax
import numpy as np


def named_leaves(tree) -> dict:
    """{jax key path as text (e.g. "['layers'][0]['attn']['Wqkv'].value"): leaf as numpy}."""
    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def assert_gradients_close(actual: dict, expected: dict, *, rtol: float, atol_of_largest: float):
    """Each named gradient equals its reference within `rtol` plus `atol_of_largest` times the
    reference's largest magnitude (a scale per tensor, so a small tensor is not judged by the
    largest one's). A reference that is zero everywhere fails: against it no error would show."""
    assert actual.keys() == expected.keys(), sorted(set(actual) ^ set(expected))
    for name, reference in expected.items():
        scale = np.abs(reference).max()
        assert scale > 0, f"{name}: zero reference gradient, the test would not see an error"
        np.testing.assert_allclose(actual[name], reference, rtol=rtol,
                                   atol=atol_of_largest * scale, err_msg=name)
