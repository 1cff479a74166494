"""The text and HParams summaries of an export, made with the tensorboard package's own protos and plugin
metadata: no torch (whose `torch.utils.tensorboard` made an export's peak memory 745 MB, 520 MB of it
the import) and no TensorFlow. Imported only by `export`, once the tensorboard extra is known to be there.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from google.protobuf import struct_pb2
from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.plugins.text import metadata as text_metadata

Summary = summary_pb2.Summary


def text(tag: str, body: str) -> Any:
    """`body` (Markdown) under `tag`/text_summary, as TensorBoard's text plugin shows it."""
    tensor = tensor_pb2.TensorProto(
        dtype=types_pb2.DT_STRING,
        string_val=[body.encode("utf-8")],
        tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)]),
    )
    meta = text_metadata.create_summary_metadata(display_name=None, description=None)
    return Summary(value=[Summary.Value(tag=f"{tag}/text_summary", metadata=meta, tensor=tensor)])


def _value(value: bool | int | float | str) -> tuple[struct_pb2.Value, int]:
    if isinstance(value, bool):
        return struct_pb2.Value(bool_value=value), api_pb2.DATA_TYPE_BOOL
    if isinstance(value, int | float):
        return struct_pb2.Value(number_value=float(value)), api_pb2.DATA_TYPE_FLOAT64
    return struct_pb2.Value(string_value=str(value)), api_pb2.DATA_TYPE_STRING


def hparams(settings: Mapping[str, bool | int | float | str], metrics: Mapping[str, float]) -> list[Any]:
    """The HParams plugin's three summaries for one run: the experiment (which columns and metrics
    exist), the session's start (this run's values), and its end."""
    infos, start = [], plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
    for name, setting in settings.items():
        value, kind = _value(setting)
        infos.append(api_pb2.HParamInfo(name=name, type=kind))
        start.hparams[name].CopyFrom(value)
    experiment = api_pb2.Experiment(
        hparam_infos=infos, metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=t)) for t in metrics]
    )
    end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS, end_time_secs=time.time())
    parts = (
        (hparams_metadata.EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(experiment=experiment)),
        (
            hparams_metadata.SESSION_START_INFO_TAG,
            plugin_data_pb2.HParamsPluginData(session_start_info=start),
        ),
        (hparams_metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=end)),
    )
    # The plugin reads its data from the metadata alone: no tensor beside it.
    return [
        Summary(value=[Summary.Value(tag=tag, metadata=hparams_metadata.create_summary_metadata(data))])
        for tag, data in parts
    ]
