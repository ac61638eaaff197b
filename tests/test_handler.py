"""The custom handler without a server: an archive extracted as TorchServe would, a mock context."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from run_fixtures import digits, make_run, selected_model

from handlers import codec, local
from handlers import handler as handler_module
from handlers.handler import QUIET_METRICS_ENV, RECEIVED_LINE, GradserveHandler
from handlers.sharedmem import PayloadArea
from training.package import PackageConfig, package


def context(model_dir: Path, workers: int = 2) -> SimpleNamespace:
    """What TorchServe hands the handler; two workers -> one torch thread each on this 2-core box."""
    return local.context(model_dir, max_workers=workers, batch_size=32)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def model_dir(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("store")
    archive = package(run, PackageConfig(model_store=str(store), max_rows=256))
    return local.unpack(archive, tmp_path_factory.mktemp("extracted"))


@pytest.fixture(scope="module")
def handler(model_dir: Path) -> GradserveHandler:
    h = GradserveHandler()
    h.initialize(context(model_dir))
    return h


@pytest.fixture(scope="module")
def reference(run: Path) -> torch.nn.Module:
    return selected_model(run)


def request(x: np.ndarray, key: str = "data") -> dict[str, bytes]:
    return {key: codec.encode({"input": x})}


def expected(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def test_the_handler_module_holds_one_class_as_torchserve_requires() -> None:
    from ts.utils.util import list_classes_from_module

    assert list_classes_from_module(handler_module) == [GradserveHandler]


def test_model_is_in_eval_mode(handler: GradserveHandler) -> None:
    assert not any(m.training for m in handler.model.modules())
    assert handler.device == torch.device("cpu")


def test_mixed_row_counts_in_one_batch(handler: GradserveHandler, reference: torch.nn.Module) -> None:
    images = digits()[0]
    counts = [1, 5, 64, 3, 256]
    inputs = [images[i * 10: i * 10 + n] for i, n in enumerate(counts)]
    data = [request(x) for x in inputs[:-1]] + [{"body": bytearray(codec.encode({"input": inputs[-1]}))}]
    seen = handler.batch_sizes[len(counts)]
    responses = handler.handle(data, context(Path()))
    assert len(responses) == len(counts)
    assert handler.batch_sizes[len(counts)] == seen + 1  # the handler records how many requests it was handed
    for x, response in zip(inputs, responses, strict=True):
        out = codec.decode(response)
        assert out.error is None
        assert out.tensors["logits"].dtype == np.float32 and out.tensors["logits"].shape == (len(x), 10)
        assert out.tensors["label"].dtype == np.int64 and out.tensors["label"].shape == (len(x),)
        np.testing.assert_allclose(out.tensors["logits"], expected(reference, x), atol=1e-5, rtol=0)
        np.testing.assert_array_equal(out.tensors["label"], expected(reference, x).argmax(1))
        np.testing.assert_allclose(out.tensors["probabilities"].sum(1), 1.0, atol=1e-5)


@pytest.mark.parametrize("bad, says", [
    ({"data": b"not a tensor message"}, "bad magic"),
    ({"data": "a string"}, "raw bytes"),
    ({"data": codec.encode({"input": np.zeros((2, 1, 8, 8), np.float64)})}, "got FP64 [2, 1, 8, 8]"),
    ({"data": codec.encode({"input": np.zeros((2, 8, 8), np.float32)})}, "got FP32 [2, 8, 8]"),
    ({"data": codec.encode({"input": np.zeros((0, 1, 8, 8), np.float32)})}, "got n = 0"),
    ({"data": codec.encode({"input": np.zeros((257, 1, 8, 8), np.float32)})}, "got n = 257"),
    ({"data": codec.encode({"input": np.full((2, 1, 8, 8), np.nan, np.float32)})}, "NaN or infinite"),
    ({"data": codec.encode({"pixels": np.zeros((2, 1, 8, 8), np.float32)})}, "got tensors ['pixels']"),
    ({"data": codec.encode_error(codec.INTERNAL, "x")}, "got tensors []"),
    ({"data": codec.encode_ref("/etc/passwd", 10)}, "not a file of a gradserve front door's payload directory"),
])
def test_one_malformed_request_fails_alone(handler: GradserveHandler, reference: torch.nn.Module,
                                           bad: dict, says: str) -> None:
    good = digits()[0][:7]
    responses = handler.handle([request(good[:3]), bad, request(good[3:])], context(Path()))
    assert len(responses) == 3
    error = codec.decode(responses[1]).error
    assert error is not None and error.code == codec.INVALID_ARGUMENT
    assert says in error.message
    for response, x in ((responses[0], good[:3]), (responses[2], good[3:])):
        np.testing.assert_allclose(codec.decode(response).tensors["logits"], expected(reference, x), atol=1e-5)


def test_a_request_in_shared_memory_is_answered_as_if_inline(handler: GradserveHandler, reference: torch.nn.Module,
                                                             tmp_path: Path) -> None:
    area = PayloadArea.open(str(tmp_path), 1)
    assert area is not None
    x = digits()[0][:200]
    placed = area.write(codec.encode_parts({"input": x}))
    assert placed is not None
    gone = area.write(codec.encode_parts({"input": x[:2]}))
    assert gone is not None
    PayloadArea.remove(gone[0])  # the front door's call ended (cancelled) before the handler read it
    responses = handler.handle([{"data": codec.encode_ref(*placed)}, {"data": codec.encode_ref(*gone)},
                                request(x[:3])], context(Path()))
    np.testing.assert_allclose(codec.decode(responses[0]).tensors["logits"], expected(reference, x), atol=1e-5)
    error = codec.decode(responses[1]).error
    assert error is not None and error.code == codec.INVALID_ARGUMENT and "cannot be opened" in error.message
    np.testing.assert_allclose(codec.decode(responses[2]).tensors["logits"], expected(reference, x[:3]), atol=1e-5)


def test_only_the_outputs_a_request_asks_for_are_computed_and_returned(handler: GradserveHandler,
                                                                        reference: torch.nn.Module) -> None:
    """The front door names the outputs its callers want; the requests of one call get what any of them wants;
    none named (or none the model has): all of them."""
    x = digits()[0][:3]
    every = set(handler.manifest.output_names())

    def answer(*wants: list[str] | None) -> list[dict[str, np.ndarray]]:
        data = [{"data": codec.encode({"input": x}, want)} for want in wants]
        return [codec.decode(r).tensors for r in handler.handle(data, context(Path()))]

    (only,) = answer(["logits"])
    assert list(only) == ["logits"]
    np.testing.assert_allclose(only["logits"], expected(reference, x), rtol=1e-5, atol=1e-5)
    (by_name,) = answer(["class_name", "label"])
    assert set(by_name) == {"label", "class_name"}
    assert by_name["class_name"].tolist() == [str(v).encode() for v in by_name["label"]]
    assert all(set(out) == {"logits", "probabilities"} for out in answer(["logits"], ["probabilities"]))
    assert all(set(out) == every for out in answer(["logits"], None))
    assert set(answer(["no-such-output"])[0]) == every
    assert set(answer([])[0]) == every


def test_a_batch_of_only_bad_requests(handler: GradserveHandler) -> None:
    responses = handler.handle([{"data": b"x"}, {"body": b"y"}], context(Path()))
    assert [codec.decode(r).error.code for r in responses] == [codec.INVALID_ARGUMENT] * 2


def test_tampered_weights_are_refused(model_dir: Path, tmp_path: Path) -> None:
    tampered = tmp_path / "model"
    shutil.copytree(model_dir, tampered)
    weights = tampered / "weights.pt"
    blob = bytearray(weights.read_bytes())
    blob[-100] ^= 0x01
    weights.write_bytes(bytes(blob))
    with pytest.raises(RuntimeError, match="sha256"):
        GradserveHandler().initialize(context(tampered))


def test_rows_are_batch_invariant(handler: GradserveHandler, reference: torch.nn.Module) -> None:
    rng = np.random.default_rng(0)
    images = digits()[0]
    rows = images[rng.choice(len(images), 16, replace=False)]
    for row in rows:
        alone = codec.decode(handler.handle([request(row[None])], context(Path()))[0]).tensors
        others = rng.random((64, 1, 8, 8), dtype=np.float32)
        at = int(rng.integers(64))
        others[at] = row
        # ... inside one request of 64 rows, at a random position ...
        batched = codec.decode(handler.handle([request(others)], context(Path()))[0]).tensors
        # ... and as its own request between two requests of 32 other rows each.
        among = handler.handle([request(others[:32]), request(row[None]), request(others[32:])], context(Path()))
        among_requests = codec.decode(among[1]).tensors
        truth = expected(reference, row[None])
        for name in ("logits", "probabilities"):
            assert np.abs(alone[name][0] - batched[name][at]).max() <= 1e-5
            assert np.abs(alone[name][0] - among_requests[name][0]).max() <= 1e-5
        assert np.abs(alone["logits"] - truth).max() <= 1e-5
        assert alone["label"][0] == batched["label"][at] == among_requests["label"][0] == truth.argmax()


def test_batchnorm_statistics_do_not_move(handler: GradserveHandler) -> None:
    before = {k: v.clone() for k, v in handler.model.state_dict().items()}
    assert any("running_mean" in k for k in before)
    rng = np.random.default_rng(1)
    payloads = [request(rng.random((n, 1, 8, 8), dtype=np.float32)) for n in (1, 2, 7, 16)]
    for _ in range(500):  # 2000 inference requests, 13000 rows
        handler.handle(payloads, context(Path()))
    for key, value in handler.model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_behind_the_front_door_no_line_is_printed_per_call(model_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """TorchServe's worker prints a metric line for every call (its PredictionTime, through this logger) and a line
    saying it received the call (root logger); the front door's TorchServe drops the metric lines and says so in
    the environment, and the handler then has neither printed. Under another TorchServe they stay."""
    from ts.metrics.caching_metric import CachingMetric
    from ts.metrics.metric_type_enum import MetricTypes
    from ts.protocol import otf_message_handler

    assert f'logging.info("{RECEIVED_LINE}"' in inspect.getsource(otf_message_handler.retrieve_msg)  # its own words
    metric = CachingMetric("PredictionTime", "ms", ["ModelName", "Level"], MetricTypes.GAUGE)
    caplog.set_level(logging.INFO)  # as TorchServe's worker logs (its root logger at INFO, to stdout)
    printed = []
    try:
        for quiet in (False, True):
            if quiet:
                monkeypatch.setenv(QUIET_METRICS_ENV, "1")
            GradserveHandler().initialize(context(model_dir))
            caplog.clear()
            metric.add_or_update(1.5, ["digits", "Model"])
            logging.info(RECEIVED_LINE, 1796056812)
            logging.info("a line of the model's own")
            printed.append([r.getMessage() for r in caplog.records])
    finally:
        logging.getLogger("ts.metrics").setLevel(logging.NOTSET)
        logging.getLogger().removeFilter(handler_module._not_per_call)
    assert len(printed[0]) == 3 and any("[METRICS]PredictionTime" in line for line in printed[0])
    assert printed[1] == ["a line of the model's own"]


def test_threads_share_the_cores_between_workers(model_dir: Path) -> None:
    h = GradserveHandler()
    try:
        h.initialize(context(model_dir, workers=64))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))


def test_small_calls_run_on_one_thread_big_ones_on_the_workers_share(model_dir: Path) -> None:
    """A call of fewer than parallel_rows rows (coalesced single rows) forwards on one thread, a bigger one (the
    rows of all its requests together) on the worker's share of the cores (handlers/threads.py)."""
    cores = len(os.sched_getaffinity(0))
    ctx = local.context(model_dir, handler_settings={"torch_threads": 2, "parallel_rows": 8})
    h = GradserveHandler()
    try:
        h.initialize(ctx)
        seen: list[int] = []
        for module in h.model.modules():  # every layer says the threads it ran on
            module.register_forward_pre_hook(lambda module, args: seen.append(torch.get_num_threads()))
        x = np.random.default_rng(5).random((8, 1, 8, 8), dtype=np.float32)
        threads = []
        for requests in ([x[:1]], [x[:8]], [x[:3], x[3:5]], [x[:3], x[3:6], x[6:8]], [x[:2]]):
            seen.clear()
            h.handle([{"data": codec.encode({"input": r})} for r in requests], ctx)
            threads.append(set(seen))
        assert threads == [{1}, {min(2, cores)}, {1}, {min(2, cores)}, {1}]
    finally:
        torch.set_num_threads(max(1, cores))


def test_chunked_forwards_equal_one_forward(handler: GradserveHandler, reference: torch.nn.Module,
                                            model_dir: Path) -> None:
    """The handler forwards big batches in chunks of the archive's forward_rows (the fastest batch size, measured
    by `gradserve package`): the answers are those of one forward, within 1e-5."""
    import dataclasses
    import json

    assert handler.manifest.forward_rows >= 1  # measured when the archive was built
    x = np.random.default_rng(3).random((200, 1, 8, 8), dtype=np.float32)
    chunked = dataclasses.replace(handler.manifest, forward_rows=7)
    whole = dataclasses.replace(handler.manifest, forward_rows=0)
    answers = {}
    for name, manifest in (("chunked", chunked), ("whole", whole)):
        handler.manifest = manifest
        answers[name] = codec.decode(handler.handle([request(x)], context(Path()))[0]).tensors
    handler.manifest = dataclasses.replace(whole, forward_rows=json.loads(
        (model_dir / "gradserve.json").read_text())["forward_rows"])
    np.testing.assert_allclose(answers["chunked"]["logits"], answers["whole"]["logits"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(answers["chunked"]["logits"], expected(reference, x), atol=1e-5, rtol=0)
    assert list(answers["chunked"]["class_name"]) == list(answers["whole"]["class_name"])


def test_an_archive_packaged_to_optimize_serves_its_compiled_forward_within_1e5(
        run: Path, reference: torch.nn.Module, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """package.optimize: the handler serves the traced, BatchNorm-folded forward (the demo CNN has BatchNorm), its
    answers those of the eager model within 1e-5, a row's the same alone or among others."""
    archive = package(run, PackageConfig(model_store=str(tmp_path / "store"), max_rows=256, optimize=True))
    model_dir = local.unpack(archive, tmp_path / "extracted")
    h = GradserveHandler()
    with caplog.at_level(logging.INFO):
        h.initialize(context(model_dir))  # the archive's own handler settings, as TorchServe hands them
    assert isinstance(h.forward, torch.jit.ScriptModule) and "forward compiled for inference" in caplog.text
    x = np.random.default_rng(5).random((100, 1, 8, 8), dtype=np.float32)
    whole = codec.decode(h.handle([request(x)], context(Path()))[0]).tensors["logits"]
    np.testing.assert_allclose(whole, expected(reference, x), atol=1e-5, rtol=0)
    for i in (0, 42, 99):
        alone = codec.decode(h.handle([request(x[i:i + 1])], context(Path()))[0]).tensors["logits"]
        np.testing.assert_allclose(alone[0], whole[i], atol=1e-5, rtol=0)


def test_rows_are_gathered_and_standardised_in_the_handlers_own_buffer_never_a_callers(
        handler: GradserveHandler, reference: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """A call's rows are copied into a buffer the worker keeps between calls and standardised there in place: calls
    that grow and shrink answer as the model on (x - mean) / std, a call over KEEP_BYTES gets a buffer of its own
    that is not kept, and a tensor handed to inference() is left as it was."""
    monkeypatch.setattr(handler, "transform", dataclasses.replace(handler.transform, mean=(0.5,), std=(0.25,)))
    monkeypatch.setattr(handler, "_mine", threading.local())
    monkeypatch.setattr(handler_module, "KEEP_BYTES", 40 * 64 * 4)  # 40 rows of 1x8x8 float32
    rng = np.random.default_rng(11)
    for n, kept in ((5, 5), (40, 40), (3, 40), (41, 40), (40, 40)):
        x = rng.random((n, 1, 8, 8), dtype=np.float32)
        answers = handler.handle([request(x[:2]), request(x[2:])], context(Path()))
        logits = np.concatenate([codec.decode(a).tensors["logits"] for a in answers])
        np.testing.assert_allclose(logits, expected(reference, (x - 0.5) / 0.25), atol=1e-5, rtol=0)
        assert len(handler._mine.rows) == kept
    mine = torch.from_numpy(rng.random((4, 1, 8, 8), dtype=np.float32))
    before = mine.clone()
    handler.inference(mine)
    assert torch.equal(mine, before)


def test_on_a_gpu_a_call_is_forwarded_at_once_on_a_cpu_in_the_archives_chunks(
        handler: GradserveHandler, monkeypatch: pytest.MonkeyPatch) -> None:
    """forward_rows is the fastest batch size of the packaging machine's CPU; on the H200 one forward of 1024
    rows ran 2-10x the rows/s of the same rows in chunks of 64 (bench/results/2026-11-30-device-h200)."""
    sizes: list[int] = []
    forward = handler.forward
    monkeypatch.setattr(handler, "forward", lambda x: sizes.append(len(x)) or forward(x))
    monkeypatch.setattr(handler, "manifest", dataclasses.replace(handler.manifest, forward_rows=7))
    x = torch.rand(20, 1, 8, 8)
    handler._forward(x)
    assert sizes == [7, 7, 6]
    sizes.clear()
    monkeypatch.setattr(handler, "device", torch.device("cuda", 0))  # _forward itself never touches the device
    handler._forward(x)
    assert sizes == [20]


def test_calls_from_several_threads_at_once_each_get_their_own_rows_answered(
        handler: GradserveHandler, reference: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """A local batch job calls one handler from several threads at once (TorchServe never does): each thread
    gathers its rows in its own buffer, so no call is answered with another's rows."""
    monkeypatch.setattr(handler, "transform", dataclasses.replace(handler.transform, mean=(0.5,), std=(0.25,)))

    def calls(seed: int) -> float:
        rng = np.random.default_rng(seed)
        worst = 0.0
        for _ in range(15):
            x = rng.random((int(rng.integers(1, 257)), 1, 8, 8), dtype=np.float32)
            logits = codec.decode(handler.handle([request(x)], context(Path()))[0]).tensors["logits"]
            worst = max(worst, float(np.abs(logits - expected(reference, (x - 0.5) / 0.25)).max()))
        return worst

    with ThreadPoolExecutor(4) as pool:
        assert max(pool.map(calls, range(4))) <= 1e-5
