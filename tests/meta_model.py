"""One rank's HARPE model for any TP x PP layout, built in this process on the meta device.

``rank_model(shape, tp=8, pp=1, tp_rank=3, pp_rank=0, bases=...)`` is the ``HarpeGPTModel`` (local spec) that
tensor-parallel rank ``tp_rank`` of pipeline stage ``pp_rank`` holds, with every parameter on the meta device
(shapes and megatron's parallel attributes, no storage), so a Llama-2-70B rank builds in a fraction of a second
on a CPU. ``rank_parameter_count(...)`` is its number of parameters.

How the parallel world is faked, without 8 processes and without touching global state:

* Megatron's layers read their TP rank and size from the process groups they are given
  (``pg_collection.tp`` / ``.pp`` / ``.cp`` / ``.embd``; ``get_pg_rank`` / ``get_pg_size`` call
  ``group.rank()`` / ``group.size()``), and ``HarpeRotaryEmbedding`` picks its bases from ``pg_collection.tp``.
  Each rank therefore gets a ``ProcessGroupCollection`` of torch's ``FakeProcessGroup`` backends (no
  communication; ``rank()`` and ``size()`` are what we say), and megatron's ``parallel_state`` is never used.
* ``get_pg_size`` returns 1 unless ``torch.distributed`` is initialized. If it is not, a one-process default
  group on torch's ``fake`` backend is created for the build and destroyed right after; an existing default
  group (the suite's ``megatron_single_process`` gloo world) is used as it is and left alone.
* Parameters: ``use_cpu_initialization=True`` + ``perform_initialization=False`` make megatron's
  Column/RowParallelLinear and VocabParallelEmbedding call ``torch.empty(per_partition_shape)`` without a
  device and skip ``_initialize_affine_weight_cpu`` (which would build the full master weight), so under
  ``torch.device("meta")`` they land on meta. The RoPE tables are explicitly on the CPU (megatron's provider
  from ``use_cpu_initialization``, HARPE's master table from ``inverse_frequencies(..., device="cpu")``), so
  the rank's bases and ``inv_freq`` are real tensors that can be checked.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from types import SimpleNamespace

import torch
from torch.testing._internal.distributed.fake_pg import FakeProcessGroup, FakeStore

from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tokenizers.utils.build_tokenizer import vocab_size_with_padding

from megatron_harpe import HarpeGPTModel, harpe_layer_spec
from megatron_harpe.shape import LlamaShape

#: Megatron-LM's ``--make-vocab-size-divisible-by`` default.
MAKE_VOCAB_SIZE_DIVISIBLE_BY = 128


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = MAKE_VOCAB_SIZE_DIVISIBLE_BY) -> int:
    """Megatron's own padding (``megatron.core.tokenizers...vocab_size_with_padding``): a multiple of divisible_by x TP."""
    args = SimpleNamespace(make_vocab_size_divisible_by=divisible_by, tensor_model_parallel_size=tp, rank=0)
    return vocab_size_with_padding(vocab_size, args, logging_enabled=False)


def _fake_group(rank: int, size: int) -> FakeProcessGroup:
    return FakeProcessGroup._create_internal(rank, size)


def fake_pg_collection(*, tp: int, pp: int, tp_rank: int, pp_rank: int) -> ProcessGroupCollection:
    """The model-parallel process groups of rank (tp_rank, pp_rank) in a TP x PP world (CP = DP = 1), all fake."""
    if not (0 <= tp_rank < tp and 0 <= pp_rank < pp):
        raise ValueError(f"rank (tp {tp_rank}, pp {pp_rank}) is outside a TP={tp} x PP={pp} layout")
    pgs = ProcessGroupCollection()
    pgs.tp = _fake_group(tp_rank, tp)
    pgs.pp = _fake_group(pp_rank, pp)
    pgs.mp = _fake_group(pp_rank * tp + tp_rank, tp * pp)
    pgs.cp = _fake_group(0, 1)
    pgs.tp_cp = _fake_group(tp_rank, tp)
    pgs.dp = _fake_group(0, 1)
    pgs.dp_cp = _fake_group(0, 1)
    # megatron's embedding group: the first and the last stage (one group of one when PP=1), none in between.
    if pp == 1:
        pgs.embd = _fake_group(0, 1)
    elif pp_rank in (0, pp - 1):
        pgs.embd = _fake_group(0 if pp_rank == 0 else 1, 2)
    else:
        pgs.embd = None
    pgs.pos_embd = _fake_group(0, 1) if pp_rank == 0 else None
    return pgs


@contextmanager
def _torch_distributed_initialized():
    """megatron's get_pg_size/get_pg_rank ignore the groups they are given until torch.distributed is initialized."""
    if torch.distributed.is_initialized():
        yield
        return
    torch.distributed.init_process_group("fake", store=FakeStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def rank_model(shape: LlamaShape, *, tp: int, pp: int, tp_rank: int, pp_rank: int, bases: Sequence[float] | None = None,
               vocab_size: int = 32000, num_layers: int | None = None, harpe_rope_impl: str = "auto",
               **config_overrides) -> HarpeGPTModel:
    """The ``HarpeGPTModel`` that rank (tp_rank, pp_rank) of a TP x PP layout holds, with parameters on meta.

    ``shape``: a :class:`~megatron_harpe.shape.LlamaShape` (e.g. ``SHAPES['70b']``). ``bases``: one HARPE base per query group of the whole model (default: all 10000, for
    shape-only uses). ``vocab_size`` is padded as Megatron-LM does (multiple of 128 x TP). ``num_layers``
    overrides ``shape.num_layers`` (the whole model's, split over ``pp`` stages as megatron splits it).
    ``harpe_rope_impl``: the model's RoPE path (``unfused``: its provider returns megatron's frequency pair).
    Untied embeddings (Llama-2), local layer spec, float32 parameters unless ``params_dtype`` is overridden.
    No global state is changed: see the module docstring.
    """
    if num_layers is not None:
        shape = shape.with_sizes(num_layers=num_layers)
    if bases is None:
        bases = [10000.0] * shape.num_query_groups
    config = shape.transformer_config(tp=tp, pp=pp, cpu=True, use_cpu_initialization=True,
                                      perform_initialization=False, **config_overrides)
    pg_collection = fake_pg_collection(tp=tp, pp=pp, tp_rank=tp_rank, pp_rank=pp_rank)
    with _torch_distributed_initialized(), torch.device("meta"):
        return HarpeGPTModel(config, harpe_layer_spec("local"), vocab_size=padded_vocab_size(vocab_size, tp),
                             max_sequence_length=4096, harpe_bases=bases, share_embeddings_and_output_weights=False,
                             pre_process=pp_rank == 0, post_process=pp_rank == pp - 1, pg_collection=pg_collection,
                             harpe_rope_impl=harpe_rope_impl)


def rank_parameter_count(shape: LlamaShape, tp: int, pp: int, tp_rank: int, pp_rank: int, vocab_size: int = 32000) -> int:
    """Number of parameters (``numel`` over ``model.parameters()``) that rank (tp_rank, pp_rank) holds.

    Counted on megatron's own per-rank model built by :func:`rank_model` (meta device, so any size is
    cheap): sharded weights at their per-rank size, replicated norms in full, the padded vocabulary
    (multiple of 128 x TP) in the embedding (first stage) and the output layer (last stage), untied.
    Bases do not change the count.
    """
    model = rank_model(shape, tp=tp, pp=pp, tp_rank=tp_rank, pp_rank=pp_rank, vocab_size=vocab_size)
    return sum(p.numel() for p in model.parameters())
