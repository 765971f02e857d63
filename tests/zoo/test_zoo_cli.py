"""Every family through the command line (in-process): ``tnsurgery plan``, ``apply`` on
the saved model (a Hugging Face directory from ``save_pretrained``, with a tokenizer
for the text families; a pickled module for the plain-torch shapes, read with
``--allow-class tests.zoo.vision``), ``inspect`` on the output, and the output
loaded back (``io.load_model`` and ``tnsurgery.load`` onto a fresh instance) computing
exactly what the API's surgery computes."""

from __future__ import annotations

import pytest

from tests.zoo.bugs import CLI_DEFAULT_SAMPLE
from tests.zoo.conftest import needs
from tests.zoo.families import FAMILIES
from tests.zoo.runner import finite, run_cli

FAMILY_PARAMS = [pytest.param(f, id=f.key) for f in FAMILIES]


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_cli_factorize_with_a_sample_input_file(zoo, family, tmp_path):
    needs(family)
    cli = run_cli(family, tmp_path)
    assert cli.ok, cli.message
    api = zoo.cell(family, "factorize")
    assert cli.planned == cli.replaced == api.replaced > 0
    assert cli.inspect_manifest is True
    # the same sample input as the API's: the same output error
    assert cli.output_error == pytest.approx(api.manifest_error, rel=1e-5)


def _default_param(family):
    bug = CLI_DEFAULT_SAMPLE.get(family.key)
    marks = [pytest.mark.xfail(strict=True, reason=bug)] if bug else []
    return pytest.param(family, id=family.key, marks=marks)


HF = [_default_param(f) for f in FAMILIES if f.hf]


@pytest.mark.parametrize("family", HF)
def test_cli_factorize_with_the_default_sample_input(family, tmp_path):
    """No --sample-input: text models get the CLI's default (measured output error);
    the others run without one or with the default the CLI finds for them."""
    needs(family)
    cli = run_cli(family, tmp_path, default_sample=True)
    assert cli.ok, cli.message
    assert cli.planned == cli.replaced > 0
    if family.text or cli.output_error is not None:
        assert finite(cli.output_error) and cli.output_error > 0, cli
