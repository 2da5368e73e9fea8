"""Helpers for the export tests: Triton configs parsed with Triton's own schema and checked
against the ONNX graphs they serve. (What serving tests share with these lives in
tests/onnxlib.py.)"""
from __future__ import annotations

import os

import onnxruntime as ort


def parse_model_config(path):
    """``config.pbtxt`` parsed by Triton's own ``ModelConfig`` protobuf (from ``tritonclient``):
    an unknown field, a wrong type or a bad enum value raises."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2
    return text_format.Parse(open(path, encoding="utf-8").read(), model_config_pb2.ModelConfig())


def io_session(path):
    """An onnxruntime session only read for its inputs and outputs: no graph optimisation (the
    CPU provider's layout transformer crashes on fp16 graphs in onnxruntime 1.32)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


ORT_TO_TRITON = {"tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16"}


def check_io(entries, tensors):
    """Config inputs/outputs against onnxruntime's view of the graph: names, types, dims."""
    from tritonclient.grpc import model_config_pb2 as pb
    assert [e.name for e in entries] == [t.name for t in tensors]
    for e, t in zip(entries, tensors):
        assert pb.DataType.Name(e.data_type) == ORT_TO_TRITON[t.type]
        assert isinstance(t.shape[0], str)  # batch dimension is dynamic, as max_batch_size needs
        assert list(e.dims) == list(t.shape[1:])


def check_triton_repository(out, name, onnx_path, class_names, input_name, *, gpu=False,
                            instances=1):
    """The model folder Triton would load: the model file, labels, and a config that parses
    with Triton's schema and matches the graph."""
    from tritonclient.grpc import model_config_pb2 as pb
    model_dir = out / name
    repo_model = model_dir / "1" / "model.onnx"
    assert repo_model.read_bytes() == onnx_path.read_bytes()
    assert os.path.samefile(repo_model, onnx_path)  # hard link here: the model is stored once
    config = parse_model_config(model_dir / "config.pbtxt")
    assert config.name == name and config.backend == "onnxruntime"
    assert config.max_batch_size > 0
    session = io_session(onnx_path)
    check_io(config.input, session.get_inputs())
    check_io(config.output, session.get_outputs())
    assert [t.name for t in session.get_inputs()] == [input_name]
    batching = config.dynamic_batching
    preferred = list(batching.preferred_batch_size)
    assert preferred == sorted(preferred) and preferred[-1] == config.max_batch_size
    assert batching.max_queue_delay_microseconds > 0
    (group,) = config.instance_group
    assert group.kind == (pb.ModelInstanceGroup.KIND_GPU if gpu else pb.ModelInstanceGroup.KIND_CPU)
    assert group.count == instances
    # Warm-up at batch 1 and every preferred size, feeding every input with its own type and dims.
    assert sorted(w.batch_size for w in config.model_warmup) == sorted({1, *preferred})
    for warmup in config.model_warmup:
        assert set(warmup.inputs) == {e.name for e in config.input}
        for e in config.input:
            feed = warmup.inputs[e.name]
            assert feed.random_data and feed.data_type == e.data_type and feed.dims == e.dims
    for output in config.output:
        labels = (model_dir / output.label_filename).read_text(encoding="utf-8")
        assert labels.splitlines() == class_names
    return config
