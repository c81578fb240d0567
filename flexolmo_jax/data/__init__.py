"""FlexMix data pipeline: local files -> TFDS array_record -> packed rows -> grain batches.

    prepare_dataset(...)        files (.jsonl[.gz|.zst], .txt[.gz|.zst], .parquet) -> TFDS dataset
    make_train_loader(...)      weighted, shuffled, per-process, resumable training batches
    make_eval_loader(...)       one finite pass over a validation split
    tokenizer_info(path)        eos/pad ids, vocab padded to a multiple of 128
    sample_documents(...)       raw documents, e.g. for domain embeddings
    build_flexmix_mini(...)     the embedded default corpus (public + code, math, legal)
"""
from flexolmo_jax.data.catalog import (dataset_stats, open_builder, resolve_dataset_dir,
                                       sample_documents)
from flexolmo_jax.data.errors import DataError
from flexolmo_jax.data.loader import EvalLoader, TrainLoader, make_eval_loader, make_train_loader
from flexolmo_jax.data.packing import PackedSplit, pack_token_documents, packed_split
from flexolmo_jax.data.prepare import prepare_dataset
from flexolmo_jax.data.tokenizer import (TokenizerInfo, load_tokenizer, pad_vocab_size,
                                         padded_vocab_size, special_ids, tokenizer_info,
                                         train_bpe_tokenizer)


def build_flexmix_mini(*args, **kwargs):
  """See flexolmo_jax.data.flexmix_mini.build.build_flexmix_mini (imported lazily)."""
  from flexolmo_jax.data.flexmix_mini.build import build_flexmix_mini as _build

  return _build(*args, **kwargs)


__all__ = [
    "DataError", "EvalLoader", "PackedSplit", "TokenizerInfo", "TrainLoader",
    "build_flexmix_mini", "dataset_stats", "load_tokenizer", "make_eval_loader",
    "make_train_loader", "open_builder", "pack_token_documents", "packed_split",
    "pad_vocab_size", "padded_vocab_size", "prepare_dataset", "resolve_dataset_dir",
    "sample_documents", "special_ids", "tokenizer_info", "train_bpe_tokenizer",
]
