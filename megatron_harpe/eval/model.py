"""Load a Hugging Face model directory for evaluation and generate greedily from token ids."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, List

import torch


@dataclass
class EvalModel:
    model: torch.nn.Module
    encode: Callable[[str], List[int]]     # text -> ids, no special tokens
    decode: Callable[[List[int]], str]
    bos_id: int
    device: torch.device

    @torch.no_grad()
    def generate(self, prompts: List[List[int]], max_new_tokens: int) -> List[str]:
        """Greedy continuations of equally long prompts (a batch), decoded."""
        ids = torch.tensor(prompts, device=self.device)
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                  do_sample=False, pad_token_id=self.bos_id)
        return [self.decode(row[ids.shape[1]:].tolist()) for row in out]


def load_eval_model(path: str, device: str = "auto", dtype: str = "auto") -> EvalModel:
    """A model directory written by tools/convert_megatron_to_hf.py (HARPE via trust_remote_code) or any HF Llama.

    bf16 on a GPU, fp32 on a CPU by default. The tokenizer comes from the directory (tokenizer.json or
    tokenizer.model); a directory without one is refused with what to pass.
    """
    from transformers import AutoModelForCausalLM

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} has no config.json: give a Hugging Face model directory "
                                "(tools/convert_megatron_to_hf.py writes one)")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    torch_dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "bf16": torch.bfloat16,
                   "fp16": torch.float16, "fp32": torch.float32}[dtype]
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch_dtype).to(device).eval()
    spm = os.path.join(path, "tokenizer.model")
    if os.path.isfile(spm):
        import sentencepiece

        processor = sentencepiece.SentencePieceProcessor(model_file=spm)
        return EvalModel(model, processor.encode, processor.decode, processor.bos_id(), device)
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        return EvalModel(model, lambda t: tok.encode(t, add_special_tokens=False), tok.decode,
                         tok.bos_token_id if tok.bos_token_id is not None else 1, device)
    raise FileNotFoundError(f"{path} has no tokenizer.model or tokenizer.json: export with --tokenizer-model")
