"""Entry point of one process of the Faust engine: a stage worker or a producer.

``python -m actors.faust.worker stage STAGE NAME RUN_DIR`` runs one Faust worker of a
stage; ``python -m actors.faust.worker produce NAME RUN_DIR SOURCE_JSON [SINCE_MS]`` publishes one
source. Both read ``RUN_DIR/settings.json`` and write ``RUN_DIR/NAME.json`` (stats,
every half second) and, for producers, ``RUN_DIR/NAME.result.json``. ``actors.faust.engine``
starts them; nobody needs to by hand.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

__all__ = ["main"]

logger = logging.getLogger(__name__)


def _write_json(path: Path, data: object) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, default=str))
    tmp.replace(path)


def run_stage(stage: str, name: str, run_dir: Path) -> int:
    from actors.faust.app import settings_from_json

    settings = settings_from_json((run_dir / "settings.json").read_text())
    # Before onnxruntime/torch load, as the Ray shell does: every core of this machine unless set.
    os.environ["OMP_NUM_THREADS"] = str(getattr(settings, stage).threads or os.cpu_count() or 1)
    from actors.faust.app import FaustStage
    from actors.faust.prompt import PromptWorker

    shell = FaustStage(settings, stage, name, stats_path=run_dir / f"{name}.json")
    shell.worker.setup()  # load the model before joining the group, as the Ray actor's start() does
    worker = PromptWorker(shell.app, loglevel="WARNING", logfile=str(run_dir / f"{name}.log"), quiet=True, override_logging=True)
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        shell.stopped = True
        shell._write_stats_now()
    return 0


def run_producer(name: str, run_dir: Path, source_json: str, since_ms: int | None = None) -> int:
    from actors.faust.app import settings_from_json
    from actors.producer import FrameProducer
    from pipeline.errors import PipelineError
    from pipeline.sources import SourceSpec

    settings = settings_from_json((run_dir / "settings.json").read_text())
    spec = SourceSpec(**json.loads(source_json))
    producer = FrameProducer(settings, spec, name, since_ms=since_ms)
    signal.signal(signal.SIGINT, lambda *_: producer.stop())  # Ctrl-C: end the stream, the engine drains
    signal.signal(signal.SIGTERM, lambda *_: producer.stop())
    signal.signal(signal.SIGUSR1, lambda *_: producer.stop(end=True))  # `vapipe streams remove`: end it for good
    done = threading.Event()

    def report() -> None:
        while not done.wait(0.5):
            _write_json(run_dir / f"{name}.json", producer.stats())

    threading.Thread(target=report, daemon=True).start()
    try:
        result = producer.run()
    except PipelineError as exc:
        _write_json(run_dir / f"{name}.result.json", {"error": f"{type(exc).__name__}: {exc}"})
        return 1
    finally:
        done.set()
        _write_json(run_dir / f"{name}.json", producer.stats())
    _write_json(run_dir / f"{name}.result.json", result)
    return 0


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if len(argv) == 4 and argv[0] == "stage":
        return run_stage(argv[1], argv[2], Path(argv[3]))
    if len(argv) in (4, 5) and argv[0] == "produce":
        return run_producer(argv[1], Path(argv[2]), argv[3], int(argv[4]) if len(argv) == 5 else None)
    sys.stderr.write(
        "usage: python -m actors.faust.worker stage STAGE NAME RUN_DIR | produce NAME RUN_DIR SOURCE_JSON [SINCE_MS]\n"
    )
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
