"""Streaming torch_dist (issue 18): the writer and reader hold one parameter / one unit, and agree with megatron-core.

References: megatron-core's own ``dist_checkpointing.save`` of a whole built TP=1 model (what the writer replaced)
and its ``dist_checkpointing.load`` of the whole sharded state dict; the Hugging Face source split by the repo's
mapping for the loads at other layouts.
"""

import os
import weakref

import pytest
import torch

from megatron_harpe.checkpoint_layout import CheckpointError, UnsafeCheckpointError, release_dir
from megatron_harpe.checkpoint_model import meta_model
from megatron_harpe.convert import torch_dist_format
from megatron_harpe.convert.hf_checkpoint import HFCheckpoint
from megatron_harpe.convert.mapping import GLOBAL_TABLE, LAYER_TABLE, full_megatron_state
from megatron_harpe.convert.megatron_checkpoint import megatron_args
from megatron_harpe.convert.torch_dist_format import read_torch_dist, write_torch_dist
from megatron_harpe.distributed import init_model_parallel, spawn

SHAPES = {  # tiny random Llamas (vocab 300, padded to 384 at TP=1): GQA with 2 heads per group, and MHA
    "gqa": dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=4),
    "mha": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4),
}
HARPE_BASES = [1e4, 2.5e5, 7e5, 3e6]  # one per query group of the GQA model


def make_hf(path, kind, num_layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, intermediate_size=128, num_hidden_layers=num_layers,
                                         max_position_embeddings=256, tie_word_embeddings=False, **SHAPES[kind]))
    with torch.no_grad():  # norms away from 1, so that a swapped norm weight shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(str(path))
    return HFCheckpoint(str(path))


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {kind: make_hf(root / kind, kind) for kind in SHAPES}


def conversion_args(hf, tp=1, dtype="fp32", harpe_bases=None):
    return megatron_args(hf.shape, tp=tp, pp=1, dtype=dtype, ckpt_format="torch_dist", transformer_impl="local",
                         seq_length=256, harpe_bases=harpe_bases)


def full_state(hf, args, dtype):
    return {k: v.to(dtype) for k, v in full_megatron_state(hf.read, hf.shape, args.padded_vocab_size).items()}


def reference_write(root, hf, args, dtype):
    """The writer this module replaced: megatron-core's dist_checkpointing.save of a whole TP=1 model."""
    from megatron.core import dist_checkpointing

    from megatron_harpe.checkpoint_layout import write_release_tracker
    from megatron_harpe.sharding import load_full_state_dict

    with meta_model(args, dtype) as model:
        model.to_empty(device="cpu")
        load_full_state_dict(model, full_state(hf, args, dtype), 0, 1, gated_linear_unit=True)
        os.makedirs(release_dir(root))
        state = {"args": args, "checkpoint_version": 3.0, "iteration": 0, "model": model.sharded_state_dict()}
        dist_checkpointing.save(state, release_dir(root))
    write_release_tracker(root)


def whole_model_load(path, args, dtype):
    """megatron-core's dist_checkpointing.load of the whole sharded state dict into a TP=1 model."""
    from megatron.core import dist_checkpointing

    with meta_model(args, dtype) as model:
        model.to_empty(device="cpu")
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, path)["model"]
        model.load_state_dict(loaded, strict=False)
        return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def dcp_tensors(path):
    """Every tensor of a checkpoint at its global shape, by torch.distributed.checkpoint's own loader."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(path).read_metadata()
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in metadata.state_dict_metadata.items()
             if isinstance(m, TensorStorageMetadata)}
    dcp.load(state, storage_reader=dcp.FileSystemReader(path), planner=dcp.DefaultLoadPlanner())
    return metadata, state


def chunk_layout(metadata):
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    return {k: (type(m).__name__, tuple(m.size), m.properties.dtype,
                sorted((tuple(c.offsets), tuple(c.sizes)) for c in m.chunks))
            if isinstance(m, TensorStorageMetadata) else type(m).__name__
            for k, m in metadata.state_dict_metadata.items()}


def stored_lengths(metadata):
    return {(index.fqn, tuple(index.offset or ())): info.length for index, info in metadata.storage_data.items()}


def bitwise(a, b):
    return sorted(a) == sorted(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


# --- 1. the streamed checkpoint is megatron's own ---------------------------------------------------------------

@pytest.mark.parametrize("kind, dtype", [("gqa", torch.float32), ("mha", torch.float32), ("gqa", torch.bfloat16)])
def test_streamed_checkpoint_equals_megatrons_save(tmp_path, hf, megatron_single_process, kind, dtype):
    from megatron.core import dist_checkpointing

    args = conversion_args(hf[kind], dtype="bf16" if dtype == torch.bfloat16 else "fp32")
    write_torch_dist(str(tmp_path / "stream"), hf[kind].read, hf[kind].shape, args, dtype)
    reference_write(str(tmp_path / "ref"), hf[kind], args, dtype)
    ours, theirs = release_dir(str(tmp_path / "stream")), release_dir(str(tmp_path / "ref"))
    (meta_ours, tensors_ours), (meta_ref, tensors_ref) = dcp_tensors(ours), dcp_tensors(theirs)
    assert chunk_layout(meta_ours) == chunk_layout(meta_ref)
    assert stored_lengths(meta_ours) == stored_lengths(meta_ref)  # each item serialized alike (dtype, storage)
    assert meta_ours.planner_data == meta_ref.planner_data  # megatron's flattening and key mapping
    assert len(tensors_ours) == len(LAYER_TABLE) + len(GLOBAL_TABLE) and bitwise(tensors_ours, tensors_ref)
    assert dist_checkpointing.load_common_state_dict(ours)["args"] == args
    assert open(os.path.join(ours, "metadata.json")).read() == open(os.path.join(theirs, "metadata.json")).read()
    assert open(tmp_path / "stream" / "latest_checkpointed_iteration.txt").read() == "release"


def test_each_source_tensor_read_once_and_progress_per_parameter(tmp_path, hf, megatron_single_process):
    reads, steps = [], []

    def read(name):
        reads.append(name)
        return hf["gqa"].read(name)

    write_torch_dist(str(tmp_path / "m"), read, hf["gqa"].shape, conversion_args(hf["gqa"]), torch.float32,
                     steps.append)
    assert sorted(reads) == sorted(hf["gqa"].weight_map)  # SwiGLU's gate and up too, though fc1 is one parameter
    assert steps == [1] * (len(GLOBAL_TABLE) + hf["gqa"].shape.num_layers * len(LAYER_TABLE))


# --- 2. megatron-core loads it at other layouts, GPTModel and HarpeGPTModel -------------------------------------

def _load_at_layouts_worker(rank, world_size, roots, full):
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    from megatron_harpe.checkpoint_model import load_model
    from megatron_harpe.model import HarpeGPTModel
    from megatron_harpe.sharding import local_view

    for tp, pp in ((2, 1), (1, 2)):
        init_model_parallel(tp, pp)
        for name, root in roots.items():
            model, args = load_model(root, allow_pickle=True)  # TP=1-converted args at TP=2: the regression
            assert (args.harpe_bases is not None) == (name == "harpe")
            assert type(model) is (HarpeGPTModel if name == "harpe" else GPTModel)
            expected = local_view(model, full, parallel_state.get_tensor_model_parallel_rank(), tp,
                                  gated_linear_unit=True)
            got = dict(model.named_parameters())
            assert sorted(got) == sorted(expected)
            for key, tensor in expected.items():
                assert torch.equal(got[key], tensor), f"TP={tp} PP={pp} rank {rank} {name}: {key}"


@pytest.mark.multirank
def test_loads_at_tp2_and_pp2_as_gpt_and_harpe(tmp_path, hf, megatron_single_process):
    roots = {}
    for name, bases in (("gpt", None), ("harpe", HARPE_BASES)):
        args = conversion_args(hf["gqa"], harpe_bases=bases)
        roots[name] = str(tmp_path / name)
        write_torch_dist(roots[name], hf["gqa"].read, hf["gqa"].shape, args, torch.float32)
    spawn(_load_at_layouts_worker, 2, roots, full_state(hf["gqa"], args, torch.float32))


def test_tp2_conversion_loads_at_tp1(tmp_path, hf, megatron_single_process):
    """Saved args resolved at TP=2 (tensor_parallel_num_weight_shards 2) must not become GTP remat 2 at TP=1."""
    from megatron_harpe.checkpoint_model import load_model

    args = conversion_args(hf["gqa"], tp=2)
    assert args.tensor_parallel_num_weight_shards == 2
    write_torch_dist(str(tmp_path / "m"), hf["gqa"].read, hf["gqa"].shape, args, torch.float32)
    model, loaded_args = load_model(str(tmp_path / "m"), allow_pickle=True)
    assert loaded_args.gtp_weight_remat_size == 1 and model.config.gtp_weight_remat_size == 1
    full = full_state(hf["gqa"], args, torch.float32)
    assert bitwise({k: p.detach() for k, p in model.named_parameters()}, full)


# --- 3. the streaming reader equals megatron's whole-model load --------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_reader_equals_megatrons_whole_model_load(tmp_path, hf, megatron_single_process, dtype):
    args = conversion_args(hf["gqa"], dtype="bf16" if dtype == torch.bfloat16 else "fp32")
    reference_write(str(tmp_path / "ref"), hf["gqa"], args, dtype)
    path = release_dir(str(tmp_path / "ref"))
    streamed = dict(read_torch_dist(path, args, dtype, allow_pickle=True))
    whole = whole_model_load(path, args, dtype)
    assert bitwise(streamed, whole)
    source = full_state(hf["gqa"], args, dtype)  # and both are the source (megatron keeps its norms in fp32)
    assert bitwise(streamed, {k: v.to(streamed[k].dtype) for k, v in source.items()})


# --- 4. bounded memory, structurally ------------------------------------------------------------------------------

def test_writer_makes_each_chunk_just_before_writing_it(tmp_path, monkeypatch, megatron_single_process):
    """Four layers: a writer that made the model up front would hold 4 x 7 + 3 chunks' storage; this one makes each
    chunk when torch's file writer reaches it and keeps none itself. What stays alive is torch's: its writer keeps
    the last chunk of each key until the file closes (``tensor_dict``, filesystem.py, for its safetensors path), so
    one layer's parameters and the three global ones at most, whatever the layer count."""
    from torch.distributed.checkpoint import filesystem

    hf4 = make_hf(tmp_path / "hf4", "gqa", num_layers=4)
    events, alive = [], weakref.WeakSet()
    most_alive = 0
    make_chunk, write_item = torch_dist_format._ChunkSource.__call__, filesystem._write_item

    def recording_chunk(self, *a):
        nonlocal most_alive
        events.append("make")
        chunk = make_chunk(self, *a)
        alive.add(chunk.untyped_storage())  # torch keeps a storage's Python object while any tensor uses it
        most_alive = max(most_alive, len(alive))
        return chunk

    def recording_write(transforms, stream, data, item, *a):
        events.append("write" if isinstance(data, torch.Tensor) else "object")
        return write_item(transforms, stream, data, item, *a)

    monkeypatch.setattr(torch_dist_format._ChunkSource, "__call__", recording_chunk)
    monkeypatch.setattr(filesystem, "_write_item", recording_write)
    write_torch_dist(str(tmp_path / "m"), hf4.read, hf4.shape, conversion_args(hf4), torch.float32)
    tensors = [e for e in events if e != "object"]
    chunks = len(GLOBAL_TABLE) + 4 * (len(LAYER_TABLE) + 1)  # SwiGLU fc1 is saved as two chunks
    assert tensors == ["make", "write"] * chunks
    assert most_alive <= len(GLOBAL_TABLE) + len(LAYER_TABLE)


def unit_of(model, name):
    """The reader's unit that holds parameter ``name``."""
    if name.startswith("decoder.layers."):
        return model.decoder.layers[int(name.split(".")[2])]
    return {"embedding": model.embedding, "decoder": model.decoder.final_layernorm,
            "output_layer": model.output_layer}[name.split(".")[0]]


def test_reader_gives_storage_to_one_unit_at_a_time(tmp_path, hf, monkeypatch, megatron_single_process):
    import contextlib

    args = conversion_args(hf["gqa"])
    write_torch_dist(str(tmp_path / "m"), hf["gqa"].read, hf["gqa"].shape, args, torch.float32)
    built, real_meta_model = [], torch_dist_format.meta_model

    @contextlib.contextmanager
    def recording_meta_model(*a):
        with real_meta_model(*a) as model:
            built.append(model)
            yield model

    monkeypatch.setattr(torch_dist_format, "meta_model", recording_meta_model)
    units_seen = []
    for name, _ in read_torch_dist(release_dir(str(tmp_path / "m")), args, torch.float32, allow_pickle=True):
        (model,) = built
        unit = unit_of(model, name)
        on_cpu = {id(p) for p in model.parameters() if p.device.type == "cpu"}
        assert on_cpu == {id(p) for p in unit.parameters()}, name
        if not units_seen or units_seen[-1] is not unit:
            units_seen.append(unit)
    assert units_seen == torch_dist_format.units(built[0])  # each unit once, in order
    assert all(p.device.type == "meta" for p in built[0].parameters())


# --- 5. bad input --------------------------------------------------------------------------------------------------

@pytest.fixture
def streamed(tmp_path, hf, megatron_single_process):
    args = conversion_args(hf["mha"])
    write_torch_dist(str(tmp_path / "m"), hf["mha"].read, hf["mha"].shape, args, torch.float32)
    path = release_dir(str(tmp_path / "m"))
    (distcp,) = [f for f in os.listdir(path) if f.endswith(".distcp")]
    return path, os.path.join(path, distcp), args


def test_refuses_without_allow_pickle(streamed):
    path, _, args = streamed
    with pytest.raises(UnsafeCheckpointError, match="--allow-pickle"):
        next(read_torch_dist(path, args, torch.float32))


def test_truncated_distcp_is_named(streamed):
    path, distcp, args = streamed
    with open(distcp, "r+b") as f:
        f.truncate(os.path.getsize(distcp) // 2)
    with pytest.raises(CheckpointError, match=f"{distcp} is truncated"):
        list(read_torch_dist(path, args, torch.float32, allow_pickle=True))


def test_overwritten_distcp_is_named_damaged(streamed):
    path, distcp, args = streamed
    size = os.path.getsize(distcp)
    with open(distcp, "r+b") as f:  # every stored tensor's zip header gone, the size unchanged
        f.write(b"\0" * size)
    with pytest.raises(CheckpointError, match=f"{path} is damaged"):
        list(read_torch_dist(path, args, torch.float32, allow_pickle=True))
