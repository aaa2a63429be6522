"""The policy layer on a tiny local model of every family: generate, log-probs, LoRA, the reference."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from rlhf.policy import LoraSpec, UnsupportedPolicyError, load_policy
from tests.fixtures import make_tiny

FAMILIES = {
    "vit-gpt2": lambda d: make_tiny.tiny_vit_gpt2(d),
    "clip-prefix": lambda d: make_tiny.tiny_clip_prefix(d),
    "llava": lambda d: make_tiny.tiny_llava(d),
    "qwen2-vl": lambda d: make_tiny.tiny_qwen2_vl(d, "2"),
    "qwen2.5-vl": lambda d: make_tiny.tiny_qwen2_vl(d, "2.5"),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def tiny_model(request, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    FAMILIES[request.param](path)
    return str(path)


def frames(n: int, seed: int = 0) -> list[Image.Image]:
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray(torch.randint(0, 255, (32, 32, 3), generator=g, dtype=torch.uint8).numpy()) for _ in range(n)]


def perturb_lora(policy) -> None:
    """LoRA B starts at zero (the adapter is a no-op); give it weights, as training would, and move the
    fully trained copies (clip-prefix's mapper) too."""
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
            elif "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.5)


def adapter_owned(name: str) -> bool:
    """A parameter of the adapter: LoRA's, or a fully trained copy that the reference swaps out."""
    return "lora_" in name or "modules_to_save" in name


def test_generate_logprobs_match_forward_on_multi_frame_batches(tiny_model):
    torch.manual_seed(1)
    policy = load_policy(tiny_model, lora=LoraSpec(r=4))
    perturb_lora(policy)
    # Three stories with 1, 3 and 2 frames: image tokens and features must stay matched per row.
    batch = policy.batch([frames(1, 0), frames(3, 1), frames(2, 2)], ["Tell a story.", "Tell a story about these images.", "Go"],
                         styles=[None, "spooky", "funny"], contexts=[None, None, "Once a red circle rolled."])  # fmt: skip
    out = policy.generate(batch, max_new_tokens=12, temperature=0.7)
    assert out.response_ids.shape == out.logprobs.shape == out.response_mask.shape
    assert out.response_ids.shape[0] == 3 and len(out.texts) == 3
    assert (out.logprobs <= 0).all() and (out.logprobs[out.response_mask.bool()] < 0).any()
    fwd = policy.forward(batch, out.response_ids, out.response_mask, temperature=0.7)
    valid = out.response_mask.bool()
    torch.testing.assert_close(fwd.logprobs[valid], out.logprobs[valid], atol=2e-4, rtol=1e-4)
    assert fwd.hidden.shape[:2] == out.response_ids.shape and fwd.hidden.shape[2] == policy.hidden_size


def test_a_row_scores_the_same_alone_and_in_a_padded_batch(tiny_model):
    policy = load_policy(tiny_model)
    ids, mask = policy.tokenize_responses(["a red circle", "the blue square met a green triangle by the sea"])
    both = policy.forward(policy.batch([frames(2, 5), frames(1, 6)], ["Tell a story.", "Tell a much longer story please."]), ids, mask)
    alone = policy.forward(policy.batch([frames(2, 5)], ["Tell a story."]), ids[:1, : mask[0].sum()], mask[:1, : mask[0].sum()])
    torch.testing.assert_close(both.logprobs[0, : mask[0].sum()], alone.logprobs[0], atol=2e-4, rtol=1e-4)


def test_lora_changes_outputs_and_the_reference_restores_the_base(tiny_model):
    base = load_policy(tiny_model)
    policy = load_policy(tiny_model, lora=LoraSpec(r=4))
    batch = policy.batch([frames(2, 3)], ["Tell a story about these images."])
    ids, mask = policy.tokenize_responses(["Once upon a time a red circle rolled through the dark forest."])
    reference = base.forward(batch, ids, mask).logprobs
    torch.testing.assert_close(policy.forward(batch, ids, mask).logprobs, reference)  # a fresh adapter is a no-op
    perturb_lora(policy)
    tuned = policy.forward(batch, ids, mask).logprobs
    assert not torch.allclose(tuned, reference, atol=1e-3)
    with policy.reference():
        torch.testing.assert_close(policy.forward(batch, ids, mask).logprobs, reference)
    torch.testing.assert_close(policy.forward(batch, ids, mask).logprobs, tuned)  # the adapter is back on
    trainable = {n for n, p in policy.model.named_parameters() if p.requires_grad}
    assert trainable and all(adapter_owned(n) for n in trainable)
    assert not any("vision" in n or "visual" in n or "encoder.encoder" in n for n in trainable), "the vision tower stays frozen"


def test_lora_training_step_with_gradient_checkpointing(tiny_model):
    policy = load_policy(tiny_model, lora=LoraSpec(r=4))
    policy.enable_gradient_checkpointing()
    policy.model.train()
    batch = policy.batch([frames(2, 4), frames(1, 7)], ["Tell a story.", "Tell a story."])
    ids, mask = policy.tokenize_responses(["a red circle rolled", "the blue square"])
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    loss = -(policy.forward(batch, ids, mask).logprobs.sum() / mask.sum())
    loss.backward()
    torch.optim.SGD(policy.trainable_parameters(), lr=1.0).step()
    changed = {n for n, p in policy.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(adapter_owned(n) for n in changed)
    assert any("lora_B" in n for n in changed)


def test_gradient_checkpointing_takes_effect_in_eval_mode(tiny_model):
    """PPO keeps the model in eval mode (dropout off); transformers checkpoints only in train mode."""
    policy = load_policy(tiny_model, lora=LoraSpec(r=4))
    perturb_lora(policy)
    batch = policy.batch([frames(2, 4), frames(1, 7)], ["Tell a story.", "Tell a story."])
    ids, mask = policy.tokenize_responses(["a red circle rolled by the sea at night", "the blue square"])

    def saved_bytes_and_grads() -> tuple[int, dict[str, torch.Tensor]]:
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = -policy.forward(batch, ids, mask).logprobs.sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None}
        policy.model.zero_grad(set_to_none=True)
        return sum(saved), grads

    assert not policy.model.training
    plain, plain_grads = saved_bytes_and_grads()
    policy.enable_gradient_checkpointing()
    checkpointed, grads = saved_bytes_and_grads()
    assert checkpointed < 0.5 * plain, (checkpointed, plain)
    assert grads.keys() == plain_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], atol=1e-5, rtol=1e-4)
    assert not any(m.training for m in policy.model.modules()), "the layers go back to eval mode"
    out = policy.generate(batch, max_new_tokens=6)  # no-grad passes are not checkpointed, and keep the KV cache
    assert out.response_ids.shape[0] == 2


def test_save_and_reload_an_adapter_gives_identical_logprobs(tiny_model, tmp_path):
    policy = load_policy(tiny_model, lora=LoraSpec(r=4))
    perturb_lora(policy)
    batch = policy.batch([frames(2, 8)], ["Tell a story."])
    ids, mask = policy.tokenize_responses(["the blue square met a green triangle"])
    policy.save_pretrained(tmp_path / "adapter")
    again = load_policy(str(tmp_path / "adapter"))
    torch.testing.assert_close(again.forward(batch, ids, mask).logprobs, policy.forward(batch, ids, mask).logprobs)
    assert again.adapter_hash() == policy.adapter_hash() is not None


def test_an_sft_adapter_is_merged_so_the_reference_is_the_sft_model(tiny_model, tmp_path):
    sft = load_policy(tiny_model, lora=LoraSpec(r=4))
    perturb_lora(sft)
    sft.save_pretrained(tmp_path / "sft")
    batch = sft.batch([frames(1, 9)], ["Tell a story."])
    ids, mask = sft.tokenize_responses(["a red circle"])
    expected = sft.forward(batch, ids, mask).logprobs
    policy = load_policy(tiny_model, sft_adapter=str(tmp_path / "sft"), lora=LoraSpec(r=4))
    with policy.reference():
        torch.testing.assert_close(policy.forward(batch, ids, mask).logprobs, expected, atol=1e-5, rtol=1e-4)
    on_top = load_policy(str(tmp_path / "sft"), lora=LoraSpec(r=4))  # the SFT output dir as --policy: the same
    assert on_top.info.sft_adapter == str((tmp_path / "sft").resolve())
    with on_top.reference():
        torch.testing.assert_close(on_top.forward(batch, ids, mask).logprobs, expected, atol=1e-5, rtol=1e-4)


def test_unsupported_family_is_named(tmp_path):
    make_tiny.tiny_text_encoder(tmp_path / "bert")
    with pytest.raises(UnsupportedPolicyError, match="'bert' model.*LLaVA, Qwen2-VL"):
        load_policy(str(tmp_path / "bert"))


def test_repeated_rows_keep_their_own_images(tiny_model):
    policy = load_policy(tiny_model)
    batch = policy.batch([frames(1, 10), frames(2, 11)], ["Tell a story.", "Tell a story."])
    ids, mask = policy.tokenize_responses(["a red circle"] * 2)
    single = policy.forward(batch, ids, mask).logprobs
    twice = policy.forward(batch.repeat(2), ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0)).logprobs
    torch.testing.assert_close(twice, single.repeat_interleave(2, 0), atol=2e-5, rtol=1e-4)
    assert not torch.allclose(single[0], single[1]), "the two items' images differ, so must their scores"
