"""`workdir/metrics.jsonl`: one JSON object per logged step, as a clu MetricWriter."""
import json

from clu import metric_writers


class JsonlWriter(metric_writers.MetricWriter):
    """Appends one JSON object per `write_scalars` call: {"step": s, name: value, ...}."""

    def __init__(self, path: str):
        self._file = open(path, "a", encoding="utf-8")  # pylint: disable=consider-using-with

    def write_scalars(self, step, scalars):
        record = {"step": int(step)}
        record.update({k: float(v) for k, v in scalars.items()})
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
