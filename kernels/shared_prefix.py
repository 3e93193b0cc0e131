"""The shared-prefix forward: each prompt scored once per group, its completions as branches of one sequence.

Depends on torch and transformers alone (the Qwen-VL text model's attention interface), so this one file can
be copied into another project. README "Shared-prefix forward" has the measurements.

    from kernels.shared_prefix import prefix_layout, shared_prefix_hidden, use_prefix_attention
    use_prefix_attention(model, "branch")                    # once, after loading
    batch = prefix_layout(prompt_keys, prompts, completions, pad_id)
    hidden = shared_prefix_hidden(model, batch)              # (B, T, H): as if each completion were alone

- prefix_layout: the sequences (prompt once, then its completions) and, per completion token, where its
  predicting hidden state sits.
- prefix_attention_mask / branch_attention / prefix_attention: the attention rule (a completion sees the prompt
  and its own earlier tokens), as one SDPA call per completion (`branch`, no (L, L) mask) or as dense masks.
- shared_prefix_hidden: the text model's forward over the layout, with each completion's mRoPE positions
  continuing from its prompt's.
"""
import torch

PREFIX_ATTENTION = "palmr_prefix"  # the text model's attention implementation for the branch route

class PrefixBranches:
    """The shared-prefix layout as prefix_attention sees it, from branch (S, L) (shared_prefix_batch): per
    sequence, the prompt length and each completion's [start, end) in the sequence, in order.

    It travels to the attention function as `mask`, branch as an (S, 1, 1, L) int64 tensor carrying this object:
    a 4-D tensor passes every text model's mask preparation untouched (transformers returns a 4-D mask as is),
    int64 is a dtype no ordinary attention mask has, and activation checkpointing recomputes with the same object."""

    def __init__(self, branch):
        self.shape = tuple(branch.shape)
        self.mask = branch[:, None, None, :].to(torch.long)
        self.mask.prefix_branches = self
        self.spans = []
        for row in branch.tolist():
            prompt = row.count(0)  # the prompt comes first
            runs = []
            for i in range(prompt, len(row)):
                if row[i] < 0:
                    break
                if not runs or row[i] != row[i - 1]:
                    runs.append([i, i + 1])
                else:
                    runs[-1][1] = i + 1
            self.spans.append((prompt, [tuple(r) for r in runs]))


def branch_attention(query, key, value, layout, scaling):
    """Exact attention of the shared-prefix layout without an (L, L) mask: per sequence, the prompt attends
    causally to itself, and each completion to the prompt and causally to itself: one SDPA call on
    [prompt keys; its keys] with PyTorch's lower-right causal bias (`causal_lower_right`), which CUDA runs
    with the flash or memory-efficient kernels and no mask tensor. The work and memory are those of the
    per-row layout's attention, with the prompt's keys computed once. Grouped keys are repeated to the query
    heads first (what transformers' SDPA path does too), since the lower-right flash path takes no GQA.
    query (S, Hq, L, D), key/value (S, Hkv, L, D) -> (S, Hq, L, D); padding rows are 0 (never read)."""
    from torch.nn.attention.bias import causal_lower_right
    sdpa = torch.nn.functional.scaled_dot_product_attention
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    out = []
    for s, (prompt, runs) in enumerate(layout.spans):
        q, k, v = query[s:s + 1], key[s:s + 1], value[s:s + 1]
        parts = [sdpa(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], is_causal=True, scale=scaling)]
        for start, end in runs:
            keys = torch.cat([k[:, :, :prompt], k[:, :, start:end]], 2)
            values = torch.cat([v[:, :, :prompt], v[:, :, start:end]], 2)
            parts.append(sdpa(q[:, :, start:end], keys, values, scale=scaling,
                              attn_mask=causal_lower_right(end - start, prompt + end - start)))
        done = runs[-1][1] if runs else prompt
        parts.append(query.new_zeros((1, query.shape[1], query.shape[2] - done, query.shape[3])))
        out.append(torch.cat(parts, 2))
    return torch.cat(out, 0)




def prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The text model's attention function (transformers' AttentionInterface) for the shared-prefix layout:
    branch_attention when the mask is a PrefixBranches.mask (prefix_attention_mask), PyTorch SDPA for every other
    mask (per-row forwards, HF generation and evaluation). query (B, Hq, L, D), key/value (B, Hkv, L, D) ->
    (B, L, Hq, D), None. A registered function because it must receive the layout, not a tensor mask."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    layout = getattr(attention_mask, "prefix_branches", None)  # PrefixBranches.mask
    if layout is not None:
        return branch_attention(query, key, value, layout, scaling).transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                  **kwargs)


def use_prefix_attention(model, route):
    """Record the shared-prefix attention route (`branch` or `dense`) on the model; for branch, switch the text
    model's attention to prefix_attention (the vision tower keeps its own)."""
    assert route in ("branch", "dense"), f"unknown shared-prefix attention route {route!r}"
    if route == "branch":
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
        AttentionInterface.register(PREFIX_ATTENTION, prefix_attention)
        AttentionMaskInterface.register(PREFIX_ATTENTION, sdpa_mask)  # the masks of ordinary forwards: SDPA's
        model.set_attn_implementation({"text_config": PREFIX_ATTENTION})
    model.prefix_attention = route
    return model


def prefix_layout(keys, prompts, completions, pad_id, token_types=True):
    """Shared-prefix layout: each run of consecutive rows with the same prompt key (a group, or part of one) is
    one sequence, the prompt once and then the run's completions, each completion seeing the prompt and its own
    earlier tokens only (prefix_attention_mask). The vision tower and every prompt token run once per run
    instead of once per row.

    keys: per row, its prompt's key (e.g. the sample id); prompts: per row, the encoded prompt (input_ids and,
    for an image, pixel_values, image_grid_thw, mm_token_type_ids); completions: per row, its token ids;
    token_types: include mm_token_type_ids (shared_prefix_hidden hands them on where get_rope_index reads them).
    -> dict(input_ids (S, L) right-padded; branch (S, L): 0 on the prompt, j on the sequence's j-th completion
    (j >= 1), -1 on padding; shift (S, L): how many positions a completion token sits after where it would be
    alone after its prompt (the total length of the earlier completions of its sequence; 0 on the prompt);
    hidden_index (B, T), T = the longest completion (at least 1): the flat index into (S * L) of the position
    whose hidden state predicts each completion token (the prompt's last token for the first one); pixel_values
    and image_grid_thw once per sequence; mm_token_type_ids (S, L) with token_types), on the CPU.
    """
    runs = []  # [prompt key, row indices]
    for i, key in enumerate(keys):
        if runs and runs[-1][0] == key:
            runs[-1][1].append(i)
        else:
            runs.append([key, [i]])
    width = max(1, max(len(c) for c in completions))
    hidden_at = torch.zeros((len(keys), width), dtype=torch.long)  # (B, T): position in its own sequence
    seqs, firsts = [], []  # (ids, branch, shift, types); the encoded prompt of each run
    for _, idx in runs:
        e = prompts[idx[0]]
        firsts.append(e)
        ids, P = list(e["input_ids"]), len(e["input_ids"])
        branch, shift = [0] * P, [0] * P
        types = list(e.get("mm_token_type_ids", [0] * P))
        for j, i in enumerate(idx, 1):
            c = completions[i]
            start = len(ids)
            hidden_at[i, :len(c)] = torch.tensor([P - 1] + list(range(start, start + len(c) - 1)))[:len(c)]
            ids += list(c)
            branch += [j] * len(c)
            shift += [start - P] * len(c)
            types += [0] * len(c)
        seqs.append((ids, branch, shift, types))
    S, L = len(seqs), max(len(q[0]) for q in seqs)
    full = lambda fill: torch.full((S, L), fill, dtype=torch.long)  # noqa: E731
    batch = {"input_ids": full(pad_id), "branch": full(-1), "shift": full(0)}
    types = full(0)
    for k, (ids, branch, shift, typ) in enumerate(seqs):
        for name, values in (("input_ids", ids), ("branch", branch), ("shift", shift)):
            batch[name][k, :len(values)] = torch.tensor(values, dtype=torch.long)
        types[k, :len(typ)] = torch.tensor(typ, dtype=torch.long)
    row_seq = torch.tensor([k for k, (_, idx) in enumerate(runs) for _ in idx], dtype=torch.long)
    batch["hidden_index"] = row_seq[:, None] * L + hidden_at  # masked positions point at a valid index (unread)
    vision = [e for e in firsts if "pixel_values" in e]
    if vision:
        batch["pixel_values"] = torch.cat([e["pixel_values"] for e in vision])
        batch["image_grid_thw"] = torch.cat([e["image_grid_thw"] for e in vision])
        if token_types:
            batch["mm_token_type_ids"] = types
    return batch


def prefix_attention_mask(branch, route="branch", implementation="sdpa", dtype=torch.float32):
    """The shared-prefix layout's attention rule, from branch (S, L) (prefix_layout), in the form `route`
    and the text model's attention `implementation` take.

    Rule: query i sees key j iff j <= i, j is not padding, and j is on the prompt or on i's own completion; a
    padding query sees itself too, so its softmax is finite (its output is never read).
    -> route branch: a PrefixBranches (branch_attention; no (L, L) tensor). route dense: an (S, 1, L, L) mask,
    bool (True = attend, PyTorch SDPA's convention) for sdpa, additive float (0 or finfo(dtype).min) for eager.
    Raises ValueError for a dense mask and any other implementation (flash-attention kernels take no custom mask).
    """
    S, L = branch.shape
    if route == "branch":
        return PrefixBranches(branch)
    key, query = branch[:, None, :], branch[:, :, None]  # broadcast, not gathered: (S, L, L) bools only
    causal = torch.ones((L, L), dtype=torch.bool, device=branch.device).tril()
    mask = (causal & (key >= 0) & ((key == 0) | (key == query))) | torch.eye(L, dtype=torch.bool, device=branch.device)
    if implementation in ("sdpa", PREFIX_ATTENTION):  # prefix_attention hands a tensor mask to SDPA
        return mask[:, None]
    if implementation == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=branch.device).masked_fill(~mask, torch.finfo(dtype).min)[:, None]
    raise ValueError(f"a dense shared-prefix mask needs an attention implementation that takes one (sdpa, eager), "
                     f"not {implementation!r}; use --prefix-attention branch or --no-shared-prefix")


def shared_prefix_hidden(model, batch):
    """(B, T, H) hidden states of a prefix_layout batch (on the model's device): one forward of a Qwen-VL model
    (Qwen2.5-VL, Qwen3-VL: every decoder layer softmax attention) over its sequences with the layout's attention
    and each completion's mRoPE positions continuing from its prompt's, as if it were alone after the prompt.
    Qwen3-VL's DeepStack features are added at the image tokens by the model itself. AssertionError for a model
    with other layers (Qwen3.5's linear attention carries a state from one completion into the next)."""
    ids, branch = batch["input_ids"], batch["branch"]
    valid = (branch >= 0).long()
    import inspect  # the model's own get_rope_index reads the image tokens' types where it takes them
    takes_types = "mm_token_type_ids" in inspect.signature(model.model.get_rope_index).parameters
    types = {"mm_token_type_ids": batch["mm_token_type_ids"]} if takes_types and "mm_token_type_ids" in batch else {}
    if "image_grid_thw" in batch:  # the model's own 3-D positions of prompt + completions laid end to end ...
        positions = model.model.get_rope_index(input_ids=ids, image_grid_thw=batch["image_grid_thw"],
                                               attention_mask=valid, **types)[0]
    else:
        positions = (valid.cumsum(-1) - 1).clamp(min=0)[None].expand(3, -1, -1)
    positions = positions - batch["shift"][None]  # ... then each completion moved back to follow its prompt
    language = model.model.language_model
    route = getattr(model, "prefix_attention", "dense")
    mask = prefix_attention_mask(branch, route, language.config._attn_implementation, language.embed_tokens.weight.dtype)
    kinds = set(getattr(language.config, "layer_types", None) or ["full_attention"])  # Qwen3-VL's config has none
    assert kinds == {"full_attention"}, f"the shared-prefix layout is exact for attention layers only, not {kinds}"
    if route == "branch":  # handed to every layer as is, past transformers' mask preparation (a 4-D tensor)
        mask = mask.mask
    vision = {"pixel_values": batch["pixel_values"], "image_grid_thw": batch["image_grid_thw"]} \
        if "pixel_values" in batch else {}
    out = model.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, **vision, **types)
    return out.last_hidden_state.flatten(0, 1)[batch["hidden_index"]]
