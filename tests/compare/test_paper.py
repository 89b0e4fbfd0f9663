"""The paper preset's commands name scripts and settings that exist."""

import os
import re

from megatron_harpe.compare.methods import METHODS
from megatron_harpe.compare.paper import LAUNCHES, commands
from megatron_harpe.recipes import ENV_NAMES

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_every_method_launches_an_existing_script_with_settings_it_reads():
    assert set(LAUNCHES) == set(METHODS)
    text = commands(METHODS, seeds=2)
    for line in text.splitlines():
        script = re.search(r"examples/(\S+\.sh)$", line)
        if script:
            assert os.path.isfile(os.path.join(REPO, "examples", script.group(1))), line
            settings = re.findall(r"(?:^| )([A-Z_]+)=", line)
            assert settings and set(settings) <= set(ENV_NAMES), line  # the launch scripts read exactly ENV_NAMES
    assert text.count("examples/pretrain_llama2_") == 2 * len(METHODS)
    assert "SEED=1002" in text and "--megatron-dir checkpoints/llama2-7b-abf-multistage-seed1/stage3" in text
