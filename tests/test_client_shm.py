"""The registry of clients' shared memory regions (server/client_shm.py), on files in a folder standing in for
/dev/shm. End to end with tritonclient: tests/client/test_tritonclient.py."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from server.client_shm import Regions
from server.errors import InvalidInput, MessageTooLarge


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "in0").write_bytes(np.arange(64, dtype=np.float32).tobytes())  # 256 bytes
    (tmp_path / "gradserve-payloads").mkdir()  # the front door's own payload folder
    return tmp_path


def read(regions: Regions, name: str, size: int, offset: int | None = None) -> np.ndarray:
    parameters = {"shared_memory_region": name, "shared_memory_byte_size": size}
    if offset is not None:
        parameters["shared_memory_offset"] = offset
    return np.frombuffer(regions.read("input", parameters), np.float32)


def test_a_region_reads_its_bytes_at_its_offset_and_the_inputs(root: Path) -> None:
    regions = Regions(root)
    regions.register("r", "/in0", 64, 128)  # floats 16..47
    np.testing.assert_array_equal(read(regions, "r", 16, 8), np.arange(18, 22, dtype=np.float32))
    np.testing.assert_array_equal(read(regions, "r", 128), np.arange(16, 48, dtype=np.float32))
    assert regions.status() == [{"name": "r", "key": "/in0", "offset": 64, "byte_size": 128}]


def test_what_a_request_read_is_its_own(root: Path) -> None:
    regions = Regions(root)
    regions.register("r", "in0", 0, 256)
    x = read(regions, "r", 16)
    (root / "in0").write_bytes(bytes(256))  # the client reuses its region for the next request
    np.testing.assert_array_equal(x, [0, 1, 2, 3])


@pytest.mark.parametrize(("key", "words"), [
    ("/a/b", "no folders"), ("../in0", "no folders"), ("", "no folders"), ("/gradserve-payloads",
                                                                             "not a shared memory object"),
    ("/missing", "cannot be opened .*create it"),
])
def test_keys_outside_the_clients_objects_are_refused(root: Path, key: str, words: str) -> None:
    with pytest.raises(InvalidInput, match=words):
        Regions(root).register("r", key, 0, 4)


def test_a_link_is_not_followed(root: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    secret = tmp_path_factory.mktemp("elsewhere") / "secret"
    secret.write_bytes(b"x" * 64)
    os.symlink(secret, root / "link")
    with pytest.raises(InvalidInput, match="cannot be opened"):
        Regions(root).register("r", "/link", 0, 4)


def test_a_named_pipe_is_refused_without_waiting_for_a_writer(root: Path) -> None:
    os.mkfifo(root / "pipe")
    with pytest.raises(InvalidInput, match="not a shared memory object"):
        Regions(root).register("r", "/pipe", 0, 4)


def test_registration_errors_say_what_to_do(root: Path) -> None:
    regions = Regions(root)
    with pytest.raises(InvalidInput, match=r"offset 200 \+ byte_size 100 passes the end of '/in0' \(256 bytes\)"):
        regions.register("r", "/in0", 200, 100)
    with pytest.raises(InvalidInput, match="byte_size more than 0"):
        regions.register("r", "/in0", 0, 0)
    regions.register("r", "/in0", 0, 256)
    with pytest.raises(InvalidInput, match="already registered: unregister it first"):
        regions.register("r", "/in0", 0, 256)
    with pytest.raises(InvalidInput, match="no shared memory region 'other' is registered"):
        regions.unregister("other")


def test_bad_reads_are_the_requests_error(root: Path) -> None:
    regions = Regions(root)
    regions.register("r", "/in0", 0, 256)
    with pytest.raises(InvalidInput, match="passes the end of region 'r'"):
        read(regions, "r", 16, 248)
    with pytest.raises(InvalidInput, match="no shared memory region 'q' is registered: register it first"):
        read(regions, "q", 16)
    with pytest.raises(InvalidInput, match="needs shared_memory_byte_size"):
        regions.read("input", {"shared_memory_region": "r"})
    with pytest.raises(MessageTooLarge, match="more than the 64 a request may carry"):
        Regions(root, max_read_bytes=64).read("input", {"shared_memory_region": "r", "shared_memory_byte_size": 65})
    os.truncate(root / "in0", 100)  # the client shrank its object: an error for this request, not a crash
    with pytest.raises(InvalidInput, match="holds 100 of the 256 bytes"):
        read(regions, "r", 256)


def test_unregistering_every_region_closes_them(root: Path) -> None:
    regions = Regions(root)
    regions.register("a", "/in0", 0, 16)
    regions.register("b", "/in0", 16, 16)
    before = len(os.listdir("/proc/self/fd"))
    regions.unregister()
    assert regions.status() == [] and len(os.listdir("/proc/self/fd")) == before - 2
    with pytest.raises(InvalidInput, match="no shared memory region 'a'"):
        read(regions, "a", 4)


def test_grpc_inputs_mix_regions_and_raw_contents(root: Path) -> None:
    """raw_input_contents holds the inputs that are not in shared memory, in order, as Triton's clients send it."""
    from server.generated import grpc_service_pb2 as pb
    from server.grpc_servicer import decode_inputs

    regions = Regions(root)
    regions.register("r", "/in0", 0, 256)
    tensor = pb.ModelInferRequest.InferInputTensor
    in_region = tensor(name="a", datatype="FP32", shape=[2, 2], parameters={
        "shared_memory_region": pb.InferParameter(string_param="r"),
        "shared_memory_byte_size": pb.InferParameter(int64_param=16),
        "shared_memory_offset": pb.InferParameter(int64_param=16)})
    request = pb.ModelInferRequest(inputs=[tensor(name="b", datatype="FP32", shape=[1]), in_region,
                                           tensor(name="c", datatype="FP32", shape=[1])],
                                   raw_input_contents=[np.float32(7).tobytes(), np.float32(8).tobytes()])
    inputs = decode_inputs(request, regions)
    np.testing.assert_array_equal(inputs["a"], [[4, 5], [6, 7]])
    assert inputs["b"].tolist() == [7] and inputs["c"].tolist() == [8]
    del request.raw_input_contents[-1]
    with pytest.raises(InvalidInput, match="raw_input_contents has 1 entries for 2 inputs not in shared memory"):
        decode_inputs(request, regions)


def test_processes_sharing_a_folder_share_the_registrations(root: Path, tmp_path_factory: pytest.TempPathFactory
                                                            ) -> None:
    """Several front-door processes (server/doors.py): a region registered through one reads through another,
    and unregistering or registering the name again anywhere is seen everywhere, also within one mtime tick."""
    shared = tmp_path_factory.mktemp("regions")
    one, two = Regions(root, shared=shared), Regions(root, shared=shared)
    (root / "in1").write_bytes(np.full(64, 7, dtype=np.float32).tobytes())
    one.register("r", "/in0", 0, 256)
    np.testing.assert_array_equal(read(two, "r", 16), np.arange(4, dtype=np.float32))
    assert two.status() == one.status() == [{"name": "r", "key": "/in0", "offset": 0, "byte_size": 256}]
    with pytest.raises(InvalidInput, match="already registered"):
        two.register("r", "/in1", 0, 256)
    two.unregister("r")
    two.register("r", "/in1", 0, 256)  # at once: the folder's mtime may not have moved since `one` looked
    np.testing.assert_array_equal(read(one, "r", 8), [7, 7])
    two.register("s", "/in0", 0, 64)
    one.unregister()
    for regions in (one, two):
        assert regions.status() == []
        with pytest.raises(InvalidInput, match="no shared memory region 's'"):
            read(regions, "s", 4)
    assert os.listdir(shared) == []
    two.register("gone", "/in0", 0, 8)
    os.unlink(root / "in0")  # removed after it was registered: another process cannot open it
    elsewhere = Regions(root, shared=shared)
    with pytest.raises(InvalidInput, match="cannot be used here"):
        read(elsewhere, "gone", 8)
    assert elsewhere.status() == [{"name": "gone", "key": "/in0", "offset": 0, "byte_size": 8}]  # still registered
    two.close()
    elsewhere.close()
    one.close()


def test_an_output_is_written_where_its_request_asks(root: Path) -> None:
    regions = Regions(root)
    regions.register("out", "/in0", 64, 128)  # bytes 64..191 of the object
    target = regions.target("logits", {"shared_memory_region": "out", "shared_memory_byte_size": 40,
                                       "shared_memory_offset": 8})
    answer = np.full(10, 2.5, np.float32)
    regions.write(target, answer.tobytes())
    held = np.frombuffer((root / "in0").read_bytes(), np.float32)
    np.testing.assert_array_equal(held[18:28], answer)  # (64 + 8) / 4 = 18
    np.testing.assert_array_equal(held[:18], np.arange(18, dtype=np.float32))  # the rest untouched
    np.testing.assert_array_equal(held[28:], np.arange(28, 64, dtype=np.float32))

    with pytest.raises(InvalidInput, match="has 44 bytes, more than the 40 its request gave it in region 'out': "
                                           "give it at least 44"):
        regions.write(target, b"\0" * 44)
    with pytest.raises(InvalidInput, match="passes the end of region 'out'"):
        regions.target("logits", {"shared_memory_region": "out", "shared_memory_byte_size": 128,
                                  "shared_memory_offset": 8})
    with pytest.raises(InvalidInput, match="no shared memory region 'nowhere' is registered"):
        regions.target("logits", {"shared_memory_region": "nowhere", "shared_memory_byte_size": 4})
    os.truncate(root / "in0", 100)  # the client shrank its object after the request was checked
    with pytest.raises(InvalidInput, match="smaller than when it was registered"):
        regions.write(target, answer.tobytes())
    assert (root / "in0").stat().st_size == 100  # not grown back by the write
    regions.close()
