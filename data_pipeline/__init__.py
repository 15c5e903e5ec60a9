"""Ettin data: prepare raw text into token shards, read Ettin's released data, and load
packed, masked batches with Grain. Entry points: `data_pipeline.loader` (training),
`python -m data_pipeline.{prepare,tokenizer,demo_corpus,inspect}` (command line)."""
