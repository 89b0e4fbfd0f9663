"""Megatron's torch format streamed both ways (issue 18): the files equal torch.save's of each whole rank state dict
(the writer before streaming, reproduced here), reading equals the memory-mapped torch.load reader it replaced, each
Hugging Face tensor is read once, and neither direction holds a tensor (or a mapping) from one tensor to the next."""

import collections
import errno
import gc
import os
import re
import shutil

import pytest
import torch

from megatron.core.safe_globals import register_safe_globals
from megatron_harpe.checkpoint_layout import (CheckpointError, load_torch_file, rank_file, torch_rank_files,
                                              write_release_tracker)
from megatron_harpe.convert.cli import hf_to_megatron
from megatron_harpe.convert.hf_checkpoint import HFCheckpoint, required_hf_names
from megatron_harpe.convert.mapping import (EXTRA_STATE_MODULES, GLOBAL_TABLE, LAYER_TABLE, ConversionError,
                                           hf_layer_name, megatron_layer_name, merge_tp, parse_layer_key, split_tp,
                                           stage_has, stage_layers, to_megatron)
from megatron_harpe.convert.megatron_checkpoint import megatron_args
from megatron_harpe.convert.torch_format import read_torch, write_torch
from megatron_harpe.cpu_compat import megatron_on_cpu
from tiny_checkpoints import copy_of

SHAPES = {  # tiny random Llamas: MHA, and GQA with 2 heads per group
    "mha": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=4),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LAYOUTS = [(tp, pp) for tp in (1, 2, 4) for pp in (1, 2)]
register_safe_globals()  # what importing megatron.core does: torch.load takes the saved args, as in megatron's loader


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """``{kind: HFCheckpoint}`` of 4-layer Llamas saved by transformers, every weight (norms too) distinct."""
    from transformers import LlamaConfig, LlamaForCausalLM

    checkpoints = {}
    for kind, sizes in SHAPES.items():
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=300, intermediate_size=96, num_hidden_layers=4,
                                             max_position_embeddings=256, tie_word_embeddings=False, **sizes))
        with torch.no_grad():
            for p in model.parameters():
                p.normal_()
        path = tmp_path_factory.mktemp(kind)
        model.save_pretrained(str(path))
        checkpoints[kind] = HFCheckpoint(str(path))
    return checkpoints


def args_for(ckpt, tp, pp, dtype="fp32", impl="local"):
    return megatron_args(ckpt.shape, tp=tp, pp=pp, dtype=dtype, ckpt_format="torch", transformer_impl=impl,
                         seq_length=256, harpe_bases=None)


# --- the references: the writer and reader before issue 18 --------------------------------------------------------

def torch_save_writer(root, read_hf, shape, args, dtype):
    """Each rank's whole state dict built, then torch.save (reads every Hugging Face tensor once per TP rank)."""
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    impl = args.transformer_impl

    def own_storage(tensor):
        if tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size() and tensor.is_contiguous():
            return tensor
        return tensor.clone(memory_format=torch.contiguous_format)

    for pp_rank in range(pp):
        for tp_rank in range(tp):
            state = {}
            for name, hf, combination, where in GLOBAL_TABLE:
                if stage_has(where, pp, pp_rank):
                    full = to_megatron(combination, [read_hf(hf)], shape, args.padded_vocab_size)
                    state[name] = own_storage(split_tp(name, full.to(dtype), tp)[tp_rank])
            if stage_has("last", pp, pp_rank):
                state["output_layer._extra_state"] = None
            for local, layer in enumerate(stage_layers(shape.num_layers, pp, pp_rank)):
                for name, hf_names, combination in LAYER_TABLE:
                    full = to_megatron(combination, [read_hf(hf_layer_name(layer, n)) for n in hf_names], shape,
                                       args.padded_vocab_size)
                    state[megatron_layer_name(local, name, impl)] = own_storage(
                        split_tp(name, full.to(dtype), tp)[tp_rank])
                for module in EXTRA_STATE_MODULES[impl]:
                    state[f"decoder.layers.{local}.{module}._extra_state"] = None
            path = rank_file(str(root), tp_rank, pp_rank, pp)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 0, "model": state}, path)
    write_release_tracker(str(root))


def mmap_reader(path, args):
    """Every rank file of a stage memory-mapped by torch.load, tensors merged across TP."""
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    files = torch_rank_files(str(path), tp, pp)
    for pp_rank in range(pp):
        ranks = [load_torch_file(files[tp_rank, pp_rank], mmap=True)["model"] for tp_rank in range(tp)]
        first_layer = stage_layers(args.num_layers, pp, pp_rank).start
        for key in ranks[0]:
            if key.endswith("_extra_state"):
                continue
            parsed = parse_layer_key(key)
            name = key if parsed is None else megatron_layer_name(first_layer + parsed[0], parsed[1])
            yield name, merge_tp(name, [r[key] for r in ranks])


def assert_same(a, b, where="state"):
    """Equal key for key (in order), tensors bitwise with dtype, shape and stride."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape, a.stride()) == (b.dtype, b.shape, b.stride()), where
        assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}/{key}")
    else:
        assert a == b, where


def files_under(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


# --- 1, 2: equal to the references -------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["local", "transformer_engine"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tp, pp", LAYOUTS)
@pytest.mark.parametrize("kind", SHAPES)
def test_files_equal_torch_save_of_each_whole_rank(tmp_path, hf, kind, tp, pp, dtype, impl):
    from megatron.training.checkpointing import _load_base_checkpoint

    ckpt, old, new = hf[kind], tmp_path / "old", tmp_path / "new"
    args = args_for(ckpt, tp, pp, dtype, impl)
    torch_save_writer(old, ckpt.read, ckpt.shape, args, DTYPES[dtype])
    write_torch(str(new), ckpt.read, ckpt.shape, args, DTYPES[dtype])
    assert files_under(new) == files_under(old)
    for name in files_under(old):
        if name.endswith(".pt"):  # megatron's own legacy load: torch.load(file, map_location="cpu"), weights only
            assert_same(torch.load(new / name, map_location="cpu"), torch.load(old / name, map_location="cpu"), name)
    with megatron_on_cpu():  # its tracker read all-reduces a CUDA tensor when a process group is up (earlier tests)
        state, file, release, _ = _load_base_checkpoint(str(new), args, rank0=True)
    assert release and file.startswith(str(new)) and state["iteration"] == 0
    assert_same(state, torch.load(file.replace(str(new), str(old)), map_location="cpu"))


@pytest.mark.parametrize("impl", ["local", "transformer_engine"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tp, pp", LAYOUTS)
@pytest.mark.parametrize("kind", SHAPES)
def test_reading_equals_the_mmap_reader(tmp_path, hf, kind, tp, pp, dtype, impl):
    ckpt = hf[kind]
    args = args_for(ckpt, tp, pp, dtype, impl)
    write_torch(str(tmp_path), ckpt.read, ckpt.shape, args, DTYPES[dtype])
    ours, reference = list(read_torch(str(tmp_path / "release"), args)), list(mmap_reader(tmp_path / "release", args))
    assert [name for name, _ in ours] == [name for name, _ in reference]
    for (name, a), (_, b) in zip(ours, reference):
        assert_same(a, b, name)


@pytest.mark.parametrize("tp", [1, 2])
def test_views_into_one_shared_storage_read_their_own_bytes(tmp_path, hf, tp, monkeypatch):
    """Megatron-LM's training may save parameters that are views of one contiguous buffer (here with gaps, and one
    transposed): each tensor is read from its own extent, equal to torch.load's, never its whole storage."""
    ckpt = hf["gqa"]
    args = args_for(ckpt, tp, 1)
    write_torch(str(tmp_path / "ours"), ckpt.read, ckpt.shape, args, torch.float32)
    tensor_bytes = 0
    for tp_rank in range(tp):
        state = torch.load(rank_file(str(tmp_path / "ours"), tp_rank, 0, 1), map_location="cpu")
        tensors = {key: t for key, t in state["model"].items() if t is not None}
        flat = torch.full((sum(t.numel() + 5 for t in tensors.values()),), float("nan"))
        start = 5
        for key, t in tensors.items():
            region = flat[start:start + t.numel()]
            if key.endswith("linear_proj.weight"):  # stored transposed: a non-contiguous view
                region.view(t.shape[1], t.shape[0]).copy_(t.t())
                state["model"][key] = region.view(t.shape[1], t.shape[0]).t()
            else:
                state["model"][key] = region.view(t.shape).copy_(t)
            start += t.numel() + 5
            tensor_bytes += t.numel() * t.element_size()
        path = rank_file(str(tmp_path / "shared"), tp_rank, 0, 1)
        os.makedirs(os.path.dirname(path))
        torch.save(state, path)
    write_release_tracker(str(tmp_path / "shared"))

    read_bytes, preadv = [], os.preadv

    def counted_preadv(fd, buffers, offset):
        read_bytes.append(preadv(fd, buffers, offset))
        return read_bytes[-1]

    monkeypatch.setattr(os, "preadv", counted_preadv)
    shared = list(read_torch(str(tmp_path / "shared" / "release"), args))
    monkeypatch.undo()
    assert sum(read_bytes) == tensor_bytes  # a storage read per tensor would be ~(number of tensors) x larger
    reference = list(mmap_reader(tmp_path / "shared" / "release", args))
    assert [name for name, _ in shared] == [name for name, _ in reference]
    for (name, a), (_, b) in zip(shared, reference):
        assert_same(a, b, name)
    for (name, a), (_, b) in zip(shared, read_torch(str(tmp_path / "ours" / "release"), args)):
        assert torch.equal(a, b), name


# --- 3, 4: read once, nothing held ---------------------------------------------------------------------------------

def test_each_hugging_face_tensor_is_read_once(tmp_path, hf):
    ckpt, reads = hf["gqa"], collections.Counter()

    def read(name):
        reads[name] += 1
        return ckpt.read(name)

    write_torch(str(tmp_path), read, ckpt.shape, args_for(ckpt, 2, 2, "bf16", "transformer_engine"), torch.bfloat16)
    assert reads == collections.Counter(required_hf_names(ckpt.shape))


def cpu_storages(kinds=(torch.Tensor, torch.nn.Parameter)):
    """The storages of CPU tensors reachable from Python (tensors of exactly ``kinds``). A tensor an earlier test
    left with an invalid storage (freed under it) holds no bytes and is passed over."""
    for obj in gc.get_objects():
        if type(obj) in kinds and obj.device.type == "cpu":
            try:
                storage = obj.untyped_storage()
                yield storage.data_ptr(), storage.nbytes()
            except RuntimeError:  # "Attempted to access the data pointer on an invalid python storage"
                continue


def live_tensor_bytes(ignore):
    """Bytes of CPU tensor storages reachable from Python, but those whose data pointers ``ignore`` holds."""
    return sum({ptr: nbytes for ptr, nbytes in cpu_storages() if ptr not in ignore}.values())


def data_pointers():
    return {ptr for ptr, _ in cpu_storages()}


def test_the_writer_holds_no_tensor_from_one_to_the_next(tmp_path, hf):
    """Whenever it reads a Hugging Face tensor or reports progress, nothing the writer made is alive: memory is one
    full tensor (and one rank's part of it), whatever the model's size."""
    ckpt = hf["mha"]
    args = args_for(ckpt, 2, 1, "bf16")
    source = {name: ckpt.read(name) for name in required_hf_names(ckpt.shape)}
    before, alive = data_pointers(), []

    def read(name):
        alive.append(live_tensor_bytes(before))
        return source[name]

    write_torch(str(tmp_path), read, ckpt.shape, args, torch.bfloat16,
                progress=lambda n: alive.append(live_tensor_bytes(before)))
    assert max(alive) == 0 and len(alive) == len(source) + 3 + 4


def test_the_reader_keeps_no_mapping_and_no_tensor_from_one_to_the_next(tmp_path, hf):
    ckpt = hf["mha"]
    args = args_for(ckpt, 2, 2, "bf16")
    write_torch(str(tmp_path), ckpt.read, ckpt.shape, args, torch.bfloat16)
    files = list(torch_rank_files(str(tmp_path / "release"), 2, 2).values())
    before, alive, yields = data_pointers(), [], 0
    for name, tensor in read_torch(str(tmp_path / "release"), args):
        del tensor
        yields += 1
        with open("/proc/self/maps") as f:
            maps = f.read()
        assert not [file for file in files if os.path.realpath(file) in maps], name
        alive.append(live_tensor_bytes(before))
    assert max(alive) == 0 and yields == 3 + 4 * 6


# --- 5: errors -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cut", [0.25, 0.5, 0.75, 1.01], ids=["skeleton-1/4", "skeleton-1/2", "skeleton-3/4",
                                                              "after-the-skeleton"])
def test_a_truncated_rank_file_is_named(tmp_path, hf, cut):
    """Cut in the pickled structure (torch's zip reader fails in several ways) or in the tensor bytes."""
    ckpt = hf["mha"]
    args = args_for(ckpt, 2, 1)
    write_torch(str(tmp_path), ckpt.read, ckpt.shape, args, torch.float32)
    file = rank_file(str(tmp_path), 1, 0, 1)
    model = load_torch_file(file, map_location="meta")["model"]
    first_tensor = min(t.untyped_storage()._checkpoint_offset for t in model.values() if t is not None)
    with open(file, "r+b") as f:
        f.truncate(int(first_tensor * cut))
    with pytest.raises(CheckpointError, match=rf"{re.escape(file)} is damaged or truncated .*re-copy the checkpoint"):
        list(read_torch(str(tmp_path / "release"), args))


def test_rank_files_of_different_checkpoints_are_refused(tmp_path, hf):
    ckpt = hf["mha"]
    args = args_for(ckpt, 2, 1)
    write_torch(str(tmp_path / "local"), ckpt.read, ckpt.shape, args, torch.float32)
    write_torch(str(tmp_path / "te"), ckpt.read, ckpt.shape, args_for(ckpt, 2, 1, impl="transformer_engine"),
                torch.float32)
    shutil.copyfile(rank_file(str(tmp_path / "te"), 1, 0, 1), rank_file(str(tmp_path / "local"), 1, 0, 1))
    with pytest.raises(CheckpointError, match="hold different tensors: the rank files come from different"):
        list(read_torch(str(tmp_path / "local" / "release"), args))


def test_a_tensor_unlike_its_config_is_refused(tmp_path, hf):
    ckpt = hf["mha"]

    def read(name):
        return ckpt.read(name)[:-1] if name == "model.layers.1.self_attn.o_proj.weight" else ckpt.read(name)

    with pytest.raises(ConversionError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight has shape \(63, 64\), "
                                              r"config\.json's sizes give \(64, 64\)"):
        write_torch(str(tmp_path), read, ckpt.shape, args_for(ckpt, 2, 1), torch.float32)


def test_full_disk_while_filling_the_rank_files(tmp_path, request, capsys, monkeypatch):
    """The skeletons are sparse: a full disk shows while their holes are filled, as the usual one-line error."""
    hf_dir = copy_of("hf", tmp_path / "hf", request.getfixturevalue)

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    capsys.readouterr()
    assert hf_to_megatron(["--hf-dir", str(hf_dir), "--out", str(tmp_path / "m"), "--format", "torch",
                           "--tp", "2"]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in err and "free space there" in errors[0], err
    assert os.listdir(tmp_path) == ["hf"]  # nothing partial beside the input
