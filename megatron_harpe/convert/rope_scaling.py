"""RoPE scaling in both spellings: Megatron-LM's flags (saved in a checkpoint's args) and Hugging Face's
``rope_parameters``. Position interpolation (PI) is megatron's ``--rotary-seq-len-interpolation-factor`` and
transformers' ``linear``; YaRN is megatron's ``--position-embedding-type yarn`` and transformers' ``yarn``.

One table, :data:`FIELDS`, maps every field both ways. YaRN's attention factor (the "mscale" that multiplies cos
and sin) is the one derived value: megatron computes it from ``--rotary-scaling-factor``, ``--mscale`` and
``--mscale-all-dim`` (``_yarn_get_concentration_factor``), transformers from ``factor``, ``mscale`` and
``mscale_all_dim`` by another rule (it uses the two mscales only when both are non-zero), so an export writes
megatron's value as ``attention_factor`` and an import accepts only an attention factor megatron reproduces.

Anything else about RoPE that a Hugging Face Llama cannot express (partial rotary, interleaved pairs, Llama-3
scaling, layers without RoPE) is refused with the flag or key that set it. No torch or megatron at module level:
:mod:`megatron_harpe.shape` imports this.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from megatron_harpe.shape import ShapeError

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Field:
    hf: str                               # key in Hugging Face's rope_parameters
    arg: str                              # attribute of megatron's parsed args
    flag: str                             # the megatron flag that sets it
    type: type                            # what megatron's flag parses to (int flags refuse 2.5)
    default: float | int | bool | None    # megatron's value when the arg is unset, transformers' for an absent key
    required: bool = False                # transformers needs the key


# The megatron defaults are YarnRotaryEmbedding's (and megatron.training's _apply_yarn_config_from_args');
# tests/convert/test_rope_scaling.py holds them against megatron's own.
FIELDS: dict[str, tuple[Field, ...]] = {
    "linear": (
        Field("factor", "rotary_seq_len_interpolation_factor", "--rotary-seq-len-interpolation-factor", int, None,
              required=True),
    ),
    "yarn": (
        Field("factor", "rotary_scaling_factor", "--rotary-scaling-factor", float, 1.0, required=True),
        Field("original_max_position_embeddings", "yarn_original_max_position_embeddings",
              "--yarn-original-max-position-embeddings", int, 4096, required=True),
        Field("beta_fast", "yarn_beta_fast", "--yarn-beta-fast", float, 32.0),
        Field("beta_slow", "yarn_beta_slow", "--yarn-beta-slow", float, 1.0),
        Field("truncate", "yarn_correction_range_round_to_int", "--yarn-correction-range-round-to-int", bool, True),
        Field("mscale", "mscale", "--mscale", float, 1.0),
        Field("mscale_all_dim", "mscale_all_dim", "--mscale-all-dim", float, 0.0),
    ),
}
POSITION_EMBEDDING_TYPE = {"linear": "rope", "yarn": "yarn"}  # megatron's --position-embedding-type for each
_DERIVED = {"yarn": ("attention_factor",)}  # keys written from the table's values, not read into it
# RoPE settings beyond the base that a Hugging Face Llama cannot express: (args attribute, flag, set when).
_INEXPRESSIBLE = (
    ("rotary_percent", "--rotary-percent", lambda v: v is not None and float(v) != 1.0),
    ("rotary_interleaved", "--rotary-interleaved", bool),
    ("use_rope_scaling", "--use-rope-scaling", bool),  # Llama-3's frequency scaling: not mapped (yet)
    ("no_rope_freq", "--no-rope-freq", lambda v: v is not None and not (isinstance(v, list) and not any(v))),
)


@dataclass(frozen=True)
class RopeScaling:
    """A RoPE scaling as a model runs it: the Hugging Face type and the values of its :data:`FIELDS` row (defaults
    filled in), in the table's order."""

    rope_type: str
    values: tuple[tuple[str, float | int | bool], ...]

    def __getitem__(self, key: str) -> float | int | bool:
        return dict(self.values)[key]

    # --- Megatron ----------------------------------------------------------------------------------------------

    @classmethod
    def from_megatron_args(cls, args) -> RopeScaling | None:
        """The scaling parsed (or saved) Megatron args run with; None for plain RoPE. Refuses RoPE settings a
        Hugging Face Llama cannot express, naming the flag."""
        for attr, flag, is_set in _INEXPRESSIBLE:
            value = getattr(args, attr, None)
            if is_set(value):
                shown = flag if value is True else f"{flag} {value}"
                raise ShapeError(f"the checkpoint was trained with {shown}, which a Hugging Face Llama cannot "
                                 "express: no exported config would reproduce its logits")
        kind = args.position_embedding_type
        interpolation = getattr(args, "rotary_seq_len_interpolation_factor", None)
        if kind == "yarn":
            if interpolation is not None:  # megatron's YarnRotaryEmbedding never reads it
                log.warning("--rotary-seq-len-interpolation-factor %s is ignored by megatron's YaRN RoPE: the "
                            "export follows the model, which ran without it", interpolation)
            rope_type = "yarn"
        elif kind == "rope" and interpolation is not None:
            rope_type = "linear"
        elif kind == "rope":
            return None
        else:
            raise ShapeError(f"--position-embedding-type {kind}: not a Llama's RoPE (rope or yarn)")
        values = []
        for f in FIELDS[rope_type]:
            value = getattr(args, f.arg, None)
            values.append((f.hf, f.default if value is None else value))
        return cls(rope_type, tuple(values))

    def megatron_flags(self) -> list[str]:
        """The Megatron-LM flags that build this scaling (with ``--position-embedding-type``)."""
        flags = ["--position-embedding-type", POSITION_EMBEDDING_TYPE[self.rope_type]]
        for f in FIELDS[self.rope_type]:
            value = self[f.hf]
            if isinstance(value, bool):
                flags.append(f.flag if value else "--no-" + f.flag[2:])
            else:
                flags += [f.flag, str(value)]
        return flags

    # --- Hugging Face ------------------------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, params: dict, name: str = "config.json") -> RopeScaling | None:
        """The scaling of transformers' standardized ``rope_parameters`` (None for ``default``). Refuses types and
        keys megatron cannot run, naming them."""
        rope_type = params.get("rope_type", "default")
        partial = params.get("partial_rotary_factor")
        if partial is not None and float(partial) != 1.0:
            raise ShapeError(f"{name}: partial_rotary_factor {partial}: a megatron Llama rotates the whole head "
                             "(--rotary-percent 1.0)")
        if rope_type == "default":
            return None
        if rope_type not in FIELDS:
            raise ShapeError(f"{name}: RoPE scaling {rope_type!r} has no megatron counterpart here (converted: "
                             f"default, {', '.join(FIELDS)}): convert the base model")
        fields = FIELDS[rope_type]
        known = {"rope_type", "type", "rope_theta", "partial_rotary_factor", *_DERIVED.get(rope_type, ()),
                 *(f.hf for f in fields)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ShapeError(f"{name}: rope_parameters key {unknown[0]!r} of {rope_type!r} RoPE has no megatron "
                             "counterpart")
        values = []
        for f in fields:
            value = params.get(f.hf)
            if value is None and f.required:
                raise ShapeError(f"{name}: {rope_type!r} RoPE scaling needs {f.hf} (megatron's {f.flag})")
            values.append((f.hf, _megatron_value(f, f.default if value is None else value, name)))
        scaling = cls(rope_type, tuple(values))
        if rope_type == "yarn":
            scaling = scaling._with_mscales(params, name)
        return scaling

    def hf_parameters(self, rope_theta: float) -> dict:
        """``rope_parameters`` for config.json, which transformers turns into exactly megatron's frequencies."""
        params = {"rope_type": self.rope_type, "rope_theta": rope_theta, **dict(self.values)}
        if self.rope_type == "yarn":
            params["attention_factor"] = yarn_attention_factor(self["factor"], self["mscale"], self["mscale_all_dim"])
        return params

    def _with_mscales(self, params: dict, name: str) -> RopeScaling:
        """The megatron --mscale / --mscale-all-dim that give transformers' attention factor for ``params``."""
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        given = params.get("attention_factor")
        if given is None:  # transformers' rule: both mscales when both are non-zero, else the factor alone
            pair = (float(mscale), float(mscale_all_dim)) if mscale and mscale_all_dim else (1.0, 0.0)
        else:
            written = (self["mscale"], self["mscale_all_dim"])
            pair = next((p for p in (written, (1.0, 0.0)) if yarn_attention_factor(self["factor"], *p) == given),
                        None)
            if pair is None:
                raise ShapeError(
                    f"{name}: attention_factor {given}: megatron's YaRN derives it from --rotary-scaling-factor, "
                    f"--mscale and --mscale-all-dim ({yarn_attention_factor(self['factor'], *written)} for these) "
                    "and takes no other value")
        values = dict(self.values, mscale=pair[0], mscale_all_dim=pair[1])
        return RopeScaling(self.rope_type, tuple((f.hf, values[f.hf]) for f in FIELDS[self.rope_type]))


def _megatron_value(f: Field, value, name: str) -> float | int | bool:
    """``value`` of a Hugging Face key as megatron's flag types it (refused where the flag cannot hold it)."""
    if f.type is int and float(value) != int(value):
        raise ShapeError(f"{name}: {f.hf} {value}: megatron's {f.flag} takes an integer")
    return f.type(value)


def yarn_attention_factor(factor: float, mscale: float, mscale_all_dim: float) -> float:
    """What megatron multiplies YaRN's cos and sin by (megatron-core's own function)."""
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import _yarn_get_concentration_factor

    return _yarn_get_concentration_factor(float(factor), float(mscale), float(mscale_all_dim))


def hf_rope_parameters(scaling: RopeScaling | None, rope_theta: float) -> dict:
    """config.json's ``rope_parameters``: plain RoPE (``default``) without a scaling."""
    if scaling is None:
        return {"rope_type": "default", "rope_theta": rope_theta}
    return scaling.hf_parameters(rope_theta)


def megatron_rope_flags(scaling: RopeScaling | None) -> list[str]:
    """The Megatron-LM flags of a scaling: ``--position-embedding-type rope`` alone without one."""
    return ["--position-embedding-type", "rope"] if scaling is None else scaling.megatron_flags()


def describe(scaling: RopeScaling | None) -> str:
    """For the commands' summary line: ``", yarn RoPE scaling x4"``, nothing for plain RoPE."""
    return "" if scaling is None else f", {scaling.rope_type} RoPE scaling x{scaling['factor']:g}"


def refuse_with_harpe(scaling: RopeScaling | None, harpe_bases: list[float] | None) -> None:
    """HARPE's bases combine with position interpolation (its RoPE divides positions as megatron's does), not
    with YaRN (pretrain_harpe.py refuses that pair)."""
    if harpe_bases is not None and scaling is not None and scaling.rope_type != "linear":
        raise ShapeError(f"HARPE bases with {scaling.rope_type!r} RoPE scaling: HARPE runs plain RoPE or position "
                         "interpolation (pretrain_harpe.py refuses --position-embedding-type yarn with --harpe-* "
                         "flags); convert the model without bases, or one without YaRN")
