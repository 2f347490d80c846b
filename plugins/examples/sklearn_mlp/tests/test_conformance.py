"""The plugin author's whole conformance test: one parametrized function."""

from cnn_train.plugins.conformance import parametrize_with_checks


@parametrize_with_checks("sklearn-mlp")
def test_conformance(check):
    check()
