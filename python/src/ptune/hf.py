"""Loading ptune exports into ``transformers`` exactly as they were trained.

A ptune export is a Hugging Face PEFT folder (``adapter_config.json``,
``adapter_model.safetensors``) or, for full fine-tuning, a model folder
(``config.json``, ``model.safetensors``), plus ``ptune.json``: the job's spec
and final metrics. PEFT's config cannot say everything the job trained
with, so a plain ``PeftModel.from_pretrained`` can differ from the trained
model; :func:`load` applies what ``ptune.json`` records:

- mean pooling (``[head] pooling = "mean"``): the head reads the mean of the
  input's own tokens' last hidden states (virtual tokens excluded), not
  BERT's pooler over position 0 (RoBERTa: its head's dense layer over the
  mean rather than position 0);
- the labels, as ``config.id2label`` and ``label2id``;
- the task's head (sequence or token classification, causal LM); for token
  classification with prompt tuning or P-tuning the logits are those of the
  input's own tokens (PEFT returns the virtual tokens' too);
- prefix tuning and P-tuning v2 on BERT and RoBERTa encoders, which PEFT
  does not run under transformers 5: the saved key/value prefixes are
  attached to every self-attention layer;
- for causal LM, the job's generation settings (``max_new_tokens``,
  ``num_beams``, greedy) as the model's ``generation_config``; the prompt
  of a source text is :func:`causal_lm_prompt`.

The returned model is in eval mode, and carries the export's ``ptune.json``
as ``model.ptune``.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

PROVENANCE_FILE = "ptune.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
# ptune's default separator between a causal-LM source and its target.
SEPARATOR = " ||"


def provenance(adapter_dir) -> dict | None:
    """The export's ``ptune.json`` (``None`` when it has none)."""
    path = Path(adapter_dir) / PROVENANCE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def needs_helper(adapter_dir) -> str | None:
    """Why a plain ``PeftModel.from_pretrained`` would not reproduce the
    trained model (``None`` when it would)."""
    info = provenance(adapter_dir)
    if info is None:
        return None
    spec = info["spec"]
    reasons = []
    if spec.get("task") == "sequence_classification" and (spec.get("head") or {}).get("pooling") == "mean":
        reasons.append("its head reads the mean of the tokens")
    if spec.get("method") in ("prefix_tuning", "p_tuning_v2") and spec.get("task") != "causal_lm":
        reasons.append("PEFT runs no prefixes on encoders under transformers 5")
    if spec.get("task") == "token_classification" and spec.get("method") in ("prompt_tuning", "p_tuning"):
        reasons.append("PEFT returns the virtual tokens' logits too")
    return "; ".join(reasons) or None


def load(adapter_dir, base_model_dir=None, device=None):
    """The trained model of a ptune export: ``adapter_dir`` as downloaded
    (``client.adapters.download``, ``ptune adapter get``), ``base_model_dir``
    the base model's Hugging Face folder (not needed for full fine-tuning).
    Float32, eval mode, on ``device`` (default CPU)."""
    import torch

    adapter_dir = Path(adapter_dir)
    info = provenance(adapter_dir)
    if info is None:
        raise ValueError(f"{adapter_dir} has no {PROVENANCE_FILE}: not a ptune export (load it with PeftModel.from_pretrained)")
    spec = info["spec"]
    task, method = spec["task"], spec["method"]
    if method != "full" and base_model_dir is None:
        raise ValueError(f"a {method} adapter needs base_model_dir, the folder of {spec['base_model']}")
    if task == "causal_lm":
        model = _load_causal_lm(adapter_dir, base_model_dir, spec)
    else:
        model = _load_classifier(adapter_dir, base_model_dir, spec)
    model.ptune = info
    model.eval()
    return model.to(device or torch.device("cpu"))


def _labels(spec):
    labels = (spec.get("data") or {}).get("labels") or []
    return {i: str(label) for i, label in enumerate(labels)}, {str(label): i for i, label in enumerate(labels)}


def _load_classifier(adapter_dir: Path, base_model_dir, spec):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    level = "token" if spec["task"] == "token_classification" else "sequence"
    auto = AutoModelForTokenClassification if level == "token" else AutoModelForSequenceClassification
    id2label, label2id = _labels(spec)
    method = spec["method"]
    common = dict(id2label=id2label, label2id=label2id, num_labels=len(id2label), dtype=torch.float32)
    if method == "full":
        model = auto.from_pretrained(adapter_dir, **common)
        hf = model
        skip = 0
    else:
        config = json.loads((adapter_dir / ADAPTER_CONFIG_FILE).read_text())
        hf = _quietly(auto.from_pretrained, base_model_dir, **common)
        if config["peft_type"] == "PREFIX_TUNING":
            _attach_prefixes(hf, adapter_dir, config)
            model, skip = hf, 0
        else:
            from peft import PeftModel

            model = PeftModel.from_pretrained(hf, adapter_dir)
            hf = model.get_base_model()
            prompt_method = config["peft_type"] in ("PROMPT_TUNING", "P_TUNING")
            skip = int(config.get("num_virtual_tokens") or 0) if prompt_method else 0
    if level == "sequence" and (spec.get("head") or {}).get("pooling") == "mean":
        _mean_pooling(hf, skip)
    if level == "token" and skip:
        _drop_virtual_positions(hf, skip)
    return model


def _quietly(load, *args, **kwargs):
    """Loads a base model without transformers' report of the head it lacks
    (the adapter brings the trained head)."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return load(*args, **kwargs)
    finally:
        hf_logging.set_verbosity(previous)


def _encoder(hf):
    """The encoder inside a *For*Classification model (``bert``, ``roberta``)."""
    return getattr(hf, hf.base_model_prefix)


def _mean_pooling(hf, skip: int):
    """Makes the head read the mean of the input's own tokens' last hidden
    states, as ptune's ``pooling = "mean"`` trains it: BERT's pooler output
    is replaced by the mean; RoBERTa's head (which reads position 0) gets the
    mean at position 0. ``skip`` leading positions are virtual tokens."""
    encoder = _encoder(hf)
    seen = {}

    def remember_mask(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1:
            mask = args[1]
        seen["mask"] = mask

    def mean(hidden):
        hidden = hidden[:, skip:]
        mask = seen.get("mask")
        if mask is None:
            return hidden.mean(dim=1)
        mask = mask[:, -hidden.shape[1]:].to(hidden.dtype).unsqueeze(-1)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)

    encoder.register_forward_pre_hook(remember_mask, with_kwargs=True)
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler.register_forward_hook(lambda module, args, output: mean(args[0]))
    else:
        hf.classifier.register_forward_pre_hook(lambda module, args: (mean(args[0]).unsqueeze(1), *args[1:]))


def _drop_virtual_positions(hf, skip: int):
    """Token classification with a prompt: logits (and labels) of the
    input's own tokens only."""
    import torch

    def pad_labels(module, args, kwargs):
        labels = kwargs.get("labels")
        if labels is not None:
            pad = torch.full((labels.shape[0], skip), -100, dtype=labels.dtype, device=labels.device)
            kwargs["labels"] = torch.cat([pad, labels], dim=1)
        return args, kwargs

    def drop(module, args, kwargs, output):
        output.logits = output.logits[:, skip:]
        if "logits" in output:
            output["logits"] = output.logits
        return output

    hf.register_forward_pre_hook(pad_labels, with_kwargs=True)
    hf.register_forward_hook(drop, with_kwargs=True)


def _attach_prefixes(hf, adapter_dir: Path, config: dict):
    """Prefix tuning and P-tuning v2 on an encoder, as PEFT computes them:
    every self-attention layer attends to ``num_virtual_tokens`` saved key
    and value vectors before the input's own. The table is PEFT's
    ``prompt_embeddings``, ``[nvt, layers * 2 * hidden]``, laid out as
    ``[nvt, layers, (key, value), heads, head_dim]``. The trained head is
    copied into the model's classifier."""
    from safetensors.torch import load_file

    tensors = load_file(str(adapter_dir / ADAPTER_WEIGHTS_FILE))
    table = tensors["prompt_embeddings"].float()
    attention = [m for name, m in hf.named_modules() if type(m).__name__.endswith("SelfAttention")]
    nvt = table.shape[0]
    heads = attention[0].num_attention_heads
    head_dim = attention[0].attention_head_size
    expected = [nvt, len(attention) * 2 * heads * head_dim]
    if list(table.shape) != expected:
        raise ValueError(f"{adapter_dir}: prompt_embeddings has shape {list(table.shape)}, expected {expected}")
    table = table.view(nvt, len(attention) * 2, heads, head_dim).permute(1, 2, 0, 3)  # [layers * 2, heads, nvt, head_dim]
    for i, module in enumerate(attention):
        module.register_buffer("ptune_prefix_key", table[2 * i].clone(), persistent=False)
        module.register_buffer("ptune_prefix_value", table[2 * i + 1].clone(), persistent=False)
        module.forward = types.MethodType(_prefixed_self_attention, module)
    head = {}
    for key, value in tensors.items():
        for prefix in ("base_model.model.classifier.", "base_model.classifier."):
            if key.startswith(prefix):
                head[key[len(prefix):].replace("modules_to_save.", "").replace("default.", "")] = value
    hf.classifier.load_state_dict(head, strict=True)
    _shift_positions(hf, nvt)


def _shift_positions(hf, nvt: int):
    """The input's positions start after the prefix, as Hugging Face counts
    positions after ``past_key_values`` (and as ptune trains): BERT's from
    ``nvt``, RoBERTa's from ``pad_token_id + 1 + nvt`` over real tokens."""
    import torch

    encoder = _encoder(hf)
    roberta = hf.config.model_type in ("roberta", "xlm-roberta", "camembert")
    pad = hf.config.pad_token_id if hf.config.pad_token_id is not None else 1

    def positions(module, args, kwargs):
        if kwargs.get("position_ids") is not None:
            return args, kwargs
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return args, kwargs
        if roberta:
            mask = ids.ne(pad).long()
            kwargs["position_ids"] = (torch.cumsum(mask, dim=1) + nvt) * mask + pad
        else:
            kwargs["position_ids"] = torch.arange(nvt, nvt + ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
        return args, kwargs

    encoder.register_forward_pre_hook(positions, with_kwargs=True)


def _prefixed_self_attention(self, hidden_states, attention_mask=None, *args, **kwargs):
    """A BERT/RoBERTa self-attention forward with the module's saved prefixes
    prepended to its keys and values."""
    import torch
    import torch.nn.functional as F

    batch, length = hidden_states.shape[:2]
    shape = (batch, length, -1, self.attention_head_size)
    query = self.query(hidden_states).view(shape).transpose(1, 2)
    key = self.key(hidden_states).view(shape).transpose(1, 2)
    value = self.value(hidden_states).view(shape).transpose(1, 2)
    nvt = self.ptune_prefix_key.shape[1]
    key = torch.cat([self.ptune_prefix_key.unsqueeze(0).expand(batch, -1, -1, -1), key], dim=2)
    value = torch.cat([self.ptune_prefix_value.unsqueeze(0).expand(batch, -1, -1, -1), value], dim=2)
    scores = torch.matmul(query, key.transpose(-1, -2)) * self.attention_head_size**-0.5
    if attention_mask is not None:
        mask = attention_mask
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=scores.dtype, device=mask.device).masked_fill(~mask, torch.finfo(scores.dtype).min)
        mask = mask.to(scores.dtype)
        if mask.dim() == 2:  # [batch, seq] of 1 and 0
            mask = (1.0 - mask[:, None, None, :]) * torch.finfo(scores.dtype).min
        prefix = torch.zeros((*mask.shape[:-1], nvt), dtype=mask.dtype, device=mask.device)
        scores = scores + torch.cat([prefix, mask], dim=-1)
    probs = F.softmax(scores, dim=-1)
    output = torch.matmul(probs, value).transpose(1, 2).reshape(batch, length, -1)
    return output, probs


def causal_lm_prompt(source: str, separator: str = SEPARATOR) -> str:
    """The text a causal-LM job's model continues for ``source``: the
    source, then the separator (``" ||"``); the target follows after a
    space."""
    return f"{source}{separator}"


def _load_causal_lm(adapter_dir: Path, base_model_dir, spec):
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    if spec["method"] == "full":
        model = AutoModelForCausalLM.from_pretrained(adapter_dir, dtype=torch.float32)
        hf = model
    else:
        from peft import PeftModel

        hf = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
        model = PeftModel.from_pretrained(hf, adapter_dir)
    generation = spec.get("generation") or {}
    config = GenerationConfig.from_model_config(hf.config) if hf.generation_config is None else hf.generation_config
    config.max_new_tokens = int(generation.get("max_new_tokens", 64))
    config.num_beams = int(generation.get("num_beams", 1))
    config.do_sample = False
    if spec["method"] in ("prompt_tuning", "p_tuning", "prefix_tuning", "p_tuning_v2"):
        # PEFT's cached generation with a soft prompt or prefixes drifts
        # from the trained model under transformers 5 after the first
        # token; without the cache every step sees the virtual tokens and
        # the text again, as ptune decodes.
        config.use_cache = False
    # ptune decodes as Hugging Face's beam search with early_stopping=False and length_penalty 1.
    config.early_stopping = False
    config.length_penalty = 1.0
    if config.pad_token_id is None:
        config.pad_token_id = config.eos_token_id if not isinstance(config.eos_token_id, list) else config.eos_token_id[0]
    hf.generation_config = config
    if model is not hf:
        model.generation_config = config
    return model
