"""Writes tiny random decoder checkpoints and their reference outputs for
worker/tests/engine_decoders.rs:

- worker/tests/fixtures/tiny-gpt2/   GPT2LMHeadModel (weights under `transformer.`, tied head)
- worker/tests/fixtures/tiny-llama/  LlamaForCausalLM (grouped-query attention, untied head,
                                     rope_theta 5000), saved in shards with an index
- worker/tests/fixtures/tiny-qwen2/  Qwen2ForCausalLM (q/k/v biases, tied head, rope_theta 1e6)

each with a small word-level tokenizer.json, PEFT adapters under adapters/{prompt,prefix,lora}/
(prompt tuning, prefix tuning and LoRA with a non-zero B), and reference.safetensors holding
transformers/PEFT float32 CPU outputs: logits of a right-padded and a left-padded batch with each
adapter, causal-LM losses and the prompt's gradient. Token-level results (greedy and beam-search
`generate`), RoPE frequencies and BLEU scores go to worker/tests/fixtures/decoders_reference.json,
with the versions of torch, transformers, peft, tokenizers and sacrebleu that produced them.

Usage (from the repository root, after `source scripts/env.sh`; sacrebleu is only needed here):
    pip install sacrebleu==2.6.0
    python scripts/reference/tiny_decoders.py
"""

import hashlib
import json
import math
import shutil
from pathlib import Path

import peft
import sacrebleu
import tokenizers
import torch
import transformers
from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

ROOT = Path(__file__).resolve().parents[2] / "worker/tests/fixtures"
SEED = 5
NUM_VIRTUAL_TOKENS = 3
MAX_NEW_TOKENS = 6
NUM_BEAMS = 3

WORDS = """name eatType food priceRange customer rating area familyFriendly near pub coffee shop restaurant
Italian French English Japanese Indian cheap moderate high low average city centre riverside yes no The Vaults
Eagle Mill Alimentum Cricketers Wrestlers is a an in the with and serves it located family friendly kid of price
range food . , [ ] || 5 out £20 - 25 has""".split()

# Sources of different lengths, so that batches carry padding.
SOURCES = [
    "name [ The Eagle ] , food [ French ] ||",
    "name [ Alimentum ] ||",
    "name [ The Mill ] , area [ riverside ] , near [ The Vaults ] ||",
]
# Equal-length sources for prompt-tuning generation: PEFT ignores position ids, so with left
# padding it would count padding positions; without padding every convention agrees.
EVEN_SOURCES = ["name [ The Eagle ] ||", "name [ The Mill ] ||"]
TARGETS = ["The Eagle serves French food .", "Alimentum is a pub .", "The Mill is near The Vaults ."]

MODELS = {
    "gpt2": {
        "folder": "tiny-gpt2",
        "specials": ["<|endoftext|>", "<unk>"],
        "bos": None,
        "eos": "<|endoftext|>",
        "lora_targets": ["c_attn", "c_proj", "c_fc"],
    },
    "llama": {
        "folder": "tiny-llama",
        "specials": ["<unk>", "<s>", "</s>"],
        "bos": "<s>",
        "eos": "</s>",
        "lora_targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    },
    "qwen2": {
        "folder": "tiny-qwen2",
        "specials": ["<|endoftext|>", "<unk>"],
        "bos": None,
        "eos": "<|endoftext|>",
        "lora_targets": ["q_proj", "v_proj", "down_proj"],
    },
}


def build_tokenizer(spec):
    vocab = {token: i for i, token in enumerate(spec["specials"] + list(dict.fromkeys(WORDS)))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if spec["bos"] is not None:
        bos = spec["bos"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
        )
    return tokenizer, vocab


def build_config(kind, vocab, spec):
    eos = vocab[spec["eos"]]
    common = dict(vocab_size=len(vocab), initializer_range=0.25, eos_token_id=eos, pad_token_id=eos)
    if kind == "gpt2":
        return GPT2Config(
            n_positions=48, n_embd=32, n_layer=2, n_head=4, activation_function="gelu_new",
            layer_norm_epsilon=1e-5, bos_token_id=eos, **common,
        )
    if kind == "llama":
        return LlamaConfig(
            hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=48, rms_norm_eps=1e-5, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, bos_token_id=vocab[spec["bos"]],
            **common,
        )
    return Qwen2Config(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=48, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, **common,
    )


def encode(tokenizer, texts):
    return [tokenizer.encode(text).ids for text in texts]


def pad(rows, pad_id, left):
    longest = max(len(r) for r in rows)
    ids, mask = [], []
    for r in rows:
        fill = [pad_id] * (longest - len(r))
        ids.append(fill + r if left else r + fill)
        mask.append([0] * len(fill) + [1] * len(r) if left else [1] * len(r) + [0] * len(fill))
    return torch.tensor(ids), torch.tensor(mask)


def positions(mask):
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def with_adapter(base, kind, method):
    """A PEFT model over `base` with a random adapter; LoRA gets a non-zero B."""
    torch.manual_seed(SEED + {"prompt": 1, "prefix": 2, "lora": 3}[method])
    if method == "prompt":
        config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=NUM_VIRTUAL_TOKENS)
    elif method == "prefix":
        config = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=NUM_VIRTUAL_TOKENS)
    else:
        config = LoraConfig(
            task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, lora_dropout=0.0,
            target_modules=MODELS[kind]["lora_targets"], fan_in_fan_out=(kind == "gpt2"),
        )
    model = get_peft_model(base, config)
    if method == "lora":
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.3)
    return model.eval()


def greedy_margin(scores, finished_before):
    """Smallest gap between the best and second-best logit over the steps
    whose token counted, so that a float rounding cannot flip the choice."""
    margin = float("inf")
    for step, s in enumerate(scores):
        top = s.topk(2, dim=-1).values
        gaps = (top[:, 0] - top[:, 1])[~finished_before[step]]
        if gaps.numel():
            margin = min(margin, gaps.min().item())
    return margin


def generate(model, ids, mask, eos, pad_id, num_beams):
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, num_beams=num_beams,
        eos_token_id=eos, pad_token_id=pad_id, output_scores=True, return_dict_in_generate=True,
    )
    generated = out.sequences[:, ids.shape[1]:].tolist()
    tokens = []
    for row in generated:
        cut = row.index(eos) if eos in row else len(row)
        tokens.append(row[:cut])
    margin = None
    if num_beams == 1:
        finished, done = [], torch.zeros(ids.shape[0], dtype=torch.bool)
        for step in range(len(out.scores)):
            finished.append(done.clone())
            done |= out.sequences[:, ids.shape[1] + step] == eos
        margin = greedy_margin(out.scores, finished)
    return tokens, margin


def manual_greedy(model, ids, mask, eos, explicit_positions):
    """Greedy decoding by full forwards, one token at a time: the adapter's
    forward semantics without generate's cache handling."""
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    tokens = [[] for _ in range(ids.shape[0])]
    scores, finished = [], []
    for _ in range(MAX_NEW_TOKENS):
        kwargs = {"position_ids": positions(mask)} if explicit_positions else {}
        logits = model(input_ids=ids, attention_mask=mask, **kwargs).logits[:, -1]
        scores.append(logits)
        finished.append(done.clone())
        nxt = logits.argmax(-1)
        for i, t in enumerate(nxt.tolist()):
            if not done[i]:
                if t == eos:
                    done[i] = True
                else:
                    tokens[i].append(t)
        if done.all():
            break
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return tokens, greedy_margin(scores, finished)


def pick_eos(model, ids, mask, pad_id):
    """A token that greedy decoding of the first example emits at its third
    step, so that decoding stops early for some examples and not others."""
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
        eos_token_id=None, pad_token_id=pad_id,
    )
    row = out[0, ids.shape[1]:].tolist()
    return row[min(2, len(row) - 1)]


def model_reference(kind):
    spec = MODELS[kind]
    folder = ROOT / spec["folder"]
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    tokenizer, vocab = build_tokenizer(spec)
    tokenizer.save(str(folder / "tokenizer.json"))
    pad_id = vocab[spec["eos"]]

    torch.manual_seed(SEED)
    config = build_config(kind, vocab, spec)
    base = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # make biases and norms non-trivial
        for name, param in base.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                param.add_(torch.randn_like(param) * 0.1)
    if kind == "llama":
        base.save_pretrained(folder, max_shard_size="60KB")
    else:
        base.save_pretrained(folder)

    tensors = {}
    summary = {"config": json.loads((folder / "config.json").read_text())}
    # Parameters and sha256 over the checkpoint's files (shards in name order).
    shards = sorted(folder.glob("model*.safetensors"))
    digest = hashlib.sha256()
    parameters = 0
    for shard in shards:
        digest.update(shard.read_bytes())
        with safe_open(shard, "pt") as f:
            parameters += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    summary["checkpoint"] = {"files": [s.name for s in shards], "parameters": parameters, "sha256": digest.hexdigest()}
    right_ids, right_mask = pad(encode(tokenizer, SOURCES), pad_id, left=False)
    left_ids, left_mask = pad(encode(tokenizer, SOURCES), pad_id, left=True)
    summary["right"] = {"input_ids": right_ids.tolist(), "attention_mask": right_mask.tolist()}
    summary["left"] = {"input_ids": left_ids.tolist(), "attention_mask": left_mask.tolist()}

    # Training batch: source ids then target ids, labels -100 over the source and the padding.
    pairs = [encode(tokenizer, [s])[0] + tokenizer.encode(t, add_special_tokens=False).ids + [pad_id]
             for s, t in zip(SOURCES, TARGETS)]
    source_lens = [len(encode(tokenizer, [s])[0]) for s in SOURCES]
    train_ids, train_mask = pad(pairs, pad_id, left=False)
    labels = train_ids.clone().masked_fill(train_mask == 0, -100)
    for row, n in enumerate(source_lens):
        labels[row, :n] = -100
    summary["train"] = {"input_ids": train_ids.tolist(), "attention_mask": train_mask.tolist(), "labels": labels.tolist()}

    eos = pick_eos(base, left_ids, left_mask, pad_id)
    del base
    summary["generation"] = {"eos_token_id": eos, "pad_token_id": pad_id, "max_new_tokens": MAX_NEW_TOKENS,
                             "num_beams": NUM_BEAMS, "sources": SOURCES, "even_sources": EVEN_SOURCES}
    even_ids, even_mask = pad(encode(tokenizer, EVEN_SOURCES), pad_id, left=True)
    summary["generation"]["even_input_ids"] = even_ids.tolist()

    generated = {}
    margins = {}
    for method in ["base", "prompt", "prefix", "lora"]:
        # A fresh copy of the saved checkpoint for each adapter: what the engine loads.
        base = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
        model = base if method == "base" else with_adapter(base, kind, method)
        with torch.no_grad():
            tensors[f"{method}.right_logits"] = model(input_ids=right_ids, attention_mask=right_mask).logits
            if method != "prompt":
                tensors[f"{method}.left_logits"] = model(
                    input_ids=left_ids, attention_mask=left_mask, position_ids=positions(left_mask)
                ).logits
            gen_ids, gen_mask = (even_ids, even_mask) if method == "prompt" else (left_ids, left_mask)
            greedy, margins[f"{method}.greedy"] = generate(model, gen_ids, gen_mask, eos, pad_id, 1)
            manual, manual_margin = manual_greedy(model, gen_ids, gen_mask, eos, explicit_positions=(method != "prompt"))
            if greedy == manual:
                generated[f"{method}.greedy"] = greedy
                if method != "prompt":
                    generated[f"{method}.beam"], _ = generate(model, gen_ids, gen_mask, eos, pad_id, NUM_BEAMS)
            else:
                # generate's prompt-learning path disagrees with the adapter's own forward: keep the
                # forward-by-forward tokens and say so.
                print(f"warning: {kind} {method}: generate {greedy} != forward-by-forward {manual}")
                generated[f"{method}.greedy"] = manual
                margins[f"{method}.greedy"] = manual_margin
                summary.setdefault("generate_disagrees", []).append(method)
        if method in ("base", "prompt"):
            model.zero_grad()
            loss = model(input_ids=train_ids, attention_mask=train_mask, labels=labels).loss
            tensors[f"{method}.train_loss"] = loss.detach().reshape(1)
            if method == "prompt":
                loss.backward()
                weight = model.prompt_encoder["default"].embedding.weight
                tensors["prompt.train_loss_grad"] = weight.grad.detach().clone()
        if method != "base":
            model.save_pretrained(folder / "adapters" / method)
            (folder / "adapters" / method / "README.md").unlink(missing_ok=True)  # a generated model card
    summary["generated"] = generated
    # Decoded greedy outputs of the plain model scored against references that share a few words.
    hypotheses = [tokenizer.decode(tokens) for tokens in generated["base.greedy"]]
    references = [[target, " ".join(h.split()[:3] + ["food", "."])] for h, target in zip(hypotheses, TARGETS)]
    summary["e2e_bleu"] = {
        "sources": [s.removesuffix(" ||") for s in SOURCES],
        "references": references,
        "hypotheses": hypotheses,
        "score": sacrebleu.corpus_bleu(hypotheses, [list(r) for r in zip(*references)]).score,
    }
    summary["greedy_margins"] = margins
    save_file({k: v.contiguous().float() for k, v in tensors.items()}, folder / "reference.safetensors")
    return summary


def rope_reference():
    """Inverse frequencies of the RoPE types the engine implements, from transformers."""
    cases = {}
    for name, params in {
        "default": {"rope_type": "default", "rope_theta": 10000.0},
        "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    }.items():
        config = LlamaConfig(hidden_size=256, num_attention_heads=2, num_key_value_heads=2, intermediate_size=8,
                             num_hidden_layers=1, vocab_size=8, max_position_embeddings=512,
                             rope_parameters=dict(params))
        if name == "default":
            inv_freq, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
        else:
            inv_freq, _ = ROPE_INIT_FUNCTIONS[name](config)
        cases[name] = {"config": config.to_dict(), "inv_freq": inv_freq.tolist()}
    return cases


def bleu_reference():
    """sacreBLEU corpus scores (13a tokens, exp smoothing) on hand-made cases."""
    cases = [
        {  # several references per hypothesis, partial matches
            "hypotheses": ["The Eagle is a cheap coffee shop near Burger King.",
                           "Alimentum serves French food in the city centre."],
            "references": [["The Eagle is a cheap coffee shop near Burger King in the riverside area.",
                            "Near Burger King, The Eagle coffee shop is cheap."],
                           ["Alimentum serves French food in the city centre.",
                            "In the city centre, Alimentum offers French food.",
                            "French food is served at Alimentum."]],
        },
        {  # short hypothesis: brevity penalty against the closest reference
            "hypotheses": ["The Mill is a pub."],
            "references": [["The Mill is a pub near the river with a high customer rating.",
                            "The Mill is a family-friendly pub by the river."]],
        },
        {  # no 4-gram matches: exp smoothing
            "hypotheses": ["pub the Mill a is near"],
            "references": [["The Mill is a pub near the river."]],
        },
        {  # numbers, prices, hyphens and apostrophes under 13a
            "hypotheses": ["Prices range £20-25, it's rated 5 out of 5. Kid-friendly & cheap; call 01223.5"],
            "references": [["Prices range £20-25 , it's rated 5 out of 5. Kid-friendly & affordable; call 01223.5",
                            "It costs £20-25 and it's kid-friendly."]],
        },
        {  # nothing in common
            "hypotheses": ["abc def"],
            "references": [["xyz uvw rst"]],
        },
    ]
    for case in cases:
        width = max(len(refs) for refs in case["references"])
        streams = [[refs[i] if i < len(refs) else None for refs in case["references"]] for i in range(width)]
        case["score"] = sacrebleu.corpus_bleu(case["hypotheses"], streams).score
    tokenizer = sacrebleu.tokenizers.tokenizer_13a.Tokenizer13a()
    texts = ["Prices range £20-25, it's rated 5.5 out of 5.", "a.b,c 3.14 1,000 x-1 3-4 (yes) [no] {ok} ~ 'q'",
             "&quot;quoted&quot; &amp; more...", "End with comma,", "..,,"]
    return {"cases": cases, "tokenize_13a": [{"text": t, "tokens": tokenizer(t)} for t in texts]}


def main():
    outputs = {
        "generator": "scripts/reference/tiny_decoders.py",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "tokenizers": tokenizers.__version__, "sacrebleu": sacrebleu.__version__},
        "num_virtual_tokens": NUM_VIRTUAL_TOKENS,
        "models": {kind: model_reference(kind) for kind in MODELS},
        "rope": rope_reference(),
        "bleu": bleu_reference(),
    }
    (ROOT / "decoders_reference.json").write_text(json.dumps(outputs) + "\n")
    print(f"wrote {', '.join(m['folder'] for m in MODELS.values())} and decoders_reference.json under {ROOT}")
    for kind, summary in outputs["models"].items():
        print(kind, "greedy margins", summary["greedy_margins"])


if __name__ == "__main__":
    main()
