r"""Shows what the model will see: batches from the training loader, decoded and measured.

    python -m data_pipeline.inspect --config=configs/ettin_17m.py:mlm [--batches=N] \
        [--rows=R] [--decode] [--dump=FILE.npz] [--eval] [--config.data.mixture=...]

Prints, over N batches of R rows (global batch size is overridden by --rows so output stays
readable): packing efficiency (non-pad / all tokens), pieces per row, MLM mask ratio over
maskable tokens and its [MASK]/random/kept split, CLM label coverage, and each source's token
share. --decode prints every row as text with segment boundaries and masks marked:
    ‖3‖         start of segment 3 (a document or a piece of one)
    ⟦M:orig⟧    replaced by [MASK]; ⟦R:shown→orig⟧ random replacement; ⟦K:orig⟧ kept but predicted
    [PAD×n]     padding
--dump writes input_ids, segment_ids, positions, labels (and mask_positions/mask_labels for
MLM) of all inspected batches to an .npz file. Exit status 1 with a message naming the file
on bad data. With no data configured it shows the demo run's batches (config.demo's row
length, on the stdlib corpus that run builds).
"""
from __future__ import annotations

import numpy as np
from absl import flags
from ml_collections import config_flags

from data_pipeline import demo_corpus, loader, mixtures, sources, tokenizer
from ettin_jax import cli


def define_flags():
    config_flags.DEFINE_config_file("config", None, "config file and arg, e.g. "
                                    "configs/ettin_17m.py:mlm", lock_config=True)
    flags.DEFINE_integer("batches", 2, "batches to inspect")
    flags.DEFINE_integer("rows", 4, "rows per batch (overrides the global batch size)")
    flags.DEFINE_boolean("decode", False, "print rows as text with marks")
    flags.DEFINE_string("dump", "", "write the inspected batches to this .npz file")
    flags.DEFINE_boolean("eval", False, "inspect the eval iterator instead of train")
    flags.mark_flag_as_required("config")


def decode_row(tok, batch: dict, r: int) -> str:
    ids, seg = batch["input_ids"][r], batch["segment_ids"][r]
    labels = batch["labels"][r]
    mlm = "mask_positions" in batch
    mask_id = tok.token_to_id("[MASK]")
    out, span = [], []

    def flush():
        if span:
            out.append(tok.decode(span, skip_special_tokens=False))
            span.clear()

    t = 0
    while t < len(ids):
        if seg[t] == 0:
            flush()
            n = int((seg[t:] == 0).sum()) if (seg[t:] == 0).all() else int(np.argmax(seg[t:] != 0))
            out.append(f"[PAD×{n}]")
            t += n
            continue
        if t == 0 or seg[t] != seg[t - 1]:
            flush()
            out.append(f"‖{seg[t]}‖")
        if mlm and labels[t] != -100:
            flush()
            orig = tok.decode([int(labels[t])], skip_special_tokens=False)
            if ids[t] == mask_id:
                out.append(f"⟦M:{orig}⟧")
            elif ids[t] != labels[t]:
                out.append(f"⟦R:{tok.decode([int(ids[t])], skip_special_tokens=False)}→{orig}⟧")
            else:
                out.append(f"⟦K:{orig}⟧")
        else:
            span.append(int(ids[t]))
        t += 1
    flush()
    return "".join(out)


def statistics(batches: list[dict], special_ids: list[int], names: list[str]) -> dict:
    seg = np.concatenate([b["segment_ids"] for b in batches])
    ids = np.concatenate([b["input_ids"] for b in batches])
    labels = np.concatenate([b["labels"] for b in batches])
    src = np.concatenate([b["source_ids"] for b in batches])
    real = seg > 0
    stats = {"rows": int(seg.shape[0]), "packing_efficiency": float(real.mean()),
             "pieces_per_row": float(np.mean([len(np.unique(s[s > 0])) for s in seg])),
             "label_fraction": float((labels != -100).sum() / max(1, real.sum()))}
    if "mask_positions" in batches[0]:
        original = np.where(labels != -100, labels, ids)
        maskable = real & ~np.isin(original, special_ids)
        chosen = labels != -100
        n = max(1, int(chosen.sum()))
        stats["mask_ratio"] = float(chosen.sum() / max(1, maskable.sum()))
        stats["to_mask_token"] = float((ids[chosen] == special_ids[-1]).sum() / n)
        stats["kept"] = float((ids[chosen] == labels[chosen]).sum() / n)
        stats["random"] = 1.0 - stats["to_mask_token"] - stats["kept"]
    for i, name in enumerate(names):
        stats[f"share[{name}]"] = float((src == i).sum() / max(1, real.sum()))
    return stats


def source_names(paths: list[str]) -> list[str]:
    """Short names of the mixture's sources: each path's last part, or as many parts as make
    the names differ (data/web/shards and data/code/shards: web/shards, code/shards)."""
    parts = [p.rstrip("/").split("/") for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [f"{i}:{p}" for i, p in enumerate(paths)]   # one path listed twice


def batches_config(config, rows: int):
    """The config whose batches are shown, `rows` rows each: the run's, or with no data
    configured the demo's (its rows of config.demo.train.seq_len tokens, its mask ratio)."""
    if not config.data.mixture:
        config = demo_corpus.with_demo_sections(config)
    else:
        config = config.copy_and_resolve_references()
    config.train.global_batch_size = rows
    config.data.eval_batch_size = rows
    return config


def main(argv):
    f = flags.FLAGS
    for name in ("batches", "rows"):
        if f[name].value < 1:
            raise cli.UserError(f"--{name}={f[name].value}: must be at least 1")
    config = batches_config(f.config, f.rows)
    names = (source_names([s[0] for s in sources.parse_mixture(
                mixtures.expand(config.data.mixture, config.phase))])
             if config.data.mixture else ["demo"])
    if not config.data.mixture:
        demo_corpus.configure(config)
    make_iterator = loader.make_eval_iterator if f.eval else loader.make_train_iterator
    it = make_iterator(config, process_index=0, process_count=1, include_metadata=True)
    batches = []
    for _ in range(f.batches):
        try:
            batches.append(next(it))
        except StopIteration:
            break
    tok = tokenizer.load(loader.tokenizer_path(config))
    m = config.model
    special = [m.cls_token_id, m.sep_token_id, m.pad_token_id, m.mask_token_id]
    if f.decode:
        for k, batch in enumerate(batches):
            for r in range(batch["input_ids"].shape[0]):
                print(f"=== batch {k} row {r} ===")
                print(decode_row(tok, batch, r))
    print(f"=== statistics over {len(batches)} batches of {f.rows} rows, "
          f"seq_len {config.train.seq_len}, objective {config.objective} ===")
    for key, value in statistics(batches, special, names).items():
        print(f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")
    if f.dump:
        keys = [k for k in batches[0] if k != "source_ids"]
        np.savez(f.dump, **{k: np.concatenate([b[k] for b in batches]) for k in keys})
        print(f"wrote {f.dump}: {', '.join(keys)}")
    return 0


if __name__ == "__main__":
    cli.run(main, define_flags, usage=__doc__)
