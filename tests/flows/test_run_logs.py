"""The libraries' log lines, progress included, reach the Prefect run's logs (flows.run_logs)."""

import io
import logging
import warnings

import pytest


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory, prefect_harness):
    with prefect_harness(tmp_path_factory.mktemp("results")):
        yield


def _run_logs(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # what the run logged is on the server
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [x.message for x in logs]


def test_progress_lines_of_hierloc_and_geodata_show_in_the_runs_logs(prefect_server):
    from prefect import flow, task
    from prefect.context import get_run_context

    from flows.run_logs import route_library_logs
    from geodata.progress import Progress as GeodataProgress
    from hierloc.progress import Progress as HierlocProgress

    @task
    def epoch() -> None:  # what hierloc.train.loop does, off a terminal, in a task run
        with HierlocProgress(4, "epoch 1/1", unit="steps", items_unit="samples", every_s=0, stream=io.StringIO(),
                             logger=logging.getLogger("hierloc.train.loop")) as bar:
            for _ in range(4):
                bar.update(1, items=32)

    @flow
    def tiny_flow() -> str:
        route_library_logs()
        epoch()
        with GeodataProgress(2, "dissolving admin-1", unit="units", every_s=0, stream=io.StringIO(),
                             logger=logging.getLogger("geodata.admin.gazetteer")) as bar:
            bar.update(2)
        return str(get_run_context().flow_run.id)

    run_id = tiny_flow()
    logs = _run_logs(run_id)
    assert any(m.startswith("epoch 1/1: 2/4 steps (50%)") and "samples/s, ETA" in m for m in logs), logs
    assert any(m.startswith("epoch 1/1: 4/4 steps in ") for m in logs), logs
    assert any(m.startswith("dissolving admin-1: 2/2 units (100%)") for m in logs), logs
    # outside a run the lines stay on the console: no warning about a missing flow run id
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logging.getLogger("hierloc.train.loop").info("after the flow")
