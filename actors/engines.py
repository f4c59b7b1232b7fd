"""Which engine runs which stage: ``ray``, ``faust``, or a per-stage mix, and one ``run`` for all of them."""

from __future__ import annotations

from collections.abc import Callable

from actors.launcher import Progress, RunPlan
from pipeline.config import Settings
from pipeline.errors import ConfigError
from pipeline.stats import STAGES, RunSummary

__all__ = ["ENGINES", "parse_engines", "check_engines", "run"]

ENGINES = ("ray", "faust")


def parse_engines(text: str) -> dict[str, str]:
    """``ray``, ``faust`` or ``inter=ray,crop=faust,count=faust`` (stages left out run on ray).

    Raises:
        ConfigError: an unknown engine or stage.
    """
    text = text.strip()
    if text in ENGINES:
        return {stage: text for stage in STAGES}
    out = {stage: "ray" for stage in STAGES}
    for part in text.split(","):
        stage, sep, engine = part.partition("=")
        stage, engine = stage.strip(), engine.strip()
        if not sep or stage not in STAGES or engine not in ENGINES:
            raise ConfigError(
                f"invalid --engine {text!r}: expected one of {list(ENGINES)} or STAGE=ENGINE pairs "
                f"with STAGE in {list(STAGES)}, e.g. inter=ray,crop=faust,count=faust"
            )
        out[stage] = engine
    return out


def check_engines(engines: dict[str, str]) -> None:
    bad = {s: e for s, e in engines.items() if s not in STAGES or e not in ENGINES}
    if bad or set(engines) != set(STAGES):
        raise ConfigError(f"engines must name {list(STAGES)} with one of {list(ENGINES)}, got {engines}")


def run(
    settings: Settings, plan: RunPlan, engines: dict[str, str], on_progress: Callable[[Progress], None] | None = None
) -> RunSummary:
    """Run the pipeline with each stage on its engine; an all-Ray run needs no Faust at all.

    Raises:
        PipelineError: bad source, model, broker, a stage that failed for good, or no progress.
    """
    check_engines(engines)
    if all(e == "ray" for e in engines.values()):
        from actors.ray.engine import run_pipeline

        summary = run_pipeline(settings, plan, on_progress=on_progress)
    else:
        from actors.faust.engine import run_engines

        summary = run_engines(settings, plan, engines, on_progress=on_progress)
    summary.engines = dict(engines)
    return summary
