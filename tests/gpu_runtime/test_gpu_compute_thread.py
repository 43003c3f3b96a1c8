"""The compute thread: every model load and call of a process runs on one thread, whoever calls."""

from __future__ import annotations

import ctypes
import threading
import time

import pytest

from shardwise.gpu_runtime import GenerationParams, on_compute_thread
from shardwise.gpu_runtime.compute_thread import ComputeCancelled, check_cancelled


def _call_from_new_thread(fn):
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(60)
    assert not thread.is_alive()
    if "error" in box:
        raise box["error"]
    return box["value"]


def test_calls_from_different_threads_run_on_one_other_thread():
    here = on_compute_thread(threading.get_ident)
    there = _call_from_new_thread(lambda: on_compute_thread(threading.get_ident))
    assert here == there
    assert here != threading.get_ident()


def test_a_nested_call_runs_inline_instead_of_waiting_for_itself():
    outer = on_compute_thread(lambda: (threading.get_ident(), on_compute_thread(threading.get_ident)))
    assert outer[0] == outer[1]


def test_errors_come_back_with_their_own_type_even_a_timeout_error():
    def fails():
        raise TimeoutError("the job's own timeout, not the wait's")

    with pytest.raises(TimeoutError, match="the job's own timeout"):
        on_compute_thread(fails)
    assert on_compute_thread(lambda x, *, y: x + y, 2, y=3) == 5  # the thread still serves


def test_an_interrupted_caller_stops_the_running_job_at_its_next_check():
    # What Prefect does to time out a task in a worker thread: raise an exception into it.
    started, stopped = threading.Event(), threading.Event()

    def job():
        started.set()
        try:
            while True:  # a long batch loop
                check_cancelled()
                time.sleep(0.01)
        finally:
            stopped.set()

    class Interrupted(Exception):
        pass

    caller_error: list[BaseException] = []

    def caller():
        try:
            on_compute_thread(job)
        except BaseException as exc:  # noqa: BLE001 - inspected below
            caller_error.append(exc)

    thread = threading.Thread(target=caller)
    thread.start()
    assert started.wait(30)
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(Interrupted))
    thread.join(30)
    assert not thread.is_alive()
    assert len(caller_error) == 1 and isinstance(caller_error[0], Interrupted)
    assert stopped.wait(30), "the job kept running after its caller gave up"
    assert on_compute_thread(lambda: "next job") == "next job"


def test_check_cancelled_is_silent_outside_a_cancelled_job():
    check_cancelled()
    on_compute_thread(check_cancelled)
    assert issubclass(ComputeCancelled, RuntimeError)


def test_engines_load_and_run_their_model_on_the_compute_thread(generation_engine, embedding_engine):
    compute = on_compute_thread(threading.get_ident)
    seen: dict[str, set[int]] = {"generation": set(), "embedding": set()}

    def record(kind):
        return lambda module, args: seen[kind].add(threading.get_ident())

    hooks = [
        generation_engine.model.register_forward_pre_hook(record("generation")),
        embedding_engine.model.register_forward_pre_hook(record("embedding")),
    ]
    try:
        params = GenerationParams(max_new_tokens=2)
        generation_engine.generate(["Say hi."], params)
        _call_from_new_thread(lambda: generation_engine.generate(["Say hello."], params))
        _call_from_new_thread(lambda: embedding_engine.embed(["a review"]))
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == {"generation": {compute}, "embedding": {compute}}


def test_a_model_loads_on_the_compute_thread():
    from shardwise.gpu_runtime.engine_cache import _cached_engine

    # The engine cache's own loading path, with a builder that reports where it ran (a kind no
    # engine uses, so nothing cached by other tests is touched).
    loaded_on = _call_from_new_thread(
        lambda: _cached_engine("thread-probe", "dummy:bert-tiny", "cpu", lambda resolved, device: threading.get_ident())
    )
    assert loaded_on == on_compute_thread(threading.get_ident)
