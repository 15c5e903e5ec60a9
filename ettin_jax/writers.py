"""The run's metric writers, on clu's MetricWriter interface, without TensorFlow.

- `metric_writers`: clu's package. Its `__init__` imports clu's TF SummaryWriter, i.e.
  TensorFlow: 2.5-3.5 s of every start-up here, and an ImportError on hosts that have no
  TensorFlow (the GPU image). Importing this module first puts `TensorBoardWriter` in the
  place of that one backend, so `metric_writers.create_default_writer` and
  `clu.periodic_actions` work as documented and TensorFlow is never imported for metrics.
- `TensorBoardWriter`: the same TensorBoard event files (scalars and texts, in the TF2
  summary layout `tensorboard --logdir` reads), written with the `tensorboard` package's
  protos and record format alone.
- `run_writers`: a training run's writers (TensorBoard, metrics.jsonl, the log) and progress hooks.
- `JsonlWriter`: `workdir/metrics.jsonl`, one JSON object per logged step. Values are
  numbers, except the few that only the JSON lines carry: strings and lists of strings (the
  step's `data_fingerprints`, data_pipeline.fingerprint). `RecordsMultiWriter` sends those to
  the JSONL writer only, since TensorBoard and the logging writer take numbers. A NaN or
  infinite value (a window of skipped steps, a diverged loss) is written as `null`: strict JSON
  readers (jq, JavaScript's JSON.parse, Spark) refuse Python's bare `NaN`.
"""
import itertools
import json
import math
import os
import socket
import sys
import time
import types

import jax

_CLU_SUMMARY_MODULE = "clu.metric_writers.summary_writer"
_file_ids = itertools.count()


def _summary_writer(logdir: str):
    return TensorBoardWriter(logdir)


# Only if clu's writers are not imported yet (else they keep the TF writer they already have).
if "clu.metric_writers" not in sys.modules:
    _shim = types.ModuleType(_CLU_SUMMARY_MODULE,
                             "clu's SummaryWriter replaced by ettin_jax.writers.TensorBoardWriter")
    _shim.SummaryWriter = _summary_writer
    sys.modules.setdefault(_CLU_SUMMARY_MODULE, _shim)

from clu import metric_writers  # noqa: E402  pylint: disable=wrong-import-position

from ettin_jax import cli  # noqa: E402  pylint: disable=wrong-import-position


class TensorBoardWriter(metric_writers.MetricWriter):
    """A TensorBoard event file in `logdir`: scalars (the `scalars` plugin) and texts (`text`).

    The records go straight to a local file (tensorboard's own EventFileWriter would import
    TensorFlow for `tf.io.gfile`); clu's AsyncMultiWriter keeps the writes off the train loop.
    Images, videos, audio, histograms and hparams need TensorFlow's summary ops; they raise
    NotImplementedError (nothing in ettin-jax writes them)."""

    def __init__(self, logdir: str):
        try:
            # pylint: disable=import-outside-toplevel
            from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
            from tensorboard.compat.proto.event_pb2 import Event
            from tensorboard.summary.writer.record_writer import RecordWriter
        except ImportError as e:
            raise ImportError(f"TensorBoard event files for {logdir} need the `tensorboard` "
                              f"package ({e}): pip install tensorboard (requirements.txt pins "
                              f"it)") from e
        self._pb = types.SimpleNamespace(summary=summary_pb2, tensor=tensor_pb2,
                                         shape=tensor_shape_pb2, types=types_pb2, Event=Event)
        os.makedirs(logdir, exist_ok=True)
        # TensorBoard reads every file whose name holds "tfevents"; the rest keeps names unique.
        self.path = os.path.join(logdir, f"events.out.tfevents.{int(time.time()):010d}."
                                         f"{socket.gethostname()}.{os.getpid()}.{next(_file_ids)}")
        self._records = RecordWriter(open(self.path, "wb"))  # pylint: disable=consider-using-with
        self._add(Event(wall_time=time.time(), file_version="brain.Event:2"))
        self.flush()

    def _add(self, event):
        with cli.naming_file(self.path):
            self._records.write(event.SerializeToString())

    def _value(self, tag: str, plugin: str, tensor):
        metadata = self._pb.summary.SummaryMetadata(
            plugin_data=self._pb.summary.SummaryMetadata.PluginData(plugin_name=plugin))
        return self._pb.summary.Summary.Value(tag=tag, tensor=tensor, metadata=metadata)

    def _write(self, step: int, values: list):
        self._add(self._pb.Event(step=int(step), wall_time=time.time(),
                                 summary=self._pb.summary.Summary(value=values)))

    def write_scalars(self, step, scalars):
        scalar_shape = self._pb.shape.TensorShapeProto()
        self._write(step, [
            self._value(tag, "scalars", self._pb.tensor.TensorProto(
                dtype=self._pb.types.DT_FLOAT, tensor_shape=scalar_shape, float_val=[float(v)]))
            for tag, v in scalars.items()])

    def write_texts(self, step, texts):
        scalar_shape = self._pb.shape.TensorShapeProto()
        self._write(step, [
            self._value(tag, "text", self._pb.tensor.TensorProto(
                dtype=self._pb.types.DT_STRING, tensor_shape=scalar_shape,
                string_val=[str(text).encode("utf-8")]))
            for tag, text in texts.items()])

    def _unsupported(self, kind: str):
        raise NotImplementedError(f"TensorBoardWriter writes scalars and texts; {kind} need "
                                  f"TensorFlow's summary ops (clu's tf SummaryWriter)")

    def write_summaries(self, step, values, metadata=None):
        self._unsupported("generic tensor summaries")

    def write_images(self, step, images):
        self._unsupported("images")

    def write_videos(self, step, videos):
        self._unsupported("videos")

    def write_audios(self, step, audios, *, sample_rate):
        self._unsupported("audios")

    def write_histograms(self, step, arrays, num_buckets=None):
        self._unsupported("histograms")

    def write_hparams(self, hparams):
        self._unsupported("hparams")

    def flush(self):
        with cli.naming_file(self.path):
            self._records.flush()

    def close(self):
        self._records.close()


def _is_number(value) -> bool:
    return not isinstance(value, (str, list, tuple))


def _json_value(key: str, value):
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        if not all(isinstance(v, str) for v in value):
            raise TypeError(f"metrics.jsonl value {key!r}: lists hold strings only, got "
                            f"{[type(v).__name__ for v in value]}")
        return list(value)
    value = float(value)
    return value if math.isfinite(value) else None


class JsonlWriter(metric_writers.MetricWriter):
    """Appends one JSON object per `write_scalars` call: {"step": s, name: value, ...}."""

    def __init__(self, path: str):
        self._file = open(path, "a", encoding="utf-8")  # pylint: disable=consider-using-with

    def write_scalars(self, step, scalars):
        record = {"step": int(step)}
        record.update({k: _json_value(k, v) for k, v in scalars.items()})
        with cli.naming_file(self._file.name):
            self._file.write(json.dumps(record, allow_nan=False) + "\n")
            self._file.flush()

    def write_summaries(self, step, values, metadata=None):
        pass

    def write_images(self, step, images):
        pass

    def write_videos(self, step, videos):
        pass

    def write_audios(self, step, audios, *, sample_rate):
        pass

    def write_texts(self, step, texts):
        pass

    def write_histograms(self, step, arrays, num_buckets=None):
        pass

    def write_hparams(self, hparams):
        pass

    def flush(self):
        with cli.naming_file(self._file.name):
            self._file.flush()

    def close(self):
        self._file.close()


class RecordsMultiWriter(metric_writers.MultiWriter):
    """clu's MultiWriter, except that strings and lists of strings in `write_scalars` reach
    only the JsonlWriters (the other writers get the numbers)."""

    def write_scalars(self, step, scalars):
        numbers = {k: v for k, v in scalars.items() if _is_number(v)}
        for writer in self._writers:
            writer.write_scalars(step, scalars if isinstance(writer, JsonlWriter) else numbers)


def run_writers(config, workdir: str, step: int, num_steps: int):
    """(all metric writers, clu's ReportProgress, per-step hooks) of a run starting at `step`;
    only process 0 writes files, and none on a finished run (config.json stays its own)."""
    from clu import periodic_actions  # pylint: disable=import-outside-toplevel  # after the shim
    is_writer = jax.process_index() == 0 and step < num_steps
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_writer)
    writers = [writer]
    if is_writer:
        writers.append(JsonlWriter(os.path.join(workdir, "metrics.jsonl")))
        with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
            f.write(config.to_json_best_effort(indent=2))
    # Progress and ETA go to the log only: the train scalars carry steps_per_sec of their own
    # (clu's, of another window, made the same TensorBoard tag zigzag).
    report_progress = periodic_actions.ReportProgress(
        num_train_steps=num_steps, writer=None, every_secs=config.log.progress_every_secs)
    hooks = []
    if is_writer:
        hooks.append(report_progress)
        if config.log.profile_steps > 0:   # once (clu's default repeats it every hour)
            hooks.append(periodic_actions.Profile(
                logdir=workdir, num_profile_steps=config.log.profile_steps,
                profile_duration_ms=None, every_steps=None, every_secs=None))
    return RecordsMultiWriter(writers), report_progress, hooks
