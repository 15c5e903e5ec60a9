"""`workdir/metrics.jsonl`: one JSON object per logged step, as a clu MetricWriter.

Values are numbers, except the few that only the JSON lines carry: strings and lists of
strings (the step's `data_fingerprints`, data_pipeline.fingerprint). `RecordsMultiWriter` sends
those to the JSONL writer only, since TensorBoard and the logging writer take numbers.
"""
import json

from clu import metric_writers


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
    return float(value)


class JsonlWriter(metric_writers.MetricWriter):
    """Appends one JSON object per `write_scalars` call: {"step": s, name: value, ...}."""

    def __init__(self, path: str):
        self._file = open(path, "a", encoding="utf-8")  # pylint: disable=consider-using-with

    def write_scalars(self, step, scalars):
        record = {"step": int(step)}
        record.update({k: _json_value(k, v) for k, v in scalars.items()})
        self._file.write(json.dumps(record) + "\n")
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
