"""dora_minimal in a transformers training stack, side by side with Hugging Face PEFT: Trainer
checkpoints and resuming, PEFT's default targets per model type, and a classification head
trained in full (modules_to_save) saved and loaded both ways. Skipped where transformers (or
PEFT, accelerate, safetensors for the tests that need them) is not installed."""

import copy
import json
import warnings

import pytest
import torch

import dora_minimal as dm
from helpers import rel_error

transformers = pytest.importorskip("transformers")
T = transformers


def tiny_llama():
    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16,
                                            num_hidden_layers=2, num_attention_heads=2,
                                            num_key_value_heads=2))


# --- Trainer: checkpoints, resume, gradient checkpointing -------------------------------------

def train(output_dir, resume_from=None, **arguments):
    """Six AdamW steps of a tiny Llama adapted with DoRA, checkpointed every 3 steps; returns
    the adapter and how many times one adapted layer ran forward."""
    model = dm.get_peft_model(tiny_llama(), dm.LoraConfig(r=2, use_dora=True))
    calls = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *_: calls.append(1))
    ids = torch.randint(0, 32, (16, 6), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (newer transformers renames gradient_checkpointing)
        args = T.TrainingArguments(str(output_dir), max_steps=6, per_device_train_batch_size=4,
                                   learning_rate=1e-2, save_steps=3, report_to=[],
                                   use_cpu=True, logging_steps=100, seed=0, disable_tqdm=True,
                                   **arguments)
        T.Trainer(model, args, train_dataset=data).train(resume_from_checkpoint=resume_from)
    return dm.adapter_state_dict(model), len(calls)


def test_trainer_checkpoints_resumes_exactly_and_trains_the_same_with_gradient_checkpointing(
        tmp_path):
    pytest.importorskip("accelerate")
    pytest.importorskip("safetensors")
    initial = dm.adapter_state_dict(dm.get_peft_model(tiny_llama(), dm.LoraConfig(
        r=2, use_dora=True)))
    uninterrupted, calls = train(tmp_path / "run")
    assert calls == 6 and (tmp_path / "run" / "checkpoint-3" / "model.safetensors").is_file()
    assert all(not torch.equal(uninterrupted[k], initial[k]) for k in initial if "lora_B" in k)
    resumed, calls = train(tmp_path / "run", resume_from=tmp_path / "run" / "checkpoint-3")
    assert calls == 3  # steps 4 to 6 only
    checkpointed, calls = train(tmp_path / "gc", gradient_checkpointing=True)
    assert calls == 12  # each step's forward runs again in backward
    for key, value in uninterrupted.items():
        assert torch.equal(resumed[key], value), key
        assert rel_error(checkpointed[key].numpy(), value.numpy()) < 1e-6, key


def test_save_pretrained_of_the_whole_model_merged_or_not(tmp_path):
    pytest.importorskip("safetensors")
    model = dm.get_peft_model(tiny_llama(), dm.LoraConfig(r=2, use_dora=True))
    with torch.no_grad():
        for _, layer in dm.adapter_layers(model):
            layer.lora_B.normal_(0, 0.3)
    ids = torch.randint(0, 32, (2, 5))
    expected = model(ids).logits.detach()
    model.save_pretrained(tmp_path / "adapted")  # a checkpoint as Trainer writes it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the adapter's keys are unexpected in a plain Llama)
        plain = T.LlamaForCausalLM.from_pretrained(tmp_path / "adapted")
    assert rel_error(plain(ids).logits.detach().numpy(), tiny_llama()(ids).logits.detach()
                     .numpy()) < 1e-6  # its base weights are the pretrained ones
    dm.merge_and_unload(model).save_pretrained(tmp_path / "merged")  # a plain Llama checkpoint
    merged = T.LlamaForCausalLM.from_pretrained(tmp_path / "merged")
    assert rel_error(merged(ids).logits.detach().numpy(), expected.numpy()) < 1e-5


# --- target_modules=None: PEFT's defaults, model type by model type ---------------------------

FAMILIES = {
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(
        vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2)),
    "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(
        vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2)),
    "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(
        vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2)),
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=32, n_positions=16, n_embd=8,
                                                   n_layer=2, n_head=2)),
    "gpt_neox": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(
        vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2)),
    "opt": lambda: T.OPTForCausalLM(T.OPTConfig(
        vocab_size=32, hidden_size=8, ffn_dim=16, num_hidden_layers=2, num_attention_heads=2,
        word_embed_proj_dim=8, max_position_embeddings=32)),
    "bert": lambda: T.BertForSequenceClassification(T.BertConfig(
        vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_labels=3)),
    "roberta": lambda: T.RobertaForMaskedLM(T.RobertaConfig(
        vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=40)),
    "t5": lambda: T.T5ForConditionalGeneration(T.T5Config(
        vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=2, num_heads=2)),
    "bart": lambda: T.BartForConditionalGeneration(T.BartConfig(
        vocab_size=32, d_model=8, encoder_ffn_dim=16, decoder_ffn_dim=16, encoder_layers=1,
        decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        max_position_embeddings=32)),
    "vit": lambda: T.ViTForImageClassification(T.ViTConfig(
        hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        image_size=8, patch_size=4, num_labels=3)),
    "whisper": lambda: T.WhisperForConditionalGeneration(T.WhisperConfig(
        vocab_size=32, d_model=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, num_mel_bins=4,
        max_source_positions=8, max_target_positions=8, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, decoder_start_token_id=1)),
}
# what PEFT 0.21.2 adapts with target_modules=None: (layer names, how many), None: it refuses
EXPECTED = {"llama": (["q_proj", "v_proj"], 4), "mistral": (["q_proj", "v_proj"], 4),
            "qwen2": (["q_proj", "v_proj"], 4), "gpt2": (["c_attn"], 2),
            "gpt_neox": (["query_key_value"], 2), "opt": (["q_proj", "v_proj"], 4),
            "bert": (["query", "value"], 4), "roberta": (["query", "value"], 4),
            "t5": (["q", "v"], 12), "bart": (["q_proj", "v_proj"], 6), "vit": None,
            "whisper": None}


def adapted(family, library, **config):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = FAMILIES[family]()
    task_type = "SEQ_CLS" if family == "bert" else None
    return library.get_peft_model(model, library.LoraConfig(use_dora=True, task_type=task_type,
                                                            **config))


@pytest.mark.parametrize("family", FAMILIES)
def test_target_modules_none_adapts_what_peft_adapts(family):
    if EXPECTED[family] is None:  # as PEFT, which asks: "Please specify `target_modules`"
        with pytest.raises(ValueError, match=f"model type '{family}'.*please specify "
                                             f"target_modules"):
            adapted(family, dm)
        return
    ours = adapted(family, dm)
    names = sorted(n for n, _ in dm.adapter_layers(ours))
    ends, count = EXPECTED[family]
    assert sorted({n.rpartition(".")[2] for n in names}) == ends and len(names) == count
    output = ours.get_output_embeddings()
    if output is not None and ours.config.tie_word_embeddings:  # the tie holds (T5, GPT-2)
        assert output.weight is ours.get_input_embeddings().weight
    peft = pytest.importorskip("peft")
    theirs = adapted(family, peft)
    assert names == sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                           if isinstance(m, peft.tuners.lora.LoraLayer))
    assert dm.trainable_parameters(ours).trainable == theirs.get_nb_trainable_parameters()[0]


def test_naming_a_tied_output_embedding_warns_that_the_tie_breaks():
    with pytest.warns(UserWarning, match=r"lm_head: its weight is tied to \['transformer.wte'\]"):
        model = adapted("gpt2", dm, target_modules=["lm_head"])
    assert model.lm_head.weight is not model.transformer.wte.weight


# --- a classification head, trained in full and saved both ways -------------------------------

CLASSIFIERS = {  # a head called classifier, and one called score
    "bert": (FAMILIES["bert"], "classifier"),
    "llama": (lambda: T.LlamaForSequenceClassification(T.LlamaConfig(
        vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, num_labels=3)), "score"),
}


@pytest.mark.parametrize("family", CLASSIFIERS)
def test_a_seq_cls_head_trains_in_full_and_loads_both_ways_with_peft(tmp_path, family):
    peft = pytest.importorskip("peft")
    pytest.importorskip("safetensors")
    ids = torch.randint(1, 32, (2, 6), generator=torch.Generator().manual_seed(1))
    make, head = CLASSIFIERS[family]

    def base():
        torch.manual_seed(0)
        return make().eval()

    ours = dm.get_peft_model(base(), dm.LoraConfig(use_dora=True, task_type="SEQ_CLS"))
    theirs = peft.get_peft_model(base(), peft.LoraConfig(use_dora=True, task_type="SEQ_CLS"))
    assert type(getattr(ours, head)) is torch.nn.Linear and getattr(ours, head).weight.requires_grad
    assert dm.trainable_parameters(ours).trainable == theirs.get_nb_trainable_parameters()[0]
    ours.train()(ids).logits.sum().backward()  # a training step runs
    torch.manual_seed(2)
    with torch.no_grad():  # PEFT's adapter and head away from their init
        for name, p in theirs.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    theirs.eval()
    expected = theirs(ids).logits.detach()
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = dm.from_pretrained(base(), tmp_path / "theirs")
    assert rel_error(loaded(ids).logits.detach().numpy(), expected.numpy()) < 1e-6
    dm.save_pretrained(loaded, tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (saved["modules_to_save"], saved["task_type"]) == ([head], "SEQ_CLS")
    from safetensors.torch import load_file
    assert (load_file(tmp_path / "ours" / "adapter_model.safetensors").keys()
            == load_file(tmp_path / "theirs" / "adapter_model.safetensors").keys())
    reopened = peft.PeftModel.from_pretrained(base(), tmp_path / "ours").eval()
    assert rel_error(reopened(ids).logits.detach().numpy(), expected.numpy()) < 1e-6
    merged = dm.merge_and_unload(copy.deepcopy(loaded))
    assert not dm.adapter_layers(merged)
    assert rel_error(merged(ids).logits.detach().numpy(), expected.numpy()) < 1e-5
    assert torch.equal(getattr(merged, head).weight, getattr(loaded, head).weight)
