"""Where candidates are evaluated: in this process (``local``), in a pool of worker processes
(``process``), or by Ray actors (``ray``: on this machine, or on a running cluster through
``ray_address``). Each worker holds one ``CandidateEvaluator`` built from the same specification;
``evaluate(candidates)`` returns the results in the order of the candidates, whichever worker ran
each, so a search's course does not depend on the executor. Ray is an optional extra, imported only
when asked for."""
from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from typing import Protocol

from ..evaluator import CandidateEvaluator, CandidateResult, EvaluatorSpec

EXECUTORS = ("local", "process", "ray")


class Executor(Protocol):
    def evaluate(self, candidates: list[dict]) -> list[CandidateResult]:
        """The candidates' results, in their order."""

    def close(self) -> None:
        """Stop the workers."""


class LocalExecutor:
    def __init__(self, spec: EvaluatorSpec):
        self.spec = spec
        self._evaluator: CandidateEvaluator | None = None

    def evaluate(self, candidates: list[dict]) -> list[CandidateResult]:
        if self._evaluator is None:
            self._evaluator = CandidateEvaluator(self.spec)
        return [self._evaluator.evaluate(c) for c in candidates]

    def close(self) -> None:
        self._evaluator = None


_worker: CandidateEvaluator | None = None  # a pool process's evaluator


def _start_worker(spec: EvaluatorSpec) -> None:
    global _worker
    _worker = CandidateEvaluator(spec)


def _evaluate_in_worker(candidate: dict) -> CandidateResult:
    return _worker.evaluate(candidate)


class ProcessExecutor:
    """Worker processes started fresh (``spawn``: no torch state inherited through ``fork``)."""

    def __init__(self, spec: EvaluatorSpec, workers: int = 2):
        self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_start_worker, initargs=(spec,))

    def evaluate(self, candidates: list[dict]) -> list[CandidateResult]:
        return list(self.pool.map(_evaluate_in_worker, candidates))

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


class RayExecutor:
    """One Ray actor per worker, each declaring ``cpus`` CPUs and ``gpus`` GPUs so Ray places it
    where those are free. Starts a local Ray instance unless one is running or ``address`` names a
    cluster."""

    def __init__(self, spec: EvaluatorSpec, workers: int = 2, address: str = "", cpus: float = 1, gpus: float = 0):
        ray = import_ray()
        self.started = not ray.is_initialized()  # ours to shut down
        if self.started:
            ray.init(address=address or None, include_dashboard=False, log_to_driver=False,
                     **({} if address else {"num_cpus": max(int(workers * cpus), 1)}))
        actor = ray.remote(num_cpus=cpus, num_gpus=gpus)(CandidateEvaluator)
        self.ray = ray
        self.actors = [actor.remote(spec) for _ in range(workers)]

    def evaluate(self, candidates: list[dict]) -> list[CandidateResult]:
        pending = [self.actors[i % len(self.actors)].evaluate.remote(c) for i, c in enumerate(candidates)]
        return self.ray.get(pending)

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        self.actors = []
        if self.started:
            self.ray.shutdown()


def import_ray():
    try:
        import ray
    except ImportError:
        raise ValueError("-o executor=ray needs Ray: pip install 'mixprec[ray]' (or pip install ray), or use "
                         "-o executor=process for worker processes on this machine") from None
    return ray


def make_executor(name: str, spec: EvaluatorSpec, workers: int, address: str = "", gpus: float = 0) -> Executor:
    if name == "local":
        return LocalExecutor(spec)
    if name == "process":
        return ProcessExecutor(spec, workers)
    if name == "ray":
        return RayExecutor(spec, workers, address, cpus=spec.threads or 1, gpus=gpus)
    raise ValueError(f"unknown executor {name!r}; choose one of {', '.join(EXECUTORS)}")
