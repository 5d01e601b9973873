"""Shared set-up for the SFT tests: a tiny model, synthetic data and a StageContext built the way
the pipeline builds it (load_recipe → stage → StageContext), plus a script entry point for
`accelerate launch` (python tests/sft_helpers.py RECIPE OUT_DIR [KEY=VALUE ...])."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = ROOT / "recipes" / "tests" / "sft_tiny.yaml"


def make_data(path: Path, kind: str = "math", n: int = 600, seed: int = 0) -> Path:
    from align.data.io import write_jsonl
    from align.data.synth import generate

    if not path.exists():
        write_jsonl(generate(kind, n, seed=seed), path)
    return path


def make_ctx(out: Path, model_dir: Path, data: Path, overrides: list[str] = (), resume_from: Path | None = None):
    from align.recipe.load import load_recipe
    from align.stage import StageContext

    sets = [f"output_dir={out}", f"model.path={model_dir}", "model.tiny=null", "synth=[]",
            f"stages.0.data={data}", *overrides]
    recipe = load_recipe(TINY_RECIPE, overrides=sets, check_files=False)
    stage = recipe.stages[0]
    return StageContext(recipe=recipe, stage=stage, stage_dir=out / stage.name, init_model=model_dir,
                        resume_from=resume_from)


@pytest.fixture(scope="session")
def nano_model(tmp_path_factory) -> Path:
    from align.models.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("nano") / "model", "nano")


@pytest.fixture(scope="session")
def tokenizer(nano_model):
    from align.models.load import load_tokenizer

    return load_tokenizer(nano_model)


@pytest.fixture(scope="session")
def math_data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("data") / "math.jsonl")


def losses(stage_dir: Path) -> list[float]:
    from align.tracking import read_metrics

    return [row["loss"] for row in read_metrics(stage_dir) if "loss" in row]


def main(argv: list[str]) -> None:
    """Run the SFT stage (used under `accelerate launch`); rank 0 writes summary.json."""
    from align.sft import run

    out, model_dir, data, *overrides = argv
    ctx = make_ctx(Path(out), Path(model_dir), Path(data), overrides)
    result = run(ctx)
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_rank() == 0:
        (Path(out) / "summary.json").write_text(json.dumps(result.summary, default=str))


if __name__ == "__main__":
    main(sys.argv[1:])
