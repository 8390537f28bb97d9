"""Session fixtures around the demo model (built once, cached on disk)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def demo_dir():
    from pipeline.io.demo import demo_path

    return demo_path()


@pytest.fixture(scope="session")
def demo_loaded(demo_dir):
    from pipeline.io.loading import load_model

    return load_model("demo")


@pytest.fixture(scope="session")
def demo_prompts():
    from pipeline.edit.stages import PromptsConfig, resolve_prompts

    return resolve_prompts("demo", PromptsConfig())


@pytest.fixture(scope="session")
def demo_dirs(tmp_path_factory, demo_loaded, demo_prompts):
    """Directions of the demo model, measured once and saved."""
    from pipeline.edit import directions as dirs
    from pipeline.edit.stages import measure_directions

    folder = tmp_path_factory.mktemp("demo_dirs")
    dirs.save(measure_directions(demo_loaded, demo_prompts, dirs.DirectionsConfig()), folder)
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: the demo's tiny matrices gain nothing from a second thread, and on
    a shared 2-core machine OpenMP's spin-waiting made training and generation 10-70x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
