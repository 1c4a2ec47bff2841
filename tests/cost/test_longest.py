"""The longest context that fits (lorakit.cost.longest, `lorakit fit --max-seq-len`): checked against the simulator
itself, run directly: the answer fits with the levers it names, one step longer does not fit with every lever,
and no lever it names can be dropped; the S x S attention mask a real unpadded batch never holds is not counted."""

import lorakit
from lorakit.cli import main
from lorakit.cost.ladder import lever_settings
from lorakit.cost.longest import GRANULARITY, longest
from lorakit.cost.simulate import simulate


def deep_llama():
    """Three blocks (simulated whole: a long model would be worked out from 2 and 3) and room for long sequences."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=128, intermediate_size=1024, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=512, max_position_embeddings=1 << 17,
                       architectures=["LlamaForCausalLM"], dtype="bfloat16")


EVERY = ["chunked loss", "checkpointing", "activation offload", "tiled MLP", "8-bit optimizer"]


def device(seq_len, levers, **spec):
    return simulate(deep_llama(), task="causal-lm", batch_size=1, seq_len=seq_len, **lever_settings(levers),
                    **spec).device_total


def test_the_longest_sequence_fits_one_step_more_does_not_and_its_levers_are_all_needed():
    lora = lorakit.Lora(r=8, targets="all-linear")
    limit = device(6 * GRANULARITY, EVERY, lora=lora)  # a budget that every lever stretches to about 6k
    answer, = longest(deep_llama(), limit, lora=lora, task="causal-lm", methods=("lora",))
    assert answer.seq_len % GRANULARITY == 0 and answer.seq_len >= 6 * GRANULARITY
    assert answer.device_bytes == device(answer.seq_len, answer.levers, lora=lora) <= limit
    assert device(answer.seq_len + GRANULARITY, EVERY, lora=lora) > limit
    for lever in answer.levers:  # without any one of them, the step does not fit
        fewer = [r for r in answer.levers if r != lever]
        if lever != "chunked loss" and not (lever == "checkpointing" and "activation offload" in fewer):
            assert device(answer.seq_len, fewer, lora=lora) > limit, lever  # (free; needed by the offload)
    assert answer.training_args["per_device_train_batch_size"] == 1
    assert lorakit.training_args("/tmp/lorakit-longest", **answer.training_args)  # taken as it is
    assert len(answer.tried) <= 12  # a secant search, not a sweep


def test_a_method_that_does_not_fit_at_any_length_says_so():
    full, = longest(deep_llama(), 2**20, task="causal-lm", methods=("full",))  # 1 MiB: not even the weights
    assert full.seq_len == 0 and full.levers == [] and full.device_bytes > 2**20


def test_no_attention_mask_is_counted_for_an_unpadded_batch_and_eager_attention_holds_one():
    """sdpa with is_causal holds no (S, S) tensor (transformers skips the mask for a batch without padding or
    packing, and the simulator answers as for its unpadded batch); eager attention builds one, as it really does."""
    seq = 2048
    runs = {attn: simulate(deep_llama(), task="causal-lm", batch_size=1, seq_len=seq, gradient_checkpointing=True,
                           lora=lorakit.Lora(r=8, targets="all-linear"), attn=attn) for attn in ("sdpa", "eager")}
    assert max(size for _, size in runs["sdpa"].top_activations) < seq * seq
    assert dict(runs["eager"].top_activations)["model"] >= seq * seq * 2  # a bf16 (S, S) mask, held by the model


def test_the_command_answers_and_refuses_a_batch(capsys):
    assert main(["fit", "meta-llama/Llama-3.1-8B", "--gpu-memory", "8GiB", "--max-seq-len", "--method", "full"]) == 0
    out = capsys.readouterr().out
    assert "longest" in out and "full" in out and "none" in out  # 8 GiB holds no full fine-tuning of 8B
    assert main(["fit", "meta-llama/Llama-3.1-8B", "--gpu-memory", "8GiB", "--max-seq-len", "--global-batch",
                 "4"]) == 2
    assert "batch 1" in capsys.readouterr().err
